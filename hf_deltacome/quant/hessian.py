"""The one Hessian collector: forward hooks that fold each hooked linear's input into a `GPTQ` accumulator.

GPTQ, the band-split search, the adaptive allocation and the BitDelta scales all need the second moment of a
linear's input on calibration data. :class:`HessianCollector` is the only place that gathers it:

* linears fed by the very same tensor in a forward pass (q/k/v of attention, gate/up of an MLP) share one
  accumulator, so their Hessian is built and held once;
* the caller runs the forward passes (a single decoder layer on cached hidden states, or a whole model); raising
  :class:`StopForward` from a hook ends a pass early once everything needed has run.

:func:`model_hessians` runs a whole model over token ids for a set of linears, in chunks of bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError
from ..progress import progress_bar
from .gptq import GPTQ

HESSIAN_MEMORY = 2 << 30  # bytes of input Hessians :func:`model_hessians` holds at once (more: more passes)


class StopForward(Exception):
    """Raised inside a forward pass once everything needed from it has run (caught by :meth:`HessianCollector.run`
    and by the layer walk)."""


class HessianCollector:
    """Accumulates ``H = 2/N Σ x xᵀ`` of the inputs of ``modules`` (name -> linear) while hooked.

    Use as a context manager around forward passes run through :meth:`run`; :attr:`hessians` maps each module that
    saw input to its `GPTQ` (shared by modules fed the same tensor). ``device`` is where the Hessians live (default:
    where the inputs are).
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, device: torch.device | str | None = None) -> None:
        self.modules = dict(modules)
        self.device = device
        self.hessians: dict[str, GPTQ] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current pass (held, so no address reuse)
        self._handles: list[Any] = []

    def __enter__(self) -> HessianCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def fold(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0]
            owner = next((n for t, n in self._seen if t is x), None)
            if owner is not None:  # the same tensor as an earlier module of this pass: share its Hessian
                self.hessians[name] = self.hessians[owner]
                return
            self._seen.append((x, name))
            if name not in self.hessians:
                self.hessians[name] = GPTQ(x.shape[-1], device=self.device or x.device, name=name)
            self.hessians[name].add_batch(x.to(self.hessians[name].H.device))

        return fold

    def run(self, forward: Callable[[], Any]) -> None:
        """Run one forward pass; its inputs are folded in as they occur (a :class:`StopForward` ends it quietly)."""
        self._seen.clear()
        try:
            forward()
        except StopForward:
            pass
        finally:
            self._seen.clear()

    def matrix(self, name: str) -> torch.Tensor | None:
        """The Hessian of ``name`` (``None`` when it saw no input)."""
        g = self.hessians.get(name)
        return g.H if g is not None else None


@torch.no_grad()
def model_hessians(
    model: nn.Module,
    names: Sequence[str],
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    max_bytes: int = HESSIAN_MEMORY,
    progress: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Input Hessians of the linears ``names`` of ``model`` on ``input_ids``, as CPU tensors, in chunks of at most
    ``max_bytes`` of Hessians (one pass over the data each), so a large model never holds every ``H`` at once.

    Linears fed the same tensor share one ``H`` object.
    """
    modules = dict(model.named_modules())
    missing = [nm for nm in names if nm not in modules]
    if missing:
        raise ConfigError(f"cannot measure activations of {missing[:3]}: no such module in {type(model).__name__}")
    chunks: list[list[str]] = [[]]
    used = 0
    for nm in names:
        size = modules[nm].in_features ** 2 * 4
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(nm)
        used += size
    device = next(model.parameters()).device
    bar = progress_bar(len(chunks) * math.ceil(input_ids.shape[0] / batch_size), progress, "Measuring activations")
    for chunk in chunks:
        with HessianCollector({nm: modules[nm] for nm in chunk}) as collector:
            for batch in input_ids.split(batch_size):
                collector.run(lambda batch=batch: model(input_ids=batch.to(device), use_cache=False))
                bar.update(1)
        out: dict[str, torch.Tensor] = {}
        for nm in chunk:
            g = collector.hessians.get(nm)
            if g is None:
                raise CalibrationError(f"module {nm} saw no input during the calibration forward passes")
            owner = next((k for k, v in collector.hessians.items() if v is g and k in out), None)
            out[nm] = out[owner] if owner is not None else g.H.cpu()
        yield out
    bar.close()
