"""`DeltaCoMeConfig`: the PEFT config of a compressed delta, including the per-module layout."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional, Union

from peft import PeftConfig
from peft.utils import PeftType

from .errors import ConfigError, DeltaCoMeError
from .format.budget import DEFAULT_BANDS, validate_band_spec
from .format.layout_entry import BITDELTA_SCALES, check_layout_entry, is_int
from .io.atomic import PinnedFiles, atomic_write_text, attach_pin, file_sha256, read_through_swap, wait_for_swap

# deltacome: SVD + mixed-precision bands; the others are baselines at the same byte budget (see compression/plan.py)
METHODS = ("deltacome", "bitdelta", "lowrank", "svd-uniform", "dare", "impart", "deltacome-dare", "vq")
SVD_METHODS = ("deltacome", "lowrank", "svd-uniform", "impart")  # methods whose layout is a list of bands
QUANTIZERS = ("gptq", "rtn")
SEARCHES = ("greedy", "genetic")
ALLOCATIONS = ("uniform", "adaptive")
# min_rank_share="auto" picks one of these by the whole model's KL to the fine-tune (0.0 = the published bands)
RANK_SHARES = (0.0, 0.5, 0.7, 0.85, 1.0)
# compression_info records of how the layout was planned (compression.plan.plan_layouts), shown by `deltacome info`
PLAN_RECORDS = ("budget", "unspent", "low_rank", "rank_share", "residual", "search", "allocation", "end_to_end", "distill")
UNIFORM_BITS = (2, 3, 4, 8)
# residual="auto": besides the bands alone, the whole-model check weighs these shares of each module's budget for
# RESIDUAL_BAND_BITS-bit bands, the rest spent on a RESIDUAL_DARE_BITS-bit DARE of their residual (0 = DARE alone)
RESIDUAL_SHARES = (0.0, 0.25, 0.5)
RESIDUAL_BAND_BITS = 3
RESIDUAL_DARE_BITS = 2
# ... and where the model is too large to weigh the bands as GPTQ stores them (compression/plan.py, _StoredBands),
# keeps a residual only if its KL is at most this share of the round-to-nearest bands' (measured: tiny noise delta at
# 1/2, 0.69x, lost on held-out text; spread deltas 0.24-0.41x and facts-hot 0.27-0.40x, won; but facts-hot at 1/32,
# 0.30x, lost agreement to the stored bands, rated 0.23x of their rounded KL)
RESIDUAL_MARGIN = 0.5
# DARE alone (share 0) stands unless a layout with bands (in the residual, or alone as GPTQ stores them) brings its KL
# down to at most this fraction. The KL is measured on text the fine-tune was trained on, where a few bands reproduce
# memorised text, while held-out paraphrases of the same facts need DARE's unbiased share of every entry (facts-hot:
# 0.91x at 1/64 and 0.96x at 1/128 lost 8 and 16 of 240 questions to DARE alone, the stored bands alone at 0.98-1.09x
# at 1/64 lose 23; bands at 0.78x answered 2.2 and 0 fewer over six draws with 2.2 and 0.3 points more agreement;
# 0.22-0.75x kept as many questions and more agreement; RESULTS.md). Fitted: the questions come first
RESIDUAL_ALONE_MARGIN = 0.77
RESIDUALS = ("auto", "none")
# residual="auto": draws of a kept DARE part's masks the whole-model check weighs (mask_draws; 1: the name's seeds). The
# least-KL draw of 4 did not pay on held-out questions (six draws at 1/128: facts-hot +1.1 questions, -1.2 points of
# agreement; facts -0.6 questions; benchmarks/RESULTS.md): an option
MASK_DRAWS = 1
DARE_RATES = ("uniform", "importance")
DARE_FITS = ("rescale", "gptq", "unbiased")
FULL_RANKS = ("dare", "vq")  # how dare_modules store their whole delta
IMPART_MIN_KEEP = 0.5  # impart's lowest keep-rate when sparse_tail is not set (docs/METHOD.md)


def parse_ratio(value: Union[str, float, int]) -> float:
    """Parse a compression ratio given as ``0.0625``, ``"1/16"`` or ``16`` (meaning 1/16)."""
    try:
        r = float(Fraction(value.strip())) if isinstance(value, str) else float(value)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"cannot parse compression ratio {value!r}; use e.g. 1/16 or 0.0625") from e
    if r > 1.0:
        r = 1.0 / r
    if not 0.0 < r <= 1.0:  # also NaN
        raise ConfigError(f"compression ratio must be in (0, 1], got {value!r}")
    return r


@dataclass
class DeltaCoMeConfig(PeftConfig):
    """Configuration of a Delta-CoMe compressed delta.

    The fields above ``layout`` say how to compress; ``layout`` and the fields after it are filled by
    :func:`hf_deltacome.compress` and say what was stored, so loading can build the right buffers before reading
    any weight.

    Args:
        ratio: target size of the whole adapter file as a fraction of the float16 delta of the target linears
            (1/16 by default). The header, dense extras, scales, zeros and singular values are paid from it.
        method: compression method; ``"deltacome"`` is SVD + mixed-precision quantization (``"vq"``: see full_rank).
        bands: ``[(bits, rank | fraction | None), ...]`` from the largest singular values down. Default
            ``[[8, 2], [3, 32], [2, None]]``: 2 vectors at 8 bits, 32 at 3 bits, the rest of the budget at 2 bits.
        min_rank_share: how far the fixed-rank bands may eat into the last band's rank. A number: when a split
            keeps fewer than that share of the ranks the last band's bit width alone would buy, its fixed-rank
            bands shrink together (down to none) until it does; 0 = the published bands as given. Each band pays
            its own per-row scales, zeros and padding of ``U``, so on narrow layers or at 1/32-1/64 the published
            bands can eat most of the rank. ``"auto"`` (default): with calibration data, the share in
            ``RANK_SHARES`` whose layout brings the whole model closest to the fine-tune (next-token KL on the
            calibration text, round-to-nearest factors); without data, 0. At the published design point (7B
            shapes at 1/16) the bands keep 97% of the rank and every share up to 0.95 leaves them as they are.
        group_size: quantization group size along the reduction dimension.
        quantizer: ``"gptq"`` (uses calibration activations) or ``"rtn"`` (data-free round-to-nearest).
        damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        act_order: quantize columns of ``V`` in order of decreasing Hessian diagonal (static groups).
        target_modules: names or regex of the linears to compress; ``None`` = every linear of the decoder.
        layout: per module name, ``{"shape": [m, n], "bands": [[bits, rank], ...], "group_size": g,
            "bias": bool}``.
        base_fingerprint: fingerprint of the base weights the delta was computed against.
        search: ``None`` (use ``bands`` as given), ``"greedy"`` or ``"genetic"``: choose the band split (bits and
            ranks) of each module type under the same budget by minimising output error on calibration activations
            (``deltacome`` only).
        allocation: ``"uniform"`` (every module gets ``ratio`` of its own delta) or ``"adaptive"`` (move budget
            between modules by measured sensitivity, model-wide total unchanged; SVD methods only).
        uniform_bits: bit width of every singular vector for ``svd-uniform`` and of the kept values for ``dare``.
        bitdelta_scale: ``"matrix"`` (one scale per matrix, as published) or ``"row"`` (one per output row).
        distill_steps: optimisation steps of the scale distillation against the fine-tune (0 = off): BitDelta's
            sign scales, and with ``distill_bands`` the bands' scales.
        distill_bands: after compression, refine each band's singular values and the group scales of its quantized
            factors by distillation against the fine-tune's next-token distribution on the calibration text
            (``distill_steps`` steps; codes, layout and bytes unchanged; :mod:`~hf_deltacome.compression.distill`).
            ``None`` (default): on for ``deltacome`` with calibration data, off for the baselines (they stay as
            published); ``True`` for any method with bands. Kept only where it lowers the calibration KL, and not
            tried where the bands are already within ``distill.MIN_KL`` of the fine-tune. On SmolLM2's knowledge
            deltas it raised next-token agreement by 2.0-4.8 points at 1/32-1/64 (benchmarks/RESULTS.md); it costs
            one forward and backward pass of the model a step.
        sparse_tail: ``None`` (default: dense bands) or a keep-rate in (0, 1). ``deltacome``: the last band keeps
            that random share of each singular vector's entries (mask regenerated from a seed) and buys more rank
            with the bytes saved. ``impart``: the lowest keep-rate of its importance-aware tail (default
            ``IMPART_MIN_KEEP``); keep-rates grow with the singular value (docs/METHOD.md).
        band_share: ``deltacome-dare`` only: the share of each module's budget its singular bands (``bands``,
            filled in order) may take; the rest stores DARE of the residual ``Δ − U_q S V_qᵀ`` (seeded mask,
            rescaled, ``uniform_bits``). ``None``: 0.25; 0 is DARE; ``"auto"``: per module, the least expected error.
        dare_rates: keep-rates of a DARE part. ``"uniform"`` (published DARE: every entry alike) or
            ``"importance"`` (a rate per row and column from the output energy ``Σ Δ² diag(H)``, 4-bit codes stored,
            the mask still seeded; format 3). ``None``: uniform for ``dare`` and ``dare_modules``, importance for the
            residuals' DARE parts (benchmarks/RESULTS.md).
        dare_fit: the kept values of a DARE part, each divided by its keep-rate. ``"rescale"`` (published DARE:
            rounded to nearest on a least-squares grid, which shrinks them), ``"unbiased"`` (the same codes, each
            group's scale stretched so they are not shrunk) or ``"gptq"`` (rounded by GPTQ on the mask; needs
            calibration data). Same bytes and format. ``None``: rescale (benchmarks/RESULTS.md).
        residual: ``deltacome`` only. ``"auto"`` (default): with calibration data, the configured split (no
            ``search``, uniform allocation, no ``sparse_tail``) and no ``dare_modules`` (their DARE is there already),
            the whole-model check also weighs layouts that give ``RESIDUAL_SHARES`` of each module's budget to
            ``RESIDUAL_BAND_BITS``-bit bands and the rest to a ``RESIDUAL_DARE_BITS``-bit DARE of their residual
            ``Δ − U_q S V_qᵀ`` (0: DARE of the whole delta), and keeps the one of least next-token KL to the
            fine-tune, the bands alone included (benchmarks/RESULTS.md). ``"none"``: the bands alone.
        dare_modules: targets stored whole (no bands; DARE, or vector codes with ``full_rank="vq"``) in their
            own budget; the others keep the method's layout, and the plan's choices act on them. ``"auto"``
            (default): ``"mlp"`` for ``deltacome`` with GPTQ at ``ratio`` 1/8 and below (above, 2-bit DARE cannot
            spend the budget), else none; from 1/64 down ``o_proj`` too. ``"mlp"``: the feed-forward targets
            (:func:`.compression.targets.mlp_targets`); or names (:meth:`stores_whole`: ``["down_proj", "up_proj"]``).
            ``None`` or ``[]``: none (the published layout, the more faithful at 1/8-1/32). Saved as the names used
            (leaves, or the shortest suffixes that name no other target). Why: docs/METHOD.md §9, RESULTS.md.
        full_rank: how ``dare_modules`` store their delta: ``"dare"`` (default, ``RESIDUAL_DARE_BITS``-bit DARE) or
            ``"vq"`` (method ``vq``: 4-bit codes of short vectors of the randomly rotated delta,
            :mod:`~hf_deltacome.format.vq_part`, fitted to the output with ``quantizer="gptq"``; DARE where the
            budget pays for no codebook): closer to the fine-tune, fewer held-out answers (benchmarks/RESULTS.md).
        mask_draw: which draw of the seeded masks (DARE's, ImPart's) a layout uses: every module's seed comes from
            its name (0) or from ``name#mask_draw``. The seeds are stored in the layout; loading never re-derives them.
        mask_draws: ``residual="auto"``: when it keeps a DARE part, the whole-model check also weighs that layout
            under this many draws of the masks (``mask_draw`` onwards) and keeps the draw of least KL. Default 1 (no
            choice): one draw moves a 1/128 knowledge delta by up to 7 of 240 held-out questions, but the least-KL
            draw of 4 kept no more of them than a draw at random (benchmarks/RESULTS.md); each extra draw is one
            forward pass of the check's sequences.
        base_vocab_size, vocab_size: set when the fine-tune added tokens (``V`` -> ``V'`` rows): loading resizes the
            base's embeddings to ``vocab_size`` before the adapter is injected, and the base check reads the first
            ``base_vocab_size`` rows only (see :mod:`hf_deltacome.compression.vocab`).
        trainable_token_indices: PEFT's trainable tokens, ``{module: [rows]}``: the added tokens' rows of a
            vocabulary module whose first ``V`` rows did not change (the rest of it is the base's).
    """

    ratio: float = field(default=1 / 16, metadata={"help": "Size of the packed factors / fp16 delta."})
    method: str = field(default="deltacome", metadata={"help": f"Compression method, one of {METHODS}."})
    bands: list = field(default_factory=lambda: [list(b) for b in DEFAULT_BANDS])
    min_rank_share: Union[float, str] = field(
        default="auto", metadata={"help": "Least share of the last band's rank a split keeps; 'auto' or 0..1."}
    )
    group_size: int = field(default=128)
    quantizer: str = field(default="gptq")
    damp: float = field(default=0.01)
    act_order: bool = field(default=False)
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    layout: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_fingerprint: Optional[dict[str, Any]] = field(default=None, repr=False)  # 30-300 KB of base64
    compression_info: dict[str, Any] = field(default_factory=dict)
    search: Optional[str] = field(default=None, metadata={"help": f"Band split search: None or one of {SEARCHES}."})
    allocation: str = field(default="uniform", metadata={"help": f"Budget across modules, one of {ALLOCATIONS}."})
    uniform_bits: int = field(default=4, metadata={"help": f"Bits of svd-uniform / dare, one of {UNIFORM_BITS}."})
    bitdelta_scale: str = field(default="matrix", metadata={"help": f"BitDelta scales, one of {BITDELTA_SCALES}."})
    distill_steps: int = field(default=50, metadata={"help": "Scale distillation steps (0 = off)."})
    distill_bands: Optional[bool] = field(
        default=None, metadata={"help": "Distil the bands' scales (None: on for deltacome, off for baselines)."}
    )
    sparse_tail: Optional[float] = field(
        default=None, metadata={"help": "Keep-rate of the sparse last band (deltacome) / lowest of impart's, (0, 1)."}
    )
    band_share: Optional[Union[float, str]] = field(default=None, metadata={"help": "deltacome-dare: [0, 1], auto"})
    dare_modules: Optional[Union[list[str], str]] = field(
        default="auto", metadata={"help": "'auto', 'mlp', names (down_proj, mlp.c_proj) or null: DARE alone."}
    )
    full_rank: str = field(default="dare", metadata={"help": f"How dare_modules store their delta, {FULL_RANKS}."})
    residual: str = field(default="auto", metadata={"help": f"deltacome: DARE of the bands' residual, {RESIDUALS}."})
    dare_rates: Optional[str] = field(default=None, metadata={"help": f"DARE keep-rates, one of {DARE_RATES}."})
    dare_fit: Optional[str] = field(default=None, metadata={"help": f"DARE kept values, one of {DARE_FITS}."})
    mask_draw: int = field(default=0, metadata={"help": "Draw of the seeded DARE / ImPart masks (0: seed from name)."})
    mask_draws: int = field(default=MASK_DRAWS, metadata={"help": "residual='auto': mask draws the check weighs."})
    base_vocab_size: Optional[int] = field(default=None)
    vocab_size: Optional[int] = field(default=None)
    trainable_token_indices: Optional[dict[str, list[int]]] = field(default=None)
    # sha256 of adapter_model.safetensors, written by save_pretrained: the loader refuses weights from another save
    weights_sha256: Optional[str] = field(default=None, repr=False)

    @property
    def dare_leaves(self) -> tuple[str, ...]:
        """The names ``dare_modules`` resolved to (none while ``"auto"`` / ``"mlp"``: compress resolves those)."""
        return tuple(self.dare_modules) if isinstance(self.dare_modules, list) else ()

    def stores_whole(self, name: str) -> bool:
        """Whether target ``name`` is in ``dare_modules``: a leaf name or dotted suffix of it (as PEFT's lists)."""
        return any(name == s or name.endswith("." + s) for s in self.dare_leaves)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as e:  # PEFT's check of task_type
            raise ConfigError(f"task_type: {e}") from e
        self.peft_type = PeftType("DELTACOME")  # the member hf_deltacome.integration adds to PEFT's enum
        self._validate_types()
        self.ratio = parse_ratio(self.ratio)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {self.quantizer!r}; choose one of {QUANTIZERS}")
        self.bands = validate_band_spec(self.bands)
        share = self.min_rank_share
        if share != "auto" and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1):
            raise ConfigError(f"min_rank_share must be 'auto' or a number in [0, 1], got {share!r}")
        self.min_rank_share = share if share == "auto" else float(share)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate_method_options()
        self._validate_vocab()
        self.validate_layout()

    def _validate_vocab(self) -> None:
        sizes = (self.base_vocab_size, self.vocab_size)
        if sizes != (None, None) and not (
            all(is_int(v, 1) for v in sizes) and self.vocab_size > self.base_vocab_size
        ):
            raise ConfigError(
                f"base_vocab_size and vocab_size must both be unset, or integers with vocab_size > base_vocab_size "
                f"(the fine-tune's added tokens), got {self.base_vocab_size!r} and {self.vocab_size!r}"
            )
        rows = self.trainable_token_indices
        if rows is None:
            return
        ok = isinstance(rows, dict) and self.vocab_size is not None and all(
            isinstance(k, str) and isinstance(v, list) and v and all(is_int(i, self.base_vocab_size) for i in v)
            and max(v) < self.vocab_size for k, v in rows.items()
        )  # fmt: skip
        if not ok:
            raise ConfigError(
                "trainable_token_indices must map module names to rows of the added tokens "
                f"[base_vocab_size, vocab_size), got {rows!r}"
            )

    def _validate_types(self) -> None:
        """JSON types of the fields PEFT and the tuner use as they are (a hand-edited file fails here, by field)."""

        def names(value: Any, allow_str: bool) -> bool:
            if value is None or (allow_str and isinstance(value, str)):
                return True
            return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)

        for key in ("target_modules", "exclude_modules"):
            if not names(getattr(self, key), allow_str=True):
                raise ConfigError(f"{key} must be null, a regex string or a list of module names, got {getattr(self, key)!r}")
        if not names(self.modules_to_save, allow_str=False):
            raise ConfigError(f"modules_to_save must be null or a list of module names, got {self.modules_to_save!r}")
        for key in ("base_model_name_or_path", "revision", "peft_version", "weights_sha256"):
            if not isinstance(getattr(self, key), (str, type(None))):
                raise ConfigError(f"{key} must be a string or null, got {getattr(self, key)!r}")
        if self.weights_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256):
            raise ConfigError(f"weights_sha256 must be 64 lower-case hex digits, got {self.weights_sha256!r}")
        for key in ("inference_mode", "act_order"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("compression_info", "layout"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key} must be an object, got {type(getattr(self, key)).__name__}")
        if not isinstance(self.auto_mapping, (dict, type(None))):
            raise ConfigError(f"auto_mapping must be an object or null, got {self.auto_mapping!r}")
        if not isinstance(self.base_fingerprint, (dict, str, type(None))):
            raise ConfigError(f"base_fingerprint must be an object, got {type(self.base_fingerprint).__name__}")
        for key in ("method", "quantizer", "allocation", "bitdelta_scale"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {getattr(self, key)!r}")

    def _validate_method_options(self) -> None:
        if self.search is not None and self.search not in SEARCHES:
            raise ConfigError(f"unknown search {self.search!r}; choose None or one of {SEARCHES}")
        if self.search is not None and self.method != "deltacome":
            raise ConfigError(f"search={self.search!r} chooses Delta-CoMe band splits; method {self.method!r} has a "
                              "fixed layout")  # fmt: skip
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; choose one of {ALLOCATIONS}")
        if self.allocation == "adaptive" and self.method not in SVD_METHODS:
            raise ConfigError(f"allocation='adaptive' moves band budget between modules; it needs one of "
                              f"{SVD_METHODS}, not method {self.method!r}")  # fmt: skip
        if isinstance(self.uniform_bits, bool) or self.uniform_bits not in UNIFORM_BITS:
            raise ConfigError(f"uniform_bits must be one of {UNIFORM_BITS}, got {self.uniform_bits!r}")
        if self.bitdelta_scale not in BITDELTA_SCALES:
            raise ConfigError(f"bitdelta_scale must be one of {BITDELTA_SCALES}, got {self.bitdelta_scale!r}")
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ConfigError(f"distill_steps must be an integer >= 0, got {self.distill_steps!r}")
        if self.distill_bands is not None and not isinstance(self.distill_bands, bool):
            raise ConfigError(f"distill_bands must be null, true or false, got {self.distill_bands!r}")
        if self.distill_bands and self.method not in (*SVD_METHODS, "deltacome-dare"):
            raise ConfigError(f"distill_bands refines band scales; method {self.method!r} stores no bands")
        tail = self.sparse_tail
        if tail is not None:
            if isinstance(tail, bool) or not isinstance(tail, (int, float)) or not 0.0 < tail < 1.0:
                raise ConfigError(f"sparse_tail must be null or a keep-rate in (0, 1), got {tail!r}")
            if self.method not in ("deltacome", "impart"):
                raise ConfigError(f"sparse_tail applies to methods 'deltacome' and 'impart', not {self.method!r}")
            self.sparse_tail = float(tail)
        share = self.band_share
        if share not in (None, "auto") and (isinstance(share, bool) or not isinstance(share, (int, float))
                                            or not 0 <= share <= 1):  # fmt: skip
            raise ConfigError(f"band_share must be null, 'auto' or a number in [0, 1], got {share!r}")
        if share is not None and self.method != "deltacome-dare":
            raise ConfigError(f"band_share applies to method 'deltacome-dare', not {self.method!r}")
        kinds = self.dare_modules
        if kinds not in (None, "auto", "mlp") and (not isinstance(kinds, (list, tuple))
                                                   or not all(isinstance(k, str) for k in kinds)):  # fmt: skip
            raise ConfigError(f"dare_modules must be 'auto', 'mlp', null or a list of module names (leaves or dotted "
                              f"suffixes), got {kinds!r}")  # fmt: skip
        if isinstance(kinds, (list, tuple)):
            self.dare_modules = sorted(kinds) or None
        if self.residual not in RESIDUALS:
            raise ConfigError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.full_rank not in FULL_RANKS:
            raise ConfigError(f"full_rank must be one of {FULL_RANKS}, got {self.full_rank!r}")
        for key, least in (("mask_draw", 0), ("mask_draws", 1)):
            if not is_int(getattr(self, key), least):
                raise ConfigError(f"{key} must be an integer >= {least}, got {getattr(self, key)!r}")
        if self.dare_rates not in (None, *DARE_RATES):
            raise ConfigError(f"dare_rates must be null or one of {DARE_RATES}, got {self.dare_rates!r}")
        if self.dare_fit not in (None, *DARE_FITS):
            raise ConfigError(f"dare_fit must be null or one of {DARE_FITS}, got {self.dare_fit!r}")
        if self.dare_fit in ("gptq", "unbiased") and self.method not in ("dare", "deltacome-dare", "deltacome"):
            raise ConfigError(f"dare_fit={self.dare_fit!r} sets the values of a DARE part; method {self.method!r} has none")
        if self.dare_fit == "gptq" and self.quantizer != "gptq":
            raise ConfigError("dare_fit='gptq' fits DARE's values to calibration activations: it needs quantizer='gptq'")
        if (tail is not None or self.method == "impart") and (self.search is not None or self.allocation != "uniform"):
            raise ConfigError("sparse_tail / method 'impart' do not combine with search= or allocation='adaptive' "
                              "(these choose dense band splits)")  # fmt: skip
        if (tail is not None or self.method == "impart") and self.bands[-1][1] is not None:
            raise ConfigError(
                f"sparse_tail / method 'impart' make the last band sparse: it must take the rest of the budget "
                f"(None), got bands {self.bands!r}"
            )

    def validate_layout(self) -> None:
        """Check every layout entry so that a hand-edited ``adapter_config.json`` fails here, naming the module."""
        if not isinstance(self.layout, dict):
            raise ConfigError(f"layout must be a mapping of module name to layout, got {type(self.layout).__name__}")
        for name, entry in self.layout.items():
            check_layout_entry(name, entry, self.group_size)

    @property
    def is_prompt_learning(self) -> bool:  # noqa: D401 - PEFT API
        return False

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["peft_type"] = "DELTACOME"
        return d

    def to_json_string(self, auto_mapping_dict: Optional[dict] = None) -> str:
        """The ``adapter_config.json`` text PEFT would write (sets as sorted lists, sorted keys)."""
        out = self.to_dict()
        for key, value in out.items():
            if isinstance(value, set):
                out[key] = sorted(value)
        if auto_mapping_dict is not None:
            out["auto_mapping"] = auto_mapping_dict
        return json.dumps(out, indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` atomically (PEFT writes it in place: a kill would leave half a file), with
        the sha256 of the ``adapter_model.safetensors`` beside it (``weights_sha256``; ``None`` if there is none)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ConfigError(f"{save_directory} should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        weights = os.path.join(save_directory, "adapter_model.safetensors")  # PEFT writes the weights first
        digest = file_sha256(weights) if os.path.isfile(weights) else None
        data = json.loads(self.to_json_string(kwargs.pop("auto_mapping_dict", None)))
        data["weights_sha256"] = digest
        atomic_write_text(os.path.join(save_directory, "adapter_config.json"), json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, subfolder: Optional[str] = None, **kwargs: Any) -> Any:
        """PEFT's loader, with every error in a hand-edited file naming the file.

        From a local folder, ``adapter_config.json`` and ``adapter_model.safetensors`` are opened together and the
        config is read through its handle; the weights handle stays with the config (:func:`attach_pin`) for the
        loader, so a save swapping the folder in the meantime cannot hand PEFT the config of one save and the
        weights of another.
        """
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "")
        where = os.path.join(folder, "adapter_config.json")
        try:
            if wait_for_swap(folder) and os.path.isdir(folder):  # a concurrent save's swap: read the new folder
                config = read_through_swap(folder, lambda: cls._from_folder(folder, kwargs), probe=where)
            else:
                config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
            if isinstance(config, DeltaCoMeConfig) and not config.layout:
                raise ConfigError("its layout is empty: a saved adapter lists every module it changes")
            return config
        except DeltaCoMeError as e:
            if where in str(e):  # already names the file
                raise
            raise type(e)(f"{where}: {e}") from e
        except Exception as e:  # a field PEFT itself trips on, an unreadable file: name the file, never a traceback
            raise ConfigError(f"{where}: invalid adapter config: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_folder(cls, folder: str, kwargs: dict) -> Any:
        """PEFT's ``from_pretrained`` steps, reading the config through a pinned handle."""
        pin = PinnedFiles(folder, ("adapter_config.json", "adapter_model.safetensors"))
        try:
            source, shown = pin.path("adapter_config.json"), os.path.join(folder, "adapter_config.json")
            _, class_kwargs, _ = cls._split_kwargs(kwargs)
            try:
                loaded = cls.from_json_file(source)
            except DeltaCoMeError as e:
                raise type(e)(str(e).replace(source, shown)) from e
            except FileNotFoundError:
                raise  # swapped away since the pin: read again (from_pretrained)
            except OSError as e:
                raise ConfigError(f"{shown}: cannot read adapter config: {e.strerror}") from e
            config = cls.from_peft_type(**cls.check_kwargs(**{**class_kwargs, **loaded}))
        except BaseException:
            pin.close()
            raise
        attach_pin(config, pin)
        return config
