/*
 * Metadata requests in C (docs/compiled.md, "GETXATTR in C", "UNLINK and
 * RMDIR in C", "RENAME in C", "FLUSH in C"), included by _fastops.c (one translation
 * unit: it uses that file's request, state, fd-cache and reply helpers).
 * Each op is served only when FastOps.enable_meta named it (fastmeta.py:
 * the op table's row is the reference handler and nothing configured
 * changes its answer), under the shared checks of serve_req (header,
 * session, meter), with no request extensions; every other request of
 * these opcodes, malformed ones included, is Python's, which answers it.
 *
 * GETXATTR (xattrs.do_getxattr, default configuration: no --xattrmap, no
 * --security-label, no id translation):
 *   - the args are fuse_getxattr_in + a name that fills them (1..255
 *     bytes, its NUL last and only there: parse_xattr_name's accepted
 *     case; anything else, Python's EINVAL/ERANGE), not one of the two ACL
 *     names (acl.check_name: Python answers them ENOTSUP or, with
 *     --posix-acl, reads them);
 *   - the nodeid is the root or one whose O_PATH fd this worker caches
 *     with its current generation (cached_fd, as GETATTR's);
 *   - then what os.getxattr(str(fd), name) does (the path relative to the
 *     worker's cwd /proc/self/fd, following the magic link: the inode
 *     itself): getxattr(2) into 128 bytes and, on ERANGE, again into
 *     XATTR_SIZE_MAX, the GIL released, no retry on EINTR; an errno
 *     (ENODATA the common one) is the error reply;
 *   - the reply of _reply_sized and replies.payload: size 0 asks for the
 *     size, fuse_getxattr_out {size} (ERANGE when the writable part has no
 *     room for its 24 bytes, ops.too_big's errno); else the value, or
 *     ERANGE when it is longer than size or than the writable part.
 *
 * UNLINK and RMDIR (entries.do_unlink/do_rmdir; not with --readonly, whose
 * rows answer EROFS): the name fills the args and passes names.parse_name
 * (1..255 bytes, NUL last and only there, no '/', not "." or ".."; any
 * other: Python's EINVAL or ENAMETOOLONG); the parent is the root or a
 * nodeid whose fd this worker caches (cached_fd); unlinkat(parent, name,
 * 0 or AT_REMOVEDIR), the GIL released, under the worker's own
 * credentials as Python's (neither op is in ops.AS_CALLER), no retry on
 * EINTR; the empty reply, or the error header with its errno. Lookup
 * counts are unchanged, as in Python (the guest FORGETs). In the batch
 * loop the chain is taken before unlinkat (as WRITE's before pwritev2):
 * removing is not safe to do twice.
 *
 * RENAME (entries.do_rename; not with --readonly): the args are
 * fuse_rename_in {newdir} and two names that fill the rest ("old\0new\0"),
 * each as names.parse_two accepts it (1..255 bytes, no NUL inside, no '/',
 * not "." or ".."; anything else, Python's EINVAL or ENAMETOOLONG); both
 * directories, nodeid and newdir, the root or nodeids whose fd this worker
 * caches (cached_fd); then renameat(olddir, old, newdir, new), the GIL
 * released, under the worker's own credentials as Python's os.rename
 * (RENAME is not in ops.AS_CALLER), no retry on EINTR; the empty reply or
 * the error header with its errno. Lookup counts are unchanged (nodeids
 * follow their inodes). The chain is taken first, as UNLINK's: a rename
 * done twice answers ENOENT. RENAME2 (the guest sends it only with flags)
 * stays Python's.
 *
 * FLUSH (files.do_flush) when it has no lock work: the fh is an open file
 * this worker holds (open_fd, READ's check), this worker's own
 * lock-description dict handles._locks has no entry of (nodeid,
 * lock_owner) and the shared FileTable no lock description of them
 * (its header word _H_LOCKS is 0, one load; or, with RELEASE in C,
 * _release.h's lock_on scan of its slots, find_lock's, finds none): then
 * handles.drop_lock_fd finds nothing to drop. A lock held elsewhere (dpkg's
 * on its lock file while it installs) no longer sends every other FLUSH
 * to Python. Then os.close(os.dup(fd)):
 * fcntl(F_DUPFD_CLOEXEC) and close, the GIL released; EMFILE or ENFILE
 * from the dup is the empty reply (Python ignores them), any other errno
 * the error reply; the empty reply. A lock description of that owner on
 * that inode: Python's, which drops it.
 */

#include <sys/xattr.h>

#define OP_UNLINK 10
#define OP_RMDIR 11
#define OP_RENAME 12
#define OP_GETXATTR 22
#define OP_FLUSH 25
#define GETXATTR_IN_SIZE 8      /* abi.GETXATTR_IN */
#define GETXATTR_OUT_SIZE 8     /* abi.GETXATTR_OUT */
#define FLUSH_IN_SIZE 24        /* abi.FLUSH_IN */
#define RENAME_IN_SIZE 8        /* abi.RENAME_IN */
#define META_NAME_MAX 255       /* abi.NAME_MAX, xattrs.XATTR_NAME_MAX */
#define META_XATTR_SMALL 128    /* os.getxattr's first buffer */
#define META_XATTR_MAX (1 << 16)    /* its second, XATTR_SIZE_MAX */

_Static_assert(META_OPS == 5, "meta ops: GETXATTR, UNLINK, RMDIR, FLUSH, RENAME");

/* "_locks", "files", "_hdr": interned by enable_meta */
static PyObject *s_meta_locks, *s_meta_files, *s_meta_hdr;

/* the op's index in FastOps.meta and the meter's meta words, -1 if it is
 * not one of these */
static int meta_slot(uint32_t opcode)
{
    switch (opcode) {
    case OP_GETXATTR: return 0;
    case OP_UNLINK: return 1;
    case OP_RMDIR: return 2;
    case OP_FLUSH: return 3;
    case OP_RENAME: return 4;
    default: return -1;
    }
}

/* whether FastOps serves this opcode here */
static int meta_wants(const FastOps *self, uint32_t opcode)
{
    int s = meta_slot(opcode);
    return s >= 0 && (self->meta & (1u << s));
}

/* the empty reply (a header alone); NOT_HANDLED if it does not fit */
static Py_ssize_t empty_reply(const struct req *q, uint64_t unique)
{
    struct out_header o = {OUT_HEADER, 0, unique};
    return iov_copy(q->w, q->nw, 0, &o, OUT_HEADER, 1) < 0 ? NOT_HANDLED : OUT_HEADER;
}

/* acl.ACL_NAMES */
static int acl_name(const char *name, Py_ssize_t len)
{
    static const char access[] = "system.posix_acl_access", dflt[] = "system.posix_acl_default";
    return (len == (Py_ssize_t)sizeof access - 1 && memcmp(name, access, (size_t)len) == 0)
        || (len == (Py_ssize_t)sizeof dflt - 1 && memcmp(name, dflt, (size_t)len) == 0);
}

/* getxattr(2) of the path into size bytes at buf, the GIL released; the
 * length, or -1 and *err */
static ssize_t meta_getxattr(const char *path, const char *name, char *buf, size_t size, int *err)
{
    ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    got = getxattr(path, name, buf, size);
    *err = errno;
    Py_END_ALLOW_THREADS
    return got;
}

/* GETXATTR; NOT_HANDLED or the bytes written */
static Py_ssize_t fast_getxattr(FastOps *self, const struct state *st, const struct req *q,
                                const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    struct { uint32_t size, padding; char name[META_NAME_MAX + 1]; } a;
    if (h->total_extlen || nargs < GETXATTR_IN_SIZE + 2 || nargs > (Py_ssize_t)sizeof a
            || iov_copy(q->r, q->nr, IN_HEADER, &a, nargs, 0) < 0)
        return NOT_HANDLED;
    Py_ssize_t len = nargs - GETXATTR_IN_SIZE - 1;
    if (a.name[len] != 0 || memchr(a.name, 0, (size_t)len) != NULL || acl_name(a.name, len))
        return NOT_HANDLED;
    int fd = cached_fd(self, st, h->nodeid);
    if (fd < 0)
        return NOT_HANDLED;
    char path[16], small[META_XATTR_SMALL], *value = small, *big = NULL;
    snprintf(path, sizeof path, "%d", fd);
    int err;
    ssize_t got = meta_getxattr(path, a.name, small, sizeof small, &err);
    if (got < 0 && err == ERANGE) {
        /* a read has no side effect: declining after it is harmless */
        if ((big = PyMem_Malloc(META_XATTR_MAX)) == NULL) {
            PyErr_Clear();
            return NOT_HANDLED;
        }
        value = big;
        got = meta_getxattr(path, a.name, big, META_XATTR_MAX, &err);
    }
    Py_ssize_t n;
    if (got < 0) {
        n = error_reply(q, h->unique, err, error);
    } else if (a.size == 0) {
        struct { struct out_header o; uint32_t size, padding; } r = {{OUT_HEADER + GETXATTR_OUT_SIZE, 0, h->unique},
                                                                       (uint32_t)got, 0};
        n = q->wsize < (Py_ssize_t)sizeof r ? error_reply(q, h->unique, ERANGE, error)
            : iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
    } else if ((uint64_t)got > a.size || got > q->wsize - OUT_HEADER) {
        n = error_reply(q, h->unique, ERANGE, error);
    } else {
        struct out_header o = {(uint32_t)(OUT_HEADER + got), 0, h->unique};
        n = iov_copy(q->w, q->nw, 0, &o, OUT_HEADER, 1) < 0 || iov_copy(q->w, q->nw, OUT_HEADER, value, got, 1) < 0
            ? NOT_HANDLED : OUT_HEADER + (Py_ssize_t)got;
    }
    PyMem_Free(big);
    return n;
}

static int one_name(const char *name, Py_ssize_t n);    /* _lookup.h: names.parse_name's rules */

/* the one name that fills the args, as names.parse_name accepts it, into
 * name (NUL-terminated); -1 for any other (Python's error) */
static int meta_name(const struct req *q, const struct in_header *h, char name[META_NAME_MAX + 1])
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    if (h->total_extlen || nargs < 2 || nargs > META_NAME_MAX + 1 || iov_copy(q->r, q->nr, IN_HEADER, name, nargs, 0) < 0
            || !one_name(name, nargs))
        return -1;
    return 0;
}

/* UNLINK and RMDIR; NOT_HANDLED or the bytes written */
static Py_ssize_t fast_remove(FastOps *self, const struct state *st, const struct req *q,
                              const struct in_header *h, int *error)
{
    char name[META_NAME_MAX + 1];
    int fd;
    if (meta_name(q, h, name) < 0 || (fd = cached_fd(self, st, h->nodeid)) < 0)
        return NOT_HANDLED;
    int flags = h->opcode == OP_RMDIR ? AT_REMOVEDIR : 0, rc, err;
    /* answered from here on (serve_req checked room for a header): in the
     * batch loop the chain is taken first, as WRITE's, so that a worker
     * dying in unlinkat leaves it to its successor's EIO, never to a
     * second unlinkat answering ENOENT */
    if (q->take != NULL)
        take_chain(q->take);
    Py_BEGIN_ALLOW_THREADS
    rc = unlinkat(fd, name, flags);
    err = errno;
    Py_END_ALLOW_THREADS
    return rc < 0 ? error_reply(q, h->unique, err, error) : empty_reply(q, h->unique);
}

/* RENAME; NOT_HANDLED or the bytes written */
static Py_ssize_t fast_rename(FastOps *self, const struct state *st, const struct req *q,
                              const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER, len = nargs - RENAME_IN_SIZE;
    struct { uint64_t newdir; char names[2 * (META_NAME_MAX + 1)]; } a;
    if (h->total_extlen || len < 4 || nargs > (Py_ssize_t)sizeof a
            || iov_copy(q->r, q->nr, IN_HEADER, &a, nargs, 0) < 0 || a.names[len - 1] != 0)
        return NOT_HANDLED;
    /* each name with its NUL: the first NUL ends old, the last byte new */
    const char *old = a.names, *new = (const char *)memchr(old, 0, (size_t)len) + 1;
    Py_ssize_t oldlen = new - 1 - old, newlen = len - oldlen - 2;
    if (oldlen < 1 || oldlen > META_NAME_MAX || newlen < 1 || newlen > META_NAME_MAX
            || !one_name(old, oldlen + 1) || !one_name(new, newlen + 1))
        return NOT_HANDLED;
    int olddir = cached_fd(self, st, h->nodeid), newdir;
    if (olddir < 0 || (newdir = cached_fd(self, st, a.newdir)) < 0)
        return NOT_HANDLED;
    /* answered from here on; the chain taken first, as UNLINK's */
    if (q->take != NULL)
        take_chain(q->take);
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    rc = renameat(olddir, old, newdir, new);
    err = errno;
    Py_END_ALLOW_THREADS
    return rc < 0 ? error_reply(q, h->unique, err, error) : empty_reply(q, h->unique);
}

static int lock_on(FastOps *self, const struct state *st, const struct words *hw, uint64_t nodeid, int any,
                   uint64_t owner);     /* _release.h */

/* whether handles.drop_lock_fd(nodeid, owner) has nothing to find: 1 if
 * handles._locks (a dict) has no (nodeid, owner) entry and the FileTable
 * no lock description of them (its _H_LOCKS word 0, or _release.h's
 * lock_on scan finds none); 0 otherwise, when the scan cannot tell, or
 * when anything is not shaped as expected (errors cleared) */
static int no_lock_description(FastOps *self, const struct state *st, uint64_t nodeid, uint64_t owner)
{
    PyObject *handles = PyObject_GetAttr(self->session, s_handles), *locks = NULL, *files = NULL, *hdr = NULL;
    PyObject *key = NULL;
    struct words w = {0};
    uint64_t word = 1;
    int none = handles != NULL && (locks = PyObject_GetAttr(handles, s_meta_locks)) != NULL
        && PyDict_CheckExact(locks)
        && (PyDict_GET_SIZE(locks) == 0
            || ((key = Py_BuildValue("(KK)", (unsigned long long)nodeid, (unsigned long long)owner)) != NULL
                && PyDict_Contains(locks, key) == 0))
        && (files = PyObject_GetAttr(handles, s_meta_files)) != NULL
        && (hdr = PyObject_GetAttr(files, s_meta_hdr)) != NULL && hold_words(hdr, &w) == 0
        && load_word(&w, self->h_locks, &word) == 0
        && (word == 0 || lock_on(self, st, &w, nodeid, 0, owner) == 0);
    drop_words(&w);
    Py_XDECREF(key);
    Py_XDECREF(hdr);
    Py_XDECREF(files);
    Py_XDECREF(locks);
    Py_XDECREF(handles);
    PyErr_Clear();
    return none;
}

/* FLUSH without lock work; NOT_HANDLED or the bytes written */
static Py_ssize_t fast_flush(FastOps *self, const struct state *st, const struct req *q,
                             const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER, nodeid;
    struct { uint64_t fh; uint32_t unused, padding; uint64_t lock_owner; } a;   /* fuse_flush_in */
    int fd;
    if (h->total_extlen || nargs < FLUSH_IN_SIZE || nargs > MAX_ARGS || iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0
            || (fd = open_fd(st, a.fh, &nodeid)) < 0 || !no_lock_description(self, st, (uint64_t)nodeid, a.lock_owner))
        return NOT_HANDLED;
    int copy, rc = 0, err = 0;
    Py_BEGIN_ALLOW_THREADS
    copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0)
        err = errno;
    else if ((rc = close(copy)) < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if ((copy < 0 || rc < 0) && err != EMFILE && err != ENFILE)
        return error_reply(q, h->unique, err, error);
    return empty_reply(q, h->unique);
}

/* one of these requests (meta_wants said so); NOT_HANDLED or the bytes written */
static Py_ssize_t fast_meta(FastOps *self, const struct state *st, const struct req *q, const struct in_header *h,
                            int *error)
{
    switch (h->opcode) {
    case OP_GETXATTR: return fast_getxattr(self, st, q, h, error);
    case OP_UNLINK:
    case OP_RMDIR: return fast_remove(self, st, q, h, error);
    case OP_RENAME: return fast_rename(self, st, q, h, error);
    default: return fast_flush(self, st, q, h, error);
    }
}

/* enable_meta(ops, h_locks, layout): serve the ops whose bits are set in
 * ops (1 << meta_slot), h_locks the FileTable header's _H_LOCKS index;
 * layout: with a meter, (requests, latency_sum, buckets, errors) of each
 * of the five, checked against the meter's slot here, once */
static PyObject *fastops_enable_meta(FastOps *self, PyObject *args)
{
    unsigned int ops;
    Py_ssize_t h_locks, v[META_OPS][4];
    PyObject *layout;
    if (!PyArg_ParseTuple(args, "InO", &ops, &h_locks, &layout))
        return NULL;
    if (ops >= (1u << META_OPS) || h_locks < 0) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_meta: bad ops or FileTable layout");
        return NULL;
    }
    if (self->meter != NULL) {
        if (!PyTuple_Check(layout)) {
            PyErr_SetString(PyExc_TypeError, "FastOps.enable_meta: a meter needs the ops' word indices");
            return NULL;
        }
        if (!PyArg_ParseTuple(layout, "(nnnn)(nnnn)(nnnn)(nnnn)(nnnn)", &v[0][0], &v[0][1], &v[0][2], &v[0][3],
                              &v[1][0], &v[1][1], &v[1][2], &v[1][3], &v[2][0], &v[2][1], &v[2][2], &v[2][3],
                              &v[3][0], &v[3][1], &v[3][2], &v[3][3], &v[4][0], &v[4][1], &v[4][2], &v[4][3]))
            return NULL;
        const struct meter *m = &self->m;
        Py_ssize_t n = m->words.len / 8;
        for (int i = 0; i < META_OPS; i++)
            if (v[i][0] < 0 || v[i][0] >= n || v[i][1] < 0 || v[i][1] >= n || v[i][2] < 0
                    || v[i][2] > n - m->nbounds - 1 || v[i][3] < 0 || v[i][3] > n - m->errno_slots) {
                PyErr_SetString(PyExc_ValueError, "FastOps.enable_meta: metrics layout outside the slot");
                return NULL;
            }
        for (int i = 0; i < META_OPS; i++)
            self->m.meta[i] = (struct op_words){v[i][0], v[i][1], v[i][2], v[i][3]};
    }
    self->h_locks = h_locks;
    self->meta = ops;
    Py_RETURN_NONE;
}
