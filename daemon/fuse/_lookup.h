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
 *   - found: the index probed without the table lock picks the path (a
 *     hint only: each path decides again under the lock). An inode this
 *     worker holds (or the root): under the table's lock (table_ready: the
 *     thread lock, taken without waiting and kept for the rest of the
 *     serve or batch call, then the table lock, LockedTable._lock's:
 *     _tablelock.h, for this request), the (dev, ino) is
 *     found with InodeTable._find's probing. The root: nodeid 1,
 *     generation 0, no count (as ref and adopt). A nodeid whose O_PATH fd
 *     this worker caches with its current generation: +1 lookup (ref's
 *     only write), and the fuse_entry_out of Timeouts.entry_out.
 *   - otherwise (cold_lookup: the inode is not in the table, or this worker
 *     holds no fd of it): InodeCache.lookup + adopt. openat(parent, name,
 *     O_PATH | O_NOFOLLOW | O_CLOEXEC) and fstat (the GIL released; any
 *     error: Python's, which redoes them), then under the table lock
 *     adopt_locked: the root (fd closed); an inode this worker holds now
 *     (+1, fd closed); a known inode (+1, the fd cached, claimed with this
 *     worker's owner word when peers are shared); an unknown one inserted
 *     as InodeTable.ref does (take_slot, the owner word, the file handle
 *     with --inode-file-handles on the share's device, the generation last,
 *     then the index entry), the fd cached. The fd goes into the cache
 *     (InodeCache._fds, where a stale entry of a reused nodeid is replaced
 *     and its fd closed) before the table is written, the one step that
 *     can fail; on any failure, or a full table (ENFILE), the fd is closed
 *     and the table and cache are as they were: Python's.
 *   - a busy thread lock, a DIRTY table, any lock error: the table is left
 *     as it was and Python serves the request whole.
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

/* InodeTable._find under the lock: the slot of (dev, ino), 0 if it is not
 * in the index (*pos: the empty entry where it would go), -1 if the index
 * is not what it should be (a slot out of range, no empty entry: Python's
 * then) */
static Py_ssize_t table_find(const FastOps *self, const struct state *st, uint64_t dev, uint64_t ino, uint64_t *pos)
{
    const struct lookup_table *t = &self->lk;
    const uint32_t *index = st->hash.b.buf;
    Py_ssize_t words = st->inodes.b.len / 8;
    uint64_t i = table_home(dev, ino, t->hmask);
    for (uint64_t n = 0; n <= t->hmask; n++, i = (i + 1) & t->hmask) {
        uint32_t s = __atomic_load_n(index + i, __ATOMIC_RELAXED);
        if (s == 0) {
            *pos = i;
            return 0;
        }
        if (s > t->capacity || ((Py_ssize_t)s + 1) * self->slot_words > words)
            return -1;
        Py_ssize_t base = (Py_ssize_t)s * self->slot_words;
        if (word_at(&st->inodes, base + t->s_ino) == ino && word_at(&st->inodes, base + t->s_dev) == dev)
            return s;
    }
    return -1;
}

/* whether this worker holds the inode (dev, ino) of s, or it is the root,
 * by the index probed without the table lock (the table ready): only a
 * hint of which way, each way decides again under the lock */
static int held_hint(FastOps *self, const struct state *st, const struct stat *s)
{
    uint64_t pos;
    Py_ssize_t hint = table_find(self, st, (uint64_t)s->st_dev, (uint64_t)s->st_ino, &pos);
    int held = hint == 1 || (hint > 1 && cached_fd(self, st, (uint64_t)hint) >= 0);
    PyErr_Clear();
    return held;
}

/* the table's thread lock, never waited for here (a holder means Python's
 * turn), and kept until the serve or batch call returns (state_drop): no
 * other thread of a worker touches the table, and nothing C calls
 * meanwhile takes it; Python's _lock takes it in the same order, the
 * thread lock before the table lock. 0, or -1 (not taken: Python's) */
static int take_tlock(const struct lookup_table *t, struct state *st)
{
    if (st->tlock == NULL) {
        if (!thread_lock_try(t->tlock))
            return -1;
        Py_INCREF(t->tlock);
        st->tlock = t->tlock;
    }
    return 0;
}

/* the table's views checked and its thread lock taken, for this serve or
 * batch call: 0, or -1 (the request is then Python's) */
static int table_ready(FastOps *self, struct state *st)
{
    const struct lookup_table *t = &self->lk;
    if (PyErr_Occurred() || st->fds == NULL || (!st->hash.held && hold_words(t->hash, &st->hash) < 0)
            || st->hash.b.len / 4 <= (Py_ssize_t)t->hmask || ((uintptr_t)st->hash.b.buf & 3)
            || st->header.b.len / 8 <= t->h_last || ((uintptr_t)st->header.b.buf & 7)
            || ((uintptr_t)st->inodes.b.buf & 7))
        return -1;
    return take_tlock(t, st);
}

/* InodeTable.ref(dev, ino) for an inode the table knows and this worker
 * holds an fd of (or the root), with the table's lock held and
 * DIRTY set (the table ready): 0 and *nodeid and *gen (+1 lookup unless
 * the root); 1 with the table as it was when the inode is not in it or
 * this worker holds no fd of it (cold_lookup's then); -1 with the table as
 * it was for anything else (the request is then Python's) */
static int ref_held_locked(FastOps *self, struct state *st, uint64_t dev, uint64_t ino, uint64_t *nodeid,
                           uint64_t *gen)
{
    const struct lookup_table *t = &self->lk;
    uint64_t pos;
    Py_ssize_t s = table_find(self, st, dev, ino, &pos);
    if (s == 0)
        return 1;
    if (s == 1) {
        *nodeid = 1;
        *gen = 0;
        return 0;
    }
    if (s < 0)
        return -1;
    Py_ssize_t base = s * self->slot_words;
    /* InodeCache.adopt's "e[0] == gen" (the new fd would be closed): this
     * worker caches an fd of the slot's current generation; any error is
     * cleared, the thread lock's release is a call into Python */
    uint64_t g = word_at(&st->inodes, base + t->s_gen);
    int held = g != 0 && cached_fd(self, st, (uint64_t)s) >= 0;
    PyErr_Clear();
    if (held) {
        set_word(&st->inodes, base + t->s_ref, word_at(&st->inodes, base + t->s_ref) + 1);
        *nodeid = (uint64_t)s;
        *gen = g;
        return 0;
    }
    return g != 0 ? 1 : -1;
}

/* the table's lock taken and DIRTY set, for a locked update: 0, or
 * -1 (not taken, or DIRTY found set: a holder died mid-update and Python's
 * _lock repairs, DIRTY stays) */
static int table_lock(FastOps *self, struct state *st)
{
    const struct lookup_table *t = &self->lk;
    if (table_locking_take(&t->lock) != 0)
        return -1;
    if (word_at(&st->header, t->h_dirty) != 0) {
        table_locking_give(&t->lock);
        return -1;
    }
    set_word(&st->header, t->h_dirty, 1);
    return 0;
}

/* DIRTY cleared and the table lock let go (after table_lock) */
static void table_unlock(FastOps *self, struct state *st)
{
    set_word(&st->header, self->lk.h_dirty, 0);
    table_locking_give(&self->lk.lock);
}

/* ref_held_locked under its own round of the table lock (the table
 * ready): its 0, 1 or -1 */
static int find_ref(FastOps *self, struct state *st, uint64_t dev, uint64_t ino, uint64_t *nodeid, uint64_t *gen)
{
    if (table_lock(self, st) < 0)
        return -1;
    int result = ref_held_locked(self, st, dev, ino, nodeid, gen);
    table_unlock(self, st);
    return result;
}

/* what InodeCache.adopt asks of the cache and its peers for a new fd
 * (cold_lookup): the owner word (peers.mine(fd), 0 without peers),
 * whether another request worker exists (peers.shared: then a found inode
 * is claimed), whether an inserted slot gets a file handle
 * (cache._use_handles and the share root's device) */
struct adopting {
    uint64_t owner;
    int shared, handle;
};

/* whether the worker's fd cache may grow by one here: below
 * cache.max_fds (0: unbounded). InodeCache.reap trims a cache past its
 * bound between batches, and the wait loop in C runs batches without
 * reaping (it returns for a reap only when the table's freed ring moves):
 * at the bound the first LOOKUP is Python's, whose batch ends with the
 * reap that trims */
static int cache_has_room(FastOps *self, const struct state *st)
{
    PyObject *cache = PyObject_GetAttr(self->session, s_cache);
    Py_ssize_t max_fds = -1;
    if (cache != NULL && attr_ssize(cache, s_max_fds, &max_fds) < 0)
        max_fds = -1;
    Py_XDECREF(cache);
    PyErr_Clear();
    return max_fds == 0 || (max_fds > 0 && PyDict_GET_SIZE(st->fds) < max_fds);
}

/* What adopt needs of the cache and its peers, and the cache's bound,
 * read once for a run of lookups (a READDIRPLUS reply, _readdir.h) rather
 * than once per name, or once for a single LOOKUP (cold_lookup): nothing
 * read here changes while C runs (no Python code runs between the lookups
 * of a run that C serves whole; a per-name Python fallback invalidates
 * it); nor while FastOps.wait runs (its sources, peers.serial and .shared,
 * the cache's _use_handles, _root_dev and max_fds, change only in Python
 * outside the wait, as the snapshot's do), so the wait keeps one for all
 * its cold LOOKUPs (kept_once). peers.mine(fd) is serial << 32 | fd, 0 while the serial is 0: C
 * computes it rather than calling into Python (a cold LOOKUP ran that
 * method, interpreter frames and all, on every wake-up for one). */
struct adopt_once {
    int ready;              /* 0: not read yet, 1: read, -1: unreadable (decline) */
    int peers, shared, use_handles, root_dev_ok;
    uint64_t serial, root_dev;
    Py_ssize_t max_fds;     /* -1: unreadable, 0: unbounded */
};

static PyObject *s_serial;

static int once_read(FastOps *self, struct adopt_once *o)
{
    PyObject *cache = PyObject_GetAttr(self->session, s_cache), *peers = NULL, *v = NULL;
    int truth;
    o->ready = -1;
    self->lookup_reads++;
    if (cache == NULL || (peers = PyObject_GetAttr(cache, s_peers)) == NULL)
        goto out;
    o->peers = peers != Py_None;
    o->serial = 0;
    o->shared = 0;
    if (o->peers) {
        if ((v = PyObject_GetAttr(peers, s_serial)) == NULL || !PyLong_CheckExact(v))
            goto out;
        o->serial = PyLong_AsUnsignedLongLong(v);
        Py_CLEAR(v);
        if (PyErr_Occurred() || o->serial > UINT32_MAX || (v = PyObject_GetAttr(peers, s_shared)) == NULL
                || (truth = PyObject_IsTrue(v)) < 0)
            goto out;
        o->shared = truth;
        Py_CLEAR(v);
    }
    if ((v = PyObject_GetAttr(cache, s_use_handles)) == NULL || (truth = PyObject_IsTrue(v)) < 0)
        goto out;
    Py_CLEAR(v);
    o->use_handles = truth;
    o->root_dev_ok = 0;
    if (truth) {
        if ((v = PyObject_GetAttr(cache, s_root_dev)) == NULL || !PyLong_CheckExact(v))
            goto out;
        int overflow;
        long long root_dev = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (root_dev == -1 && PyErr_Occurred())
            goto out;
        o->root_dev_ok = !overflow && root_dev >= 0;
        o->root_dev = (uint64_t)root_dev;
        Py_CLEAR(v);
    }
    if (attr_ssize(cache, s_max_fds, &o->max_fds) < 0 || o->max_fds < 0)
        goto out;
    o->ready = 1;
out:
    Py_XDECREF(v);
    Py_XDECREF(peers);
    Py_XDECREF(cache);
    PyErr_Clear();
    return o->ready;
}

/* cache_has_room with the bound read once; pending: new fds not in the
 * cache yet that count against it (a READDIRPLUS run's, _readdir.h) */
static int once_has_room(FastOps *self, const struct state *st, struct adopt_once *o, Py_ssize_t pending)
{
    if (o->ready == 0)
        once_read(self, o);
    return o->ready > 0 && (o->max_fds == 0 || PyDict_GET_SIZE(st->fds) + pending < o->max_fds);
}

/* adopt's inputs (owner word, shared, file handle) from what once_read read */
static int once_inputs(const struct adopt_once *o, int fd, uint64_t dev, struct adopting *a)
{
    if (o->ready <= 0)
        return -1;
    a->owner = o->peers && o->serial ? (o->serial << 32) | (uint64_t)fd : 0;
    a->shared = o->shared;
    a->handle = o->use_handles && o->root_dev_ok && o->root_dev == dev;
    return 0;
}

/* inodecache.file_handle(fd) into the slot at base (InodeTable.ref stores
 * none, then set_handle the one adopt got): the struct file_handle of
 * name_to_handle_at(fd, "", AT_EMPTY_PATH) with room for 128 bytes, kept
 * when header and handle fit handle_max bytes; else the length 0 */
static void store_handle(FastOps *self, const struct state *st, Py_ssize_t base, int fd)
{
    const struct lookup_table *t = &self->lk;
    union {
        struct file_handle fh;
        unsigned char bytes[8 + 128];
    } u;
    int mount_id;
    u.fh.handle_bytes = 128;
    uint64_t n = 0;
    if (name_to_handle_at(fd, "", &u.fh, &mount_id, AT_EMPTY_PATH) == 0
            && (uint64_t)u.fh.handle_bytes + 8 <= (uint64_t)t->handle_max) {
        n = (uint64_t)u.fh.handle_bytes + 8;
        /* the slot's handle words, as _slot_bytes[off:off + n] = handle */
        memcpy((uint64_t *)st->inodes.b.buf + base + t->s_handle, u.bytes, (size_t)n);
    }
    set_word(&st->inodes, base + t->s_hlen, n);
}

/* InodeCache.adopt's table and cache steps for fd (of the stat s), under
 * the table's locks (the thread lock taken by find_ref): 0 and *nodeid,
 * *gen, and *kept when the fd went into the cache (else the caller closes
 * it), or -1 with the table and the cache as they were */
static int adopt_locked(FastOps *self, struct state *st, int fd, const struct stat *s, const struct adopting *a,
                        uint64_t *nodeid, uint64_t *gen, int *kept)
{
    const struct lookup_table *t = &self->lk;
    const struct words *hd = &st->header, *sl = &st->inodes;
    Py_ssize_t words = sl->b.len / 8, sw = self->slot_words;
    uint64_t pos, g;
    Py_ssize_t n = table_find(self, st, (uint64_t)s->st_dev, (uint64_t)s->st_ino, &pos);
    if (n < 0)
        return -1;
    if (n == 1) {               /* the root: no count, the fd closed */
        *nodeid = 1;
        *gen = 0;
        return 0;
    }
    int fresh = n == 0;
    if (fresh) {
        /* take_slot: the free list's head, else the first never used;
         * the table full (ENFILE) and anything out of range are Python's */
        uint64_t free = word_at(hd, t->h_free), slot = free ? free : word_at(hd, t->h_high);
        if (slot < 2 || slot > t->capacity || ((Py_ssize_t)slot + 1) * sw > words)
            return -1;
        n = (Py_ssize_t)slot;
        g = word_at(hd, t->h_gen) + 1;
    } else {
        g = word_at(sl, n * sw + t->s_gen);
    }
    if (g == 0)
        return -1;
    Py_ssize_t base = n * sw;
    PyObject *key = PyLong_FromSsize_t(n), *entry = NULL;
    uint64_t old_gen = 0;
    int old_fd = -1, has = key == NULL ? -1 : cache_entry(st, key, &old_gen, &old_fd);
    int held = has == 1 && old_gen == g;
    /* the fd goes into the cache first (the one step that can fail, before
     * the table is written): (generation, fd), in the place of a stale
     * entry of the nodeid (whose fd adopt closes) */
    if (has < 0 || (!held && ((entry = Py_BuildValue("(Ki)", (unsigned long long)g, fd)) == NULL
                              || PyDict_SetItem(st->fds, key, entry) < 0))) {
        Py_XDECREF(entry);
        Py_XDECREF(key);
        PyErr_Clear();
        return -1;
    }
    Py_XDECREF(entry);
    Py_XDECREF(key);
    if (has == 1 && !held)
        close(old_fd);
    *kept = !held;
    if (fresh) {
        /* InodeTable.ref's insertion, in its order: the generation last
         * of the slot, then the index entry (a holder that dies in between
         * leaves DIRTY set: the next locker rebuilds from the slots) */
        uint64_t free = word_at(hd, t->h_free);
        if (free)
            set_word(hd, t->h_free, word_at(sl, base + t->s_next));
        else
            set_word(hd, t->h_high, (uint64_t)n + 1);
        set_word(sl, base + t->s_ref, 1);
        set_word(sl, base + t->s_dev, (uint64_t)s->st_dev);
        set_word(sl, base + t->s_ino, (uint64_t)s->st_ino);
        set_word(sl, base + t->s_next, 0);
        set_word(sl, base + t->s_owner, a->owner);
        set_word(sl, base + t->s_hlen, 0);
        if (a->handle)
            store_handle(self, st, base, fd);
        set_word(hd, t->h_gen, g);
        set_word(sl, base + t->s_gen, g);
        __atomic_store_n((uint32_t *)st->hash.b.buf + pos, (uint32_t)n, __ATOMIC_RELAXED);
        set_word(hd, t->h_live, word_at(hd, t->h_live) + 1);
    } else {
        set_word(sl, base + t->s_ref, word_at(sl, base + t->s_ref) + 1);
        /* the last worker to look an inode up owns it (claim) */
        if (!held && a->shared && a->owner)
            set_word(sl, base + t->s_owner, a->owner);
    }
    *nodeid = (uint64_t)n;
    *gen = g;
    return 0;
}

/* openat(parent, name, O_PATH | O_NOFOLLOW | O_CLOEXEC) and fstat of
 * the new fd, the GIL released (cold_lookup's first half): the fd and *s,
 * or -1 and *err */
static int open_entry(int parent, const char *name, struct stat *s, int *err)
{
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(parent, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    *err = errno;
    if (fd >= 0 && fstat(fd, s) != 0) {
        *err = errno;
        close(fd);
        fd = -1;
    }
    Py_END_ALLOW_THREADS
    return fd;
}

/* adopt's steps for fd, new to this worker (of the stat s), under the
 * table's lock: 0 with r's nodeid, generation and attr (the new
 * fd's stat, as Python's), or -1 with the table and the cache as they
 * were; fd is the cache's or closed */
static int adopt_new_fd(FastOps *self, struct state *st, int fd, const struct stat *s, struct entry_reply *r,
                        const struct adopt_once *once)
{
    struct adopting a = {0};
    int kept = 0, result = -1;
    if (fill_attr(&r->attr, s) == 0
            && once_inputs(once, fd, (uint64_t)s->st_dev, &a) == 0
            && st->tlock != NULL && table_lock(self, st) == 0) {
        result = adopt_locked(self, st, fd, s, &a, &r->nodeid, &r->generation, &kept);
        table_unlock(self, st);
    }
    if (!kept)
        close(fd);
    return result;
}

/* InodeCache.lookup of a name whose inode this worker holds no fd of (not
 * in the table, or another's): open_entry, then adopt_new_fd: 0, or -1
 * with the fd closed and the table and the cache as they were (Python
 * then redoes the lookup whole) */
static int cold_lookup_with(FastOps *self, struct state *st, int parent, const char *name, struct entry_reply *r,
                            struct adopt_once *once)
{
    struct adopt_once single = {0};     /* one LOOKUP: read for it alone, or for the wait */
    struct stat s;
    int err;
    if (once == NULL)
        once = self->kept_once != NULL ? self->kept_once : &single;
    if (!once_has_room(self, st, once, 0))
        return -1;
    int fd = open_entry(parent, name, &s, &err);
    return fd < 0 ? -1 : adopt_new_fd(self, st, fd, &s, r, once);
}

static int cold_lookup(FastOps *self, struct state *st, int parent, const char *name, struct entry_reply *r)
{
    return cold_lookup_with(self, st, parent, name, r, NULL);
}

/* names.parse_name's rules for the n bytes at name (the name and its
 * NUL, n >= 2): NUL last and only there, no '/', not "." or ".." (LOOKUP's
 * dots are Python's too); 1 if it passes */
static int one_name(const char *name, Py_ssize_t n)
{
    return name[n - 1] == 0 && memchr(name, 0, (size_t)n - 1) == NULL && memchr(name, '/', (size_t)n - 1) == NULL
           && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

/* fstatat(parent, name, AT_SYMLINK_NOFOLLOW) with the GIL released: 0, or
 * its errno */
static int stat_name(int parent, const char *name, struct stat *s)
{
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    rc = fstatat(parent, name, s, AT_SYMLINK_NOFOLLOW);
    err = errno;
    Py_END_ALLOW_THREADS
    return rc == 0 ? 0 : err;
}

/* the lookup of one valid name (one_name's rules, or a READDIRPLUS entry
 * other than "." and "..") in the directory parent, the found case of
 * LOOKUP: fstatat, then the inode this worker holds (find_ref, no fd
 * opened) or its first lookup here (cold_lookup). 0: found, +1 lookup
 * taken, r's nodeid, generation, timeouts and attr set; > 0: fstatat's
 * errno (or ENOENT from the openat of a LOOKUP opened straight away),
 * nothing taken; -1: declined, nothing taken (Python redoes it).
 * once: adopt's inputs read once for a run of lookups (NULL: per lookup) */
static int found_entry(FastOps *self, struct state *st, int parent, const char *name, struct entry_reply *r,
                       struct adopt_once *once)
{
    struct stat s;
    int got = -1, fd = -1;
    if (once == NULL && self->lk.last_cold) {
        /* the last LOOKUP was of an inode new to this worker: so is this
         * one, likely (a guest walking names after it dropped its caches):
         * opened straight away, no fstatat first (two system calls, not
         * three); if this worker holds it after all, adopt closes the new
         * fd and the next LOOKUP is stat'ed first again. An error other
         * than ENOENT: the stat'ed way below */
        struct adopt_once single = {0}, *one = self->kept_once != NULL ? self->kept_once : &single;
        int err = 0;
        if (once_has_room(self, st, one, 0))
            fd = open_entry(parent, name, &s, &err);
        if (fd < 0 && err == ENOENT)
            return ENOENT;
        if (fd >= 0) {
            if (table_ready(self, st) < 0) {
                close(fd);
                return -1;
            }
            self->lk.last_cold = !held_hint(self, st, &s);
            got = adopt_new_fd(self, st, fd, &s, r, one);
        }
    }
    if (fd < 0) {
        int err = stat_name(parent, name, &s);
        if (err != 0)
            return err;
        if (fill_attr(&r->attr, &s) < 0 || table_ready(self, st) < 0)
            return -1;
        /* which path first: an inode this worker holds (or the root):
         * find_ref, no fd opened; else cold_lookup straight away, one
         * table lock round instead of two */
        got = held_hint(self, st, &s) ? 0 : 1;
        if (once == NULL)
            self->lk.last_cold = got == 1;
        if (got == 0)
            got = find_ref(self, st, (uint64_t)s.st_dev, (uint64_t)s.st_ino, &r->nodeid, &r->generation);
        if (got == 1)
            got = cold_lookup_with(self, st, parent, name, r, once);
    }
    if (got != 0)
        return -1;
    r->entry_valid = r->attr_valid = self->attr_sec;
    r->entry_valid_nsec = r->attr_valid_nsec = self->attr_nsec;
    return 0;
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
    if (!one_name(name, nargs))
        return NOT_HANDLED;
    int parent = cached_fd(self, st, h->nodeid);
    if (parent < 0)
        return NOT_HANDLED;
    struct entry_reply r;
    memset(&r, 0, sizeof r);
    r.len = sizeof r;
    r.unique = h->unique;
    int err = found_entry(self, st, parent, name, &r, NULL);
    if (err < 0)
        return NOT_HANDLED;
    if (err > 0) {
        if (err != ENOENT)
            return NOT_HANDLED;
        if (!self->lk.negative)
            return error_reply(q, h->unique, err, error);
        /* Timeouts.negative_entry: nodeid 0, the entry timeout, no count */
        r.entry_valid = self->attr_sec;
        r.entry_valid_nsec = self->attr_nsec;
    }
    /* serve_req checked the room: this write cannot fail once a count is taken */
    return iov_copy(q->w, q->nw, 0, &r, sizeof r, 1) < 0 ? NOT_HANDLED : (Py_ssize_t)sizeof r;
}

/* enable_lookup(hash, lock, tlock, capacity, layout, negative): see fastops_methods */
static PyObject *fastops_enable_lookup(FastOps *self, PyObject *args)
{
    PyObject *hash, *tlock, *lock;
    int negative;
    Py_ssize_t capacity, w[14];
    if (!PyArg_ParseTuple(args, "OOOn(nnnnnnnnnnnnnn)p", &hash, &lock, &tlock, &capacity, &w[0], &w[1], &w[2], &w[3],
                          &w[4], &w[5], &w[6], &w[7], &w[8], &w[9], &w[10], &w[11], &w[12], &w[13], &negative))
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(hash, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t entries = b.len / 4;
    PyBuffer_Release(&b);
    /* header words: dirty, free, high, gen, live; slot words: gen, ref,
     * dev, ino, next, hlen, owner, then handle_max bytes from handle */
    Py_ssize_t header[] = {w[0], w[5], w[6], w[7], w[8]}, slot[] = {w[1], w[2], w[3], w[4], w[9], w[10], w[11]};
    int bad = capacity < 1 || capacity >= (Py_ssize_t)1 << 31 || entries < 2 * (capacity + 1)
              || (entries & (entries - 1)) || w[12] < 0 || w[13] < 8 || w[13] > 128 || (w[13] & 7)
              || w[12] + w[13] / 8 > self->slot_words;
    Py_ssize_t last = 0;
    for (size_t i = 0; i < sizeof header / sizeof header[0]; i++) {
        bad |= header[i] < 0 || header[i] >= 16;
        last = header[i] > last ? header[i] : last;
    }
    for (size_t i = 0; i < sizeof slot / sizeof slot[0]; i++)
        bad |= slot[i] < 0 || slot[i] >= self->slot_words || (slot[i] >= w[12] && slot[i] < w[12] + w[13] / 8);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_lookup: bad inode table layout");
        return NULL;
    }
    if (table_locking_set(&self->lk.lock, lock) < 0)
        return NULL;
    Py_INCREF(hash);
    Py_INCREF(tlock);
    Py_XSETREF(self->lk.hash, hash);
    Py_XSETREF(self->lk.tlock, tlock);
    self->lk.capacity = (uint64_t)capacity;
    self->lk.hmask = (uint64_t)entries - 1;
    self->lk.h_dirty = w[0];
    self->lk.s_gen = w[1];
    self->lk.s_ref = w[2];
    self->lk.s_dev = w[3];
    self->lk.s_ino = w[4];
    self->lk.h_free = w[5];
    self->lk.h_high = w[6];
    self->lk.h_gen = w[7];
    self->lk.h_live = w[8];
    self->lk.s_next = w[9];
    self->lk.s_hlen = w[10];
    self->lk.s_owner = w[11];
    self->lk.s_handle = w[12];
    self->lk.handle_max = w[13];
    self->lk.h_last = last;
    self->lk.negative = negative;
    Py_RETURN_NONE;
}
