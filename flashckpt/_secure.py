"""Private directories and files: the memory tier is the user's alone.

The memory tier lives at a predictable place (``/dev/shm/flashckpt-<uid>``) in a directory
every local user can write to.  A user who gets there first, or who can write to any
directory on the way, could otherwise plant a symbolic link where a slot goes (and make us
overwrite any file we can write), read every snapshot, or hand us a snapshot of their own.
So nothing on the way is used as found:

- :func:`private_dir` creates each missing directory with ``mkdir(0o700)`` (never
  ``exist_ok``: a name that appears meanwhile is checked like any existing one) and checks
  every component from the file system root down with ``lstat``.  Below ``trusted_above``
  every component must be a real directory (not a symbolic link) owned by the effective uid,
  with no group or other access (read or execute bits are removed; write bits are refused,
  since someone may already have planted something).  ``trusted_above`` and the directories
  above it need not be private but must be *safe*: owned by root or by us, and writable by
  others only with the sticky bit (``/dev/shm``, ``/tmp``), so that nobody else can rename
  or replace an entry of ours in them.
- :func:`open_private` opens a file inside such a directory with ``O_NOFOLLOW | O_CLOEXEC``
  (``O_EXCL`` when it creates), mode 0600, and refuses anything but a regular file of ours.

Every problem is a :class:`~flashckpt.errors.ConfigError` that names the path and what is
wrong with it.  Pure functions of the file system; any thread may call them.  This module
depends on :mod:`flashckpt.errors` only (the backends use it too).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from flashckpt.errors import ConfigError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600

_HINT = "remove it, or choose another memory_dir (FLASHCKPT_MEMORY_DIR)"


def private_dir(path: str | os.PathLike[str], *, trusted_above: str | os.PathLike[str] | None = None) -> Path:
    """Make ``path`` a directory that only the effective user can use, and return it.

    ``trusted_above`` (default: the parent of ``path``) is the highest directory that need
    not be private; it must be an ancestor of ``path``.  It and its ancestors must be safe
    (see the module docstring); every component below it, down to ``path``, must be private:
    a real directory (never a symbolic link) owned by the effective uid, without group or
    other write permission.  Group and other read/execute bits of such a directory are
    removed (a directory created by an older version or by hand with 0755).  Missing
    components are created 0700, one at a time.

    Returns the absolute path to use from now on: symbolic links in the safe part (e.g. a
    ``/dev/shm`` that links to ``/run/shm``) are resolved, so nothing in the returned path
    is a link.  Raises :class:`ConfigError` naming the offending path.
    """
    want = Path(os.path.abspath(path))
    top = want.parent if trusted_above is None else Path(os.path.abspath(trusted_above))
    if top not in want.parents:
        raise ConfigError(f"{top} is not a directory above {want}")
    base = top  # the nearest existing directory at or above ``top``: the walk starts there
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    real = Path(os.path.realpath(base))
    _check_safe_chain(real)
    private_from = len(top.relative_to(base).parts)  # components of the walk that are below top
    cur = real
    for i, name in enumerate(want.relative_to(base).parts):
        cur = cur / name
        created = _mkdir(cur)
        if i >= private_from:
            _check_private_dir(cur, created)
        else:
            _check_safe(cur, os.lstat(cur))
    return cur


def check_private_dir(path: str | os.PathLike[str]) -> None:
    """Check, without creating anything, that ``path`` is a private directory as
    :func:`private_dir` makes them (a real directory of ours, no access for others: read and
    execute bits are removed, write bits refused).  For directories found by listing a
    private one (a sibling rank's directory, a mirror) before they are used.  Raises
    :class:`ConfigError` naming ``path`` (also when it does not exist).  Any thread."""
    _check_private_dir(Path(os.path.abspath(path)), False)


def open_private(
    path: str | os.PathLike[str],
    *,
    write: bool = False,
    create: bool = False,
    exclusive: bool = False,
    dir_fd: int | None = None,
) -> int:
    """Open a file in a private directory and return its descriptor (the caller closes it).

    - ``write``: open for reading and writing (else read only).
    - ``create``: create the file (mode 0600) if it is missing; an existing one is opened.
    - ``exclusive``: the file must not exist yet (``FileExistsError`` otherwise).
    - ``dir_fd``: ``path`` is relative to this open directory (as for :func:`os.open`).

    The last component is never followed if it is a symbolic link, a FIFO is never waited
    on, and the file must be a regular file owned by the effective uid: anything else is a
    :class:`ConfigError` naming ``path``.  Group and other permission bits of an existing file
    are removed.  A missing file (without ``create``) raises ``FileNotFoundError``; other
    ``OSError`` are raised as they come.  Any thread.
    """
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    # O_NONBLOCK: opening a FIFO planted in place of the file must not wait for a writer;
    # it has no effect on regular files, and it is cleared again below.
    flags |= os.O_NONBLOCK
    for _ in range(8):  # a file removed between the failed create and the open: create again
        created = False
        try:
            if create or exclusive:
                # (ENOENT here: the directory is missing; the caller's to handle)
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE, dir_fd=dir_fd)
                    created = True
                except FileExistsError:
                    if exclusive:
                        raise
                    try:
                        fd = os.open(path, flags, dir_fd=dir_fd)
                    except FileNotFoundError:
                        continue  # removed since the create failed: create it again
            else:
                fd = os.open(path, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"{path} is a symbolic link; refusing to follow it") from None
            if isinstance(exc, FileExistsError):
                raise  # ``exclusive``: the caller's to handle
            # EISDIR, ENXIO (a socket), EACCES (another user's file): say what is there
            try:
                st = os.lstat(path, dir_fd=dir_fd)
            except OSError:
                raise exc from None
            _check_file_stat(st, path)
            raise
        try:
            _check_private_file(fd, path, created)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise ConfigError(f"{path} keeps disappearing while it is being created")


def check_private_file(fd: int, path: str | os.PathLike[str]) -> os.stat_result:
    """Check an open descriptor as :func:`open_private` does (regular file, ours, mode
    tightened to owner only) and return its ``fstat``.  For callers that open a file
    themselves (the staging slots, with ``O_NOFOLLOW``).  Any thread."""
    return _check_private_file(fd, path, False)


# -- helpers ------------------------------------------------------------------------------


def _mkdir(path: Path) -> bool:
    """Create ``path`` 0700; False if something already has that name (it is then checked
    by the caller like any existing component: no ``exist_ok`` trust)."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot create the directory {path}: {exc.strerror or exc}") from exc
    return True


def _check_safe_chain(real: Path) -> None:
    """Every directory from ``/`` down to ``real`` (a resolved path) must be safe."""
    for p in [*reversed(real.parents), real]:
        try:
            st = os.lstat(p)
        except OSError as exc:
            raise ConfigError(f"cannot inspect {p}: {exc.strerror or exc}") from exc
        _check_safe(p, st)


def _check_safe(path: Path, st: os.stat_result) -> None:
    """A directory above the private part: nobody but root and us may replace its entries."""
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{path} is a symbolic link (it changed while it was checked); {_HINT}")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory")
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, neither root nor this process (uid {euid})")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{path} is writable by group or others without the sticky bit "
            f"(mode {stat.S_IMODE(st.st_mode):#o}): anyone could replace what lies below it"
        )


def _check_private_dir(path: Path, created: bool) -> None:
    """A directory of the private part: a real directory of ours, owner access only."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot inspect {path}: {exc.strerror or exc}") from exc
    euid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{path} is a symbolic link, not a private directory; {_HINT}")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory; {_HINT}")
    if st.st_uid != euid:
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by this process (uid {euid}); {_HINT}")
    if mode & 0o022:
        # someone else may already have put a link or a snapshot of theirs inside
        raise ConfigError(f"{path} is writable by group or others (mode {mode:#o}); {_HINT}")
    if mode != DIR_MODE:
        # Ours, and nobody else could write into it: only its names (and our 0600 files'
        # existence) were visible.  A path chmod is safe here: the parent is private or
        # safe, so no one else can swap this entry between the lstat and the chmod.
        os.chmod(path, DIR_MODE)
        if not created:
            log.warning("flashckpt: %s had mode %#o; made it private (0700)", path, mode)


def _check_private_file(fd: int, path: str | os.PathLike[str], created: bool) -> os.stat_result:
    st = os.fstat(fd)
    if created:
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
        return os.fstat(fd)
    _check_file_stat(st, path)
    return st


def _check_file_stat(st: os.stat_result, path: str | os.PathLike[str]) -> None:
    """An existing memory-tier file must be a regular file of ours, with one name, that
    nobody else could read or write.  Unlike a directory, a file found with group or other
    bits is refused, not fixed: its bytes (a snapshot) may have been read or changed, and
    it is left as found for its owner to look at."""
    euid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{path} is a symbolic link; refusing to follow it")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file; {_HINT}")
    if st.st_uid != euid:
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by this process (uid {euid}); {_HINT}")
    if mode & 0o077:
        raise ConfigError(
            f"{path} has mode {mode:04o}: a memory-tier file must be private to its owner (0600); {_HINT}"
        )
    if st.st_nlink != 1:
        raise ConfigError(f"{path} has {st.st_nlink} hard links; refusing to use it as a memory-tier file")


__all__ = ["DIR_MODE", "FILE_MODE", "check_private_dir", "check_private_file", "open_private", "private_dir"]
