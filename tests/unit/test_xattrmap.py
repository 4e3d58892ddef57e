"""--xattrmap's rule language (daemon/fuse/xattrmap.py): parsing, the
first-match-wins mapping in both directions, and its properties."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.fuse.request import FUSEError
from daemon.fuse.xattrmap import Rule, XattrMap, XattrMapError


def client(m: XattrMap, name: bytes):
    try:
        return m.to_host(name)
    except FUSEError as e:
        return e.errno


def test_parse_rules_any_separator_and_whitespace():
    m = XattrMap.parse("""
        /prefix/all/trusted./user.virtiofs./
        :bad:server::trusted.:   |bad|client|user.virtiofs.||
        %ok%all%%%""")
    assert m.rules == (Rule("prefix", True, True, b"trusted.", b"user.virtiofs."),
                       Rule("bad", False, True, b"", b"trusted."),
                       Rule("bad", True, False, b"user.virtiofs.", b""),
                       Rule("ok", True, True, b"", b""))


def test_map_expands_as_the_rust_daemon_does():
    assert XattrMap.parse(":map::user.virtiofs.:").rules == (
        Rule("prefix", True, True, b"", b"user.virtiofs."), Rule("bad", True, True, b"", b""))
    assert XattrMap.parse(":ok:client:user.:: :map:trusted.:user.virtiofs.:").rules == (
        Rule("ok", True, False, b"user.", b""),
        Rule("prefix", True, True, b"trusted.", b"user.virtiofs."),
        Rule("bad", True, True, b"user.virtiofs.", b"trusted."),
        Rule("ok", True, True, b"", b""))


@pytest.mark.parametrize("text,says", [
    ("", "no rules"), ("  \n ", "no rules"),
    (":prefix:client:trusted.", "rule 1: incomplete"),
    (":ok:all::: :prefix:all", "rule 2: incomplete"),
    (":frob:all:::", "rule 1: unknown type 'frob'"),
    (":ok:everyone:::", "rule 1: unknown scope 'everyone'"),
    (":map:a.:b.: :ok:all:::", "rule 2: nothing may follow the map rule"),
    (":map:a.:b.: :map:a.:b.:", "rule 2: nothing may follow the map rule"),
    (":ok:all:a\0:b:", "rule 1: a NUL byte"),
])
def test_malformed_rule_sets(text, says):
    with pytest.raises(XattrMapError, match=says):
        XattrMap.parse(text)


def test_first_match_wins_and_each_type_in_both_directions():
    m = XattrMap.parse(":bad:all:user.secret:user.secret: :unsupported:client:security.:: "
                       ":prefix:all:trusted.:user.vm.: :ok:server::user.: :ok:client:user.::")
    assert client(m, b"user.secret.x") == errno.EPERM          # bad before ok
    assert client(m, b"security.selinux") == errno.ENOTSUP
    assert client(m, b"trusted.a") == b"user.vm.trusted.a"      # key kept, prefix added
    assert client(m, b"user.a") == b"user.a"
    assert client(m, b"system.posix_acl_access") == errno.EPERM  # no rule: refused
    assert m.to_guest(b"user.secret.y") is None
    assert m.to_guest(b"user.vm.trusted.a") == b"trusted.a"     # the prefix stripped
    assert m.to_guest(b"user.vm.") is None                      # nothing left: hidden
    assert m.to_guest(b"user.other") == b"user.other"
    assert m.to_guest(b"security.selinux") is None              # no server rule: hidden
    assert m.list_to_guest([b"user.vm.trusted.a", b"user.secret", b"user.b"]) == b"trusted.a\0user.b\0"


NAME = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)
PREFIX = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
                 max_size=12)


@settings(max_examples=300, deadline=None)
@given(key=PREFIX, prepend=PREFIX.filter(bool), name=NAME)
def test_map_rule_round_trips_every_name_it_passes(key, prepend, name):
    """:map:KEY:PREPEND: — a name the guest may use comes back unchanged
    from the host's list, and a name the guest sees in a list maps back to
    the very host name it came from, unless it was a host name PREPEND+x
    with x outside KEY: the Rust rules strip PREPEND from every host name
    (see the next test), so such an x names another attribute."""
    m = XattrMap.parse(f":map:{key}:{prepend}:")
    host = client(m, name)
    if isinstance(host, bytes):
        assert m.to_guest(host) == name
    guest = m.to_guest(name)
    if guest is not None and guest.startswith(key.encode()):
        assert m.to_host(guest) == name


def test_a_keyed_map_strips_the_prefix_of_every_host_name_as_the_rust_daemon():
    m = XattrMap.parse(":map:trusted.:user.virtiofs.:")
    assert m.to_guest(b"user.virtiofs.other") == b"other"     # not trusted.*, shown all the same
    assert m.to_host(b"other") == b"other"                    # which is another attribute


@settings(max_examples=300, deadline=None)
@given(key=PREFIX, prepend=PREFIX.filter(bool), name=NAME)
def test_map_rule_never_lets_the_guest_reach_the_stored_namespace_raw(key, prepend, name):
    """With a map rule, every host name the guest reaches either starts with
    PREPEND (the mapped store) or was passed unchanged by the final ok of a
    keyed map (names outside KEY and PREPEND)."""
    m = XattrMap.parse(f":map:{key}:{prepend}:")
    host = client(m, name)
    if isinstance(host, bytes):
        pre = prepend.encode()
        assert host.startswith(pre) or (key and not name.startswith(key.encode()) and host == name
                                         and not name.startswith(pre))


RULE = st.tuples(st.sampled_from(["prefix", "ok", "bad", "unsupported"]),
                 st.sampled_from(["client", "server", "all"]), PREFIX, PREFIX)


@settings(max_examples=200, deadline=None)
@given(rules=st.lists(RULE, min_size=1, max_size=6), sep=st.sampled_from(":/|%#"), name=NAME)
def test_parse_of_rendered_rules_and_first_match(rules, sep, name):
    text = " ".join(sep + sep.join(r) + sep for r in rules if sep not in "".join(r))
    if not text:
        return
    m = XattrMap.parse(text)
    assert XattrMap.parse(" ".join(r.render("\x01") for r in m.rules)) == m
    # the client answer is decided by the first rule of client scope whose key matches
    first = next((r for r in m.rules if r.client and name.startswith(r.key)), None)
    got = client(m, name)
    if first is None or first.type == "bad":
        assert got == errno.EPERM
    elif first.type == "unsupported":
        assert got == errno.ENOTSUP
    else:
        assert got == (name if first.type == "ok" else first.prepend + name)
