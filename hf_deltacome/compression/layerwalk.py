"""The layer walk: decoder layers one at a time, each driven by the hidden states the compressed layers before it
produce (GPTQ-style sequential compression).

:func:`capture_layer_inputs` runs the model once up to the first decoder layer and records what every layer is
called with; :func:`walk_layers` then visits each layer with those inputs (moved to the work device), lets the
caller compress it, and runs the now-compressed layer to get the next layer's inputs.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DeltaCoMeError
from ..progress import peak_memory, progress_bar
from ..quant.hessian import StopForward


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and `nn.ModuleList` of the decoder layers (the list of ``num_hidden_layers`` blocks)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    n_layers = getattr(cfg, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} (no list of transformer blocks)")
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:  # a VLM: never the vision tower's layers
        own = {id(m) for m in decoder.modules()}
        candidates = [c for c in candidates if id(c[1]) in own] or candidates
    preferred = [c for c in candidates if re.search(r"(^|\.)(layers|h|blocks|layer)$", c[0])]
    name, layers = (preferred or candidates)[0]
    return name, layers


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer during one forward pass: records its inputs, returns them unchanged."""

    def __init__(self, layer: nn.Module, store: list, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_last", last)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._store.append((hidden_states, args, kwargs))
        if self._last:
            raise StopForward
        return hidden_states

    def __getattr__(self, name: str) -> Any:  # attributes the model loop reads, e.g. attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    ids: torch.Tensor | Sequence[dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device | None,
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Hidden states entering layer 0 and the ``(args, kwargs)`` each layer is called with, per calibration batch.

    The layers are swapped for recorders that pass hidden states through untouched (the last one stops the forward
    pass), so this costs only the embedding stage; every layer's own call arguments are kept (models may give
    layers different masks). ``ids`` is a token-id tensor, or a list of ready input batches (``input_ids``,
    ``pixel_values``, ...) for vision-language models, which then run their whole forward up to the first layer.
    """
    stores: list[list] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _LayerRecorder(layer, stores[i], last=i == len(originals) - 1)
    emb_device = next(model.get_input_embeddings().parameters()).device
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    try:
        batches = ids.split(batch_size) if isinstance(ids, torch.Tensor) else ids
        for batch in batches:
            for s in stores:
                s.clear()
            inputs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch
            try:
                model(**to_device(inputs, emb_device), use_cache=False)
            except StopForward:
                pass
            if not all(stores):
                raise DeltaCoMeError(f"{type(model).__name__} did not call its decoder layers during a forward pass")
            h = stores[0][0][0]
            hidden.append(h if device is None else h.to(device))
            for li, s in enumerate(stores):
                _, args, kwargs = s[0]
                calls[li].append((args, kwargs) if device is None else (to_device(args, device), to_device(kwargs, device)))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, calls


def floats_to(obj: Any, dtype: torch.dtype | None) -> Any:
    """``obj`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype`` (``None``: as is)."""
    if dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(floats_to(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: floats_to(v, dtype) for k, v in obj.items()}
    return obj


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first real parameter (or buffer) lives; CPU for an empty module or one still on the meta
    device (a streamed layer between its reads)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def move_real(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)`` for its real tensors only: a streamed layer's weights stay on the meta device until
    they are read (``Module.to`` refuses meta tensors). Parameters keep their identity (their data is moved)."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and p.device.type != "meta" and p.device != device:
                p.data = p.data.to(device)
        for key, b in m._buffers.items():
            if b is not None and b.device.type != "meta" and b.device != device:
                m._buffers[key] = b.to(device)


LayerVisit = Callable[[int, Sequence[torch.Tensor] | None, Sequence[tuple[tuple, dict]] | None, torch.device], None]


@torch.no_grad()
def walk_layers(
    model: nn.Module,
    companions: Sequence[nn.Module],
    inputs: torch.Tensor | Sequence[dict[str, torch.Tensor]] | None,
    visit: LayerVisit,
    *,
    batch_size: int,
    device: torch.device | None,
    progress: bool,
    hold: Callable[[int | None], contextlib.AbstractContextManager] | None = None,
) -> list[float]:
    """Visit every decoder layer of ``model`` in order: ``visit(i, hidden, calls, work_device)``.

    ``inputs`` (token ids or model-input batches) drive the walk; ``hidden`` is then the list of hidden-state
    batches entering layer ``i`` after every earlier layer ran as ``model`` has it *now* (the visit compresses layer
    ``i`` in place before it runs), and ``calls`` the ``(args, kwargs)`` it is called with. Without inputs (data-free)
    both are ``None``. With ``device`` each layer and its ``companions[i]`` (the fine-tune's layer) are moved there
    for the visit and back afterwards. ``hold(i)`` (streamed models) gives layer ``i`` real weights for its forward
    pass after the visit, ``hold(None)`` what computing the first layer's inputs needs; a visit holds what it reads
    itself, so a streamed run never keeps a whole layer of either model while it compresses one linear. The progress
    bar shows elapsed and remaining time and the peak memory so far. Returns the seconds each layer took.
    """
    _, layers = find_decoder_layers(model)
    hold = hold or (lambda _i: contextlib.nullcontext())
    bar = progress_bar(len(layers), progress, "Compressing layers", unit="layer")
    seconds: list[float] = []
    try:  # closed on an error or interrupt too, so what is printed next starts on its own line
        with hold(None):
            hidden, calls = (None, None) if inputs is None else capture_layer_inputs(model, layers, inputs, batch_size,
                                                                                     device)  # fmt: skip
        for i, layer in enumerate(layers):
            start = time.perf_counter()
            if hidden is None:  # data-free: the visit reads what it needs (module by module when streamed)
                visit(i, None, None, device or module_device(layer))
            else:
                companion = companions[i]
                home, companion_home = module_device(layer), module_device(companion)
                if device is not None:
                    move_real(layer, device)
                    move_real(companion, device)
                visit(i, hidden, calls[i], device or home)
                with hold(i):  # streamed: the compressed layer's weights for its forward pass only
                    hidden = [layer_output(layer(h, *a, **k)) for h, (a, k) in zip(hidden, calls[i], strict=True)]
                if device is not None:
                    move_real(layer, home)
                    move_real(companion, companion_home)
            seconds.append(time.perf_counter() - start)
            bar.set_postfix_str(peak_memory(), refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return seconds


def hessian_passes(inputs: dict[str, nn.Module], one_pass: int, cap: int) -> list[list[str]]:
    """The linears ``inputs`` of a decoder layer (name -> linear) grouped into forward passes, only one group's input
    Hessians alive at a time: all in one pass when their Hessians, counted unshared, take at most ``one_pass`` bytes;
    else one pass per input width, narrowest first, split further into passes of about ``cap`` bytes at most (a
    mixture's experts have a Hessian each), the linears of one parent module, which may share an input, kept
    together."""
    size = {n: getattr(m, "in_features", 0) ** 2 * 4 for n, m in inputs.items()}
    if sum(size.values()) <= one_pass:
        return [list(inputs)]
    passes: list[list[str]] = []
    for width in sorted({getattr(m, "in_features", 0) for m in inputs.values()}):
        parents: dict[str, list[str]] = {}
        for n, m in inputs.items():
            if getattr(m, "in_features", 0) == width:
                parents.setdefault(n.rpartition(".")[0], []).append(n)
        group: list[str] = []
        for members in parents.values():
            if group and sum(size[n] for n in group + members) > cap:
                passes.append(group)
                group = []
            group += members
        passes.append(group)
    return passes
