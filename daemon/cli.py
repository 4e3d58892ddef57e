"""Command line: the Rust virtiofsd's option names, one ``Config`` out.

Every user error (bad option, missing directory, occupied socket...) is one
line on stderr, ``pyvirtiofsd: error: ...``, and exit status 1.
"""

from __future__ import annotations

import argparse
import grp
import os
import sys

import daemon
from daemon import compat, log, sandbox
from daemon.config import DEFAULTS, CacheMode, Config
from daemon.fuse import idtranslate, inodecache, xattrmap
from daemon.sandbox import capabilities, idmap, namespaces, programs

PROG = "pyvirtiofsd"
MAX_THREAD_POOL_SIZE = 255          # one request queue per vring, vring indexes are 8 bits
MAX_INODE_TABLE_SIZE = 1 << 26


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _int_arg(name: str, low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value
    parse.__name__ = name
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="virtio-fs vhost-user device backend: shares a host directory with a QEMU guest "
                    "(vhost-user-fs-pci). Exactly one of --socket-path and --fd is required.",
    )
    p.add_argument("--socket-path", metavar="PATH",
                   help="vhost-user UNIX socket to create and listen on (a stale socket file is replaced)")
    p.add_argument("--fd", metavar="N", type=_int_arg("--fd", 0, 1 << 30),
                   help="an already listening UNIX socket inherited as file descriptor N")
    p.add_argument("--shared-dir", metavar="DIR", required=True, help="the directory to share with the guest")
    p.add_argument("--cache", choices=[m.value for m in CacheMode], default=CacheMode.AUTO.value,
                   help="how long the guest may cache names, attributes and data: never (0 s), "
                        "auto (1 s, default), always (1 day; only the guest changes the directory), "
                        "metadata (names and attributes 1 day, file data not cached: direct I/O)")
    p.add_argument("--log-level", choices=list(log.LEVELS), default="info",
                   help="least severe messages to log to stderr (default: info)")
    p.add_argument("--thread-pool-size", metavar="N", type=_int_arg("--thread-pool-size", 0, MAX_THREAD_POOL_SIZE),
                   default=DEFAULTS["max_request_workers"],
                   help="accepted for compatibility with the Rust virtiofsd; here it is the most request "
                        "worker processes (one per request queue QEMU configures; 0 counts as 1; "
                        f"default {DEFAULTS['max_request_workers']}); --request-queues wins over it")
    p.add_argument("--request-queues", metavar="N", type=_int_arg("--request-queues", 1, MAX_THREAD_POOL_SIZE),
                   default=None,
                   help="the most request queues offered to QEMU (its num-request-queues; one worker "
                        f"process each, all serving one file system; default {DEFAULTS['max_request_workers']}, "
                        f"at most {MAX_THREAD_POOL_SIZE}); QEMU refuses to start a device with more")
    p.add_argument("--xattr", action=argparse.BooleanOptionalAction, default=DEFAULTS["xattr"],
                   help="support extended attributes (default: on; the guest then sends a GETXATTR "
                        "before every write, which --no-xattr avoids, and --killpriv-v2 reduces to "
                        "one per file)")
    p.add_argument("--readdirplus", action=argparse.BooleanOptionalAction, default=None,
                   help="answer directory listings with each entry's attributes (READDIRPLUS; "
                        "default: on, off with --cache never, where the guest would discard them)")
    p.add_argument("--writeback", action=argparse.BooleanOptionalAction, default=DEFAULTS["writeback"],
                   help="let the guest cache writes and send them later, in larger WRITEs "
                        "(WRITEBACK_CACHE; not with --cache never; default: off)")
    p.add_argument("--announce-submounts", action=argparse.BooleanOptionalAction, default=False,
                   help="tell the guest which directories are other file systems mounted in the "
                        "shared directory, so it mounts them apart, each with a device number of "
                        "its own (as the host shows them; default: off)")
    p.add_argument("--posix-lock", action=argparse.BooleanOptionalAction, default=DEFAULTS["posix_lock"],
                   help="offer POSIX (fcntl) locks, taken on the host so guests sharing a directory "
                        "exclude each other (default: on)")
    p.add_argument("--flock", action=argparse.BooleanOptionalAction, default=DEFAULTS["flock"],
                   help="offer flock(2) locks, taken on the host likewise (default: on)")
    p.add_argument("--allow-direct-io", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS["allow_direct_io"],
                   help="open files with O_DIRECT on the host when the guest does, so its direct I/O "
                        "bypasses the host page cache too (default: dropped, the host caches)")
    p.add_argument("--inode-table-size", metavar="N", type=_int_arg("--inode-table-size", 1, MAX_INODE_TABLE_SIZE),
                   default=DEFAULTS["inode_table_size"],
                   help=f"most inodes the guest may hold at once (default {DEFAULTS['inode_table_size']})")
    p.add_argument("--sandbox", choices=list(sandbox.MODES), default=DEFAULTS["sandbox"],
                   help="how workers are confined: namespace (own mount/pid/net/ipc/uts namespaces, "
                        "pivot_root into the shared directory; default), chroot (for use inside a "
                        "container that forbids namespaces), none (debugging only: a loud warning)")
    p.add_argument("--inherit-namespaces", metavar="LIST", default="",
                   help="with --sandbox namespace: the namespaces among net, ipc, uts that workers "
                        "share with the supervisor instead of making their own, for a service manager "
                        "that gave the whole service private ones (the systemd unit); default: none")
    p.add_argument("--seccomp", choices=list(programs.SECCOMP_MODES), default=DEFAULTS["seccomp"],
                   help="what a system call outside a process's allow-list (policy/*.policy) does: "
                        "kill the process (default), log it, trap (SIGSYS), or none (no filter)")
    p.add_argument("--modcaps", metavar="CAPS",
                   help="change the request workers' capabilities, e.g. --modcaps=-mknod:+sys_admin")
    p.add_argument("--inode-file-handles", choices=["never", "prefer", "fallback", "mandatory"],
                   default="never",
                   help="never (default): inodes are held as O_PATH fds only; prefer: also keep "
                        "file handles so any worker can reopen any inode (needs CAP_DAC_READ_SEARCH, "
                        "which can reach the whole host file system the shared directory is on); "
                        "fallback: the Rust daemon's old name of prefer; mandatory: as prefer, and "
                        "refuse to start when the shared directory's file system cannot make them")
    p.add_argument("--inode-fd-cache", metavar="N", type=_int_arg("--inode-fd-cache", 16, 1 << 30),
                   help="with --inode-file-handles=prefer: the most O_PATH fds a request worker keeps "
                        "for inodes the guest knows; older ones are closed and reopened by file handle "
                        "when used again (default: a quarter of its RLIMIT_NOFILE)")
    p.add_argument("--rlimit-nofile", metavar="N", type=_int_arg("--rlimit-nofile", 0, 1 << 30),
                   help="RLIMIT_NOFILE for request workers (default: raised as far as allowed; "
                        "0 leaves it alone)")
    p.add_argument("--poll-max-us", metavar="US", type=_int_arg("--poll-max-us", 0, 1000),
                   default=DEFAULTS["poll_max_us"],
                   help="after serving requests, a request worker looks at its queue for up to this "
                        "many microseconds before it sleeps, the window adapting to how soon the guest "
                        "comes back (a guest that does not is never polled for); 0: never "
                        "(default: %(default)s)")
    p.add_argument("--metrics-socket", metavar="PATH",
                   help="answer each connection to this UNIX socket (mode 0600) with the daemon's "
                        "metrics in the Prometheus text format, then close it (default: no metrics)")
    p.add_argument("--killpriv-v2", action=argparse.BooleanOptionalAction, default=DEFAULTS["killpriv_v2"],
                   help="offer FUSE_HANDLE_KILLPRIV_V2: the guest no longer sends a chmod to clear "
                        "SUID/SGID before a write, truncate or open(O_TRUNC) by another user, it "
                        "asks the daemon to clear them as part of the operation, and it stops "
                        "asking for security.capability before every write (default: off, as the "
                        "C and Rust virtiofsd: the host must clear the bits itself, which a remote "
                        "host file system may not do)")
    _add_rust_options(p)
    p.add_argument("--print-capabilities", action=_PrintCapabilities,
                   help="print the vhost-user backend capabilities as JSON and exit (for libvirt)")
    p.add_argument("-o", metavar="OPT[,OPT...]", dest="compat_o", action="append",
                   help="QEMU's C virtiofsd options, as libvirt passes them: source=DIR, cache=none|auto|"
                        "always, sandbox=..., log_level=..., modcaps=..., [no_]xattr, [no_]readdirplus, "
                        "[no_]writeback, [no_]posix_lock, [no_]flock, [no_]allow_direct_io, "
                        "announce_submounts, xattrmap=RULES, [no_]posix_acl, [no_]security_label, debug; "
                        "-d is --log-level debug")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {daemon.__version__}")
    return p


# The Rust virtiofsd 1.13's options added for issue 17 (spelling and
# defaults as its --help): (names, argparse keywords)
_RUST_OPTIONS = (
    (("--socket",), {
        "metavar": "PATH", "dest": "socket_path",
        "help": "the Rust daemon's deprecated name of --socket-path"}),
    (("--socket-group",), {
        "metavar": "GROUP",
        "help": "make GROUP the vhost-user socket's group, and its mode 0660 (with --socket-path)"}),
    (("--tag",), {
        "metavar": "TAG",
        "help": "the tag the device offers the guest in its config space (vhost-user GET_CONFIG, "
                "protocol feature CONFIG offered only with this option; QEMU 7.2 ignores it and "
                "takes the tag from its own tag= property); 1..36 bytes"}),
    (("--xattrmap",), {
        "metavar": "RULES",
        "help": "rename extended attributes between guest and host by rules, e.g. "
                ":map::user.virtiofs.: (the Rust daemon's rule language; needs --xattr)"}),
    (("--readonly",), {
        "action": "store_true",
        "help": "refuse every change to the shared directory (EROFS); it is also mounted "
                "read-only in the request workers' sandbox"}),
    (("--allow-mmap",), {
        "action": "store_true",
        "help": "with --cache never or metadata, let the guest mmap files shared all the same "
                "(FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6 or later guests; an older guest does not "
                "offer it and nothing changes)"}),
    (("--preserve-noatime",), {
        "action": "store_true",
        "help": "keep the guest's O_NOATIME when opening files (default: dropped, since it "
                "fails with EPERM on files the caller does not own)"}),
    (("--posix-acl",), {
        "nargs": "?", "const": "auto", "default": "never", "choices": ["never", "auto", "always"],
        "help": "POSIX ACLs: the guest enforces them and they are kept on the host as "
                "system.posix_acl_* attributes, default ACLs inherited on create (implies --xattr). "
                "Alone or =auto: when the guest offers it; =always: a guest that does not fails "
                "to mount; =never: off (default)"}),
    (("--security-label",), {
        "nargs": "?", "const": "auto", "default": "never", "choices": ["never", "auto", "always"],
        "help": "store the security label (SELinux) the guest gives each new file, set before "
                "its name appears, as the extended attribute it names (renamed by --xattrmap; "
                "implies --xattr). Alone or =auto: when the guest offers FUSE_SECURITY_CTX; "
                "=always: a guest that does not fails to mount; =never: off (default)"}),
    (("--translate-uid",), {
        "metavar": "TYPE:A:B:COUNT", "action": "append", "default": [],
        "help": "translate user ids between guest and host in the daemon (no user namespace); "
                "TYPE: guest (guest ids A.. are host ids B..), host (host ids A.. are guest ids "
                "B..), squash-guest (guest ids A.. all become host id B), squash-host (host ids "
                "A.. all become guest id B), forbid-guest:A:COUNT (EPERM for creating as or "
                "chown to those guest ids), map:GUEST:HOST:COUNT (both ways). Repeatable; "
                "not with --posix-acl"}),
    (("--translate-gid",), {
        "metavar": "TYPE:A:B:COUNT", "action": "append", "default": [],
        "help": "as --translate-uid, for group ids"}),
    (("--uid-map",), {
        "metavar": ":NS_UID:HOST_UID:COUNT:", "action": "append", "type": "idmap_range",
        "help": "for a daemon started by an ordinary user (or by root, confined to the maps): map "
                "COUNT host uids from HOST_UID on into the user namespace the daemon runs in (as "
                "its root) as NS_UID on, e.g. :0:100000:65536:; an ordinary user's ranges are "
                "written by newuidmap, so they must be this user's own uid or in /etc/subuid; "
                "give it once per range; namespace uid 0 must "
                "be mapped (--sandbox namespace only)"}),
    (("--gid-map",), {
        "metavar": ":NS_GID:HOST_GID:COUNT:", "action": "append", "type": "idmap_range",
        "help": "as --uid-map, for gids (newgidmap, /etc/subgid); with only one of the two "
                "options the other maps namespace id 0 to this user's own id"}),
    (("--syslog",), {
        "action": "store_true",
        "help": "log to syslog (/dev/log, opened at start) instead of stderr"}),
    (("-f",), {
        "dest": "foreground", "action": "store_true",
        "help": "accepted for compatibility, no effect (the daemon always runs in the foreground)"}),
)


def _add_rust_options(p: argparse.ArgumentParser) -> None:
    for names, keywords in _RUST_OPTIONS:
        if keywords.get("type") == "idmap_range":
            keywords = dict(keywords, type=_idmap_range(names[0]))
        p.add_argument(*names, **keywords)


def _idmap_range(option: str):
    def parse(text: str) -> idmap.IdRange:
        try:
            return idmap.parse_range(text)
        except idmap.IdMapError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = option
    return parse


def _id_maps(args) -> dict:
    """--uid-map/--gid-map checked as whole maps; the one not given maps
    namespace id 0 to this user's own (newuidmap/newgidmap allow that)."""
    if not args.uid_map and not args.gid_map:
        return {}
    if args.sandbox != "namespace":
        raise UsageError("--uid-map/--gid-map set up the user namespace of --sandbox namespace: "
                         f"not with --sandbox {args.sandbox}")
    uid_map = args.uid_map or [idmap.IdRange(0, os.getuid(), 1)]
    gid_map = args.gid_map or [idmap.IdRange(0, os.getgid(), 1)]
    try:
        return dict(uid_map=idmap.check_map("uid", uid_map), gid_map=idmap.check_map("gid", gid_map))
    except idmap.IdMapError as e:
        raise UsageError(str(e)) from None


class _PrintCapabilities(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(compat.CAPABILITIES_JSON)
        parser.exit(0)


def parse_config(argv: list[str]) -> Config:
    try:
        argv = compat.expand(argv)
    except compat.CompatError as e:
        raise UsageError(str(e)) from None
    args = build_parser().parse_args(argv)
    if (args.socket_path is None) == (args.fd is None):
        raise UsageError("exactly one of --socket-path and --fd is required")
    if args.socket_path == "":
        raise UsageError("--socket-path: empty path")
    if args.inode_fd_cache is not None and args.inode_file_handles == "never":
        raise UsageError("--inode-fd-cache needs --inode-file-handles=prefer (evicted inodes are "
                         "reopened by file handle)")
    if args.writeback and args.cache == CacheMode.NEVER.value:
        raise UsageError("--writeback needs the guest's page cache: not with --cache never")
    shared_dir = _check_shared_dir(args.shared_dir)
    parity = _rust_options(args, shared_dir)
    return Config(
        shared_dir=shared_dir,
        socket_path=args.socket_path,
        socket_fd=args.fd,
        cache=CacheMode(args.cache),
        log_level=args.log_level,
        max_request_workers=args.request_queues or max(1, args.thread_pool_size),
        xattr=args.xattr,
        readdirplus=args.readdirplus,
        writeback=args.writeback,
        announce_submounts=args.announce_submounts,
        posix_lock=args.posix_lock,
        flock=args.flock,
        allow_direct_io=args.allow_direct_io,
        inode_table_size=args.inode_table_size,
        sandbox=args.sandbox,
        inherit_namespaces=_check_inherited(args.inherit_namespaces, args.sandbox),
        seccomp=args.seccomp,
        modcaps=_check_modcaps(args.modcaps),
        file_handles=args.inode_file_handles != "never",
        inode_fds=args.inode_fd_cache,
        rlimit_nofile=args.rlimit_nofile,
        poll_max_us=args.poll_max_us,
        metrics_socket=_check_path("--metrics-socket", args.metrics_socket),
        killpriv_v2=args.killpriv_v2,
        **parity,
    )


def _check_inherited(text: str, mode: str) -> int:
    try:
        flags = namespaces.parse_inherited(text)
    except ValueError as e:
        raise UsageError(f"--inherit-namespaces: {e}") from None
    if flags and mode != "namespace":
        raise UsageError(f"--inherit-namespaces: workers make no namespaces with --sandbox {mode}")
    return flags


def _check_path(option: str, path: str | None) -> str | None:
    if path is not None and (not path or "\0" in path):
        raise UsageError(f"{option}: not a usable path")
    return path


def _rust_options(args, shared_dir: str) -> dict:
    """Config fields of the options _add_rust_options adds, checked."""
    rules = None
    if args.posix_acl != "never" and not args.xattr:
        raise UsageError("--posix-acl keeps ACLs as extended attributes: not with --no-xattr")
    if args.security_label != "never" and not args.xattr:
        raise UsageError("--security-label keeps labels as extended attributes: not with --no-xattr")
    if args.xattrmap is not None:
        if not args.xattr:
            raise UsageError("--xattrmap renames extended attributes: not with --no-xattr")
        try:
            rules = xattrmap.XattrMap.parse(args.xattrmap)
        except xattrmap.XattrMapError as e:
            raise UsageError(f"--xattrmap: {e}") from None
    ids = None
    if args.translate_uid or args.translate_gid:
        if args.posix_acl != "never":
            raise UsageError("--translate-uid/--translate-gid: not with --posix-acl (ACL entries "
                             "name ids the daemon would not translate)")
        ids = idtranslate.Ids(_translation("--translate-uid", args.translate_uid),
                              _translation("--translate-gid", args.translate_gid))
    if args.tag is not None:
        raw = args.tag.encode("utf-8", "surrogateescape")
        if not 1 <= len(raw) <= 36 or "\n" in args.tag:
            raise UsageError("--tag: 1..36 bytes, no newline (the guest refuses anything else)")
    if args.socket_group is not None:
        if args.socket_path is None:
            raise UsageError("--socket-group sets the group of the socket --socket-path creates")
        try:
            grp.getgrnam(args.socket_group)
        except KeyError:
            raise UsageError(f"--socket-group {args.socket_group}: no such group") from None
    mandatory = args.inode_file_handles == "mandatory"
    if mandatory:
        fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not inodecache.file_handle(fd):
                raise UsageError(f"--inode-file-handles=mandatory: the file system of {shared_dir} "
                                 f"cannot make file handles")
        finally:
            os.close(fd)
    return dict(xattrmap=rules, readonly=args.readonly, allow_mmap=args.allow_mmap,
                preserve_noatime=args.preserve_noatime, file_handles_mandatory=mandatory,
                socket_group=args.socket_group, syslog=args.syslog, tag=args.tag,
                posix_acl=args.posix_acl != "never", posix_acl_required=args.posix_acl == "always",
                security_label=args.security_label != "never",
                security_label_required=args.security_label == "always", ids=ids, **_id_maps(args))


def _translation(option: str, rules: list[str]) -> idtranslate.Translation:
    try:
        return idtranslate.Translation.parse(rules)
    except idtranslate.IdMapError as e:
        raise UsageError(f"{option} {e}") from None


def _check_modcaps(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        capabilities.parse_modcaps(text)
    except capabilities.ModcapsError as e:
        raise UsageError(f"--modcaps {text}: {e}") from None
    return text


def _check_shared_dir(path: str) -> str:
    """The directory must exist, be a directory and be readable and
    searchable by us; returns its canonical path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"--shared-dir {path}: {e.strerror}") from None
    try:
        os.listdir(fd)
    except OSError as e:
        raise UsageError(f"--shared-dir {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return os.path.realpath(path)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        config = parse_config(argv)
    except UsageError as e:
        return _fail(str(e))
    except SystemExit as e:            # --help, --version
        return e.code if isinstance(e.code, int) else 0

    from daemon import supervisor

    try:
        log.setup(config.log_level, syslog=config.syslog)
    except OSError as e:
        return _fail(f"--syslog: cannot reach {log.SYSLOG_PATH}: {e.strerror or e}")
    sandbox.warn_if_unconfined(config)
    try:
        return supervisor.run(config)
    except supervisor.StartupError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 1
