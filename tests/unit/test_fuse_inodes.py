"""InodeTable (shared memory, cross-process) and InodeCache (per worker)."""

from __future__ import annotations

import errno
import os
import random
import signal
import struct
import threading
import time

import pytest

from daemon.fuse import inodes as inodes_mod
from daemon.fuse.inodes import RING, InodeCache, InodeTable
from daemon.fuse.request import FUSEError

ROOT = (0xFD00, 2)


@pytest.fixture
def table():
    t = InodeTable(64)
    t.reset(*ROOT)
    yield t
    t.close()


def test_root_is_nodeid_1_generation_0(table):
    assert table.get(1) == (0, ROOT[0], ROOT[1], 1)
    assert table.ref(*ROOT) == (1, 0, False)
    table.unref(1, 100)  # pinned
    assert table.get(1) is not None
    assert len(table) == 0


def test_ref_unref_lifecycle(table):
    nodeid, gen, inserted = table.ref(1, 100)
    assert inserted and nodeid >= 2 and gen > 0
    assert table.ref(1, 100) == (nodeid, gen, False)
    assert table.get(nodeid) == (gen, 1, 100, 2)
    assert table.generation(nodeid) == gen
    table.unref(nodeid, 1)
    assert table.get(nodeid) == (gen, 1, 100, 1)
    table.unref(nodeid, 5)  # more than held: freed, never negative
    assert table.get(nodeid) is None
    assert table.generation(nodeid) == 0
    assert len(table) == 0


def test_invalid_nodeids_are_ignored_or_none(table):
    for nodeid in (0, 65, 1 << 40, 3):
        assert table.get(nodeid) is None
        assert table.generation(nodeid) == 0
        table.unref(nodeid, 1)
    nodeid, _, _ = table.ref(5, 5)
    table.unref(nodeid, 0)  # nlookup 0 changes nothing
    assert table.get(nodeid)[3] == 1


def test_same_key_one_nodeid_distinct_keys_distinct(table):
    a = table.ref(1, 7)[0]
    b = table.ref(2, 7)[0]  # same ino, other device
    c = table.ref(1, 8)[0]
    assert len({a, b, c}) == 3
    assert table.ref(1, 7)[0] == a


def test_full_table_is_enfile_and_recovers():
    t = InodeTable(4)  # root + 3
    try:
        t.reset(*ROOT)
        ids = [t.ref(1, i)[0] for i in range(3)]
        assert sorted(ids) == [2, 3, 4]
        with pytest.raises(FUSEError) as info:
            t.ref(1, 99)
        assert info.value.errno == errno.ENFILE
        assert t.ref(1, 0)[0] == ids[0]  # existing keys still work when full
        t.unref(ids[1], 1)
        nodeid, _, inserted = t.ref(1, 99)
        assert inserted and nodeid == ids[1]
    finally:
        t.close()


def test_generations_unique_over_life_and_resets(table):
    seen = set()
    gens = []
    for round_ in range(5):
        for i in range(200):
            nodeid, gen, inserted = table.ref(7, i)
            assert inserted
            assert (nodeid, gen) not in seen
            seen.add((nodeid, gen))
            gens.append(gen)
            table.unref(nodeid, 1)
        if round_ % 2:
            table.reset(*ROOT)
    assert gens == sorted(gens) and len(set(gens)) == len(gens)


def test_model_random_operations():
    """Random ref/unref against a dict model: the index never loses or
    duplicates a key, even with many collisions and removals."""
    t = InodeTable(200)
    try:
        t.reset(*ROOT)
        rng = random.Random(1234)
        model: dict[tuple[int, int], tuple[int, int]] = {}  # key -> (nodeid, refs)
        for _ in range(20000):
            key = (rng.randrange(3), rng.randrange(300))
            if rng.random() < 0.55:
                try:
                    nodeid, _gen, inserted = t.ref(*key)
                except FUSEError as e:
                    assert e.errno == errno.ENFILE and len(model) == 199
                    continue
                if key in model:
                    assert not inserted and model[key][0] == nodeid
                    model[key] = (nodeid, model[key][1] + 1)
                else:
                    assert inserted
                    assert nodeid not in {n for n, _ in model.values()}
                    model[key] = (nodeid, 1)
            elif model:
                key = rng.choice(sorted(model))
                nodeid, refs = model[key]
                n = rng.randint(1, refs)
                t.unref(nodeid, n)
                if n == refs:
                    del model[key]
                else:
                    model[key] = (nodeid, refs - n)
            assert len(t) == len(model)
        for key, (nodeid, refs) in model.items():
            gen, dev, ino, count = t.get(nodeid)
            assert (dev, ino, count) == (*key, refs)
    finally:
        t.close()


def test_freed_since_and_overflow(table):
    cursor = table.cursor
    ids = [table.ref(3, i)[0] for i in range(10)]
    for nodeid in ids[:4]:
        table.unref(nodeid, 1)
    freed, cursor2, overflow = table.freed_since(cursor)
    assert not overflow and freed == ids[:4]
    assert table.freed_since(cursor2) == ([], cursor2, False)
    # more frees than the ring holds: overflow, and the cursor catches up
    for i in range(RING + 5):
        table.unref(table.ref(4, i)[0], 1)
    freed, cursor3, overflow = table.freed_since(cursor2)
    assert overflow and freed == [] and cursor3 == table.cursor
    # a reset is an overflow too
    table.reset(*ROOT)
    assert table.freed_since(cursor3)[2]


def test_handles_stored_per_generation(table):
    nodeid, gen, _ = table.ref(1, 1)
    table.set_handle(nodeid, gen, b"\x08\0\0\0\x01\0\0\0abcdefgh")
    assert table.handle(nodeid, gen) == b"\x08\0\0\0\x01\0\0\0abcdefgh"
    assert table.handle(nodeid, gen + 1) == b""
    table.set_handle(nodeid, gen, b"x" * 100)  # too large: ignored
    assert table.handle(nodeid, gen) == b"\x08\0\0\0\x01\0\0\0abcdefgh"
    table.unref(nodeid, 1)
    nodeid2, gen2, _ = table.ref(1, 2)
    assert nodeid2 == nodeid and table.handle(nodeid2, gen2) == b""


# -- across processes ----------------------------------------------------------------------
def _child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def test_two_processes_share_nodeids_and_counts(table):
    keys = [(9, i) for i in range(40)]
    r, w = os.pipe()

    def work(tag: int):
        def run():
            rng = random.Random(tag)
            got = {}
            for _round in range(30):
                order = keys[:]
                rng.shuffle(order)
                for key in order:
                    got[key] = table.ref(*key)[:2]
                for key in order:
                    table.unref(got[key][0], 1)
            # leave one reference on each key and report nodeids
            out = b"".join(struct.pack("<QQ", *table.ref(*key)[:2]) for key in keys)
            os.write(w, struct.pack("<I", tag) + out)
        return run

    pids = [_child(work(1)), _child(work(2))]
    for pid in pids:
        assert _wait(pid) == 0
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    size = 4 + 16 * len(keys)
    assert len(data) == 2 * size
    first = data[4:size]
    second = data[size + 4:]
    assert first == second  # both processes got the same (nodeid, generation)
    for i, key in enumerate(keys):
        nodeid, gen = struct.unpack_from("<QQ", first, 16 * i)
        assert table.get(nodeid) == (gen, *key, 2)
    assert len(table) == len(keys)


def test_lock_holder_killed_does_not_deadlock(table):
    before = [table.ref(5, i)[0] for i in range(20)]
    r, w = os.pipe()

    def hold_and_die():
        table._lock()
        # half-done update: index entry of one slot cleared
        table._hash[table._find(5, 3)[0]] = 0
        os.write(w, b"x")
        os.kill(os.getpid(), signal.SIGKILL)

    pid = _child(hold_and_die)
    assert os.read(r, 1) == b"x"
    status = _wait(pid)
    assert os.WIFSIGNALED(status)
    os.close(r)
    os.close(w)
    result = []
    thread = threading.Thread(target=lambda: result.append(table.ref(5, 3)), daemon=True)
    thread.start()
    thread.join(10)
    assert result, "lock not released by the dead holder"
    # the index was rebuilt from the slots: same nodeid as before, count 2
    assert result[0][:1] == (before[3],) and not result[0][2]
    for i, nodeid in enumerate(before):
        assert table.ref(5, i)[0] == nodeid


# -- InodeCache ------------------------------------------------------------------------------
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


def test_reap_closes_forgotten_fds(tree):
    table, root_fd, _ = tree
    cache = InodeCache(table)
    cache.reset(root_fd)
    before = _open_fds()
    d, _, _ = cache.lookup(root_fd, "d")
    cache.lookup(root_fd, "d")
    assert len(_open_fds() - before) == 1
    table.unref(d, 1)
    assert cache.reap() == 0  # one reference left
    table.unref(d, 1)
    assert cache.reap() == 1
    assert _open_fds() == before
    assert len(cache) == 0


def test_reap_after_overflow_rescans(tree):
    table, root_fd, _ = tree
    cache = InodeCache(table)
    cache.reset(root_fd)
    before = _open_fds()
    d, _, _ = cache.lookup(root_fd, "d")
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


def test_table_memory_is_anonymous(table):
    target = os.readlink(f"/proc/self/fd/{table._fd}")
    assert target.startswith("/memfd:pyvirtiofsd-inodes")
    assert not any("pyvirtiofsd" in n for n in os.listdir("/dev/shm"))


def test_module_exports():
    assert inodes_mod.HANDLE_MAX % 8 == 0


def test_reset_gives_pages_back_and_reads_zero():
    """A reset frees the table's zeroed pages instead of writing zeros into
    them: the daemon's default table (a million nodeids) would otherwise
    cost every process 16 MiB of resident zeros after the guest's INIT."""
    t = InodeTable(1 << 16)
    try:
        t.reset(*ROOT)
        allocated_after_reset = os.fstat(t._fd).st_blocks * 512
        assert allocated_after_reset < len(t._hash_bytes) // 8  # 512 KiB index, not resident
        ids = [t.ref(9, i)[0] for i in range(5000)]
        assert os.fstat(t._fd).st_blocks * 512 > allocated_after_reset
        t.reset(*ROOT)
        assert os.fstat(t._fd).st_blocks * 512 <= allocated_after_reset + 2 * 4096
        assert len(t) == 0  # live nodeids besides the root
        assert all(t.get(n) is None for n in ids)
        assert all(b == 0 for b in t._hash_bytes[:4096]) and not any(t._hash_bytes[-4096:])
        # the table works as before: same keys come back as fresh nodeids
        nodeid, gen, inserted = t.ref(9, 0)
        assert inserted and t.get(nodeid)[:3] == (gen, 9, 0)
    finally:
        t.close()


def test_neighbouring_inodes_share_index_pages():
    """Inodes created together (consecutive numbers) land in neighbouring
    index entries: looking up 9,000 of them in the default million-inode
    table makes the process pay for ~1.5 MiB, not for most of the 16 MiB
    index; numbers with a large stride still spread without piling up."""
    t = InodeTable(1 << 20)
    try:
        t.reset(*ROOT)
        before = os.fstat(t._fd).st_blocks * 512
        for i in range(9000):
            t.ref(7, 5_000_000 + i)
        assert os.fstat(t._fd).st_blocks * 512 - before < 3 << 20
        homes = {inodes_mod._home(7, i << 18, t._hmask) for i in range(4096)}
        assert len(homes) > 4000  # strided numbers get distinct homes
    finally:
        t.close()


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
    assert inodes_mod.inode_fd_budget(500) == 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (20000, 20000))
    assert inodes_mod.inode_fd_budget(None) == 5000
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (100, 100))
    assert inodes_mod.inode_fd_budget(None) == 64
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert inodes_mod.inode_fd_budget(None) == 1 << 20
