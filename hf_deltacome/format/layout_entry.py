"""The layout entry of one module in ``adapter_config.json`` (shape, bands, group size, format, and the optional
sign / sparse / sparse-band / vq parts): what it may hold, checked before any buffer is built from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .draws import DRAWS, entry_draws
from .packing import SUPPORTED_BITS
from .storage import HASH_FORMAT, RATED_FORMAT, READ_FORMATS, SPARSE_BANDS_HASH_FORMAT, VQ_FORMAT
from .vq_part import VQ_CODES

BITDELTA_SCALES = ("matrix", "row")  # BitDelta sign parts: one scale per matrix or per row


def check_layout_entry(name: str, entry: Any, group_size: int) -> None:
    """Check one module's layout entry so that a hand-edited ``adapter_config.json`` fails here, naming the module
    (an entry without ``group_size`` gets ``group_size``, the config's)."""
    where = f"adapter_config.json layout of module {name!r}"
    if not name or any(not part for part in name.split(".")):
        raise ConfigError(f"{where}: not a module name")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object, got {entry!r}")
    shape = entry.get("shape")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ConfigError(f"{where}: 'shape' must be [out_features, in_features], got {shape!r}")
    g = entry.setdefault("group_size", group_size)  # an entry without one uses the config's
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ConfigError(f"{where}: bad group_size {g!r}")
    if entry.get("format", 1) not in READ_FORMATS:
        raise ConfigError(
            f"{where}: unknown format {entry.get('format')!r}; this version reads formats {READ_FORMATS} "
            "(a newer hf-deltacome wrote it?)"
        )
    if not isinstance(entry.get("bias", False), bool):
        raise ConfigError(f"{where}: 'bias' must be true or false, got {entry.get('bias')!r}")
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
    total += _validate_sparse_bands(entry, shape, where)
    if total > min(shape):
        raise ConfigError(f"{where}: total rank {total} exceeds min(shape) = {min(shape)}")
    _validate_extra_parts(entry, shape, where)
    _validate_vq(entry, shape, where)


def is_int(v: Any, low: int) -> bool:
    """``v`` is an int (not a bool) of at least ``low``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _validate_extra_parts(entry: dict, shape: Sequence[int], where: str) -> None:
    """Check the optional baseline parts of a layout entry (``sign`` for bitdelta, ``sparse`` for dare)."""
    sign = entry.get("sign")
    if sign is not None:
        if not isinstance(sign, dict) or not is_int(sign.get("rows"), 1) or sign["rows"] > shape[0]:
            raise ConfigError(f"{where}: 'sign' must be {{'rows': 1..{shape[0]}, 'scale': ...}}, got {sign!r}")
        if sign.get("scale", "matrix") not in BITDELTA_SCALES:
            raise ConfigError(f"{where}: sign scale must be one of {BITDELTA_SCALES}, got {sign.get('scale')!r}")
    sparse = entry.get("sparse")
    if sparse is not None:
        ok = (
            isinstance(sparse, dict)
            and is_int(sparse.get("nnz"), 1)
            and sparse["nnz"] <= shape[0] * shape[1]
            and isinstance(sparse.get("keep"), (int, float))
            and 0.0 < float(sparse["keep"]) <= 1.0
            and is_int(sparse.get("seed"), 0)
            and sparse.get("bits") in SUPPORTED_BITS
            and is_int(sparse.get("group_size", 128), 1)
            and sparse.get("rates") in (None, "importance")
            and entry_draws(sparse) in DRAWS
            and (entry_draws(sparse) != "hash" or sparse["seed"] < 2**32)
        )
        if not ok:
            raise ConfigError(
                f"{where}: 'sparse' must be {{'nnz': int, 'keep': (0, 1], 'seed': int, 'bits': one of "
                f"{SUPPORTED_BITS}, 'group_size': int, optional 'rates': 'importance', optional 'draws': one of "
                f"{DRAWS} (a hashed seed under 2^32)}}, got {sparse!r}"
            )
        if sparse.get("rates") is not None:
            _require_format(entry, RATED_FORMAT, "an importance-rated 'sparse' part", where)
        if entry_draws(sparse) == "hash":
            _require_format(entry, HASH_FORMAT, "a 'sparse' part with hashed draws", where)


def _validate_vq(entry: dict, shape: Sequence[int], where: str) -> None:
    """Check the optional ``vq`` part of a layout entry (vector codes of the rotated delta, format 4)."""
    vq = entry.get("vq")
    if vq is None:
        return
    ok = (
        isinstance(vq, dict)
        and is_int(vq.get("rows"), 1)
        and vq["rows"] <= shape[0]
        and is_int(vq.get("dim"), 1)
        and vq["dim"] <= shape[1]
        and vq.get("codes", 16) in VQ_CODES
        and is_int(vq.get("seed"), 0)
        and vq["seed"] < 2**62
    )
    if not ok:
        raise ConfigError(f"{where}: 'vq' must be {{'rows': 1..{shape[0]}, 'dim': 1..{shape[1]}, 'codes': one of "
                          f"{VQ_CODES}, 'seed': int >= 0}}, got {vq!r}")  # fmt: skip
    _require_format(entry, VQ_FORMAT, "a 'vq' part", where)


def _require_format(entry: dict, version: int, what: str, where: str) -> None:
    """Refuse an entry that holds ``what`` under a format older than the ``version`` that introduced it."""
    if entry.get("format", 1) < version:
        raise ConfigError(f"{where}: {what} needs format {version}, the entry says {entry.get('format', 1)}")


def _validate_sparse_bands(entry: dict, shape: Sequence[int], where: str) -> int:
    """Check the ``sparse_bands`` of a layout entry (impart, the sparse tail); returns their total rank."""
    bands = entry.get("sparse_bands", [])
    if not isinstance(bands, list):
        raise ConfigError(f"{where}: 'sparse_bands' must be a list, got {bands!r}")
    total = 0
    for k, band in enumerate(bands):
        ok = (
            isinstance(band, dict)
            and band.get("bits") in SUPPORTED_BITS
            and not isinstance(band.get("bits"), bool)
            and is_int(band.get("rank"), 0)
            and isinstance(band.get("keep"), (int, float))
            and not isinstance(band.get("keep"), bool)
            and 0.0 < float(band["keep"]) <= 1.0
            and is_int(band.get("seed"), 0)
            and band["seed"] < 2**62
            and isinstance(band.get("nnz"), list)
            and len(band["nnz"]) == 2
            and all(is_int(v, 0) for v in band["nnz"])
            and band["nnz"][0] <= band["rank"] * shape[1]
            and band["nnz"][1] <= band["rank"] * shape[0]
            and entry_draws(band) in DRAWS
            and (entry_draws(band) != "hash" or band["seed"] + 1 < 2**32)
        )
        if not ok:
            raise ConfigError(
                f"{where}: sparse band {k} must be {{'bits': one of {SUPPORTED_BITS}, 'rank': int >= 0, 'keep': (0, 1], "
                f"'seed': int >= 0, 'nnz': [kept entries of V (<= rank*{shape[1]}), of U (<= rank*{shape[0]})], "
                f"optional 'draws': one of {DRAWS} (hashed: seed + 1 < 2**32)}}, got {band!r}"
            )
        if entry_draws(band) == "hash":
            _require_format(entry, SPARSE_BANDS_HASH_FORMAT, f"sparse band {k} with hashed draws", where)
        total += band["rank"]
    return total
