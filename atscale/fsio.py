"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed over the target (and the folder
fsynced), so a process killed mid-write leaves the previous file intact and never a torn one. Final files and folders
get the modes the user's umask implies (not ``tempfile``'s private 0600 / 0700), so colleagues on a shared cluster can
read runs and exports. Folders are swapped with :func:`replace_dir` (an atomic exchange where Linux offers one). Base
layer: imports nothing from atscale."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_umask_lock = threading.Lock()
_swapped_umask: int | None = None


def _proc_umask() -> int | None:
    """The umask from ``/proc/self/status`` (Linux >= 4.7): read without changing it, so race-free."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_swap() -> int:
    """The umask by ``os.umask(0)`` and an immediate restore, done once per process and cached.

    ``os.umask`` is process-wide, so a thread creating a file between the two calls would get mode 0666 / 0777; the
    lock serializes atscale's own callers and the cache makes the window happen at most once (call it early, while
    single-threaded, where that matters). A umask changed later in the process is not seen."""
    global _swapped_umask
    with _umask_lock:
        if _swapped_umask is None:
            _swapped_umask = os.umask(0)
            os.umask(_swapped_umask)
        return _swapped_umask


def current_umask() -> int:
    """The process umask: read from ``/proc`` where available (thread-safe, always current), else
    :func:`_umask_by_swap` (set-and-restore once, cached; see its note on threads)."""
    mask = _proc_umask()
    return _umask_by_swap() if mask is None else mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder: 0o777 & ~umask."""
    return 0o777 & ~current_umask()


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; the file gets :func:`file_mode` (as a plain ``open`` would)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent``, then given :func:`dir_mode` so it can be renamed into place as is."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def finalize_tree(root: str | Path) -> None:
    """Before publishing ``root`` by a rename: give every file under it :func:`file_mode` and every folder
    :func:`dir_mode` (writers such as safetensors create private 0600 files), and fsync them all, so the rename
    survives a crash with the data in place."""
    fmode, dmode = file_mode(), dir_mode()
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fchmod(fd, fmode)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(folder, dmode)
        _fsync_dir(Path(folder))


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``): at every moment both names exist.

    Returns False, changing nothing, where the C library, kernel or filesystem cannot (no ``renameat2``, ENOSYS,
    EINVAL, ENOTSUP); other failures raise ``OSError``."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Put the folder ``src`` at ``dst`` (same filesystem), replacing any ``dst`` and then deleting the old copy.

    With :func:`exchange`, ``dst`` is never missing: readers see the old folder or the new one. Elsewhere the old one is
    renamed aside first (``<src>-old``), leaving a short window without ``dst``. The parent folder is fsynced."""
    src, dst = Path(src), Path(dst)
    if not os.path.lexists(dst):
        os.rename(src, dst)
    elif exchange(src, dst):
        _remove(src)
    else:
        aside = src.with_name(src.name + "-old")
        os.rename(dst, aside)
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(aside, dst)
            raise
        _remove(aside)
    _fsync_dir(dst.parent)
