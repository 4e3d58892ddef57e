/*
 * MKDIR in C (docs/compiled.md, "MKDIR in C"), included by _fastops.c
 * after _create.h (one translation unit: it uses CREATE's caller check and
 * thread-lock release, _lookup.h's table code and entry reply). The
 * reference is entries.do_mkdir with names.parse_name, FuseSession
 * .as_caller and FuseSession.entry.
 *
 * Served here, under the shared checks of serve_req (a writable part of at
 * least 16 + 128 bytes), when:
 *   - FastOps.enable_mkdir was called (fastpath.make: LOOKUP is C's, the
 *     MKDIR row is entries.do_mkdir, no --posix-acl (the guest's umask,
 *     default ACLs), no --security-label (the labelled temporary name));
 *   - no request extensions (no supplementary group, no security label);
 *   - fuse_mkdir_in whole, then one name filling the rest (name + NUL,
 *     1..255 bytes, no other NUL, no '/', not "." or ".."): any other is
 *     Python's (EINVAL, ENAMETOOLONG);
 *   - the caller is uid 0 with the thread's cached fsuid/fsgid its ids
 *     (_create.h's caller_is_current: as_caller makes no system call);
 *   - the parent is the root or a nodeid whose fd this worker caches; the
 *     inode cache has room; the inode table is ready and not DIRTY.
 *   Nothing was done before these checks.
 * Then, the request answered from here on (its chain taken first in the
 * batch loop, as CREATE's: a worker that dies after the mkdir leaves it to
 * its successor's EIO, never to a second mkdir answering EEXIST):
 *   1. mkdirat(parent, name, mode & 07777), the GIL released, EINTR
 *      retried, the worker's umask 0 as in Python; an error is the error
 *      reply (EEXIST, EACCES, ENOSPC, EMLINK... as os.mkdir raises them);
 *   2. the lookup of the new directory: _lookup.h's cold_lookup, the
 *      reply's fuse_attr from its fstat. Where it declines (the table
 *      full, DIRTY, a lock error, the name gone again...), the thread lock
 *      is let go and fastpath.mkdir_rest runs FuseSession.entry, and C
 *      writes its bytes or errno;
 *   3. fuse_out_header + fuse_entry_out, counted under MKDIR with a meter.
 * System calls: mkdirat (policy/request.policy: MKDIR), and cold_lookup's.
 */

#define MKDIR_IN 8

/* fastpath.mkdir_rest's answer (bytes: the 128 entry bytes after the
 * header; int: an errno) written as the reply (_create.h's rest_answer) */
static Py_ssize_t mkdir_rest(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                             const char *name, int parent, int *error)
{
    drop_tlock(st);
    PyObject *r = PyObject_CallFunction(self->mk.rest, "Oiy#", self->session, parent, name,
                                        (Py_ssize_t)strlen(name));
    return rest_answer(q, h, r, ENTRY_OUT, error);
}

/* MKDIR; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_mkdir(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                             int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER, nlen = nargs - MKDIR_IN;
    uint32_t a[2];      /* fuse_mkdir_in: mode, umask */
    char name[LOOKUP_NAME_MAX + 1];
    if (h->total_extlen || nlen < 2 || nlen > LOOKUP_NAME_MAX + 1
            || iov_copy(q->r, q->nr, IN_HEADER, a, sizeof a, 0) < 0
            || iov_copy(q->r, q->nr, IN_HEADER + MKDIR_IN, name, nlen, 0) < 0)
        return NOT_HANDLED;
    if (!one_name(name, nlen) || !caller_is_current(self->mk.creds, h) || table_ready(self, st) < 0)
        return NOT_HANDLED;
    int parent = cached_fd(self, st, h->nodeid);
    PyErr_Clear();
    if (parent < 0 || !cache_has_room(self, st) || word_at(&st->header, self->lk.h_dirty) != 0)
        return NOT_HANDLED;
    /* answered from here on: the reply fits (serve_req checked the room) */
    if (q->take != NULL)
        take_chain(q->take);
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    do
        rc = mkdirat(parent, name, (mode_t)(a[0] & 07777));
    while (rc < 0 && errno == EINTR);
    err = errno;
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return error_reply(q, h->unique, err, error);
    struct entry_reply r;
    memset(&r, 0, sizeof r);
    if (cold_lookup(self, st, parent, name, &r) < 0) {
        PyErr_Clear();
        return mkdir_rest(self, st, q, h, name, parent, error);
    }
    r.len = sizeof r;
    r.unique = h->unique;
    r.entry_valid = r.attr_valid = self->attr_sec;
    r.entry_valid_nsec = r.attr_valid_nsec = self->attr_nsec;
    return iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

/* enable_mkdir(rest, creds, meter_words): see fastops_methods */
static PyObject *fastops_enable_mkdir(FastOps *self, PyObject *args)
{
    PyObject *rest, *creds, *words;
    if (!PyArg_ParseTuple(args, "OOO", &rest, &creds, &words))
        return NULL;
    if (self->lk.hash == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_mkdir: LOOKUP is not C's (enable_lookup first)");
        return NULL;
    }
    if (!PyCallable_Check(rest)) {
        PyErr_SetString(PyExc_TypeError, "FastOps.enable_mkdir: rest must be callable");
        return NULL;
    }
    struct op_words w = {-1, -1, -1, -1};
    if (meter_op_words(self, words, "enable_mkdir", &w) < 0)
        return NULL;
    Py_INCREF(rest);
    Py_INCREF(creds);
    Py_XSETREF(self->mk.rest, rest);
    Py_XSETREF(self->mk.creds, creds);
    self->m.mkdir = w;
    Py_RETURN_NONE;
}
