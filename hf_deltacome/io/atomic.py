"""The one atomic writer: every file (and folder) the library writes appears whole or not at all.

:func:`atomic_write` writes a temp file in the target folder, fsyncs it and ``os.replace``-s it over the target, so an
interrupted save leaves the previous file intact. Inside :func:`atomic_transaction` the renames are deferred until
every file of the save has been written. :func:`atomic_dir` builds a whole folder beside its final name and renames
it into place (cache entries, checkpoints of other tools). :func:`write_folder` replaces the files of an existing
output folder (an exported LoRA, a merged model) as one transaction.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Optional, Union

import torch

TEMP_SUFFIX = ".deltacome-tmp"

PathLike = Union[str, os.PathLike]

_TRANSACTION: contextvars.ContextVar[Optional[list[tuple[str, str]]]] = contextvars.ContextVar(
    "deltacome_atomic_transaction", default=None
)


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
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, writer: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``writer(tmp_path)`` fills a temp file in the same folder, which then replaces it.

    If ``writer`` raises (or the process dies) the previous ``path`` is untouched and the temp file is removed (or,
    after a kill, left as a hidden ``*.deltacome-tmp`` file that the next save of that folder removes). Inside
    :func:`atomic_transaction` the final rename is deferred to the end of the transaction.
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
    staged = _TRANSACTION.get()
    if staged is not None:
        for i, (old_tmp, old_target) in enumerate(staged):
            if os.path.abspath(old_target) == os.path.abspath(target):  # written twice: the last write wins
                with contextlib.suppress(OSError):
                    os.remove(old_tmp)
                del staged[i]
                break
        staged.append((tmp, target))
        return
    os.replace(tmp, target)
    _fsync_path(os.path.dirname(os.path.abspath(target)), directory=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, _write)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_transaction() -> Iterator[None]:
    """Defer the renames of every :func:`atomic_write` in the block until it ends without error.

    On error (or a kill) no target has been replaced and the staged temp files are removed. Nested transactions
    join the outermost one.
    """
    if _TRANSACTION.get() is not None:
        yield
        return
    staged: list[tuple[str, str]] = []
    token = _TRANSACTION.set(staged)
    try:
        yield
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    finally:
        _TRANSACTION.reset(token)
    done = 0
    try:
        for tmp, target in staged:
            os.replace(tmp, target)
            done += 1
    finally:
        for tmp, _ in staged[done:]:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    for directory in {os.path.dirname(os.path.abspath(t)) for _, t in staged}:
        _fsync_path(directory, directory=True)


def remove_stale_temp_files(folder: PathLike) -> list[str]:
    """Remove ``*.deltacome-tmp`` files left in ``folder`` by saves whose process no longer runs."""
    removed = []
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        m = re.fullmatch(r"\..+\.(\d+)\.[0-9a-f]{12}" + re.escape(TEMP_SUFFIX), name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


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


def write_folder(output: PathLike, fill: Callable[[Path], None], *, stale: Iterable[str] = ()) -> list[str]:
    """Run ``fill(tmp)`` to write every file of ``output`` into a temporary folder beside it, then move them all into
    ``output`` in one :func:`atomic_transaction` (all replace their old versions, or on error or kill none does).
    Files of ``output`` matching a glob of ``stale`` that the new output lacks (old weight shards) are removed after.
    Returns the names written (relative paths)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=TEMP_SUFFIX, dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)

    def move(target: str, source: Path) -> None:
        os.replace(source, target)
        os.chmod(target, 0o666 & ~umask)  # like a plain open(); writers may create 0600 temp files

    try:
        fill(tmp)
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        with atomic_transaction():
            for name in names:
                (output / name).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(output / name, lambda target, source=tmp / name: move(target, source))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for pattern in stale:
        for path in output.glob(pattern):
            if path.is_file() and str(path.relative_to(output)) not in names:
                with contextlib.suppress(OSError):
                    path.unlink()
    return names
