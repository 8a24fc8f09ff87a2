"""What hf-deltacome treats as a linear layer: ``nn.Linear``, and transformers' ``Conv1D`` (GPT-2's linear, which
stores its weight transposed, ``in x out``).

The tuner layer wraps either: :func:`linear_shape` and :func:`in_weight_layout` read and edit a ``Conv1D`` in its
own orientation. Compression works through :func:`linear_views` instead, under which every ``Conv1D`` of the given
models is a `Conv1DAsLinear`, an ``nn.Linear`` sharing its storage, so the pipeline knows one kind of linear (its
deltas, Hessians and packed layouts are ``out x in`` as for any linear). Afterwards each ``Conv1D`` goes back where its
stand-in is, under PEFT's wrappers too, so the returned model and its saved files are in the base's own layout and the
adapter loads onto the plain ``Conv1D`` model. The base fingerprint sketches a stand-in as the ``Conv1D`` it stands for.

A mixture-of-experts layer whose experts transformers 5 stores fused (3-D ``gate_up_proj`` / ``up_proj`` and
``down_proj`` parameters, the ``use_experts_implementation`` protocol of Mixtral, Qwen2/3-MoE, DeepSeek, GPT-OSS and
~60 more) is one linear per expert and projection to hf-deltacome: `ExpertsAsLinears` is an ``nn.Module`` whose
children ``<e>.<projection>`` are ``nn.Linear`` views of each expert's slice (one storage) and whose forward routes
the tokens as the fused module's eager forward does. Compression works under :func:`linear_views`, which swaps every
fused experts module in too; a stand-in whose linears carry an adapter stays in the model (so a loaded adapter's
experts are ``mlp.experts.<e>.gate_up_proj``, matched by ``target_modules`` like any linear) until the adapter is
unloaded (:func:`fuse_experts`), when the fused module comes back holding the linears' current (merged) values.
Loading onto a fused base swaps in the stand-ins the adapter's layout names (:func:`unfuse_experts`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import ConfigError


@functools.cache
def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (a linear whose weight is ``in x out``)."""
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear(module: nn.Module) -> bool:
    """Whether hf-deltacome can wrap ``module``: an ``nn.Linear`` or a ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_out), int(n_in)
    return int(module.out_features), int(module.in_features)


def in_weight_layout(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An ``out x in`` ``delta`` laid out as ``module``'s weight (transposed for a ``Conv1D``)."""
    return delta.t() if is_conv1d(module) else delta


def add_delta_to_weight(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``module``'s weight plus an ``out x in`` ``delta``, in the weight's layout."""
    return module.weight.data + in_weight_layout(module, delta)


class Conv1DAsLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is the transposed view of a ``Conv1D``'s (one storage; its bias is the same
    parameter), for :func:`linear_views`. The ``Conv1D`` is kept unregistered in :attr:`conv1d`."""

    def __init__(self, conv: nn.Module, name: str = "") -> None:
        if conv.weight.device.type == "meta":  # offloaded by accelerate: the hook that loads it is the Conv1D's
            raise ConfigError(
                f"{name or 'a Conv1D'} has its weight on the meta device (offloaded); compress needs the models' "
                "weights in memory: load them without offloading"
            )
        nn.Module.__init__(self)  # not nn.Linear.__init__: no new weight is allocated or initialised
        self.out_features, self.in_features = linear_shape(conv)
        self.weight = nn.Parameter(conv.weight.data.t(), requires_grad=conv.weight.requires_grad)
        self.bias = conv.bias
        self.__dict__["conv1d"] = conv  # not a child: the model's modules and parameters stay those of a linear

    def as_conv1d(self) -> nn.Module:
        """The ``Conv1D`` this stands for; for a copy of a stand-in (PEFT's dense copy of a changed module), a new
        ``Conv1D`` holding the copy's own values."""
        conv = self.conv1d
        if conv.weight.data.data_ptr() == self.weight.data.data_ptr():
            return conv
        return conv1d_holding(self.weight.data, self.bias, requires_grad=self.weight.requires_grad, cls=type(conv))


def conv1d_holding(weight: torch.Tensor, bias: nn.Parameter | None, requires_grad: bool = False,
                   cls: type | None = None) -> nn.Module:  # fmt: skip
    """A ``Conv1D`` (or ``cls``) computing what an ``nn.Linear`` of ``weight`` (``out x in``) and ``bias`` computes,
    its weight the transposed view of ``weight`` (no copy, nothing initialised)."""
    cls = cls or _conv1d_class()
    conv = cls.__new__(cls)
    nn.Module.__init__(conv)
    conv.nf, conv.nx = weight.shape
    conv.weight = nn.Parameter(weight.t(), requires_grad=requires_grad)
    conv.bias = bias
    return conv


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' fused experts (3-D expert weights, ``use_experts_implementation``)."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, nn.Parameter) and down.dim() == 3 and isinstance(getattr(module, "num_experts", None), int)
            and all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed")))  # fmt: skip


def _view_linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    """An ``nn.Linear`` whose weight (and bias) are the given tensors themselves (views, no copy)."""
    w = weight.t() if transposed else weight
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")  # allocates nothing
    linear.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class ExpertsAsLinears(nn.Module):
    """Fused experts as one ``nn.Linear`` per expert and projection, children ``<e>.<projection>`` sharing the fused
    weights' storage, with the fused module's routing (module docstring). The fused module is kept unregistered in
    :attr:`experts`; its other parameters and sub-modules (a post-expert norm) are registered here under their own
    names, so the model's other weights keep their names. A stand-in made with ``keep`` stays for good: its linears
    are stored packed (an AMLQ base, :mod:`hf_deltacome.amlq`), so :func:`fuse_experts` leaves it and :meth:`fused`
    stacks their effective weights into a copy without storing them."""

    def __init__(self, experts: nn.Module, name: str = "", meta: bool = False, keep: bool = False) -> None:
        if not meta and any(p.device.type == "meta" for p in experts.parameters(recurse=False)):
            raise ConfigError(
                f"{name or 'a fused experts module'} has its weights on the meta device (offloaded); hf-deltacome "
                "runs fused experts as per-expert linears, which needs their weights in memory: load the model "
                "without offloading"
            )
        super().__init__()
        self.__dict__["experts"] = experts
        self.keep = keep
        self.projections = ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")
        fused = {*self.projections, *(f"{p}_bias" for p in self.projections)}
        for e in range(experts.num_experts):
            one = nn.Module()
            for proj in self.projections:
                bias = getattr(experts, f"{proj}_bias", None) if experts.has_bias else None
                one.add_module(proj, _view_linear(getattr(experts, proj).data[e],
                                                  None if bias is None else bias.data[e], experts.is_transposed))  # fmt: skip
            self.add_module(str(e), one)
        for pname, p in experts.named_parameters(recurse=False):
            if pname not in fused:
                self.register_parameter(pname, p)
        for cname, child in experts.named_children():
            self.add_module(cname, child)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, adapter_names: Any = None, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """The fused module's eager routing: each hit expert runs its own linears on its tokens. With a mixed batch's
        per-row ``adapter_names`` (the tokens are the batch's rows flattened), each token keeps its row's adapter."""
        experts = self.experts
        out = torch.zeros_like(hidden_states)
        first, down = self.projections
        if adapter_names is not None and hidden_states.shape[0] % len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the experts received "
                             f"{hidden_states.shape[0]} tokens, not a whole number of tokens per row")  # fmt: skip
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < experts.num_experts:  # an expert-parallel sentinel: not held here
                continue
            token_idx, position = torch.where(top_k_index == e)
            names = None
            if adapter_names is not None:  # the same kind of per-row list, one entry per routed token
                per_row = hidden_states.shape[0] // len(adapter_names)
                names = type(adapter_names)([adapter_names[t // per_row] for t in token_idx.tolist()])
            h = self._run(e, first, hidden_states[token_idx], names)
            h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
            h = self._run(e, down, h, names)
            if getattr(experts, "has_post_expert_norm", False):
                h = experts.post_expert_norm(h)
            h = h * top_k_weights[token_idx, position, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def _run(self, e: int, proj: str, x: torch.Tensor, adapter_names: Any) -> torch.Tensor:
        linear = self._modules[str(e)]._modules[proj]
        if adapter_names is not None and _wraps(linear):  # an adapter's wrapper takes the tokens' names
            return linear(x, adapter_names=adapter_names)
        return linear(x)

    def linears(self, proj: str) -> list[nn.Module]:
        """The per-expert base linears of ``proj`` (under an adapter's wrapper, the module it wraps)."""
        found = [self._modules[str(e)]._modules[proj] for e in range(self.experts.num_experts)]
        return [_unwrapped(m) for m in found]

    def fused(self) -> nn.Module:
        """The fused module holding the linears' current values (a merge or ``.to()`` gives a linear its own
        storage: the expert weights are stacked again and the linears made views of the result). Of a stand-in made
        with ``keep``: a shallow copy holding their stacked (dequantized) values, the stand-in left as it is."""
        experts = self.experts
        if self.keep:
            experts = copy.copy(experts)
            experts._parameters = dict(self.experts._parameters)
        for proj in self.projections:
            for attr, part in ((proj, "weight"), (f"{proj}_bias", "bias")):
                if attr != proj and not experts.has_bias:
                    continue
                lins, param = self.linears(proj), getattr(experts, attr)
                values = [getattr(m, part).data for m in lins]
                transposed = experts.is_transposed and part == "weight"
                if not self.keep:  # the linears still views of the fused parameter: nothing moved
                    views = [param.data[e].t() if transposed else param.data[e] for e in range(len(lins))]
                    if all(v.data_ptr() == w.data_ptr() and v.dtype == w.dtype and v.device == w.device
                           and v.stride() == w.stride() for v, w in zip(views, values)):  # fmt: skip
                        continue
                stacked = torch.stack([v.t() if transposed else v for v in values])
                setattr(experts, attr, nn.Parameter(stacked, requires_grad=param.requires_grad and not self.keep))
                if not self.keep:
                    for e, m in enumerate(lins):
                        getattr(m, part).data = stacked[e].t() if transposed else stacked[e]
        for pname, p in self._parameters.items():  # its other parameters, as ``.to()`` left them here
            experts._parameters[pname] = p
        return experts

    def drop_fused(self) -> None:
        """Free the fused weights (the stand-in's linears now hold their own, packed): meta placeholders remain."""
        for proj in self.projections:
            for attr in (proj, f"{proj}_bias"):
                p = getattr(self.experts, attr, None)
                if isinstance(p, torch.Tensor):
                    empty = torch.empty(p.shape, dtype=p.dtype, device="meta")
                    setattr(self.experts, attr, nn.Parameter(empty, requires_grad=False))

    def hosts_adapter(self) -> bool:
        """Whether any of the linears is wrapped by PEFT (a tuner layer, or a dense copy of ``modules_to_save``)."""
        return any(_wraps(self._modules[str(e)]._modules[p])
                   for e in range(self.experts.num_experts) for p in self.projections)  # fmt: skip


def _wraps(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT wrapper: a tuner layer (``get_base_layer``) or ``modules_to_save``'s wrapper."""
    return hasattr(module, "get_base_layer") or hasattr(module, "original_module")


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a PEFT wrapper wraps (``module`` itself when it is none)."""
    if hasattr(module, "get_base_layer"):
        return module.get_base_layer()
    return getattr(module, "original_module", module)


_EXPERT_LINEAR = re.compile(r"^(.*)\.\d+\.(gate_up_proj|up_proj|down_proj)$")


def unfuse_experts(model: nn.Module, names: Any = None, meta: bool = False, keep: bool = False) -> int:
    """Swap in an `ExpertsAsLinears` for each fused experts module of ``model`` (only those with a linear among
    ``names``, e.g. an adapter's layout, when given); returns how many were swapped. ``meta``: weights on the meta
    device are viewed too (a streamed skeleton, whose linears get real weights one expert at a time). ``keep``:
    stand-ins for good, whose linears will be stored packed (AMLQ)."""
    wanted = None if names is None else {m.group(1) for n in names if (m := _EXPERT_LINEAR.match(n))}
    swapped = 0
    for name, module in list(model.named_modules()):
        if name and is_fused_experts(module) and (wanted is None or name in wanted):
            model.set_submodule(name, ExpertsAsLinears(module, name, meta, keep))
            swapped += 1
    return swapped


def fuse_experts(model: nn.Module, keep_adapters: bool = False) -> None:
    """Put each fused experts module back in place of its `ExpertsAsLinears` (with the linears' current values);
    with ``keep_adapters``, stand-ins whose linears carry an adapter stay, and those made with ``keep`` always."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, ExpertsAsLinears) and not child.keep and not (keep_adapters and child.hosts_adapter()):
                parent._modules[child_name] = child.fused()


def named_linears(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s modules by name, each fused experts module's per-expert linears among them (views: ``model`` is
    left as it is), for reading a fine-tune's weights by an adapter's module names."""
    out = {}
    for name, module in model.named_modules():
        out[name] = module
        if name and is_fused_experts(module):
            out.update((f"{name}.{n}", m) for n, m in ExpertsAsLinears(module, name).named_modules() if n)
    return out


@contextlib.contextmanager
def conv1d_views(*models: nn.Module) -> Iterator[int]:
    """Within the block every ``Conv1D`` of ``models`` is a `Conv1DAsLinear` (yields how many were swapped). On exit
    (also on failure) every ``Conv1D`` stand-in in the models' module trees, PEFT's wrappers included, is a ``Conv1D``
    again: the original where it is the original's stand-in, a new one for a copy of it. A stand-in replaced inside
    the block (by a quantized linear: AMLQ) stays replaced."""
    swapped = 0
    try:
        for model in models:
            for name, module in list(model.named_modules()):
                if name and is_conv1d(module):
                    model.set_submodule(name, Conv1DAsLinear(module, name))
                    swapped += 1
        yield swapped
    finally:
        for model in models if swapped else ():
            for parent in list(model.modules()):
                for child_name, child in list(parent._modules.items()):
                    if isinstance(child, Conv1DAsLinear):
                        parent._modules[child_name] = child.as_conv1d()


def on_conv1d_views(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of ``fn(model, ...)``: runs it under :func:`conv1d_views` of ``model`` (AMLQ's passes over a GPT-2)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with conv1d_views(model):
            return fn(model, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def linear_views(*models: nn.Module) -> Iterator[int]:
    """Within the block every ``Conv1D`` of ``models`` is a `Conv1DAsLinear` (:func:`conv1d_views`) and every fused
    experts module an `ExpertsAsLinears` (yields how many were swapped). On exit (also on failure) each ``Conv1D`` is
    back, and every experts stand-in is the fused module again, except, after a success, those whose linears carry
    the new adapter."""
    with conv1d_views(*models) as convs:
        experts, failed = 0, False
        try:
            for model in models:
                experts += unfuse_experts(model)
            yield convs + experts
        except BaseException:
            failed = True
            raise
        finally:
            for model in models if experts else ():
                if failed:
                    _strip_adapters(model)
                fuse_experts(model, keep_adapters=not failed)


def _strip_adapters(model: nn.Module) -> None:
    """After a failed compression: the linears of each experts stand-in unwrapped from PEFT's wrappers (tuner layers,
    dense copies), so the fused module can come back."""
    for stand_in in [m for m in model.modules() if isinstance(m, ExpertsAsLinears)]:
        for e in range(stand_in.experts.num_experts):
            one = stand_in._modules[str(e)]
            for proj in stand_in.projections:
                one._modules[proj] = _unwrapped(one._modules[proj])


def on_linear_views(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of ``compress(base_model, finetuned_model, ...)``: runs it under :func:`linear_views` of the models
    passed loaded (paths are streamed, which refuses ``Conv1D``)."""

    @functools.wraps(fn)
    def wrapper(base_model: Any, finetuned_model: Any, *args: Any, **kwargs: Any) -> Any:
        with linear_views(*(m for m in (base_model, finetuned_model) if isinstance(m, nn.Module))):
            return fn(base_model, finetuned_model, *args, **kwargs)

    return wrapper
