"""Which checkpoint tensors hold each parameter of a streamed model, and how to read one, or one expert's slice.

A checkpoint's keys are not always the model's parameter names: transformers renames legacy names when loading, and
transformers 5 builds the fused 3-D experts of a mixture-of-experts layer (``mlp.experts.gate_up_proj``) from one
tensor per expert and projection (Mixtral's ``block_sparse_moe.experts.<e>.w1/w3.weight``), which is also how it
saves them. :func:`resolve_sources` applies transformers' own conversion mapping (``get_model_conversion_mapping``,
the one ``from_pretrained`` applies) to the checkpoint's keys: a parameter's source is its checkpoint key, or a
`Converted` (the converter and its tensors). :func:`expert_sources` names the per-expert linears of
:class:`~hf_deltacome.linears.ExpertsAsLinears` stand-ins (an `ExpertSlice` each), so a streamed run holds and
compresses one expert's linear at a time, read from that expert's tensors only. :func:`saved_origins` and
:func:`reverted` go the other way, for a streamed merge: the tensors ``save_pretrained`` writes (the conversion
reverted) and the parameter each comes from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..linears import ExpertsAsLinears


@dataclass(frozen=True)
class Converted:
    """A parameter transformers builds from several checkpoint tensors: ``sources`` pairs each of the converter's
    source patterns with its keys (in expert order), combined by the converter's operations."""

    target: str
    sources: tuple[tuple[str, tuple[str, ...]], ...]
    converter: Any = field(compare=False, repr=False)


@dataclass(frozen=True)
class ExpertSlice:
    """Expert ``expert``'s slice of a fused experts parameter (``source``), as its linear's ``out x in`` weight."""

    source: Union[str, Converted]
    expert: int
    transposed: bool


Source = Union[str, Converted, ExpertSlice]


def resolve_sources(model: nn.Module, keys: list[str]) -> tuple[dict[str, Source], dict[str, str]]:
    """The source of each parameter name of ``model`` that the checkpoint ``keys`` provide (renamed or converted as
    ``from_pretrained`` would), and why a parameter cannot be read (a conversion streaming does not replay)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
    except Exception:  # an older transformers, or a model it has no mapping for: the keys are the names
        return {k: k for k in keys}, {}
    names = {n: True for n, _ in model.named_parameters(remove_duplicate=False)}
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, Source] = {}
    groups: dict[str, dict[str, list[str]]] = {}
    for key in sorted(keys, key=dot_natural_key):  # expert 2 before expert 10, as transformers collects them
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if renamed not in names and key in names:
            renamed, pattern = key, None
        if renamed not in names:
            continue
        if pattern is None:
            out.setdefault(renamed, key)
        else:
            groups.setdefault(renamed, {}).setdefault(pattern, []).append(key)
    refused: dict[str, str] = {}
    for target, found in groups.items():
        converter = by_pattern[next(iter(found))]
        if len(converter.target_patterns) > 1:  # one checkpoint tensor split into several parameters
            refused[target] = f"transformers splits {next(iter(found.values()))[0]!r} into several parameters"
            continue
        ordered = tuple((p, tuple(found[p])) for p in converter.source_patterns if p in found)
        out[target] = Converted(target, ordered, converter)
    return out, refused


def convert(source: Converted, tensors: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """The converter's operations applied to ``tensors`` (each source pattern's tensors, in order)."""
    conv = source.converter
    collected: dict[str, Any] = dict(tensors)
    for op in conv.operations:
        collected = op.convert(collected, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                               full_layer_name=source.target, model=None, config=None, missing_keys=None)  # fmt: skip
    if len(collected) != 1:
        raise ConfigError(f"{source.target}: transformers' conversion gave {len(collected)} tensors, not one")
    return next(iter(collected.values()))


def converted_spec(source: Converted, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple:
    """``(dtype, shape)`` of a converted parameter, the operations replayed on meta tensors."""
    meta = {p: [torch.empty(specs[k][1], dtype=specs[k][0], device="meta") for k in ks] for p, ks in source.sources}
    t = convert(source, meta)
    return t.dtype, tuple(t.shape)


def _per_expert(source: Converted, experts: int) -> bool:
    """Whether expert ``e``'s slice is the conversion of each pattern's ``e``-th tensor alone (stacked along the first
    dimension first, as every fused-experts conversion of transformers does)."""
    ops = source.converter.operations
    first = ops[0] if ops else None
    return (type(first).__name__ == "MergeModulelist" and getattr(first, "dim", None) == 0
            and all(len(ks) == experts for _, ks in source.sources))  # fmt: skip


def read_source(source: Source, read: Callable[[str], torch.Tensor], read_row: Callable[[str, int], torch.Tensor],
                experts: dict[Converted, int] | None = None) -> torch.Tensor:  # fmt: skip
    """The tensor of ``source``: ``read(key)`` reads a checkpoint tensor, ``read_row(key, i)`` its ``i``-th slice
    along the first dimension (an expert of a tensor stored fused)."""
    if isinstance(source, str):
        return read(source)
    if isinstance(source, Converted):
        return convert(source, {p: [read(k) for k in ks] for p, ks in source.sources})
    inner, e = source.source, source.expert
    if isinstance(inner, str):
        t = read_row(inner, e)
    elif _per_expert(inner, len(inner.sources[0][1])):
        t = convert(inner, {p: [read(ks[e])] for p, ks in inner.sources})[0]
    else:  # a conversion that mixes the experts: the whole parameter, then the slice
        t = convert(inner, {p: [read(k) for k in ks] for p, ks in inner.sources})[e].clone()
    return t.t() if source.transposed else t


_EXPERT_PARTS = re.compile(r"^(\d+)\.(\w+)\.(weight|bias)$")


def expert_sources(model: nn.Module, sources: dict[str, Source]) -> dict[str, Source]:
    """The source of each per-expert linear parameter of ``model``'s `ExpertsAsLinears` stand-ins (built on the
    skeleton's meta weights), from the fused parameters' ``sources``."""
    out: dict[str, Source] = {}
    for name, module in model.named_modules():
        if not isinstance(module, ExpertsAsLinears):
            continue
        experts = module.experts
        for pname, _ in module.named_parameters(remove_duplicate=False):
            m = _EXPERT_PARTS.match(pname)
            if m is None:
                continue  # the stand-in's own (non-expert) parameters keep their names
            e, proj, part = int(m.group(1)), m.group(2), m.group(3)
            fused = f"{name}.{proj}" if part == "weight" else f"{name}.{proj}_bias"
            if fused not in sources:
                raise ConfigError(f"{fused}: no checkpoint tensor holds this fused experts parameter")
            transposed = bool(experts.is_transposed) and part == "weight"
            out[f"{name}.{pname}"] = ExpertSlice(sources[fused], e, transposed)
    return out


def reverted(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as ``save_pretrained`` writes it: transformers' load-time conversion mapping reverted."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def saved_origins(model: nn.Module) -> dict[str, str]:
    """The parameter each tensor that ``save_pretrained`` writes under another name comes from (a fused experts
    parameter saved one tensor per expert, a renamed one); `ConfigError` where that is not one parameter each."""
    state = {n: t.to("meta") for n, t in model.state_dict().items()}
    origins: dict[str, str] = {}
    try:
        whole = reverted(model, state)
        for name in state:
            if name not in whole:
                for saved in reverted(model, {name: state[name]}):
                    origins[saved] = name
    except Exception as e:  # a conversion transformers cannot replay on meta tensors: merged loaded instead
        raise ConfigError(f"{type(model).__name__}: save_pretrained's conversion of its tensors cannot be replayed "
                          f"one tensor at a time ({type(e).__name__}: {e})") from e
    if set(origins) | (set(whole) & set(state)) != set(whole):
        raise ConfigError(f"{type(model).__name__} saves tensors that several of its parameters convert into (not "
                          "replayed one tensor at a time)")  # fmt: skip
    return origins
