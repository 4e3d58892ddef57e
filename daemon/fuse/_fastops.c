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
 * With a meter (--metrics-socket), what C answers is counted here into
 * the worker's shared-memory slot as WorkerMeter.request counts it
 * (count() below; fastpath.meter_layout gives the word indices, checked
 * against the slot once at set-up), timed with the meter's clock,
 * CLOCK_MONOTONIC. What C declines Python serves and counts.
 *
 * Anything malformed is left to Python, which logs and answers it. The
 * GIL is released around fstat and preadv, as os.fstat/os.preadv do; the
 * chain's views are only released by this thread, after the push.
 *
 * Guest memory: the request's header and args are copied out of the
 * readable buffers once (memcpy into locals) and only the copies are
 * checked and used; the reply is built in a local and copied into the
 * writable buffers, each write bounded by its buffer's length.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <time.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "FUSE structs are little-endian here: little-endian hosts only"
#endif

#define IN_HEADER 40
#define OUT_HEADER 16
#define ATTR_OUT 104
#define GETATTR_IN 16
#define OP_GETATTR 3
#define OP_READ 15
#define READ_IN 40
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

/* fuse_out_header + fuse_attr_out, as abi.OUT_HEADER + abi.ATTR_OUT */
struct attr_reply {
    uint32_t len;
    int32_t error;
    uint64_t unique;
    uint64_t attr_valid;
    uint32_t attr_valid_nsec, dummy;
    uint64_t ino, size, blocks, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};

/* fuse_read_in, as abi.READ_IN ("<QQIIQI4x") */
struct read_in {
    uint64_t fh, offset;
    uint32_t size, read_flags;
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

/* the metrics slot this worker counts into, laid out by counters.py (the
 * indices come from fastpath.make, checked against the slot's length once) */
struct meter {
    Py_buffer words;            /* the slot, u64 words, held while FastOps lives */
    uint64_t *w;
    Py_ssize_t bytes_read, errno_slots, nbounds;
    struct op_words getattr, read;
    uint64_t bounds[MAX_BUCKETS];   /* LATENCY_BUCKETS_NS: the last bucket is above them all */
};

/* fuse_out_header */
struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

_Static_assert(sizeof(struct in_header) == IN_HEADER, "fuse_in_header");
_Static_assert(sizeof(struct read_in) == READ_IN, "fuse_read_in");
_Static_assert(sizeof(struct out_header) == OUT_HEADER, "fuse_out_header");
_Static_assert(sizeof(struct attr_reply) == OUT_HEADER + ATTR_OUT, "fuse_attr_out");

typedef struct {
    PyObject_HEAD
    PyObject *session;      /* the FuseSession */
    PyObject *header;       /* InodeTable._hdr, memoryview of u64 */
    PyObject *slots;        /* InodeTable._q, memoryview of u64 */
    int reads;              /* READ served here too */
    Py_ssize_t session_word, slot_words;
    uint64_t attr_sec;
    uint32_t attr_nsec;
    unsigned long long served;  /* requests answered here (tests, bench) */
    PyObject *meter;        /* the WorkerMeter counted for, or NULL */
    struct meter m;         /* valid when meter is set */
} FastOps;

static PyObject *s_readable, *s_writable, *s_views, *s_size, *s_session, *s_meter, *s_cache,
    *s_fds, *s_root_fd, *s_handles, *s_handles_dict, *s_fh_slots, *s_fd, *s_kind, *s_nodeid;

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

/* a 64-bit word of a shared u64 memoryview, read with one atomic load;
 * -1 if the view is gone or the index is outside it */
static int load_word(PyObject *view, Py_ssize_t index, uint64_t *out)
{
    Py_buffer b;
    if (PyObject_GetBuffer(view, &b, PyBUF_SIMPLE) < 0)
        return -1;
    int ok = index >= 0 && index < b.len / 8 && ((uintptr_t)b.buf & 7) == 0;
    if (ok)
        *out = __atomic_load_n((const uint64_t *)b.buf + index, __ATOMIC_RELAXED);
    PyBuffer_Release(&b);
    return ok ? 0 : -1;
}

/* (views list, size) of an IoVec; -1 if it is not shaped like one */
static int iovec_parts(PyObject *iov, PyObject **views, Py_ssize_t *size)
{
    if (attr_ssize(iov, s_size, size) < 0)
        return -1;
    *views = PyObject_GetAttr(iov, s_views);
    if (*views == NULL)
        return -1;
    if (!PyList_CheckExact(*views)) {
        Py_CLEAR(*views);
        return -1;
    }
    return 0;
}

/* copy n bytes at stream offset off of a list of buffers into dst (read) or
 * from src into them (write); -1 if the buffers run out, one is not
 * writable, or is not a buffer */
static int stream_copy(PyObject *views, Py_ssize_t off, void *mem, Py_ssize_t n, int write)
{
    char *p = mem;
    Py_ssize_t count = PyList_GET_SIZE(views);
    for (Py_ssize_t i = 0; i < count && n > 0; i++) {
        Py_buffer b;
        if (PyObject_GetBuffer(PyList_GET_ITEM(views, i), &b, write ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            return -1;
        if (off >= b.len) {
            off -= b.len;
            PyBuffer_Release(&b);
            continue;
        }
        Py_ssize_t k = b.len - off < n ? b.len - off : n;
        if (write)
            memcpy((char *)b.buf + off, p, (size_t)k);
        else
            memcpy(p, (const char *)b.buf + off, (size_t)k);
        __asm__ volatile("" ::: "memory");  /* the copy is what we use, never a re-read */
        PyBuffer_Release(&b);
        p += k;
        n -= k;
        off = 0;
    }
    return n == 0 ? 0 : -1;
}

/* the O_PATH fd this worker holds for a live nodeid, -1 if it holds none
 * (InodeCache.fd: the root, or a cached fd whose generation still matches;
 * anything else, Python reopens or answers ESTALE) */
static int cached_fd(FastOps *self, PyObject *cache, uint64_t nodeid)
{
    Py_ssize_t fd;
    if (nodeid == 1) {
        if (attr_ssize(cache, s_root_fd, &fd) < 0 || fd < 0 || fd > INT32_MAX)
            return -1;
        return (int)fd;
    }
    if (nodeid == 0 || nodeid > (uint64_t)(PY_SSIZE_T_MAX / self->slot_words))
        return -1;
    PyObject *fds = PyObject_GetAttr(cache, s_fds);
    if (fds == NULL)
        return -1;
    int result = -1;
    PyObject *key = PyLong_FromUnsignedLongLong(nodeid);
    if (key != NULL && PyDict_CheckExact(fds)) {
        PyObject *e = PyDict_GetItemWithError(fds, key);   /* borrowed */
        if (e != NULL && PyTuple_CheckExact(e) && PyTuple_GET_SIZE(e) == 2
                && PyLong_CheckExact(PyTuple_GET_ITEM(e, 0)) && PyLong_CheckExact(PyTuple_GET_ITEM(e, 1))) {
            unsigned long long gen = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(e, 0));
            long long f = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
            uint64_t now;
            if (!PyErr_Occurred() && f >= 0 && f <= INT32_MAX
                    && load_word(self->slots, (Py_ssize_t)nodeid * self->slot_words, &now) == 0
                    && now == gen)
                result = (int)f;
        }
    }
    Py_XDECREF(key);
    Py_DECREF(fds);
    return result;
}

static int open_fd(PyObject *session, uint64_t fh, Py_ssize_t *nodeid);

/* replies.rdev32: the kernel's new_encode_dev() */
static uint32_t rdev32(dev_t rdev)
{
    uint64_t major = major(rdev), minor = minor(rdev);
    return (uint32_t)((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~(uint64_t)0xFF) << 12));
}

/* the errno an error reply carries (replies.error: EIO for one outside 1..4095) */
static int reply_errno(int err)
{
    return err > 0 && err < 4096 ? err : EIO;
}

/* GETATTR; NOT_HANDLED or the bytes written; *error: the reply's errno (0: success) */
static Py_ssize_t fast_getattr(FastOps *self, PyObject *readable, PyObject *writable,
                               const struct in_header *h, PyObject *cache, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    if (h->total_extlen || nargs > MAX_ARGS)
        return NOT_HANDLED;
    int fd = -1;
    if (nargs >= GETATTR_IN) {
        struct { uint32_t flags, dummy; uint64_t fh; } a;   /* fuse_getattr_in */
        if (stream_copy(readable, IN_HEADER, &a, sizeof a, 0) < 0)
            return NOT_HANDLED;
        if (a.flags & GETATTR_FH) {
            Py_ssize_t of;
            fd = open_fd(self->session, a.fh, &of);
            if (fd < 0 || of < 0 || (uint64_t)of != h->nodeid)
                return NOT_HANDLED;
        }
    }
    if (fd < 0)
        fd = cached_fd(self, cache, h->nodeid);
    if (fd < 0)
        return NOT_HANDLED;
    struct stat st;
    struct attr_reply r;
    memset(&r, 0, sizeof r);
    r.unique = h->unique;
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    rc = fstat(fd, &st);
    err = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        r.len = OUT_HEADER;
        *error = reply_errno(err);
        r.error = -*error;
        return stream_copy(writable, 0, &r, OUT_HEADER, 1) < 0 ? NOT_HANDLED : OUT_HEADER;
    }
    /* what struct.pack would refuse (Python answers EIO): leave it to Python */
    if (st.st_size < 0 || st.st_blocks < 0 || st.st_blksize < 0 || (uint64_t)st.st_blksize > UINT32_MAX)
        return NOT_HANDLED;
    r.len = sizeof r;
    r.attr_valid = self->attr_sec;
    r.attr_valid_nsec = self->attr_nsec;
    r.ino = st.st_ino;
    r.size = (uint64_t)st.st_size;
    r.blocks = (uint64_t)st.st_blocks;
    r.atime = (uint64_t)st.st_atim.tv_sec;     /* times before 1970 wrap, as in Python */
    r.mtime = (uint64_t)st.st_mtim.tv_sec;
    r.ctime = (uint64_t)st.st_ctim.tv_sec;
    r.atimensec = (uint32_t)st.st_atim.tv_nsec;
    r.mtimensec = (uint32_t)st.st_mtim.tv_nsec;
    r.ctimensec = (uint32_t)st.st_ctim.tv_nsec;
    r.mode = st.st_mode;
    r.nlink = st.st_nlink <= UINT32_MAX ? (uint32_t)st.st_nlink : UINT32_MAX;
    r.uid = st.st_uid;
    r.gid = st.st_gid;
    r.rdev = st.st_rdev ? rdev32(st.st_rdev) : 0;
    r.blksize = (uint32_t)st.st_blksize;
    return stream_copy(writable, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

/* an error reply; *error: its errno */
static Py_ssize_t error_reply(PyObject *writable, uint64_t unique, int err, int *error)
{
    *error = reply_errno(err);
    struct out_header o = {OUT_HEADER, -*error, unique};
    return stream_copy(writable, 0, &o, OUT_HEADER, 1) < 0 ? NOT_HANDLED : OUT_HEADER;
}

/* the host fd of the live open file fh this worker holds, -1 if it holds
 * none (HandleTable.get's fast case: its OpenHandle of kind file whose
 * generation matches the shared FileTable's slot word; anything else,
 * Python copies it from another worker or answers EBADF); *nodeid: the
 * nodeid it was opened on */
static int open_fd(PyObject *session, uint64_t fh, Py_ssize_t *nodeid)
{
    int result = -1;
    PyObject *handles = PyObject_GetAttr(session, s_handles), *dict = NULL, *slots = NULL, *key = NULL;
    if (handles == NULL || (dict = PyObject_GetAttr(handles, s_handles_dict)) == NULL
            || (slots = PyObject_GetAttr(handles, s_fh_slots)) == NULL || !PyDict_CheckExact(dict)
            || (key = PyLong_FromUnsignedLongLong(fh)) == NULL)
        goto out;
    PyObject *handle = PyDict_GetItemWithError(dict, key);     /* borrowed */
    Py_ssize_t kind, fd;
    uint64_t gen;
    if (handle != NULL && attr_ssize(handle, s_kind, &kind) == 0 && kind == KIND_FILE
            && attr_ssize(handle, s_fd, &fd) == 0 && fd >= 0 && fd <= INT32_MAX
            && load_word(slots, (Py_ssize_t)((fh & 0xFFFFFF) << 3), &gen) == 0 && gen == fh >> 24
            && attr_ssize(handle, s_nodeid, nodeid) == 0)
        result = (int)fd;
out:
    Py_XDECREF(key);
    Py_XDECREF(slots);
    Py_XDECREF(dict);
    Py_XDECREF(handles);
    return result;
}

/* READ (files.do_read): preadv(2) straight into the writable buffers after
 * the 16-byte header; NOT_HANDLED or the bytes written */
static Py_ssize_t fast_read(PyObject *session, PyObject *readable, PyObject *writable, Py_ssize_t wsize,
                            const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    struct read_in a;
    if (h->total_extlen || nargs > MAX_ARGS || nargs < READ_IN
            || stream_copy(readable, IN_HEADER, &a, sizeof a, 0) < 0 || a.offset > (uint64_t)INT64_MAX)
        return NOT_HANDLED;
    Py_ssize_t of;
    int fd = open_fd(session, a.fh, &of);
    if (fd < 0)
        return NOT_HANDLED;
    Py_ssize_t size = a.size < MAX_IO_SIZE ? (Py_ssize_t)a.size : MAX_IO_SIZE;
    if (size > wsize - OUT_HEADER)
        size = wsize - OUT_HEADER;
    struct iovec iov[FAST_IOV_MAX];
    int n = 0;
    Py_ssize_t off = OUT_HEADER, want = size, count = PyList_GET_SIZE(writable);
    for (Py_ssize_t i = 0; i < count && want > 0; i++) {
        PyObject *v = PyList_GET_ITEM(writable, i);
        /* the chain's memoryviews stay alive and unreleased during the call
         * (only this thread releases them, after the push) */
        if (!PyMemoryView_Check(v) || (((PyMemoryViewObject *)v)->flags & _Py_MEMORYVIEW_RELEASED))
            return NOT_HANDLED;
        Py_buffer *b = PyMemoryView_GET_BUFFER(v);
        if (b->readonly || !PyBuffer_IsContiguous(b, 'C'))
            return NOT_HANDLED;
        if (off >= b->len) {
            off -= b->len;
            continue;
        }
        if (n == FAST_IOV_MAX)
            return NOT_HANDLED;
        Py_ssize_t k = b->len - off < want ? b->len - off : want;
        iov[n].iov_base = (char *)b->buf + off;
        iov[n].iov_len = (size_t)k;
        n++;
        want -= k;
        off = 0;
    }
    if (size <= 0)
        n = 0;
    ssize_t got = 0;
    int err = 0;
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        do
            got = preadv2(fd, iov, n, (off_t)a.offset, 0);   /* os.preadv's call: the allow-list has it */
        while (got < 0 && errno == EINTR);
        err = errno;
        Py_END_ALLOW_THREADS
    }
    if (got < 0)
        return error_reply(writable, h->unique, err, error);
    struct out_header o = {(uint32_t)(OUT_HEADER + got), 0, h->unique};
    return stream_copy(writable, 0, &o, OUT_HEADER, 1) < 0 ? NOT_HANDLED : OUT_HEADER + (Py_ssize_t)got;
}

/* one word of the slot plus n: a plain load and store (this thread is the
 * slot's only writer; the supervisor reads whole aligned words) */
static void add(uint64_t *w, Py_ssize_t i, uint64_t n)
{
    __atomic_store_n(&w[i], __atomic_load_n(&w[i], __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

/* count one answered request as WorkerMeter.request does: its opcode's
 * requests, latency (sum and bucket: the first bound at or above it),
 * its errno (0 for one at or above errno_slots) or the data bytes READ
 * replied */
static void count(struct meter *m, const struct op_words *op, const struct timespec *start, int error,
                  Py_ssize_t data)
{
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
    else if (data > 0)
        add(m->w, m->bytes_read, (uint64_t)data);
}

/* the checks every fast op shares (FuseSession._handle's, in its order);
 * NOT_HANDLED or the bytes written */
static Py_ssize_t serve(FastOps *self, PyObject *chain)
{
    Py_ssize_t result = NOT_HANDLED, rsize, wsize, mine;
    PyObject *readable = NULL, *writable = NULL, *rviews = NULL, *wviews = NULL, *cache = NULL;
    int error = 0, counting = 0;
    struct timespec start;
    PyObject *meter = PyObject_GetAttr(self->session, s_meter);
    if (meter == NULL || (meter != Py_None && meter != self->meter))
        goto out;
    /* the meter's clock (time.perf_counter_ns: CLOCK_MONOTONIC, the vDSO's) */
    counting = meter != Py_None;
    if (counting)
        clock_gettime(CLOCK_MONOTONIC, &start);
    readable = PyObject_GetAttr(chain, s_readable);
    writable = readable ? PyObject_GetAttr(chain, s_writable) : NULL;
    if (writable == NULL || iovec_parts(readable, &rviews, &rsize) < 0
            || iovec_parts(writable, &wviews, &wsize) < 0)
        goto out;
    if (rsize < IN_HEADER || PyList_GET_SIZE(rviews) == 0)
        goto out;
    /* the driver's layout: the whole header in the first buffer */
    Py_buffer b;
    if (PyObject_GetBuffer(PyList_GET_ITEM(rviews, 0), &b, PyBUF_SIMPLE) < 0)
        goto out;
    int whole = b.len >= IN_HEADER;
    struct in_header h;
    if (whole) {
        memcpy(&h, b.buf, sizeof h);
        __asm__ volatile("" : "+m"(h));   /* the copy, never guest memory again */
    }
    PyBuffer_Release(&b);
    if (!whole || h.len != (uint64_t)rsize || wsize < OUT_HEADER)
        goto out;
    if (h.opcode == OP_GETATTR ? wsize < OUT_HEADER + ATTR_OUT : !(h.opcode == OP_READ && self->reads))
        goto out;
    uint64_t current;
    if (attr_ssize(self->session, s_session, &mine) < 0
            || load_word(self->header, self->session_word, &current) < 0
            || mine <= 0 || (uint64_t)mine != current)
        goto out;
    if (h.opcode == OP_READ) {
        result = fast_read(self->session, rviews, wviews, wsize, &h, &error);
        goto out;
    }
    cache = PyObject_GetAttr(self->session, s_cache);
    if (cache == NULL)
        goto out;
    result = fast_getattr(self, rviews, wviews, &h, cache, &error);
out:
    /* "not handled" is never an error: Python serves (and counts) the request */
    if (result == NOT_HANDLED) {
        PyErr_Clear();
    } else {
        self->served++;
        if (counting)
            count(&self->m, h.opcode == OP_READ ? &self->m.read : &self->m.getattr, &start,
                  error, h.opcode == OP_READ && !error ? result - OUT_HEADER : 0);
    }
    Py_XDECREF(meter);
    Py_XDECREF(readable);
    Py_XDECREF(writable);
    Py_XDECREF(rviews);
    Py_XDECREF(wviews);
    Py_XDECREF(cache);
    return result;
}

static PyObject *fastops_serve(FastOps *self, PyObject *chain)
{
    return PyLong_FromSsize_t(serve(self, chain));
}

static void drop_meter(FastOps *self)
{
    if (self->meter != NULL) {
        PyBuffer_Release(&self->m.words);
        Py_CLEAR(self->meter);
    }
}

/* the meter's slot and where its counters are (fastpath.make, from
 * counters.py): layout = (bytes_read, errno_slots, then requests,
 * latency_sum, buckets, errors for GETATTR, then for READ), bounds =
 * LATENCY_BUCKETS_NS; every word counting may touch is checked to be in
 * the slot, once, here */
static int set_meter(FastOps *self, PyObject *meter, PyObject *words, PyObject *layout, PyObject *bounds)
{
    struct meter m;
    Py_ssize_t v[10];
    memset(&m, 0, sizeof m);
    if (!PyTuple_Check(layout) || PyTuple_GET_SIZE(layout) != 10 || !PyTuple_Check(bounds)
            || PyTuple_GET_SIZE(bounds) < 1 || PyTuple_GET_SIZE(bounds) > MAX_BUCKETS - 1) {
        PyErr_SetString(PyExc_ValueError, "FastOps: bad metrics layout");
        return -1;
    }
    for (Py_ssize_t i = 0; i < 10; i++)
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
    if (PyObject_GetBuffer(words, &m.words, PyBUF_WRITABLE) < 0)
        return -1;
    Py_ssize_t n = m.words.len / 8;
    int ok = ((uintptr_t)m.words.buf & 7) == 0 && m.errno_slots > 0 && m.bytes_read >= 0 && m.bytes_read < n;
    const struct op_words *ops[] = {&m.getattr, &m.read};
    for (int i = 0; i < 2 && ok; i++)
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
                            "attr_nsec", "reads", "meter", "words", "layout", "bounds", NULL};
    PyObject *session, *header, *slots, *meter = Py_None, *words = NULL, *layout = NULL, *bounds = NULL;
    Py_ssize_t session_word, slot_words;
    unsigned long long attr_sec;
    unsigned long attr_nsec;
    int reads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOnnKk|pOOOO", names, &session, &header, &slots,
                                     &session_word, &slot_words, &attr_sec, &attr_nsec, &reads,
                                     &meter, &words, &layout, &bounds))
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
    return 0;
}

static int fastops_traverse(FastOps *self, visitproc visit, void *arg)
{
    Py_VISIT(self->session);
    Py_VISIT(self->header);
    Py_VISIT(self->slots);
    Py_VISIT(self->meter);
    return 0;
}

static int fastops_clear(FastOps *self)
{
    Py_CLEAR(self->session);
    Py_CLEAR(self->header);
    Py_CLEAR(self->slots);
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

static PyGetSetDef fastops_getset[] = {
    {"served", (getter)get_served, NULL, "requests answered in C", NULL},
    {NULL},
};

static PyMethodDef fastops_methods[] = {
    {"serve", (PyCFunction)fastops_serve, METH_O,
     "serve(chain) -> bytes written into chain.writable, or -1: not handled (Python serves it)"},
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastops", "FUSE requests served in C (docs/compiled.md)", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastops(void)
{
    struct { PyObject **slot; const char *text; } strings[] = {
        {&s_readable, "readable"}, {&s_writable, "writable"}, {&s_views, "views"}, {&s_size, "size"},
        {&s_session, "_session"}, {&s_meter, "meter"}, {&s_cache, "cache"}, {&s_fds, "_fds"},
        {&s_root_fd, "root_fd"}, {&s_handles, "handles"}, {&s_handles_dict, "_handles"},
        {&s_fh_slots, "_slots"}, {&s_fd, "fd"}, {&s_kind, "kind"}, {&s_nodeid, "nodeid"},
    };
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++)
        if ((*strings[i].slot = PyUnicode_InternFromString(strings[i].text)) == NULL)
            return NULL;
    if (PyType_Ready(&FastOpsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FastOpsType);
    if (PyModule_AddObject(m, "FastOps", (PyObject *)&FastOpsType) < 0) {
        Py_DECREF(&FastOpsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
