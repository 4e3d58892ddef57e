"""``--xattrmap``: the Rust virtiofsd's rules for renaming extended attributes.

A guest's attribute names need not be the host's: a daemon that may not
write ``trusted.*`` or ``security.*`` on the host (or must not let the
guest's SELinux labels mean something to the host's) stores them under
another name. The rule language is the Rust (and QEMU's C) virtiofsd's:

    RULES  := RULE (whitespace* RULE)*
    RULE   := D type D scope D key D prepend D      (type: prefix|ok|bad|unsupported)
            | D "map" D key D prepend D              (at most one, the last rule)

``D`` is any one character (the rule's first non-blank one), used for the
whole rule, so a key may contain ``:`` if the rule uses ``/``. Scope is
``client`` (names the guest sends: GETXATTR, SETXATTR, REMOVEXATTR),
``server`` (names the host lists: LISTXATTR) or ``all``. A client name
matches a rule whose ``key`` is its prefix, a host name one whose
``prepend`` is; the first matching rule of the name's scope decides:

- ``prefix``: a client name becomes ``prepend + name`` (the key is kept);
  a host name loses its ``prepend``.
- ``ok``: the name passes unchanged.
- ``bad``: a client name is refused with EPERM; a host name is hidden.
- ``unsupported``: as ``bad`` but ENOTSUP (newer Rust releases have it).

``:map:KEY:PREPEND:`` is shorthand for ``:prefix:all:KEY:PREPEND:`` then,
with an empty KEY, ``:bad:all:::`` (nothing else is reachable), else
``:bad:all:PREPEND:KEY:`` (the guest may not name the stored form directly,
host names that look like the guest's are hidden) and ``:ok:all:::``. The
common ``:map::user.virtiofs.:`` stores every guest attribute as an
unprivileged ``user.virtiofs.*`` on the host and hides every other.

A ``prefix`` rule strips its ``prepend`` from every host name it matches,
whether or not the rest starts with its ``key`` (as the Rust daemon does):
with ``:map:trusted.:user.virtiofs.:`` a host attribute
``user.virtiofs.other`` is listed to the guest as ``other``, a name the
guest then reaches as the host's own ``other``.

A name no rule matches: the Rust daemon panics (its set must be
terminated); here a client name is refused with EPERM and a host name is
hidden, so an unterminated set is safe (it fails closed).

``XattrMap.parse`` raises ``XattrMapError`` with the rule's number for any
malformed set, which cli.py reports as one line at start.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from daemon.fuse.request import FUSEError

TYPES = ("prefix", "ok", "bad", "unsupported")
SCOPES = {"client": (True, False), "server": (False, True), "all": (True, True)}
_REFUSED = {"bad": errno.EPERM, "unsupported": errno.ENOTSUP}


class XattrMapError(ValueError):
    """A malformed rule set; the message names the rule (1-based)."""


class Rule(NamedTuple):
    type: str           # one of TYPES
    client: bool        # applies to names from the guest
    server: bool        # applies to names listed by the host
    key: bytes          # client-side prefix
    prepend: bytes      # host-side prefix

    def render(self, delim: str = ":") -> str:
        scope = {(True, False): "client", (False, True): "server", (True, True): "all"}[
            (self.client, self.server)]
        return delim + delim.join([self.type, scope, os.fsdecode(self.key),
                                   os.fsdecode(self.prepend)]) + delim


def _fields(text: str, pos: int, count: int, number: int) -> tuple[list[str], int]:
    """``count`` fields after the delimiter at ``text[pos]``, each ended by
    that delimiter; returns them and the position after the last one."""
    delim = text[pos]
    pos += 1
    fields = []
    for _ in range(count):
        end = text.find(delim, pos)
        if end < 0:
            raise XattrMapError(f"rule {number}: incomplete (every field ends with {delim!r})")
        fields.append(text[pos:end])
        pos = end + 1
    return fields, pos


def _name(field: str, number: int) -> bytes:
    if "\0" in field:
        raise XattrMapError(f"rule {number}: a NUL byte in a name")
    return os.fsencode(field)


def _expand_map(key: bytes, prepend: bytes) -> list[Rule]:
    rules = [Rule("prefix", True, True, key, prepend)]
    if not key:
        rules.append(Rule("bad", True, True, b"", b""))
    else:
        rules.append(Rule("bad", True, True, prepend, key))
        rules.append(Rule("ok", True, True, b"", b""))
    return rules


class XattrMap:
    """A parsed rule set (immutable). ``to_host`` maps a guest's name,
    ``to_guest`` a host's; ``list_to_guest`` a LISTXATTR answer."""

    __slots__ = ("rules",)

    def __init__(self, rules):
        self.rules: tuple[Rule, ...] = tuple(rules)

    def __eq__(self, other):
        return isinstance(other, XattrMap) and self.rules == other.rules

    def __hash__(self):
        return hash(self.rules)

    def __repr__(self):
        return f"XattrMap({' '.join(r.render() for r in self.rules)!r})"

    @classmethod
    def parse(cls, text: str) -> XattrMap:
        rules: list[Rule] = []
        pos, number, mapped = 0, 0, False
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            number += 1
            if mapped:
                raise XattrMapError(f"rule {number}: nothing may follow the map rule "
                                    f"(at most one, and last)")
            (type_,), after = _fields(text, pos, 1, number)
            if type_ == "map":
                (key, prepend), pos = _fields(text, after - 1, 2, number)
                rules.extend(_expand_map(_name(key, number), _name(prepend, number)))
                mapped = True
                continue
            if type_ not in TYPES:
                raise XattrMapError(f"rule {number}: unknown type {type_!r} "
                                    f"(prefix, ok, bad, unsupported or map)")
            (scope, key, prepend), pos = _fields(text, after - 1, 3, number)
            if scope not in SCOPES:
                raise XattrMapError(f"rule {number}: unknown scope {scope!r} (client, server or all)")
            client, server = SCOPES[scope]
            rules.append(Rule(type_, client, server, _name(key, number), _name(prepend, number)))
        if not rules:
            raise XattrMapError("no rules")
        return cls(rules)

    def to_host(self, name: bytes) -> bytes:
        """The host's name for the guest's ``name``; FUSEError(EPERM) for a
        ``bad`` rule or no rule, ENOTSUP for ``unsupported``."""
        for rule in self.rules:
            if rule.client and name.startswith(rule.key):
                if rule.type == "ok":
                    return name
                if rule.type == "prefix":
                    return rule.prepend + name
                raise FUSEError(_REFUSED[rule.type])
        raise FUSEError(errno.EPERM)

    def to_guest(self, name: bytes) -> bytes | None:
        """The guest's name for the host's ``name``, None if it is hidden
        (``bad``/``unsupported``, no rule, or nothing left after the prefix)."""
        for rule in self.rules:
            if rule.server and name.startswith(rule.prepend):
                if rule.type == "ok":
                    return name
                if rule.type == "prefix":
                    return name[len(rule.prepend):] or None
                return None
        return None

    def list_to_guest(self, names) -> bytes:
        """LISTXATTR's answer: the guest's names of the host's ``names``
        (bytes), each NUL-terminated, hidden ones left out."""
        out = []
        for name in names:
            mapped = self.to_guest(name)
            if mapped is not None:
                out.append(mapped + b"\0")
        return b"".join(out)
