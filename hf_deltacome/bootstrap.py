"""Run :func:`hf_deltacome.integration.install` as soon as PEFT is imported, without importing PEFT (or torch) here.

``import hf_deltacome`` must make ``PeftModel.from_pretrained`` understand our adapters, yet stay instant so that
``deltacome --help`` does not wait seconds for torch and transformers. So the package imports nothing heavy and
this module watches imports instead: when ``peft`` finishes loading (imported by the user, by transformers, or by one
of our own modules), the integration is installed — right away, or, if one of our own modules is still half-way
through its import, as soon as the outermost of them has finished (installing earlier would find it incomplete).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (milliseconds at start-up)

if TYPE_CHECKING:  # annotations only: this module is imported at every interpreter start (hf_deltacome-peft.pth)
    import importlib.machinery
    from types import ModuleType
    from typing import Any

_PACKAGE = __name__.rpartition(".")[0]
_state = {"depth": 0, "pending": False, "installed": False}


def _install() -> None:
    if _state["installed"]:
        return
    _state["installed"] = True
    _state["pending"] = False
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Watcher)]
    try:
        from .integration import install

        install()
    except Exception as e:  # never break `import peft` for a program that does not use our adapters
        import warnings

        warnings.warn(f"hf_deltacome: the PEFT integration could not be installed: {e!r}", stacklevel=2)


def _loaded(name: str) -> None:
    if name == "peft":
        _state["pending"] = True
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
        if fullname != "peft" and not ours:
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
    if "peft" in sys.modules:
        _install()
    elif not any(isinstance(f, _Watcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
