"""The POSIX mechanics under :class:`~flashckpt.backends.local.LocalBackend`: directories
made durable once (:class:`Dirs`), files written whole, large aligned pieces with ``O_DIRECT``
(:class:`FileWriter`), and the temporary files killed writers left (:func:`sweep_temps`).
Everything here is thread-safe."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import socket
import stat
import threading
import time
from itertools import count
from pathlib import Path

from flashckpt._secure import private_dir
from flashckpt.errors import StorageError
from flashckpt.storage.protocol import check_key

log = logging.getLogger(__name__)

ALIGN = 4096
TMP_MARK = ".tmp-"
_counter = count()
#: This host in temporary names: characters a key may hold, so the sweeper can parse them.
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
#: Exactly the temporary names ``put`` creates: ``<name>.tmp-<host>-<pid>-<counter>``.
TMP_NAME = re.compile(r"(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>[0-9]+)-(?P<n>[0-9]+)")
#: The only directories flashckpt writes to on a POSIX tier (commit records, manifests,
#: chunks; see docs/format.md): the sweeper never looks anywhere else.
KEY_SPACE = ("commits", "steps", "chunks")


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (this host, this process, a counter)."""
    return path.with_name(f"{path.name}{TMP_MARK}{HOST}-{os.getpid()}-{next(_counter)}")


def is_temp(name: str) -> bool:
    return TMP_NAME.fullmatch(name) is not None


def address(mv: memoryview) -> int | None:
    """Address of a writable contiguous buffer, or None when it cannot be known cheaply."""
    if mv.readonly or not mv.c_contiguous or mv.nbytes == 0:
        return None
    holder = ctypes.c_char.from_buffer(mv)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


class Dirs:
    """The directories of one tier: each made (and, when ``fsync``, fsynced in its parent)
    once per backend.  ``private``: every component is created 0700 and checked."""

    def __init__(self, root: Path, *, fsync: bool, private: bool, dir_mode: int) -> None:
        self.root = root
        self._fsync = fsync
        self._private = private
        self._dir_mode = dir_mode
        #: directories known to exist with their entry durable in the parent (when fsync)
        self._made: set[Path] = set()
        self._lock = threading.Lock()

    def make(self, d: Path) -> None:
        """Make ``d`` (the root or a directory below it) exist, and (when fsync) durable.

        Each directory from the root down that this backend has not made yet is created if
        missing and then fsynced in its parent, even if it existed: a writer killed after
        its mkdir may never have made the entry durable.  Only then does it count as made,
        so a concurrent put that finds it already there still fsyncs it before returning.
        Private: every component is created 0700 and checked (raises ``ConfigError``)."""
        if d in self._made and d.is_dir():
            return
        if self.root not in self._made or not self.root.is_dir():
            self._make_root()
        if d == self.root:
            return
        if self._private:
            private_dir(d, trusted_above=self.root)
        cur = self.root
        for name in d.relative_to(self.root).parts:
            cur = cur / name
            if cur in self._made and cur.is_dir():
                continue
            if not self._private:
                try:
                    os.mkdir(cur, self._dir_mode)
                except FileExistsError:
                    pass
            if self._fsync:
                fsync_dir(cur.parent)
            with self._lock:
                self._made.add(cur)

    def _make_root(self) -> None:
        """Create the root and any missing directory above it, each fsynced in its parent
        (when fsync).  A root that already existed is the user's and is taken as it is."""
        created: list[Path] = []
        if self._private:
            existed = self.root.is_dir()
            private_dir(self.root)
            created = [] if existed else [self.root]
        else:
            missing = [p for p in [self.root, *self.root.parents] if not p.exists()]
            for p in reversed(missing):
                try:
                    os.mkdir(p, self._dir_mode)
                    created.append(p)
                except FileExistsError:
                    pass
        if self._fsync:
            for i, p in enumerate(created):
                try:
                    fsync_dir(p.parent)
                except PermissionError:
                    if i:  # one we created: ours to read
                        raise
                    # the first existing directory above: we may write but not read it
                    log.warning(
                        "flashckpt: cannot fsync %s (no read permission); %s may not survive a power loss",
                        p.parent,
                        p,
                    )
        with self._lock:
            self._made.add(self.root)

    def prune(self, d: Path) -> None:
        while d != self.root and d.is_relative_to(self.root):
            try:
                d.rmdir()
            except OSError:
                return
            with self._lock:
                self._made.discard(d)
            d = d.parent

    def forget_below(self, path: Path) -> None:
        """``path`` and everything below it is being deleted: nothing there counts as made."""
        with self._lock:
            self._made = {d for d in self._made if not d.is_relative_to(path)}


class FileWriter:
    """Writes a new file whole (``O_EXCL | O_NOFOLLOW``), then fsyncs it when ``fsync``.
    Large aligned pieces go through a second, ``O_DIRECT`` descriptor in ``piece``-byte
    writes when the file system supports it (found out on first use)."""

    def __init__(self, *, fsync: bool, direct: bool, file_mode: int, piece: int) -> None:
        self._fsync = fsync
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._file_mode = file_mode
        self._piece = max(ALIGN, piece - piece % ALIGN)

    def write(self, path: Path, parts: list[memoryview]) -> None:
        # O_EXCL never opens an existing name, link or not; O_NOFOLLOW says so twice
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, self._file_mode)
        try:
            pos = 0
            for part in parts:
                pos = self._part(fd, path, part, pos)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _part(self, fd: int, path: Path, part: memoryview, pos: int) -> int:
        n = part.nbytes
        aligned = n - n % ALIGN
        addr = address(part) if self._direct and aligned >= (1 << 20) and pos % ALIGN == 0 else None
        if addr is not None and addr % ALIGN == 0:
            dfd = self._open_direct(path, fd)
            if dfd is not None:
                try:
                    done = 0
                    while done < aligned:
                        step = min(self._piece, aligned - done)
                        done += os.pwrite(dfd, part[done : done + step], pos + done)
                finally:
                    os.close(dfd)
                part = part[aligned:]
                pos += aligned
        view = part
        while len(view):
            w = os.pwrite(fd, view, pos)
            view = view[w:]
            pos += w
        return pos

    def _open_direct(self, path: Path, fd: int) -> int | None:
        """A second, ``O_DIRECT`` descriptor of the temporary file open as ``fd``, reopened by
        name: refused unless it is the same file (nobody swapped the name meanwhile)."""
        try:
            dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # tmpfs and some FUSE mounts have no O_DIRECT
                self._direct = False
                return None
            raise
        a, b = os.fstat(fd), os.fstat(dfd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            os.close(dfd)
            raise StorageError(errno.EIO, f"{path} was replaced while it was being written")
        return dfd


def fsync_dir(d: Path) -> None:
    """Make ``d``'s entries durable."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_temps(root: Path, max_age_s: float) -> int:
    """Delete the temporary files of puts that never finished: those of a process of this
    host that is gone, and any older than ``max_age_s`` (a writer on another host, whose
    liveness cannot be checked from here).  Any thread; returns how many were
    deleted (see ``LocalBackend.sweep_temps``).

    Only flashckpt's key space is walked (``commits/``, ``steps/``, ``chunks/``), and only
    regular files named exactly ``<valid key>.tmp-<host>-<pid>-<counter>`` (the names
    ``put`` makes) are deleted: anything else a user keeps under the root is never
    touched, whatever its name."""
    now, deleted = time.time(), 0
    for top in KEY_SPACE:
        for dirpath, _dirs, files in os.walk(root / top):
            rel = Path(dirpath).relative_to(root).as_posix()
            for name in files:
                m = TMP_NAME.fullmatch(name)
                if m is None:
                    continue
                try:
                    check_key(f"{rel}/{m['name']}")
                except ValueError:
                    continue
                path = Path(dirpath) / name
                mine = m["host"] == HOST
                gone = mine and not alive(int(m["pid"]))
                try:
                    st = path.lstat()
                except FileNotFoundError:  # renamed into place meanwhile
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if gone or now - st.st_mtime > max_age_s:
                    unlink_quiet(path)
                    deleted += 1
    return deleted


def alive(pid: int) -> bool:
    """A process with this id exists on this host (a reused id counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
