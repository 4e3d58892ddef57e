"""Which metadata ops the compiled ops serve too (_meta.h; docs/compiled.md,
"GETXATTR in C", "UNLINK and RMDIR in C", "RENAME in C", "FLUSH in C").

``enable(fast, session)`` turns on, in a ``FastOps`` made by
``fastpath.make``, each of GETXATTR, UNLINK, RMDIR, FLUSH and RENAME whose row in
the session's op table is the reference handler and whose answer nothing
configured changes; ``served(session)`` names them for the start-up line.
What C then still leaves to Python per request (malformed requests, an
nodeid or fh this worker holds no fd of, ACL names, lock descriptions) is
listed in _meta.h.

Kept out of C, for the whole session:

- GETXATTR with ``--xattrmap`` (names are rewritten), ``--security-label``
  or ``--translate-uid``/``--translate-gid`` (not needed for today's
  GETXATTR, but each is a rule about what the guest sees: C stays out
  rather than follow them), or ``--no-xattr`` (the row answers ENOSYS);
- UNLINK, RMDIR and RENAME with ``--readonly`` (their rows answer EROFS);
- every op whose row is not the reference handler.
"""

from __future__ import annotations

from daemon.fuse import entries, filetable, files, xattrs
from daemon.fuse.abi import Opcode

# bit i of FastOps.enable_meta's ops: _meta.h's meta_slot order
OPS = (Opcode.GETXATTR, Opcode.UNLINK, Opcode.RMDIR, Opcode.FLUSH, Opcode.RENAME)
_HANDLERS = {Opcode.GETXATTR: xattrs.do_getxattr, Opcode.UNLINK: entries.do_unlink,
             Opcode.RMDIR: entries.do_rmdir, Opcode.FLUSH: files.do_flush,
             Opcode.RENAME: entries.do_rename}


def not_reference(session, *rows) -> str:
    """"" if every (opcode, handler) of ``rows`` is ``session``'s op table
    row (C serves an op only in place of its reference handler: a test or
    an option such as --readonly may replace a row), else why not."""
    for opcode, handler in rows:
        if session._ops.get(int(opcode)) is not handler:
            return f"{Opcode(opcode).name} is not the reference handler"
    return ""


def why_not(session, opcode: Opcode) -> str:
    """Why ``opcode`` stays in Python for ``session`` ("" if C may serve it)."""
    why = not_reference(session, (opcode, _HANDLERS[opcode]))
    if why:
        return why
    config = session.config
    if opcode == Opcode.GETXATTR:
        if not config.xattr:
            return "--no-xattr"
        if config.xattrmap is not None:
            return "--xattrmap"
        if config.security_label:
            return "--security-label"
        if config.ids is not None:
            return "--translate-uid/--translate-gid"
    return ""


def served(session) -> list[Opcode]:
    """The ops of OPS that C serves for ``session``."""
    return [op for op in OPS if not why_not(session, op)]


def enable(fast, session, op_words) -> None:
    """Turn on in ``fast`` the ops ``served`` names; ``op_words(opcode)``:
    an opcode's four metrics word indices (fastpath.meter_layout's), or
    None without a meter."""
    mask = 0
    for op in served(session):
        mask |= 1 << OPS.index(op)
    layout = None if op_words is None else tuple(op_words(op) for op in OPS)
    fast.enable_meta(mask, filetable._H_LOCKS, layout)
