"""Compression of a fine-tune's delta, as a pipeline (:mod:`.pipeline`'s ``compress()``):

targets (:mod:`.targets`) → calibration (:mod:`.calibration`) → plan (:mod:`.plan`: per-module layouts from the byte
budget, :mod:`.search`, :mod:`.allocation`, checked end to end by :mod:`.endtoend`) → layer walk (:mod:`.layerwalk`)
compressing each target (:mod:`.modules`: SVD bands in :mod:`.svd`, baselines in :mod:`.baselines`), with
per-layer checkpoints (:mod:`.checkpoint`).
"""
