"""InodeCache: one request worker's O_PATH fds of the shared table's inodes."""

from __future__ import annotations

import errno
import os

import pytest

from daemon.fuse import inodecache
from daemon.fuse import inodes as inodes_mod
from daemon.fuse.inodecache import InodeCache
from daemon.fuse.inodes import RING, InodeTable
from daemon.fuse.request import FUSEError


def _share(path, capacity: int):
    """(table reset to ``path`` as the root, O_PATH fd of path, path); closed after."""
    root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    t = InodeTable(capacity)
    st = os.fstat(root_fd)
    t.reset(st.st_dev, st.st_ino)
    yield t, root_fd, path
    os.close(root_fd)
    t.close()


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    os.link(tmp_path / "d" / "f", tmp_path / "hard")
    os.symlink("d/f", tmp_path / "link")
    yield from _share(tmp_path, 32)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_cache_lookup_hard_links_and_root(tree):
    table, root_fd, path = tree
    cache = InodeCache(table)
    cache.reset(root_fd)
    assert cache.fd(1) == root_fd
    d, dgen, st = cache.lookup(root_fd, "d")
    assert st.st_ino == os.stat(path / "d").st_ino
    f, fgen, _ = cache.lookup(cache.fd(d), "f")
    hard, hgen, _ = cache.lookup(root_fd, "hard")
    assert (hard, hgen) == (f, fgen)
    assert table.get(f)[3] == 2
    link, _, lst = cache.lookup(root_fd, "link")
    assert lst.st_mode & 0o170000 == 0o120000  # the symlink, not followed
    assert cache.lookup(root_fd, ".")[:2] == (1, 0)
    assert len(cache) == 3  # one fd per nodeid, even for two names
    cache.clear()


def test_cache_stale_nodeids(tree):
    table, root_fd, _ = tree
    cache = InodeCache(table, use_handles=False)
    cache.reset(root_fd)
    for bad in (0, 2, 31, 1 << 33):
        with pytest.raises(FUSEError) as info:
            cache.fd(bad)
        assert info.value.errno == errno.ESTALE
    d, _, _ = cache.lookup(root_fd, "d")
    table.unref(d, 1)
    with pytest.raises(FUSEError) as info:
        cache.fd(d)
    assert info.value.errno == errno.ESTALE


def _looked_up_d(tree):
    """(table, cache, root_fd, the fds open before, nodeid of "d") after
    one lookup of "d" by a fresh cache."""
    table, root_fd, _ = tree
    cache = InodeCache(table)
    cache.reset(root_fd)
    before = _open_fds()
    return table, cache, root_fd, before, cache.lookup(root_fd, "d")[0]


def test_reap_closes_forgotten_fds(tree):
    table, cache, root_fd, before, d = _looked_up_d(tree)
    cache.lookup(root_fd, "d")
    assert len(_open_fds() - before) == 1
    table.unref(d, 1)
    assert cache.reap() == 0  # one reference left
    table.unref(d, 1)
    assert cache.reap() == 1
    assert _open_fds() == before
    assert len(cache) == 0


def test_reap_after_overflow_rescans(tree):
    table, cache, _root_fd, before, d = _looked_up_d(tree)
    table.unref(d, 1)
    for i in range(RING + 1):  # push d's entry out of the ring
        table.unref(table.ref(77, i)[0], 1)
    assert cache.reap() == 1
    assert _open_fds() == before


def test_second_worker_reopens_by_file_handle(tree):
    table, root_fd, path = tree
    a = InodeCache(table)
    a.reset(root_fd)
    b = InodeCache(table)
    b.reset(root_fd)
    d, _, _ = a.lookup(root_fd, "d")
    if not table.handle(d, table.generation(d)):
        pytest.skip("file system without file handles")
    fd = b.fd(d)  # never looked up in b
    assert os.fstat(fd).st_ino == os.stat(path / "d").st_ino
    assert b.fd(d) == fd
    a.clear()
    b.clear()


def test_reused_nodeid_does_not_reuse_fd(tree):
    table, root_fd, path = tree
    a = InodeCache(table, use_handles=False)
    a.reset(root_fd)
    d, dgen, _ = a.lookup(root_fd, "d")
    table.unref(d, 1)  # freed by "another process"; a has not reaped yet
    nodeid, gen, _ = table.ref(123, 456)  # reuses the slot
    assert nodeid == d and gen != dgen
    with pytest.raises(FUSEError):
        a.fd(d)  # the cached fd is for the old generation
    a.clear()


# -- the fd bound (--inode-fd-cache) ----------------------------------------------------

@pytest.fixture
def many(tmp_path):
    """A share with 60 files and a table big enough for them."""
    for i in range(60):
        (tmp_path / f"f{i:02d}").write_bytes(b"x" * i)
    yield from _share(tmp_path, 128)


def test_fd_bound_evicts_and_reopens_by_handle(many):
    table, root_fd, path = many
    cache = InodeCache(table, max_fds=16)
    cache.reset(root_fd)
    before = _open_fds()
    looked = [cache.lookup(root_fd, f"f{i:02d}")[0] for i in range(60)]
    assert table.handle(looked[0], table.generation(looked[0])), "tmp file system gives no file handles"
    assert len(cache) == 60  # nothing is closed while a batch may still use its fds
    cache.reap()
    assert len(cache) == 14 and cache.evicted == 46  # trimmed to 7/8 of the bound
    assert len(_open_fds() - before) == 14
    # every nodeid still names its file: the evicted ones are reopened by handle
    for i, nodeid in enumerate(looked):
        fd = cache.fd(nodeid)
        assert os.fstat(fd).st_ino == os.stat(path / f"f{i:02d}").st_ino
    assert len(cache) == 60
    cache.reap()
    assert len(cache) == 14
    # the newest-cached survive a trim (first in, first out: a cache hit
    # costs no bookkeeping): f46..f59 were cached before the 46 reopened
    assert set(cache._fds) == set(looked[32:46])
    cache.clear()
    assert not _open_fds() - before


def test_fd_bound_keeps_inodes_without_a_handle(many):
    table, root_fd, _ = many
    cache = InodeCache(table, max_fds=16)
    cache.reset(root_fd)
    looked = [cache.lookup(root_fd, f"f{i:02d}")[0] for i in range(40)]
    for nodeid in looked[:30]:  # as if their file system gave no handle
        table._q[nodeid * inodes_mod._SLOT_WORDS + inodes_mod._S_HLEN] = 0
    cache.reap()
    # only the 10 with handles could go; the others moved to the back
    assert cache.evicted == 10 and len(cache) == 30
    assert list(cache._fds) == looked[:30]
    cache.clear()


def test_fd_bound_closes_stale_entries_first_in_line(many):
    table, root_fd, _ = many
    cache = InodeCache(table, max_fds=16, use_handles=True)
    cache.reset(root_fd)
    looked = [cache.lookup(root_fd, f"f{i:02d}")[0] for i in range(20)]
    for nodeid in looked[:20]:
        table._q[nodeid * inodes_mod._SLOT_WORDS + inodes_mod._S_HLEN] = 0  # nothing reopenable
    table.unref(looked[0], 1)  # forgotten in another process: its fd is stale
    cache._trim()
    assert looked[0] not in cache._fds and cache.evicted == 1


def test_no_fd_bound_without_handles(many):
    table, root_fd, _ = many
    cache = InodeCache(table, use_handles=False, max_fds=16)
    cache.reset(root_fd)
    for i in range(40):
        cache.lookup(root_fd, f"f{i:02d}")
    cache.reap()
    assert len(cache) == 40 and cache.evicted == 0  # nothing could be reopened
    cache.clear()


def test_inode_fd_budget(monkeypatch):
    import resource
    assert inodecache.inode_fd_budget(500) == 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (20000, 20000))
    assert inodecache.inode_fd_budget(None) == 5000
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (100, 100))
    assert inodecache.inode_fd_budget(None) == 64
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert inodecache.inode_fd_budget(None) == 1 << 20
