"""extensions.parse: the request-extension area of creating ops.

Round trips: any groups extension and security context laid out as Linux
does (in either order, with unknown extensions between) decode to exactly
what was encoded. Robustness: any bytes at all decode or raise
FUSEError(EINVAL), never anything else, and whatever decodes stays within
the limits (group count, name and value sizes, the security. prefix).
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.fuse import abi, extensions
from daemon.fuse.credentials import MAX_SUPP_GROUPS
from daemon.fuse.extensions import Extensions, SecurityContext, parse
from daemon.fuse.request import FUSEError
from tests.unit.fusereq import supp_group_ext


def secctx_ext(name: bytes, value: bytes) -> bytes:
    record = abi.SECCTX.pack(len(value)) + name + b"\0" + value
    record += bytes(-len(record) % 8)
    return abi.SECCTX_HEADER.pack(8 + len(record), 1) + record


def unknown_ext(kind: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 8)
    return abi.EXT_HEADER.pack(8 + len(body), kind) + body


names = st.binary(min_size=1, max_size=extensions.XATTR_NAME_MAX - len(b"security.")).filter(
    lambda b: b"\0" not in b).map(lambda b: b"security." + b)
values = st.binary(min_size=1, max_size=512)
groups = st.lists(st.integers(0, 0xFFFFFFFF), max_size=MAX_SUPP_GROUPS)


@settings(max_examples=300, deadline=None)
@given(groups=st.one_of(st.none(), groups), ctx=st.one_of(st.none(), st.tuples(names, values)),
       unknown=st.lists(st.tuples(st.integers(33, 0xFFFFFFFF), st.binary(max_size=40)), max_size=3),
       ctx_first=st.booleans())
def test_round_trip(groups, ctx, unknown, ctx_first):
    parts = [unknown_ext(k, b) for k, b in unknown]
    mine = []
    if groups is not None:
        mine.append(supp_group_ext(*groups))
    if ctx is not None:
        mine.append(secctx_ext(*ctx))
    if ctx_first:
        mine.reverse()
    area = b"".join(mine[:1] + parts + mine[1:])
    got = parse(area)
    assert got == Extensions(tuple(groups or ()), SecurityContext(*ctx) if ctx else None)
    assert extensions.supp_groups(area) == tuple(groups or ())


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_decode_within_limits_or_are_einval(area):
    try:
        got = parse(area)
    except FUSEError as e:
        assert e.errno == errno.EINVAL
        return
    assert len(got.groups) <= MAX_SUPP_GROUPS
    if got.secctx is not None:
        name, value = got.secctx
        assert name.startswith(b"security.") and len(name) <= extensions.XATTR_NAME_MAX
        assert b"\0" not in name and 0 < len(value) <= len(area)


@settings(max_examples=300, deadline=None)
@given(name=names, value=values, cut=st.integers(1, 64))
def test_a_truncated_context_is_einval(name, value, cut):
    ext = secctx_ext(name, value)
    cut = min(cut, len(ext) - 8) // 8 * 8 or 8
    # the header still claims the full size: past the end of the area
    with pytest.raises(FUSEError) as e:
        parse(ext[:-cut])
    assert e.value.errno == errno.EINVAL


def test_no_label_and_no_extensions():
    assert parse(b"") == Extensions()
    assert parse(abi.SECCTX_HEADER.pack(8, 0)) == Extensions()     # Linux without an LSM label
    assert parse(unknown_ext(40, b"x")) == Extensions()


@pytest.mark.parametrize("area", [
    abi.SECCTX_HEADER.pack(8, 0) * 2,                                  # contexts twice
    abi.SECCTX_HEADER.pack(8, 2),                                      # nr_secctx 2
    abi.SECCTX_HEADER.pack(16, 0) + bytes(8),                          # nr 0 with a body
    secctx_ext(b"user.x", b"v"),                                       # not security.*
    secctx_ext(b"security." + b"x" * 247, b"v"),                       # name of 256 bytes
    abi.SECCTX_HEADER.pack(32, 1) + abi.SECCTX.pack(0x10001) + b"security.selinux\0" + bytes(7),
    abi.SECCTX_HEADER.pack(40, 1) + abi.SECCTX.pack(1) + b"security.selinux\0v" + bytes(14),  # then a 0-byte header
])
def test_malformed_contexts(area):
    with pytest.raises(FUSEError) as e:
        parse(area)
    assert e.value.errno == errno.EINVAL
