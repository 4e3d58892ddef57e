/*
 * READDIRPLUS in C (docs/compiled.md, "READDIRPLUS in C"), included by
 * _fastops.c after _lookup.h and _create.h (one translation unit: it uses
 * their request, state, reply and table code: found_entry, drop_tlock).
 * The reference is dirs.do_readdirplus with _read_args, _fill, DirStream
 * .peek/.advance and _pack_plus, and FuseSession.entry.
 *
 * Served here, under the shared checks of serve_req, when:
 *   - FastOps.enable_readdirplus was called (fastpath.make: LOOKUP is C's,
 *     so the entry replies are the stock Timeouts', no --announce-submounts,
 *     the stock inode table and cache; the READDIRPLUS row is
 *     dirs.do_readdirplus; the stock HandleTable);
 *   - no request extensions; the args hold the whole fuse_read_in; the
 *     offset (the cookie) is at most OFFSET_MAX (Python: EINVAL);
 *   - the fh is a directory handle this worker holds (HandleTable.get's fast
 *     case: its OpenHandle of kind dir whose generation the shared FileTable
 *     holds; else Python copies it from another worker or answers EBADF);
 *   - its dir_stream is None (a DirStream is made and stored, as _stream
 *     does) or a DirStream whose buf is bytes and pos, cookie ints.
 * Then exactly _fill with _pack_plus, on the handle's own DirStream (its
 * buf, pos, cookie and reseek are read once and written back once, on
 * every way out, so that Python and C requests on one handle interleave):
 *   - with peers shared, reseek is set first (_read_args);
 *   - limit = min(size, MAX_READDIR_SIZE, writable part - 16);
 *   - peek: a cookie other than the stream's: the buffer dropped, lseek to
 *     it (an error leaves the cookie -1); the buffer used up: lseek to the
 *     stream's cookie when reseek, getdents64 of 32 KiB into a new bytes
 *     object that becomes the buffer (an error: cookie -1); an empty read
 *     ends the listing; a malformed record: buffer dropped, cookie -1, EIO;
 *     lseek and getdents64 with the GIL released, as os.lseek and ctypes do;
 *   - an error before any record is the reply's errno; after some records
 *     the reply is those records;
 *   - a name that is empty, longer than 1024 bytes or holds '/' is passed
 *     over; a record that does not fit (abi.direntplus_size) ends the reply
 *     with the stream at it;
 *   - "." and "..": nodeid 0, the attr's ino and mode (DT << 12) only;
 *   - any other name: found_entry's lookup (_lookup.h: fstatat, the +1 of
 *     an inode this worker holds, or the open + insertion of its first
 *     lookup here, with adopt's inputs and the fd-cache bound read once per
 *     reply), taken for a run of entries at a time (stage_entry, run_flush:
 *     the system calls unlocked, then the counts under one round of the
 *     table lock; an entry that fails there takes found_entry's own way);
 *     ENOENT from fstatat: passed over (it vanished); anything C declines
 *     (another errno, a busy or DIRTY table, a full table, the fd-cache
 *     bound...): the thread lock let go, then Python's own step,
 *     dirs.plus_entry (FuseSession.entry: the entry, False for a vanished
 *     name, None for a nodeid-0 record, an int errno for an unexpected
 *     exception: the reply is then that error, as FuseSession._handle's
 *     EIO), and the rest of the reply in C again;
 *   - a next cookie below 0 (struct.pack of Python's record refuses it:
 *     EIO after the entry's lookup) is the EIO reply.
 * The request is answered from the first lookup on (never NOT_HANDLED
 * after a count is taken). As for LOOKUP the chain is taken after the
 * reply: a worker killed in between leaves it to its successor, which
 * lists the same entries again and takes their counts again (the first
 * ones stay until DESTROY).
 * System calls: lseek, getdents64, newfstatat, openat, fstat, close, fcntl
 * (the table lock), name_to_handle_at: all on policy/request.policy for
 * Python's same calls. *
 * Plain READDIR (docs/compiled.md, "READDIR in C"), when
 * FastOps.enable_readdir was called (fastpath.make: the READDIR row is
 * dirs.do_readdir, the stock HandleTable; LOOKUP need not be C's), under
 * the same request, handle and stream conditions: exactly dirs._fill_names
 * with the same prologue and reply (readdir_begin, readdir_end) and the
 * same stream_peek: fuse_dirent records {d_ino, next cookie, name length,
 * d_type} + the name, zero-padded to 8; names not valid passed over; the
 * first record that does not fit ends the reply with the stream at it; an
 * error before any record is the reply, after some the records; no
 * lookups, the inode table untouched. A next cookie below 0 is Python's
 * EIO (abi.DIRENT.pack refuses it) with the stream where _fill_names's
 * last peek left it (fast_readdir's mark). System calls: lseek and
 * getdents64 only.
 */

#define KIND_DIR 2                  /* handles.KIND_DIR */
#define MAX_READDIR_SIZE (1 << 20)  /* dirs.MAX_READDIR_SIZE */
#define GETDENTS_BUF_SIZE (32 * 1024)   /* dirs.GETDENTS_BUF_SIZE */
#define DIRENT_HEAD 19              /* linux_dirent64 before d_name */
#define DIRENT 24                   /* abi.DIRENT */
#define DIRENTPLUS 152              /* abi.DIRENTPLUS */
#define DIRENT_NAME_MAX 1024        /* abi.FUSE_NAME_MAX */

static PyObject *s_dir_stream, *s_buf, *s_pos, *s_cookie, *s_reseek;

/* fuse_dirent, as abi.DIRENT */
struct fuse_dirent {
    uint64_t ino, off;
    uint32_t namelen, type;
};

_Static_assert(sizeof(struct fuse_dirent) == DIRENT, "fuse_dirent");
_Static_assert(sizeof(struct fuse_dirent) + ENTRY_OUT == DIRENTPLUS, "fuse_direntplus");

/* the handle's DirStream, as C works on it */
struct dstream {
    PyObject *obj;          /* the DirStream */
    PyObject *buf;          /* its buf: a bytes object (new reference) */
    Py_ssize_t pos;
    long long cookie;
    int reseek;
};

/* the directory handle fh this worker holds (HandleTable.get's fast case
 * for KIND_DIR): borrowed, and *fd; NULL if it holds none */
static PyObject *dir_handle(const struct state *st, uint64_t fh, int *fd)
{
    if (st->handles == NULL)
        return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(fh);
    if (key == NULL)
        return NULL;
    PyObject *handle = PyDict_GetItemWithError(st->handles, key);     /* borrowed */
    Py_DECREF(key);
    Py_ssize_t kind, f;
    uint64_t gen;
    if (handle != NULL && attr_ssize(handle, s_kind, &kind) == 0 && kind == KIND_DIR
            && attr_ssize(handle, s_fd, &f) == 0 && f >= 0 && f <= INT32_MAX
            && load_word(&st->files, (Py_ssize_t)((fh & 0xFFFFFF) << 3), &gen) == 0 && gen == fh >> 24) {
        *fd = (int)f;
        return handle;
    }
    PyErr_Clear();
    return NULL;
}

/* the handle's DirStream read into ds (one made and stored first if it has
 * none, as dirs._stream): 0, or -1 (nothing stored) if it is not shaped
 * like one */
static int stream_read(FastOps *self, PyObject *handle, struct dstream *ds)
{
    PyObject *obj = PyObject_GetAttr(handle, s_dir_stream), *v = NULL;
    memset(ds, 0, sizeof *ds);
    if (obj == Py_None) {
        Py_DECREF(obj);
        obj = PyObject_CallNoArgs(self->rd.stream_type);
        if (obj == NULL || PyObject_SetAttr(handle, s_dir_stream, obj) < 0)
            goto fail;
    }
    if (obj == NULL || Py_TYPE(obj) != (PyTypeObject *)self->rd.stream_type)
        goto fail;
    ds->obj = obj;
    if ((ds->buf = PyObject_GetAttr(obj, s_buf)) == NULL || !PyBytes_CheckExact(ds->buf))
        goto fail;
    if ((v = PyObject_GetAttr(obj, s_pos)) == NULL || !PyLong_CheckExact(v))
        goto fail;
    ds->pos = PyLong_AsSsize_t(v);
    Py_CLEAR(v);
    if ((ds->pos == -1 && PyErr_Occurred()) || ds->pos < 0)
        goto fail;
    if ((v = PyObject_GetAttr(obj, s_cookie)) == NULL || !PyLong_CheckExact(v))
        goto fail;
    ds->cookie = PyLong_AsLongLong(v);
    Py_CLEAR(v);
    if (ds->cookie == -1 && PyErr_Occurred())
        goto fail;
    if ((v = PyObject_GetAttr(obj, s_reseek)) == NULL || (ds->reseek = PyObject_IsTrue(v)) < 0)
        goto fail;
    Py_CLEAR(v);
    return 0;
fail:
    Py_XDECREF(v);
    Py_CLEAR(ds->buf);
    Py_XDECREF(obj);
    ds->obj = NULL;
    PyErr_Clear();
    return -1;
}

/* ds written back into its DirStream (buf, pos, cookie, reseek) and
 * dropped; -1 if a store failed (then the stream is reset as _corrupt
 * does, so that Python's next peek seeks) */
static int stream_write(struct dstream *ds)
{
    PyObject *pos = PyLong_FromSsize_t(ds->pos), *cookie = PyLong_FromLongLong(ds->cookie);
    int rc = pos == NULL || cookie == NULL || PyObject_SetAttr(ds->obj, s_buf, ds->buf) < 0
             || PyObject_SetAttr(ds->obj, s_pos, pos) < 0 || PyObject_SetAttr(ds->obj, s_cookie, cookie) < 0
             || PyObject_SetAttr(ds->obj, s_reseek, ds->reseek ? Py_True : Py_False) < 0 ? -1 : 0;
    Py_XDECREF(pos);
    Py_XDECREF(cookie);
    if (rc < 0) {
        PyErr_Clear();
        PyObject *minus = PyLong_FromLong(-1), *empty = PyBytes_FromStringAndSize(NULL, 0);
        if (minus != NULL && empty != NULL) {
            PyObject_SetAttr(ds->obj, s_cookie, minus);
            PyObject_SetAttr(ds->obj, s_buf, empty);
        }
        Py_XDECREF(minus);
        Py_XDECREF(empty);
        PyErr_Clear();
    }
    Py_CLEAR(ds->buf);
    Py_CLEAR(ds->obj);
    return rc;
}

/* the buffer dropped (b"", position 0) */
static int stream_empty(struct dstream *ds)
{
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty == NULL)
        return -1;
    Py_SETREF(ds->buf, empty);
    ds->pos = 0;
    return 0;
}

/* one entry of the stream (DirStream.peek) */
struct dentry {
    uint64_t ino;
    long long next;
    unsigned dtype;
    const char *name;       /* NUL-terminated, in ds->buf */
    Py_ssize_t namelen, reclen;
};

/* DirStream.peek(fd, cookie): 1 and *e, 0 at the end of the directory,
 * -1 and *err (the stream as peek leaves it on that error) */
static int stream_peek(struct dstream *ds, int fd, long long cookie, struct dentry *e, int *err)
{
    off_t rc;
    if (cookie != ds->cookie) {
        if (stream_empty(ds) < 0) {
            *err = ENOMEM;
            return -1;
        }
        ds->cookie = -1;
        Py_BEGIN_ALLOW_THREADS
        rc = lseek(fd, (off_t)cookie, SEEK_SET);
        *err = errno;
        Py_END_ALLOW_THREADS
        if (rc < 0)
            return -1;
        ds->cookie = cookie;
    }
    if (ds->pos >= PyBytes_GET_SIZE(ds->buf)) {
        if (stream_empty(ds) < 0) {
            *err = ENOMEM;
            return -1;
        }
        PyObject *fresh = PyBytes_FromStringAndSize(NULL, GETDENTS_BUF_SIZE);
        if (fresh == NULL) {
            PyErr_Clear();
            ds->cookie = -1;
            *err = ENOMEM;
            return -1;
        }
        long n = 0;
        char *p = PyBytes_AS_STRING(fresh);
        Py_BEGIN_ALLOW_THREADS
        rc = ds->reseek ? lseek(fd, (off_t)ds->cookie, SEEK_SET) : 0;
        if (rc >= 0)
            n = syscall(SYS_getdents64, fd, p, GETDENTS_BUF_SIZE);
        *err = errno;
        Py_END_ALLOW_THREADS
        if (rc < 0 || n < 0) {
            Py_DECREF(fresh);
            ds->cookie = -1;
            return -1;
        }
        if (n == 0) {
            Py_DECREF(fresh);
            return 0;
        }
        if (_PyBytes_Resize(&fresh, (Py_ssize_t)n) < 0) {
            PyErr_Clear();
            ds->cookie = -1;
            *err = ENOMEM;
            return -1;
        }
        Py_SETREF(ds->buf, fresh);
    }
    const char *buf = PyBytes_AS_STRING(ds->buf);
    Py_ssize_t len = PyBytes_GET_SIZE(ds->buf), pos = ds->pos;
    uint16_t reclen = 0;
    const char *nul = NULL;
    if (pos + DIRENT_HEAD <= len) {
        memcpy(&reclen, buf + pos + 16, 2);
        if (reclen > DIRENT_HEAD && pos + reclen <= len)
            nul = memchr(buf + pos + DIRENT_HEAD, 0, (size_t)reclen - DIRENT_HEAD);
    }
    if (nul == NULL) {      /* _corrupt */
        stream_empty(ds);
        PyErr_Clear();
        ds->cookie = -1;
        *err = EIO;
        return -1;
    }
    int64_t next;
    memcpy(&e->ino, buf + pos, 8);
    memcpy(&next, buf + pos + 8, 8);
    e->next = next;
    e->dtype = (unsigned char)buf[pos + 18];
    e->name = buf + pos + DIRENT_HEAD;
    e->namelen = nul - e->name;
    e->reclen = reclen;
    return 1;
}

/* dirs.plus_entry(session, dir_fd, name) for an entry C declined, with the
 * table's thread lock let go: 1 with the 128 entry bytes at out, 0 for a
 * nodeid-0 record, 2 for a vanished name, -1 and *err for an error reply */
static int python_entry(FastOps *self, struct state *st, int fd, const struct dentry *e, char *out, int *err)
{
    drop_tlock(st);
    PyObject *r = PyObject_CallFunction(self->rd.entry, "Oiy#", self->session, fd, e->name, e->namelen);
    int rc;
    if (r == NULL) {
        rc = -1;
        *err = EIO;
    } else if (r == Py_None) {
        rc = 0;
    } else if (r == Py_False) {
        rc = 2;
    } else if (PyBytes_CheckExact(r) && PyBytes_GET_SIZE(r) == ENTRY_OUT) {
        memcpy(out, PyBytes_AS_STRING(r), ENTRY_OUT);
        rc = 1;
    } else if (PyLong_CheckExact(r)) {
        long v = PyLong_AsLong(r);
        rc = -1;
        *err = v > 0 && v < 4096 ? (int)v : EIO;
    } else {
        rc = -1;
        *err = EIO;
    }
    Py_XDECREF(r);
    PyErr_Clear();
    return rc;
}

/* one READDIR or READDIRPLUS request as both start and end it (_read_args,
 * _stream, the reply) */
struct rd_call {
    struct read_in a;
    int fd;
    PyObject *handle;       /* the directory handle (a reference) */
    struct dstream ds;
    Py_ssize_t limit;       /* min(size, MAX_READDIR_SIZE, writable part - 16) */
    char *out;              /* limit + 1 zeroed bytes: the records */
};

/* _read_args and _stream for c: 0 (the request is answered from here on:
 * reseek may be set), or -1: NOT_HANDLED, nothing changed but a DirStream
 * made for a handle that had none (as Python's own _stream would) */
static int readdir_begin(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                         struct rd_call *c)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    if (h->total_extlen || nargs > MAX_ARGS || nargs < READ_IN
            || iov_copy(q->r, q->nr, IN_HEADER, &c->a, sizeof c->a, 0) < 0 || c->a.offset > (uint64_t)INT64_MAX)
        return -1;
    PyObject *handle = dir_handle(st, c->a.fh, &c->fd);
    if (handle == NULL)
        return -1;
    Py_INCREF(handle);      /* borrowed from the dict, which Python may change below */
    /* _read_args: with peers shared, the stream seeks before each refill */
    int shared = 0;
    PyObject *peers = PyObject_GetAttr(self->session, s_peers), *v = NULL;
    if (peers == NULL || (peers != Py_None && ((v = PyObject_GetAttr(peers, s_shared)) == NULL
                                               || (shared = PyObject_IsTrue(v)) < 0))) {
        Py_XDECREF(v);
        Py_XDECREF(peers);
        Py_DECREF(handle);
        PyErr_Clear();
        return -1;
    }
    Py_XDECREF(v);
    Py_DECREF(peers);
    if (stream_read(self, handle, &c->ds) < 0) {
        Py_DECREF(handle);
        return -1;
    }
    c->limit = c->a.size < MAX_READDIR_SIZE ? (Py_ssize_t)c->a.size : MAX_READDIR_SIZE;
    if (c->limit > q->wsize - OUT_HEADER)
        c->limit = q->wsize - OUT_HEADER;
    if (c->limit < 0)
        c->limit = 0;
    if ((c->out = PyMem_Calloc((size_t)c->limit + 1, 1)) == NULL) {
        stream_write(&c->ds);
        Py_DECREF(handle);
        PyErr_Clear();
        return -1;
    }
    c->handle = handle;
    if (shared)
        c->ds.reseek = 1;
    return 0;
}

/* the stream written back, and the reply: the used bytes of c->out, or the
 * error err; NOT_HANDLED or the bytes written, *error: the reply's errno */
static Py_ssize_t readdir_end(const struct req *q, const struct in_header *h, struct rd_call *c, Py_ssize_t used,
                              int err, int *error)
{
    stream_write(&c->ds);
    Py_CLEAR(c->handle);
    Py_ssize_t n;
    if (err) {
        n = error_reply(q, h->unique, err, error);
    } else {
        struct out_header o = {(uint32_t)(OUT_HEADER + used), 0, h->unique};
        n = iov_copy(q->w, q->nw, 0, &o, OUT_HEADER, 1) < 0 || iov_copy(q->w, q->nw, OUT_HEADER, c->out, used, 1) < 0
            ? NOT_HANDLED : OUT_HEADER + used;
    }
    PyMem_Free(c->out);
    c->out = NULL;
    return n;
}

/* a name _name_ok lets through: 1..1024 bytes without '/' */
static int name_ok(const struct dentry *e)
{
    return e->namelen > 0 && e->namelen <= DIRENT_NAME_MAX && memchr(e->name, '/', (size_t)e->namelen) == NULL;
}

/* READDIRPLUS's lookups a run at a time (docs/compiled.md, "One record
 * lock per run"): each entry's system calls first, without the table's
 * lock (fstatat; for an inode this worker does not hold, openat +
 * fstat as cold_lookup's), then the counts of the whole run under one
 * round of the lock, in the entries' order (ref_held_locked or
 * adopt_locked, as found_entry would one by one). Holding the lock across
 * the system calls would make every other worker's LOOKUPs and the hiprio
 * FORGETs wait for the disk; one round per entry was half of a warm
 * entry's CPU. An entry that fails under the lock ends the run there:
 * the stream, the reply and the table go back to that entry, which then
 * takes found_entry's way (and Python's after it), as before */
#define RUN_MAX 32

struct staged {
    struct entry_reply r;   /* attr and timeouts; nodeid and generation from the flush */
    struct stat s;          /* dev and ino (and adopt's stat) */
    int fd;                 /* a cold entry's new O_PATH fd, -1: held (none opened) */
    Py_ssize_t rec;         /* the record's offset in the reply */
    Py_ssize_t pos;         /* the stream at the entry */
    long long cookie;
};

struct run {
    int n, cold;            /* entries staged, and how many of them opened an fd */
    int last_cold;          /* the last entry stat'ed was new to this worker (for the reply) */
    PyObject *buf;          /* the stream's buffer they are in (a reference) */
    struct staged e[RUN_MAX];
};

/* one entry's system calls for the run (a valid name other than "." and
 * ".."): 1 staged (x's record to be counted), 2 vanished (ENOENT: passed
 * over), 0 not staged (nothing taken, no fd left open: found_entry's way
 * then). An entry after one that was new to this worker (a listing after
 * the guest dropped its caches: most are) is opened straight away, no
 * fstatat first: openat + fstat, two system calls instead of three; if
 * this worker holds it after all, its new fd is closed at the flush, as
 * adopt closes one (and the next entry is stat'ed first again) */
static int stage_entry(FastOps *self, struct state *st, int parent, const struct dentry *e, struct run *run,
                       struct adopt_once *once, struct staged *x)
{
    int guess = run->last_cold, fd = -1, err;
    if (guess) {
        if (!once_has_room(self, st, once, run->cold))
            return 0;
        fd = open_entry(parent, e->name, &x->s, &err);
        if (fd < 0)
            return err == ENOENT ? 2 : 0;
    } else {
        err = stat_name(parent, e->name, &x->s);
        if (err != 0)
            return err == ENOENT ? 2 : 0;
    }
    memset(&x->r, 0, sizeof x->r);
    if (fill_attr(&x->r.attr, &x->s) < 0 || table_ready(self, st) < 0) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    int held = held_hint(self, st, &x->s);
    run->last_cold = !held;
    if (!guess && !held) {
        if (!once_has_room(self, st, once, run->cold) || (fd = open_entry(parent, e->name, &x->s, &err)) < 0)
            return 0;
        if (fill_attr(&x->r.attr, &x->s) < 0) {     /* the reply's attr: the new fd's, as Python's */
            close(fd);
            return 0;
        }
    }
    x->fd = fd;
    x->r.entry_valid = x->r.attr_valid = self->attr_sec;
    x->r.entry_valid_nsec = x->r.attr_valid_nsec = self->attr_nsec;
    return 1;
}

/* the run's counts under one round of the table lock, each entry's
 * fuse_entry_out written into its record: the number of entries done, in
 * order (fewer than run->n when one failed or the lock was not had); every
 * fd not kept is closed, after the lock. The run is empty after */
static int run_flush(FastOps *self, struct state *st, struct run *run, struct adopt_once *once, char *out)
{
    int k = 0;
    if (st->tlock != NULL && table_lock(self, st) == 0) {
        for (; k < run->n; k++) {
            struct staged *x = &run->e[k];
            int rc;
            if (x->fd < 0) {
                rc = ref_held_locked(self, st, (uint64_t)x->s.st_dev, (uint64_t)x->s.st_ino, &x->r.nodeid,
                                     &x->r.generation);
            } else {
                struct adopting a = {0};
                int kept = 0;
                rc = once_inputs(once, x->fd, (uint64_t)x->s.st_dev, &a) == 0
                     ? adopt_locked(self, st, x->fd, &x->s, &a, &x->r.nodeid, &x->r.generation, &kept) : -1;
                if (rc == 0 && kept)
                    x->fd = -1;     /* the cache's now */
            }
            if (rc != 0)
                break;
            memcpy(out + x->rec, &x->r.nodeid, ENTRY_OUT);
        }
        table_unlock(self, st);
    }
    for (int i = 0; i < run->n; i++)
        if (run->e[i].fd >= 0)
            close(run->e[i].fd);
    return k;
}

/* the run flushed; when it stopped short, the stream, the reply's length
 * and the loop's cookie go back to the first entry not done: 1 (the loop
 * goes on from there, that entry found_entry's way: *direct), else 0 */
static int run_settle(FastOps *self, struct state *st, struct run *run, struct adopt_once *once, struct rd_call *c,
                      Py_ssize_t *used, long long *cookie, int *direct)
{
    int n = run->n, k = run_flush(self, st, run, once, c->out), rewound = 0;
    if (k < n) {
        const struct staged *x = &run->e[k];
        if (c->ds.buf != run->buf) {    /* a malformed record dropped it: no getdents64 since */
            Py_INCREF(run->buf);
            Py_SETREF(c->ds.buf, run->buf);
        }
        c->ds.pos = x->pos;
        c->ds.cookie = x->cookie;
        *cookie = x->cookie;
        *used = x->rec;
        *direct = 1;
        rewound = 1;
    }
    run->n = run->cold = 0;
    Py_CLEAR(run->buf);
    return rewound;
}

/* READDIRPLUS; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_readdirplus(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                                   int *error)
{
    struct rd_call c;
    if (readdir_begin(self, st, q, h, &c) < 0)
        return NOT_HANDLED;
    /* from here on answered (the stream changes) */
    int fd = c.fd;
    struct adopt_once once = {0};
    struct run run;
    run.n = run.cold = run.last_cold = 0;
    run.buf = NULL;
    int direct = 0;         /* the next entry found_entry's way (a run stopped before it) */
    Py_ssize_t used = 0;
    long long cookie = (long long)c.a.offset;
    int err = 0;
    for (;;) {
        /* the run is counted before a refill: its entries' stream positions
         * are in this buffer, and a getdents64 moves the directory's offset */
        if (run.n && c.ds.pos >= PyBytes_GET_SIZE(c.ds.buf) && run_settle(self, st, &run, &once, &c, &used, &cookie, &direct))
            continue;
        struct dentry e;
        int peek_err = 0;   /* set by stream_peek even when a call succeeds: read only on -1 */
        int got = stream_peek(&c.ds, fd, cookie, &e, &peek_err);
        if (got <= 0) {
            if (run.n && run_settle(self, st, &run, &once, &c, &used, &cookie, &direct))
                continue;
            if (got < 0 && !used)
                err = peek_err ? peek_err : EIO;
            break;
        }
        if (name_ok(&e)) {
            Py_ssize_t size = (DIRENTPLUS + e.namelen + 7) & ~(Py_ssize_t)7;
            if (used + size > c.limit) {
                if (run.n && run_settle(self, st, &run, &once, &c, &used, &cookie, &direct))
                    continue;
                break;
            }
            char *rec = c.out + used;
            struct fuse_dirent d = {e.ino, (uint64_t)e.next, (uint32_t)e.namelen, e.dtype};
            int dots = (e.namelen == 1 && e.name[0] == '.') || (e.namelen == 2 && e.name[0] == '.' && e.name[1] == '.');
            if (!dots && !direct && e.next >= 0) {
                if (run.n == RUN_MAX && run_settle(self, st, &run, &once, &c, &used, &cookie, &direct))
                    continue;
                struct staged *x = &run.e[run.n];
                int sg = stage_entry(self, st, fd, &e, &run, &once, x);
                if (sg == 1) {
                    x->rec = used;
                    x->pos = c.ds.pos;
                    x->cookie = cookie;
                    if (run.n++ == 0) {
                        Py_INCREF(c.ds.buf);
                        run.buf = c.ds.buf;
                    }
                    run.cold += x->fd >= 0;
                    d.ino = x->r.attr.ino;
                    d.type = (x->r.attr.mode >> 12) & 017;
                    memcpy(rec + ENTRY_OUT, &d, sizeof d);
                    memcpy(rec + DIRENTPLUS, e.name, (size_t)e.namelen);
                    used += size;
                }
                if (sg != 0) {
                    c.ds.pos += e.reclen;   /* DirStream.advance */
                    c.ds.cookie = e.next;
                    cookie = e.next;
                    continue;
                }
            }
            /* found_entry's way and Python's: the run counted first, so
             * that counts are taken in the entries' order */
            if (run.n && run_settle(self, st, &run, &once, &c, &used, &cookie, &direct))
                continue;
            direct = 0;
            int kind = 0;           /* 0: nodeid 0, 1: an entry, 2: vanished */
            if (!dots) {
                struct entry_reply r;
                memset(&r, 0, sizeof r);
                int rc = found_entry(self, st, fd, e.name, &r, &once);
                if (rc == 0) {
                    memcpy(rec, &r.nodeid, ENTRY_OUT);
                    kind = 1;
                } else if (rc == ENOENT) {
                    kind = 2;
                } else {
                    kind = python_entry(self, st, fd, &e, rec, &err);
                    once.ready = 0;     /* Python ran: read adopt's inputs again */
                    if (kind < 0)
                        break;
                }
            }
            if (e.next < 0 && kind != 2) {  /* struct.pack refuses it: Python's EIO */
                err = EIO;
                break;
            }
            if (kind == 0) {
                struct fuse_attr at;
                memset(&at, 0, sizeof at);
                at.ino = e.ino;
                at.mode = e.dtype << 12;
                memset(rec, 0, ENTRY_OUT);
                memcpy(rec + 40, &at, sizeof at);
            } else if (kind == 1) {
                struct fuse_attr at;
                memcpy(&at, rec + 40, sizeof at);
                d.ino = at.ino;
                d.type = (at.mode >> 12) & 017;
            }
            if (kind != 2) {
                memcpy(rec + ENTRY_OUT, &d, sizeof d);
                memcpy(rec + DIRENTPLUS, e.name, (size_t)e.namelen);
                used += size;
            }
        }
        c.ds.pos += e.reclen;   /* DirStream.advance */
        c.ds.cookie = e.next;
        cookie = e.next;
    }
    return readdir_end(q, h, &c, used, err, error);
}

/* READDIR (dirs._fill_names): fuse_dirent records, no lookups, through the
 * same stream_peek as READDIRPLUS. _fill_names peeks once per getdents64
 * buffer and writes the stream's pos and cookie back only when a record
 * does not fit or the buffer is used up; the one way out where that
 * shows is a next cookie below 0 (abi.DIRENT.pack refuses it: Python's
 * whole request is FuseSession._handle's EIO, the stream where the peek
 * left it), so that is where the stream goes back to (mark). NOT_HANDLED
 * or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_readdir(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                               int *error)
{
    struct rd_call c;
    if (readdir_begin(self, st, q, h, &c) < 0)
        return NOT_HANDLED;
    Py_ssize_t used = 0, mark_pos = 0;
    long long cookie = (long long)c.a.offset, mark_cookie = 0;
    int err = 0, peeked = 0;
    for (;;) {
        struct dentry e;
        int peek_err = 0;   /* set by stream_peek even when a call succeeds: read only on -1 */
        /* where _fill_names calls peek: first, and once a buffer is used up */
        int fresh = !peeked || c.ds.pos >= PyBytes_GET_SIZE(c.ds.buf);
        peeked = 1;
        int got = stream_peek(&c.ds, c.fd, cookie, &e, &peek_err);
        if (got <= 0) {
            if (got < 0 && !used)
                err = peek_err ? peek_err : EIO;
            break;
        }
        if (fresh) {
            mark_pos = c.ds.pos;
            mark_cookie = c.ds.cookie;
        }
        if (name_ok(&e)) {
            Py_ssize_t size = (DIRENT + e.namelen + 7) & ~(Py_ssize_t)7;
            if (used + size > c.limit)
                break;
            if (e.next < 0) {
                c.ds.pos = mark_pos;
                c.ds.cookie = mark_cookie;
                err = EIO;
                break;
            }
            struct fuse_dirent d = {e.ino, (uint64_t)e.next, (uint32_t)e.namelen, e.dtype};
            memcpy(c.out + used, &d, sizeof d);
            memcpy(c.out + used + DIRENT, e.name, (size_t)e.namelen);
            used += size;
        }
        c.ds.pos += e.reclen;   /* DirStream.advance */
        c.ds.cookie = e.next;
        cookie = e.next;
    }
    return readdir_end(q, h, &c, used, err, error);
}

/* enable_readdirplus(entry, stream_type, meter_words): see fastops_methods */
static PyObject *fastops_enable_readdirplus(FastOps *self, PyObject *args)
{
    PyObject *entry, *stream_type, *words;
    if (!PyArg_ParseTuple(args, "OOO", &entry, &stream_type, &words))
        return NULL;
    if (self->lk.hash == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_readdirplus: LOOKUP is not compiled");
        return NULL;
    }
    if (!PyCallable_Check(entry) || !PyType_Check(stream_type)) {
        PyErr_SetString(PyExc_TypeError, "FastOps.enable_readdirplus: entry must be callable, stream_type a type");
        return NULL;
    }
    struct op_words w;
    int none = meter_op_words(self, words, "enable_readdirplus", &w);
    if (none < 0)
        return NULL;
    if (!none)
        self->m.readdirplus = w;
    Py_INCREF(entry);
    Py_INCREF(stream_type);
    Py_XSETREF(self->rd.entry, entry);
    Py_XSETREF(self->rd.stream_type, stream_type);
    Py_RETURN_NONE;
}

/* enable_readdir(stream_type, meter_words): see fastops_methods */
static PyObject *fastops_enable_readdir(FastOps *self, PyObject *args)
{
    PyObject *stream_type, *words;
    if (!PyArg_ParseTuple(args, "OO", &stream_type, &words))
        return NULL;
    if (!PyType_Check(stream_type)) {
        PyErr_SetString(PyExc_TypeError, "FastOps.enable_readdir: stream_type must be a type");
        return NULL;
    }
    if (self->rd.stream_type != NULL && self->rd.stream_type != stream_type) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_readdir: not READDIRPLUS's stream_type");
        return NULL;
    }
    struct op_words w;
    int none = meter_op_words(self, words, "enable_readdir", &w);
    if (none < 0)
        return NULL;
    if (!none)
        self->m.readdir = w;
    Py_INCREF(stream_type);
    Py_XSETREF(self->rd.stream_type, stream_type);
    self->rd.names = 1;
    Py_RETURN_NONE;
}
