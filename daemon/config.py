"""The daemon's validated configuration, shared by the supervisor and workers.

``cli.py`` builds one ``Config`` from the command line; everything downstream
reads it and nothing mutates it after the workers are forked.
"""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from daemon.fuse.idtranslate import Ids
    from daemon.fuse.xattrmap import XattrMap

# The pure-Python request path on demand (docs/compiled.md): set and not
# "0", the workers run no compiled code and the shared tables keep the
# POSIX record lock (fuse/filetable.py). Read from the environment, not the
# command line, so that the tests run one daemon either way.
PURE_ENV = "PYVIRTIOFSD_PURE"


def pure_requested() -> bool:
    """Whether PYVIRTIOFSD_PURE asks for the pure-Python path."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


class CacheMode(enum.Enum):
    """--cache: how long the guest may trust what it was told.

    never:  entry/attr timeouts 0 and FOPEN_DIRECT_IO on every open file, so
            every read and stat goes to the host (shared with other writers).
    auto:   1 s timeouts, page cache kept until the file changes on the host.
    always: one day timeouts, FOPEN_KEEP_CACHE and FOPEN_CACHE_DIR: the guest
            owns the directory and nobody else changes it.
    metadata: one day timeouts (names and attributes), but FOPEN_DIRECT_IO on
            files: no file data cached (directories are, as with always).
    """

    NEVER = "never"
    AUTO = "auto"
    ALWAYS = "always"
    METADATA = "metadata"

    @property
    def timeout(self) -> float:
        return {"never": 0.0, "auto": 1.0, "always": 86400.0, "metadata": 86400.0}[self.value]


class Config(NamedTuple):
    shared_dir: str
    socket_path: str | None = None
    socket_fd: int | None = None
    cache: CacheMode = CacheMode.AUTO
    log_level: str = "info"
    # request worker processes: one per request queue QEMU configures, and at
    # most this many (QEMU's num-request-queues beyond it get no worker).
    max_request_workers: int = 8
    xattr: bool = True
    # READDIRPLUS offered to the guest; None: on unless cache=never, whose
    # zero timeouts make the guest discard the attributes it carries (the
    # C virtiofsd's default too)
    readdirplus: bool | None = None
    # WRITEBACK_CACHE offered to the guest: it keeps written data in its page
    # cache and sends it later, in larger WRITEs (not with cache=never)
    writeback: bool = False
    # a directory on another file system (st_dev) than its parent is marked
    # FUSE_ATTR_SUBMOUNT, so the guest mounts it apart with its own st_dev
    announce_submounts: bool = False
    # POSIX (fcntl) and flock locks offered to the guest, forwarded to the
    # host as OFD locks; off: the guest keeps its locks to itself
    posix_lock: bool = True
    flock: bool = True
    # the guest's O_DIRECT kept on the host (bypassing its page cache too)
    allow_direct_io: bool = False
    sandbox: str = "namespace"  # namespace | chroot | none (see daemon/sandbox)
    # CLONE_NEWNET/NEWIPC/NEWUTS flags a worker does not unshare: the service
    # manager gave the whole service private ones (--inherit-namespaces)
    inherit_namespaces: int = 0
    seccomp: str = "kill"       # kill | log | trap | none: the action for a syscall off the list
    modcaps: str | None = None  # "+cap:-cap" changes to the request workers' capabilities
    # re-open inodes by file handle (open_by_handle_at) in workers that never
    # looked them up: needs CAP_DAC_READ_SEARCH, which reaches the whole host
    # file system, so it is off unless asked for
    file_handles: bool = False
    rlimit_nofile: int | None = None
    # upper bound on inodes the guest may hold (size of the shared inode table)
    inode_table_size: int = 1 << 20
    # open host files (fh) the guest may hold before it gets ENFILE
    max_open_files: int = 1 << 16
    # with file_handles: the most O_PATH inode fds a request worker keeps
    # (older ones are closed and reopened by handle); None: a quarter of
    # its RLIMIT_NOFILE
    inode_fds: int | None = None
    # FUSE_HANDLE_KILLPRIV_V2 offered: the guest leaves clearing SUID/SGID on
    # write, truncate and open(O_TRUNC) to us (its KILL_SUIDGID flags)
    # instead of sending a chmod first, and marks its superblock SB_NOSEC, so
    # it stops asking for security.capability before every write. Off by
    # default, as in both reference daemons: docs/credentials.md says why
    killpriv_v2: bool = False

    # --poll-max-us: the longest a request worker's wait loop polls its ring
    # after serving, before it sleeps (adaptive, 0: never; daemon/fuse/_poll.h)
    poll_max_us: int = 8
    # where the supervisor answers Prometheus scrapes (None: no metrics, and
    # the workers count nothing)
    metrics_socket: str | None = None

    # -- the Rust virtiofsd 1.13's remaining options (issue 17) --
    # --xattrmap: guest <-> host attribute names (daemon/fuse/xattrmap.py)
    xattrmap: XattrMap | None = None
    # --readonly: every modifying request is EROFS, the share mounted
    # read-only in the request workers' sandbox
    readonly: bool = False
    # --allow-mmap: FUSE_DIRECT_IO_ALLOW_MMAP with cache=never|metadata
    allow_mmap: bool = False
    # --preserve-noatime: the guest's O_NOATIME kept (default: dropped)
    preserve_noatime: bool = False
    # --inode-file-handles=mandatory: fail at start without file handles
    file_handles_mandatory: bool = False
    # --socket-group: the socket's group (mode 0660)
    socket_group: str | None = None
    # --syslog: log to /dev/log instead of stderr
    syslog: bool = False
    # --posix-acl: FUSE_POSIX_ACL granted when offered (fuse/acl.py);
    # required: --posix-acl=always, INIT fails without it
    posix_acl: bool = False
    posix_acl_required: bool = False
    # --security-label: FUSE_SECURITY_CTX granted when offered, the guest's
    # label set on each new file (fuse/seclabel.py); required: =always
    security_label: bool = False
    security_label_required: bool = False
    # --translate-uid/--translate-gid: ids translated by the daemon (fuse/idtranslate.py)
    ids: Ids | None = None
    # --tag: the device config's tag (VHOST_USER_PROTOCOL_F_CONFIG offered)
    tag: str | None = None
    # --uid-map/--gid-map: an unprivileged start's user namespace, as
    # daemon.sandbox.idmap.IdRange tuples (empty: no user namespace)
    uid_map: tuple = ()
    gid_map: tuple = ()

    @property
    def offers_readdirplus(self) -> bool:
        if self.readdirplus is not None:
            return self.readdirplus
        return self.cache is not CacheMode.NEVER


DEFAULTS = Config._field_defaults  # field -> default, for --help
