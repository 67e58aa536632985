"""POSIX tier: a local NVMe directory, a parallel file system mount, or ``/dev/shm``.

Objects are files under ``root``; a ``put`` writes a temporary file beside the target
(``<name>.tmp-<host>-<pid>-<n>``), fsyncs it (when ``fsync``), renames it into place and
fsyncs the directory, so readers see the old object or the whole new one.  Listings skip
temporary files; :meth:`LocalBackend.sweep_temps` removes those a killed writer left.  Large
aligned buffers are written with ``O_DIRECT`` in ``direct_write_bytes`` pieces (4 MiB measured
fastest here) when the file system supports it; the unaligned tail goes through the page
cache.  Everything here is thread-safe: concurrent puts of different keys run in parallel (the
transfer layer bounds how many).
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path

from flashckpt.backends._base import Buffer, Capabilities, check_key, translate_os_error
from flashckpt.errors import ObjectNotFound

_ALIGN = 4096
_TMP_MARK = ".tmp-"
_counter = count()
_HOST = socket.gethostname() or "localhost"


def _address(mv: memoryview) -> int | None:
    """Address of a writable contiguous buffer, or None when it cannot be known cheaply."""
    if mv.readonly or not mv.c_contiguous or mv.nbytes == 0:
        return None
    holder = ctypes.c_char.from_buffer(mv)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


class LocalBackend:
    """A directory as a key -> bytes store.  See the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        direct_io: bool = True,
        private: bool = False,
        durable: bool = True,
        direct_write_bytes: int = 4 << 20,
    ) -> None:
        self.root = Path(root).absolute()
        self._fsync = fsync
        self._direct = direct_io and hasattr(os, "O_DIRECT")
        self._dir_mode = 0o700 if private else 0o777
        self._file_mode = 0o600 if private else 0o666
        self._piece = max(_ALIGN, direct_write_bytes - direct_write_bytes % _ALIGN)
        self._caps = Capabilities(exclusive_create=True, durable=durable)
        self._made_dirs: set[Path] = set()
        self._lock = threading.Lock()

    # -- protocol ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"file://{self.root}"

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def path_of(self, key: str) -> Path:
        """The file that holds ``key`` (the key is validated first)."""
        return self.root / check_key(key)

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        path = self.path_of(key)
        parts = (
            [memoryview(data)]
            if isinstance(data, (bytes, bytearray, memoryview))
            else [memoryview(d) for d in data]
        )
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{_HOST}-{os.getpid()}-{next(_counter)}")
        try:
            self._mkdirs(path.parent)
            self._write_file(tmp, [p.cast("B") if p.format != "B" else p for p in parts])
            if exclusive:
                os.link(tmp, path)  # fails with EEXIST atomically; the rename path cannot
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
            if self._fsync:
                self._fsync_dir(path.parent)
        except FileExistsError:
            _unlink_quiet(tmp)
            raise
        except OSError as exc:
            _unlink_quiet(tmp)
            raise translate_os_error(exc, f"put {key} on {self.url}") from exc

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        path = self.path_of(key)
        try:
            with open(path, "rb", buffering=0) as f:
                if length is None:
                    length = max(0, os.fstat(f.fileno()).st_size - offset)
                return os.pread(f.fileno(), length, offset) if length else b""
        except OSError as exc:
            raise translate_os_error(exc, f"get {key} from {self.url}") from exc

    def get_into(self, key: str, buf: memoryview, *, offset: int = 0) -> int:
        path = self.path_of(key)
        view = buf.cast("B") if buf.format != "B" else buf
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                done = 0
                while done < len(view):
                    n = os.preadv(fd, [view[done : done + (64 << 20)]], offset + done)
                    if n == 0:
                        break
                    done += n
                return done
            finally:
                os.close(fd)
        except OSError as exc:
            raise translate_os_error(exc, f"get {key} from {self.url}") from exc

    def head(self, key: str) -> int:
        try:
            return os.stat(self.path_of(key)).st_size
        except OSError as exc:
            raise translate_os_error(exc, f"head {key} on {self.url}") from exc

    def list(self, prefix: str = "") -> builtins.list[str]:
        base = self.root
        if "/" in prefix:
            base = self.root / prefix.rsplit("/", 1)[0]
        out: builtins.list[str] = []
        if not base.is_dir():
            return out
        try:
            for dirpath, _dirs, files in os.walk(base):
                rel = os.path.relpath(dirpath, self.root)
                for name in files:
                    if _TMP_MARK in name:
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        out.append(key.replace(os.sep, "/"))
        except OSError as exc:
            raise translate_os_error(exc, f"list {prefix!r} on {self.url}") from exc
        return sorted(out)

    def sweep_temps(self, max_age_s: float) -> int:
        """Delete the temporary files of puts that never finished: those of a process of this
        host that is gone, and any older than ``max_age_s`` (a writer on another host, whose
        liveness cannot be checked from here).  Any thread; returns how many were deleted."""
        now, deleted = time.time(), 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                at = name.find(_TMP_MARK)
                if at < 0:
                    continue
                path = Path(dirpath) / name
                owner = name[at + len(_TMP_MARK) :].rsplit("-", 2)
                mine = len(owner) == 3 and owner[0] == _HOST and owner[1].isdigit()
                gone = mine and not _alive(int(owner[1]))
                try:
                    old = now - path.lstat().st_mtime > max_age_s
                except FileNotFoundError:  # renamed into place meanwhile
                    continue
                if gone or old:
                    _unlink_quiet(path)
                    deleted += 1
        return deleted

    def children(self, prefix: str) -> builtins.list[str]:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"children needs a prefix ending in '/', got {prefix!r}")
        base = self.path_of(prefix.rstrip("/")) if prefix else self.root
        try:
            with os.scandir(base) as it:
                names = [
                    e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
                    for e in it
                    if _TMP_MARK not in e.name
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise translate_os_error(exc, f"list {prefix!r} on {self.url}") from exc
        return sorted(names)

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise translate_os_error(exc, f"delete {key} on {self.url}") from exc
        self._prune_dirs(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"delete_prefix needs a prefix ending in '/', got {prefix!r}")
        path = self.path_of(prefix.rstrip("/"))
        with self._lock:
            self._made_dirs = {d for d in self._made_dirs if not d.is_relative_to(path)}
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise translate_os_error(exc, f"delete {prefix} on {self.url}") from exc
        self._prune_dirs(path.parent)

    def close(self) -> None:
        pass

    # -- helpers ----------------------------------------------------------------------------
    def _mkdirs(self, d: Path) -> None:
        if d in self._made_dirs and d.is_dir():
            return
        d.mkdir(parents=True, exist_ok=True, mode=self._dir_mode)
        with self._lock:
            self._made_dirs.add(d)

    def _prune_dirs(self, d: Path) -> None:
        while d != self.root and d.is_relative_to(self.root):
            try:
                d.rmdir()
            except OSError:
                return
            with self._lock:
                self._made_dirs.discard(d)
            d = d.parent

    def _fsync_dir(self, d: Path) -> None:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_file(self, path: Path, parts: builtins.list[memoryview]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, self._file_mode)
        try:
            pos = 0
            for part in parts:
                pos = self._write_part(fd, path, part, pos)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _write_part(self, fd: int, path: Path, part: memoryview, pos: int) -> int:
        n = part.nbytes
        aligned = n - n % _ALIGN
        addr = _address(part) if self._direct and aligned >= (1 << 20) and pos % _ALIGN == 0 else None
        if addr is not None and addr % _ALIGN == 0:
            dfd = self._open_direct(path)
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

    def _open_direct(self, path: Path) -> int | None:
        try:
            return os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # tmpfs and some FUSE mounts have no O_DIRECT
                self._direct = False
                return None
            raise


def _alive(pid: int) -> bool:
    """A process with this id exists on this host (a reused id counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


__all__ = ["LocalBackend", "ObjectNotFound"]
