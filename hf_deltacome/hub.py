"""Sharing adapters on the Hugging Face Hub: ``push_adapter`` and the PEFT hooks that use it.

* :func:`push_adapter` uploads ``adapter_config.json``, ``adapter_model.safetensors`` and the model card
  (:mod:`hf_deltacome.card`, after validating the adapter) with ``huggingface_hub`` (``create_repo``,
  ``create_branch`` for ``revision``, ``create_commit``).
* :func:`write_peft_model_card` and :func:`push_peft_model` are what PEFT's ``save_pretrained`` (card) and
  ``PeftModel.push_to_hub`` do for DELTACOME adapters (wired in by :mod:`hf_deltacome.integration`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .card import CARD_MARKER, CARD_NAME, is_replaceable_card, render_model_card, write_model_card
from .config import DeltaCoMeConfig
from .errors import AdapterFileError, ConfigError
from .io.adapter_files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, DELTA_MARKER, read_adapter, read_adapter_config
from .io.atomic import PathLike

__all__ = ["CARD_MARKER", "push_adapter", "push_peft_model", "render_model_card", "write_model_card",
           "write_peft_model_card"]  # fmt: skip


def _adapter_folders(folder: Path) -> list[tuple[str, Path]]:
    """``(path prefix in the repo, folder)`` of the default adapter and of named adapters saved in subfolders."""
    out = [("", folder)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / ADAPTER_CONFIG_NAME).is_file() and (sub / ADAPTER_WEIGHTS_NAME).is_file():
            out.append((sub.name + "/", sub))
    return out


def push_adapter(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    commit_message: str = "Upload Delta-CoMe adapter",
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    evaluation: Any = None,
    tags: Optional[Sequence[str]] = None,
    validate: bool = True,
) -> Any:
    """Upload a saved DELTACOME adapter folder to the Hub; returns huggingface_hub's ``CommitInfo``.

    Uploads ``adapter_config.json``, ``adapter_model.safetensors`` (also of named adapters in subfolders) and
    ``README.md`` (our card for ``repo_id`` unless the folder holds a hand-written one) after reading and validating
    the adapter (``validate=False`` skips the tensor checks). ``revision`` names a branch, created if needed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:  # else a traceback from create_repo
        raise ConfigError(f"repo id {repo_id!r} is not valid on the Hub (use user/name): {e}") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: not an adapter folder")
    configs = {}
    for prefix, sub in _adapter_folders(folder):
        if not (sub / ADAPTER_CONFIG_NAME).is_file():
            raise AdapterFileError(f"{sub}: {ADAPTER_CONFIG_NAME} not found; is this a saved adapter?")
        configs[prefix] = read_adapter(sub)[0] if validate else read_adapter_config(sub)
        if not (sub / ADAPTER_WEIGHTS_NAME).is_file():
            raise AdapterFileError(f"{sub}: {ADAPTER_WEIGHTS_NAME} not found")
    api = HfApi(token=token) if token is not None else HfApi()
    repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    repo_id = repo_url.repo_id
    readme = folder / CARD_NAME
    if readme.is_file() and not is_replaceable_card(readme.read_text(encoding="utf-8", errors="replace")):
        card = readme.read_bytes()
    else:
        card = render_model_card(
            configs[""],
            summary={"weights_path": folder / ADAPTER_WEIGHTS_NAME},
            evaluation=evaluation,
            repo_id=repo_id,
            tags=tags,
        ).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card)]
    for prefix, sub in _adapter_folders(folder):
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            operations.append(CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(sub / name)))
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


# ------------------------------------------------------------------------------------------------------------
# PEFT hooks
# ------------------------------------------------------------------------------------------------------------


def _dense_bytes(model: Any, adapter_name: str) -> Optional[int]:
    from peft.utils import get_peft_model_state_dict

    try:
        # as save_pretrained saves it: "auto" would look the base's config up on the Hub (a network call per save)
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    except Exception:
        return None
    return sum(t.numel() * t.element_size() for k, t in state.items() if DELTA_MARKER not in k)


def _base_name(model: Any, config: DeltaCoMeConfig) -> Optional[str]:
    if config.base_model_name_or_path:
        return config.base_model_name_or_path
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(base, "name_or_path", None) or None


def write_peft_model_card(model: Any, output_dir: str) -> None:
    """Our card for the active adapter of a PeftModel (``create_or_update_model_card``) or of a transformers model
    holding it (its ``save_pretrained``): see :mod:`hf_deltacome.integration`."""
    name = model.active_adapter if hasattr(model, "active_peft_config") else model.active_adapters()[0]
    config = model.peft_config[name]
    write_model_card(
        output_dir, config, summary={"dense_bytes": _dense_bytes(model, name)}, base_model=_base_name(model, config)
    )


_PUSH_KWARGS = {
    "commit_message", "commit_description", "private", "token", "revision", "create_pr", "max_shard_size", "tags",
    "safe_serialization", "evaluation",
}  # fmt: skip


def push_peft_model(model: Any, repo_id: str, **kwargs: Any) -> Any:
    """``PeftModel.push_to_hub`` for DELTACOME adapters: save to a temporary folder, then :func:`push_adapter`."""
    unknown = set(kwargs) - _PUSH_KWARGS
    if unknown:
        raise TypeError(f"push_to_hub() got unexpected keyword argument(s) {sorted(unknown)}")
    if kwargs.get("safe_serialization") is False:
        raise ConfigError("DELTACOME adapters are pushed only as safetensors; safe_serialization=False is refused")
    with tempfile.TemporaryDirectory(prefix="deltacome-push-") as tmp:
        model.save_pretrained(tmp)
        return push_adapter(
            tmp,
            repo_id,
            private=bool(kwargs.get("private")),
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            commit_message=kwargs.get("commit_message") or "Upload Delta-CoMe adapter",
            commit_description=kwargs.get("commit_description"),
            create_pr=bool(kwargs.get("create_pr")),
            evaluation=kwargs.get("evaluation"),
            tags=kwargs.get("tags"),
        )
