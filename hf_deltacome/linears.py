"""What hf-deltacome treats as a linear layer: ``nn.Linear``, and transformers' ``Conv1D`` (GPT-2's linear, which
stores its weight transposed, ``in x out``).

The tuner layer wraps either: :func:`linear_shape` and :func:`in_weight_layout` read and edit a ``Conv1D`` in its
own orientation. Compression works through :func:`linear_views` instead, under which every ``Conv1D`` of the given
models is a `Conv1DAsLinear`, an ``nn.Linear`` sharing its storage, so the pipeline knows one kind of linear (its
deltas, Hessians and packed layouts are ``out x in`` as for any linear). Afterwards each ``Conv1D`` goes back where its
stand-in is, under PEFT's wrappers too, so the returned model and its saved files are in the base's own layout and the
adapter loads onto the plain ``Conv1D`` model. The base fingerprint sketches a stand-in as the ``Conv1D`` it stands for.
"""

from __future__ import annotations

import contextlib
import functools
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
        new = type(conv).__new__(type(conv))
        nn.Module.__init__(new)
        new.nf, new.nx = self.out_features, self.in_features
        new.weight = nn.Parameter(self.weight.data.t(), requires_grad=self.weight.requires_grad)
        new.bias = self.bias
        return new


@contextlib.contextmanager
def linear_views(*models: nn.Module) -> Iterator[int]:
    """Within the block every ``Conv1D`` of ``models`` is a `Conv1DAsLinear` (yields how many were swapped).

    On exit (also on failure) every stand-in in the models' module trees, PEFT's wrappers included, is a ``Conv1D``
    again: the original where it is the original's stand-in, a new one for a copy of it."""
    swapped = 0
    try:
        for model in models:
            for name, module in list(model.named_modules()):
                if name and is_conv1d(module):
                    model.set_submodule(name, Conv1DAsLinear(module, name))
                    swapped += 1
        yield swapped
    finally:
        if swapped:
            for model in models:
                for parent in list(model.modules()):
                    for child_name, child in list(parent._modules.items()):
                        if isinstance(child, Conv1DAsLinear):
                            parent._modules[child_name] = child.as_conv1d()


def on_linear_views(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of ``compress(base_model, finetuned_model, ...)``: runs it under :func:`linear_views` of the models
    passed loaded (paths are streamed, which refuses ``Conv1D``)."""

    @functools.wraps(fn)
    def wrapper(base_model: Any, finetuned_model: Any, *args: Any, **kwargs: Any) -> Any:
        with linear_views(*(m for m in (base_model, finetuned_model) if isinstance(m, nn.Module))):
            return fn(base_model, finetuned_model, *args, **kwargs)

    return wrapper
