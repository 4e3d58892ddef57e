/*
 * FORGET and BATCH_FORGET in C (docs/compiled.md, "FORGET in C"), included
 * by _fastops.c after _lookup.h (one translation unit: it uses the table
 * layout (FastOps.lk), table_lock and table_unlock, table_home, word_at and set_word of
 * _lookup.h, and the request helpers of _fastops.c). The reference is
 * FuseSession._handle for the hiprio role, entries.do_forget and
 * do_batch_forget, and InodeTable.unref / unref_many / _unref_locked /
 * _hash_remove.
 *
 * Only for a FastOps on which enable_forget was called (fastpath.make for
 * the hiprio session, after enable_lookup with the same table): such a
 * FastOps serves FORGET and BATCH_FORGET and nothing else (every other
 * request, INTERRUPT included, is Python's). Served when:
 *   - the readable part is header.len bytes with the whole header in its
 *     first buffer (serve_req's checks), args at most MAX_ARGS, no request
 *     extensions (Python cuts them off the args: rare, left to it);
 *   - the session's meter is None or the one C counts for (as for every op);
 *   - FORGET: any args (fewer than 8 bytes: nothing to do, as Python's
 *     "short args are ignored"; else the first 8 are nlookup);
 *   - BATCH_FORGET: at least the 8-byte fuse_batch_forget_in and a count
 *     that is exactly the body (count * 16 bytes): a mismatch is Python's
 *     (it logs the rate-limited warning and ignores the batch); count 0
 *     with no body is served (nothing to do).
 * No session check: the hiprio session has none (its _session stays 0).
 * The writable part is not looked at: no reply, the used element's length
 * is 0, as payload(None) returns.
 *
 * Then, exactly InodeTable.unref / unref_many: a FORGET of nodeid < 2 or
 * > capacity or nlookup 0 does nothing and takes no lock; otherwise (and
 * for a BATCH_FORGET with count > 0, even if every pair is out of range:
 * unref_many locks) under the table's locks (the thread lock, taken
 * without waiting and kept for the call as LOOKUP's; the table lock per
 * chain; DIRTY found set: declined, Python's _lock repairs), for each
 * (nodeid, nlookup) with 2 <= nodeid <= capacity and nlookup > 0 and a
 * live slot (generation non-zero): nlookup below the count: count -=
 * nlookup; else the slot is freed in _unref_locked's order (generation 0,
 * the index entry removed by backward shift, count 0, handle length 0,
 * owner word 0, next = the free list's head, head = nodeid, live - 1, the
 * freed ring's entry at cursor % RING = nodeid, cursor + 1: the request
 * workers' reap closes their fds of it).
 *
 * In the batch loop the chain is taken from the ring (and recorded in the
 * progress record) after the locks are held and before the first count is
 * changed, as a WRITE's: a worker that dies in between leaves it taken
 * (its successor answers it, FORGET has no answer to give), never served
 * twice (two decrements for one FORGET would free an inode the guest still
 * holds). A holder that dies mid-update leaves DIRTY set, as Python's.
 */

#define OP_FORGET 2
#define OP_BATCH_FORGET 42
#define FORGET_IN 8             /* abi.FORGET_IN */
#define BATCH_FORGET_IN 8       /* abi.BATCH_FORGET_IN */
#define FORGET_ONE 16           /* abi.FORGET_ONE */

/* the op's index in the meter's forget words, -1 if it is not one */
static int forget_slot(uint32_t opcode)
{
    return opcode == OP_FORGET ? 0 : opcode == OP_BATCH_FORGET ? 1 : -1;
}

/* InodeTable._hash_remove(slot) under the lock: the index entry of slot
 * (found from the home of its dev/ino) removed by backward shift, no
 * tombstone. As Python, nothing is removed if the probe reaches an empty
 * entry first; an entry naming a slot outside the table (never written
 * by either path) stays where it is */
static void forget_unindex(FastOps *self, const struct state *st, uint64_t slot)
{
    const struct lookup_table *t = &self->lk;
    uint32_t *h = st->hash.b.buf;
    uint64_t mask = t->hmask, sw = (uint64_t)self->slot_words, words = (uint64_t)st->inodes.b.len / 8;
    uint64_t base = slot * sw;
    uint64_t i = table_home(word_at(&st->inodes, (Py_ssize_t)(base + t->s_dev)),
                            word_at(&st->inodes, (Py_ssize_t)(base + t->s_ino)), mask);
    uint64_t n = 0;
    for (; __atomic_load_n(h + i, __ATOMIC_RELAXED) != slot; i = (i + 1) & mask)
        if (!__atomic_load_n(h + i, __ATOMIC_RELAXED) || ++n > mask)
            return;
    uint64_t j = i;
    for (n = 0; n <= mask; n++) {
        j = (j + 1) & mask;
        uint64_t s = __atomic_load_n(h + j, __ATOMIC_RELAXED);
        if (!s)
            break;
        if (s > t->capacity || (s + 1) * sw > words)
            continue;
        uint64_t k = table_home(word_at(&st->inodes, (Py_ssize_t)(s * sw + t->s_dev)),
                                word_at(&st->inodes, (Py_ssize_t)(s * sw + t->s_ino)), mask);
        /* s may move into the hole at i unless its home lies cyclically in (i, j] */
        if (i <= j ? (i < k && k <= j) : (k > i || k <= j))
            continue;
        __atomic_store_n(h + i, (uint32_t)s, __ATOMIC_RELAXED);
        i = j;
    }
    __atomic_store_n(h + i, 0, __ATOMIC_RELAXED);
}

/* InodeTable._unref_locked(nodeid, nlookup), the caller having checked
 * 2 <= nodeid <= capacity (and the slot inside the held view) and
 * nlookup > 0 */
static void forget_one(FastOps *self, const struct state *st, uint64_t nodeid, uint64_t nlookup)
{
    const struct lookup_table *t = &self->lk;
    const struct words *hd = &st->header, *sl = &st->inodes;
    Py_ssize_t base = (Py_ssize_t)nodeid * self->slot_words;
    if (!word_at(sl, base + t->s_gen))
        return;
    uint64_t refs = word_at(sl, base + t->s_ref);
    if (nlookup < refs) {
        set_word(sl, base + t->s_ref, refs - nlookup);
        return;
    }
    set_word(sl, base + t->s_gen, 0);     /* dead from here on */
    forget_unindex(self, st, nodeid);
    set_word(sl, base + t->s_ref, 0);
    set_word(sl, base + t->s_hlen, 0);
    set_word(sl, base + t->s_owner, 0);
    set_word(sl, base + t->s_next, word_at(hd, t->h_free));
    set_word(hd, t->h_free, nodeid);
    set_word(hd, t->h_live, word_at(hd, t->h_live) - 1);
    uint64_t w = word_at(hd, self->fg.ring_w);
    __atomic_store_n((uint32_t *)st->ring.b.buf + w % (uint64_t)self->fg.ring_len, (uint32_t)nodeid,
                     __ATOMIC_RELAXED);
    set_word(hd, self->fg.ring_w, w + 1);
}

/* the views FORGET writes held (the inode table's header, slots, index
 * and freed ring, each checked against the layout once per call) and the
 * thread lock taken for the call (take_tlock, as table_ready's); 0, or
 * -1 (the request is then Python's) */
static int forget_ready(FastOps *self, struct state *st)
{
    const struct lookup_table *t = &self->lk;
    if ((!st->header.held && hold_words(self->header, &st->header) < 0)
            || (!st->inodes.held && hold_words(self->slots, &st->inodes) < 0)
            || (!st->hash.held && hold_words(t->hash, &st->hash) < 0)
            || (!st->ring.held && hold_words(self->fg.ring, &st->ring) < 0))
        return -1;
    if (st->hash.b.len / 4 <= (Py_ssize_t)t->hmask || ((uintptr_t)st->hash.b.buf & 3)
            || st->header.b.len / 8 <= (t->h_last > self->fg.ring_w ? t->h_last : self->fg.ring_w)
            || ((uintptr_t)st->header.b.buf & 7) || ((uintptr_t)st->inodes.b.buf & 7)
            || st->ring.b.len / 4 < self->fg.ring_len || ((uintptr_t)st->ring.b.buf & 3)
            || st->inodes.b.len / 8 < ((Py_ssize_t)t->capacity + 1) * self->slot_words)
        return -1;
    return take_tlock(t, st);
}

/* FORGET or BATCH_FORGET (serve_req has checked the header and len);
 * NOT_HANDLED (nothing done) or 0: served, no reply */
static Py_ssize_t fast_forget(FastOps *self, struct state *st, const struct req *q, const struct in_header *h)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    uint64_t cap = self->lk.capacity;
    if (h->total_extlen || nargs > MAX_ARGS)
        return NOT_HANDLED;
    if (h->opcode == OP_FORGET) {
        uint64_t nlookup = 0;
        if (nargs < FORGET_IN)
            return 0;       /* short args: ignored */
        if (iov_copy(q->r, q->nr, IN_HEADER, &nlookup, sizeof nlookup, 0) < 0)
            return NOT_HANDLED;
        if (h->nodeid < 2 || h->nodeid > cap || nlookup == 0)
            return 0;       /* unref's early return: no lock */
        if (forget_ready(self, st) < 0 || table_lock(self, st) < 0)
            return NOT_HANDLED;
        if (q->take != NULL)
            take_chain(q->take);
        forget_one(self, st, h->nodeid, nlookup);
        table_unlock(self, st);
        return 0;
    }
    struct { uint32_t count, dummy; } in;
    if (nargs < BATCH_FORGET_IN)
        return 0;           /* short args: ignored */
    if (iov_copy(q->r, q->nr, IN_HEADER, &in, sizeof in, 0) < 0)
        return NOT_HANDLED;
    if ((uint64_t)in.count * FORGET_ONE != (uint64_t)(nargs - BATCH_FORGET_IN))
        return NOT_HANDLED; /* Python warns and ignores it */
    if (in.count == 0)
        return 0;
    if (forget_ready(self, st) < 0 || table_lock(self, st) < 0)
        return NOT_HANDLED;
    if (q->take != NULL)
        take_chain(q->take);
    /* the pairs, copied out of guest memory one at a time (each copy is
     * what is used) and applied in order, all under this one lock as
     * unref_many's */
    Py_ssize_t off = IN_HEADER + BATCH_FORGET_IN;
    for (uint32_t i = 0; i < in.count; i++, off += FORGET_ONE) {
        uint64_t pair[2];
        if (iov_copy(q->r, q->nr, off, pair, sizeof pair, 0) < 0)
            break;          /* not reached: rsize == len was checked */
        if (pair[0] >= 2 && pair[0] <= cap && pair[1] > 0)
            forget_one(self, st, pair[0], pair[1]);
    }
    table_unlock(self, st);
    return 0;
}

/* enable_forget(ring, ring_w, ring_len, layout): see fastops_methods */
static PyObject *fastops_enable_forget(FastOps *self, PyObject *args)
{
    PyObject *ring, *layout;
    Py_ssize_t ring_w, ring_len, v[2][4];
    if (!PyArg_ParseTuple(args, "OnnO", &ring, &ring_w, &ring_len, &layout))
        return NULL;
    if (self->lk.hash == NULL) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_forget: enable_lookup first (the table's layout)");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(ring, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t entries = b.len / 4;
    PyBuffer_Release(&b);
    if (ring_w < 0 || ring_w >= 16 || ring_len < 1 || ring_len > entries) {
        PyErr_SetString(PyExc_ValueError, "FastOps.enable_forget: bad freed-ring layout");
        return NULL;
    }
    if (self->meter != NULL) {
        if (!PyTuple_Check(layout)
                || !PyArg_ParseTuple(layout, "(nnnn)(nnnn)", &v[0][0], &v[0][1], &v[0][2], &v[0][3], &v[1][0],
                                     &v[1][1], &v[1][2], &v[1][3])) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "FastOps.enable_forget: a meter needs the ops' word indices");
            return NULL;
        }
        const struct meter *m = &self->m;
        Py_ssize_t n = m->words.len / 8;
        for (int i = 0; i < 2; i++)
            if (v[i][0] < 0 || v[i][0] >= n || v[i][1] < 0 || v[i][1] >= n || v[i][2] < 0
                    || v[i][2] > n - m->nbounds - 1 || v[i][3] < 0 || v[i][3] > n - m->errno_slots) {
                PyErr_SetString(PyExc_ValueError, "FastOps.enable_forget: metrics layout outside the slot");
                return NULL;
            }
        for (int i = 0; i < 2; i++)
            self->m.forget[i] = (struct op_words){v[i][0], v[i][1], v[i][2], v[i][3]};
    }
    Py_INCREF(ring);
    Py_XSETREF(self->fg.ring, ring);
    self->fg.ring_w = ring_w;
    self->fg.ring_len = ring_len;
    Py_RETURN_NONE;
}
