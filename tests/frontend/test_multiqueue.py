"""Several request queues as one file system (docs/multiqueue.md).

Linux >= 6.11 sends a process's requests to the queue of the vCPU it runs
on, so one nodeid or fh is used on several queues, each served by its own
request worker process. These tests open on one queue and use on another,
and try what a hostile guest would: fhs and nodeids a queue never saw,
releases racing uses, a worker killed while the other serves.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time

import pytest

from tests import procfs
from tests.frontend.fuse_client import FuseClient, FuseErrorReply, reply_errno
from tests.frontend.vhost import VhostUserFrontend


# comm name → host pid of the daemon's worker processes
_workers = procfs.children_by_comm


def clients(fe) -> tuple[FuseClient, FuseClient]:
    """FUSE clients on request queues 1 and 2 (a process on CPU 0, on CPU 1)."""
    q1 = FuseClient(fe, request_queue=1)
    q2 = FuseClient(fe, request_queue=2)
    q2._unique = 1 << 40          # uniques of the two "CPUs" never collide
    return q1, q2


def settled_fds(d, q1, q2, baseline: dict[str, int], at_most: bool = False) -> dict[str, int]:
    """The request workers' fd counts once they are ``baseline`` (each
    closes its copies after a batch or an idle second), or after 5 s;
    ``at_most``: once none is above its baseline."""
    def settled(now: dict[str, int]) -> bool:
        if at_most:
            return now.keys() == baseline.keys() and all(n <= baseline[k] for k, n in now.items())
        return now == baseline

    deadline = time.monotonic() + 5
    while not settled(_fds(d)) and time.monotonic() < deadline:
        q1.getattr(1)
        q2.getattr(1)
        time.sleep(0.05)
    return _fds(d)


@pytest.fixture
def two_queues(daemon_factory, shared_dir):
    """(daemon, frontend, client on queue 1 after INIT, client on queue 2)."""
    d = daemon_factory("ours", shared_dir)
    fe = VhostUserFrontend(d.socket_path, ram_size=64 << 20, num_request_queues=2)
    fe.realize()
    fe.start()
    q1, q2 = clients(fe)
    q1.init()
    q2.getattr(1)                 # request-2 is up and in the session
    yield d, fe, q1, q2
    fe.close()


def _fds(d) -> dict[str, int]:
    return {name: procfs.fd_count(pid) for name, pid in _workers(d.proc.pid).items()
            if name.startswith("vfsd-request")}


def test_open_on_one_queue_use_on_the_other(two_queues, shared_dir):
    d, _fe, q1, q2 = two_queues
    baseline = _fds(d)
    entry, opened = q1.create(1, "x", mode=0o644)
    node, fh = entry.nodeid, opened.fh
    assert q2.write(node, fh, 0, b"hello, queue 2") == 14
    assert q2.read(node, fh, 0, 100) == b"hello, queue 2"
    assert q2.getattr(node, fh=fh).attr.size == 14
    q2.fsync(node, fh)
    assert q1.read(node, fh, 7, 5) == b"queue"
    q2.release(node, fh)
    # released on queue 2: unknown on both queues from now on
    assert reply_errno(q1.read, node, fh, 0, 10) == errno.EBADF
    assert reply_errno(q2.read, node, fh, 0, 10) == errno.EBADF
    assert (shared_dir / "x").read_bytes() == b"hello, queue 2"
    q1.forget(node, 1)
    # every copy closed again: each worker back to its baseline
    assert settled_fds(d, q1, q2, baseline) == baseline


def test_nodeid_looked_up_on_one_queue_served_on_the_other(two_queues, shared_dir):
    _d, _fe, q1, q2 = two_queues
    (shared_dir / "f").write_bytes(b"abc")
    node = q1.lookup(1, "f").nodeid
    assert q2.getattr(node).attr.size == 3
    assert q2.open(node).fh
    # FORGET (hiprio) of an inode queue 2 has copied: then it is unknown
    q1.forget(node, 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            q2.getattr(node)
        except FuseErrorReply as e:
            assert e.errno == errno.ESTALE
            break
        time.sleep(0.02)
    else:
        pytest.fail("a forgotten nodeid still served on the other queue")


def list_from(client, fh: int, offset: int, size: int) -> tuple[list[bytes], int]:
    """READDIR of the share root's handle ``fh`` from ``offset`` to the end,
    page by page: (names, the offset after the last one)."""
    names = []
    while True:
        page = client.readdir(1, fh, offset, size=size)
        if not page:
            return names, offset
        names += [e.name for e in page]
        offset = page[-1].off


def test_readdir_continues_on_the_other_queue(two_queues, shared_dir):
    _d, _fe, q1, q2 = two_queues
    names = {f"entry-{i:03d}" for i in range(100)}
    for n in names:
        (shared_dir / n).touch()
    fh = q1.opendir(1).fh
    first = q1.readdir(1, fh, 0, size=512)
    assert first
    seen = [e.name for e in first]
    rest, _end = list_from(q2, fh, first[-1].off, 512)
    seen += rest
    assert {os.fsdecode(n) for n in seen} - {".", ".."} == names
    assert len(seen) == len(set(seen))
    q2.releasedir(1, fh)
    assert reply_errno(q1.readdir, 1, fh, 0) == errno.EBADF


def test_fh_and_nodeid_a_queue_never_saw(two_queues):
    _d, _fe, q1, q2 = two_queues
    for fh in (0, 1, 12345, (1 << 64) - 1, (7 << 24) | ((1 << 24) - 1)):
        assert reply_errno(q2.read, 1, fh, 0, 10) == errno.EBADF
        assert reply_errno(q2.release, 1, fh) == errno.EBADF
    for nodeid in (2, 999, (1 << 63)):
        assert reply_errno(q2.getattr, nodeid) in (errno.ESTALE, errno.ENOENT)
    # a directory fh used as a file and the reverse, across queues
    dfh = q1.opendir(1).fh
    assert reply_errno(q2.read, 1, dfh, 0, 10) == errno.EBADF
    q2.releasedir(1, dfh)
    assert q1.getattr(1).attr.nlink >= 2


def test_release_on_one_queue_while_the_other_holds_a_copy(two_queues, shared_dir):
    """The copy on the other queue is another fd on the same open file:
    a RELEASE there never lets a number be reused under a READ here."""
    _d, _fe, q1, q2 = two_queues
    (shared_dir / "big").write_bytes(os.urandom(1 << 20))
    node = q1.lookup(1, "big").nodeid
    fh = q1.open(node).fh
    assert len(q2.read(node, fh, 0, 4096)) == 4096     # queue 2 has its copy
    pending = q2.send_read(node, fh, 0, 128 << 10)
    q1.release(node, fh)
    reply = q2.complete(pending)
    # answered either way (the read ran first, or EBADF), never another file
    assert reply.error in (0, -errno.EBADF)
    if reply.error == 0:
        assert reply.payload == (shared_dir / "big").read_bytes()[:128 << 10]
    # the other queue's next open gets a new fh that works everywhere
    fh2 = q2.open(node).fh
    assert fh2 != fh
    assert q1.read(node, fh2, 0, 3) == (shared_dir / "big").read_bytes()[:3]


def test_flock_released_with_its_fh_on_any_queue(two_queues, shared_dir):
    _d, _fe, q1, q2 = two_queues
    (shared_dir / "l").write_bytes(b"x")
    node = q1.lookup(1, "l").nodeid
    fh = q1.open(node, os.O_RDWR).fh
    q2.setlk(node, fh, owner=7, type_=fcntl.F_WRLCK, flock=True)
    fd = os.open(shared_dir / "l", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        q1.release(node, fh)         # queue 1 still held its own fd meanwhile
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_queues_are_served_in_parallel(two_queues, shared_dir):
    """A SETLKW waiting on queue 1 does not hold up queue 2, and the two
    queues are served by two processes."""
    d, _fe, q1, q2 = two_queues
    workers = _workers(d.proc.pid)
    assert "vfsd-request-1" in workers and "vfsd-request-2" in workers
    assert workers["vfsd-request-1"] != workers["vfsd-request-2"]
    (shared_dir / "w").write_bytes(b"x")
    node = q1.lookup(1, "w").nodeid
    fh = q1.open(node, os.O_RDWR).fh
    host = os.open(shared_dir / "w", os.O_RDWR)
    try:
        fcntl.lockf(host, fcntl.LOCK_EX)      # a host process holds the file
        waiting = q1.send_setlkw(node, fh, owner=9, type_=fcntl.F_WRLCK)
        t0 = time.monotonic()
        for _ in range(50):
            assert q2.getattr(node).attr.size == 1
        assert time.monotonic() - t0 < 5
        fcntl.lockf(host, fcntl.LOCK_UN)
        q1.check(waiting, timeout=10)
    finally:
        os.close(host)


def test_worker_killed_while_the_other_serves(two_queues, shared_dir):
    d, fe, q1, q2 = two_queues
    (shared_dir / "k").write_bytes(b"kept")
    node = q1.lookup(1, "k").nodeid
    fh = q1.open(node).fh
    victim = _workers(d.proc.pid)["vfsd-request-2"]
    os.kill(victim, signal.SIGKILL)
    # queue 1 serves on; queue 2's replacement serves what queue 1 opened
    assert q1.read(node, fh, 0, 4) == b"kept"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = _workers(d.proc.pid).get("vfsd-request-2")
        if new is not None and new != victim:
            break
        time.sleep(0.05)
    else:
        pytest.fail("request-2 was not replaced")
    assert q2.read(node, fh, 0, 4) == b"kept"
    assert q2.getattr(node).attr.size == 4
    q2.release(node, fh)
    assert d.proc.poll() is None


def test_copy_from_a_worker_that_switched_credentials(two_queues, shared_dir):
    """The kernel makes a process non-dumpable at each fsuid change, which
    would refuse pidfd_getfd: the owner must set it dumpable again."""
    _d, _fe, q1, q2 = two_queues
    (shared_dir / "u").write_bytes(b"user data")
    os.chmod(shared_dir / "u", 0o644)
    q1.uid = q1.gid = 4321
    node = q1.lookup(1, "u").nodeid
    fh = q1.open(node).fh
    assert q1.read(node, fh, 0, 4) == b"user"
    assert q2.read(node, fh, 5, 4) == b"data"
    assert q2.getattr(node).attr.size == 9
    q2.release(node, fh)


def _host_can_lock(path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_posix_locks_across_queues(two_queues, shared_dir):
    """One lock owner (a guest process) locks on one CPU's queue, tests and
    unlocks on the other's: one lock description for both."""
    _d, _fe, q1, q2 = two_queues
    (shared_dir / "p").write_bytes(b"0123456789")
    node = q1.lookup(1, "p").nodeid
    fh = q1.open(node, os.O_RDWR).fh
    q1.setlk(node, fh, owner=0xA, start=0, end=9, type_=fcntl.F_WRLCK, pid=100)
    assert not _host_can_lock(shared_dir / "p")
    # another owner, on the other queue, sees the lock and its guest pid
    lk = q2.getlk(node, fh, owner=0xB, start=0, end=9, type_=fcntl.F_RDLCK)
    assert (lk.start, lk.end, lk.type, lk.pid) == (0, 9, fcntl.F_WRLCK, 100)
    assert reply_errno(q2.setlk, node, fh, owner=0xB, start=5, end=5, type_=fcntl.F_RDLCK) \
        == errno.EAGAIN
    # the owner's own lock never conflicts with itself, on either queue
    q2.setlk(node, fh, owner=0xA, start=2, end=3, type_=fcntl.F_RDLCK, pid=100)
    # SETLKW of owner B on queue 1 waits; owner A unlocks on queue 2
    waiting = q1.send_setlkw(node, fh, owner=0xB, start=0, end=9, type_=fcntl.F_WRLCK, pid=200)
    time.sleep(0.1)
    q2.setlk(node, fh, owner=0xA, start=0, end=9, type_=fcntl.F_UNLCK)
    q1.check(waiting, timeout=10)
    lk = q2.getlk(node, fh, owner=0xA, start=0, end=0, type_=fcntl.F_RDLCK)
    assert (lk.type, lk.pid) == (fcntl.F_WRLCK, 200)
    # FLUSH of owner B on queue 2 (its close(2)) drops what it took on queue 1
    q2.flush(node, fh, lock_owner=0xB)
    assert q1.getlk(node, fh, owner=0xA, start=0, end=9, type_=fcntl.F_WRLCK).type == fcntl.F_UNLCK
    q1.setlk(node, fh, owner=0xC, start=0, end=0, type_=fcntl.F_WRLCK)
    assert not _host_can_lock(shared_dir / "p")
    # the last RELEASE, on the other queue, ends every lock on the file
    q2.release(node, fh)
    assert _host_can_lock(shared_dir / "p")


def test_open_file_outlives_its_opener(two_queues, shared_dir):
    """The last worker to copy an open file owns it, and the keeper holds
    one more copy: the opener's death loses neither what another worker
    copied nor what only the opener had (tests/frontend/test_keeper.py)."""
    d, _fe, q1, q2 = two_queues
    (shared_dir / "o").write_bytes(b"survives")
    node = q2.lookup(1, "o").nodeid
    kept = q2.open(node).fh
    alone = q2.open(node).fh
    assert q1.read(node, kept, 0, 3) == b"sur"     # queue 1 copies it
    assert q1.getattr(node).attr.size == 8         # and the inode's fd
    victim = _workers(d.proc.pid)["vfsd-request-2"]
    os.kill(victim, signal.SIGKILL)
    assert q1.read(node, kept, 3, 5) == b"vives"
    assert q1.read(node, alone, 0, 3) == b"sur"   # from the keeper
    deadline = time.monotonic() + 20
    while _workers(d.proc.pid).get("vfsd-request-2") in (None, victim):
        assert time.monotonic() < deadline, "request-2 was not replaced"
        time.sleep(0.05)
    assert q2.read(node, kept, 0, 8) == b"survives"   # the replacement copies it from queue 1
    assert q2.getattr(node).attr.size == 8             # and the nodeid
    q2.release(node, kept)
    q2.release(node, alone)
    assert d.proc.poll() is None


def test_readdir_seekdir_back_on_a_queue_whose_position_moved(two_queues, shared_dir):
    """Both queues read one directory handle (one host open file, one
    position): queue 1 must not trust the position after queue 2 moved it."""
    _d, _fe, q1, q2 = two_queues
    for i in range(400):                  # ~90 KiB of dirents: several getdents64 calls
        (shared_dir / f"n{i:04d}-{'x' * 200}").touch()
    fh = q1.opendir(1).fh
    names, offset = list_from(q1, fh, 0, 4096)   # queue 1 lists it all once
    # queue 2 rewinds and reads a little: the shared position moves
    assert q2.readdir(1, fh, 0, size=4096)
    # queue 1 asked again from where its last page ended: the end
    assert q1.readdir(1, fh, offset, size=4096) == []
    # and from the start, page by page, the same listing
    again, _end = list_from(q1, fh, 0, 4096)
    assert again == names and len(set(names)) == len(names) == 402
    q1.releasedir(1, fh)


def test_link_and_rename_between_inodes_of_two_workers(two_queues, shared_dir):
    """LINK of an inode request-1 looked up into a directory request-2
    looked up, and RENAME between directories of the two: every request
    worker's O_PATH fds are on one mount (the request workers share one
    mount namespace), so linkat and renameat2 never see two mounts (EXDEV:
    `cp -a` of hard links failed so on a 2-queue guest)."""
    _d, _fe, q1, q2 = two_queues
    (shared_dir / "a").mkdir()
    (shared_dir / "b").mkdir()
    (shared_dir / "a" / "f").write_bytes(b"data")
    a = q1.lookup(1, "a").nodeid
    f = q1.lookup(a, "f").nodeid
    b = q2.lookup(1, "b").nodeid
    # both fds foreign to one side: q2 copies f from request-1, b is its own
    assert q2.link(f, b, "hard").nodeid == f
    assert (shared_dir / "b" / "hard").stat().st_ino == (shared_dir / "a" / "f").stat().st_ino
    # and the other way: q1 copies b from request-2, a is its own
    assert q1.link(f, b, "hard2").nodeid == f
    q2.rename(a, "f", b, "moved")
    q1.rename(b, "hard", a, "back")
    assert sorted(p.name for p in (shared_dir / "a").iterdir()) == ["back"]
    assert sorted(p.name for p in (shared_dir / "b").iterdir()) == ["hard2", "moved"]
    assert (shared_dir / "a" / "back").read_bytes() == b"data"
