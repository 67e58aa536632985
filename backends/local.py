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
import errno
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from flashckpt import _hooks as hooks
from flashckpt._secure import open_private
from flashckpt.backends._files import (
    Dirs,
    FileWriter,
    fsync_dir,
    is_temp,
    sweep_temps,
    temp_name,
    unlink_quiet,
)
from flashckpt.errors import ConfigError, ObjectNotFound, StoragePermissionError
from flashckpt.storage.protocol import Buffer, Capabilities, check_key, check_range, translate_os_error

log = logging.getLogger(__name__)

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
        self._private = private
        self._caps = Capabilities(exclusive_create=True, durable=durable)
        self._dirs = Dirs(self.root, fsync=fsync, private=private, dir_mode=0o700 if private else 0o777)
        self._writer = FileWriter(
            fsync=fsync, direct=direct_io, file_mode=0o600 if private else 0o666, piece=direct_write_bytes
        )

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
        tmp = temp_name(path)
        what = f"put {key} on {self.url}"
        try:
            self._dirs.make(path.parent)
            # Order that makes the object durable (when fsync): data, then the name, then
            # the directory entry; new directories were fsynced in their parents above.
            self._writer.write(tmp, [p.cast("B") if p.format != "B" else p for p in parts])
            if exclusive:
                os.link(tmp, path)  # fails with EEXIST atomically; the rename path cannot
                os.unlink(tmp)
            else:
                os.replace(tmp, path)  # replaces a link planted at ``path``; never follows it
            if self._fsync:
                fsync_dir(path.parent)
        except FileExistsError:
            unlink_quiet(tmp)
            raise
        except ConfigError as exc:
            raise _refused(exc, what) from exc
        except OSError as exc:
            unlink_quiet(tmp)
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
        return self._stat(key, f"head {key} on {self.url}").st_size

    def modified(self, key: str) -> float:
        return self._stat(key, f"modified time of {key} on {self.url}").st_mtime

    def _stat(self, key: str, what: str) -> os.stat_result:
        """``key``'s metadata (a private tier: of the file opened as a read would open it)."""
        try:
            if not self._private:
                return os.stat(self.path_of(key))
            fd = self._open_read(key)
            try:
                return os.fstat(fd)
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
                    if is_temp(name):
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
        return sweep_temps(self.root, max_age_s)

    def children(self, prefix: str) -> builtins.list[str]:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"children needs a prefix ending in '/', got {prefix!r}")
        base = self.path_of(prefix.rstrip("/")) if prefix else self.root
        try:
            with os.scandir(base) as it:
                names = [
                    e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
                    for e in it
                    if not is_temp(e.name)
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
        self._dirs.prune(path.parent)

    @hooks.timed("time.backend.delete_prefix")
    def delete_prefix(self, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"delete_prefix needs a prefix ending in '/', got {prefix!r}")
        path = self.path_of(prefix.rstrip("/"))
        self._dirs.forget_below(path)
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise translate_os_error(exc, f"delete {prefix} on {self.url}") from exc
        self._dirs.prune(path.parent)

    def close(self) -> None:
        pass

    # -- helpers ----------------------------------------------------------------------------
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


__all__ = ["LocalBackend", "ObjectNotFound"]
