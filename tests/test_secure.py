"""The memory tier is the user's alone: private directories and files (flashckpt/_secure.py).

The attacker is another local user.  This machine runs the tests as root, so "another
owner" is made with ``os.chown(path, 65534, 65534)``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from flashckpt._secure import check_private_dir, check_private_file, open_private, private_dir
from flashckpt.errors import ConfigError

OTHER = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making files of another owner needs root")


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _refused(path: Path, what: str, **kw: Path) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        private_dir(path, **kw)  # type: ignore[arg-type]
    assert what in str(ei.value)
    return ei.value


def test_missing_components_are_created_private(shm_dir: Path) -> None:
    target = shm_dir / "job" / "r00000-of-00001"
    got = private_dir(target, trusted_above=shm_dir.parent)
    assert got == target
    for p in (shm_dir, shm_dir / "job", target):
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and _mode(p) == 0o700, p
    assert private_dir(target, trusted_above=shm_dir.parent) == target  # idempotent


def test_default_trust_is_the_parent(shm_dir: Path) -> None:
    shm_dir.mkdir(mode=0o700)
    os.chmod(shm_dir, 0o755)  # the parent: safe is enough (ours, nobody else can write)
    private_dir(shm_dir / "d")
    assert _mode(shm_dir / "d") == 0o700 and _mode(shm_dir) == 0o755


@as_root
def test_a_root_of_another_owner_is_refused(shm_dir: Path) -> None:
    shm_dir.mkdir(mode=0o700)
    os.chown(shm_dir, OTHER, OTHER)
    err = _refused(shm_dir / "job", f"owned by uid {OTHER}", trusted_above=shm_dir.parent)
    assert str(shm_dir) in str(err)
    assert list(shm_dir.iterdir()) == []  # nothing was created inside it


def test_a_world_writable_root_of_ours_is_refused(shm_dir: Path) -> None:
    shm_dir.mkdir()
    os.chmod(shm_dir, 0o777)
    err = _refused(shm_dir / "job", "writable by group or others", trusted_above=shm_dir.parent)
    assert str(shm_dir) in str(err) and "0o777" in str(err)
    os.chmod(shm_dir, 0o720)
    _refused(shm_dir / "job", "writable by group or others", trusted_above=shm_dir.parent)
    assert list(shm_dir.iterdir()) == []


def test_a_symlinked_root_is_refused_and_never_followed(shm_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    shm_dir.symlink_to(victim)
    try:
        err = _refused(shm_dir / "job", "symbolic link", trusted_above=shm_dir.parent)
        assert str(shm_dir) in str(err)
        assert list(victim.iterdir()) == []
    finally:
        os.unlink(shm_dir)  # the fixture's rmtree does not remove a link


def test_a_symlink_or_file_further_down_is_refused(shm_dir: Path, tmp_path: Path) -> None:
    private_dir(shm_dir / "job", trusted_above=shm_dir.parent)
    (shm_dir / "job" / "r00000-of-00001").symlink_to(tmp_path)
    err = _refused(shm_dir / "job" / "r00000-of-00001", "symbolic link", trusted_above=shm_dir.parent)
    assert str(shm_dir / "job" / "r00000-of-00001") in str(err)
    (shm_dir / "job" / "file").write_bytes(b"x")
    err = _refused(shm_dir / "job" / "file" / "x", "not a directory", trusted_above=shm_dir.parent)
    assert str(shm_dir / "job" / "file") in str(err)


@as_root
def test_a_component_of_another_owner_further_down_is_refused(shm_dir: Path) -> None:
    private_dir(shm_dir / "job", trusted_above=shm_dir.parent)
    os.chown(shm_dir / "job", OTHER, OTHER)
    err = _refused(shm_dir / "job" / "r0", f"owned by uid {OTHER}", trusted_above=shm_dir.parent)
    assert str(shm_dir / "job") in str(err)


def test_readable_directories_of_ours_are_made_private(
    shm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 0755 directory of ours (an older version made the parents so): nobody else could
    write into it, so it is kept and closed to others."""
    (shm_dir / "job").mkdir(parents=True)
    os.chmod(shm_dir, 0o755)
    os.chmod(shm_dir / "job", 0o750)
    (shm_dir / "job" / "keep").write_bytes(b"snapshot")
    with caplog.at_level(logging.WARNING):
        private_dir(shm_dir / "job" / "r0", trusted_above=shm_dir.parent)
    assert _mode(shm_dir) == _mode(shm_dir / "job") == 0o700
    assert (shm_dir / "job" / "keep").read_bytes() == b"snapshot"
    assert str(shm_dir) in caplog.text


@as_root
def test_unsafe_directories_above_the_private_part_are_refused(tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    os.chmod(top, 0o777)  # writable by all, no sticky bit: anyone can swap our directory
    err = _refused(top / "mem" / "r0", "without the sticky bit", trusted_above=top)
    assert str(top) in str(err)
    os.chmod(top, 0o1777)  # sticky, like /dev/shm and /tmp: fine
    assert private_dir(top / "mem" / "r0", trusted_above=top) == top / "mem" / "r0"
    os.chown(top, OTHER, OTHER)  # but only if root or we own it
    err = _refused(top / "mem" / "r0", f"owned by uid {OTHER}", trusted_above=top)
    assert str(top) in str(err)


def test_symlinks_in_the_trusted_part_are_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    got = private_dir(tmp_path / "link" / "mem", trusted_above=tmp_path / "link")
    assert got == real / "mem" and _mode(got) == 0o700
    assert os.path.realpath(got) == str(got)  # nothing in the returned path is a link


def test_trusted_above_must_be_above(tmp_path: Path) -> None:
    for bad in (tmp_path / "a", tmp_path / "b"):
        with pytest.raises(ConfigError, match="not a directory above"):
            private_dir(tmp_path / "a", trusted_above=bad)


def test_missing_trusted_parents_are_created(shm_dir: Path) -> None:
    got = private_dir(shm_dir / "x" / "mem", trusted_above=shm_dir / "x")
    assert got == shm_dir / "x" / "mem"
    assert _mode(shm_dir) == _mode(shm_dir / "x") == _mode(got) == 0o700


def test_concurrent_creation_agrees(shm_dir: Path) -> None:
    """Several threads making the same tree: each mkdir either creates a component or finds
    it (then checks it); none fails."""
    errors: list[BaseException] = []

    def make(i: int) -> None:
        try:
            private_dir(shm_dir / "job" / f"r{i % 2}", trusted_above=shm_dir.parent)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in (shm_dir / "job").iterdir()) == ["r0", "r1"]


# -- files ------------------------------------------------------------------------------


def test_open_private_creates_0600_and_opens_again(shm_dir: Path) -> None:
    d = private_dir(shm_dir)
    fd = open_private(d / "lock", write=True, create=True)
    try:
        os.write(fd, b"x")
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
    fd = open_private(d / "lock", write=True, create=True)  # exists: opened, kept
    try:
        assert os.pread(fd, 10, 0) == b"x"
    finally:
        os.close(fd)
    with pytest.raises(FileExistsError):
        open_private(d / "lock", write=True, exclusive=True)
    with pytest.raises(FileNotFoundError):
        open_private(d / "missing")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # relative to an open directory
    try:
        os.close(open_private("new", write=True, exclusive=True, dir_fd=fd))
    finally:
        os.close(fd)
    assert _mode(d / "new") == 0o600


def test_open_private_never_follows_a_planted_symlink(shm_dir: Path, tmp_path: Path) -> None:
    d = private_dir(shm_dir)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (d / "lock").symlink_to(victim)
    (d / "dangling").symlink_to(tmp_path / "nothing-here")
    for kw in ({}, {"write": True}, {"write": True, "create": True}):
        with pytest.raises(ConfigError, match="symbolic link") as ei:
            open_private(d / "lock", **kw)  # type: ignore[arg-type]
        assert str(d / "lock") in str(ei.value)
    with pytest.raises(ConfigError, match="symbolic link"):
        open_private(d / "dangling", write=True, create=True)
    with pytest.raises(FileExistsError):
        open_private(d / "dangling", write=True, exclusive=True)
    assert victim.read_bytes() == b"precious" and not (tmp_path / "nothing-here").exists()


def test_open_private_refuses_fifos_without_blocking(shm_dir: Path) -> None:
    d = private_dir(shm_dir)
    os.mkfifo(d / "slot-0.bin", 0o600)
    os.mkdir(d / "sub", 0o700)
    for name in ("slot-0.bin", "sub"):
        with pytest.raises((ConfigError, IsADirectoryError)) as ei:
            open_private(d / name)  # a FIFO would block a plain open until a writer comes
        if isinstance(ei.value, ConfigError):
            assert "not a regular file" in str(ei.value) and str(d / name) in str(ei.value)


@as_root
def test_open_private_refuses_files_of_another_owner(shm_dir: Path) -> None:
    d = private_dir(shm_dir)
    (d / "m").write_bytes(b"theirs")
    os.chown(d / "m", OTHER, OTHER)
    for kw in ({}, {"write": True, "create": True}):
        with pytest.raises(ConfigError, match=f"owned by uid {OTHER}") as ei:
            open_private(d / "m", **kw)  # type: ignore[arg-type]
        assert str(d / "m") in str(ei.value)


def test_open_private_refuses_a_file_others_could_read_and_leaves_it_as_found(shm_dir: Path) -> None:
    """A snapshot file that others could read or write may have been read or changed: it is
    refused (not fixed), and left for its owner to look at."""
    d = private_dir(shm_dir)
    for mode in (0o644, 0o640, 0o606, 0o620):
        (d / "m").write_bytes(b"ours")
        os.chmod(d / "m", mode)
        with pytest.raises(ConfigError, match=f"{mode:04o}") as ei:
            open_private(d / "m", write=True, create=True)
        assert str(d / "m") in str(ei.value) and _mode(d / "m") == mode
        (d / "m").unlink()
    (d / "m").write_bytes(b"ours")
    os.chmod(d / "m", 0o600)
    os.close(open_private(d / "m"))


def test_check_private_dir_creates_nothing(shm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot inspect") as ei:
        check_private_dir(shm_dir)
    assert str(shm_dir) in str(ei.value) and not shm_dir.exists()
    private_dir(shm_dir / "r00001-of-00002", trusted_above=shm_dir.parent)
    check_private_dir(shm_dir / "r00001-of-00002")
    (shm_dir / "r00002-of-00002").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="symbolic link"):
        check_private_dir(shm_dir / "r00002-of-00002")
    (shm_dir / "open").mkdir(mode=0o777)
    os.chmod(shm_dir / "open", 0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_private_dir(shm_dir / "open")


def test_check_private_file_after_an_own_open(shm_dir: Path) -> None:
    d = private_dir(shm_dir)
    (d / "slot-0.bin").write_bytes(b"s")
    os.chmod(d / "slot-0.bin", 0o640)
    fd = os.open(d / "slot-0.bin", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with pytest.raises(ConfigError, match="0640"):
            check_private_file(fd, d / "slot-0.bin")
        os.fchmod(fd, 0o600)
        assert check_private_file(fd, d / "slot-0.bin").st_size == 1
    finally:
        os.close(fd)
