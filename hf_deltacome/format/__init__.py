"""The packed format of a Delta-CoMe adapter, in one place.

* :mod:`.packing` — the bit layout of one quantized matrix (codes packed into int32 words, float16 scales, uint8
  zeros); shared by the PyTorch path, the Triton kernels, the file validator and the byte budget;
* :mod:`.storage` — `PackedDelta`: the buffers of one adapter on one linear (bands, singular values, bias delta,
  the optional parts) and the state-dict keys they are saved under (buffer bases in :mod:`.buffers`);
* :mod:`.parts` — the optional parts: BitDelta's sign bits, DARE's sparse values, sparse bands of singular vectors
  (impart, the sparse tail) and the one seeded mask generator;
* :mod:`.budget` — the exact bytes of a layout and the ranks a compression ratio buys.
"""
