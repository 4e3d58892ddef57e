"""FUSE kernel ABI 7.38 as Linux 6.1 speaks it over virtio-fs.

Every wire struct is declared once here, as a ``struct.Struct`` with the C
declaration from ``<linux/fuse.h>`` quoted beside it and its size checked at
import time. All integers are little-endian (x86-64 host and guest).
Handlers import the constants they need; nothing else in the daemon spells a
FUSE struct format.
"""

from __future__ import annotations

import enum
import struct

FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 38
FUSE_MIN_MINOR_VERSION = 27  # as the Rust virtiofsd: older kernels get EPROTO
FUSE_ROOT_ID = 1
FUSE_NAME_MAX = 1024  # kernel limit for a dirent name
NAME_MAX = 255  # host file systems' limit for one path component
OFFSET_MAX = (1 << 63) - 1  # the kernel's OFFSET_MAX, the largest loff_t (a lock's "to end of file")


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


def _checked(fmt: str, size: int) -> struct.Struct:
    s = struct.Struct(fmt)
    if s.size != size:  # pragma: no cover - import-time layout check
        raise AssertionError(f"{fmt!r} is {s.size} bytes, expected {size}")
    return s


# --- headers -------------------------------------------------------------
# struct fuse_in_header { uint32_t len; uint32_t opcode; uint64_t unique;
#   uint64_t nodeid; uint32_t uid; uint32_t gid; uint32_t pid;
#   uint16_t total_extlen; uint16_t padding; };
IN_HEADER = _checked("<IIQQIIIHH", 40)
# struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; };
OUT_HEADER = _checked("<IiQ", 16)
# fuse_in_header's first three fields (len, opcode, unique): all that a dead
# worker's successor reads of a request it answers EIO (workers/progress.py)
IN_HEADER_START = _checked("<IIQ", 16)

# --- INIT ------------------------------------------------------------------
# struct fuse_init_in { uint32_t major; uint32_t minor; uint32_t max_readahead;
#   uint32_t flags; uint32_t flags2; uint32_t unused[11]; };
INIT_IN = _checked("<5I44x", 64)
# Kernels before 7.36 send only the first 16 bytes (major..flags).
INIT_IN_COMPAT = _checked("<4I", 16)
# struct fuse_init_out { uint32_t major; uint32_t minor; uint32_t max_readahead;
#   uint32_t flags; uint16_t max_background; uint16_t congestion_threshold;
#   uint32_t max_write; uint32_t time_gran; uint16_t max_pages;
#   uint16_t map_alignment; uint32_t flags2; uint32_t unused[7]; };
INIT_OUT = _checked("<4IHHIIHHI28x", 64)


class InitFlag(enum.IntFlag):
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    # flags2, shifted by 32 when combined into one 64-bit value
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36   # 7.39: shared mmap of FOPEN_DIRECT_IO files


# --- request extensions (7.38; after the in-args, total_extlen * 8 bytes) ----
# struct fuse_ext_header { uint32_t size; uint32_t type; };
#   size: of this extension, header included, a multiple of 8
EXT_HEADER = _checked("<II", 8)
FUSE_MAX_NR_SECCTX = 31  # types 0..31: a fuse_secctx_header (SECURITY_CTX)
# struct fuse_secctx_header { uint32_t size; uint32_t nr_secctx; };
#   the extension header of a security context: type = nr_secctx (0 or 1 from Linux)
SECCTX_HEADER = _checked("<II", 8)
# struct fuse_secctx { uint32_t size; uint32_t padding; };
#   followed by the NUL-terminated xattr name, then ``size`` bytes of context,
#   the whole record padded to 8 (FUSE_REC_ALIGN)
SECCTX = _checked("<I4x", 8)
FUSE_EXT_GROUPS = 32
# struct fuse_supp_groups { uint32_t nr_groups; uint32_t groups[]; };
SUPP_GROUPS = _checked("<I", 4)
SUPP_GROUP = _checked("<I", 4)  # one of groups[]

# --- attributes and entries -----------------------------------------------
# struct fuse_attr { uint64_t ino; uint64_t size; uint64_t blocks;
#   uint64_t atime; uint64_t mtime; uint64_t ctime; uint32_t atimensec;
#   uint32_t mtimensec; uint32_t ctimensec; uint32_t mode; uint32_t nlink;
#   uint32_t uid; uint32_t gid; uint32_t rdev; uint32_t blksize; uint32_t flags; };
ATTR = _checked("<6Q10I", 88)
FUSE_ATTR_SUBMOUNT = 1
# struct fuse_entry_out { uint64_t nodeid; uint64_t generation;
#   uint64_t entry_valid; uint64_t attr_valid; uint32_t entry_valid_nsec;
#   uint32_t attr_valid_nsec; struct fuse_attr attr; };
ENTRY_OUT = _checked("<4QII6Q10I", 128)
# fields read back out of a packed fuse_entry_out: nodeid (CREATE's fh is
# registered for it), and attr.ino and attr.mode at offsets 40 and 100 (a
# fuse_direntplus repeats them in its fuse_dirent)
# fuse_entry_out up to its attr (nodeid .. attr_valid_nsec): the rest is a fuse_attr
ENTRY_OUT_HEAD = _checked("<4QII", 40)
ENTRY_OUT_NODEID = _checked("<Q", 8)
ENTRY_OUT_INO_MODE = _checked("<40xQ52xI", 104)
# struct fuse_attr_out { uint64_t attr_valid; uint32_t attr_valid_nsec;
#   uint32_t dummy; struct fuse_attr attr; };
ATTR_OUT = _checked("<QII6Q10I", 104)
# struct fuse_getattr_in { uint32_t getattr_flags; uint32_t dummy; uint64_t fh; };
GETATTR_IN = _checked("<IIQ", 16)
FUSE_GETATTR_FH = 1
# struct fuse_setattr_in { uint32_t valid; uint32_t padding; uint64_t fh;
#   uint64_t size; uint64_t lock_owner; uint64_t atime; uint64_t mtime;
#   uint64_t ctime; uint32_t atimensec; uint32_t mtimensec; uint32_t ctimensec;
#   uint32_t mode; uint32_t unused4; uint32_t uid; uint32_t gid; uint32_t unused5; };
SETATTR_IN = _checked("<I4xQQQQQQIIII4xII4x", 88)
# uid and gid side by side, and where they sit (--translate-uid/-gid
# rewrites them in packed replies and in SETATTR's arguments, idtranslate.py)
IDS = _checked("<II", 8)
ATTR_IDS_AT = struct.calcsize("<6Q5I")                             # fuse_attr.uid: 68
ATTR_OUT_IDS_AT = ATTR_OUT.size - ATTR.size + ATTR_IDS_AT          # 84
ENTRY_OUT_IDS_AT = ENTRY_OUT_HEAD.size + ATTR_IDS_AT               # 108
SETATTR_IN_IDS_AT = struct.calcsize("<I4xQQQQQQIIII4x")             # fuse_setattr_in.uid: 76


class SetattrValid(enum.IntFlag):
    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


# --- name-carrying ops ------------------------------------------------------
# struct fuse_forget_in { uint64_t nlookup; };
FORGET_IN = _checked("<Q", 8)
# struct fuse_batch_forget_in { uint32_t count; uint32_t dummy; };
BATCH_FORGET_IN = _checked("<I4x", 8)
# struct fuse_forget_one { uint64_t nodeid; uint64_t nlookup; };
FORGET_ONE = _checked("<QQ", 16)
# struct fuse_mknod_in { uint32_t mode; uint32_t rdev; uint32_t umask; uint32_t padding; };
MKNOD_IN = _checked("<III4x", 16)
# struct fuse_mkdir_in { uint32_t mode; uint32_t umask; };
MKDIR_IN = _checked("<II", 8)
# struct fuse_rename_in { uint64_t newdir; };
RENAME_IN = _checked("<Q", 8)
# struct fuse_rename2_in { uint64_t newdir; uint32_t flags; uint32_t padding; };
RENAME2_IN = _checked("<QI4x", 16)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
# struct fuse_link_in { uint64_t oldnodeid; };
LINK_IN = _checked("<Q", 8)

# --- open files -------------------------------------------------------------
# struct fuse_open_in { uint32_t flags; uint32_t open_flags; };
OPEN_IN = _checked("<II", 8)
FUSE_OPEN_KILL_SUIDGID = 1
# struct fuse_create_in { uint32_t flags; uint32_t mode; uint32_t umask; uint32_t open_flags; };
CREATE_IN = _checked("<IIII", 16)
# struct fuse_open_out { uint64_t fh; uint32_t open_flags; uint32_t padding; };
OPEN_OUT = _checked("<QI4x", 16)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
# struct fuse_release_in { uint64_t fh; uint32_t flags; uint32_t release_flags; uint64_t lock_owner; };
RELEASE_IN = _checked("<QIIQ", 24)
FUSE_RELEASE_FLUSH = 1
FUSE_RELEASE_FLOCK_UNLOCK = 2
# struct fuse_flush_in { uint64_t fh; uint32_t unused; uint32_t padding; uint64_t lock_owner; };
FLUSH_IN = _checked("<Q4x4xQ", 24)
# struct fuse_read_in { uint64_t fh; uint64_t offset; uint32_t size;
#   uint32_t read_flags; uint64_t lock_owner; uint32_t flags; uint32_t padding; };
READ_IN = _checked("<QQIIQI4x", 40)
# struct fuse_write_in { uint64_t fh; uint64_t offset; uint32_t size;
#   uint32_t write_flags; uint64_t lock_owner; uint32_t flags; uint32_t padding; };
WRITE_IN = _checked("<QQIIQI4x", 40)
FUSE_WRITE_CACHE = 1
FUSE_WRITE_LOCKOWNER = 2
FUSE_WRITE_KILL_SUIDGID = 4
# struct fuse_write_out { uint32_t size; uint32_t padding; };
WRITE_OUT = _checked("<I4x", 8)
# struct fuse_fsync_in { uint64_t fh; uint32_t fsync_flags; uint32_t padding; };
FSYNC_IN = _checked("<QI4x", 16)
FUSE_FSYNC_FDATASYNC = 1
# struct fuse_fallocate_in { uint64_t fh; uint64_t offset; uint64_t length; uint32_t mode; uint32_t padding; };
FALLOCATE_IN = _checked("<QQQI4x", 32)
# struct fuse_lseek_in { uint64_t fh; uint64_t offset; uint32_t whence; uint32_t padding; };
LSEEK_IN = _checked("<QQI4x", 24)
# struct fuse_lseek_out { uint64_t offset; };
LSEEK_OUT = _checked("<Q", 8)
# struct fuse_copy_file_range_in { uint64_t fh_in; uint64_t off_in; uint64_t nodeid_out;
#   uint64_t fh_out; uint64_t off_out; uint64_t len; uint64_t flags; };
COPY_FILE_RANGE_IN = _checked("<7Q", 56)

# --- statfs, xattr, locks, misc ---------------------------------------------
# struct fuse_kstatfs { uint64_t blocks; uint64_t bfree; uint64_t bavail;
#   uint64_t files; uint64_t ffree; uint32_t bsize; uint32_t namelen;
#   uint32_t frsize; uint32_t padding; uint32_t spare[6]; };
STATFS_OUT = _checked("<5QIII4x24x", 80)
# struct fuse_setxattr_in { uint32_t size; uint32_t flags; };  (no SETXATTR_EXT)
SETXATTR_IN = _checked("<II", 8)
# struct fuse_getxattr_in { uint32_t size; uint32_t padding; };
GETXATTR_IN = _checked("<I4x", 8)
# struct fuse_getxattr_out { uint32_t size; uint32_t padding; };
GETXATTR_OUT = _checked("<I4x", 8)
# struct fuse_file_lock { uint64_t start; uint64_t end; uint32_t type; uint32_t pid; };
# struct fuse_lk_in { uint64_t fh; uint64_t owner; struct fuse_file_lock lk;
#   uint32_t lk_flags; uint32_t padding; };
LK_IN = _checked("<QQQQIII4x", 48)
FUSE_LK_FLOCK = 1
# struct fuse_lk_out { struct fuse_file_lock lk; };
LK_OUT = _checked("<QQII", 24)
# struct fuse_interrupt_in { uint64_t unique; };
INTERRUPT_IN = _checked("<Q", 8)
# struct fuse_syncfs_in { uint64_t padding; };
SYNCFS_IN = _checked("<8x", 8)
# struct fuse_access_in { uint32_t mask; uint32_t padding; };
ACCESS_IN = _checked("<I4x", 8)

# --- directories ------------------------------------------------------------
# struct fuse_dirent { uint64_t ino; uint64_t off; uint32_t namelen; uint32_t type; char name[]; };
DIRENT = _checked("<QQII", 24)
# struct fuse_direntplus { struct fuse_entry_out entry_out; struct fuse_dirent dirent; };
DIRENTPLUS = _checked("<4QII6Q10IQQII", 152)


def dirent_size(namelen: int) -> int:
    """Aligned length of a ``fuse_dirent`` record (FUSE_DIRENT_ALIGN)."""
    return (DIRENT.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    """Aligned length of a ``fuse_direntplus`` record."""
    return (DIRENTPLUS.size + namelen + 7) & ~7
