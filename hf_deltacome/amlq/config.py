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
DEFAULT_LOW_BIT_SHARE = "auto"  # 0.5 (at most half of a linear's columns at the lowest bit width) when the target allows
AUTO_LOW_BIT_SHARES = (0.5, 1.0)  # what "auto" tries, in order: the first whose cheapest layout fits the target
DEFAULT_DAMP = "auto"  # GPTQ damping chosen per linear from calibration tokens per input column (auto_damp)
# auto_damp's anchors, in calibration tokens per input column: at or below SMALL the damping is 0.1 (measured on
# SmolLM2 with 1,024 tokens, 0.7-1.8 tokens per column: 0.1 beat 0.01 for uniform GPTQ and AMLQ alike); at or above
# LARGE it is GPTQ's usual 0.01 (its published setting: 128 x 2048 tokens on 4096-wide inputs, 64 per column).
SMALL_CALIBRATION, LARGE_CALIBRATION = 4.0, 64.0


class AmlqConfig(QuantizationConfigMixin):
    """Quantization config of an AMLQ model (``quant_method="amlq"``).

    Args:
        bpw: requested average bits per weight over the quantized linears (codes, scales, zeros, low-rank factors).
        bits, group_sizes: the precisions the allocation may choose from.
        error_rank: ``"auto"`` (chosen per linear), ``0`` (no low-rank correction) or a fixed rank.
        rank_bits: bits of the stored low-rank factors (8, or 4: half the bytes, so ``"auto"`` can afford more).
        low_bit_share: the largest share of a linear's columns at the lowest candidate bit width, or ``"auto"``:
            0.5, dropped to no limit (1.0) only when 0.5 cannot reach ``bpw``.
        layout: per-module layout; filled by :func:`hf_deltacome.amlq.quantize_model`.
        modules_to_not_convert: linears left in full precision (the embeddings and ``lm_head`` always are).
        damp: GPTQ damping (a share of the Hessian's mean diagonal), or ``"auto"``: chosen per linear from the
            calibration tokens per input column (:func:`auto_damp`); the values used are in ``info["damping"]``.
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
        low_bit_share: float | str = DEFAULT_LOW_BIT_SHARE,
        layout: dict[str, dict[str, Any]] | None = None,
        modules_to_not_convert: list[str] | None = None,
        damp: float | str = DEFAULT_DAMP,
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
        self.low_bit_share = low_bit_share if low_bit_share == "auto" else _number(low_bit_share, "low_bit_share")
        self.layout = dict(layout or {})
        self.modules_to_not_convert = modules_to_not_convert
        self.damp = damp if damp == "auto" else _number(damp, "damp")
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
        if self.low_bit_share != "auto" and not 0.0 <= self.low_bit_share <= 1.0:
            raise ConfigError(f"AMLQ low_bit_share must be 'auto' or in [0, 1], got {self.low_bit_share}")
        if self.damp != "auto" and not 0.0 < self.damp < 1.0:
            raise ConfigError(f"AMLQ damp must be 'auto' or in (0, 1), got {self.damp}")
        for name, entry in self.layout.items():
            check_entry(name, entry)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__, default=str))

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"cache_dequantized": self.cache_dequantized}


def _number(value: Any, field: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"AMLQ {field} must be 'auto' or a number, got {value!r}") from None


def auto_damp(tokens: int, in_features: int) -> float:
    """GPTQ damping for a Hessian estimated from ``tokens`` input vectors of ``in_features`` columns.

    ``H`` has rank at most ``tokens``: with few tokens per column its small eigenvalues are noise, and GPTQ's error
    feedback along them fits the calibration text instead of the weights (measured: SmolLM2 at 0.7-1.8 tokens per
    column, held-out perplexity of uniform 3-bit GPTQ 52.6 at 0.01 vs 44.3 at 0.1, AMLQ 63.0 vs 42.1). So: 0.1 at or
    below ``SMALL_CALIBRATION`` tokens per column, GPTQ's 0.01 at or above ``LARGE_CALIBRATION``, log-linear between.
    """
    ratio = tokens / max(int(in_features), 1)
    if ratio <= SMALL_CALIBRATION:
        return 0.1
    if ratio >= LARGE_CALIBRATION:
        return 0.01
    return 0.1 * 10.0 ** (-math.log(ratio / SMALL_CALIBRATION) / math.log(LARGE_CALIBRATION / SMALL_CALIBRATION))


def resolve_damp(damp: float | str, tokens: int, in_features: int) -> float:
    """The damping of one linear: an explicit value as given, ``"auto"`` by :func:`auto_damp`."""
    return auto_damp(tokens, in_features) if damp == "auto" else float(damp)


def parse_auto_float(text: str | float, field: str) -> float | str:
    """``--damp`` / ``--low-bit-share``: ``auto`` or a number."""
    return "auto" if text == "auto" else _number(text, field)


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
