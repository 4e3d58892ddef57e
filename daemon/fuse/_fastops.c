/*
 * The compiled request path, stage 2 (docs/compiled.md): whole FUSE
 * requests served in C for the common case, "not handled" (-1) for
 * everything else, which the Python session (session.py) then serves
 * exactly as before. daemon/fuse/fastpath.py decides when this runs and
 * builds the FastOps object; the pure-Python path stays the reference.
 *
 * GETATTR is served here when, and only when, every check of
 * FuseSession._handle passes and the reply is what attrs.do_getattr and
 * replies.Timeouts.attr_out would write:
 *   - the readable part is header.len bytes, with the whole 40-byte
 *     fuse_in_header in its first buffer; no request extensions;
 *   - the writable part holds fuse_out_header + fuse_attr_out (120 bytes);
 *   - this worker serves the shared table's current session (its
 *     session._session is the table's non-zero session word);
 *   - without GETATTR_FH: the nodeid is the root (cache.root_fd) or one
 *     whose O_PATH fd this worker caches (cache._fds) with the generation
 *     the shared table holds now (one 64-bit atomic load);
 *   - with GETATTR_FH (fstat of an open file): the fh is an open file this
 *     worker holds (as READ below) of that very nodeid; any other fh is
 *     Python's (it copies another worker's, or falls back to the inode);
 *   - the session's metrics meter (session.meter) is None or the one
 *     FastOps was made to count for (any other: Python serves and counts).
 * Then fstat(2) on that fd, and the reply header + fuse_attr_out (the
 * attribute timeout of --cache) written into the writable buffers, or, if
 * fstat fails, the error header (errno, EIO for one outside 1..4095).
 *
 * READ (when FastOps was made with reads=True: the op table's READ row is
 * files.do_read) likewise, under the same header, session and meter
 * conditions, when: the args hold the whole fuse_read_in and no
 * extensions; the offset is at most OFFSET_MAX; the fh is one this worker
 * holds (session.handles._handles) as an open file whose generation the
 * shared FileTable still holds; the payload part of the writable buffers
 * takes at most 1024 iovecs (IOV_MAX; Python batches more). Then
 * preadv2(2) of min(size, 1 MiB, room) bytes straight into the writable
 * buffers after the header, and the header (16 + bytes read), or the error
 * header for preadv's errno.
 *
 * WRITE (when FastOps was made with writes=True: the op table's WRITE row
 * is files.do_write; --readonly's EROFS row is not) likewise, when
 * (fast_write lists it): fuse_write_in whole, no extensions, an offset
 * at most OFFSET_MAX, a size that is exactly the data after the args and
 * at most 1 MiB, an fh held as for READ, at most 1024 data buffers, room
 * for the 24-byte reply. Then pwritev2(2) of the data straight from the
 * readable buffers (with FUSE_WRITE_KILL_SUIDGID and data, without
 * CAP_FSETID in this thread's effective set, as
 * credentials.without_fsetid: capget, capset before; capset after, a
 * failure after the write being the worker's end), and the header +
 * fuse_write_out {bytes written} (short writes: their count), or the
 * error header for pwritev's errno. In the batch loop a WRITE's chain is
 * taken and recorded before the write (not after the reply as GETATTR's
 * and READ's): a worker that dies during it leaves the chain to its
 * successor's EIO, as in the pure path, never to a second write.
 *
 * LOOKUP (when FastOps.enable_lookup was called) of a name whose inode
 * this worker holds, the first of an inode (opened and inserted as
 * InodeCache.adopt does), or a missing name: _lookup.h, included below,
 * says exactly when. CREATE (when FastOps.enable_create was called) of a
 * new name by a root caller: _create.h; MKDIR likewise: _mkdir.h. READDIRPLUS (when
 * FastOps.enable_readdirplus was called) on a directory handle this worker
 * holds, each entry looked up as LOOKUP does, and plain READDIR (when
 * FastOps.enable_readdir was called: the same stream, no lookups):
 * _readdir.h.
 *
 * GETXATTR, UNLINK, RMDIR, FLUSH and RENAME (those FastOps.enable_meta named:
 * fastmeta.py): _meta.h, included below, says exactly when. READLINK,
 * STATFS (FastOps.enable_readlink, enable_statfs) and the opcodes the op
 * table answers ENOSYS (enable_enosys): _attrs.h.
 *
 * With a meter (--metrics-socket), what C answers is counted here into
 * the worker's shared-memory slot as WorkerMeter.request counts it
 * (count() below; fastpath.meter_layout gives the word indices, checked
 * against the slot once at set-up), timed with the meter's clock,
 * CLOCK_MONOTONIC. What C declines Python serves and counts.
 *
 * Anything malformed is left to Python, which logs and answers it. The
 * GIL is released around fstat, preadv and pwritev, as os.fstat/os.preadv/
 * os.pwritev do; the
 * chain's views are only released by this thread, after the push.
 *
 * Guest memory: the request's header and args are copied out of the
 * readable buffers once (memcpy into locals) and only the copies are
 * checked and used; the reply is built in a local and copied into the
 * writable buffers, each write bounded by its buffer's length.
 *
 * Two ways in, one serving code (serve_req, on iovecs):
 *   - serve(chain), stage 2: a Chain popped in Python; its memoryviews'
 *     buffers become the iovecs;
 *   - batch(core, words, popped, limit), stage 3, the worker loop's batch:
 *     through _vqcore's C interface (its capsule, _vqcore_api.h) it peeks
 *     at the next chain walked into C-side iovecs of the largest region
 *     (every check of the Python walk; no Python object), serves it, and
 *     only then takes it from the avail ring, records it in the ring's
 *     progress record (progress.py: POPPED[(avail - 1) & 1023] = head,
 *     AVAIL = avail) and pushes its used element; until the ring is
 *     empty, limit chains are served, or the next chain is one it does
 *     not serve (or cannot walk: malformed, a buffer elsewhere), which it
 *     leaves untaken for the loop's VirtQueue.pop, so that Python serves
 *     it, or reports the malformed chain, exactly as before. The session
 *     state (meter, session word, caches) is looked up once per call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_vqcore_api.h"
#include "_tablelock.h"
#include "_threadlock.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "FUSE structs are little-endian here: little-endian hosts only"
#endif

#define IN_HEADER 40
#define OUT_HEADER 16
#define ATTR_OUT 104
#define GETATTR_IN 16
#define OP_LOOKUP 1
#define OP_GETATTR 3
#define OP_READ 15
#define READ_IN 40
#define OP_WRITE 16
#define OP_CREATE 35            /* _create.h */
#define OP_MKDIR 9              /* _mkdir.h */
#define OP_READDIR 28           /* _readdir.h */
#define OP_READDIRPLUS 44       /* _readdir.h */
#define OP_RELEASE 18           /* _release.h */
#define OP_RELEASEDIR 29        /* _release.h */
#define OP_OPEN 14              /* _open.h */
#define OP_OPENDIR 27           /* _open.h */
#define OP_SETATTR 4            /* _setattr.h */
#define WRITE_IN 40
#define WRITE_OUT 8
#define WRITE_KILL_SUIDGID 4    /* abi.FUSE_WRITE_KILL_SUIDGID: written without CAP_FSETID */
#define CAP_V3 0x20080522       /* credentials._CAP_V3 */
#define CAP_FSETID_BIT (1u << 4) /* 1 << credentials.CAP_FSETID, in the sets' first word */
#define KIND_FILE 1             /* handles.KIND_FILE */
#define MAX_IO_SIZE (1 << 20)   /* files.MAX_IO_SIZE */
#define FAST_IOV_MAX 1024       /* files.IOV_MAX: more buffers, Python batches */
#define GETATTR_FH 1
#define MAX_ARGS (1 << 17)      /* request.MAX_ARGS */
#define NOT_HANDLED (-1)

/* fuse_in_header, as abi.IN_HEADER ("<IIQQIIIHH") */
struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

/* fuse_attr, as abi.ATTR */
struct fuse_attr {
    uint64_t ino, size, blocks, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};

/* fuse_out_header + fuse_attr_out, as abi.OUT_HEADER + abi.ATTR_OUT */
struct attr_reply {
    uint32_t len;
    int32_t error;
    uint64_t unique;
    uint64_t attr_valid;
    uint32_t attr_valid_nsec, dummy;
    struct fuse_attr attr;
};

/* fuse_read_in, as abi.READ_IN ("<QQIIQI4x") */
struct read_in {
    uint64_t fh, offset;
    uint32_t size, read_flags;
    uint64_t lock_owner;
    uint32_t flags, padding;
};

/* fuse_write_in, as abi.WRITE_IN ("<QQIIQI4x") */
struct write_in {
    uint64_t fh, offset;
    uint32_t size, write_flags;
    uint64_t lock_owner;
    uint32_t flags, padding;
};

/* where one opcode counts in a metrics slot (metrics/counters.py): the
 * word indices of its requests, latency sum, first latency bucket, and
 * its errno slot 0 */
struct op_words {
    Py_ssize_t requests, latency_sum, buckets, errors;
};

#define MAX_BUCKETS 15          /* counters.OP_WORDS - OP_BUCKETS - 1 */
#define META_OPS 5              /* the ops of _meta.h */
#define ENOSYS_OPCODES 64       /* _attrs.h: enable_enosys takes opcodes below this (counters.OPCODE_SLOTS) */

/* the metrics slot this worker counts into, laid out by counters.py (the
 * indices come from fastpath.make, checked against the slot's length once) */
struct meter {
    Py_buffer words;            /* the slot, u64 words, held while FastOps lives */
    uint64_t *w;
    Py_ssize_t bytes_read, errno_slots, nbounds, bytes_written;
    struct op_words getattr, read, write, lookup;
    struct op_words meta[META_OPS]; /* GETXATTR, UNLINK, RMDIR, FLUSH, RENAME (_meta.h, enable_meta) */
    struct op_words create;     /* set by enable_create (_create.h) */
    struct op_words mkdir;      /* set by enable_mkdir (_mkdir.h) */
    struct op_words forget[2];  /* FORGET, BATCH_FORGET: set by enable_forget (_forget.h) */
    struct op_words readdirplus;    /* set by enable_readdirplus (_readdir.h) */
    struct op_words readdir;        /* set by enable_readdir (_readdir.h) */
    struct op_words release;    /* set by enable_release (_release.h) */
    struct op_words releasedir; /* set by enable_releasedir (_release.h) */
    struct op_words open, opendir;  /* set by enable_open (_open.h) */
    struct op_words setattr;    /* set by enable_setattr (_setattr.h) */
    struct op_words readlink, statfs;   /* set by enable_readlink, enable_statfs (_attrs.h) */
    struct op_words enosys[ENOSYS_OPCODES]; /* by opcode, set by enable_enosys (_attrs.h) */
    uint64_t bounds[MAX_BUCKETS];   /* LATENCY_BUCKETS_NS: the last bucket is above them all */
    /* set by enable_batches: the wait loop counts its wake-ups as
     * WorkerMeter.batch does; nbatch_bounds == 0: it does not (Python waits) */
    Py_ssize_t batches, chains, max_batch, batch_hist, open_files, inode_fds, nbatch_bounds;
    uint64_t batch_bounds[MAX_BUCKETS];     /* BATCH_BUCKETS */
};

/* fuse_out_header */
struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

/* fuse_out_header + fuse_write_out, as abi.OUT_HEADER + abi.WRITE_OUT */
struct write_reply {
    struct out_header o;
    uint32_t size, padding;
};

_Static_assert(sizeof(struct in_header) == IN_HEADER, "fuse_in_header");
_Static_assert(sizeof(struct read_in) == READ_IN, "fuse_read_in");
_Static_assert(sizeof(struct write_in) == WRITE_IN, "fuse_write_in");
_Static_assert(sizeof(struct write_reply) == OUT_HEADER + WRITE_OUT, "fuse_write_out");
_Static_assert(sizeof(struct out_header) == OUT_HEADER, "fuse_out_header");
_Static_assert(sizeof(struct attr_reply) == OUT_HEADER + ATTR_OUT, "fuse_attr_out");

/* the shared InodeTable as LOOKUP needs it (FastOps.enable_lookup) */
struct lookup_table {
    PyObject *hash;         /* InodeTable._hash, memoryview of u32; NULL: LOOKUP is Python's */
    PyObject *tlock;        /* InodeTable._tlock, the thread lock of LockedTable */
    struct table_locking lock;  /* InodeTable.lock_handle(): its TableLock, or the memfd of its record lock */
    int negative;           /* --cache=always: ENOENT is a negative entry */
    int last_cold;          /* the last LOOKUP's inode was new to this worker (found_entry) */
    uint64_t capacity, hmask;
    Py_ssize_t h_dirty, s_gen, s_ref, s_dev, s_ino;    /* inodes.py's word indices */
    /* and those an insertion writes (_lookup.h, insert_ref) */
    Py_ssize_t h_free, h_high, h_gen, h_live, s_next, s_hlen, s_owner, s_handle, handle_max;
    Py_ssize_t h_last;      /* the largest header word index of these */
};

/* READDIRPLUS as FastOps.enable_readdirplus sets it up (_readdir.h) */
struct readdir_conf {
    PyObject *entry;        /* dirs.plus_entry; NULL: READDIRPLUS is Python's */
    PyObject *stream_type;  /* dirs.DirStream */
    int names;              /* enable_readdir was called: plain READDIR is C's too */
};

/* MKDIR as FastOps.enable_mkdir sets it up (_mkdir.h) */
struct mkdir_conf {
    PyObject *rest;         /* fastpath.mkdir_rest; NULL: MKDIR is Python's */
    PyObject *creds;        /* credentials._state: the thread's cached fsuid/fsgid */
};

/* CREATE as FastOps.enable_create sets it up (_create.h) */
struct create_conf {
    PyObject *rest;         /* fastpath.create_rest; NULL: CREATE is Python's */
    PyObject *add;          /* fastpath.add_created */
    PyObject *creds;        /* credentials._state: the thread's cached fsuid/fsgid */
    uint32_t kept;          /* files.host_open_flags' mask */
    int writeback;          /* --writeback: files.writeback_flags */
    uint32_t fopen;         /* files.fopen_flags(--cache) */
};

/* FORGET and BATCH_FORGET as FastOps.enable_forget sets them up (_forget.h) */
struct forget_conf {
    PyObject *ring;         /* InodeTable._ring, memoryview of u32; NULL: FORGET is Python's */
    Py_ssize_t ring_w, ring_len;    /* inodes._H_RING_W, inodes.RING */
};

/* RELEASE as FastOps.enable_release sets it up (_release.h) */
struct release_conf {
    PyObject *files;        /* the HandleTable's FileTable; NULL: RELEASE is Python's */
    PyObject *tlock;        /* its _tlock */
    PyObject *hdr;          /* its _hdr, memoryview of u64 (held per request) */
    struct table_locking lock;  /* its lock_handle(): TableLock, or the memfd of its record lock (-1: private) */
    uint64_t capacity, kind_lock;
    Py_ssize_t h_dirty, h_free, h_live, h_released, h_locks, h_high, h_last;  /* filetable.py's word indices */
    Py_ssize_t f_gen, f_kind, f_owner, f_next, f_kept, f_node, f_lock_owner, words;
    int dirs;               /* enable_releasedir was called: RELEASEDIR is C's too */
};

/* READLINK, STATFS and ENOSYS as FastOps.enable_readlink, enable_statfs
 * and enable_enosys set them up (_attrs.h) */
struct attrs_conf {
    PyObject *too_big;      /* fastpath.reply_too_big; NULL: READLINK is Python's */
    PyObject *statfs_rest;  /* fastpath.statfs_rest; NULL: STATFS is Python's */
    uint64_t enosys;        /* bit n: opcode n is answered ENOSYS here */
};

/* OPEN and OPENDIR as FastOps.enable_open sets them up (_open.h) */
struct open_conf {
    PyObject *add;          /* fastpath.add_handle; NULL: OPEN and OPENDIR are Python's */
    PyObject *handle_type;  /* handles.OpenHandle */
    Py_ssize_t h_gen, h_high, f_node, f_flags, f_lock_owner;   /* filetable.py's, beside release_conf's */
    uint32_t kept;          /* files.host_open_flags' mask */
    int writeback;          /* --writeback: files.writeback_flags */
    uint32_t fopen, fopen_dir;  /* files.fopen_flags(--cache), OPENDIR's */
};

/* a word FastOps.wait watches: words[index] of the u64 view b, and the
 * value the loop last saw there (the wait returns when it differs) */
#define WAIT_WATCHES 4

struct watch {
    Py_buffer b;
    Py_ssize_t index;
    uint64_t value;
};

struct snapshot;           /* state_init's reads of the session (below) */
struct adopt_once;         /* a cold LOOKUP's reads of the inode cache (_lookup.h) */

/* one word of the slot plus n: a plain load and store (this thread is the
 * slot's only writer; the supervisor reads whole aligned words) */
static void add(uint64_t *w, Py_ssize_t i, uint64_t n)
{
    __atomic_store_n(&w[i], __atomic_load_n(&w[i], __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

#include "_poll.h"

typedef struct {
    PyObject_HEAD
    PyObject *session;      /* the FuseSession */
    PyObject *header;       /* InodeTable._hdr, memoryview of u64 */
    PyObject *slots;        /* InodeTable._q, memoryview of u64 */
    int reads;              /* READ served here too */
    int writes;             /* WRITE served here too */
    Py_ssize_t session_word, slot_words;
    uint64_t attr_sec;
    uint32_t attr_nsec;
    unsigned long long served;  /* requests answered here (tests, bench) */
    PyObject *meter;        /* the WorkerMeter counted for, or NULL */
    struct meter m;         /* valid when meter is set */
    struct lookup_table lk; /* LOOKUP (_lookup.h) */
    unsigned int meta;      /* _meta.h's ops served here: 1 << meta_slot(opcode) */
    Py_ssize_t h_locks;     /* FileTable._H_LOCKS (FLUSH, _meta.h) */
    struct create_conf cr;  /* CREATE (_create.h) */
    struct mkdir_conf mk;   /* MKDIR (_mkdir.h) */
    struct forget_conf fg;  /* FORGET, BATCH_FORGET (_forget.h): then nothing else */
    struct readdir_conf rd; /* READDIRPLUS (_readdir.h) */
    struct release_conf rl; /* RELEASE (_release.h) */
    struct open_conf op;    /* OPEN, OPENDIR (_open.h) */
    int setattr;            /* enable_setattr was called: SETATTR (_setattr.h) */
    struct attrs_conf at;   /* READLINK, STATFS, ENOSYS (_attrs.h) */
    struct watch *watching; /* while FastOps.wait runs: its watched words, else NULL */
    int nwatching;
    struct snapshot *kept;  /* while FastOps.wait runs: state_init's reads, kept for the call */
    struct adopt_once *kept_once;   /* while FastOps.wait runs: a cold LOOKUP's reads (_lookup.h), kept too */
    unsigned long long snapshots;   /* times those were read (tests) */
    unsigned long long lookup_reads;    /* times a cold LOOKUP's reads were made (once_read; tests) */
    struct poll_conf poll;  /* FastOps.wait's polling (_poll.h) */
} FastOps;

/* a watched word that this worker itself moved from `from` to `to`, where
 * the loop's own bookkeeping moved with it (HandleTable._freed): the wait
 * under way expects the new value, so it does not return to reap for it */
static void watch_moved(FastOps *self, const void *buf, Py_ssize_t index, uint64_t from, uint64_t to)
{
    for (int i = 0; i < self->nwatching; i++) {
        struct watch *x = &self->watching[i];
        if (x->b.buf == buf && x->index == index && x->value == from)
            x->value = to;
    }
}

static PyObject *s_readable, *s_writable, *s_views, *s_size, *s_session, *s_meter, *s_cache,
    *s_fds, *s_root_fd, *s_handles, *s_handles_dict, *s_fh_slots, *s_fd, *s_kind, *s_nodeid,
    *s_peers, *s_shared, *s_use_handles, *s_root_dev, *s_max_fds, *s_keeper_sock;

/* an attribute as a C integer; -1 with no error set if it is not an int
 * in range (the caller then leaves the request to Python) */
static int attr_ssize(PyObject *obj, PyObject *name, Py_ssize_t *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int ok = PyLong_CheckExact(v);
    if (ok) {
        *out = PyLong_AsSsize_t(v);
        ok = !(*out == -1 && PyErr_Occurred());
    }
    Py_DECREF(v);
    return ok ? 0 : -1;
}

/* a shared table of u64 words (InodeTable's or FileTable's memoryview),
 * held for one serve or batch call */
struct words {
    Py_buffer b;
    int held;
};

static int hold_words(PyObject *view, struct words *w)
{
    if (PyObject_GetBuffer(view, &w->b, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return -1;
    }
    w->held = 1;
    return 0;
}

static void drop_words(struct words *w)
{
    if (w->held) {
        PyBuffer_Release(&w->b);
        w->held = 0;
    }
}

/* word index of the table, read with one atomic load; -1 if the table is
 * not held or the index is outside it */
static int load_word(const struct words *w, Py_ssize_t index, uint64_t *out)
{
    if (!w->held || index < 0 || index >= w->b.len / 8 || ((uintptr_t)w->b.buf & 7))
        return -1;
    *out = __atomic_load_n((const uint64_t *)w->b.buf + index, __ATOMIC_RELAXED);
    return 0;
}

struct taking;

/* one request's two parts as iovecs: C-side ones from a raw chain (the
 * batch loop) or the buffers of a Chain's memoryviews (serve) */
struct req {
    const struct iovec *r, *w;
    int nr, nw;
    Py_ssize_t rsize, wsize;
    struct taking *take;    /* batch: take the chain before a side effect (NULL: taken already) */
};

/* what serving needs of the session, looked up once per serve or batch
 * call, when the first request gets that far (new references or NULL) */
struct state {
    int ready;
    Py_ssize_t mine;                /* session._session */
    Py_ssize_t root_fd;             /* session.cache.root_fd, -1 if none */
    PyObject *fds;                  /* session.cache._fds (dict) */
    PyObject *handles;              /* session.handles._handles (dict) */
    struct words header, inodes;    /* InodeTable: its header, its slots */
    struct words files;             /* session.handles._slots: the FileTable's */
    uint64_t wrote;                 /* the data bytes of the last WRITE answered (its meter count) */
    int touch;                      /* session.cache.peers.shared: READ touches its buffers (touch_pages) */
    int keeper_fd;                  /* the keeper's socket (Peers._keeper_sock), -1: none or Python's */
    struct words hash;              /* InodeTable._hash (LOOKUP), held when first needed */
    PyObject *tlock;                /* InodeTable._tlock, acquired by LOOKUP for the call, or NULL */
    struct words ring;              /* InodeTable._ring (FORGET, _forget.h), held when first needed */
};

/* What state_init reads of the session's Python objects (nine attribute
 * reads, about 2,000 instructions: 44 % of a depth-1 GETATTR's batch call
 * under callgrind), read once per FastOps.wait call rather than once per
 * batch: between the batches of one wait nothing rebinds them. Their
 * sources change only in Python that runs outside the wait: INIT and
 * DESTROY (session._session, cache.root_fd, InodeCache.clear's new _fds,
 * HandleTable.reset's new _handles), a peer worker's coming or going
 * (Peers._recount: shared), the session's set-up (cache, handles); a
 * request worker installs no Python signal handler, and its helper threads
 * (blocking.py) touch only their own call. A serve or batch call from
 * Python reads them afresh, as before. */
struct snapshot {
    int ready;              /* 0: not read, 1: read, -1: unreadable (every request Python's) */
    Py_ssize_t mine, root_fd;
    PyObject *fds;          /* session.cache._fds (dict), or NULL */
    PyObject *handles;      /* session.handles._handles (dict), or NULL with fh_slots */
    PyObject *fh_slots;     /* session.handles._fh_slots, held as words per batch */
    int touch;
    int keeper_fd;          /* cache.peers._keeper_sock's fd when handles.peers is that Peers, else -1 */
};

static void snapshot_drop(struct snapshot *s)
{
    Py_CLEAR(s->fds);
    Py_CLEAR(s->handles);
    Py_CLEAR(s->fh_slots);
    s->ready = 0;
}

/* the fd of peers._keeper_sock (a socket object) when peers is also the
 * handle table's (handles.peers, session.handles: OPEN's Peers.keep), else -1 */
static int keeper_fd_of(PyObject *peers, PyObject *handles)
{
    int fd = -1;
    if (peers == NULL || peers == Py_None || handles == NULL)
        return -1;
    PyObject *theirs = PyObject_GetAttr(handles, s_peers);
    PyObject *sock = theirs != peers ? NULL : PyObject_GetAttr(peers, s_keeper_sock);
    if (sock != NULL && sock != Py_None)
        fd = PyObject_AsFileDescriptor(sock);
    Py_XDECREF(sock);
    Py_XDECREF(theirs);
    PyErr_Clear();
    return fd < 0 ? -1 : fd;
}

/* read the snapshot's objects: 1, or -1 when the session has no _session
 * or cache (every request Python's); errors cleared */
static int snapshot_read(FastOps *self, struct snapshot *s)
{
    PyObject *cache = NULL, *handles = NULL;
    s->ready = -1;
    s->keeper_fd = -1;
    self->snapshots++;
    if (attr_ssize(self->session, s_session, &s->mine) < 0 || (cache = PyObject_GetAttr(self->session, s_cache)) == NULL)
        goto out;
    if (attr_ssize(cache, s_root_fd, &s->root_fd) < 0 || s->root_fd < 0 || s->root_fd > INT32_MAX) {
        PyErr_Clear();
        s->root_fd = -1;
    }
    s->fds = PyObject_GetAttr(cache, s_fds);
    if (s->fds == NULL || !PyDict_CheckExact(s->fds)) {
        PyErr_Clear();
        Py_CLEAR(s->fds);
    }
    /* no handle table (or not shaped like one): no fh is this worker's */
    if ((handles = PyObject_GetAttr(self->session, s_handles)) == NULL
            || (s->handles = PyObject_GetAttr(handles, s_handles_dict)) == NULL || !PyDict_CheckExact(s->handles)
            || (s->fh_slots = PyObject_GetAttr(handles, s_fh_slots)) == NULL) {
        PyErr_Clear();
        Py_CLEAR(s->handles);
        Py_CLEAR(s->fh_slots);
    }
    PyObject *peers = PyObject_GetAttr(cache, s_peers);
    PyObject *shared = peers == NULL || peers == Py_None ? NULL : PyObject_GetAttr(peers, s_shared);
    s->touch = shared == Py_True;
    Py_XDECREF(shared);
    PyErr_Clear();
    s->keeper_fd = keeper_fd_of(peers, handles);
    Py_XDECREF(peers);
    PyErr_Clear();
    s->ready = 1;
out:
    Py_XDECREF(handles);
    Py_XDECREF(cache);
    PyErr_Clear();
    return s->ready;
}

static int state_init(FastOps *self, struct state *st)
{
    struct snapshot fresh = {0}, *s = self->kept != NULL ? self->kept : &fresh;
    st->ready = -1;
    st->keeper_fd = -1;
    if (s->ready == 0)
        snapshot_read(self, s);
    if (s->ready > 0) {
        st->mine = s->mine;
        st->root_fd = s->root_fd;
        st->touch = s->touch;
        st->keeper_fd = s->keeper_fd;
        st->fds = Py_XNewRef(s->fds);
        if (s->handles != NULL && hold_words(s->fh_slots, &st->files) == 0)
            st->handles = Py_NewRef(s->handles);
        if (hold_words(self->header, &st->header) == 0 && hold_words(self->slots, &st->inodes) == 0)
            st->ready = 1;
    }
    snapshot_drop(&fresh);
    return st->ready;
}

static void state_drop(struct state *st)
{
    Py_CLEAR(st->fds);
    Py_CLEAR(st->handles);
    drop_words(&st->header);
    drop_words(&st->inodes);
    drop_words(&st->files);
    drop_words(&st->hash);
    drop_words(&st->ring);
    if (st->tlock != NULL) {        /* before Python runs again (it may want the table) */
        thread_lock_give(st->tlock);
        Py_CLEAR(st->tlock);
    }
}

/* copy n bytes at stream offset off of iovecs into mem (read) or from mem
 * into them (write); -1 if the iovecs run out */
static int iov_copy(const struct iovec *iov, int count, Py_ssize_t off, void *mem, Py_ssize_t n, int write)
{
    char *p = mem;
    for (int i = 0; i < count && n > 0; i++) {
        Py_ssize_t len = (Py_ssize_t)iov[i].iov_len;
        if (off >= len) {
            off -= len;
            continue;
        }
        Py_ssize_t k = len - off < n ? len - off : n;
        if (write)
            memcpy((char *)iov[i].iov_base + off, p, (size_t)k);
        else
            memcpy(p, (const char *)iov[i].iov_base + off, (size_t)k);
        __asm__ volatile("" ::: "memory");  /* the copy is what we use, never a re-read */
        p += k;
        n -= k;
        off = 0;
    }
    return n == 0 ? 0 : -1;
}

/* this worker's fd cache entry of nodeid key (InodeCache._fds: a
 * (generation, fd) tuple): 1 and *gen, *fd; 0 if there is none; -1 (any
 * error cleared) if it is not shaped like one */
static int cache_entry(const struct state *st, PyObject *key, uint64_t *gen, int *fd)
{
    PyObject *e = PyDict_GetItemWithError(st->fds, key);   /* borrowed */
    if (e == NULL)
        return PyErr_Occurred() ? (PyErr_Clear(), -1) : 0;
    if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(e, 0))
            || !PyLong_CheckExact(PyTuple_GET_ITEM(e, 1)))
        return -1;
    unsigned long long g = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(e, 0));
    long long f = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
    if (PyErr_Occurred() || f < 0 || f > INT32_MAX) {
        PyErr_Clear();
        return -1;
    }
    *gen = g;
    *fd = (int)f;
    return 1;
}

/* the O_PATH fd this worker holds for a live nodeid, -1 if it holds none
 * (InodeCache.fd: the root, or a cached fd whose generation still matches;
 * anything else, Python reopens or answers ESTALE) */
static int cached_fd(FastOps *self, const struct state *st, uint64_t nodeid)
{
    if (nodeid == 1)
        return (int)st->root_fd;
    if (nodeid == 0 || nodeid > (uint64_t)(PY_SSIZE_T_MAX / self->slot_words) || st->fds == NULL)
        return -1;
    PyObject *key = PyLong_FromUnsignedLongLong(nodeid);
    uint64_t gen, now;
    int fd, has = key == NULL ? -1 : cache_entry(st, key, &gen, &fd);
    Py_XDECREF(key);
    return has == 1 && load_word(&st->inodes, (Py_ssize_t)nodeid * self->slot_words, &now) == 0 && now == gen
           ? fd : -1;
}

/* the host fd of the live open file fh this worker holds, -1 if it holds
 * none (HandleTable.get's fast case: its OpenHandle of kind file whose
 * generation matches the shared FileTable's slot word; anything else,
 * Python copies it from another worker or answers EBADF); *nodeid: the
 * nodeid it was opened on */
static int open_fd(const struct state *st, uint64_t fh, Py_ssize_t *nodeid)
{
    if (st->handles == NULL)
        return -1;
    PyObject *key = PyLong_FromUnsignedLongLong(fh);
    if (key == NULL)
        return -1;
    PyObject *handle = PyDict_GetItemWithError(st->handles, key);     /* borrowed */
    Py_DECREF(key);
    Py_ssize_t kind, fd;
    uint64_t gen;
    if (handle != NULL && attr_ssize(handle, s_kind, &kind) == 0 && kind == KIND_FILE
            && attr_ssize(handle, s_fd, &fd) == 0 && fd >= 0 && fd <= INT32_MAX
            && load_word(&st->files, (Py_ssize_t)((fh & 0xFFFFFF) << 3), &gen) == 0 && gen == fh >> 24
            && attr_ssize(handle, s_nodeid, nodeid) == 0)
        return (int)fd;
    return -1;
}

/* replies.rdev32: the kernel's new_encode_dev() */
static uint32_t rdev32(dev_t rdev)
{
    uint64_t major = major(rdev), minor = minor(rdev);
    return (uint32_t)((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~(uint64_t)0xFF) << 12));
}

/* fuse_attr from a host stat (Timeouts.attr_out, flags 0); -1 for what
 * struct.pack would refuse (Python answers EIO): leave it to Python */
static int fill_attr(struct fuse_attr *a, const struct stat *s)
{
    if (s->st_size < 0 || s->st_blocks < 0 || s->st_blksize < 0 || (uint64_t)s->st_blksize > UINT32_MAX)
        return -1;
    a->ino = s->st_ino;
    a->size = (uint64_t)s->st_size;
    a->blocks = (uint64_t)s->st_blocks;
    a->atime = (uint64_t)s->st_atim.tv_sec;     /* times before 1970 wrap, as in Python */
    a->mtime = (uint64_t)s->st_mtim.tv_sec;
    a->ctime = (uint64_t)s->st_ctim.tv_sec;
    a->atimensec = (uint32_t)s->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)s->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)s->st_ctim.tv_nsec;
    a->mode = s->st_mode;
    a->nlink = s->st_nlink <= UINT32_MAX ? (uint32_t)s->st_nlink : UINT32_MAX;
    a->uid = s->st_uid;
    a->gid = s->st_gid;
    a->rdev = s->st_rdev ? rdev32(s->st_rdev) : 0;
    a->blksize = (uint32_t)s->st_blksize;
    return 0;
}

/* the errno an error reply carries (replies.error: EIO for one outside 1..4095) */
static int reply_errno(int err)
{
    return err > 0 && err < 4096 ? err : EIO;
}

/* an error reply; *error: its errno */
static Py_ssize_t error_reply(const struct req *q, uint64_t unique, int err, int *error)
{
    *error = reply_errno(err);
    struct out_header o = {OUT_HEADER, -*error, unique};
    return iov_copy(q->w, q->nw, 0, &o, OUT_HEADER, 1) < 0 ? NOT_HANDLED : OUT_HEADER;
}

/* GETATTR's reply (SETATTR's too, _setattr.h): fstat(fd), the GIL
 * released, then the header + fuse_attr_out (the attribute timeout of
 * --cache), or the error reply for fstat's errno; a stat struct.pack
 * would refuse: the error reply bad, or NOT_HANDLED for bad 0 */
static Py_ssize_t attr_answer(FastOps *self, const struct req *q, uint64_t unique, int fd, int bad, int *error)
{
    struct stat s;
    struct attr_reply r;
    memset(&r, 0, sizeof r);
    r.unique = unique;
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    rc = fstat(fd, &s);
    err = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return error_reply(q, unique, err, error);
    if (fill_attr(&r.attr, &s) < 0)
        return bad ? error_reply(q, unique, bad, error) : NOT_HANDLED;
    r.len = sizeof r;
    r.attr_valid = self->attr_sec;
    r.attr_valid_nsec = self->attr_nsec;
    return iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

/* GETATTR; NOT_HANDLED or the bytes written; *error: the reply's errno (0: success) */
static Py_ssize_t fast_getattr(FastOps *self, const struct state *st, const struct req *q,
                               const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    if (h->total_extlen || nargs > MAX_ARGS)
        return NOT_HANDLED;
    int fd = -1;
    if (nargs >= GETATTR_IN) {
        struct { uint32_t flags, dummy; uint64_t fh; } a;   /* fuse_getattr_in */
        if (iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0)
            return NOT_HANDLED;
        if (a.flags & GETATTR_FH) {
            Py_ssize_t of;
            fd = open_fd(st, a.fh, &of);
            if (fd < 0 || of < 0 || (uint64_t)of != h->nodeid)
                return NOT_HANDLED;
        }
    }
    if (fd < 0)
        fd = cached_fd(self, st, h->nodeid);
    if (fd < 0)
        return NOT_HANDLED;
    return attr_answer(self, q, h->unique, fd, 0, error);
}

static void take_chain(struct taking *t);

/* the iovecs of n bytes at stream offset off of the part (q->r or q->w
 * and their count) into out: how many, or -1 if they would be more than
 * FAST_IOV_MAX (the caller then declines: Python batches them) */
static int iov_range(const struct iovec *part, int count, Py_ssize_t off, Py_ssize_t n, struct iovec *out)
{
    int k = 0;
    for (int i = 0; i < count && n > 0; i++) {
        Py_ssize_t len = (Py_ssize_t)part[i].iov_len;
        if (off >= len) {
            off -= len;
            continue;
        }
        if (k == FAST_IOV_MAX)
            return -1;
        Py_ssize_t take = len - off < n ? len - off : n;
        out[k].iov_base = (char *)part[i].iov_base + off;
        out[k].iov_len = (size_t)take;
        k++;
        n -= take;
        off = 0;
    }
    return k;
}

/* Read one byte of every 4 KiB of the n buffers, when several request
 * workers serve (peers.shared): a READ's destination is then often guest
 * memory this worker process never touched (each worker maps guest RAM in
 * its own page tables, and the guest hands a page to whichever queue's
 * request it fills next). preadv's copy would take one write fault per
 * such page; a read fault maps the page's whole fault-around window
 * (64 KiB by default) at once, writable as the mapping is shared and shmem
 * keeps no dirty accounting: 256 faults per unmapped MiB become 16. With
 * one worker every page it met once stays mapped, and an A/B with one
 * queue did not show the touch paying (docs/perf/queues.md, "Page
 * faults"). The buffers are in guest memory the chain walk bounds-checked;
 * a page the guest never used is allocated here rather than by preadv
 * (or, past a short read's end, at all: guest RAM the guest owns). */
#define TOUCH_STRIDE 4096
static void touch_pages(const struct iovec *iov, int n)
{
    for (int i = 0; i < n; i++) {
        uintptr_t p = (uintptr_t)iov[i].iov_base, end = p + iov[i].iov_len;
        while (p < end) {
            (void)*(const volatile char *)p;
            p = (p | (TOUCH_STRIDE - 1)) + 1;
        }
    }
}

/* preadv2 (write: pwritev2) of n iovecs at offset, flags 0, retried on
 * EINTR, with the GIL released (touch: a read touches its buffers first,
 * touch_pages): the calls os.preadv and os.pwritev make,
 * the ones policy/request.policy allows (not preadv/pwritev); 0 for no
 * iovecs, without a call; -1 and *err: its errno */
static ssize_t file_io(int fd, const struct iovec *iov, int n, uint64_t offset, int write, int touch, int *err)
{
    ssize_t done = 0;
    *err = 0;
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        if (touch)
            touch_pages(iov, n);
        do
            done = write ? pwritev2(fd, iov, n, (off_t)offset, 0) : preadv2(fd, iov, n, (off_t)offset, 0);
        while (done < 0 && errno == EINTR);
        *err = errno;
        Py_END_ALLOW_THREADS
    }
    return done;
}

/* READ (files.do_read): preadv(2) straight into the writable buffers after
 * the 16-byte header; NOT_HANDLED or the bytes written */
static Py_ssize_t fast_read(const struct state *st, const struct req *q, const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    struct read_in a;
    if (h->total_extlen || nargs > MAX_ARGS || nargs < READ_IN
            || iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0 || a.offset > (uint64_t)INT64_MAX)
        return NOT_HANDLED;
    Py_ssize_t of;
    int fd = open_fd(st, a.fh, &of);
    if (fd < 0)
        return NOT_HANDLED;
    Py_ssize_t size = a.size < MAX_IO_SIZE ? (Py_ssize_t)a.size : MAX_IO_SIZE;
    if (size > q->wsize - OUT_HEADER)
        size = q->wsize - OUT_HEADER;
    struct iovec iov[FAST_IOV_MAX];
    int n = iov_range(q->w, q->nw, OUT_HEADER, size, iov);
    if (n < 0)
        return NOT_HANDLED;
    int err;
    ssize_t got = file_io(fd, iov, n, a.offset, 0, st->touch, &err);
    if (got < 0)
        return error_reply(q, h->unique, err, error);
    struct out_header o = {(uint32_t)(OUT_HEADER + got), 0, h->unique};
    return iov_copy(q->w, q->nw, 0, &o, OUT_HEADER, 1) < 0 ? NOT_HANDLED : OUT_HEADER + (Py_ssize_t)got;
}

/* capget(2)/capset(2)'s header and one word of the three sets
 * (credentials._CapHeader, _CapData: two of these) */
struct cap_header {
    uint32_t version;
    int pid;
};
struct cap_data {
    uint32_t effective, permitted, inheritable;
};

/* credentials.without_fsetid's drop for this thread: capget into *saved
 * and, if CAP_FSETID is effective, capset without it. 1: dropped (undo
 * with fsetid_restore), 0: it was not effective, -1 (*err: the errno):
 * failed, nothing changed */
static int fsetid_drop(struct cap_data saved[2], int *err)
{
    struct cap_header hdr = {CAP_V3, 0};
    if (syscall(SYS_capget, &hdr, saved) != 0) {
        *err = errno;
        return -1;
    }
    if (!(saved[0].effective & CAP_FSETID_BIT))
        return 0;
    struct cap_data data[2] = {saved[0], saved[1]};
    data[0].effective &= ~CAP_FSETID_BIT;
    if (syscall(SYS_capset, &hdr, data) != 0) {
        *err = errno;
        return -1;
    }
    return 1;
}

/* ... and its undo: the sets as fsetid_drop found them (what
 * _set_effective(CAP_FSETID, True) makes of them: the bit was effective,
 * so permitted, and nothing else changed on this thread since), one
 * capset, no second capget; 0, or -1 with *err */
static int fsetid_restore(struct cap_data saved[2], int *err)
{
    struct cap_header hdr = {CAP_V3, 0};
    if (syscall(SYS_capset, &hdr, saved) != 0) {
        *err = errno;
        return -1;
    }
    return 0;
}

/* CAP_FSETID could not be raised again after a KILL_SUIDGID write: as
 * credentials._fatal (log, exit), so that no later request runs without
 * it; exits even if that cannot be called */
static void fsetid_fatal(int err)
{
    PyObject *mod = PyImport_ImportModule("daemon.fuse.credentials");
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
    if (mod != NULL && exc != NULL)
        Py_XDECREF(PyObject_CallMethod(mod, "_fatal", "sO", "raise CAP_FSETID again", exc));
    _exit(1);
}

/* WRITE (files.do_write): the size bytes of data after
 * fuse_write_in (exactly what the readable part holds, at most 1 MiB) by
 * pwritev2(2) straight from the guest's buffers at offset into the open
 * file fh this worker holds; the reply header + fuse_write_out {bytes
 * written} (a short write: its count), or the error header for pwritev's
 * errno. With FUSE_WRITE_KILL_SUIDGID and data the write runs without
 * CAP_FSETID (fsetid_drop), so the host clears SUID/SGID; a failure
 * to drop it is the error header (its errno, EPERM for none) and no
 * write, as without_fsetid's FUSEError. Declined (Python: EINVAL, EBADF,
 * EIO): extensions, args shorter than fuse_write_in, a reply part
 * under 24 bytes, an offset past OFFSET_MAX, a
 * size that is not the data present or above 1 MiB, an fh not held, more
 * than IOV_MAX data buffers. In the batch loop the chain is taken (and
 * recorded in the progress record) before the write, as VirtQueue.pop
 * does: a worker dying in pwritev leaves it to its successor's EIO, never
 * to a second write (an O_APPEND file would get the data twice).
 * NOT_HANDLED or the bytes written; st->wrote: the data bytes written. */
static Py_ssize_t fast_write(struct state *st, const struct req *q, const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    struct write_in a;
    if (h->total_extlen || nargs < WRITE_IN || q->wsize < OUT_HEADER + WRITE_OUT
            || iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0)
        return NOT_HANDLED;
    Py_ssize_t size = nargs - WRITE_IN;    /* the data present */
    if (a.offset > (uint64_t)INT64_MAX || (uint64_t)a.size != (uint64_t)size || size > MAX_IO_SIZE)
        return NOT_HANDLED;
    Py_ssize_t of;
    int fd = open_fd(st, a.fh, &of);
    if (fd < 0)
        return NOT_HANDLED;
    struct iovec iov[FAST_IOV_MAX];
    int n = iov_range(q->r, q->nr, IN_HEADER + WRITE_IN, size, iov);
    if (n < 0)
        return NOT_HANDLED;
    /* answered from here on: the reply fits (wsize checked above) */
    if (q->take != NULL)
        take_chain(q->take);
    int err, dropped = 0;
    struct cap_data caps[2];
    if ((a.write_flags & WRITE_KILL_SUIDGID) && size) {
        dropped = fsetid_drop(caps, &err);
        if (dropped < 0)
            return error_reply(q, h->unique, err ? err : EPERM, error);
    }
    ssize_t put = file_io(fd, iov, n, a.offset, 1, 0, &err);
    int raise_err;
    if (dropped && fsetid_restore(caps, &raise_err) < 0)
        fsetid_fatal(raise_err);
    if (put < 0)
        return error_reply(q, h->unique, err, error);
    st->wrote = (uint64_t)put;
    struct write_reply r = {{OUT_HEADER + WRITE_OUT, 0, h->unique}, (uint32_t)put, 0};
    return iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

#include "_meta.h"

static int forget_slot(uint32_t opcode);     /* _forget.h */
static struct op_words *attrs_words(FastOps *self, int opcode);    /* _attrs.h */

/* count one answered request as WorkerMeter.request does: its opcode's
 * requests, latency (sum and bucket: the first bound at or above it),
 * its errno (0 for one at or above errno_slots) or the data bytes READ
 * replied */
static void count(FastOps *self, int opcode, const struct timespec *start, int error, Py_ssize_t written,
                  uint64_t wrote)
{
    struct meter *m = &self->m;
    const struct op_words *attrs = attrs_words(self, opcode);
    const struct op_words *op = attrs != NULL ? attrs : opcode == OP_READ ? &m->read : opcode == OP_WRITE ? &m->write
        : opcode == OP_LOOKUP ? &m->lookup : opcode == OP_CREATE ? &m->create
        : opcode == OP_MKDIR ? &m->mkdir
        : forget_slot((uint32_t)opcode) >= 0 ? &m->forget[forget_slot((uint32_t)opcode)]
        : opcode == OP_READDIRPLUS ? &m->readdirplus : opcode == OP_READDIR ? &m->readdir
        : opcode == OP_RELEASE ? &m->release : opcode == OP_RELEASEDIR ? &m->releasedir
        : opcode == OP_OPEN ? &m->open : opcode == OP_OPENDIR ? &m->opendir
        : opcode == OP_SETATTR ? &m->setattr
        : opcode == OP_GETATTR || meta_slot(opcode) < 0 ? &m->getattr : &m->meta[meta_slot(opcode)];
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    int64_t ns = (int64_t)(end.tv_sec - start->tv_sec) * 1000000000 + (end.tv_nsec - start->tv_nsec);
    uint64_t elapsed = ns > 0 ? (uint64_t)ns : 0;
    Py_ssize_t bucket = 0;
    while (bucket < m->nbounds && m->bounds[bucket] < elapsed)
        bucket++;
    add(m->w, op->requests, 1);
    add(m->w, op->latency_sum, elapsed);
    add(m->w, op->buckets + bucket, 1);
    if (error)
        add(m->w, op->errors + (error < m->errno_slots ? error : 0), 1);
    else if (opcode == OP_READ && written > OUT_HEADER)
        add(m->w, m->bytes_read, (uint64_t)(written - OUT_HEADER));
    else if (opcode == OP_WRITE)
        add(m->w, m->bytes_written, wrote);
}

/* len(obj.name) if that is a dict (the tables' own: HandleTable._handles,
 * InodeCache._fds), else len(obj) (its __len__); 0 for None or an error */
static uint64_t table_len(PyObject *obj, PyObject *name)
{
    if (obj == NULL || obj == Py_None)
        return 0;
    PyObject *dict = PyObject_GetAttr(obj, name);
    Py_ssize_t n = dict != NULL && PyDict_CheckExact(dict) ? PyDict_GET_SIZE(dict) : PyObject_Length(obj);
    Py_XDECREF(dict);
    if (n < 0) {
        PyErr_Clear();
        n = 0;
    }
    return (uint64_t)n;
}

/* count one wake-up of the wait loop that served n > 0 chains, as
 * WorkerMeter.batch does: BATCHES, CHAINS, MAX_BATCH, the bucket of n
 * (the first bound at or above it), and the two gauges from the session
 * (its open files, its cached inode fds) */
static void count_batch(FastOps *self, Py_ssize_t n)
{
    struct meter *m = &self->m;
    uint64_t *w = m->w;
    Py_ssize_t bucket = 0;
    while (bucket < m->nbatch_bounds && m->batch_bounds[bucket] < (uint64_t)n)
        bucket++;
    add(w, m->batches, 1);
    add(w, m->chains, (uint64_t)n);
    if ((uint64_t)n > __atomic_load_n(&w[m->max_batch], __ATOMIC_RELAXED))
        __atomic_store_n(&w[m->max_batch], (uint64_t)n, __ATOMIC_RELAXED);
    add(w, m->batch_hist + bucket, 1);
    const struct snapshot *k = self->kept;
    if (k != NULL && k->ready > 0 && k->handles != NULL && k->fds != NULL) {
        /* the wait's snapshot holds the two dicts */
        __atomic_store_n(&w[m->open_files], (uint64_t)PyDict_GET_SIZE(k->handles), __ATOMIC_RELAXED);
        __atomic_store_n(&w[m->inode_fds], (uint64_t)PyDict_GET_SIZE(k->fds), __ATOMIC_RELAXED);
        return;
    }
    PyObject *handles = PyObject_GetAttr(self->session, s_handles);
    if (handles == NULL)
        PyErr_Clear();
    __atomic_store_n(&w[m->open_files], table_len(handles, s_handles_dict), __ATOMIC_RELAXED);
    Py_XDECREF(handles);
    PyObject *cache = PyObject_GetAttr(self->session, s_cache);
    if (cache == NULL)
        PyErr_Clear();
    __atomic_store_n(&w[m->inode_fds], table_len(cache, s_fds), __ATOMIC_RELAXED);
    Py_XDECREF(cache);
}

/* enable_batches((batches, chains, max_batch, batch_hist, open_files,
 * inode_fds), bounds): see fastops_methods */
static PyObject *fastops_enable_batches(FastOps *self, PyObject *args)
{
    Py_ssize_t v[6];
    PyObject *bounds;
    if (!PyArg_ParseTuple(args, "(nnnnnn)O!", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &PyTuple_Type, &bounds))
        return NULL;
    if (self->meter == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_batches: no meter");
        return NULL;
    }
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds), n = self->m.words.len / 8;
    if (nb < 1 || nb > MAX_BUCKETS - 1) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_batches: bad bounds");
        return NULL;
    }
    int ok = v[3] >= 0 && v[3] <= n - nb - 1;
    for (int i = 0; i < 6 && ok; i++)
        ok = v[i] >= 0 && v[i] < n;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "FastOps: metrics layout outside the slot");
        return NULL;
    }
    uint64_t b[MAX_BUCKETS];
    for (Py_ssize_t i = 0; i < nb; i++) {
        b[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(bounds, i));
        if (PyErr_Occurred())
            return NULL;
    }
    struct meter *m = &self->m;
    m->batches = v[0], m->chains = v[1], m->max_batch = v[2], m->batch_hist = v[3];
    m->open_files = v[4], m->inode_fds = v[5];
    memcpy(m->batch_bounds, b, (size_t)nb * sizeof b[0]);
    m->nbatch_bounds = nb;
    Py_RETURN_NONE;
}

/* an enable_* call's meter words (requests, latency_sum, buckets, errors)
 * for name's op, each checked against the meter's slot, into *w: 0, 1 if words is None (no meter), -1 with an exception */
static int meter_op_words(FastOps *self, PyObject *words, const char *name, struct op_words *w)
{
    if (words == Py_None) {
        if (self->meter != NULL) {
            PyErr_Format(PyExc_ValueError, "FastOps.%s: a meter needs its op's words", name);
            return -1;
        }
        return 1;
    }
    Py_ssize_t v[4];
    if (self->meter == NULL) {
        PyErr_Format(PyExc_ValueError, "FastOps.%s: meter words without a meter", name);
        return -1;
    }
    if (!PyArg_ParseTuple(words, "nnnn", &v[0], &v[1], &v[2], &v[3]))
        return -1;
    Py_ssize_t n = self->m.words.len / 8;
    if (v[0] < 0 || v[0] >= n || v[1] < 0 || v[1] >= n || v[2] < 0 || v[2] > n - self->m.nbounds - 1
            || v[3] < 0 || v[3] > n - self->m.errno_slots) {
        PyErr_SetString(PyExc_ValueError, "FastOps: metrics layout outside the slot");
        return -1;
    }
    *w = (struct op_words){v[0], v[1], v[2], v[3]};
    return 0;
}

#include "_lookup.h"
#include "_create.h"
#include "_mkdir.h"
#include "_forget.h"
#include "_readdir.h"
#include "_release.h"
#include "_open.h"
#include "_setattr.h"
#include "_attrs.h"
#include "_closer.h"

/* one request, with the checks every fast op shares (FuseSession._handle's,
 * in its order); NOT_HANDLED (nothing written) or the bytes written;
 * *opcode and *error (the reply's errno, 0: success) for counting */
static Py_ssize_t serve_req(FastOps *self, struct state *st, const struct req *q, int *opcode, int *error)
{
    *error = 0;
    /* the driver's layout: the whole header in the first buffer */
    if (q->rsize < IN_HEADER || q->nr == 0 || q->r[0].iov_len < IN_HEADER)
        return NOT_HANDLED;
    struct in_header h;
    memcpy(&h, q->r[0].iov_base, sizeof h);
    __asm__ volatile("" : "+m"(h));   /* the copy, never guest memory again */
    if (h.len != (uint64_t)q->rsize)
        return NOT_HANDLED;
    /* the hiprio session's FastOps (enable_forget): FORGET and
     * BATCH_FORGET, no reply, whatever the writable part; nothing else */
    if (self->fg.ring != NULL) {
        if (forget_slot(h.opcode) < 0)
            return NOT_HANDLED;
        *opcode = (int)h.opcode;
        return fast_forget(self, st, q, &h);
    }
    if (q->wsize < OUT_HEADER)
        return NOT_HANDLED;
    /* no row in the op table: FuseSession._handle answers ENOSYS here,
     * before the session, args and extensions (_attrs.h) */
    if (enosys_wants(self, h.opcode)) {
        *opcode = (int)h.opcode;
        return fast_enosys(q, &h, error);
    }
    if (h.opcode == OP_GETATTR ? q->wsize < OUT_HEADER + ATTR_OUT
            : h.opcode == OP_LOOKUP ? self->lk.hash == NULL || q->wsize < OUT_HEADER + ENTRY_OUT
            : h.opcode == OP_CREATE ? self->cr.rest == NULL || q->wsize < OUT_HEADER + ENTRY_OUT + OPEN_OUT
            : h.opcode == OP_MKDIR ? self->mk.rest == NULL || q->wsize < OUT_HEADER + ENTRY_OUT
            : h.opcode == OP_READDIRPLUS ? self->rd.entry == NULL
            : h.opcode == OP_READDIR ? !self->rd.names
            : h.opcode == OP_RELEASE ? self->rl.files == NULL
            : h.opcode == OP_RELEASEDIR ? !self->rl.dirs
            : h.opcode == OP_OPEN || h.opcode == OP_OPENDIR ? self->op.add == NULL || q->wsize < OUT_HEADER + OPEN_OUT
            : h.opcode == OP_SETATTR ? !self->setattr || q->wsize < OUT_HEADER + ATTR_OUT
            : h.opcode == OP_READLINK ? self->at.too_big == NULL
            : h.opcode == OP_STATFS ? self->at.statfs_rest == NULL
            : meta_wants(self, h.opcode) ? 0
            : !((h.opcode == OP_READ && self->reads) || (h.opcode == OP_WRITE && self->writes)))
        return NOT_HANDLED;
    *opcode = (int)h.opcode;
    uint64_t current;
    if ((!st->ready && state_init(self, st) < 0) || st->ready < 0
            || load_word(&st->header, self->session_word, &current) < 0
            || st->mine <= 0 || (uint64_t)st->mine != current)
        return NOT_HANDLED;
    if (h.opcode == OP_READ)
        return fast_read(st, q, &h, error);
    if (h.opcode == OP_WRITE)
        return fast_write(st, q, &h, error);
    if (h.opcode == OP_LOOKUP)
        return fast_lookup(self, st, q, &h, error);
    if (h.opcode == OP_CREATE)
        return fast_create(self, st, q, &h, error);
    if (h.opcode == OP_MKDIR)
        return fast_mkdir(self, st, q, &h, error);
    if (h.opcode == OP_READDIRPLUS)
        return fast_readdirplus(self, st, q, &h, error);
    if (h.opcode == OP_READDIR)
        return fast_readdir(self, st, q, &h, error);
    if (h.opcode == OP_RELEASE || h.opcode == OP_RELEASEDIR)
        return fast_release(self, st, q, &h, error);
    if (h.opcode == OP_OPEN || h.opcode == OP_OPENDIR)
        return fast_open(self, st, q, &h, error);
    if (h.opcode == OP_SETATTR)
        return fast_setattr(self, st, q, &h, error);
    if (h.opcode == OP_READLINK)
        return fast_readlink(self, st, q, &h, error);
    if (h.opcode == OP_STATFS)
        return fast_statfs(self, st, q, &h, error);
    if (h.opcode != OP_GETATTR)
        return fast_meta(self, st, q, &h, error);
    return fast_getattr(self, st, q, &h, error);
}

/* a Chain's IoVec as iovecs over its memoryviews' buffers (alive and
 * unreleased while serve runs: only this thread releases them, after the
 * push): the count, or -1 if it is not shaped like one or has more views
 * than cap; *size: its size */
static int iovec_parts(PyObject *iov, struct iovec *out, int cap, int writable, Py_ssize_t *size)
{
    int n = -1;
    PyObject *views = NULL;
    if (attr_ssize(iov, s_size, size) < 0 || (views = PyObject_GetAttr(iov, s_views)) == NULL
            || !PyList_CheckExact(views) || PyList_GET_SIZE(views) > cap)
        goto out;
    Py_ssize_t count = PyList_GET_SIZE(views);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v = PyList_GET_ITEM(views, i);
        if (!PyMemoryView_Check(v) || (((PyMemoryViewObject *)v)->flags & _Py_MEMORYVIEW_RELEASED))
            goto out;
        Py_buffer *b = PyMemoryView_GET_BUFFER(v);
        if ((writable && b->readonly) || !PyBuffer_IsContiguous(b, 'C'))
            goto out;
        out[i].iov_base = b->buf;
        out[i].iov_len = (size_t)b->len;
    }
    n = (int)count;
out:
    Py_XDECREF(views);
    return n;
}

/* the session's meter is one C counts for: 1 with a meter, 0 without; -1
 * if it is another (Python serves and counts) */
static int metered(FastOps *self)
{
    PyObject *meter = PyObject_GetAttr(self->session, s_meter);
    int rc = meter == NULL ? -1 : meter == Py_None ? 0 : meter == self->meter ? 1 : -1;
    Py_XDECREF(meter);
    return rc;
}

/* stage 2: one popped Chain; NOT_HANDLED or the bytes written */
static Py_ssize_t serve(FastOps *self, PyObject *chain)
{
    Py_ssize_t result = NOT_HANDLED;
    PyObject *readable = NULL, *writable = NULL;
    struct iovec r[VQ_RAW_READABLE], w[VQ_RAW_WRITABLE];
    struct req q = {r, w, 0, 0, 0, 0, NULL};
    struct state st = {0};
    int error = 0, opcode = 0;
    struct timespec start;
    int counting = metered(self);
    if (counting < 0)
        goto out;
    /* the meter's clock (time.perf_counter_ns: CLOCK_MONOTONIC, the vDSO's) */
    if (counting)
        clock_gettime(CLOCK_MONOTONIC, &start);
    if ((readable = PyObject_GetAttr(chain, s_readable)) == NULL
            || (writable = PyObject_GetAttr(chain, s_writable)) == NULL
            || (q.nr = iovec_parts(readable, r, VQ_RAW_READABLE, 0, &q.rsize)) < 0
            || (q.nw = iovec_parts(writable, w, VQ_RAW_WRITABLE, 1, &q.wsize)) < 0)
        goto out;
    result = serve_req(self, &st, &q, &opcode, &error);
out:
    /* "not handled" is never an error: Python serves (and counts) the request */
    if (result == NOT_HANDLED) {
        PyErr_Clear();
    } else {
        self->served++;
        if (counting)
            count(self, opcode, &start, error, result, st.wrote);
    }
    state_drop(&st);
    Py_XDECREF(readable);
    Py_XDECREF(writable);
    return result;
}

static PyObject *fastops_serve(FastOps *self, PyObject *chain)
{
    return PyLong_FromSsize_t(serve(self, chain));
}

/* _vqcore's C interface (its capsule), or NULL if it cannot be had */
static const struct vqcore_api *vq;

static int load_vqcore(void)
{
    if (vq == NULL) {
        /* the module as sys.modules has it (a test may load another build
         * of it there), then its capsule */
        PyObject *m = PyImport_ImportModule("daemon.virtio._vqcore");
        PyObject *capsule = m ? PyObject_GetAttrString(m, "_C_API") : NULL;
        const struct vqcore_api *api = capsule ? PyCapsule_GetPointer(capsule, VQCORE_CAPSULE) : NULL;
        Py_XDECREF(capsule);
        Py_XDECREF(m);
        if (api == NULL)
            return -1;
        if (api->version != VQCORE_API_VERSION) {
            PyErr_SetString(PyExc_ImportError, "_vqcore: another C interface version");
            return -1;
        }
        vq = api;
    }
    return 0;
}

/* a writable, aligned buffer of at least len bytes held in b */
static int hold(PyObject *obj, Py_buffer *b, Py_ssize_t len, uintptr_t align)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (b->len < len || ((uintptr_t)b->buf & (align - 1))) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "FastOps.batch: progress record too short or misaligned");
        return -1;
    }
    return 0;
}

#define POPPED_MASK 1023    /* progress.POPPED_MASK */
#define POPPED_LEN 1024

/* the chain batch is serving, to be taken from the avail ring */
struct taking {
    PyObject *core;
    uint32_t *words;        /* the ring's progress record: AVAIL */
    uint16_t *popped;       /* and POPPED */
    uint32_t head;
    int taken;
};

/* take the chain peek walked (pop's index update, avail_event) and record
 * it in the progress record (progress.py: POPPED[(avail - 1) & 1023] =
 * head, then AVAIL = avail), as WorkerLoop does after each pop */
static void take_chain(struct taking *t)
{
    unsigned int last = vq->take(t->core);
    __atomic_store_n(&t->popped[(last - 1) & POPPED_MASK], (uint16_t)t->head, __ATOMIC_RELAXED);
    __atomic_store_n(&t->words[0], (uint32_t)last, __ATOMIC_RELAXED);
    t->taken = 1;
}

/* the core argument of batch and wait: a Core of the loaded _vqcore (its
 * C interface loaded first); -1 with TypeError naming the method */
static int check_core(PyObject *core, const char *method)
{
    if (load_vqcore() < 0)
        return -1;
    if (!PyObject_TypeCheck(core, vq->core_type)) {
        PyErr_Format(PyExc_TypeError, "FastOps.%s: core is not a _vqcore.Core of the loaded module", method);
        return -1;
    }
    return 0;
}

/* stage 3: batch(core, words, popped, limit) -> int (see fastops_methods) */
/* the batch loop on buffers the caller holds (the progress record's words
 * and POPPED), with the raw chain it keeps (the wait loop: one for the
 * whole call; a batch call: one allocated for it, 33 KB, whose malloc and
 * free were an eighth of a depth-1 wait round's instructions) and whether
 * the meter counts (metered: -1 declines every chain): served, or
 * -1 - served when the next chain is Python's to pop */
static Py_ssize_t batch_run(FastOps *self, PyObject *core, uint32_t *words, uint16_t *popped, Py_ssize_t limit,
                            struct vq_raw_chain *c, int counting)
{
    struct state st = {0};
    Py_ssize_t served = 0;
    int python = 1;     /* the next chain is Python's to pop */
    while (counting >= 0 && served < limit) {
        struct timespec start;
        if (counting)
            clock_gettime(CLOCK_MONOTONIC, &start);
        int rc = vq->peek(core, c);
        if (rc <= 0) {
            python = rc < 0;
            break;
        }
        struct taking t = {core, words, popped, c->head, 0};
        struct req q = {c->r, c->w, c->nr, c->nw, (Py_ssize_t)c->rsize, (Py_ssize_t)c->wsize, &t};
        int error, opcode = 0;
        Py_ssize_t n = serve_req(self, &st, &q, &opcode, &error);
        if (n == NOT_HANDLED)
            break;      /* never after take_chain: from there a request is answered */
        /* answered: take it and record it (unless WRITE did, before its
         * write), push */
        if (!t.taken)
            take_chain(&t);
        vq->push(core, c->head, (uint32_t)n);
        self->served++;
        served++;
        if (counting)
            count(self, opcode, &start, error, n, st.wrote);
    }
    if (served == limit && counting >= 0)
        python = 0;
    /* a declined request is never an error: Python pops and serves it */
    PyErr_Clear();
    state_drop(&st);
    return python ? -1 - served : served;
}

static PyObject *fastops_batch(FastOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "batch(core, words, popped, limit)");
        return NULL;
    }
    if (check_core(args[0], "batch") < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer wb, pb;
    if (hold(args[1], &wb, 4, 4) < 0)
        return NULL;
    if (hold(args[2], &pb, 2 * POPPED_LEN, 2) < 0) {
        PyBuffer_Release(&wb);
        return NULL;
    }
    struct vq_raw_chain *c = PyMem_Malloc(sizeof *c);
    Py_ssize_t n = batch_run(self, args[0], wb.buf, pb.buf, limit, c, c == NULL ? -1 : metered(self));
    PyMem_Free(c);
    PyBuffer_Release(&pb);
    PyBuffer_Release(&wb);
    return PyLong_FromSsize_t(n);
}

static void drop_meter(FastOps *self)
{
    if (self->meter != NULL) {
        PyBuffer_Release(&self->m.words);
        Py_CLEAR(self->meter);
    }
}

#define LAYOUT_LEN 19

/* the meter's slot and where its counters are (fastpath.make, from
 * counters.py): layout = (bytes_read, errno_slots, then requests,
 * latency_sum, buckets, errors for GETATTR, then for READ, then
 * bytes_written and WRITE's four, then LOOKUP's four), bounds =
 * LATENCY_BUCKETS_NS; every word counting may touch is checked to be in
 * the slot, once, here */
static int set_meter(FastOps *self, PyObject *meter, PyObject *words, PyObject *layout, PyObject *bounds)
{
    struct meter m;
    Py_ssize_t v[LAYOUT_LEN];
    memset(&m, 0, sizeof m);
    if (!PyTuple_Check(layout) || PyTuple_GET_SIZE(layout) != LAYOUT_LEN || !PyTuple_Check(bounds)
            || PyTuple_GET_SIZE(bounds) < 1 || PyTuple_GET_SIZE(bounds) > MAX_BUCKETS - 1) {
        PyErr_SetString(PyExc_ValueError, "FastOps: bad metrics layout");
        return -1;
    }
    for (Py_ssize_t i = 0; i < LAYOUT_LEN; i++)
        if ((v[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(layout, i))) == -1 && PyErr_Occurred())
            return -1;
    m.nbounds = PyTuple_GET_SIZE(bounds);
    for (Py_ssize_t i = 0; i < m.nbounds; i++) {
        m.bounds[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(bounds, i));
        if (PyErr_Occurred())
            return -1;
    }
    m.bytes_read = v[0];
    m.errno_slots = v[1];
    m.getattr = (struct op_words){v[2], v[3], v[4], v[5]};
    m.read = (struct op_words){v[6], v[7], v[8], v[9]};
    m.bytes_written = v[10];
    m.write = (struct op_words){v[11], v[12], v[13], v[14]};
    m.lookup = (struct op_words){v[15], v[16], v[17], v[18]};
    if (PyObject_GetBuffer(words, &m.words, PyBUF_WRITABLE) < 0)
        return -1;
    Py_ssize_t n = m.words.len / 8;
    int ok = ((uintptr_t)m.words.buf & 7) == 0 && m.errno_slots > 0 && m.bytes_read >= 0 && m.bytes_read < n
        && m.bytes_written >= 0 && m.bytes_written < n;
    const struct op_words *ops[] = {&m.getattr, &m.read, &m.write, &m.lookup};
    for (int i = 0; i < 4 && ok; i++)
        ok = ops[i]->requests >= 0 && ops[i]->requests < n && ops[i]->latency_sum >= 0
            && ops[i]->latency_sum < n && ops[i]->buckets >= 0 && ops[i]->buckets <= n - m.nbounds - 1
            && ops[i]->errors >= 0 && ops[i]->errors <= n - m.errno_slots;
    if (!ok) {
        PyBuffer_Release(&m.words);
        PyErr_SetString(PyExc_ValueError, "FastOps: metrics layout outside the slot");
        return -1;
    }
    m.w = m.words.buf;
    drop_meter(self);
    Py_INCREF(meter);
    self->meter = meter;
    self->m = m;
    return 0;
}

static int fastops_init(FastOps *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"session", "header", "slots", "session_word", "slot_words", "attr_sec",
                            "attr_nsec", "reads", "meter", "words", "layout", "bounds", "writes", NULL};
    PyObject *session, *header, *slots, *meter = Py_None, *words = NULL, *layout = NULL, *bounds = NULL;
    Py_ssize_t session_word, slot_words;
    unsigned long long attr_sec;
    unsigned long attr_nsec;
    int reads = 0, writes = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOnnKk|pOOOOp", names, &session, &header, &slots,
                                     &session_word, &slot_words, &attr_sec, &attr_nsec, &reads,
                                     &meter, &words, &layout, &bounds, &writes))
        return -1;
    if (session_word < 0 || slot_words <= 0 || attr_nsec >= 1000000000UL) {
        PyErr_SetString(PyExc_ValueError, "FastOps: bad table layout or timeout");
        return -1;
    }
    if (meter == Py_None) {
        drop_meter(self);
    } else if (words == NULL || layout == NULL || bounds == NULL) {
        PyErr_SetString(PyExc_TypeError, "FastOps: a meter needs its words, layout and bounds");
        return -1;
    } else if (set_meter(self, meter, words, layout, bounds) < 0) {
        return -1;
    }
    Py_INCREF(session);
    Py_INCREF(header);
    Py_INCREF(slots);
    Py_XSETREF(self->session, session);
    Py_XSETREF(self->header, header);
    Py_XSETREF(self->slots, slots);
    self->session_word = session_word;
    self->slot_words = slot_words;
    self->attr_sec = attr_sec;
    self->attr_nsec = (uint32_t)attr_nsec;
    self->reads = reads;
    self->writes = writes;
    self->meta = 0;     /* enable_meta again, for this meter */
    self->at.enosys = 0;    /* and enable_readlink, enable_statfs, enable_enosys (_attrs.h) */
    Py_CLEAR(self->at.too_big);
    Py_CLEAR(self->at.statfs_rest);
    return 0;
}

/* the references a FastOps holds that a cycle can run through: the cyclic
 * GC can then collect one in a cycle with its session (a session attribute
 * naming it, say). Not visited: the exporter of the meter's held buffer
 * (m.words.obj, the meter's words memoryview, which refers to nothing that
 * leads back here); visiting it made a collection after a failed test free
 * that view while the meter still held it (a segfault in
 * test_fastops_gc's failure path), cause not yet found */
static int fastops_traverse(FastOps *self, visitproc visit, void *arg)
{
    Py_VISIT(self->session);
    Py_VISIT(self->header);
    Py_VISIT(self->slots);
    Py_VISIT(self->meter);
    Py_VISIT(self->lk.hash);
    Py_VISIT(self->lk.tlock);
    Py_VISIT(self->lk.lock.shared);
    Py_VISIT(self->cr.rest);
    Py_VISIT(self->cr.add);
    Py_VISIT(self->cr.creds);
    Py_VISIT(self->mk.rest);
    Py_VISIT(self->mk.creds);
    Py_VISIT(self->fg.ring);
    Py_VISIT(self->rd.entry);
    Py_VISIT(self->rd.stream_type);
    Py_VISIT(self->rl.files);
    Py_VISIT(self->rl.tlock);
    Py_VISIT(self->rl.hdr);
    Py_VISIT(self->rl.lock.shared);
    Py_VISIT(self->op.add);
    Py_VISIT(self->op.handle_type);
    Py_VISIT(self->at.too_big);
    Py_VISIT(self->at.statfs_rest);
    return 0;
}

/* drops them all (drop_meter releases the buffer) */
static int fastops_clear(FastOps *self)
{
    Py_CLEAR(self->session);
    Py_CLEAR(self->header);
    Py_CLEAR(self->slots);
    Py_CLEAR(self->lk.hash);
    Py_CLEAR(self->lk.tlock);
    Py_CLEAR(self->lk.lock.shared);
    Py_CLEAR(self->cr.rest);
    Py_CLEAR(self->cr.add);
    Py_CLEAR(self->cr.creds);
    Py_CLEAR(self->mk.rest);
    Py_CLEAR(self->mk.creds);
    Py_CLEAR(self->fg.ring);
    Py_CLEAR(self->rd.entry);
    Py_CLEAR(self->rd.stream_type);
    Py_CLEAR(self->rl.files);
    Py_CLEAR(self->rl.tlock);
    Py_CLEAR(self->rl.hdr);
    Py_CLEAR(self->rl.lock.shared);
    Py_CLEAR(self->op.add);
    Py_CLEAR(self->op.handle_type);
    Py_CLEAR(self->at.too_big);
    Py_CLEAR(self->at.statfs_rest);
    drop_meter(self);
    return 0;
}

static void fastops_dealloc(FastOps *self)
{
    PyObject_GC_UnTrack(self);
    fastops_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *get_served(FastOps *self, void *c) { return PyLong_FromUnsignedLongLong(self->served); }
static PyObject *get_snapshots(FastOps *self, void *c) { return PyLong_FromUnsignedLongLong(self->snapshots); }
static PyObject *get_lookup_reads(FastOps *self, void *c) { return PyLong_FromUnsignedLongLong(self->lookup_reads); }

static PyObject *get_counts_batches(FastOps *self, void *c)
{
    return PyBool_FromLong(self->meter != NULL && self->m.nbatch_bounds > 0);
}

/* -- the wait loop (docs/compiled.md, "The wait loop") ------------------------
 * wait(core, words, popped, epoll_fd, kick_fd, call_fd, limit, timeout_ms,
 * watch) -> (code, served): the worker loop's idle wait and its depth-1
 * round trip in C. Per round: the watched words unchanged (else WAIT_WATCH),
 * epoll_wait on the loop's own epoll fd with the GIL released; when the
 * only fd ready is this ring's kick: drain it, batch (as fastops_batch),
 * publish with the progress record's stores (WorkerLoop._publish's order),
 * write the call eventfd when the publish says so, and wait again. It
 * returns, with the ring published, the moment anything else happens:
 *   WAIT_READY  another fd is ready (or more than the kick): nothing was
 *               read, the loop's level-triggered epoll reports it again;
 *               or epoll_wait was interrupted by a signal (handlers ran);
 *   WAIT_IDLE   timeout_ms passed with nothing ready;
 *   WAIT_WATCH  a watched word (words[i] of a u64 view) differs from the
 *               value the loop gave (reaping is due);
 * and WAIT_SERVE, with the kick drained, when the batch declined a chain
 * (the chains of that round pushed and recorded but not yet published) or
 * served the whole limit (published): the loop's _serve goes on and
 * publishes.
 * served counts the chains C answered; carried, those of the round that
 * returned WAIT_SERVE (0 otherwise), which _serve counts in its wake-up.
 * What the batches read of the session's Python objects is read once per
 * call (struct snapshot, state_init), not once per round, and the rounds
 * share one raw chain.
 * With a meter C counts for (enable_batches), every other round that
 * served a chain is counted as one wake-up (count_batch). A signal handler's exception, or a
 * failed read or call eventfd write (OSError), returns NULL.
 */
enum { WAIT_READY, WAIT_SERVE, WAIT_IDLE, WAIT_WATCH };

static int hold_watches(PyObject *seq, struct watch *w, int *count)
{
    PyObject *fast = PySequence_Fast(seq, "FastOps.wait: watch is not a sequence");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    int rc = 0;
    *count = 0;
    if (n > WAIT_WATCHES) {
        PyErr_SetString(PyExc_ValueError, "FastOps.wait: too many watched words");
        rc = -1;
    }
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
        struct watch *x = &w[*count];
        unsigned long long value;
        PyObject *view;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "OnK", &view, &x->index, &value)
            || PyObject_GetBuffer(view, &x->b, PyBUF_C_CONTIGUOUS) < 0) {
            rc = -1;
            break;
        }
        (*count)++;
        x->value = value;
        if (x->index < 0 || x->index >= x->b.len / 8 || ((uintptr_t)x->b.buf & 7)) {
            PyErr_SetString(PyExc_ValueError, "FastOps.wait: watched word outside its view");
            rc = -1;
        }
    }
    Py_DECREF(fast);
    return rc;
}

static int watch_changed(const struct watch *w, int count)
{
    for (int i = 0; i < count; i++)
        if (__atomic_load_n((const uint64_t *)w[i].b.buf + w[i].index, __ATOMIC_RELAXED) != w[i].value)
            return 1;
    return 0;
}

/* WorkerLoop._publish for a ring without deferred answers: PUB_FROM,
 * publish, DONE, PUB_FROM; the call eventfd if the publish says so */
static int wait_publish(PyObject *core, uint32_t *words, int call_fd)
{
    unsigned int last;
    __atomic_store_n(&words[2], (uint32_t)vq->published(core), __ATOMIC_RELAXED);
    int want = vq->publish(core, &last);
    if (want < 0)
        return 0;       /* released: no queue (the loop never waits then) */
    __atomic_store_n(&words[1], (uint32_t)last, __ATOMIC_RELAXED);
    __atomic_store_n(&words[2], (uint32_t)vq->published(core), __ATOMIC_RELAXED);
    if (want && call_fd >= 0) {
        uint64_t one = 1;
        if (write(call_fd, &one, sizeof one) != sizeof one) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

static PyObject *fastops_wait(FastOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "wait(core, words, popped, epoll_fd, kick_fd, call_fd, limit, timeout_ms, watch)");
        return NULL;
    }
    int fds[4];     /* epoll, kick, call, timeout */
    for (int i = 0; i < 4; i++) {
        long v = PyLong_AsLong(args[3 + (i < 3 ? i : 4)]);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < -1 || v > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "FastOps.wait: fd or timeout out of range");
            return NULL;
        }
        fds[i] = (int)v;
    }
    int epoll_fd = fds[0], kick_fd = fds[1], call_fd = fds[2], timeout = fds[3];
    Py_ssize_t limit = PyLong_AsSsize_t(args[6]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (check_core(args[0], "wait") < 0)
        return NULL;
    struct watch w[WAIT_WATCHES];
    int watches = 0;
    Py_buffer wb, pb;
    if (hold_watches(args[8], w, &watches) < 0 || hold(args[1], &wb, 12, 4) < 0) {
        for (int i = 0; i < watches; i++)
            PyBuffer_Release(&w[i].b);
        return NULL;
    }
    if (hold(args[2], &pb, 2 * POPPED_LEN, 2) < 0) {
        PyBuffer_Release(&wb);
        for (int i = 0; i < watches; i++)
            PyBuffer_Release(&w[i].b);
        return NULL;
    }
    uint32_t *words = wb.buf;
    /* session.meter, like the snapshot's objects, is not rebound while
     * the wait runs (entry.py sets it before the loop starts) */
    int counting = metered(self);
    PyErr_Clear();
    Py_ssize_t served = 0, carried = 0;
    int code = -1;
    struct snapshot kept = {0};
    struct adopt_once kept_once = {0};
    struct vq_raw_chain *chain = PyMem_Malloc(sizeof *chain);
    if (chain == NULL) {
        PyBuffer_Release(&pb);
        PyBuffer_Release(&wb);
        for (int i = 0; i < watches; i++)
            PyBuffer_Release(&w[i].b);
        return PyErr_NoMemory();
    }
    self->watching = w;
    self->nwatching = watches;
    self->kept = &kept;
    self->kept_once = &kept_once;
    struct poll_conf *poll = &self->poll;
    int64_t idle_from = -1;     /* when the last round that served chains ended (_poll.h); -1: none */
    int quiet = 0;              /* the ring is quiet: the guest does not kick (_poll.h) */
    while (code < 0) {
        if (PyErr_CheckSignals() < 0)
            break;
        if (watch_changed(w, watches)) {
            code = WAIT_WATCH;
            break;
        }
        int found = 0;          /* a chain is there: look at the other fds, do not sleep */
        if (idle_from >= 0 && poll->ns > 0) {
            if (!quiet)
                vq->quiet(args[0], quiet = 1);
            Py_BEGIN_ALLOW_THREADS
            found = poll_spin(poll, vq->pending, args[0], idle_from);
            Py_END_ALLOW_THREADS
        }
        if (quiet && !found)
            found = vq->quiet(args[0], quiet = 0);  /* the guest kicks again; what came meanwhile */
        struct epoll_event ev[2];
        int rc, err;
        Py_BEGIN_ALLOW_THREADS
        rc = epoll_wait(epoll_fd, ev, 2, found ? 0 : timeout);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            if (err != EINTR) {
                errno = err;
                PyErr_SetFromErrno(PyExc_OSError);
            } else if (PyErr_CheckSignals() == 0)
                code = WAIT_READY;
            break;
        }
        if (rc == 0 && !found) {
            code = WAIT_IDLE;
            break;
        }
        if (rc > 1 || (rc == 1 && ev[0].data.fd != kick_fd)) {
            code = WAIT_READY;
            break;
        }
        /* the kick is consumed here, so this round serves the ring */
        uint64_t kicks;
        if (rc == 1 && read(kick_fd, &kicks, sizeof kicks) < 0 && errno != EAGAIN) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        if (idle_from >= 0 && poll->max_ns > 0)
            poll->ns = poll_next(poll->ns, poll->max_ns, mono_ns() - idle_from);
        Py_ssize_t n = batch_run(self, args[0], words, pb.buf, limit, chain, counting);
        served += n < 0 ? -1 - n : n;
        if (n < 0) {
            code = WAIT_SERVE;
            carried = -1 - n;
            break;
        }
        if (wait_publish(args[0], words, call_fd) < 0)
            break;
        if (n == limit) {
            code = WAIT_SERVE;  /* published, as _serve does every `limit` */
            carried = n;
        } else if (n > 0 && self->m.nbatch_bounds > 0 && counting == 1) {
            count_batch(self, n);
        }
        idle_from = n > 0 && poll->max_ns > 0 ? mono_ns() : -1;
    }
    /* Python's loop waits for kicks: the guest must kick again, and what it
     * published without one must wake that loop (a kick of our own) unless
     * the loop serves the ring next anyway (WAIT_SERVE: its pops look) */
    if (quiet && vq->quiet(args[0], 0) && code != WAIT_SERVE) {
        uint64_t one = 1;
        if (write(kick_fd, &one, sizeof one) != sizeof one && code >= 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            code = -1;
        }
    }
    self->watching = NULL;
    self->nwatching = 0;
    self->kept = NULL;
    self->kept_once = NULL;
    snapshot_drop(&kept);
    PyMem_Free(chain);
    PyBuffer_Release(&pb);
    PyBuffer_Release(&wb);
    for (int i = 0; i < watches; i++)
        PyBuffer_Release(&w[i].b);
    if (code < 0)
        return NULL;
    return Py_BuildValue("(inn)", code, served, carried);
}

static PyGetSetDef fastops_getset[] = {
    {"served", (getter)get_served, NULL, "requests answered in C", NULL},
    {"snapshots", (getter)get_snapshots, NULL,
     "times C read the session's objects (once per serve or batch call from Python, once per wait call)", NULL},
    {"lookup_reads", (getter)get_lookup_reads, NULL,
     "times C read what a cold LOOKUP needs of the inode cache (once per LOOKUP from Python, once per wait call)",
     NULL},
    {"counts_batches", (getter)get_counts_batches, NULL,
     "the wait loop counts its wake-ups into the meter (enable_batches was called)", NULL},
    {NULL},
};

static PyObject *fastops_enable_polling(FastOps *self, PyObject *args)
{
    if (self->meter == NULL)
        return poll_enable(&self->poll, args, NULL, 0);
    return poll_enable(&self->poll, args, self->m.w, self->m.words.len / 8);
}
static PyObject *fastops_poll_stats(FastOps *self, PyObject *unused) { return poll_stats(&self->poll); }

static PyMethodDef fastops_methods[] = {
    {"serve", (PyCFunction)fastops_serve, METH_O,
     "serve(chain) -> bytes written into chain.writable, or -1: not handled (Python serves it)"},
    {"batch", (PyCFunction)(void (*)(void))fastops_batch, METH_FASTCALL,
     "batch(core, words, popped, limit) -> n: serve, take and push up to limit chains of the\n"
     "_vqcore.Core's ring in C, recording each in the progress record (words[0] = AVAIL,\n"
     "popped[(avail - 1) & 1023] = head); n >= 0: n served and no chain is available (or\n"
     "n == limit); n < 0: -1 - n served and the next chain is Python's (VirtQueue.pop)"},
    {"wait", (PyCFunction)(void (*)(void))fastops_wait, METH_FASTCALL,
     "wait(core, words, popped, epoll_fd, kick_fd, call_fd, limit, timeout_ms, watch) -> (code, served,\n"
     "carried): wait on the loop's epoll fd and serve this ring's kicks in C (batch, publish, call)\n"
     "until anything else happens; code 0: another fd is ready or a signal came, 1: the ring needs\n"
     "Python (a declined chain, not yet published, or the limit; carried: the chains C served in\n"
     "that wake-up, not yet counted as one), 2: timed out, 3: a watched word (view, index, value)\n"
     "changed; with enable_batches, each wake-up served whole in C is counted"},
    {"enable_polling", (PyCFunction)fastops_enable_polling, METH_VARARGS,
     "enable_polling(max_ns[, window_ns[, meter_words]]): after a round that served chains, wait polls\n"
     "the ring up to an adaptive window (first window_ns, default 0) of at most max_ns (0: never) before\n"
     "it sleeps, the guest's kicks suppressed meanwhile; with a meter, meter_words (found, missed, ns)\n"
     "are the slot's words it counts into, or None (_poll.h)"},
    {"poll_stats", (PyCFunction)fastops_poll_stats, METH_NOARGS,
     "poll_stats() -> (max_ns, window_ns, found, missed, spun_ns): wait's polling so far (_poll.h)"},
    {"enable_batches", (PyCFunction)fastops_enable_batches, METH_VARARGS,
     "enable_batches((batches, chains, max_batch, batch_hist, open_files, inode_fds), bounds): with a\n"
     "meter, the wait loop counts each wake-up it serves whole as WorkerMeter.batch does (those\n"
     "word indices of the slot, BATCH_BUCKETS)"},
    {"enable_lookup", (PyCFunction)fastops_enable_lookup, METH_VARARGS,
     "enable_lookup(hash, lock, tlock, capacity, (dirty, gen, ref, dev, ino, free, high, next_gen, live,\n"
     "next, hlen, owner, handle, handle_max), negative): serve LOOKUP too, on the InodeTable whose\n"
     "index, lock_handle(), thread lock, capacity and word indices (header's, then slot's) these are;\n"
     "negative: ENOENT is a negative entry (--cache=always)"},
    {"enable_meta", (PyCFunction)fastops_enable_meta, METH_VARARGS,
     "enable_meta(ops, h_locks, layout): serve GETXATTR, UNLINK, RMDIR, FLUSH, RENAME (bits 0-4 of ops)\n"
     "too; h_locks: FileTable._H_LOCKS; layout: with a meter, their (requests, latency_sum, buckets,\n"
     "errors) word indices (_meta.h)"},
    {"enable_create", (PyCFunction)fastops_enable_create, METH_VARARGS,
     "enable_create(rest, add, creds, kept, writeback, fopen, meter_words): serve CREATE too (after\n"
     "enable_lookup): fastpath.create_rest and add_created, credentials._state, host_open_flags' mask,\n"
     "--writeback, fopen_flags(--cache), CREATE's meter words (requests, latency_sum, buckets, errors)\n"
     "or None without a meter"},
    {"enable_mkdir", (PyCFunction)fastops_enable_mkdir, METH_VARARGS,
     "enable_mkdir(rest, creds, meter_words): serve a root caller's MKDIR too (after enable_lookup):\n"
     "fastpath.mkdir_rest, credentials._state, MKDIR's meter words (requests, latency_sum, buckets,\n"
     "errors) or None without a meter (_mkdir.h)"},
    {"enable_forget", (PyCFunction)fastops_enable_forget, METH_VARARGS,
     "enable_forget(ring, ring_w, ring_len, layout): serve FORGET and BATCH_FORGET, and nothing else\n"
     "(the hiprio session; after enable_lookup on the same InodeTable): its freed ring (_ring), the\n"
     "header word of its cursor (_H_RING_W), RING; layout: with a meter, the two ops' (requests,\n"
     "latency_sum, buckets, errors) word indices (_forget.h)"},
    {"enable_readdirplus", (PyCFunction)fastops_enable_readdirplus, METH_VARARGS,
     "enable_readdirplus(entry, stream_type, meter_words): serve READDIRPLUS too (after enable_lookup):\n"
     "dirs.plus_entry (Python's step for an entry C declines), dirs.DirStream, READDIRPLUS's meter\n"
     "words (requests, latency_sum, buckets, errors) or None without a meter (_readdir.h)"},
    {"enable_readdir", (PyCFunction)fastops_enable_readdir, METH_VARARGS,
     "enable_readdir(stream_type, meter_words): serve plain READDIR too (no lookups, LOOKUP not needed):\n"
     "dirs.DirStream, READDIR's meter words (requests, latency_sum, buckets, errors) or None without a\n"
     "meter (_readdir.h)"},
    {"enable_release", (PyCFunction)fastops_enable_release, METH_VARARGS,
     "enable_release(files, (dirty, free, live, released, locks, high, gen, kind, owner, next, kept, node,\n"
     "lock_owner, words, kind_lock), meter_words): serve RELEASE of this worker's own open files too, on the FileTable\n"
     "files (the session's handles.files) whose word indices these are; RELEASE's meter words\n"
     "(requests, latency_sum, buckets, errors) or None without a meter (_release.h)"},
    {"enable_releasedir", (PyCFunction)fastops_enable_releasedir, METH_VARARGS,
     "enable_releasedir(meter_words): serve RELEASEDIR of this worker's own directory handles too (after\n"
     "enable_release, on its FileTable); RELEASEDIR's meter words (requests, latency_sum, buckets,\n"
     "errors) or None without a meter (_release.h)"},
    {"enable_open", (PyCFunction)fastops_enable_open, METH_VARARGS,
     "enable_open(add, handle_type, (gen, high, node, flags, lock_owner), kept, writeback, fopen, fopen_dir,\n"
     "open_words, opendir_words): serve OPEN and OPENDIR too (after enable_release, on its FileTable):\n"
     "fastpath.add_handle (HandleTable.add, for what C's allocation declines), handles.OpenHandle, the\n"
     "FileTable's other word indices, files.host_open_flags' mask, --writeback, the FOPEN_* flags of\n"
     "OPEN and OPENDIR, their meter words or None without a meter (_open.h)"},
    {"enable_setattr", (PyCFunction)fastops_enable_setattr, METH_VARARGS,
     "enable_setattr(meter_words): serve SETATTR's chmod and utimensat too; its meter words (requests,\n"
     "latency_sum, buckets, errors) or None without a meter (_setattr.h)"},
    {"enable_readlink", (PyCFunction)fastops_enable_readlink, METH_VARARGS,
     "enable_readlink(too_big, meter_words): serve READLINK too; too_big(session, opcode, size, room):\n"
     "fastpath.reply_too_big, the warning of a target longer than the reply part; its meter words\n"
     "(requests, latency_sum, buckets, errors) or None without a meter (_attrs.h)"},
    {"enable_statfs", (PyCFunction)fastops_enable_statfs, METH_VARARGS,
     "enable_statfs(rest, meter_words): serve STATFS too; rest(session, nodeid): fastpath.statfs_rest,\n"
     "Python's answer for what struct.pack would refuse; its meter words or None (_attrs.h)"},
    {"enable_enosys", (PyCFunction)fastops_enable_enosys, METH_VARARGS,
     "enable_enosys(opcodes, meter_words): answer these opcodes (a tuple, each below 64: those the op\n"
     "table has no row for) ENOSYS; a tuple of their meter words, in order, or None (_attrs.h)"},
    {NULL},
};

static PyTypeObject FastOpsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.fuse._fastops.FastOps",
    .tp_basicsize = sizeof(FastOps),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fastops_init,
    .tp_dealloc = (destructor)fastops_dealloc,
    .tp_traverse = (traverseproc)fastops_traverse,
    .tp_clear = (inquiry)fastops_clear,
    .tp_methods = fastops_methods,
    .tp_getset = fastops_getset,
};

static PyMethodDef module_methods[] = {
    {"close_later", (PyCFunction)fastops_close_later, METH_O,
     "close_later(fds): close these fds on the closer thread (_closer.h), no GIL taken there"},
    {"closer_stats", (PyCFunction)fastops_closer_stats, METH_NOARGS,
     "closer_stats() -> (pending, closed, state): the closer thread's queue (_closer.h)"},
    {"poll_next", (PyCFunction)fastops_poll_next, METH_VARARGS,
     "poll_next(window_ns, max_ns, block_ns) -> the next polling window (_poll.h's rule; tests)"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastops", "FUSE requests served in C (docs/compiled.md)", -1, module_methods,
};

PyMODINIT_FUNC PyInit__fastops(void)
{
    struct { PyObject **slot; const char *text; } strings[] = {
        {&s_readable, "readable"}, {&s_writable, "writable"}, {&s_views, "views"}, {&s_size, "size"},
        {&s_session, "_session"}, {&s_meter, "meter"}, {&s_cache, "cache"}, {&s_fds, "_fds"},
        {&s_root_fd, "root_fd"}, {&s_handles, "handles"}, {&s_handles_dict, "_handles"},
        {&s_fh_slots, "_slots"}, {&s_fd, "fd"}, {&s_kind, "kind"}, {&s_nodeid, "nodeid"},
        {&s_peers, "peers"}, {&s_keeper_sock, "_keeper_sock"},
        {&s_shared, "shared"}, {&s_use_handles, "_use_handles"}, {&s_root_dev, "_root_dev"},
        {&s_max_fds, "max_fds"},
        /* the ops' own (one header each): interned here, once, so that no
         * op depends on another op's enable_* having run (OPEN without
         * CREATE, RELEASEDIR without READDIR) */
        {&s_uid, "uid"}, {&s_gid, "gid"},
        {&s_max_open_files, "max_open_files"},                              /* _create.h */
        {&s_meta_locks, "_locks"}, {&s_meta_files, "files"}, {&s_meta_hdr, "_hdr"},     /* _meta.h */
        {&s_dir_stream, "dir_stream"}, {&s_buf, "buf"}, {&s_pos, "pos"}, {&s_cookie, "cookie"},
        {&s_reseek, "reseek"}, {&s_serial, "serial"},                       /* _readdir.h, _lookup.h */
        {&s_rl_files, "files"}, {&s_rl_peers_copied, "copied"}, {&s_rl_per_node, "_open_per_node"},
        {&s_rl_released, "_released"},
        {&s_op_serial, "serial"}, {&s_op_keep, "keep"},                     /* _release.h, _open.h */
    };
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++)
        if ((*strings[i].slot = PyUnicode_InternFromString(strings[i].text)) == NULL)
            return NULL;
    if (PyType_Ready(&FastOpsType) < 0 || PyType_Ready(&TableLockType) < 0 || PyType_Ready(&ThreadLockType) < 0)
        return NULL;
    if (pthread_atfork(NULL, NULL, tablelock_after_fork) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FastOpsType);
    if (PyModule_AddObject(m, "FastOps", (PyObject *)&FastOpsType) < 0) {
        Py_DECREF(&FastOpsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TableLockType);
    if (PyModule_AddObject(m, "TableLock", (PyObject *)&TableLockType) < 0) {
        Py_DECREF(&TableLockType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ThreadLockType);
    if (PyModule_AddObject(m, "ThreadLock", (PyObject *)&ThreadLockType) < 0) {
        Py_DECREF(&ThreadLockType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
