/*
 * LOOKUP in C (docs/compiled.md, "LOOKUP in C"), included by _fastops.c
 * (one translation unit: it uses that file's request, state and reply
 * helpers). The reference is entries.do_lookup, names.parse_lookup_name,
 * FuseSession.entry and InodeCache.lookup/adopt with InodeTable.ref.
 *
 * Served here, under the shared checks of serve_req (a writable part of at
 * least 16 + 128 bytes: the op table's reply minimum), when:
 *   - FastOps.enable_lookup was called (fastpath.make: the LOOKUP row is
 *     entries.do_lookup, the entry replies are replies.Timeouts' own, no
 *     --announce-submounts, the stock InodeTable and InodeCache);
 *   - no request extensions; the name fills the args (name + NUL, 1..255
 *     bytes, no other NUL, no '/'), and is neither "." nor "..": any other
 *     name is Python's (it answers EINVAL or ENAMETOOLONG, or resolves the
 *     dots);
 *   - the parent is the root or a nodeid whose O_PATH fd this worker caches
 *     with the table's current generation (cached_fd, as for GETATTR).
 * Then fstatat(parent, name, AT_SYMLINK_NOFOLLOW) (the GIL released):
 *   - ENOENT: the error reply, or with --cache=always the negative entry
 *     (Timeouts.negative_entry); any other errno: Python's (it redoes the
 *     lookup with openat, which has no side effect to repeat);
 *   - found: under the table's lock (find_ref: the thread lock, taken
 *     without waiting and kept for the rest of the serve or batch call,
 *     then the POSIX record lock on byte 0 of the memfd, LockedTable._lock's,
 *     for this request), the (dev, ino) is found with InodeTable._find's
 *     probing. The root: nodeid 1, generation 0, no count (as ref and
 *     adopt). A nodeid whose O_PATH fd this worker caches with its current
 *     generation: +1 lookup (ref's only write), and the fuse_entry_out of
 *     Timeouts.entry_out. Anything else (an inode the table does not know,
 *     or one this worker has no fd of: an insertion, a file handle, a
 *     peers' claim), a busy thread lock, a DIRTY table, any lock error:
 *     the table is left as it was and Python serves the request whole.
 * Python's path opens the name (O_PATH) and closes that fd again when the
 * inode's fd is cached; here the cached fd stands for it: the same inode
 * (the table's dev/ino; the cached fd pins the inode, so its number cannot
 * be reused), one system call instead of three.
 */

#define ENTRY_OUT 128
#define LOOKUP_NAME_MAX 255     /* abi.NAME_MAX */

/* fuse_out_header + fuse_entry_out, as abi.OUT_HEADER + abi.ENTRY_OUT */
struct entry_reply {
    uint32_t len;
    int32_t error;
    uint64_t unique;
    uint64_t nodeid, generation, entry_valid, attr_valid;
    uint32_t entry_valid_nsec, attr_valid_nsec;
    struct fuse_attr attr;
};

_Static_assert(sizeof(struct entry_reply) == OUT_HEADER + ENTRY_OUT, "fuse_entry_out");

/* InodeTable._home: where (dev, ino) starts probing (u64 arithmetic, as
 * Python's & _U64) */
static uint64_t table_home(uint64_t dev, uint64_t ino, uint64_t mask)
{
    uint64_t h = ((ino >> 6) * 0x9E3779B97F4A7C15ULL) ^ (dev * 0xC2B2AE3D27D4EB4FULL);
    return (((h ^ (h >> 31)) << 6) | (ino & 63)) & mask;
}

/* one word of a held table, which must be in it (checked by the caller) */
static uint64_t word_at(const struct words *w, Py_ssize_t i)
{
    return __atomic_load_n((const uint64_t *)w->b.buf + i, __ATOMIC_RELAXED);
}

static void set_word(const struct words *w, Py_ssize_t i, uint64_t v)
{
    __atomic_store_n((uint64_t *)w->b.buf + i, v, __ATOMIC_RELAXED);
}

/* LockedTable._lock's record lock (fcntl.lockf(fd, LOCK_EX, 1, 0)):
 * tried first without waiting (GIL held), then waited for with the GIL
 * released, as fcntl.lockf does; -1 on any error (EINTR included: the
 * caller leaves the request to Python) */
static int record_lock(int fd, short type)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    if (fd < 0 || fcntl(fd, F_SETLK, &fl) == 0)
        return 0;
    if (type == F_UNLCK || (errno != EAGAIN && errno != EACCES))
        return -1;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fcntl(fd, F_SETLKW, &fl);
    Py_END_ALLOW_THREADS
    return rc;
}

/* InodeTable._find under the lock: the slot of (dev, ino), 0 if it is not
 * in the index, -1 if the index is not what it should be (a slot out of
 * range, no empty entry: Python's then) */
static Py_ssize_t table_find(const FastOps *self, const struct state *st, uint64_t dev, uint64_t ino)
{
    const struct lookup_table *t = &self->lk;
    const uint32_t *index = st->hash.b.buf;
    Py_ssize_t words = st->inodes.b.len / 8;
    uint64_t i = table_home(dev, ino, t->hmask);
    for (uint64_t n = 0; n <= t->hmask; n++, i = (i + 1) & t->hmask) {
        uint32_t s = __atomic_load_n(index + i, __ATOMIC_RELAXED);
        if (s == 0)
            return 0;
        if (s > t->capacity || ((Py_ssize_t)s + 1) * self->slot_words > words)
            return -1;
        Py_ssize_t base = (Py_ssize_t)s * self->slot_words;
        if (word_at(&st->inodes, base + t->s_ino) == ino && word_at(&st->inodes, base + t->s_dev) == dev)
            return s;
    }
    return -1;
}

/* InodeTable.ref(dev, ino) for an inode the table knows and this worker
 * holds an fd of (or the root), under the table's lock: 0 and
 * *nodeid and *gen (+1 lookup unless the root), or -1 with the table as it
 * was (the request is then Python's) */
static int find_ref(FastOps *self, struct state *st, uint64_t dev, uint64_t ino, uint64_t *nodeid, uint64_t *gen)
{
    const struct lookup_table *t = &self->lk;
    if (PyErr_Occurred() || st->fds == NULL || (!st->hash.held && hold_words(t->hash, &st->hash) < 0)
            || st->hash.b.len / 4 <= (Py_ssize_t)t->hmask || ((uintptr_t)st->hash.b.buf & 3)
            || st->header.b.len / 8 <= t->h_dirty || ((uintptr_t)st->header.b.buf & 7)
            || ((uintptr_t)st->inodes.b.buf & 7))
        return -1;
    /* the thread lock, never waited for here (a holder means Python's
     * turn), and kept until the serve or batch call returns (state_drop):
     * no other thread of a worker touches the table, and nothing C calls
     * meanwhile takes it; Python's _lock takes it in the same order, the
     * thread lock before the record lock */
    if (st->tlock == NULL) {
        PyObject *got = PyObject_CallMethodOneArg(t->tlock, s_acquire, Py_False);
        if (got == NULL || got != Py_True) {
            Py_XDECREF(got);
            PyErr_Clear();
            return -1;
        }
        Py_DECREF(got);
        Py_INCREF(t->tlock);
        st->tlock = t->tlock;
    }
    int result = -1;
    if (record_lock(t->fd, F_WRLCK) == 0) {
        /* a holder died mid-update: Python's _lock repairs (DIRTY stays) */
        if (word_at(&st->header, t->h_dirty) == 0) {
            set_word(&st->header, t->h_dirty, 1);
            Py_ssize_t s = table_find(self, st, dev, ino);
            if (s == 1) {
                *nodeid = 1;
                *gen = 0;
                result = 0;
            } else if (s > 1) {
                Py_ssize_t base = s * self->slot_words;
                /* InodeCache.adopt's "e[0] == gen" (the new fd would be
                 * closed): this worker caches an fd of the slot's current
                 * generation; any error is cleared, the thread lock's
                 * release is a call into Python */
                uint64_t g = word_at(&st->inodes, base + t->s_gen);
                int held = g != 0 && cached_fd(self, st, (uint64_t)s) >= 0;
                PyErr_Clear();
                if (held) {
                    set_word(&st->inodes, base + t->s_ref, word_at(&st->inodes, base + t->s_ref) + 1);
                    *nodeid = (uint64_t)s;
                    *gen = g;
                    result = 0;
                }
            }
            set_word(&st->header, t->h_dirty, 0);
        }
        record_lock(t->fd, F_UNLCK);
    }
    return result;
}

/* LOOKUP; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_lookup(FastOps *self, struct state *st, const struct req *q, const struct in_header *h,
                              int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    char name[LOOKUP_NAME_MAX + 1];
    if (h->total_extlen || nargs < 2 || nargs > LOOKUP_NAME_MAX + 1
            || iov_copy(q->r, q->nr, IN_HEADER, name, nargs, 0) < 0)
        return NOT_HANDLED;
    /* parse_lookup_name: NUL last and only there, no '/'; the dots are Python's */
    if (name[nargs - 1] != 0 || memchr(name, 0, (size_t)nargs - 1) != NULL || memchr(name, '/', (size_t)nargs - 1) != NULL
            || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return NOT_HANDLED;
    int parent = cached_fd(self, st, h->nodeid);
    if (parent < 0)
        return NOT_HANDLED;
    struct stat s;
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    rc = fstatat(parent, name, &s, AT_SYMLINK_NOFOLLOW);
    err = errno;
    Py_END_ALLOW_THREADS
    struct entry_reply r;
    memset(&r, 0, sizeof r);
    r.len = sizeof r;
    r.unique = h->unique;
    if (rc != 0) {
        if (err != ENOENT)
            return NOT_HANDLED;
        if (!self->lk.negative)
            return error_reply(q, h->unique, err, error);
        /* Timeouts.negative_entry: nodeid 0, the entry timeout, no count */
        r.entry_valid = self->attr_sec;
        r.entry_valid_nsec = self->attr_nsec;
    } else {
        if (fill_attr(&r.attr, &s) < 0)
            return NOT_HANDLED;
        if (find_ref(self, st, (uint64_t)s.st_dev, (uint64_t)s.st_ino, &r.nodeid, &r.generation) < 0)
            return NOT_HANDLED;
        r.entry_valid = r.attr_valid = self->attr_sec;
        r.entry_valid_nsec = r.attr_valid_nsec = self->attr_nsec;
    }
    /* serve_req checked the room: this write cannot fail once a count is taken */
    return iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

/* enable_lookup(hash, fd, tlock, capacity, layout, negative): see fastops_methods */
static PyObject *fastops_enable_lookup(FastOps *self, PyObject *args)
{
    PyObject *hash, *tlock;
    int fd, negative;
    Py_ssize_t capacity, dirty, gen, ref, dev, ino;
    if (!PyArg_ParseTuple(args, "OiOn(nnnnn)p", &hash, &fd, &tlock, &capacity, &dirty, &gen, &ref, &dev, &ino,
                          &negative))
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(hash, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t entries = b.len / 4;
    PyBuffer_Release(&b);
    /* the index is a power of two of u32 entries, at least 2 * (capacity + 1) */
    if (capacity < 1 || capacity >= (Py_ssize_t)1 << 31 || entries < 2 * (capacity + 1) || (entries & (entries - 1))
            || dirty < 0 || dirty >= 16 || gen < 0 || ref < 0 || dev < 0 || ino < 0 || gen >= self->slot_words
            || ref >= self->slot_words || dev >= self->slot_words || ino >= self->slot_words) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_lookup: bad inode table layout");
        return NULL;
    }
    Py_INCREF(hash);
    Py_INCREF(tlock);
    Py_XSETREF(self->lk.hash, hash);
    Py_XSETREF(self->lk.tlock, tlock);
    self->lk.fd = fd;
    self->lk.capacity = (uint64_t)capacity;
    self->lk.hmask = (uint64_t)entries - 1;
    self->lk.h_dirty = dirty;
    self->lk.s_gen = gen;
    self->lk.s_ref = ref;
    self->lk.s_dev = dev;
    self->lk.s_ino = ino;
    self->lk.negative = negative;
    Py_RETURN_NONE;
}
