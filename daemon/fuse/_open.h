/*
 * OPEN and OPENDIR in C (docs/compiled.md, "OPEN and OPENDIR in C"),
 * included by _fastops.c after _release.h (one translation unit: it uses
 * that file's FileTable layout and locks, _create.h's handles_have_room,
 * _lookup.h's record_lock and word helpers). The reference is
 * files.do_open (host_open_flags, open_file, open_regular, handles.reopen)
 * and dirs.do_opendir, with HandleTable.add, FileTable.alloc, Peers.mine
 * and Peers.keep.
 *
 * Served here, under the shared checks of serve_req (a writable part of at
 * least 16 + 16 bytes), when FastOps.enable_open was called (fastpath.make:
 * RELEASE is C's, the OPEN and OPENDIR rows are the reference handlers, the
 * stock HandleTable and FileTable), and:
 *   - no request extensions; fuse_open_in whole (8 bytes, more ignored as
 *     files._args does; shorter: Python's EINVAL);
 *   - OPEN: the access mode is not 3 (Python: EINVAL) and no SUID/SGID kill
 *     is due (files.kill_on_open: O_TRUNC with FUSE_OPEN_KILL_SUIDGID or a
 *     caller other than uid 0; Python drops CAP_FSETID around that open);
 *   - the nodeid is the root or one whose fd this worker caches
 *     (cached_fd; anything else Python reopens or answers ESTALE);
 *   - the open-file table has room (HandleTable.check_room);
 *   - handles.files is the FileTable enable_release was given, handles
 *     .peers None or with an int serial, handles._open_per_node a dict;
 *   - OPEN: fstat of the O_PATH fd succeeds (its error is Python's).
 * Then (in the batch loop its chain is taken first, as CREATE's: an OPEN
 * with O_TRUNC is never done twice):
 *   1. OPEN: a type other than a regular file is EISDIR, ELOOP or EACCES
 *      as open_regular answers; the reopen through the fd's /proc magic
 *      link, openat(AT_FDCWD, "<fd>", flags & ~O_NOFOLLOW | O_CLOEXEC) with
 *      the GIL released (the worker's cwd is /proc/self/fd, as for
 *      handles.reopen), the flags files.open_file's: under --writeback
 *      files.writeback_flags', and on EACCES/EPERM of an upgraded access
 *      mode once more with the guest's without O_APPEND (the fstat again,
 *      as open_regular's). OPENDIR: O_RDONLY|O_DIRECTORY|O_NONBLOCK. An
 *      error is the error reply.
 *   2. FileTable.alloc's writes under its locks (the thread lock taken
 *      without waiting, the table lock, DIRTY 0 else not here): the slot
 *      from the free list or the high mark, its words, the generation,
 *      DIRTY set first and cleared last as _release.h does. Where that
 *      cannot be done here (the thread lock busy, DIRTY, the table full, a
 *      lock error) fastpath.add_handle does HandleTable.add with the fd
 *      (it waits, repairs, or answers ENFILE and closes the fd).
 *   3. Peers.keep(fh, fd) through Python (one sendmsg with SCM_RIGHTS to
 *      the keeper when there is one), then the worker's own bookkeeping:
 *      an OpenHandle in handles._handles, the nodeid's count in
 *      _open_per_node one up.
 *   4. fuse_out_header + fuse_open_out {fh, FOPEN_*}, counted under OPEN or
 *      OPENDIR with a meter.
 * CREATE (_create.h) allocates its fh with steps 2 and 3 too
 * (add_fd_in_c) when enable_open was called, fastpath.add_created only
 * where they decline.
 * System calls: fstat, openat, fcntl and futex (the table lock, _tablelock.h), sendmsg (Python's
 * Peers.keep): all on policy/request.policy already.
 */

#define OPEN_IN 8                   /* abi.OPEN_IN */
#define KIND_DIR 2                  /* handles.KIND_DIR */
#define OPEN_KILL_SUIDGID 1         /* abi.FUSE_OPEN_KILL_SUIDGID */
#define SLOT_BITS 24                /* filetable.SLOT_BITS */
#define GEN_MASK ((UINT64_C(1) << 40) - 1)

/* fuse_out_header + fuse_open_out */
struct open_reply {
    struct out_header o;
    uint64_t fh;
    uint32_t open_flags, padding;
};

_Static_assert(sizeof(struct open_reply) == OUT_HEADER + OPEN_OUT, "fuse_open_out");

static PyObject *s_op_serial, *s_op_keep;

/* the per-call references OPEN needs: NULL-able, dropped by open_drop */
struct open_refs {
    PyObject *handles, *files, *peers, *per_node;
    struct words hdr;
};

static void open_drop(struct open_refs *r)
{
    drop_words(&r->hdr);
    Py_XDECREF(r->per_node);
    Py_XDECREF(r->peers);
    Py_XDECREF(r->files);
    Py_XDECREF(r->handles);
    PyErr_Clear();
}

/* the checks before anything is done: 0 (r filled, *serial the peers'
 * serial, 0 without peers) or -1 (Python's) */
static int open_ready(FastOps *self, const struct state *st, struct open_refs *r, Py_ssize_t *serial)
{
    const struct release_conf *c = &self->rl;
    *serial = 0;
    if (st->handles == NULL || (r->handles = PyObject_GetAttr(self->session, s_handles)) == NULL
            || (r->files = PyObject_GetAttr(r->handles, s_rl_files)) == NULL || r->files != c->files
            || (r->peers = PyObject_GetAttr(r->handles, s_peers)) == NULL
            || (r->peers != Py_None && (attr_ssize(r->peers, s_op_serial, serial) < 0 || *serial < 0
                                        || *serial > UINT32_MAX))
            || (r->per_node = PyObject_GetAttr(r->handles, s_rl_per_node)) == NULL
            || !PyDict_CheckExact(r->per_node)
            || hold_words(c->hdr, &r->hdr) < 0 || r->hdr.b.len / 8 <= c->h_last || ((uintptr_t)r->hdr.b.buf & 7))
        return -1;
    return 0;
}

/* handles.reopen: the O_PATH fd's magic link opened with flags; -errno */
static int reopen_fd(int path_fd, uint32_t flags)
{
    char name[16];
    snprintf(name, sizeof name, "%d", path_fd);
    int fd, err = 0;
    Py_BEGIN_ALLOW_THREADS
    do
        fd = openat(AT_FDCWD, name, (int)(flags & ~(uint32_t)O_NOFOLLOW) | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return fd < 0 ? -err : fd;
}

/* files.open_regular's check of the fstat: 0 for a regular file, else its errno */
static int regular_errno(mode_t mode)
{
    return S_ISREG(mode) ? 0 : S_ISDIR(mode) ? EISDIR : S_ISLNK(mode) ? ELOOP : EACCES;
}

static int fstat_fd(int fd, struct stat *s)
{
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fstat(fd, s);
    Py_END_ALLOW_THREADS
    return rc;
}

/* FileTable.alloc under its locks: the fh, 0 if it cannot be done here
 * (nothing written then) */
static uint64_t open_alloc(FastOps *self, const struct state *st, const struct open_refs *r, uint64_t nodeid,
                           uint64_t kind, uint32_t flags, uint64_t owner)
{
    const struct release_conf *c = &self->rl;
    const struct open_conf *o = &self->op;
    uint64_t fh = 0;
    if (files_take(c, &r->hdr)) {
        const struct words *hw = &r->hdr, *fw = &st->files;
        uint64_t s = 0, free_s = word_at(hw, c->h_free), high = word_at(hw, o->h_high);
        if (free_s != 0)
            s = free_s <= c->capacity ? free_s : 0;     /* out of range: Python's (repairs nothing, but raises) */
        else if (high >= 1 && high <= c->capacity)
            s = high;
        if (s != 0 && (Py_ssize_t)(s + 1) * c->words <= fw->b.len / 8) {
            Py_ssize_t base = (Py_ssize_t)s * c->words;
            set_word(hw, c->h_dirty, 1);
            if (free_s != 0)
                set_word(hw, c->h_free, word_at(fw, base + c->f_next));
            else
                set_word(hw, o->h_high, high + 1);
            set_word(fw, base + o->f_node, nodeid);
            set_word(fw, base + c->f_kind, kind);
            set_word(fw, base + o->f_flags, flags);
            set_word(fw, base + c->f_owner, owner);
            set_word(fw, base + o->f_lock_owner, 0);
            set_word(fw, base + c->f_kept, 0);
            uint64_t gen = (word_at(hw, o->h_gen) + 1) & GEN_MASK;
            if (gen == 0)
                gen = 1;
            set_word(hw, o->h_gen, gen);
            set_word(fw, base + c->f_gen, gen);
            set_word(hw, c->h_live, word_at(hw, c->h_live) + 1);
            set_word(hw, c->h_dirty, 0);
            fh = gen << SLOT_BITS | s;
        }
        files_give(c);
    }
    return fh;
}

/* fastpath.add_handle (HandleTable.add, which owns fd): the fh or -errno */
static long long open_add_python(FastOps *self, int fd, uint64_t nodeid, int kind, uint32_t flags)
{
    PyObject *got = PyObject_CallFunction(self->op.add, "OiKiI", self->session, fd, (unsigned long long)nodeid,
                                          kind, flags);
    long long fh = got != NULL && PyLong_CheckExact(got) ? PyLong_AsLongLong(got) : -EIO;
    Py_XDECREF(got);
    PyErr_Clear();
    return fh;
}

/* Peers.keep's one sendmsg, made here when the state knows the keeper's
 * socket: KEEP (the slot id, little-endian u64) with fd by SCM_RIGHTS,
 * never waiting (MSG_DONTWAIT; the socket is non-blocking too). 1 sent;
 * 0 not (a full queue, any error): Peers.keep then sends, waits for room
 * and logs as it does for Python's own handoffs */
static int keep_send(const struct state *st, uint64_t ident, int fd)
{
    if (st->ready <= 0 || st->keeper_fd < 0)
        return 0;
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = {&ident, sizeof ident};      /* little-endian: the only hosts (_fastops.c) */
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = sizeof u.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    ssize_t n;
    do
        n = sendmsg(st->keeper_fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof ident;
}

/* Peers.keep and HandleTable._keep for a slot allocated here: 0, or -1
 * (an exception from Python: FuseSession._handle's EIO) */
static int open_keep(FastOps *self, const struct state *st, const struct open_refs *r, uint64_t fh, int fd,
                     uint64_t nodeid, int kind, uint32_t flags)
{
    PyObject *key = PyLong_FromUnsignedLongLong(fh), *nkey = NULL, *handle = NULL, *count = NULL;
    int rc = -1;
    if (key == NULL)
        goto out;
    if (r->peers != Py_None && !keep_send(st, fh, fd)) {
        PyObject *fdobj = PyLong_FromLong(fd);
        PyObject *got = fdobj == NULL ? NULL : PyObject_CallMethodObjArgs(r->peers, s_op_keep, key, fdobj, NULL);
        Py_XDECREF(fdobj);
        if (got == NULL)
            goto out;
        Py_DECREF(got);
    }
    handle = PyObject_CallFunction(self->op.handle_type, "OiKiI", key, fd, (unsigned long long)nodeid, kind, flags);
    if (handle == NULL || PyDict_SetItem(st->handles, key, handle) < 0
            || (nkey = PyLong_FromUnsignedLongLong(nodeid)) == NULL)
        goto out;
    PyObject *had = PyDict_GetItemWithError(r->per_node, nkey);     /* borrowed */
    if (had == NULL && PyErr_Occurred())
        goto out;
    if (had == NULL)
        count = PyLong_FromLong(1);
    else {
        PyObject *one = PyLong_FromLong(1);
        count = one == NULL ? NULL : PyNumber_Add(had, one);
        Py_XDECREF(one);
    }
    if (count == NULL || PyDict_SetItem(r->per_node, nkey, count) < 0)
        goto out;
    rc = 0;
out:
    Py_XDECREF(count);
    Py_XDECREF(nkey);
    Py_XDECREF(handle);
    Py_XDECREF(key);
    PyErr_Clear();
    return rc;
}

/* HandleTable.add of an open fd in C, for CREATE (_create.h) when OPEN is
 * C's: the fh; 0 if C's allocation declines (nothing done: the caller
 * calls Python's add, which owns fd then); -EIO if Python failed after the
 * allocation (as an exception in HandleTable._keep: the slot stays) */
static long long add_fd_in_c(FastOps *self, const struct state *st, int fd, uint64_t nodeid, int kind,
                             uint32_t flags)
{
    Py_ssize_t serial;
    struct open_refs r = {0};
    if (self->op.add == NULL || open_ready(self, st, &r, &serial) < 0) {
        open_drop(&r);
        return 0;
    }
    uint64_t owner = serial ? (uint64_t)serial << 32 | (uint64_t)fd : 0;
    uint64_t fh = open_alloc(self, st, &r, nodeid, (uint64_t)kind, flags, owner);
    int kept = fh == 0 ? 0 : open_keep(self, st, &r, fh, fd, nodeid, kind, flags);
    open_drop(&r);
    return kept < 0 ? -EIO : (long long)fh;
}

/* OPEN and OPENDIR; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_open(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                            int *error)
{
    const struct open_conf *o = &self->op;
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER, serial;
    struct { uint32_t flags, open_flags; } a;      /* fuse_open_in */
    int dir = h->opcode == OP_OPENDIR;
    if (h->total_extlen || nargs < OPEN_IN || nargs > MAX_ARGS || iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0)
        return NOT_HANDLED;
    uint32_t host = (uint32_t)(O_RDONLY | O_DIRECTORY | O_NONBLOCK);
    if (!dir) {
        if ((a.flags & O_ACCMODE) == O_ACCMODE)
            return NOT_HANDLED;
        host = a.flags & o->kept;
        if ((host & O_TRUNC) && ((a.open_flags & OPEN_KILL_SUIDGID) || h->uid != 0))
            return NOT_HANDLED;
    }
    int path_fd = cached_fd(self, st, h->nodeid);
    PyErr_Clear();
    if (path_fd < 0 || !handles_have_room(self))
        return NOT_HANDLED;
    struct open_refs r = {0};
    struct stat s;
    if (open_ready(self, st, &r, &serial) < 0 || (!dir && fstat_fd(path_fd, &s) < 0)) {
        open_drop(&r);
        return NOT_HANDLED;
    }
    /* answered from here on: the reply fits (serve_req checked the room) */
    if (q->take != NULL)
        take_chain(q->take);
    int err = dir ? 0 : regular_errno(s.st_mode), fd = -1;
    uint32_t opened = host;
    if (!err) {
        if (!dir && o->writeback) {
            opened &= ~(uint32_t)O_APPEND;
            if ((opened & O_ACCMODE) == O_WRONLY)
                opened = (opened & ~(uint32_t)O_ACCMODE) | O_RDWR;
        }
        fd = reopen_fd(path_fd, opened);
        if (fd < 0 && (fd == -EACCES || fd == -EPERM) && (opened & O_ACCMODE) != (host & O_ACCMODE)) {
            /* files.open_file: opened write-only after all, open_regular again */
            opened = host & ~(uint32_t)O_APPEND;
            fd = fstat_fd(path_fd, &s) < 0 ? -errno : (err = regular_errno(s.st_mode)) ? -1 : reopen_fd(path_fd, opened);
        }
        if (fd < 0 && !err)
            err = -fd;
    }
    if (err) {
        open_drop(&r);
        return error_reply(q, h->unique, err, error);
    }
    int kind = dir ? KIND_DIR : KIND_FILE;
    uint64_t owner = serial ? (uint64_t)serial << 32 | (uint64_t)fd : 0;
    uint64_t fh = open_alloc(self, st, &r, h->nodeid, (uint64_t)kind, opened, owner);
    if (fh == 0) {
        open_drop(&r);
        long long got = open_add_python(self, fd, h->nodeid, kind, opened);
        if (got <= 0)
            return error_reply(q, h->unique, got < 0 && got > -4096 ? (int)-got : EIO, error);
        fh = (uint64_t)got;
    } else {
        int kept = open_keep(self, st, &r, fh, fd, h->nodeid, kind, opened);
        open_drop(&r);
        if (kept < 0)
            return error_reply(q, h->unique, EIO, error);
    }
    struct open_reply out = {{sizeof out, 0, h->unique}, fh, dir ? o->fopen_dir : o->fopen, 0};
    return iov_copy(q->w, q->nw, 0, &out, sizeof out, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof out;
}

/* enable_open(add, handle_type, (gen, high, node, flags, lock_owner), kept, writeback, fopen, fopen_dir,
 * open_words, opendir_words): see fastops_methods */
static PyObject *fastops_enable_open(FastOps *self, PyObject *args)
{
    PyObject *add, *handle_type, *words, *dwords;
    struct open_conf c = {0};
    int writeback;
    if (!PyArg_ParseTuple(args, "OO(nnnnn)IpIIOO", &add, &handle_type, &c.h_gen, &c.h_high, &c.f_node, &c.f_flags,
                          &c.f_lock_owner, &c.kept, &writeback, &c.fopen, &c.fopen_dir, &words, &dwords))
        return NULL;
    if (self->rl.files == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_open: RELEASE is not C's (enable_release first)");
        return NULL;
    }
    if (!PyCallable_Check(add) || !PyCallable_Check(handle_type)) {
        PyErr_SetString(PyExc_TypeError, "FastOps.enable_open: add and handle_type must be callable");
        return NULL;
    }
    if (c.h_gen < 0 || c.h_high < 0 || c.f_node < 0 || c.f_node >= self->rl.words || c.f_flags < 0
            || c.f_flags >= self->rl.words || c.f_lock_owner < 0 || c.f_lock_owner >= self->rl.words) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_open: a bad layout");
        return NULL;
    }
    struct op_words w = {-1, -1, -1, -1}, dw = {-1, -1, -1, -1};
    if (meter_op_words(self, words, "enable_open", &w) < 0 || meter_op_words(self, dwords, "enable_open", &dw) < 0)
        return NULL;
    /* the header words alloc writes must lie where RELEASE's may */
    if (c.h_gen > self->rl.h_last)
        self->rl.h_last = c.h_gen;
    if (c.h_high > self->rl.h_last)
        self->rl.h_last = c.h_high;
    c.writeback = writeback;
    Py_INCREF(add);
    Py_INCREF(handle_type);
    c.add = add;
    c.handle_type = handle_type;
    Py_XDECREF(self->op.add);
    Py_XDECREF(self->op.handle_type);
    self->op = c;
    self->m.open = w;
    self->m.opendir = dw;
    Py_RETURN_NONE;
}
