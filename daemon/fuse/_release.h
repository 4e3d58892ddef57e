/*
 * RELEASE in C (docs/compiled.md, "RELEASE in C"), included by _fastops.c
 * after _meta.h (one translation unit: it uses that file's request, state
 * and reply helpers and meter_op_words, _meta.h's empty_reply and
 * _lookup.h's record_lock).
 * The reference is files.do_release with HandleTable.close, FileTable.free
 * and HandleTable._forget.
 *
 * Served here, under the shared checks of serve_req, when
 * FastOps.enable_release was called (fastpath.make: the RELEASE row is
 * files.do_release and the session's handles are the stock HandleTable on
 * the FileTable given), and:
 *   - no request extensions; fuse_release_in whole (24 bytes, more
 *     ignored as files._args does; shorter: Python's EINVAL);
 *   - the fh is an open file this worker holds (open_fd: its OpenHandle of
 *     kind file whose generation is the shared slot's); any other fh
 *     (another worker's, released, unknown: Python copies or answers
 *     EBADF) is Python's;
 *   - handles.peers is None or its copied is a bool;
 *   - handles._open_per_node has the fh's nodeid with an int count >= 1;
 *   - the FileTable's thread lock is free (taken without waiting), its
 *     table lock taken (as LockedTable._lock, _tablelock.h: waited for
 *     with the GIL released), its header's DIRTY word 0 (a holder
 *     died mid-update: Python's _lock repairs), no lock description on the
 *     fh's inode (its _H_LOCKS word 0, or lock_on's scan of the slots finds
 *     none: HandleTable.close's lock step then does nothing, whether or
 *     not this was the inode's last handle) and the fh's slot still of its
 *     generation.
 * Then, under those locks, FileTable.free's writes in its order (DIRTY
 * set first and cleared last, so a worker killed in between leaves a
 * table Python's _repair rebuilds: the free list and the live count from
 * the generations, released + 1), the locks let go; with
 * RELEASE_FLOCK_UNLOCK, or when peers.copied (another process, a request
 * worker or the keeper, may hold a copy of the open file a moment
 * longer), flock(fd, LOCK_UN), its error ignored (Python takes the flock
 * off before the free for the first reason and after it for the second:
 * one LOCK_UN after the free leaves the same host state, the guest hears
 * of neither); then HandleTable._forget's: the fh out of _handles, the
 * nodeid's count down (out at 0), the fd closed once (close(2), its error
 * ignored as _close_quietly's).
 * The empty reply (16 bytes), counted under RELEASE with a meter. In the
 * batch loop the chain is taken before the slot is freed (as UNLINK's
 * before unlinkat): a worker dying after the free leaves the request to
 * its successor's EIO, never to a second RELEASE answering EBADF.
 * System calls: fcntl and futex (the table lock, _tablelock.h), flock and close, all on
 * request.policy already (flock for Python's RELEASE).
 *
 * RELEASEDIR (docs/compiled.md, "RELEASEDIR in C"), when
 * FastOps.enable_releasedir was called after enable_release (fastpath.make:
 * RELEASE is C's and the RELEASEDIR row is dirs.do_releasedir): the same
 * function, the reference dirs.do_releasedir with HandleTable.close(fh,
 * KIND_DIR), under the same conditions but for the handle: a directory
 * handle this worker holds (_readdir.h's dir_handle, READDIR's check: its
 * OpenHandle of kind dir whose generation is the shared slot's). The same
 * free, _forget and reply; no flock at all (close takes it off files only,
 * do_releasedir ignores release_flags). The handle's DirStream (its
 * dir_stream, READDIR's and READDIRPLUS's state) goes with the handle out
 * of _handles, as in Python: nothing else refers to it. Counted under
 * RELEASEDIR. System calls: fcntl and close.
 */

#include <sys/file.h>

#define RELEASE_IN 24               /* abi.RELEASE_IN */
#define RELEASE_FLOCK_UNLOCK 2      /* abi.FUSE_RELEASE_FLOCK_UNLOCK */

static PyObject *s_rl_files, *s_rl_peers_copied, *s_rl_per_node, *s_rl_released;

/* the per-call references RELEASE needs: NULL-able, dropped by release_drop */
struct release_refs {
    PyObject *handles, *files, *peers, *per_node, *count;
    struct words hdr;
};

static void release_drop(struct release_refs *r)
{
    drop_words(&r->hdr);
    Py_XDECREF(r->count);
    Py_XDECREF(r->per_node);
    Py_XDECREF(r->peers);
    Py_XDECREF(r->files);
    Py_XDECREF(r->handles);
    PyErr_Clear();
}

/* the checks before any lock: 0 (r filled, *count the nodeid's open
 * handles, *copied peers.copied) or -1 (Python's) */
static int release_ready(FastOps *self, struct release_refs *r, Py_ssize_t nodeid, Py_ssize_t *count, int *copied)
{
    const struct release_conf *c = &self->rl;
    if ((r->handles = PyObject_GetAttr(self->session, s_handles)) == NULL
            || (r->files = PyObject_GetAttr(r->handles, s_rl_files)) == NULL || r->files != c->files
            || (r->peers = PyObject_GetAttr(r->handles, s_peers)) == NULL)
        return -1;
    *copied = 0;
    if (r->peers != Py_None) {
        PyObject *got = PyObject_GetAttr(r->peers, s_rl_peers_copied);
        int is_bool = got != NULL && PyBool_Check(got);
        *copied = got == Py_True;
        Py_XDECREF(got);
        if (!is_bool)
            return -1;
    }
    PyObject *key = PyLong_FromSsize_t(nodeid);
    if (key == NULL || (r->per_node = PyObject_GetAttr(r->handles, s_rl_per_node)) == NULL
            || !PyDict_CheckExact(r->per_node)) {
        Py_XDECREF(key);
        return -1;
    }
    r->count = PyDict_GetItemWithError(r->per_node, key);      /* borrowed */
    Py_DECREF(key);
    if (r->count == NULL || !PyLong_CheckExact(r->count))
        return (r->count = NULL), -1;
    Py_INCREF(r->count);
    *count = PyLong_AsSsize_t(r->count);
    if (*count < 1 || hold_words(c->hdr, &r->hdr) < 0 || r->hdr.b.len / 8 <= c->h_last
            || ((uintptr_t)r->hdr.b.buf & 7))
        return -1;
    return 0;
}

/* whether the FileTable holds a lock description on nodeid (of owner,
 * unless any): FileTable.locks_of's scan, slots 1 to min(high, capacity),
 * a slot's generation read again after its other words; hw its header's
 * words, st->files its slots'. 1 yes, 0 no, -1 cannot tell (RELEASE not
 * C's, or a table not shaped as enable_release said): Python's */
static int lock_on(FastOps *self, const struct state *st, const struct words *hw, uint64_t nodeid, int any,
                   uint64_t owner)
{
    const struct release_conf *c = &self->rl;
    const struct words *fw = &st->files;
    if (c->files == NULL || hw->b.len / 8 <= c->h_last || fw->b.buf == NULL)
        return -1;
    uint64_t high = word_at(hw, c->h_high), end = high < c->capacity + 1 ? high : c->capacity + 1;
    Py_ssize_t n = fw->b.len / 8;
    for (uint64_t s = 1; s < end; s++) {
        Py_ssize_t base = (Py_ssize_t)s * c->words;
        if (base + c->words > n)
            return -1;
        uint64_t gen = word_at(fw, base + c->f_gen);
        if (gen && word_at(fw, base + c->f_kind) == c->kind_lock && word_at(fw, base + c->f_node) == nodeid
                && (any || word_at(fw, base + c->f_lock_owner) == owner) && word_at(fw, base + c->f_gen) == gen)
            return 1;
    }
    return 0;
}

/* the fd of the directory handle fh this worker holds (_readdir.h's
 * dir_handle, READDIR's check) and *nodeid, its nodeid; -1 if none */
static int open_dir_fd(const struct state *st, uint64_t fh, Py_ssize_t *nodeid)
{
    int fd;
    PyObject *handle = dir_handle(st, fh, &fd);     /* borrowed */
    if (handle == NULL || attr_ssize(handle, s_nodeid, nodeid) < 0) {
        PyErr_Clear();
        return -1;
    }
    return fd;
}

/* LockedTable._lock on the open-file table for RELEASE and OPEN: its
 * thread lock (never waited for here), then its table lock, with DIRTY 0
 * (set: a holder died mid-update, Python's _lock repairs). 1 taken, or 0
 * with nothing held (the request is then Python's). The table's words
 * between the two are each caller's: DIRTY set first, cleared last. */
static int files_take(const struct release_conf *c, const struct words *hdr)
{
    if (!thread_lock_try(c->tlock))
        return 0;
    if (table_locking_take(&c->lock) == 0) {
        if (word_at(hdr, c->h_dirty) == 0)
            return 1;
        table_locking_give(&c->lock);
    }
    thread_lock_give(c->tlock);
    return 0;
}

static void files_give(const struct release_conf *c)
{
    table_locking_give(&c->lock);
    thread_lock_give(c->tlock);
}

/* RELEASE and RELEASEDIR (the handle of kind file, resp. dir); NOT_HANDLED
 * or the bytes written */
static Py_ssize_t fast_release(FastOps *self, const struct state *st, const struct req *q, const struct in_header *h,
                               int *error)
{
    const struct release_conf *c = &self->rl;
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER, nodeid, count;
    struct { uint64_t fh; uint32_t flags, release_flags; uint64_t lock_owner; } a;   /* fuse_release_in */
    int fd, copied, dir = h->opcode == OP_RELEASEDIR;
    if (h->total_extlen || nargs < RELEASE_IN || nargs > MAX_ARGS || iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0
            || (fd = dir ? open_dir_fd(st, a.fh, &nodeid) : open_fd(st, a.fh, &nodeid)) < 0)
        return NOT_HANDLED;
    uint64_t s = a.fh & 0xFFFFFF, gen = a.fh >> 24;
    Py_ssize_t base = (Py_ssize_t)s * c->words;
    struct release_refs r = {0};
    if (s < 1 || s > c->capacity || gen == 0 || (base + c->words) > st->files.b.len / 8
            || release_ready(self, &r, nodeid, &count, &copied) < 0) {
        release_drop(&r);
        return NOT_HANDLED;
    }
    int served = 0;
    uint64_t released = 0;      /* the released count before this free */
    if (files_take(c, &r.hdr)) {
        const struct words *hw = &r.hdr, *fw = &st->files;
        /* a lock description on the inode: HandleTable.close's lock step
         * may have work (the last handle on it), Python's */
        if (word_at(fw, base + c->f_gen) == gen
                && (word_at(hw, c->h_locks) == 0 || lock_on(self, st, hw, (uint64_t)nodeid, 1, 0) == 0)) {
            if (q->take != NULL)
                take_chain(q->take);
            /* FileTable.free's writes, DIRTY around them */
            set_word(hw, c->h_dirty, 1);
            set_word(fw, base + c->f_gen, 0);
            set_word(fw, base + c->f_owner, 0);
            set_word(fw, base + c->f_kept, 0);
            if (word_at(fw, base + c->f_kind) == c->kind_lock)
                set_word(hw, c->h_locks, word_at(hw, c->h_locks) - 1);
            set_word(fw, base + c->f_next, word_at(hw, c->h_free));
            set_word(hw, c->h_free, s);
            set_word(hw, c->h_live, word_at(hw, c->h_live) - 1);
            released = word_at(hw, c->h_released);
            set_word(hw, c->h_released, released + 1);
            set_word(hw, c->h_dirty, 0);
            served = 1;
        }
        files_give(c);
    }
    if (!served) {
        release_drop(&r);
        return NOT_HANDLED;
    }
    /* HandleTable._forget: the fh out of _handles, the nodeid's count
     * down, the fd closed (the dict writes cannot fail for keys present:
     * an error is cleared, the fd closed all the same) */
    PyObject *key = PyLong_FromUnsignedLongLong(a.fh), *nkey = PyLong_FromSsize_t(nodeid);
    if (key != NULL && PyDict_DelItem(st->handles, key) < 0)
        PyErr_Clear();
    if (nkey != NULL) {
        PyObject *left = count > 1 ? PyLong_FromSsize_t(count - 1) : NULL;
        if (count > 1 ? left == NULL || PyDict_SetItem(r.per_node, nkey, left) < 0
                : PyDict_DelItem(r.per_node, nkey) < 0)
            PyErr_Clear();
        Py_XDECREF(left);
    }
    Py_XDECREF(key);
    Py_XDECREF(nkey);
    /* HandleTable._freed: if no other free came since reap last looked,
     * its count moves on by this one (and so does the running wait's
     * watch of it), so this worker's own RELEASE does not make it reap */
    PyObject *seen = PyObject_GetAttr(r.handles, s_rl_released);
    if (seen != NULL && PyLong_CheckExact(seen) && PyLong_AsUnsignedLongLong(seen) == released) {
        PyObject *now = PyLong_FromUnsignedLongLong(released + 1);
        if (now != NULL && PyObject_SetAttr(r.handles, s_rl_released, now) == 0)
            watch_moved(self, r.hdr.b.buf, c->h_released, released, released + 1);
        Py_XDECREF(now);
    }
    Py_XDECREF(seen);
    release_drop(&r);
    /* HandleTable.close takes the flock off files only; do_releasedir
     * ignores release_flags */
    int unlock = !dir && (copied || (a.release_flags & RELEASE_FLOCK_UNLOCK));
    Py_BEGIN_ALLOW_THREADS
    if (unlock)
        flock(fd, LOCK_UN);
    close(fd);
    Py_END_ALLOW_THREADS
    return empty_reply(q, h->unique);
}

/* enable_release(files, (dirty, free, live, released, locks, high, gen, kind, owner, next, kept, node,
 * lock_owner, words, kind_lock), meter_words): see fastops_methods */
static PyObject *fastops_enable_release(FastOps *self, PyObject *args)
{
    PyObject *files, *words, *tlock = NULL, *hdr = NULL, *fdobj = NULL, *cap = NULL;
    struct release_conf c = {0};
    Py_ssize_t kind_lock;
    if (!PyArg_ParseTuple(args, "O(nnnnnnnnnnnnnnn)O", &files, &c.h_dirty, &c.h_free, &c.h_live, &c.h_released,
                          &c.h_locks, &c.h_high, &c.f_gen, &c.f_kind, &c.f_owner, &c.f_next, &c.f_kept, &c.f_node,
                          &c.f_lock_owner, &c.words, &kind_lock, &words))
        return NULL;
    Py_ssize_t capacity = 0;
    int ok = (tlock = PyObject_GetAttrString(files, "_tlock")) != NULL
             && (hdr = PyObject_GetAttrString(files, "_hdr")) != NULL && PyMemoryView_Check(hdr)
             && (fdobj = PyObject_CallMethod(files, "lock_handle", NULL)) != NULL
             && table_locking_set(&c.lock, fdobj) == 0
             && (cap = PyObject_GetAttrString(files, "capacity")) != NULL && PyLong_CheckExact(cap)
             && (capacity = PyLong_AsSsize_t(cap)) >= 1;
    Py_XDECREF(fdobj);
    Py_XDECREF(cap);
    Py_ssize_t idx[] = {c.h_dirty, c.h_free, c.h_live, c.h_released, c.h_locks, c.h_high, c.h_high};
    Py_ssize_t fidx[] = {c.f_gen, c.f_kind, c.f_owner, c.f_next, c.f_kept, c.f_node, c.f_lock_owner};
    for (size_t i = 0; ok && i < sizeof idx / sizeof idx[0]; i++) {
        ok = idx[i] >= 0 && fidx[i] >= 0 && fidx[i] < c.words;
        if (idx[i] > c.h_last)
            c.h_last = idx[i];
    }
    if (!ok || kind_lock < 0) {
        Py_XDECREF(tlock);
        Py_XDECREF(hdr);
        Py_CLEAR(c.lock.shared);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "FastOps.enable_release: not a FileTable, or a bad layout");
        return NULL;
    }
    struct op_words w = {-1, -1, -1, -1};
    if (meter_op_words(self, words, "enable_release", &w) < 0) {
        Py_DECREF(tlock);
        Py_DECREF(hdr);
        Py_CLEAR(c.lock.shared);
        return NULL;
    }
    c.capacity = (uint64_t)capacity;
    c.kind_lock = (uint64_t)kind_lock;
    Py_INCREF(files);
    c.files = files;
    c.tlock = tlock;
    c.hdr = hdr;
    Py_XDECREF(self->rl.files);
    Py_XDECREF(self->rl.tlock);
    Py_XDECREF(self->rl.hdr);
    Py_XDECREF(self->rl.lock.shared);
    self->rl = c;
    self->m.release = w;
    Py_RETURN_NONE;
}

/* enable_releasedir(meter_words): see fastops_methods */
static PyObject *fastops_enable_releasedir(FastOps *self, PyObject *args)
{
    PyObject *words;
    if (!PyArg_ParseTuple(args, "O", &words))
        return NULL;
    if (self->rl.files == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_releasedir: enable_release first");
        return NULL;
    }
    struct op_words w = {-1, -1, -1, -1};
    if (meter_op_words(self, words, "enable_releasedir", &w) < 0)
        return NULL;
    self->rl.dirs = 1;
    self->m.releasedir = w;
    Py_RETURN_NONE;
}
