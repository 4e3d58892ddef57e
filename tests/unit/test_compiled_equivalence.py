"""The compiled virtqueue core (daemon/virtio/_vqcore.c) against the
pure-Python reference (virtqueue.py), byte for byte.

Hypothesis builds ring images in the fuzz target's input format
(tests/fuzz/image.py): well-formed requests the way Linux lays them out,
the fuzz seed corpus (malformed rings included: loops, nested or NEXT
indirect descriptors, bad table lengths, buffers outside memory or across a
hole, 64-bit wrap, writable before readable, avail.idx jumps), and those
with bytes flipped or random bytes. ``differential.compare`` runs both
classes on each image and compares popped chains (heads, sizes, and the
exact guest memory every view covers), VirtQueueError messages, indexes,
publish decisions and the used ring's bytes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.virtio import compiled
from tests.fuzz import differential, image, seeds

SEEDS = seeds.all_seeds()


@pytest.fixture(scope="module")
def img():
    i = differential.Image()
    yield i
    i.close()


def test_extension_is_built():
    """setup.sh builds the extension: a silent build failure would leave
    every compiled-path test below testing nothing."""
    assert compiled.EXTENSION_BUILT, compiled.PATH


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_corpus_is_equivalent(img, name):
    out = differential.compare(img, SEEDS[name])
    assert out[-1][0] == "ring"


def test_seeds_include_errors_and_chains(img):
    """The corpus reaches both outcomes (else the comparison proves little)."""
    kinds = {step[0] for data in SEEDS.values() for step in differential.compare(img, data)}
    assert {"chain", "error", "empty"} <= kinds


def requests():
    """A SeedBuilder image of 1..8 requests, direct or indirect, EVENT_IDX or not."""
    part = st.tuples(st.lists(st.binary(min_size=0, max_size=64), min_size=0, max_size=4),
                     st.lists(st.integers(0, 300), min_size=0, max_size=4), st.booleans())

    @st.composite
    def build(draw):
        log2 = draw(st.integers(5, 8))  # room for 4 direct requests of 8 descriptors
        b = image.SeedBuilder(num=1 << log2, event_idx=draw(st.booleans()),
                              last_avail=draw(st.integers(0, 0xFFFF)), used_idx=draw(st.integers(0, 0xFFFF)))
        for readable, writable, indirect in draw(st.lists(part, min_size=1, max_size=4)):
            if not readable and not writable:
                readable = [b"x"]
            b.request(readable, writable, indirect)
        return b.build()
    return build()


def flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


FLIPS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=requests())
def test_well_formed_requests_are_equivalent(img, data):
    out = differential.compare(img, data)
    assert any(step[0] == "chain" for step in out)


@SETTINGS
@given(data=requests(), flips=FLIPS)
def test_corrupted_requests_are_equivalent(img, data, flips):
    differential.compare(img, flipped(data, flips))


@SETTINGS
@given(name=st.sampled_from(sorted(SEEDS)), flips=FLIPS)
def test_corrupted_seeds_are_equivalent(img, name, flips):
    differential.compare(img, flipped(SEEDS[name], flips))


@SETTINGS
@given(data=st.binary(min_size=0, max_size=4096))
def test_random_bytes_are_equivalent(img, data):
    differential.compare(img, data)


def test_supervisor_never_loads_the_extension():
    """Compiled code that parses guest bytes runs only in workers: importing
    everything the supervisor imports (the worker entry included, which it
    forks into) loads neither compiled.py nor the extension."""
    code = ("import sys, daemon.cli, daemon.supervisor, daemon.workers.entry, daemon.vhost_user.backend;"
            "print(sorted(m for m in sys.modules if m in ('daemon.virtio.compiled', 'daemon.virtio._vqcore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pure_switch_selects_the_reference():
    code = ("from daemon.virtio import compiled, virtqueue; "
            "print(compiled.VirtQueue is virtqueue.VirtQueue, compiled.PATH)")
    env_out = {}
    for value in ("1", "0"):
        env = {"PYVIRTIOFSD_PURE": value, "PATH": "/usr/bin:/bin"}
        env_out[value] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True, env=env).stdout
    assert env_out["1"].startswith("True pure-Python request path (PYVIRTIOFSD_PURE=1)")
    assert env_out["0"].startswith("False compiled request path")
