"""POSIX tier: a local NVMe directory, a parallel file system mount, or ``/dev/shm``.

Objects are files under ``root``; a ``put`` writes a temporary file beside the target
(``<name>.tmp-<host>-<pid>-<n>``), fsyncs it (when ``fsync``), renames it into place and
fsyncs the directory, so readers see the old object or the whole new one.  A directory the
put needs is fsynced in its parent before the put returns (each directory once per backend,
also one a killed writer created), so a power loss cannot drop a committed object's
directory entry.  Listings skip temporary files; :meth:`LocalBackend.sweep_temps` removes
those a killed writer left, in flashckpt's key space only.  Large aligned buffers are written
with ``O_DIRECT`` in ``direct_write_bytes`` pieces (4 MiB measured fastest here) when the file
system supports it; the unaligned tail goes through the page cache.  Everything here is
thread-safe: concurrent puts of different keys run in parallel (the transfer layer bounds
how many).

``private=True`` (the memory tier in ``/dev/shm``): directories are created 0700 and checked
(:func:`flashckpt._secure.private_dir`: real directories of ours, nobody else's access), files
0600, and reads never follow a symbolic link below ``root`` (each directory is opened with
``O_NOFOLLOW``, the file with :func:`flashckpt._secure.open_private`); a link planted where an
object goes is refused with :class:`~flashckpt.errors.StoragePermissionError`, never followed.
Writes never follow one either: the temporary file is created ``O_EXCL | O_NOFOLLOW`` and
renamed over whatever has the name.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Sequence
from itertools import count
from pathlib import Path

from flashckpt import _hooks as hooks
from flashckpt._secure import open_private, private_dir
from flashckpt.errors import ConfigError, ObjectNotFound, StorageError, StoragePermissionError
from flashckpt.storage.protocol import Buffer, Capabilities, check_key, check_range, translate_os_error

log = logging.getLogger(__name__)

_ALIGN = 4096
_TMP_MARK = ".tmp-"
_counter = count()
#: This host in temporary names: characters a key may hold, so the sweeper can parse them.
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
#: Exactly the temporary names ``put`` creates: ``<name>.tmp-<host>-<pid>-<counter>``.
_TMP_NAME = re.compile(r"(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>[0-9]+)-(?P<n>[0-9]+)")
#: The only directories flashckpt writes to on a POSIX tier (commit records, manifests,
#: chunks; see docs/format.md): the sweeper never looks anywhere else.
_KEY_SPACE = ("commits", "steps", "chunks")
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _is_temp(name: str) -> bool:
    return _TMP_NAME.fullmatch(name) is not None


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
        """Any thread; touches nothing on disk yet.  An empty ``root`` is refused: it would
        mean the current directory."""
        if not os.fspath(root).strip():
            raise ConfigError("an empty path is not a storage location (it would mean the current directory)")
        self.root = Path(root).absolute()
        self._fsync = fsync
        self._direct = direct_io and hasattr(os, "O_DIRECT")
        self._private = private
        self._dir_mode = 0o700 if private else 0o777
        self._file_mode = 0o600 if private else 0o666
        self._piece = max(_ALIGN, direct_write_bytes - direct_write_bytes % _ALIGN)
        self._caps = Capabilities(exclusive_create=True, durable=durable)
        #: directories known to exist with their entry durable in the parent (when fsync)
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

    @hooks.timed("time.backend.put", lambda self, key, *a, **k: {"key": key})
    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        path = self.path_of(key)
        parts = (
            [memoryview(data)]
            if isinstance(data, (bytes, bytearray, memoryview))
            else [memoryview(d) for d in data]
        )
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{_HOST}-{os.getpid()}-{next(_counter)}")
        what = f"put {key} on {self.url}"
        try:
            self._mkdirs(path.parent)
            # Order that makes the object durable (when fsync): data, then the name, then
            # the directory entry; new directories were fsynced in their parents above.
            self._write_file(tmp, [p.cast("B") if p.format != "B" else p for p in parts])
            if exclusive:
                os.link(tmp, path)  # fails with EEXIST atomically; the rename path cannot
                os.unlink(tmp)
            else:
                os.replace(tmp, path)  # replaces a link planted at ``path``; never follows it
            if self._fsync:
                self._fsync_dir(path.parent)
        except FileExistsError:
            _unlink_quiet(tmp)
            raise
        except ConfigError as exc:
            raise _refused(exc, what) from exc
        except OSError as exc:
            _unlink_quiet(tmp)
            raise translate_os_error(exc, what) from exc

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """At most ``length`` bytes from ``offset`` (the rest of the object when ``None``).
        Never allocates more than the object holds: callers bound a record's size by asking
        for ``limit + 1`` bytes."""
        check_range(offset, length)
        what = f"get {key} from {self.url}"
        try:
            fd = self._open_read(key)
            try:
                avail = max(0, os.fstat(fd).st_size - offset)
                return _pread_all(fd, avail if length is None else min(length, avail), offset)
            finally:
                os.close(fd)
        except ConfigError as exc:
            raise _refused(exc, what) from exc
        except OSError as exc:
            raise translate_os_error(exc, what) from exc

    def get_into(self, key: str, buf: memoryview, *, offset: int = 0) -> int:
        check_range(offset, None)
        view = buf.cast("B") if buf.format != "B" else buf
        what = f"get {key} from {self.url}"
        try:
            fd = self._open_read(key)
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
        except ConfigError as exc:
            raise _refused(exc, what) from exc
        except OSError as exc:
            raise translate_os_error(exc, what) from exc

    def head(self, key: str) -> int:
        what = f"head {key} on {self.url}"
        try:
            if not self._private:
                return os.stat(self.path_of(key)).st_size
            fd = self._open_read(key)
            try:
                return os.fstat(fd).st_size
            finally:
                os.close(fd)
        except ConfigError as exc:
            raise _refused(exc, what) from exc
        except OSError as exc:
            raise translate_os_error(exc, what) from exc

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
                    if _is_temp(name):
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
        liveness cannot be checked from here).  Any thread; returns how many were deleted.

        Only flashckpt's key space is walked (``commits/``, ``steps/``, ``chunks/``), and only
        regular files named exactly ``<valid key>.tmp-<host>-<pid>-<counter>`` (the names
        ``put`` makes) are deleted: anything else a user keeps under the root is never
        touched, whatever its name."""
        now, deleted = time.time(), 0
        for top in _KEY_SPACE:
            for dirpath, _dirs, files in os.walk(self.root / top):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                for name in files:
                    m = _TMP_NAME.fullmatch(name)
                    if m is None:
                        continue
                    try:
                        check_key(f"{rel}/{m['name']}")
                    except ValueError:
                        continue
                    path = Path(dirpath) / name
                    mine = m["host"] == _HOST
                    gone = mine and not _alive(int(m["pid"]))
                    try:
                        st = path.lstat()
                    except FileNotFoundError:  # renamed into place meanwhile
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if gone or now - st.st_mtime > max_age_s:
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
                    if not _is_temp(e.name)
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

    @hooks.timed("time.backend.delete_prefix")
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
        """Make ``d`` (the root or a directory below it) exist, and (when fsync) durable.

        Each directory from the root down that this backend has not made yet is created if
        missing and then fsynced in its parent, even if it existed: a writer killed after
        its mkdir may never have made the entry durable.  Only then does it count as made,
        so a concurrent put that finds it already there still fsyncs it before returning.
        Private: every component is created 0700 and checked (raises ``ConfigError``)."""
        if d in self._made_dirs and d.is_dir():
            return
        if self.root not in self._made_dirs or not self.root.is_dir():
            self._make_root()
        if d == self.root:
            return
        if self._private:
            private_dir(d, trusted_above=self.root)
        cur = self.root
        for name in d.relative_to(self.root).parts:
            cur = cur / name
            if cur in self._made_dirs and cur.is_dir():
                continue
            if not self._private:
                try:
                    os.mkdir(cur, self._dir_mode)
                except FileExistsError:
                    pass
            if self._fsync:
                self._fsync_dir(cur.parent)
            with self._lock:
                self._made_dirs.add(cur)

    def _make_root(self) -> None:
        """Create the root and any missing directory above it, each fsynced in its parent
        (when fsync).  A root that already existed is the user's and is taken as it is."""
        created: builtins.list[Path] = []
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
                    self._fsync_dir(p.parent)
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
            self._made_dirs.add(self.root)

    def _open_read(self, key: str) -> int:
        """An fd for reading ``key``.  Private: no symbolic link below the root is followed
        (``ConfigError`` / ``ELOOP``), and the file must be a regular file of ours."""
        path = self.path_of(key)
        if not self._private:
            return os.open(path, _READ_FLAGS)
        *dirs, name = key.split("/")
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in dirs:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
                except OSError as exc:
                    # a link to a directory fails O_DIRECTORY | O_NOFOLLOW with ENOTDIR or ELOOP
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and stat.S_ISLNK(
                        os.stat(part, dir_fd=dfd, follow_symlinks=False).st_mode
                    ):
                        raise ConfigError(f"{path}: {part} is a symbolic link; not followed") from None
                    raise
                os.close(dfd)
                dfd = nfd
            return open_private(name, dir_fd=dfd)
        finally:
            os.close(dfd)

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
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_file(self, path: Path, parts: builtins.list[memoryview]) -> None:
        # O_EXCL never opens an existing name, link or not; O_NOFOLLOW says so twice
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
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


def _alive(pid: int) -> bool:
    """A process with this id exists on this host (a reused id counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes from ``offset`` (fewer at the end of the file), however many reads it takes
    (one ``pread`` returns at most about 2 GiB)."""
    if n <= 0:
        return b""
    first = os.pread(fd, n, offset)
    if len(first) == n or not first:
        return first
    pieces, got = [first], len(first)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


def _refused(exc: ConfigError, what: str) -> StoragePermissionError:
    """A private tier's unsafe path (a planted link, a file of another owner) as the
    backend's typed error: not retryable, and the message names what was refused."""
    return StoragePermissionError(errno.EPERM, f"{what}: {exc}")


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


__all__ = ["LocalBackend", "ObjectNotFound"]
