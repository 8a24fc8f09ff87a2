"""Checkpoints of a running compression, one file per finished decoder layer, so an interrupted run can resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from ..config import DeltaCoMeConfig
from ..errors import ConfigError
from ..io.atomic import atomic_write_text, save_safetensors_atomic
from .calibration import CalibrationData


class LayerCheckpoint:
    """Per-decoder-layer checkpoints of a running compression, so an interrupted run can resume.

    The folder holds ``state.json`` (what the run compresses: layout-independent config fields and the base
    fingerprint; a resume with other inputs is refused), ``calibration.safetensors`` (the exact token ids, so
    sampled calibration is not drawn again) and ``layer_NNNN.safetensors`` with the packed buffers of each finished
    layer. Every file is written to a temporary name and renamed, so a kill leaves no half-written checkpoint.
    """

    def __init__(self, folder: str | os.PathLike, config: DeltaCoMeConfig, adapter_name: str) -> None:
        self.folder = Path(folder)
        self.adapter_name = adapter_name
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = (
            "ratio", "method", "bands", "min_rank_share", "group_size", "quantizer", "damp", "act_order", "search",
            "allocation",
        )  # fmt: skip
        state = {k: getattr(config, k, None) for k in keys}
        state["target_modules"] = (
            sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        )
        state["base_fingerprint"] = config.base_fingerprint
        state_path = self.folder / "state.json"
        text = json.dumps(state, sort_keys=True, default=str)
        if state_path.exists():
            if state_path.read_text() != text:
                raise ConfigError(
                    f"checkpoint {self.folder} belongs to a compression with other settings or another base; "
                    "delete it (or pass --overwrite) to start afresh"
                )
        else:
            atomic_write_text(state_path, text)

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
