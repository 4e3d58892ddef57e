/*
 * READLINK, STATFS and the ENOSYS opcodes in C (docs/compiled.md,
 * "READLINK, STATFS and ENOSYS in C"), included by _fastops.c after
 * _create.h (one translation unit: it uses that file's request, state,
 * fd-cache and reply helpers, meter_op_words and _create.h's rest_answer).
 * No attribute name is read here (nothing to intern in PyInit__fastops).
 *
 * READLINK (attrs.do_readlink), when FastOps.enable_readlink was called
 * (fastpath.make: the READLINK row is attrs.do_readlink), under the
 * shared checks of serve_req (header, session, meter), and:
 *   - no request extensions, args at most MAX_ARGS (any args are ignored,
 *     as Python ignores them; more: Python's EINVAL);
 *   - the nodeid is the root or one whose O_PATH fd this worker caches
 *     with its current generation (cached_fd, GETATTR's check; any other:
 *     Python reopens it or answers ESTALE).
 * Then, the request answered from here on (in the batch loop its chain is
 * taken and recorded first, as WRITE's: a worker killed in the call, by
 * the seccomp filter say, leaves it to its successor's EIO, never to a
 * second worker serving it again), what os.readlink(b"", dir_fd=fd)
 * does: readlinkat(fd, "", buf, MAXPATHLEN) into a 4096-byte buffer (a
 * longer target is cut there, as in CPython), the GIL released, no retry
 * on EINTR; ENOENT (an existing non-symlink) is EINVAL, any other errno
 * the error reply. The target is the payload (replies.payload); one that
 * does not fit the writable part is EIO after fastpath.reply_too_big has
 * logged FuseSession._too_big's rate-limited warning.
 *
 * STATFS (attrs.do_statfs), when FastOps.enable_statfs was called (the
 * STATFS row is attrs.do_statfs), under the shared checks, and: no
 * request extensions, args at most MAX_ARGS (ignored), a writable part of
 * at least 16 + 80 bytes (less: Python's EIO before the op, ops.py's
 * reply column), the nodeid as READLINK's. Then, taken first as READLINK,
 * what os.fstatvfs(fd) does: fstatvfs(3) (one fstatfs(2)), retried on
 * EINTR, the GIL released; its errno the error reply; else fuse_kstatfs
 * {blocks, bfree, bavail, files, ffree, bsize, namemax, frsize, 0...} as
 * abi.STATFS_OUT packs them. CPython makes each field a C long (a count
 * at or above 2^63 is negative there) and struct.pack refuses a negative
 * count or a size at or above 2^32 (Python logs the exception and answers
 * EIO): for those C calls fastpath.statfs_rest, which runs do_statfs as
 * FuseSession._handle would and returns its bytes or errno.
 *
 * ENOSYS: the opcodes FastOps.enable_enosys named (fastpath.enosys_opcodes:
 * those of ops.ENOSYS the session's op table has no row for: IOCTL, POLL,
 * ACCESS, ...). FuseSession._handle answers them ENOSYS right after its
 * header checks (header.len equal to the readable size, room for a reply
 * header), before the session, the args or extensions are looked at, and
 * logs nothing; so does C, under serve_req's header checks only (a split
 * header, a wrong len or a writable part under 16 bytes: Python's, which
 * logs it). Nothing is read or changed: taken after the reply, as
 * GETATTR's.
 *
 * Each is counted under its own opcode (the meter words enable_* gave,
 * checked against the slot once), as WorkerMeter.request counts it.
 * System calls: readlinkat and fstatfs, on policy/request.policy already
 * for Python's same calls.
 */

#include <sys/statvfs.h>

#define OP_READLINK 5
#define OP_STATFS 17
#define STATFS_OUT_SIZE 80          /* abi.STATFS_OUT */
#define READLINK_BUF 4096           /* os.readlink's buffer: MAXPATHLEN */

/* fuse_out_header + fuse_kstatfs, as abi.OUT_HEADER + abi.STATFS_OUT ("<5QIII4x24x") */
struct statfs_reply {
    struct out_header o;
    uint64_t blocks, bfree, bavail, files, ffree;
    uint32_t bsize, namelen, frsize, padding, spare[6];
};

_Static_assert(sizeof(struct statfs_reply) == OUT_HEADER + STATFS_OUT_SIZE, "fuse_kstatfs");

/* whether opcode is one FastOps answers ENOSYS */
static int enosys_wants(const FastOps *self, uint32_t opcode)
{
    return opcode < ENOSYS_OPCODES && (self->at.enosys >> opcode) & 1;
}

/* READLINK's and STATFS's start: no request extensions, at most MAX_ARGS
 * of arguments, room bytes of reply space and the nodeid's cached inode
 * fd, or -1: Python's. With the fd the request is answered from here on:
 * its chain taken (in the batch loop) */
static int taken_inode_fd(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                          Py_ssize_t room)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    if (h->total_extlen || nargs > MAX_ARGS || q->wsize < room)
        return -1;
    int fd = cached_fd(self, st, h->nodeid);
    if (fd >= 0 && q->take != NULL)
        take_chain(q->take);
    return fd;
}

/* READLINK; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_readlink(FastOps *self, struct state *st, const struct req *q,
                                const struct in_header *h, int *error)
{
    /* serve_req checked room for a header */
    int fd = taken_inode_fd(self, st, q, h, OUT_HEADER);
    if (fd < 0)
        return NOT_HANDLED;
    char buf[READLINK_BUF];
    ssize_t got;
    int err;
    Py_BEGIN_ALLOW_THREADS
    got = readlinkat(fd, "", buf, sizeof buf);
    err = errno;
    Py_END_ALLOW_THREADS
    if (got < 0)
        return error_reply(q, h->unique, err == ENOENT ? EINVAL : err, error);
    if (got > q->wsize - OUT_HEADER) {
        /* FuseSession._too_big: the warning (rate-limited, Python's), EIO;
         * the inode table's thread lock let go first, as for every tail */
        drop_tlock(st);
        PyObject *r = PyObject_CallFunction(self->at.too_big, "OInn", self->session, (unsigned int)OP_READLINK,
                                            (Py_ssize_t)got, q->wsize - OUT_HEADER);
        Py_XDECREF(r);
        PyErr_Clear();
        return error_reply(q, h->unique, EIO, error);
    }
    struct out_header o = {(uint32_t)(OUT_HEADER + got), 0, h->unique};
    return iov_copy(q->w, q->nw, 0, &o, OUT_HEADER, 1) < 0 || iov_copy(q->w, q->nw, OUT_HEADER, buf, got, 1) < 0
        ? NOT_HANDLED : OUT_HEADER + (Py_ssize_t)got;
}

/* STATFS; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_statfs(FastOps *self, struct state *st, const struct req *q,
                              const struct in_header *h, int *error)
{
    /* taken first: tests/security's worker killed in fstatfs by the
     * filter is answered EIO by its successor */
    int fd = taken_inode_fd(self, st, q, h, (Py_ssize_t)sizeof(struct statfs_reply));
    if (fd < 0)
        return NOT_HANDLED;
    struct statvfs s;
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    do
        rc = fstatvfs(fd, &s);
    while (rc != 0 && errno == EINTR);
    err = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return error_reply(q, h->unique, err, error);
    const uint64_t count_max = (uint64_t)INT64_MAX;
    if ((uint64_t)s.f_blocks > count_max || (uint64_t)s.f_bfree > count_max || (uint64_t)s.f_bavail > count_max
            || (uint64_t)s.f_files > count_max || (uint64_t)s.f_ffree > count_max || s.f_bsize > UINT32_MAX
            || s.f_namemax > UINT32_MAX || s.f_frsize > UINT32_MAX) {
        /* struct.pack would refuse them: Python's answer (and log) */
        drop_tlock(st);
        PyObject *r = PyObject_CallFunction(self->at.statfs_rest, "OK", self->session,
                                            (unsigned long long)h->nodeid);
        return rest_answer(q, h, r, STATFS_OUT_SIZE, error);
    }
    struct statfs_reply r;
    memset(&r, 0, sizeof r);
    r.o = (struct out_header){sizeof r, 0, h->unique};
    r.blocks = s.f_blocks;
    r.bfree = s.f_bfree;
    r.bavail = s.f_bavail;
    r.files = s.f_files;
    r.ffree = s.f_ffree;
    r.bsize = (uint32_t)s.f_bsize;
    r.namelen = (uint32_t)s.f_namemax;
    r.frsize = (uint32_t)s.f_frsize;
    return iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

/* an ENOSYS opcode (enosys_wants said so): the error reply */
static Py_ssize_t fast_enosys(const struct req *q, const struct in_header *h, int *error)
{
    return error_reply(q, h->unique, ENOSYS, error);
}

/* the meter words of an op answered here (READLINK, STATFS, an ENOSYS
 * opcode), NULL for another opcode (count() in _fastops.c) */
static struct op_words *attrs_words(FastOps *self, int opcode)
{
    if (opcode == OP_READLINK && self->at.too_big != NULL)
        return &self->m.readlink;
    if (opcode == OP_STATFS && self->at.statfs_rest != NULL)
        return &self->m.statfs;
    if (opcode >= 0 && enosys_wants(self, (uint32_t)opcode))
        return &self->m.enosys[opcode];
    return NULL;
}

/* enable_readlink and enable_statfs: (callable, meter_words) into *tail
 * (the Python tail C calls) and *w (the op's meter words) */
static PyObject *enable_with_tail(FastOps *self, PyObject *args, const char *name, PyObject **tail,
                                  struct op_words *w)
{
    PyObject *fn, *words;
    if (!PyArg_ParseTuple(args, "OO", &fn, &words))
        return NULL;
    if (!PyCallable_Check(fn)) {
        PyErr_Format(PyExc_TypeError, "FastOps.%s: its first argument must be callable", name);
        return NULL;
    }
    struct op_words got = {-1, -1, -1, -1};
    if (meter_op_words(self, words, name, &got) < 0)
        return NULL;
    Py_INCREF(fn);
    Py_XSETREF(*tail, fn);
    *w = got;
    Py_RETURN_NONE;
}

/* enable_readlink(too_big, meter_words): see fastops_methods */
static PyObject *fastops_enable_readlink(FastOps *self, PyObject *args)
{
    return enable_with_tail(self, args, "enable_readlink", &self->at.too_big, &self->m.readlink);
}

/* enable_statfs(rest, meter_words): see fastops_methods */
static PyObject *fastops_enable_statfs(FastOps *self, PyObject *args)
{
    return enable_with_tail(self, args, "enable_statfs", &self->at.statfs_rest, &self->m.statfs);
}

/* enable_enosys(opcodes, meter_words): see fastops_methods */
static PyObject *fastops_enable_enosys(FastOps *self, PyObject *args)
{
    PyObject *opcodes, *words;
    if (!PyArg_ParseTuple(args, "O!O", &PyTuple_Type, &opcodes, &words))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(opcodes);
    if (words != Py_None && (!PyTuple_Check(words) || PyTuple_GET_SIZE(words) != n)) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_enosys: one meter words tuple per opcode, or None");
        return NULL;
    }
    uint64_t mask = 0;
    struct op_words w[ENOSYS_OPCODES];
    for (Py_ssize_t i = 0; i < n; i++) {
        long op = PyLong_AsLong(PyTuple_GET_ITEM(opcodes, i));
        if (op == -1 && PyErr_Occurred())
            return NULL;
        if (op < 0 || op >= ENOSYS_OPCODES) {
            PyErr_SetString(PyExc_ValueError, "FastOps.enable_enosys: an opcode outside 0..63");
            return NULL;
        }
        struct op_words one = {-1, -1, -1, -1};
        if (meter_op_words(self, words == Py_None ? Py_None : PyTuple_GET_ITEM(words, i), "enable_enosys", &one) < 0)
            return NULL;
        w[op] = one;
        mask |= (uint64_t)1 << op;
    }
    for (int op = 0; op < ENOSYS_OPCODES; op++)
        if (mask >> op & 1)
            self->m.enosys[op] = w[op];
    self->at.enosys = mask;
    Py_RETURN_NONE;
}
