"""``AmlqConfig``: the transformers quantization config of an AMLQ model, saved in ``config.json``.

It carries the per-module layout (:mod:`hf_deltacome.format.amlq_layout`) that loading needs to allocate every
packed buffer before reading weights, what the quantization measured, and the fingerprint of the full-precision
model it was made from (so an adapter made against that model is recognised when loaded onto this one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ConfigError
from ..format.amlq_layout import ALLOWED_BITS, LOWRANK_BITS, check_entry

QUANT_METHOD = "amlq"
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZES = (32, 64, 128)
DEFAULT_LOW_BIT_SHARE = 0.5  # at most half of a linear's columns at the lowest bit width


class AmlqConfig(QuantizationConfigMixin):
    """Quantization config of an AMLQ model (``quant_method="amlq"``).

    Args:
        bpw: requested average bits per weight over the quantized linears (codes, scales, zeros, low-rank factors).
        bits, group_sizes: the precisions the allocation may choose from.
        error_rank: ``"auto"`` (chosen per linear), ``0`` (no low-rank correction) or a fixed rank.
        rank_bits: bits of the stored low-rank factors (8, or 4: half the bytes, so ``"auto"`` can afford more).
        low_bit_share: the largest share of a linear's columns at the lowest candidate bit width.
        layout: per-module layout; filled by :func:`hf_deltacome.amlq.quantize_model`.
        modules_to_not_convert: linears left in full precision (the embeddings and ``lm_head`` always are).
        info: what the quantization measured and chose (true bpw, time, calibration, per-linear errors).
        source_fingerprint: fingerprint (JSON text) of the full-precision model that was quantized.
        cache_dequantized: keep each linear's dequantized weight after its first use (faster, full-size memory).
    """

    def __init__(
        self,
        bpw: float = 3.0,
        bits: Sequence[int] = DEFAULT_BITS,
        group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
        error_rank: int | str = "auto",
        rank_bits: int = 8,
        low_bit_share: float = DEFAULT_LOW_BIT_SHARE,
        layout: dict[str, dict[str, Any]] | None = None,
        modules_to_not_convert: list[str] | None = None,
        damp: float = 0.01,
        act_order: bool = True,
        info: dict[str, Any] | None = None,
        source_fingerprint: str | None = None,
        cache_dequantized: bool = False,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.bpw = float(bpw)
        self.bits = [int(b) for b in bits]
        self.group_sizes = [int(g) for g in group_sizes]
        self.error_rank = error_rank
        self.rank_bits = int(rank_bits)
        self.low_bit_share = float(low_bit_share)
        self.layout = dict(layout or {})
        self.modules_to_not_convert = modules_to_not_convert
        self.damp = float(damp)
        self.act_order = bool(act_order)
        self.info = dict(info or {})
        self.source_fingerprint = source_fingerprint
        self.cache_dequantized = bool(cache_dequantized)
        self.post_init()

    def post_init(self) -> None:
        """Check every field; a bad value raises `ConfigError` naming it."""
        bad = [b for b in self.bits if b not in ALLOWED_BITS]
        if not self.bits or bad:
            raise ConfigError(f"AMLQ bits {self.bits}: each must be one of {ALLOWED_BITS}")
        if not self.group_sizes or any(g < 8 or g & (g - 1) for g in self.group_sizes):
            raise ConfigError(f"AMLQ group sizes {self.group_sizes}: each must be a power of two >= 8")
        if not (self.bpw > 0 and math.isfinite(self.bpw)):
            raise ConfigError(f"AMLQ bpw must be a positive number, got {self.bpw}")
        rank = self.error_rank
        if not (rank == "auto" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0)):
            raise ConfigError(f"AMLQ error_rank must be 'auto', 0 or a positive rank, got {rank!r}")
        if self.rank_bits not in LOWRANK_BITS:
            raise ConfigError(f"AMLQ rank_bits must be one of {LOWRANK_BITS}, got {self.rank_bits}")
        if not 0.0 <= self.low_bit_share <= 1.0:
            raise ConfigError(f"AMLQ low_bit_share must be in [0, 1], got {self.low_bit_share}")
        for name, entry in self.layout.items():
            check_entry(name, entry)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__, default=str))

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"cache_dequantized": self.cache_dequantized}


def parse_error_rank(text: str | int) -> int | str:
    """``--error-rank``: ``auto``, ``0`` or a positive integer."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"error rank must be 'auto', 0 or a positive integer, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"error rank must be 'auto', 0 or a positive integer, got {text!r}")
    return value
