"""Writing outputs safely: a private temporary folder next to the target, fsync, then an atomic rename.

Every file or folder keras_rebuild writes (``.tflite`` files, saved models,
plans) goes through :func:`atomic_output`:

- the output is first written inside a new private folder (mode 0700, made
  with ``mkdtemp``, a unique name) in the target's own folder, so a
  pre-existing file or symlink at any temporary name is never opened or
  followed, and two writers never share a temporary name;
- it is flushed to disk (``fsync``), then moved to its name with one atomic
  rename: readers see the old output or the new one, never half of one;
- without ``overwrite`` the final name is claimed atomically (``link`` for
  files, ``renameat2(RENAME_NOREPLACE)`` for folders where the kernel has it),
  so of two runs racing to a new name, one wins and the other is refused;
- a symlink at the output name is never written through: it is refused, or,
  with ``overwrite``, replaced itself;
- files are created with mode ``0o666`` filtered by the umask, like any file
  the user creates;
- missing parent folders are created;
- the temporary folder is removed on every error, including
  ``KeyboardInterrupt`` and the ``SystemExit`` that :func:`exit_on_signals`
  turns SIGTERM into (the command line installs it; the library never
  changes process-wide signal handlers by itself).

Example:
    >>> from keras_rebuild.io import atomic_output            # doctest: +SKIP
    >>> with atomic_output("small.keras") as tmp:              # doctest: +SKIP
    ...     model.save(tmp)
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import tempfile
import threading
from typing import Iterator, Optional, Sequence, Union

from keras_rebuild.errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    KerasRebuildError,
    OutputExistsError,
    received,
)

__all__ = ["atomic_output", "write_bytes", "save_model", "check_output_path", "exit_on_signals",
           "OutputWriteError"]

PathLike = Union[str, "os.PathLike[str]"]

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputWriteError(KerasRebuildError, ValueError):
    """An output could not be written (disk full, file too large, read-only folder...); nothing was written."""


# ----------------------------------------------------------------------------- checks
def check_output_path(path, *, overwrite: bool = False, suffixes: Optional[Sequence[str]] = None,
                      arg: str = "path", force_hint: str = "overwrite=True") -> str:
    """Validate an output path and return it as an absolute ``str``.

    Args:
        path: The output path (``str`` or ``os.PathLike``; not bytes).
        overwrite: Whether an existing output may be replaced.
        suffixes: Allowed endings (e.g. ``(".keras", ".h5")``); the name must
            have a stem before the suffix (``out/.keras`` is refused).
        arg: How to name the argument in messages (``"path"``, ``"-o"``).
        force_hint: What to pass to overwrite, for messages.

    Returns:
        The absolute path.

    Raises:
        InvalidArgumentTypeError: If ``path`` is not a ``str`` or path object.
        InvalidArgumentError: If ``path`` is empty, names a folder, or has the
            wrong suffix.
        OutputExistsError: If the output exists and ``overwrite`` is False.
    """
    if isinstance(path, (bytes, bytearray)) or not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentTypeError(f"Expected `{arg}` to be a str or os.PathLike. Received: {received(arg, path)}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        raise InvalidArgumentTypeError(f"Expected `{arg}` to be a str or os.PathLike. Received: {received(arg, path)}")
    name = os.path.basename(path)
    if not path or not name or name in (".", ".."):
        raise InvalidArgumentError(f"Expected `{arg}` to name a file. Received: {arg}={path!r}")
    if suffixes:
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None or name == suffix:
            raise InvalidArgumentError(
                f"Expected `{arg}` to be a file name ending in one of {', '.join(suffixes)}. Received: {arg}={path!r}"
            )
    if os.path.isdir(path) and not os.path.islink(path):
        raise InvalidArgumentError(f"Expected `{arg}` to name a file, not an existing folder. Received: {arg}={path!r}")
    if os.path.lexists(path) and not overwrite:
        what = "a symbolic link" if os.path.islink(path) else "an existing file"
        raise OutputExistsError(
            f"Expected `{arg}` to not exist (pass {force_hint} to replace it). Received: {arg}={path!r} is {what}"
        )
    return os.path.abspath(path)


# ----------------------------------------------------------------------------- kernel helpers
def _renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the kernel or libc lacks it (then the caller falls back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), dst)


def _fsync_tree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in files:
                _fsync_path(os.path.join(root, name))
            _fsync_path(root, directory=True)
    else:
        _fsync_path(path)


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync folders
        if not directory or exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _claim(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished output ``tmp`` to ``path`` atomically."""
    is_dir = os.path.isdir(tmp)
    if not overwrite:
        try:
            if is_dir:
                if not _renameat2(tmp, path, _RENAME_NOREPLACE):
                    if os.path.lexists(path):
                        raise FileExistsError(errno.EEXIST, "exists", path)
                    os.rename(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if `path` exists, even as a (dangling) symlink
                except OSError as exc:
                    if isinstance(exc, FileExistsError) or exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                        raise
                    if not _renameat2(tmp, path, _RENAME_NOREPLACE):  # no hard links on this file system
                        if os.path.lexists(path):
                            raise FileExistsError(errno.EEXIST, "exists", path) from None
                        os.rename(tmp, path)
        except FileExistsError:
            raise OutputExistsError(
                f"Expected the output to not exist (another run may have written it meanwhile). Received: {path!r}"
            ) from None
        return
    if os.path.isdir(path) and not os.path.islink(path):
        if not is_dir:
            raise InvalidArgumentError(f"Expected the output to name a file, not an existing folder. Received: {path!r}")
        if _renameat2(tmp, path, _RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # the old output, now at `tmp`
            return
        aside = tmp + ".old"
        os.rename(path, aside)
        os.rename(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
        return
    if is_dir and os.path.lexists(path):
        os.unlink(path)  # a file or symlink where a folder goes
    os.replace(tmp, path)  # replaces a symlink itself, never its target


# ----------------------------------------------------------------------------- atomic output
_PENDING = set()
_PENDING_LOCK = threading.Lock()


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


@contextlib.contextmanager
def atomic_output(path: PathLike, *, overwrite: bool = False, suffixes: Optional[Sequence[str]] = None,
                  arg: str = "path", force_hint: str = "overwrite=True") -> Iterator[str]:
    """Write an output atomically: yield a temporary path to write, then move it to ``path``.

    The temporary path has the same file name as ``path`` (so Keras picks
    the same format from its suffix), inside a new private folder next to
    ``path``. Write a file or a folder there; when the block ends without
    error the output is flushed and renamed to ``path`` in one step, and
    the private folder is removed in every case.

    Args:
        path: The output path. Missing parent folders are created.
        overwrite: Replace an existing output (atomically).
        suffixes: Allowed endings of the file name.
        arg: How to name the path in messages.
        force_hint: What to pass to overwrite, for messages.

    Yields:
        The temporary path to write to.

    Raises:
        OutputExistsError: If ``path`` exists (or appears while writing) and
            ``overwrite`` is False.
        OutputWriteError: If the disk is full, the file too large, the folder
            read-only or not writable; nothing is left behind.
    """
    final = check_output_path(path, overwrite=overwrite, suffixes=suffixes, arg=arg, force_hint=force_hint)
    parent, name = os.path.split(final)
    tmpdir = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmpdir = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
        with _PENDING_LOCK:
            _PENDING.add(tmpdir)
        tmp = os.path.join(tmpdir, name)
        yield tmp
        if not os.path.lexists(tmp):
            raise OutputWriteError(f"Expected an output to be written. Received: nothing at {final!r}")
        _fsync_tree(tmp)
        _claim(tmp, final, overwrite)
        _fsync_path(parent, directory=True)
    except OSError as exc:
        raise OutputWriteError(
            f"Expected to write {final!r}. Received: {_describe(exc)}; nothing was written"
        ) from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
            with _PENDING_LOCK:
                _PENDING.discard(tmpdir)


def write_bytes(path: PathLike, content: bytes, *, overwrite: bool = False,
                suffixes: Optional[Sequence[str]] = None, arg: str = "path",
                force_hint: str = "overwrite=True") -> str:
    """Write ``content`` to ``path`` atomically (see :func:`atomic_output`); return the absolute path."""
    with atomic_output(path, overwrite=overwrite, suffixes=suffixes, arg=arg, force_hint=force_hint) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any file the user creates
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    return os.path.abspath(os.fspath(path))


def save_model(model, path: PathLike, *, overwrite: bool = False, suffixes: Optional[Sequence[str]] = None,
               arg: str = "path", force_hint: str = "overwrite=True") -> str:
    """``model.save`` to ``path`` atomically (see :func:`atomic_output`); return the absolute path.

    tf_keras' warning that an uncompiled model saved as ``.h5`` or SavedModel
    has "compiled metrics yet to be built" is dropped: nothing is wrong.
    """
    from keras_rebuild.safety import _without_false_alarms

    with atomic_output(path, overwrite=overwrite, suffixes=suffixes, arg=arg, force_hint=force_hint) as tmp, \
            _without_false_alarms():
        model.save(tmp)
    return os.path.abspath(os.fspath(path))


def remove_pending() -> None:
    """Remove every temporary folder of an output still being written (for signal handlers)."""
    with _PENDING_LOCK:
        pending = list(_PENDING)
    for tmpdir in pending:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def exit_on_signals(signals: Sequence[int] = (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))):
    """Turn termination signals into ``SystemExit(128 + signum)`` inside the block, so cleanup runs.

    For entry points (the command line): a library must not change
    process-wide signal handlers. Only the main thread can install them;
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
        remove_pending()
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in set(signals)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
