"""Run :func:`hf_deltacome.integration.install` as soon as PEFT is imported, without importing PEFT (or torch) here.

``import hf_deltacome`` must make ``PeftModel.from_pretrained`` understand our adapters, yet stay instant so that
``deltacome --help`` does not wait seconds for torch and transformers. So the package imports nothing heavy and
this module watches imports instead: when ``peft`` finishes loading (imported by the user, by transformers, or by one
of our own modules), the integration is installed — right away, or, if one of our own modules is still half-way
through its import, as soon as the outermost of them has finished (installing earlier would find it incomplete).
The transformers-only patches (:data:`~hf_deltacome.integration.EARLY`: the AMLQ quantizer) are installed the same
way as soon as transformers' quantizer registry has loaded, so ``from_pretrained`` of an AMLQ base works in a
process that never imports PEFT.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (milliseconds at start-up)

if TYPE_CHECKING:  # annotations only: this module is imported at every interpreter start (hf_deltacome-peft.pth)
    import importlib.machinery
    from types import ModuleType
    from typing import Any

_PACKAGE = __name__.rpartition(".")[0]
_EARLY = "transformers.quantizers.auto"  # transformers' quantizer registry: the early patches need only this
_state: dict[str, Any] = {"depth": 0, "pending": set(), "installed": False, "early": False}


def _install() -> None:
    pending, _state["pending"] = _state["pending"], set()
    if _state["installed"]:
        return
    try:
        if "peft" in pending:
            _state["installed"] = True
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Watcher)]
            from .integration import install

            install()
        elif _EARLY in pending and not _state["early"]:
            _state["early"] = True
            from .integration import install_early

            install_early()
    except Exception as e:  # never break `import peft` / transformers for a program that does not use our adapters
        import warnings

        warnings.warn(f"hf_deltacome: the PEFT/transformers integration could not be installed: {e!r}", stacklevel=2)


def _loaded(name: str) -> None:
    if name in ("peft", _EARLY):
        _state["pending"].add(name)
    if _state["pending"] and _state["depth"] == 0:
        _install()


class _WatchingLoader:  # an importlib Loader (duck-typed: importlib.abc costs milliseconds at start-up)
    """Runs the real loader, then reports the module as loaded (restoring the real loader on the module)."""

    def __init__(self, loader: Any, ours: bool) -> None:
        self.loader, self.ours = loader, ours

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _state["depth"] += self.ours
        try:
            self.loader.exec_module(module)
        finally:
            _state["depth"] -= self.ours
        _loaded(module.__name__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _Watcher:  # an importlib MetaPathFinder
    """Finds ``peft`` and our own submodules with the other finders and wraps their loaders."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        ours = fullname.startswith(_PACKAGE + ".")
        if fullname not in ("peft", _EARLY) and not ours:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _WatchingLoader(spec.loader, ours)
        return spec


def watch() -> None:
    """Install the integration now if PEFT is already imported, else as soon as it is (idempotent)."""
    if _state["installed"]:
        return
    _state["pending"] |= {name for name in ("peft", _EARLY) if name in sys.modules}
    if _state["pending"]:
        _install()
    if not _state["installed"] and not any(isinstance(f, _Watcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
