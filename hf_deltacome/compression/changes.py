"""What a fine-tune changed, tensor by tensor, judged at the precision its checkpoints hold.

A fine-tune saved in bfloat16 beside a float32 base differs from it in every weight by rounding alone; compared
exactly, its embeddings and ``lm_head`` would look changed and be carried dense. Here *changed* means changed beyond
the rounding of the lower of the two dtypes: both tensors are rounded to the dtype with fewer mantissa bits and
compared exactly (float16 against bfloat16: within one bfloat16 step, since the float16 value was rounded once
before). Tensors equal only that way are listed (``PairChanges.rounding``) so the caller can report them.

The comparison reads one pair of tensors at a time (:func:`find_changes` takes an iterator of verdicts), so the
streamed pipeline compares two checkpoints without holding either model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def compare_tensors(base: torch.Tensor, finetuned: torch.Tensor) -> str:
    """``"same"`` (bit-identical), ``"rounding"`` (equal once both are rounded to the lower of their dtypes) or
    ``"changed"``. Shapes must match."""
    a, b = base.detach(), finetuned.detach()
    if a.device != b.device:
        b = b.to(a.device)
    if a.dtype == b.dtype or not (a.is_floating_point() and b.is_floating_point()):
        return "same" if torch.equal(a, b) else "changed"
    bits_a, bits_b = MANTISSA_BITS.get(a.dtype, 23), MANTISSA_BITS.get(b.dtype, 23)
    if {a.dtype, b.dtype} == {torch.float16, torch.bfloat16}:
        x, y = a.float(), b.float()
        _, exponent = torch.frexp(torch.maximum(x.abs(), y.abs()))
        step = torch.ldexp(torch.ones_like(x), exponent - 8)  # one bfloat16 step at that magnitude
        return "rounding" if bool(((x - y).abs() <= step).all()) else "changed"
    lower = a.dtype if bits_a < bits_b else b.dtype
    return "rounding" if torch.equal(a.to(lower), b.to(lower)) else "changed"


@dataclass
class PairChanges:
    """The changes of a pair, by parameter and module.

    ``extras``: modules (not targets) with a changed parameter, carried dense (``modules_to_save``);
    ``bias_changed``: per target, whether its bias changed; ``unchanged``: targets whose weight did not change;
    ``rounding``: parameters equal only within the lower dtype's rounding; ``added_rows``: vocabulary modules whose
    first ``V`` rows did not change, so only their rows ``V..V'`` (added tokens) are carried.
    """

    extras: list[str] = field(default_factory=list)
    bias_changed: dict[str, bool] = field(default_factory=dict)
    unchanged: set[str] = field(default_factory=set)
    rounding: list[str] = field(default_factory=list)
    added_rows: list[str] = field(default_factory=list)
    changed_params: int = 0

    @property
    def nothing(self) -> bool:
        """True when nothing at all changed (within rounding)."""
        return self.changed_params == 0 and not self.added_rows


def judge(
    name: str, base: torch.Tensor, finetuned: torch.Tensor, base_vocab: int | None, vocab_params: Sequence[str]
) -> tuple[str, bool]:
    """``(verdict, grown)`` of one parameter pair: :func:`compare_tensors` of the two (only the first ``base_vocab``
    rows of a vocabulary parameter that has more rows in the fine-tune: ``grown``)."""
    grown = name in vocab_params and base_vocab is not None and finetuned.shape[0] > base.shape[0] == base_vocab
    if grown:
        return compare_tensors(base, finetuned[:base_vocab]), True
    return (compare_tensors(base, finetuned) if base.shape == finetuned.shape else "changed"), False


def find_changes(verdicts: Iterable[tuple[str, str, bool]], targets: Sequence[str]) -> PairChanges:
    """Collect the :func:`judge` verdicts ``(parameter name, verdict, grown)`` of every parameter of the fine-tune
    (tied parameters under each of their names) into modules carried dense, bias changes and unchanged targets.

    A vocabulary module (embeddings, ``lm_head``) that grew because the fine-tune added tokens is carried whole
    when its first rows changed, else for its new rows only (``added_rows``).
    """
    tset = set(targets)
    out = PairChanges()
    changed: list[str] = []
    for pname, verdict, grown in verdicts:
        owner, _, leaf = pname.rpartition(".")
        if verdict == "rounding":
            out.rounding.append(pname)
        if verdict == "changed":
            out.changed_params += 1
        if owner in tset:
            if leaf == "bias":
                out.bias_changed[owner] = verdict == "changed"
            elif verdict != "changed":
                out.unchanged.add(owner)
            continue
        if verdict == "changed":
            if owner not in changed:
                changed.append(owner)
        elif grown and owner not in out.added_rows:
            out.added_rows.append(owner)
    # a module whose first rows changed is carried whole, new rows included
    out.added_rows = [m for m in out.added_rows if m not in changed]
    # a changed module inside another changed module is carried by the outer one's dense copy (PEFT cannot nest
    # modules_to_save; e.g. CLIP's vision embeddings own class_embedding and hold the changed patch/position ones)
    out.extras = [n for n in changed if not any(p and n.startswith(p + ".") for p in changed)]
    for name in out.extras:
        inner = [t for t in targets if t.startswith(name + ".")] if name else list(targets)
        if inner:
            raise ConfigError(
                f"parameter(s) owned directly by module {name!r} changed, but that module contains target linears "
                f"({inner[0]}, ...); it cannot be stored dense. Narrow target_modules or exclude it."
            )
    return out


def loaded_verdicts(
    base: torch.nn.Module, finetuned: torch.nn.Module, base_vocab: int | None = None, vocab_params: Sequence[str] = ()
) -> Iterator[tuple[str, str, bool]]:
    """The :func:`judge` verdict of every parameter of two loaded models."""
    pb = dict(base.named_parameters(remove_duplicate=False))
    for pname, pf in finetuned.named_parameters(remove_duplicate=False):
        yield pname, *judge(pname, pb[pname].detach().cpu(), pf.detach().cpu(), base_vocab, vocab_params)
