"""The packed format of a Delta-CoMe adapter, in one place.

* :mod:`.packing` — the bit layout of one quantized matrix (codes packed into int32 words, float16 scales, uint8
  zeros); shared by the PyTorch path, the Triton kernels, the file validator and the byte budget;
* :mod:`.storage` — `PackedDelta`: the buffers of one adapter on one linear (bands, singular values, bias delta,
  the baselines' sign / sparse parts) and the state-dict keys they are saved under;
* :mod:`.budget` — the exact bytes of a layout and the ranks a compression ratio buys.
"""
