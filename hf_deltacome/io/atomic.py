"""The one atomic writer: every file (and folder) the library writes appears whole or not at all.

:func:`atomic_write` writes a temp file in the target folder, fsyncs it and ``os.replace``-s it over the target, so an
interrupted save leaves the previous file intact. :func:`atomic_folder` builds the next version of a whole folder
beside it (the current files carried over as hard links) and swaps the two in one step, so a folder of several files
(an adapter: weights, config, card) is replaced as a unit. :func:`atomic_dir` builds a new folder beside its final
name and renames it into place (cache entries). :func:`check_output_folder` refuses to write into a model's folder.
:func:`write_folder` replaces an output folder (an exported LoRA, a merged model) with files written elsewhere, as
one swap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Optional, TypeVar, Union

import torch

from ..errors import DeltaCoMeError, OutputFolderError

TEMP_SUFFIX = ".deltacome-tmp"
NEXT_SUFFIX = ".deltacome-next"  # sibling folder holding the next version of a folder being saved
PREVIOUS_SUFFIX = ".deltacome-previous"  # the previous version set aside by the two-rename fallback
# what makes a folder a model checkpoint for transformers (an adapter_config.json beside them loads base + delta)
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")
MODEL_PATTERNS = ("*.safetensors.index.json", "*.bin.index.json", "model-*-of-*.safetensors", "pytorch_model-*.bin")

PathLike = Union[str, os.PathLike]
_T = TypeVar("_T")


def _temp_path(target: str) -> str:
    """A fresh, exclusively created temp file next to ``target`` (same folder, so ``os.replace`` is atomic)."""
    directory, name = os.path.split(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like a plain open()
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. directories cannot be opened on Windows; best effort
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def atomic_write(path: PathLike, writer: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``writer(tmp_path)`` fills a temp file in the same folder, which then replaces it.

    If ``writer`` raises (or the process dies) the previous ``path`` is untouched and the temp file is removed (or,
    after a kill, left as a hidden ``*.deltacome-tmp`` file that the next save of that folder removes).
    """
    target = os.fspath(path)
    tmp = _temp_path(target)
    try:
        writer(tmp)
        _fsync_path(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, target)
    _fsync_path(os.path.dirname(os.path.abspath(target)), directory=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], filename: PathLike, metadata: Optional[dict[str, str]] = None
) -> None:
    """``safetensors.torch.save_file`` through a temp file + ``os.replace`` (same signature)."""
    import safetensors.torch

    atomic_write(filename, lambda tmp: safetensors.torch.save_file(dict(tensors), tmp, metadata=metadata))


@contextlib.contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success rename it to ``final``, on failure delete it.

    If another process finished ``final`` first, ours is discarded and theirs kept (both are equivalent builds).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty leftover would block the rename
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should read like any folder
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
        _fsync_path(str(final.parent), directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# replacing a whole folder
# ------------------------------------------------------------------------------------------------------------


def _libc_exchange() -> Optional[Callable[[str, str], int]]:
    """The platform's atomic exchange of two paths: Linux ``renameat2(RENAME_EXCHANGE)``, macOS
    ``renamex_np(RENAME_SWAP)``; ``None`` where there is none (Windows, old C libraries)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # pragma: no cover - not run in CI
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    return None


_EXCHANGE: list = []  # [the exchange function or None], looked up once


def exchange_paths(a: PathLike, b: PathLike) -> bool:
    """Swap two existing paths in one atomic step; ``False`` (nothing done) where the platform or file system
    cannot (the caller then falls back to two renames)."""
    import ctypes
    import errno

    if not _EXCHANGE:
        _EXCHANGE.append(_libc_exchange())
    fn = _EXCHANGE[0]
    if fn is None or os.environ.get("DELTACOME_NO_EXCHANGE"):  # the variable forces the fallback (tests)
        return False
    if fn(os.fspath(a), os.fspath(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not on this file system
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _sibling(final: str, suffix: str) -> str:
    parent, name = os.path.split(final)
    return os.path.join(parent, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}")


def _siblings(final: str, suffix: str) -> list[tuple[str, int]]:
    """``(path, pid)`` of the hidden folders that saves of ``final`` left beside it with ``suffix``."""
    parent, name = os.path.split(final)
    pattern = re.compile(re.escape(f".{name}.") + r"(\d+)\.[0-9a-f]{12}" + re.escape(suffix))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return [(os.path.join(parent, e), int(m.group(1))) for e in sorted(entries) if (m := pattern.fullmatch(e))]


def wait_for_swap(final: PathLike, timeout: float = 5.0) -> bool:
    """Wait out the instant a running save has ``final`` set aside between the two renames of the fallback swap (a
    filesystem without an atomic exchange); True if ``final`` exists on return."""
    final, deadline = os.path.abspath(os.fspath(final)), time.monotonic() + timeout
    while not os.path.lexists(final) and time.monotonic() < deadline:
        if not any(pid != os.getpid() and _pid_alive(pid) for _, pid in _siblings(final, PREVIOUS_SUFFIX)):
            break
        time.sleep(0.002)
    return os.path.lexists(final)


def read_through_swap(folder: PathLike, read: Callable[[], _T], probe: PathLike, missing: tuple = (), tries: int = 5) -> _T:
    """``read()`` files of ``folder``, again if it found one missing (FileNotFoundError or ``missing``) only because a
    concurrent save swapped the folder meanwhile: ``probe`` (the file it needs) is there once the swap is over."""
    for attempt in range(tries):
        wait_for_swap(folder)
        try:
            return read()
        except DeltaCoMeError:
            raise  # a bad file, not a missing one
        except (FileNotFoundError, *missing):
            if attempt + 1 == tries or not (wait_for_swap(folder) and os.path.exists(probe)):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def recover_folder(final: PathLike) -> None:
    """Clean up after saves of ``final`` that were killed: put back a previous version set aside by the two-rename
    fallback if ``final`` is missing, and delete the half-built next versions of processes no longer running."""
    final = os.path.abspath(os.fspath(final))
    for path, pid in _siblings(final, PREVIOUS_SUFFIX):
        if pid != os.getpid() and not _pid_alive(pid):
            if not os.path.lexists(final):
                with contextlib.suppress(OSError):
                    os.rename(path, final)
                    continue
            shutil.rmtree(path, ignore_errors=True)
    for path, pid in _siblings(final, NEXT_SUFFIX):
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _link_tree(src: str, dst: str) -> None:
    """Carry ``src``'s files into ``dst`` as hard links (copies where links fail); temp files are left behind."""
    for entry in os.scandir(src):
        if entry.name.endswith(TEMP_SUFFIX):
            continue
        target = os.path.join(dst, entry.name)
        if entry.is_dir(follow_symlinks=False):
            os.mkdir(target)
            shutil.copystat(entry.path, target)
            _link_tree(entry.path, target)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)


@contextlib.contextmanager
def atomic_folder(final: PathLike) -> Iterator[str]:
    """Yield the path of the next version of folder ``final``; when the block ends without error it replaces
    ``final`` in one step, so a kill at any instant leaves either the previous or the new folder, never a mix.

    The next version starts as a copy of ``final``'s current content (hard links, so nothing is copied); write
    into it only by replacing files (:func:`atomic_write`), never in place, since the links share their data with
    the previous version. The swap is ``renameat2(RENAME_EXCHANGE)`` on Linux (``renamex_np`` on macOS). Where the
    file system has no exchange, two renames are used: ``final`` is set aside, then the new folder takes its name;
    a kill between them leaves the previous version as a hidden ``.<name>.<pid>.<id>.deltacome-previous`` sibling,
    which the next save or read of ``final`` (:func:`recover_folder`) puts back.
    """
    final = os.path.realpath(os.fspath(final))  # a symlink to the folder: replace the folder it points to
    if os.path.lexists(final) and not os.path.isdir(final):
        raise OutputFolderError(f"{final} exists and is not a folder")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    recover_folder(final)
    nxt = _sibling(final, NEXT_SUFFIX)
    os.mkdir(nxt)
    try:
        if os.path.isdir(final):
            shutil.copystat(final, nxt)
            _link_tree(final, nxt)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(nxt, 0o777 & ~umask)
        yield nxt
        _fsync_path(nxt, directory=True)
        cwd = os.getcwd()
        old = nxt  # after the swap, the previous version (if any) sits here
        if not os.path.isdir(final):
            os.rename(nxt, final)
        elif not exchange_paths(nxt, final):
            old = _sibling(final, PREVIOUS_SUFFIX)
            os.rename(final, old)
            os.rename(nxt, final)
        _fsync_path(os.path.dirname(final), directory=True)
        if cwd == final or cwd.startswith(final + os.sep):  # this process worked in the old version: follow the name
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(nxt):
            shutil.rmtree(nxt, ignore_errors=True)


class PinnedFiles:
    """Read-side partner of :func:`atomic_folder`: open handles on files of one folder, taken back to back, and a
    name for each (``/proc/self/fd/N`` on Linux, ``/dev/fd/N`` on macOS) that reads exactly the file opened, even
    after a save has swapped the folder. Files that do not exist are not pinned (:meth:`path` gives their path).
    Where the platform has no such names (Windows) the paths themselves are used, without that guarantee."""

    def __init__(self, folder: PathLike, names: Sequence[str]) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self._fds: dict[str, int] = {}
        for name in names:
            with contextlib.suppress(OSError):
                self._fds[name] = os.open(os.path.join(self.folder, name), os.O_RDONLY)

    def path(self, name: str) -> str:
        """A name that reads the pinned file ``name`` (its path when it is not pinned)."""
        fd = self._fds.get(name)
        if fd is not None:
            for proc in ("/proc/self/fd", "/dev/fd"):
                if os.path.isfile(f"{proc}/{fd}"):
                    return f"{proc}/{fd}"
        return os.path.join(self.folder, name)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PinnedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


_PINS: dict[int, tuple[weakref.ref, PinnedFiles]] = {}


def attach_pin(owner: object, pin: PinnedFiles) -> None:
    """Keep ``pin`` for ``owner`` (a config read through it) until :func:`take_pin` or ``owner`` is collected."""
    key = id(owner)

    def drop(_: object) -> None:
        entry = _PINS.pop(key, None)
        if entry is not None:
            entry[1].close()

    _PINS[key] = (weakref.ref(owner, drop), pin)


def take_pin(owner: object) -> Optional[PinnedFiles]:
    """The pin attached to ``owner`` (now the caller's to close), or ``None``."""
    entry = _PINS.get(id(owner))
    if entry is None or entry[0]() is not owner:
        return None
    del _PINS[id(owner)]
    return entry[1]


def model_files(folder: PathLike) -> list[str]:
    """Names of the files in ``folder`` that make it a model checkpoint (``config.json``, weights, shard index)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [name for name in MODEL_FILES if (folder / name).exists()]
    for pattern in MODEL_PATTERNS:
        found += sorted(p.name for p in folder.glob(pattern) if p.name not in found)
    return found


def check_output_folder(folder: PathLike, inputs: Optional[Mapping[str, Optional[PathLike]]] = None) -> None:
    """Refuse an adapter output folder that is (or is inside) one of ``inputs`` (``{"--base": path, ...}``) or that
    holds a model checkpoint: ``adapter_config.json`` next to ``config.json`` makes
    ``AutoModelForCausalLM.from_pretrained(folder)`` load base + delta without a word. Raises `OutputFolderError`."""
    out = Path(os.path.realpath(os.fspath(folder)))
    for role, source in (inputs or {}).items():
        if source is None or not os.path.isdir(source):
            continue  # a Hub id, or not a folder: nothing on disk to overwrite
        src = Path(os.path.realpath(os.fspath(source)))
        if out == src or src in out.parents:
            where = "is" if out == src else "is inside"
            raise OutputFolderError(
                f"output folder {os.fspath(folder)!r} {where} the {role} model folder {os.fspath(source)!r}; "
                "an adapter there would be loaded with that model by from_pretrained; choose a folder of its own"
            )
    found = model_files(out)
    if found:
        raise OutputFolderError(
            f"output folder {os.fspath(folder)!r} holds a model ({', '.join(found[:3])}); an adapter_config.json "
            "there would make from_pretrained of that folder load base + delta silently; choose a folder of its own"
        )


def write_folder(output: PathLike, fill: Callable[[Path], None], *, stale: Iterable[str] = ()) -> list[str]:
    """Run ``fill(tmp)`` to write the files of ``output`` into a temporary folder, then swap them into ``output`` in
    one :func:`atomic_folder` step (a kill leaves the previous or the new folder, never a mix). Files matching a glob
    of ``stale`` that the new output lacks (old weight shards) are gone in the new version; other files are kept.
    The new files replace the carried-over links (never written through them). Returns the names written."""
    output = Path(os.path.realpath(os.fspath(output)))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=TEMP_SUFFIX, dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        fill(tmp)
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        with atomic_folder(output) as nxt:
            for pattern in stale:
                for path in Path(nxt).glob(pattern):
                    if path.is_file() and str(path.relative_to(nxt)) not in names:
                        path.unlink()
            for name in names:
                target = Path(nxt) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / name, target)
                os.chmod(target, 0o666 & ~umask)  # like a plain open(); writers may create 0600 temp files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names
