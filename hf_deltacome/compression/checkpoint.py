"""Checkpoints of a running compression, one file per finished decoder layer, so an interrupted run can resume."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import DeltaCoMeConfig
from ..errors import ConfigError
from ..io.atomic import atomic_write_text, save_safetensors_atomic
from ..io.fingerprint import fingerprint_differences, fingerprint_json, parse_fingerprint
from .calibration import CalibrationData

STATE_VERSION = 2  # 2: the fine-tune's fingerprint and the calibration given are recorded (1: neither)
SETTINGS = (
    "ratio", "method", "bands", "min_rank_share", "group_size", "quantizer", "damp", "act_order", "search",
    "allocation", "uniform_bits", "bitdelta_scale", "distill_steps", "distill_bands", "sparse_tail", "band_share",
    "residual", "dare_rates", "dare_fit", "dare_modules", "mask_draw", "mask_draws", "target_modules", "exclude_modules",
)  # fmt: skip


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def calibration_record(
    source: Any, config: DeltaCoMeConfig, *, num_samples: int, seq_len: int, seed: int, tokenizer: Any = None
) -> dict[str, Any]:
    """What calibration the caller gave, as recorded in a checkpoint: its kind, a SHA-256 of its content and the
    options that shape the token ids drawn from it (a resume with other calibration data is refused)."""
    if config.quantizer != "gptq":
        return {"kind": "none (round-to-nearest, data-free)"}
    if isinstance(source, torch.Tensor):
        t = source.detach().cpu().contiguous()
        digest = _sha256(str(t.dtype).encode() + t.numpy().tobytes())
        return {"kind": "token tensor", "shape": list(t.shape), "sha256": digest}
    record: dict[str, Any] = {"num_samples": num_samples, "seq_len": seq_len, "seed": seed}
    if tokenizer is not None:
        record["tokenizer"] = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if source is None:
        return {"kind": "sampled from the fine-tune", **record}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            digest = _sha256(path.read_bytes())
        except OSError:
            digest = None  # unreadable: reading the calibration names the problem next
        return {"kind": "file", "path": str(path.resolve()), "sha256": digest, **record}
    items = list(source)
    text = json.dumps(items, default=repr, ensure_ascii=False)
    return {"kind": "texts", "count": len(items), "sha256": _sha256(text.encode()), **record}


def describe_calibration(record: Any) -> str:
    """One line for messages: ``file /x/a.txt (sha256 1a2b3c4d…), 4 x 16 tokens, seed 0``."""
    if not isinstance(record, dict):
        return "not recorded"
    text = str(record.get("kind"))
    if record.get("path"):
        text += f" {record['path']}"
    if record.get("count") is not None:
        text += f" ({record['count']} texts)"
    if record.get("shape") is not None:
        text += f" {tuple(record['shape'])}"
    if record.get("sha256"):
        text += f" (sha256 {record['sha256'][:12]}…)"
    if record.get("num_samples") is not None:
        text += f", {record['num_samples']} x {record['seq_len']} tokens, seed {record['seed']}"
    if record.get("tokenizer"):
        text += f", tokenizer {record['tokenizer']}"
    return text


class LayerCheckpoint:
    """Per-decoder-layer checkpoints of a running compression, so an interrupted run can resume.

    The folder holds ``state.json`` (what the run compresses: layout-independent config fields, the base and the
    fine-tune fingerprints and a record of the calibration given; a resume with any of them different is refused,
    naming which), ``calibration.safetensors`` (the exact token ids, so sampled calibration is not drawn again) and
    ``layer_NNNN.safetensors`` with the packed buffers of each finished layer. Every file is written to a temporary
    name and renamed, so a kill leaves no half-written checkpoint.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        config: DeltaCoMeConfig,
        adapter_name: str,
        *,
        finetuned: nn.Module,
        calibration: dict[str, Any],
        finetuned_fingerprint: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.adapter_name = adapter_name
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(config, k, None) for k in SETTINGS}
        settings = {k: sorted(v) if isinstance(v, set) else v for k, v in settings.items()}
        state = {
            "version": STATE_VERSION,
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
            "base_fingerprint": config.base_fingerprint,
            # (a streamed fine-tune, on the meta device, comes with its fingerprint read from its files)
            "finetuned_fingerprint": finetuned_fingerprint or fingerprint_json(finetuned),
            "calibration": calibration,
        }
        state_path = self.folder / "state.json"
        if state_path.exists():
            self._check(state_path, state, finetuned, finetuned_fingerprint)
        else:
            atomic_write_text(state_path, json.dumps(state, sort_keys=True))

    def _check(
        self, path: Path, state: dict[str, Any], finetuned: nn.Module, finetuned_fingerprint: str | None = None
    ) -> None:
        """Refuse to resume from a checkpoint of other inputs, naming every input that differs."""
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"checkpoint {path} cannot be read ({e}); delete {self.folder} to start afresh") from e
        if not isinstance(stored, dict) or stored.get("version") != STATE_VERSION:
            raise ConfigError(
                f"checkpoint {self.folder} was written by another version of hf_deltacome (it does not record the "
                "fine-tune and the calibration data); delete it (or pass --overwrite) to start afresh"
            )
        problems = []
        old, new = stored.get("settings") or {}, state["settings"]
        changed = [f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]  # fmt: skip
        if changed:
            problems.append(f"other settings ({'; '.join(changed)})")
        if stored.get("base_fingerprint") != state["base_fingerprint"]:
            problems.append("another base model")
        if stored.get("finetuned_fingerprint") != state["finetuned_fingerprint"]:
            try:
                diffs = fingerprint_differences(parse_fingerprint(stored.get("finetuned_fingerprint")), finetuned)[0]
            except (ConfigError, TypeError, KeyError):
                diffs = ["its fingerprint in the checkpoint is unreadable"]
            if diffs:
                problems.append(f"another fine-tuned model ({'; '.join(diffs)})")
            elif finetuned_fingerprint is not None:  # streamed: the skeleton has no weights to name differences in
                problems.append("another fine-tuned model (the weights differ: their sketch, read from the files, is another)")
        if stored.get("calibration") != state["calibration"]:
            problems.append(
                f"other calibration data (checkpoint: {describe_calibration(stored.get('calibration'))}; "
                f"now: {describe_calibration(state['calibration'])})"
            )
        if problems:
            raise ConfigError(
                f"checkpoint {self.folder} belongs to a compression with {' and '.join(problems)}; delete it (or "
                "pass --overwrite) to start afresh"
            )

    def load_calibration(self) -> Any:
        path = self.folder / "calibration.safetensors"
        if not path.exists():
            return None
        meta = json.loads((self.folder / "calibration.json").read_text())
        return CalibrationData(input_ids=load_file(path)["input_ids"], source=meta["source"] + " (from checkpoint)")

    def save_calibration(self, calib: Any) -> None:
        atomic_write_text(self.folder / "calibration.json", json.dumps({"source": calib.source}))
        save_safetensors_atomic({"input_ids": calib.input_ids.contiguous()}, self.folder / "calibration.safetensors")

    def _layer_path(self, i: int) -> Path:
        return self.folder / f"layer_{i:04d}.safetensors"

    def load_layer(self, i: int, modules: dict[str, nn.Module]) -> bool:
        """Fill the packed buffers of layer ``i`` from its checkpoint; False when there is none."""
        path = self._layer_path(i)
        if not path.exists():
            return False
        tensors = load_file(path)
        for name, module in modules.items():
            packed = module.deltacome_delta[self.adapter_name]
            for key, buf in packed.state_dict().items():
                stored = tensors.get(f"{name}::{key}")
                if stored is None or stored.shape != buf.shape or stored.dtype != buf.dtype:
                    raise ConfigError(f"checkpoint {path} does not match module {name!r} ({key}); delete it to restart")
                buf.copy_(stored)
        return True

    def save_layer(self, i: int, modules: dict[str, nn.Module]) -> None:
        tensors = {
            f"{name}::{key}": buf.detach().cpu().contiguous()
            for name, module in modules.items()
            for key, buf in module.deltacome_delta[self.adapter_name].state_dict().items()
        }
        save_safetensors_atomic(tensors, self._layer_path(i))
