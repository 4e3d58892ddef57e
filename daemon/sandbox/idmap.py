"""``--uid-map`` / ``--gid-map``: ranges of host ids mapped into the user
namespace an unprivileged daemon runs in (daemon/sandbox/userns.py).

Spelling as the Rust virtiofsd 1.13's: ``:namespace_id:host_id:count:``,
where the first and last character are the separator (any character that is
not a letter or digit, the same at both ends and between the fields). The
option may be given several times; each gives one line of
``/proc/PID/uid_map`` (``namespace_id host_id count``), written by
``newuidmap`` / ``newgidmap``.

The Rust daemon hands the ranges to those programs (and the kernel) as
they are and reports what they refuse at start. Here everything the kernel
would refuse is one usage error first (``IdMapError``): a count of 0, a
range that runs past 4294967294 on either side (the kernel keeps
``(uid_t)-1`` invalid), ranges that overlap on the namespace side or on the
host side, more than ``MAX_RANGES`` lines. What only ``newuidmap`` knows
(whether the user owns those host ids in ``/etc/subuid``) stays a start-up
error.

Root may give the maps too (libvirt passes a system domain's ``<idmap>``):
the daemon then writes them itself and holds no capability over host ids
outside them (the Rust daemon refuses the maps as root).

The daemon runs as root inside the namespace, so namespace id 0 must be
mapped (the Rust daemon goes on without it, as an unprivileged process
whose per-request credential changes then fail).
"""

from __future__ import annotations

from typing import NamedTuple

ID_LIMIT = 0xFFFFFFFF      # (uid_t)-1: never a valid id; a range ends below it
MAX_RANGES = 340           # the kernel's UID_GID_MAP_MAX_EXTENTS (Linux 4.15+)


class IdMapError(ValueError):
    """A map the kernel would refuse; the message is one line."""


class IdRange(NamedTuple):
    inside: int    # first id in the namespace
    outside: int   # first id on the host
    length: int   # how many ids

    def __str__(self) -> str:
        return f":{self.inside}:{self.outside}:{self.length}:"

    def to_host(self, ns_id: int) -> int | None:
        if self.inside <= ns_id < self.inside + self.length:
            return self.outside + ns_id - self.inside
        return None


def parse_range(text: str) -> IdRange:
    """``:ns:host:count:`` (any non-alphanumeric separator) -> IdRange.
    IdMapError names what is wrong."""
    if len(text) < 2:
        raise IdMapError(f"{text!r}: expected :namespace_id:host_id:count:")
    sep = text[-1]
    if sep.isalnum() or text[0] != sep:
        raise IdMapError(f"{text!r}: must start and end with the same separator, not a letter "
                         f"or digit (e.g. :0:100000:65536:)")
    fields = text[1:-1].split(sep)
    if len(fields) != 3:
        raise IdMapError(f"{text!r}: expected three fields, namespace_id, host_id and count "
                         f"(got {len(fields)})")
    values = []
    for name, field in zip(("namespace_id", "host_id", "count"), fields):
        if not field.isascii() or not field.isdigit():
            raise IdMapError(f"{text!r}: {name} {field!r} is not a number")
        values.append(int(field, 10))
    rng = IdRange(*values)
    if rng.length == 0:
        raise IdMapError(f"{text!r}: the count must be at least 1")
    for name, first in (("namespace", rng.inside), ("host", rng.outside)):
        if first + rng.length > ID_LIMIT:
            raise IdMapError(f"{text!r}: the {name} ids run past {ID_LIMIT - 1}")
    return rng


def check_map(kind: str, ranges: list[IdRange]) -> tuple[IdRange, ...]:
    """The ranges of one map (``kind``: uid or gid), sorted by namespace id:
    no overlap on either side, at most MAX_RANGES, namespace id 0 mapped."""
    if len(ranges) > MAX_RANGES:
        raise IdMapError(f"--{kind}-map: at most {MAX_RANGES} ranges (the kernel's limit), got {len(ranges)}")
    for side in ("inside", "outside"):
        ordered = sorted(ranges, key=lambda r: getattr(r, side))
        for a, b in zip(ordered, ordered[1:]):
            if getattr(a, side) + a.length > getattr(b, side):
                where = "namespace" if side == "inside" else "host"
                raise IdMapError(f"--{kind}-map {a} and {b} overlap on the {where} side")
    if not any(r.to_host(0) is not None for r in ranges):
        raise IdMapError(f"--{kind}-map must map namespace {kind} 0: the daemon runs as root inside "
                         f"the namespace (e.g. :0:HOST_{kind.upper()}:1:)")
    return tuple(sorted(ranges))


def newidmap_args(ranges: tuple[IdRange, ...]) -> list[str]:
    """The triples ``newuidmap PID`` / ``newgidmap PID`` take."""
    return [str(v) for r in ranges for v in r]
