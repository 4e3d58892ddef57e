/*
 * TableLock: the lock of a table in shared memory (inodes.py's InodeTable,
 * filetable.py's FileTable) that costs no system call when nobody holds
 * it; included by _fastops.c. docs/compiled.md, "The table lock without a
 * system call", says why; filetable.LockedTable says when it is used (the
 * extension built and not PYVIRTIOFSD_PURE: every process of the daemon
 * then locks this way; otherwise every one takes the POSIX record lock on
 * byte 0 of the memfd, record_lock below).
 *
 * The lock word (the low half of a header word) is 0 when free, else the
 * holder's id, with WAITERS set once someone sleeps on it:
 *   - take: compare-and-swap 0 -> id (acquire); on failure spin a little,
 *     then set WAITERS and FUTEX_WAIT (shared, not private: the word is in
 *     a MAP_SHARED memfd several processes map) for at most LOCK_WAIT_MS;
 *     after a sleep the lock is taken with WAITERS set (others may sleep);
 *   - give: exchange with 0 (release); FUTEX_WAKE one if WAITERS was set.
 * A process's id comes from the table's id counter (another header word,
 * incremented atomically), once per process (after a fork the child
 * takes a new one: fork_epoch), and is never reused. Before its first use
 * the process takes a POSIX record lock on byte LIVE_BASE + id of the
 * memfd and keeps it for life: the kernel drops it when the process dies,
 * however it dies. A waiter whose sleep times out looks at that byte of
 * the holder's id (F_SETLK, never waiting: taken means the holder is
 * dead; it is given back at once); a dead holder's lock is taken over by
 * compare-and-swap, so only one waiter wins. The table's DIRTY word then
 * tells the new holder to repair (LockedTable._lock; C leaves it to
 * Python), exactly as after a record lock the kernel dropped.
 *
 * Threads: the lock is per process, as the record lock is; the table's
 * thread lock (LockedTable._tlock, taken first everywhere) keeps two
 * threads of one process out of each other's way, so a process never
 * waits for its own id (that would be a bug: EDEADLK, not a wait).
 *
 * Why not glibc's robust process-shared mutex: its lock word holds the
 * owner's thread id, and our workers live in separate pid namespaces
 * (each is PID 1 of its own): two workers' ids collide, and the kernel's
 * robust-list clean-up of a dying worker can mark a lock held by another
 * as its own.
 */

#include <linux/futex.h>
#include <pthread.h>

#define LOCK_WAITERS 0x80000000u
#define LOCK_ID_MASK 0x7fffffffu
#define LOCK_SPINS 64
#define LOCK_WAIT_MS 20                 /* then the holder's byte is looked at (TableLock's wait_ms) */
#define LOCK_LIVE_BASE ((off_t)1 << 40) /* record lock bytes of the holders' ids, past any table */

/* bumped in every child of a fork: a TableLock taken before the fork has
 * no liveness byte in the child (record locks are not inherited) */
static unsigned int fork_epoch;

static void tablelock_after_fork(void) { fork_epoch++; }

/* this process's id on each table it has locked, by the memfd's inode:
 * every TableLock of one table in one process has the same id (a process
 * cannot tell its own record locks from a dead one's free byte, so it
 * must never wait for a second id of its own) */
struct own_id {
    dev_t dev;
    ino_t ino;
    uint32_t id;
    unsigned int epoch;
    unsigned int users;     /* TableLocks with this id: the entry is free at 0 (their close) */
};
static struct own_id *own_ids;  /* grown as needed (a worker has two tables; tests make many) */
static size_t own_ids_len;

typedef struct {
    PyObject_HEAD
    Py_buffer header;       /* the table's header words, held until close() */
    uint32_t *word;         /* the lock word */
    uint32_t *ids;          /* the id counter */
    int fd;                 /* the table's memfd: the liveness bytes */
    dev_t dev;              /* its inode: own_ids' key */
    ino_t ino;
    uint32_t id;            /* this process's id, 0 before its first lock */
    unsigned int epoch;     /* fork_epoch when id was taken */
    size_t own;             /* its entry in own_ids + 1 (0: none; with the GIL) */
    unsigned long long takeovers;   /* locks taken from a dead holder (tests) */
    long wait_ns;           /* a sleep's limit before the holder's byte is looked at */
} TableLock;

static PyTypeObject TableLockType;

static long futex_call(uint32_t *word, int op, uint32_t val, const struct timespec *timeout)
{
    return syscall(SYS_futex, word, op, val, timeout, NULL, 0);
}

/* F_SETLK (never waiting) of byte LOCK_LIVE_BASE + id: 0, or -1 (errno) */
static int live_byte(int fd, uint32_t id, short type)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = LOCK_LIVE_BASE + id, .l_len = 1};
    return fcntl(fd, F_SETLK, &fl);
}

/* this process's id on the table, taken with its liveness byte on first
 * use (after a fork too): 0, or -1 with errno (the counter spent:
 * EOVERFLOW; no memory: ENOMEM) */
static int tablelock_own_id(TableLock *l)
{
    if (l->id != 0 && l->epoch == fork_epoch)
        return 0;
    struct own_id *slot = NULL;
    for (size_t i = 0; i < own_ids_len; i++) {
        struct own_id *o = &own_ids[i];
        int live = o->users > 0 && o->epoch == fork_epoch;
        if (live && o->dev == l->dev && o->ino == l->ino) {
            o->users++;
            l->own = i + 1;
            l->id = o->id;
            l->epoch = fork_epoch;
            return 0;
        }
        if (slot == NULL && !live)
            slot = o;
    }
    if (slot == NULL) {
        size_t len = own_ids_len ? 2 * own_ids_len : 4;
        struct own_id *more = realloc(own_ids, len * sizeof *more);
        if (more == NULL) {
            errno = ENOMEM;
            return -1;
        }
        memset(more + own_ids_len, 0, (len - own_ids_len) * sizeof *more);
        slot = more + own_ids_len;
        own_ids = more;
        own_ids_len = len;
    }
    for (;;) {
        uint32_t id = __atomic_add_fetch(l->ids, 1, __ATOMIC_RELAXED);
        if (id == 0 || id > LOCK_ID_MASK) {
            errno = EOVERFLOW;
            return -1;
        }
        if (live_byte(l->fd, id, F_WRLCK) == 0) {
            l->id = slot->id = id;
            l->epoch = slot->epoch = fork_epoch;
            slot->dev = l->dev;
            slot->ino = l->ino;
            slot->users = 1;
            l->own = (size_t)(slot - own_ids) + 1;
            return 0;
        }
        if (errno != EAGAIN && errno != EACCES)
            return -1;
        /* someone holds that byte (a table made before this counter was
         * reset?): never ours, take the next */
    }
}

/* whether the process of id still lives: 1, 0 (its liveness byte is
 * free: dead), 1 too when that cannot be told (never a takeover on doubt) */
static int holder_alive(int fd, uint32_t id)
{
    if (live_byte(fd, id, F_WRLCK) != 0)
        return 1;
    live_byte(fd, id, F_UNLCK);
    return 0;
}

/* the wait, GIL released: 0 taken, 1 taken over from a dead holder, -1
 * with errno */
static int tablelock_wait(TableLock *l)
{
    uint32_t *w = l->word, mine = l->id | LOCK_WAITERS;
    int spins = 0;
    for (;;) {
        uint32_t v = __atomic_load_n(w, __ATOMIC_RELAXED);
        if (v == 0) {
            if (__atomic_compare_exchange_n(w, &v, mine, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                return 0;
            continue;
        }
        if ((v & LOCK_ID_MASK) == l->id) {
            errno = EDEADLK;
            return -1;
        }
        if (spins < LOCK_SPINS) {
            spins++;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        if (!(v & LOCK_WAITERS)) {
            uint32_t flagged = v | LOCK_WAITERS;
            if (!__atomic_compare_exchange_n(w, &v, flagged, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                continue;
            v = flagged;
        }
        struct timespec ts = {l->wait_ns / 1000000000L, l->wait_ns % 1000000000L};
        if (futex_call(w, FUTEX_WAIT, v, &ts) == 0 || errno == EAGAIN || errno == EINTR)
            continue;
        if (errno != ETIMEDOUT)
            return -1;
        /* a holder for 20 ms: still alive? */
        if (__atomic_load_n(w, __ATOMIC_RELAXED) == v && !holder_alive(l->fd, v & LOCK_ID_MASK)
                && __atomic_compare_exchange_n(w, &v, mine, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            l->takeovers++;
            return 1;
        }
    }
}

/* the lock taken (GIL held on entry and return, released while waiting):
 * 0, 1 (taken over from a dead holder: DIRTY may be set), or -1 with
 * errno and nothing held */
static int tablelock_take(TableLock *l)
{
    if (l->word == NULL) {
        errno = EBADF;
        return -1;
    }
    if (tablelock_own_id(l) < 0)
        return -1;
    uint32_t free_word = 0;
    if (__atomic_compare_exchange_n(l->word, &free_word, l->id, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return 0;
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    rc = tablelock_wait(l);
    err = errno;
    Py_END_ALLOW_THREADS
    errno = err;
    return rc;
}

/* the lock given back (after tablelock_take), a sleeper woken if any */
static void tablelock_give(TableLock *l)
{
    if (l->word != NULL && (__atomic_exchange_n(l->word, 0, __ATOMIC_RELEASE) & LOCK_WAITERS))
        futex_call(l->word, FUTEX_WAKE, 1, NULL);
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

/* how a FastOps conf locks one table: its TableLock, or (NULL) the record
 * lock on fd (-1: private memory, nothing to lock between processes) */
struct table_locking {
    TableLock *shared;
    int fd;
};

/* from LockedTable.lock_handle(): a TableLock, or an int fd; 0, or -1
 * with a Python error */
static int table_locking_set(struct table_locking *t, PyObject *handle)
{
    if (Py_IS_TYPE(handle, &TableLockType)) {
        Py_INCREF(handle);
        Py_XSETREF(t->shared, (TableLock *)handle);
        t->fd = -1;
        return 0;
    }
    long fd = PyLong_Check(handle) ? PyLong_AsLong(handle) : -2;
    if (fd < -1 || fd > INT32_MAX) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a table's lock: a TableLock or an fd");
        return -1;
    }
    Py_CLEAR(t->shared);
    t->fd = (int)fd;
    return 0;
}

/* the table's lock taken: 0, or -1 (nothing held; the request is then
 * Python's, whose _lock repairs after a takeover as after a dead record
 * lock holder) */
static int table_locking_take(const struct table_locking *t)
{
    if (t->shared != NULL)
        return tablelock_take(t->shared) < 0 ? -1 : 0;
    return record_lock(t->fd, F_WRLCK);
}

static void table_locking_give(const struct table_locking *t)
{
    if (t->shared != NULL)
        tablelock_give(t->shared);
    else
        record_lock(t->fd, F_UNLCK);
}

/* ---- the Python type ------------------------------------------------------ */

/* TableLock(header, lock_word, id_word, fd, wait_ms=LOCK_WAIT_MS) */
static int tablelock_init(TableLock *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"header", "lock_word", "id_word", "fd", "wait_ms", NULL};
    PyObject *header;
    Py_ssize_t lock_word, id_word;
    int fd, wait_ms = LOCK_WAIT_MS;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onni|i", names, &header, &lock_word, &id_word, &fd, &wait_ms))
        return -1;
    if (wait_ms < 1 || wait_ms > 3600000) {
        PyErr_SetString(PyExc_ValueError, "TableLock: wait_ms must be 1..3600000");
        return -1;
    }
    if (self->word != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "TableLock already made");
        return -1;
    }
    if (PyObject_GetBuffer(header, &self->header, PyBUF_WRITABLE) < 0)
        return -1;
    Py_ssize_t words = self->header.len / 8;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || lock_word < 0 || id_word < 0 || lock_word == id_word || lock_word >= words || id_word >= words
            || ((uintptr_t)self->header.buf & 7)) {
        PyBuffer_Release(&self->header);
        PyErr_SetString(PyExc_ValueError, "TableLock: bad header words or fd");
        return -1;
    }
    /* the low half of each u64 word: the word's value as Python reads it */
    int low = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? 0 : 1;
    self->word = (uint32_t *)((uint64_t *)self->header.buf + lock_word) + low;
    self->ids = (uint32_t *)((uint64_t *)self->header.buf + id_word) + low;
    self->fd = fd;
    self->wait_ns = wait_ms * 1000000L;
    self->dev = st.st_dev;
    self->ino = st.st_ino;
    return 0;
}

static PyObject *tablelock_close(TableLock *self, PyObject *unused)
{
    if (self->own != 0 && self->epoch == fork_epoch && own_ids[self->own - 1].users > 0)
        own_ids[self->own - 1].users--;
    self->own = 0;
    self->id = 0;
    if (self->word != NULL) {
        self->word = self->ids = NULL;
        PyBuffer_Release(&self->header);
    }
    Py_RETURN_NONE;
}

static void tablelock_dealloc(TableLock *self)
{
    tablelock_close(self, NULL);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *tablelock_acquire(TableLock *self, PyObject *unused)
{
    for (;;) {
        int rc = tablelock_take(self);
        if (rc >= 0)
            return PyBool_FromLong(rc);
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

static PyObject *tablelock_release(TableLock *self, PyObject *unused)
{
    tablelock_give(self);
    Py_RETURN_NONE;
}

static PyObject *tablelock_get_holder(TableLock *self, void *c)
{
    return PyLong_FromUnsignedLong(self->word != NULL ? __atomic_load_n(self->word, __ATOMIC_RELAXED) & LOCK_ID_MASK : 0);
}

static PyObject *tablelock_get_id(TableLock *self, void *c)
{
    return PyLong_FromUnsignedLong(self->epoch == fork_epoch ? self->id : 0);
}

static PyObject *tablelock_get_takeovers(TableLock *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->takeovers);
}

static PyMethodDef tablelock_methods[] = {
    {"acquire", (PyCFunction)tablelock_acquire, METH_NOARGS,
     "acquire() -> True if taken over from a dead holder (the table may need its repair), else False"},
    {"release", (PyCFunction)tablelock_release, METH_NOARGS, "release()"},
    {"close", (PyCFunction)tablelock_close, METH_NOARGS, "close(): let go of the header (the table's close)"},
    {NULL},
};

static PyGetSetDef tablelock_getset[] = {
    {"holder", (getter)tablelock_get_holder, NULL, "the holder's id, 0 when free", NULL},
    {"id", (getter)tablelock_get_id, NULL, "this process's id, 0 before its first lock", NULL},
    {"takeovers", (getter)tablelock_get_takeovers, NULL, "locks this object took from dead holders", NULL},
    {NULL},
};

static PyTypeObject TableLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.fuse._fastops.TableLock",
    .tp_basicsize = sizeof(TableLock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TableLock(header, lock_word, id_word, fd, wait_ms=20): a shared table's lock, no system call "
              "when free; a waiter looks at the holder's liveness byte after each wait_ms asleep (_tablelock.h)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tablelock_init,
    .tp_dealloc = (destructor)tablelock_dealloc,
    .tp_methods = tablelock_methods,
    .tp_getset = tablelock_getset,
};
