"""QEMU's C virtiofsd command line, as libvirt and older scripts use it.

libvirt starts a virtiofsd with ``--fd=N -o source=DIR,cache=...,xattr,...``
(plus ``-d`` for debugging) unless the binary's ``--print-capabilities``
lists ``separate-options``; ours does, so a current libvirt passes our own
long options, but libvirt releases from before that feature (Debian 12's
9.0 among them) and scripts written for QEMU's C daemon pass ``-o``.
``expand(argv)`` rewrites those into our long options before argparse sees
them, so every value is checked in one place (cli.py) and an option we do
not implement is one clear error, never ignored.

``-o`` takes a comma-separated list; a comma inside a value is doubled
(libvirt's ``virQEMUBuildBufferEscapeComma``), e.g. ``source=/srv/a,,b``.
"""

from __future__ import annotations

# what --print-capabilities prints (vhost-user.rst, "Backend program
# conventions"): no "migrate-precopy", we cannot migrate a guest's state
CAPABILITIES_JSON = '{"type": "fs", "features": ["separate-options"]}'

# -o NAME (no value) → our long options
_FLAGS = {
    "xattr": ["--xattr"], "no_xattr": ["--no-xattr"],
    "readdirplus": ["--readdirplus"], "no_readdirplus": ["--no-readdirplus"],
    "writeback": ["--writeback"], "no_writeback": ["--no-writeback"],
    "posix_lock": ["--posix-lock"], "no_posix_lock": ["--no-posix-lock"],
    "flock": ["--flock"], "no_flock": ["--no-flock"],
    "announce_submounts": ["--announce-submounts"],
    "allow_direct_io": ["--allow-direct-io"], "no_allow_direct_io": ["--no-allow-direct-io"],
    "debug": ["--log-level", "debug"],
    "posix_acl": ["--posix-acl"], "no_posix_acl": ["--posix-acl=never"],
    "security_label": ["--security-label"], "no_security_label": ["--security-label=never"],
    "killpriv_v2": ["--killpriv-v2"], "no_killpriv_v2": ["--no-killpriv-v2"],
}
# -o NAME=VALUE → our long option (values are checked by cli.py)
_VALUES = {
    "source": "--shared-dir",
    "cache": "--cache",
    "sandbox": "--sandbox",
    "log_level": "--log-level",
    "modcaps": "--modcaps",
    "xattrmap": "--xattrmap",
}
# the C daemon's spellings of values that ours spell otherwise
_VALUE_NAMES = {("cache", "none"): "never", ("log_level", "err"): "error"}


class CompatError(Exception):
    """An ``-o`` option we do not implement, or a malformed one."""


def split_options(text: str) -> list[str]:
    """``-o``'s list: split on single commas, ``,,`` is a literal comma."""
    items, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    return [item for item in items if item]


def _translate(item: str) -> list[str]:
    name, eq, value = item.partition("=")
    if not eq:
        if name in _FLAGS:
            return list(_FLAGS[name])
        if name in _VALUES:
            raise CompatError(f"-o {name} needs a value ({name}=...)")
    elif name in _VALUES:
        # joined with "=": a value may start with "-" (modcaps=-mknod)
        return [f"{_VALUES[name]}={_VALUE_NAMES.get((name, value), value)}"]
    raise CompatError(f"-o {item}: not an option this daemon has (see --help)")


def expand(argv: list[str]) -> list[str]:
    """``argv`` with every ``-o LIST`` / ``-oLIST`` and ``-d`` replaced by
    our long options, in place (so later options still win)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg == "-o" or (arg.startswith("-o") and not arg.startswith("--")):
            if arg == "-o":
                if i + 1 >= len(argv):
                    raise CompatError("-o needs a list of options")
                text = argv[i + 1]
                i += 2
            else:
                text = arg[2:]
                i += 1
            for item in split_options(text):
                out.extend(_translate(item))
            continue
        out.append("--log-level=debug" if arg == "-d" else arg)
        i += 1
    return out
