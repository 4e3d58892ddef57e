"""Guest name parsing: only valid single components get through."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.fuse.names import (PATH_MAX, parse_lookup_name, parse_name, parse_name_at,
                               parse_two)
from daemon.fuse.request import FUSEError


def err(fn, *args, **kw) -> int:
    with pytest.raises(FUSEError) as info:
        fn(*args, **kw)
    return info.value.errno


def test_valid_names():
    assert parse_name(b"a\0") == "a"
    assert parse_name(bytearray(b"hello.txt\0")) == "hello.txt"
    assert parse_name(memoryview(b"x" * 255 + b"\0")) == "x" * 255
    assert parse_name(b"...\0") == "..."
    assert parse_name(b".hidden\0") == ".hidden"


def test_non_utf8_roundtrips():
    name = parse_name(b"caf\xe9\0")
    assert os.fsencode(name) == b"caf\xe9"


@pytest.mark.parametrize("raw,code", [
    (b"", errno.EINVAL),
    (b"\0", errno.EINVAL),            # empty name
    (b"abc", errno.EINVAL),           # no NUL
    (b"a/b\0", errno.EINVAL),
    (b"/\0", errno.EINVAL),
    (b".\0", errno.EINVAL),
    (b"..\0", errno.EINVAL),
    (b"a\0b\0", errno.EINVAL),        # embedded NUL / trailing bytes
    (b"a\0\0", errno.EINVAL),
    (b"x" * 256 + b"\0", errno.ENAMETOOLONG),
])
def test_invalid_names(raw, code):
    assert err(parse_name, raw) == code


def test_lookup_accepts_dots_only():
    assert parse_lookup_name(b".\0") == "."
    assert parse_lookup_name(b"..\0") == ".."
    assert err(parse_lookup_name, b"../x\0") == errno.EINVAL
    assert err(parse_lookup_name, b"a/..\0") == errno.EINVAL


def test_parse_name_at():
    buf = b"\x01\x02name\0value"
    assert parse_name_at(buf, 2) == ("name", 7)
    assert err(parse_name_at, b"abc", 0) == errno.EINVAL
    assert err(parse_name_at, b"x" * 300, 0) == errno.ENAMETOOLONG
    assert err(parse_name_at, b"a\0", 5) == errno.EINVAL
    assert err(parse_name_at, b"..\0", 0) == errno.EINVAL


def test_parse_two():
    assert parse_two(b"old\0new\0") == ("old", "new")
    assert parse_two(b"link\0../../etc/passwd\0", target=True) == ("link", "../../etc/passwd")
    assert parse_two(b"l\0/abs\0", target=True) == ("l", "/abs")
    assert err(parse_two, b"old\0new/x\0") == errno.EINVAL
    assert err(parse_two, b"old\0") == errno.EINVAL
    assert err(parse_two, b"old\0new") == errno.EINVAL
    assert err(parse_two, b"a\0b\0c\0") == errno.EINVAL
    assert err(parse_two, b"a\0\0", target=True) == errno.ENOENT
    assert err(parse_two, b"a/\0t\0", target=True) == errno.EINVAL
    assert err(parse_two, b"a\0" + b"t" * PATH_MAX + b"\0", target=True) == errno.ENAMETOOLONG
    assert err(parse_two, b"a\0..\0") == errno.EINVAL


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_parsers_raise_only_fuseerror(raw):
    for fn in (parse_name, parse_lookup_name, parse_two,
               lambda b: parse_two(b, target=True), lambda b: parse_name_at(b, 1)):
        try:
            result = fn(raw)
        except FUSEError as e:
            assert e.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.ENOENT)
            continue
        names = result if isinstance(result, tuple) else (result,)
        for name in names:
            if isinstance(name, str):
                assert "\0" not in name


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")))
def test_every_valid_component_is_accepted(raw):
    name = parse_name(raw + b"\0")
    assert os.fsencode(name) == raw
    assert "/" not in name
