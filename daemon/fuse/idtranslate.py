"""``--translate-uid`` / ``--translate-gid``: user and group ids translated
between guest and host by the daemon itself (no user namespace; that is
``--uid-map``/``--gid-map``).

Each option gives one rule, ``TYPE:A:B:COUNT`` (the Rust virtiofsd's
syntax: the separator is whatever character follows the type, the same
for all fields; ids and counts are decimal u32), and may be given many
times:

==============  =====================================================  ===========
type            meaning                                                direction
==============  =====================================================  ===========
guest           guest ids [A, A+COUNT) are host ids [B, B+COUNT)       guest → host
host            host ids [A, A+COUNT) are guest ids [B, B+COUNT)       host → guest
squash-guest    guest ids [A, A+COUNT) all become host id B            guest → host
squash-host     host ids [A, A+COUNT) all become guest id B            host → guest
forbid-guest    ``forbid-guest:A:COUNT``: guest ids [A, A+COUNT) may   guest → host
                not be used: creating a file as one, or chown to one,
                fails with EPERM
map             ``map:GUEST:HOST:COUNT``: guest and host ranges        both
==============  =====================================================  ===========

An id no rule of its direction covers is passed unchanged, so the two
directions need not be inverses of each other. Source ranges of one
direction may not overlap; a range that runs past 2^32 - 1 (the source's
or, unlike the Rust daemon, which would overflow, the target's), a count of
0, an unknown type or a wrong number of fields is an error at start, one
line (``IdMapError``).

Where it applies: guest → host to the credentials the creating ops act
with (``fs.as_caller``: the caller's uid and gid, and the supplementary
group of FUSE_CREATE_SUPP_GROUP) and to the owner and group of a SETATTR
chown (``Ids.host_owner``, in attrs.do_setattr); host → guest to every uid
and gid reported (GETATTR, SETATTR, LOOKUP, CREATE, MKNOD, MKDIR, SYMLINK,
LINK and READDIRPLUS entries: ``TranslatedTimeouts``, the session's reply
structs when a rule is given, so the hot path costs nothing without one). A forbidden id is EPERM (the Rust
daemon answers EIO: its error carries no errno). POSIX ACLs name ids the
daemon would not translate, so ``--posix-acl`` is refused with these
options, as in the Rust daemon.
"""

from __future__ import annotations

import bisect
import errno
import re
from typing import NamedTuple

from daemon.fuse import abi, replies
from daemon.fuse.request import FUSEError

ID_MAX = 0xFFFFFFFF     # (u32)-1 is never an id: no range may reach it
TYPES = {"guest": 3, "host": 3, "squash-guest": 3, "squash-host": 3, "forbid-guest": 2, "map": 3}
_PREFIX = re.compile(r"[A-Za-z0-9_-]*")
_FORBID = -1


class IdMapError(ValueError):
    """A malformed or conflicting rule; the message names it."""


class Rule(NamedTuple):
    type: str
    fields: tuple[int, ...]

    def __str__(self) -> str:
        return ":".join((self.type, *map(str, self.fields)))


def parse_rule(text: str) -> Rule:
    """One ``TYPE<sep>N<sep>N[<sep>N]`` rule (IdMapError if malformed)."""
    type_ = _PREFIX.match(text).group(0)     # type: ignore[union-attr]  # matches always
    rest = text[len(type_):]
    if not rest:
        raise IdMapError(f"{text}: expected TYPE:A:B:COUNT")
    fields = rest[1:].split(rest[0])
    type_ = type_.lower()
    if type_ not in TYPES:
        raise IdMapError(f"{text}: unknown type {type_!r} ({', '.join(TYPES)})")
    if len(fields) != TYPES[type_]:
        raise IdMapError(f"{text}: {type_} takes {TYPES[type_]} numbers, not {len(fields)}")
    values = []
    for field in fields:
        if not field.isdigit() or not field.isascii() or int(field) > ID_MAX:
            raise IdMapError(f"{text}: {field!r} is not a number in 0..{ID_MAX}")
        values.append(int(field))
    return Rule(type_, tuple(values))


class IdMap:
    """One direction's ranges: ``map(id)`` is the translated id (unchanged
    outside every range), FUSEError(EPERM) for a forbidden one."""

    __slots__ = ("_starts", "_ranges")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, int, bool]] = []   # (start, end, target, squash)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def add(self, rule: Rule, start: int, count: int, target: int, squash: bool = False) -> None:
        if count == 0:
            raise IdMapError(f"{rule}: a count of 0 maps nothing")
        end = start + count
        if end > ID_MAX:
            raise IdMapError(f"{rule}: the range runs past {ID_MAX - 1}")
        if target != _FORBID and not squash and target + count > ID_MAX:
            raise IdMapError(f"{rule}: the target range runs past {ID_MAX - 1}")
        i = bisect.bisect_left(self._starts, start)
        if (i < len(self._ranges) and self._ranges[i][0] < end) or \
                (i > 0 and self._ranges[i - 1][1] > start):
            raise IdMapError(f"{rule}: overlaps an earlier rule of the same direction")
        self._starts.insert(i, start)
        self._ranges.insert(i, (start, end, target, squash))

    def map(self, value: int) -> int:
        i = bisect.bisect_right(self._starts, value) - 1
        if i >= 0:
            start, end, target, squash = self._ranges[i]
            if value < end:
                if target == _FORBID:
                    raise FUSEError(errno.EPERM)
                return target if squash else target + value - start
        return value


class Translation:
    """Both directions of one id kind (uids or gids)."""

    __slots__ = ("to_host", "to_guest", "rules")

    def __init__(self, rules) -> None:
        self.rules = tuple(rules)
        self.to_host = IdMap()
        self.to_guest = IdMap()
        for rule in self.rules:
            t, f = rule.type, rule.fields
            if t == "guest":
                self.to_host.add(rule, f[0], f[2], f[1])
            elif t == "host":
                self.to_guest.add(rule, f[0], f[2], f[1])
            elif t == "squash-guest":
                self.to_host.add(rule, f[0], f[2], f[1], squash=True)
            elif t == "squash-host":
                self.to_guest.add(rule, f[0], f[2], f[1], squash=True)
            elif t == "forbid-guest":
                self.to_host.add(rule, f[0], f[1], _FORBID)
            else:  # map
                self.to_host.add(rule, f[0], f[2], f[1])
                self.to_guest.add(rule, f[1], f[2], f[0])

    @classmethod
    def parse(cls, texts) -> Translation:
        return cls(parse_rule(t) for t in texts)

    def __repr__(self) -> str:
        return f"Translation({[str(r) for r in self.rules]})"


class Ids(NamedTuple):
    """--translate-uid and --translate-gid (either may be empty)."""
    uid: Translation
    gid: Translation

    def host_ids(self, uid: int, gid: int, groups=()) -> tuple[int, int, tuple[int, ...]]:
        """A guest caller's (uid, gid, supplementary groups) on the host;
        FUSEError(EPERM) for a forbidden one."""
        to_gid = self.gid.to_host.map
        return self.uid.to_host.map(uid), to_gid(gid), tuple(to_gid(g) for g in groups)

    def guest_ids(self, uid: int, gid: int) -> tuple[int, int]:
        return self.uid.to_guest.map(uid), self.gid.to_guest.map(gid)

    def host_owner(self, uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
        """A SETATTR chown's new owner and group on the host (None: not
        changed); FUSEError(EPERM) for a forbidden one."""
        return (None if uid is None else self.uid.to_host.map(uid),
                None if gid is None else self.gid.to_host.map(gid))


class TranslatedTimeouts(replies.Timeouts):
    """The reply structs of ``replies.Timeouts`` with every reported owner
    and group translated host → guest. ``entry_out`` (LOOKUP, the creating
    ops, READDIRPLUS entries) embeds ``attr_out``'s fuse_attr, so this one
    override covers every reply that carries ids. Packed as without
    translation, the two ids rewritten in place: the session picks this
    class only when a rule is given, so the plain path pays nothing."""

    __slots__ = ("_ids",)

    def __init__(self, seconds: float, ids: Ids):
        super().__init__(seconds)
        self._ids = ids

    def attr_out(self, st, flags: int = 0) -> bytes:
        out = bytearray(super().attr_out(st, flags))
        abi.IDS.pack_into(out, abi.ATTR_OUT_IDS_AT, *self._ids.guest_ids(st.st_uid, st.st_gid))
        return bytes(out)
