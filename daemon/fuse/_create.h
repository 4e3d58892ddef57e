/*
 * CREATE in C (docs/compiled.md, "CREATE in C"), included by _fastops.c
 * after _lookup.h (one translation unit: it uses that file's request,
 * state and reply helpers and _lookup.h's table code). The reference is
 * files.do_create with _create_labeled, _create_file and created,
 * names.parse_name, FuseSession.as_caller, FuseSession.entry and
 * HandleTable.add.
 *
 * Served here, under the shared checks of serve_req (a writable part of at
 * least 16 + 128 + 16 bytes: the op table's reply minimum), when:
 *   - FastOps.enable_create was called (fastpath.make: LOOKUP is C's, the
 *     CREATE row is files.do_create, no --posix-acl (the guest's umask and
 *     default ACLs), no --security-label, the stock HandleTable);
 *   - no request extensions (no supplementary group, no security label);
 *   - fuse_create_in whole, then one name filling the rest (name + NUL,
 *     1..255 bytes, no other NUL, no '/', not "." or ".."): any other is
 *     Python's (EINVAL, ENAMETOOLONG);
 *   - the mode's type is 0 or S_IFREG and the access mode is not 3
 *     (Python: EINVAL);
 *   - the caller is uid 0, and the thread's fsuid/fsgid as
 *     credentials._state caches them are the caller's uid and gid: then
 *     as_caller makes no system call (no switch, no CAP_DAC_OVERRIDE, no
 *     groups) and neither does C. Other callers are Python's;
 *   - the parent is the root or a nodeid whose fd this worker caches
 *     (cached_fd); the open-file table has room (host_fd_count below
 *     max_open_files: else Python's ENFILE); the inode cache has room
 *     (cache_has_room); the inode table is ready and not DIRTY;
 *   - fstatat(parent, name, AT_SYMLINK_NOFOLLOW) says ENOENT: a name that
 *     exists (Python opens it, or EEXIST with O_EXCL) or any other errno
 *     is Python's; nothing was done yet.
 * Then, the request answered from here on (in the batch loop its chain is
 * taken and recorded first, as for WRITE: a worker that dies after the
 * create leaves it to its successor's EIO, as in the pure path, never to a
 * second create that would answer EEXIST):
 *   1. openat(parent, name, flags | O_CREAT | O_EXCL | O_NOFOLLOW |
 *      O_CLOEXEC, mode & 07777), the GIL released, EINTR retried: the
 *      flags are the guest's through files.host_open_flags' mask, with
 *      files.writeback_flags' changes under --writeback. An error is the
 *      error reply, but EEXIST without the guest's O_EXCL (the name
 *      appeared since the fstatat), which fastpath.create_rest serves as
 *      _create_file does (files.open_existing).
 *   2. the lookup of the new file: _lookup.h's cold_lookup (openat O_PATH,
 *      fstat, the insertion under the table lock, the fd cached), the
 *      reply's fuse_attr from that fstat. Where it declines (the table
 *      full, DIRTY, a lock error, the new name gone...), the thread lock
 *      is let go and fastpath.create_rest does files.created (FuseSession
 *      .entry and HandleTable.add) with the open fd, and answers.
 *   3. HandleTable.add (the shared FileTable's slot, the keeper's copy,
 *      the OpenHandle): in C as OPEN's (_open.h, add_fd_in_c) when
 *      enable_open was called, else (or where C's allocation declines)
 *      fastpath.add_created; the fh; an error (ENFILE) is the error
 *      reply, the lookup count staying taken, as in Python.
 *   4. fuse_out_header + fuse_entry_out + fuse_open_out {fh, the FOPEN_*
 *      of --cache}, counted under CREATE with a meter.
 * System calls: newfstatat, openat, close, fcntl and futex (the table lock, _tablelock.h) and,
 * in Python's HandleTable.add, sendmsg to the keeper: all already on
 * policy/request.policy.
 */

#define CREATE_IN 16

static long long add_fd_in_c(FastOps *self, const struct state *st, int fd, uint64_t nodeid, int kind,
                             uint32_t flags);     /* _open.h */
#define OPEN_OUT 16

/* fuse_create_in, as abi.CREATE_IN ("<IIII") */
struct create_in {
    uint32_t flags, mode, umask, open_flags;
};

/* fuse_out_header + fuse_entry_out + fuse_open_out (abi.OPEN_OUT, "<QI4x") */
struct create_reply {
    struct entry_reply e;
    uint64_t fh;
    uint32_t open_flags, padding;
};

_Static_assert(sizeof(struct create_in) == CREATE_IN, "fuse_create_in");
_Static_assert(sizeof(struct create_reply) == OUT_HEADER + ENTRY_OUT + OPEN_OUT, "fuse_open_out");

static PyObject *s_uid, *s_gid, *s_max_open_files;

/* the caller is root and the thread's cached fsuid/fsgid are its ids:
 * as_caller would make no system call */
static int caller_is_current(PyObject *creds, const struct in_header *h)
{
    Py_ssize_t uid, gid;
    int ok = h->uid == 0 && attr_ssize(creds, s_uid, &uid) == 0
             && attr_ssize(creds, s_gid, &gid) == 0 && uid == 0 && gid == (Py_ssize_t)h->gid;
    PyErr_Clear();
    return ok;
}

/* HandleTable.check_room passes: host_fd_count < max_open_files, with
 * the two len()s host_fd_count adds read here (_handles and _locks, both
 * dicts): the property would run an interpreter frame per CREATE */
static int handles_have_room(FastOps *self)
{
    PyObject *handles = PyObject_GetAttr(self->session, s_handles), *open = NULL, *locks = NULL;
    Py_ssize_t max;
    int ok = handles != NULL && (open = PyObject_GetAttr(handles, s_handles_dict)) != NULL && PyDict_CheckExact(open)
             && (locks = PyObject_GetAttr(handles, s_meta_locks)) != NULL && PyDict_CheckExact(locks)
             && attr_ssize(handles, s_max_open_files, &max) == 0
             && PyDict_GET_SIZE(open) + PyDict_GET_SIZE(locks) < max;
    Py_XDECREF(locks);
    Py_XDECREF(open);
    Py_XDECREF(handles);
    PyErr_Clear();
    return ok;
}

/* the thread lock of the inode table let go before Python runs (it takes
 * it itself); the next request of the call takes it again */
static void drop_tlock(struct state *st)
{
    if (st->tlock != NULL) {
        thread_lock_give(st->tlock);
        PyErr_Clear();
        Py_CLEAR(st->tlock);
    }
}

/* A Python tail's answer ``r`` (fastpath.create_rest, mkdir_rest: bytes,
 * the ``size`` reply bytes after the header; int: an errno; NULL or
 * anything else: EIO) written as the reply; r's reference is taken */
static Py_ssize_t rest_answer(const struct req *q, const struct in_header *h, PyObject *r, Py_ssize_t size,
                              int *error)
{
    Py_ssize_t n;
    if (r != NULL && PyBytes_CheckExact(r) && PyBytes_GET_SIZE(r) == size) {
        struct out_header o = {(uint32_t)(OUT_HEADER + size), 0, h->unique};
        n = iov_copy(q->w, q->nw, 0, &o, OUT_HEADER, 1) < 0
            || iov_copy(q->w, q->nw, OUT_HEADER, PyBytes_AS_STRING(r), size, 1) < 0
            ? NOT_HANDLED : OUT_HEADER + size;
    } else {
        long err = r != NULL && PyLong_CheckExact(r) ? PyLong_AsLong(r) : EIO;
        n = error_reply(q, h->unique, (int)err, error);
    }
    Py_XDECREF(r);
    PyErr_Clear();
    return n;
}

/* fastpath.create_rest's answer (bytes: the 144 reply bytes after the
 * header; int: an errno) written as the reply */
static Py_ssize_t create_rest(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                              const char *name, int fd, const struct create_in *a, uint32_t host, uint32_t opened,
                              int parent, int *error)
{
    drop_tlock(st);
    PyObject *r = PyObject_CallFunction(self->cr.rest, "Oiy#iIIII", self->session, parent, name,
                                        (Py_ssize_t)strlen(name), fd, a->flags, a->open_flags, host, opened);
    return rest_answer(q, h, r, ENTRY_OUT + OPEN_OUT, error);
}

/* CREATE; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_create(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                              int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER, nlen = nargs - CREATE_IN;
    struct create_in a;
    char name[LOOKUP_NAME_MAX + 1];
    if (h->total_extlen || nlen < 2 || nlen > LOOKUP_NAME_MAX + 1
            || iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0
            || iov_copy(q->r, q->nr, IN_HEADER + CREATE_IN, name, nlen, 0) < 0)
        return NOT_HANDLED;
    if (!one_name(name, nlen))
        return NOT_HANDLED;
    if (((a.mode & S_IFMT) != 0 && (a.mode & S_IFMT) != S_IFREG) || (a.flags & O_ACCMODE) == O_ACCMODE)
        return NOT_HANDLED;
    if (!caller_is_current(self->cr.creds, h) || table_ready(self, st) < 0)
        return NOT_HANDLED;
    int parent = cached_fd(self, st, h->nodeid);
    PyErr_Clear();
    if (parent < 0 || !handles_have_room(self) || !cache_has_room(self, st)
            || word_at(&st->header, self->lk.h_dirty) != 0)
        return NOT_HANDLED;
    struct stat s;
    int err = stat_name(parent, name, &s);
    if (err != ENOENT)
        return NOT_HANDLED;
    /* host_open_flags, then writeback_flags under --writeback */
    uint32_t host = a.flags & self->cr.kept, opened = host;
    if (self->cr.writeback) {
        opened &= ~(uint32_t)O_APPEND;
        if ((opened & O_ACCMODE) == O_WRONLY)
            opened = (opened & ~(uint32_t)O_ACCMODE) | O_RDWR;
    }
    /* answered from here on: the reply fits (serve_req checked the room) */
    if (q->take != NULL)
        take_chain(q->take);
    int fd;
    Py_BEGIN_ALLOW_THREADS
    do
        fd = openat(parent, name, (int)opened | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, (mode_t)(a.mode & 07777));
    while (fd < 0 && errno == EINTR);
    err = errno;
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        if (err == EEXIST && !(a.flags & O_EXCL))
            return create_rest(self, st, q, h, name, -1, &a, host, opened, parent, error);
        return error_reply(q, h->unique, err, error);
    }
    struct create_reply r;
    memset(&r, 0, sizeof r);
    if (cold_lookup(self, st, parent, name, &r.e) < 0) {
        PyErr_Clear();
        return create_rest(self, st, q, h, name, fd, &a, host, opened, parent, error);
    }
    /* HandleTable.add: in C when OPEN is C's (_open.h), else, or where C's
     * allocation declines, Python's, which owns fd from there (it closes
     * it on failure) */
    long long fh = add_fd_in_c(self, st, fd, r.e.nodeid, KIND_FILE, opened);
    if (fh == 0) {
        PyObject *got = PyObject_CallFunction(self->cr.add, "OiKI", self->session, fd,
                                              (unsigned long long)r.e.nodeid, opened);
        fh = got != NULL && PyLong_CheckExact(got) ? PyLong_AsLongLong(got) : -EIO;
        Py_XDECREF(got);
        PyErr_Clear();
    }
    if (fh <= 0)
        return error_reply(q, h->unique, fh < 0 && fh > -4096 ? (int)-fh : EIO, error);
    r.e.len = sizeof r;
    r.e.unique = h->unique;
    r.e.entry_valid = r.e.attr_valid = self->attr_sec;
    r.e.entry_valid_nsec = r.e.attr_valid_nsec = self->attr_nsec;
    r.fh = (uint64_t)fh;
    r.open_flags = self->cr.fopen;
    return iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

/* enable_create(rest, add, creds, kept, writeback, fopen, meter_words): see fastops_methods */
static PyObject *fastops_enable_create(FastOps *self, PyObject *args)
{
    PyObject *rest, *add, *creds, *words;
    unsigned int kept, fopen;
    int writeback;
    if (!PyArg_ParseTuple(args, "OOOIpIO", &rest, &add, &creds, &kept, &writeback, &fopen, &words))
        return NULL;
    if (self->lk.hash == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_create: LOOKUP is not C's (enable_lookup first)");
        return NULL;
    }
    if (!PyCallable_Check(rest) || !PyCallable_Check(add)) {
        PyErr_SetString(PyExc_TypeError, "FastOps.enable_create: rest and add must be callable");
        return NULL;
    }
    struct op_words w = {-1, -1, -1, -1};
    if (self->meter != NULL) {
        /* the meter's words of CREATE, each checked against its slot once */
        Py_ssize_t n = self->m.words.len / 8;
        if (!PyArg_ParseTuple(words, "nnnn", &w.requests, &w.latency_sum, &w.buckets, &w.errors))
            return NULL;
        if (w.requests < 0 || w.requests >= n || w.latency_sum < 0 || w.latency_sum >= n || w.buckets < 0
                || w.buckets > n - self->m.nbounds - 1 || w.errors < 0 || w.errors > n - self->m.errno_slots) {
            PyErr_SetString(PyExc_ValueError, "FastOps.enable_create: metrics layout outside the slot");
            return NULL;
        }
    }
    Py_INCREF(rest);
    Py_INCREF(add);
    Py_INCREF(creds);
    Py_XSETREF(self->cr.rest, rest);
    Py_XSETREF(self->cr.add, add);
    Py_XSETREF(self->cr.creds, creds);
    self->cr.kept = kept;
    self->cr.writeback = writeback;
    self->cr.fopen = fopen;
    self->m.create = w;
    Py_RETURN_NONE;
}
