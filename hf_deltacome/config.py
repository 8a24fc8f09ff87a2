"""`DeltaCoMeConfig`: the PEFT config of a compressed delta, including the per-module layout."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional, Union

from peft import PeftConfig
from peft.utils import PeftType

from .budget import DEFAULT_BANDS, validate_band_spec
from .errors import ConfigError
from .packing import SUPPORTED_BITS


def _ensure_peft_type() -> PeftType:
    """Add ``DELTACOME`` to PEFT's ``PeftType`` enum (PEFT requires the member for registration and config I/O)."""
    if "DELTACOME" in PeftType.__members__:
        return PeftType.DELTACOME
    member = str.__new__(PeftType, "DELTACOME")
    member._name_ = "DELTACOME"
    member._value_ = "DELTACOME"
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType.__members__)
    PeftType._member_map_["DELTACOME"] = member
    PeftType._value2member_map_["DELTACOME"] = member
    PeftType._member_names_.append("DELTACOME")
    type.__setattr__(PeftType, "DELTACOME", member)
    return member


DELTACOME = _ensure_peft_type()

METHODS = ("deltacome",)  # extended by the quality issue (bitdelta, lowrank, svd-uniform, dare)
QUANTIZERS = ("gptq", "rtn")


def parse_ratio(value: Union[str, float, int]) -> float:
    """Parse a compression ratio given as ``0.0625``, ``"1/16"`` or ``16`` (meaning 1/16)."""
    try:
        if isinstance(value, str):
            r = float(Fraction(value.strip()))
        else:
            r = float(value)
    except (ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"cannot parse compression ratio {value!r}; use e.g. 1/16 or 0.0625") from e
    if r > 1.0:
        r = 1.0 / r
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"compression ratio must be in (0, 1], got {value!r}")
    return r


@dataclass
class DeltaCoMeConfig(PeftConfig):
    """Configuration of a Delta-CoMe compressed delta.

    The fields above ``layout`` say how to compress; ``layout`` and the fields after it are filled by
    :func:`hf_deltacome.compress` and say what was stored, so loading can build the right buffers before reading
    any weight.

    Args:
        ratio: target size of the packed factors as a fraction of the float16 delta of the target linears
            (1/16 by default). Scales, zeros and singular values are paid from this budget.
        method: compression method; ``"deltacome"`` is SVD + mixed-precision quantization.
        bands: ``[(bits, rank | fraction | None), ...]`` from the largest singular values down. Default
            ``[[8, 2], [3, 32], [2, None]]``: 2 vectors at 8 bits, 32 at 3 bits, the rest of the budget at 2 bits.
        group_size: quantization group size along the reduction dimension.
        quantizer: ``"gptq"`` (uses calibration activations) or ``"rtn"`` (data-free round-to-nearest).
        damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        act_order: quantize columns of ``V`` in order of decreasing Hessian diagonal (static groups).
        target_modules: names or regex of the linears to compress; ``None`` = every linear of the decoder.
        layout: per module name, ``{"shape": [m, n], "bands": [[bits, rank], ...], "group_size": g,
            "bias": bool}``.
        base_fingerprint: fingerprint of the base weights the delta was computed against.
    """

    ratio: float = field(default=1 / 16, metadata={"help": "Size of the packed factors / fp16 delta."})
    method: str = field(default="deltacome", metadata={"help": f"Compression method, one of {METHODS}."})
    bands: list = field(default_factory=lambda: [list(b) for b in DEFAULT_BANDS])
    group_size: int = field(default=128)
    quantizer: str = field(default="gptq")
    damp: float = field(default=0.01)
    act_order: bool = field(default=False)
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    layout: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_fingerprint: Optional[str] = field(default=None)
    compression_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DELTACOME
        self.ratio = parse_ratio(self.ratio)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {self.quantizer!r}; choose one of {QUANTIZERS}")
        self.bands = validate_band_spec(self.bands)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size!r}")
        if not 0.0 <= float(self.damp) < 1.0:
            raise ConfigError(f"damp must be in [0, 1), got {self.damp!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate_layout()

    def validate_layout(self) -> None:
        """Check every layout entry so that a hand-edited ``adapter_config.json`` fails here, naming the module."""
        if not isinstance(self.layout, dict):
            raise ConfigError(f"layout must be a mapping of module name to layout, got {type(self.layout).__name__}")
        for name, entry in self.layout.items():
            where = f"adapter_config.json layout of module {name!r}"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: expected an object, got {entry!r}")
            shape = entry.get("shape")
            if (
                not isinstance(shape, (list, tuple))
                or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
            ):
                raise ConfigError(f"{where}: 'shape' must be [out_features, in_features], got {shape!r}")
            g = entry.get("group_size", self.group_size)
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise ConfigError(f"{where}: bad group_size {g!r}")
            bands = entry.get("bands")
            if not isinstance(bands, (list, tuple)):
                raise ConfigError(f"{where}: 'bands' must be a list of [bits, rank], got {bands!r}")
            total = 0
            for band in bands:
                if not isinstance(band, (list, tuple)) or len(band) != 2:
                    raise ConfigError(f"{where}: band {band!r} is not [bits, rank]")
                bits, rank = band
                if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
                    raise ConfigError(f"{where}: unknown bit width {bits!r}; supported: {SUPPORTED_BITS}")
                if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                    raise ConfigError(f"{where}: bad rank {rank!r}")
                total += rank
            if total > min(shape):
                raise ConfigError(f"{where}: total rank {total} exceeds min(shape) = {min(shape)}")

    @property
    def is_prompt_learning(self) -> bool:  # noqa: D401 - PEFT API
        return False

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["peft_type"] = "DELTACOME"
        return d


class BackendName(str, enum.Enum):
    """Values of ``DELTACOME_BACKEND``."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
