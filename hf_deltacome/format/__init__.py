"""The packed format of a Delta-CoMe adapter, in one place.

* :mod:`.packing` — the bit layout of one quantized matrix (codes packed into int32 words, float16 scales, uint8
  zeros); shared by the PyTorch path, the Triton kernels, the file validator and the byte budget;
* :mod:`.storage` — `PackedDelta`: one ``uint8`` blob per adapter and linear (bands, singular values, bias delta,
  the optional parts) and the state-dict keys they are saved under; the blob's segments and views in :mod:`.blob`;
* :mod:`.baseline_parts` — the baselines' parts: BitDelta's sign bits, DARE's sparse values and the one seeded
  mask generator; :mod:`.sparse_bands` — sparse bands of singular vectors (impart, the sparse tail);
* :mod:`.budget` — the exact bytes of a layout and the ranks a compression ratio buys.
"""
