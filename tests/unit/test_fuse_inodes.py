"""InodeTable: shared memory, across processes."""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import signal
import struct
import threading
import time

import pytest

from daemon.fuse import inodes as inodes_mod
from daemon.fuse.inodes import RING, InodeTable
from daemon.fuse.request import FUSEError
from tests.unit.killed import in_child

ROOT = (0xFD00, 2)


# both ways the table may lock (filetable.LockedTable): the extension's
# TableLock when it is built, the POSIX record lock always
LOCK_KINDS = ["record"] + (["futex"] if importlib.util.find_spec("daemon.fuse._fastops") else [])


@pytest.fixture(params=LOCK_KINDS)
def table(request):
    t = InodeTable(64, lock=request.param)
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

    pids = [in_child(work(1)), in_child(work(2))]
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

    pid = in_child(hold_and_die)
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
