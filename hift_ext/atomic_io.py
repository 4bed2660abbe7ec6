"""Writing into a directory the user may share with others: new files renamed into place.

Every output of a run is created as a fresh temporary entry inside the destination directory
(``O_CREAT | O_EXCL | O_NOFOLLOW``, or ``mkdir``, so a planted symlink is never written through)
and then renamed over the old name. ``rename`` replaces a symlink itself, never its target, and a
reader sees either the old or the new file, never half of one. Temporary names start with
``.hift-`` and end with ``.tmp`` so that :func:`is_own_temp` can recognise (and clean) leftovers of
a killed run without touching anything else.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from typing import IO, Iterator, Optional

__all__ = [
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "is_own_temp",
    "atomic_file",
    "write_text",
    "make_temp_dir",
    "install_dir",
    "install_symlink",
    "remove_entry",
    "fsync_dir",
    "HashingWriter",
    "sha256_file",
]

TEMP_PREFIX = ".hift-"
TEMP_SUFFIX = ".tmp"


def is_own_temp(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def _temp_name(directory: str, label: str) -> str:
    return os.path.join(directory, f"{TEMP_PREFIX}{label}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_new(path: str, binary: bool) -> IO:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o666)  # the umask applies, as for open(path, "w")
    return os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"}))


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False, fsync: bool = False, keep_open: bool = False
                ) -> Iterator[IO]:
    """Yield a new file that replaces ``path`` when the block ends without an exception.

    ``fsync``: flush it to disk before the rename (checkpoints). ``keep_open``: the caller closes
    the handle (an append-only log that keeps writing to the file it created)."""
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = _temp_name(directory, os.path.basename(path))
        try:
            fh = _create_new(tmp, binary)
            break
        except FileExistsError:
            continue
    try:
        yield fh
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
        if not keep_open:
            fh.close()
        os.replace(tmp, path)
    except BaseException:
        fh.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str, fsync: bool = False) -> None:
    with atomic_file(path, fsync=fsync) as fh:
        fh.write(text)


def make_temp_dir(directory: str, label: str) -> str:
    """A new, empty directory inside ``directory`` with an own temporary name."""
    while True:
        tmp = _temp_name(directory, label)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def remove_entry(path: str) -> None:
    """Remove a file, a symlink (not its target) or a directory tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def install_dir(tmp_dir: str, path: str) -> None:
    """Put the finished directory ``tmp_dir`` at ``path`` (same parent). Whatever was at ``path``
    goes: a symlink is removed (its target is untouched), an old directory is renamed aside first
    and deleted only once the new one is in place."""
    aside: Optional[str] = None
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        aside = _temp_name(os.path.dirname(os.path.abspath(path)), os.path.basename(path) + "-old")
        os.rename(path, aside)
    os.rename(tmp_dir, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def install_symlink(target: str, path: str) -> None:
    """Atomically make ``path`` a symlink to ``target`` (a name relative to ``path``'s directory).
    A real directory at ``path`` (a copied run) is renamed aside and deleted afterwards."""
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = _temp_name(directory, os.path.basename(path))
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue
    aside = None
    if os.path.isdir(path) and not os.path.islink(path):
        aside = _temp_name(directory, os.path.basename(path) + "-old")
        os.rename(path, aside)
    os.replace(tmp, path)
    fsync_dir(directory)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


class HashingWriter:
    """A write-only file object that also computes the size and sha256 of what passes through, so
    a checkpoint's manifest costs no second read of the file."""

    def __init__(self, fh: IO[bytes]):
        self._fh = fh
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        mv = memoryview(data)
        self._hash.update(mv)
        self.size += mv.nbytes
        return self._fh.write(mv)

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)
