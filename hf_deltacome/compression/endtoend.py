"""End-to-end check of planned layouts: how far the whole model's next-token distribution moves from the fine-tune.

The band-split search and the adaptive allocation score layouts module by module (relative output error on
calibration activations). That objective is cheap, but it is not the model's: on a delta that stores knowledge it
prefers fewer, more precise singular vectors than is best end to end (measured in ``benchmarks/RESULTS.md``). So a
planned change is kept only if it also lowers the next-token KL divergence from the fine-tune on the calibration
text, with every target delta replaced by its round-to-nearest approximation at its layout (or by another
approximation passed to :meth:`EndToEndCheck.apply`: the plan weighs the bands alone as GPTQ stores them). Weights
are edited in place on the fine-tune (``W_ft - Δ + Δ̂``) and always put back.

The KL is taken over every token of the calibration text. Taken over the answers' tokens only (prompt/completion
records mark them, :func:`~.calibration.tokenize_records`), it chose bands with a DARE residual that answered fewer
held-out questions than what the whole-text KL chooses (facts-hot at 1/64: 232 of 240 against 238; at 1/32 both 235;
``benchmarks/RESULTS.md``): the fine-tune memorised the training answers, and on them a few bands reproduce more than
they keep of held-out paraphrases. :func:`mean_next_token_kl` with ``scored`` still measures it (``quality.py --kl``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

E2E_SAMPLES = 8  # calibration sequences the check runs (each evaluation is one forward pass over them)
E2E_BATCH = 4  # sequences per forward pass
E2E_TOKENS = 256  # tokens per sequence: the fine-tune's log-probs are held for all of them (tokens x vocabulary)
METRIC = "next-token KL to the fine-tune (round-to-nearest)"  # what the check's numbers are, for the records


@torch.no_grad()
def next_token_log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``model``'s float32 next-token log-probabilities on a batch of token ids, on the CPU."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.to(device), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def next_token_kls(
    reference: Sequence[torch.Tensor], model: nn.Module, batches: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``KL(reference || model)`` for the next token at every position of ``batches``, one ``(sequences, tokens)``
    tensor per batch; ``reference`` holds the reference model's :func:`next_token_log_probs` of the same batches.
    One forward pass of ``model`` per batch, so several means (:func:`mean_kl`) can share it."""
    return [
        (ref.exp() * (ref - next_token_log_probs(model, batch))).sum(-1)
        for batch, ref in zip(batches, reference, strict=True)
    ]


def mean_kl(kls: Sequence[torch.Tensor], scored: Sequence[torch.Tensor] | None = None) -> float:
    """Mean of :func:`next_token_kls`' per-position KLs; ``scored`` (one boolean tensor per batch, its shape; e.g.
    :func:`response_positions`) keeps only the positions marked True."""
    total, count = 0.0, 0
    for i, per_position in enumerate(kls):
        if scored is not None:
            per_position = per_position[scored[i]]
        total += float(per_position.sum())
        count += per_position.numel()
    return total / max(count, 1)


def mean_next_token_kl(
    reference: Sequence[torch.Tensor],
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    scored: Sequence[torch.Tensor] | None = None,
) -> float:
    """Mean over the positions of ``batches`` of ``KL(reference || model)`` for the next token (:func:`mean_kl` of
    :func:`next_token_kls`); ``scored`` keeps only the positions marked True."""
    return mean_kl(next_token_kls(reference, model, batches), scored)


def response_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is a response token: a ``(sequences, tokens)`` mask of the tokens shifted by
    one (the last position predicts a token beyond the sequence and is not scored)."""
    scored = torch.zeros_like(response_mask, dtype=torch.bool)
    scored[:, :-1] = response_mask[:, 1:].bool()
    return scored


class EndToEndCheck:
    """Next-token KL of ``model`` (the fine-tune) against itself with some deltas replaced by approximations.

    ``delta_of(name)`` gives a target's float32 delta (reading the fine-tune's weights through :meth:`original`,
    since replaced ones are edited in place), ``approximate(delta, entry)`` its dense approximation at layout
    ``entry``, computed on the module's own device. With ``input_energy`` the reference pass also sums each linear's
    squared inputs (the diagonal of its input second moment, for DARE's importance rates), and ``approximate`` is
    called as ``approximate(delta, entry, diag)``. Use as a context manager so the fine-tune's weights are
    restored whatever happens.
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        delta_of: Callable[[str], torch.Tensor],
        approximate: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor],
        *,
        max_samples: int = E2E_SAMPLES,
        max_tokens: int = E2E_TOKENS,
        batch_size: int = E2E_BATCH,
        input_energy: bool = False,
    ) -> None:
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise ConfigError(
                f"end-to-end check needs a (sequences, tokens) batch of ids, got {tuple(input_ids.shape)}"
            )
        self.model, self.delta_of, self.approximate = model, delta_of, approximate
        self.modules = dict(model.named_modules())
        self.batches = list(input_ids[:max_samples, :max_tokens].split(batch_size))
        self.num_samples = min(max_samples, input_ids.shape[0])  # the sequences measured on
        self.saved: dict[str, torch.Tensor] = {}  # fine-tune weights of the modules currently replaced
        self.applied: dict[str, tuple] = {}  # (approximation, layout entry) each replaced module has now
        self.input_diag: dict[str, torch.Tensor] | None = {} if input_energy else None
        hooks = [mod.register_forward_pre_hook(self._energy_hook(name)) for name, mod in self.modules.items()
                 if input_energy and isinstance(mod, nn.Linear)]  # fmt: skip
        try:
            self.reference = [next_token_log_probs(model, b) for b in self.batches]
        finally:
            for hook in hooks:
                hook.remove()

    def _energy_hook(self, name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            energy = x.square().reshape(-1, x.shape[-1]).sum(0).cpu()
            self.input_diag[name] = self.input_diag.get(name, 0) + energy

        return hook

    def __enter__(self) -> EndToEndCheck:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    @torch.no_grad()
    def apply(
        self,
        layouts: Mapping[str, dict[str, Any]],
        approximate: Callable[[str, torch.Tensor, dict[str, Any]], torch.Tensor] | None = None,
    ) -> None:
        """Replace each named target's delta by its approximation at the given layout entry; ``approximate``, called
        as ``approximate(name, delta, entry)``, stands in for the check's own for these targets."""
        for name, entry in layouts.items():
            if self.applied.get(name) == (approximate, entry):
                continue
            weight = self.modules[name].weight
            if name not in self.saved:
                self.saved[name] = weight.detach().clone()
            delta = self.delta_of(name).to(device=weight.device, dtype=torch.float32)
            if approximate is not None:
                error = delta - approximate(name, delta, entry).to(delta.device)
            elif self.input_diag is None:
                error = delta - self.approximate(delta, entry)
            else:
                error = delta - self.approximate(delta, entry, self.input_diag.get(name))
            weight.copy_(self.saved[name] - error.to(weight.dtype))
            self.applied[name] = (approximate, entry)

    def original(self, name: str) -> torch.Tensor:
        """The fine-tune's own weight of ``name``, whether or not it is replaced now."""
        saved = self.saved.get(name)
        return saved if saved is not None else self.modules[name].weight

    def snapshot(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The current weights of ``names``, to put back with :meth:`rollback` if a change does not pay."""
        return {nm: self.modules[nm].weight.detach().clone() for nm in names}

    @torch.no_grad()
    def rollback(self, snapshot: Mapping[str, torch.Tensor]) -> None:
        """Put back the weights of a :meth:`snapshot`."""
        for name, w in snapshot.items():
            self.modules[name].weight.copy_(w)
            self.applied.pop(name, None)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every replaced weight back to the fine-tune's."""
        for name, w in self.saved.items():
            self.modules[name].weight.copy_(w)
        self.saved.clear()
        self.applied.clear()

    def kl(self) -> float:
        """Mean over calibration tokens of ``KL(fine-tune || current model)`` for the next token."""
        return mean_next_token_kl(self.reference, self.model, self.batches)
