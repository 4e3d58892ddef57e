/*
 * The closer thread (docs/compiled.md, "The closer thread"), included by
 * _fastops.c. The reference is FuseSession._close_later on blocking.py's
 * helper threads.
 *
 * A request worker closes the O_PATH fds of inodes the guest forgot
 * (InodeCache.reap) off its serving thread: the last close of an unlinked
 * file is where the host evicts it (truncate, a synchronous discard on a
 * `-o discard` mount), which would stall the guest's next request. On
 * blocking.py's Python threads each such close costs GIL hand-offs: in a
 * guest unlinking files on two request queues, each worker's serving
 * thread and three helpers traded the GIL about ten futex calls per file,
 * 1.5 wake-ups per file more than the Rust daemon's (docs/perf/queues.md,
 * "Where the cold unlink's wake-ups went"). This thread is plain C: it
 * never takes the GIL, and the serving thread hands it fds with a mutex
 * held for a few stores.
 *
 * close_later(fds): queue the ints of the sequence `fds` (each >= 0, else
 * ValueError before any is queued) for the closer thread, started on the
 * first call with every signal blocked (so Python's handlers keep running
 * on the main thread). What does not fit the queue (CLOSER_QUEUE pending),
 * or every fd if no thread could start, is closed here, with the GIL
 * released. Woken from an empty queue, the thread sleeps 5 ms before it
 * takes the fds, so that those of a run of FORGETs are closed in one
 * wake-up rather than one each. The thread never exits: a worker ends
 * with os._exit.
 * closer_stats() -> (pending, closed, state): fds not yet closed (queued
 * or being closed), fds the thread closed, and 0 not started / 1 running / -1 could not start (tests).
 * No new system call: close, futex, clock_nanosleep (nanosleep), and what
 * glibc's pthread_create makes
 * (clone with CLONE_THREAD, mmap, mprotect, set_robust_list, rseq,
 * rt_sigprocmask), as for CPython's own threads (policy/request.policy).
 */

#include <pthread.h>
#include <signal.h>

#define CLOSER_QUEUE 4096   /* fds pending; more are closed by the caller */
#define CLOSER_TAKE 64      /* fds the thread takes per turn of its lock */
#define CLOSER_GATHER_NS 5000000L   /* woken, the thread lets fds gather this long */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int fds[CLOSER_QUEUE];  /* a ring: head, then count */
    unsigned head, count;
    unsigned closing;       /* taken by the thread, not yet closed */
    int state;              /* 0 not started, 1 running, -1 could not start */
    unsigned long long closed;
} closer = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void *closer_main(void *unused)
{
    int mine[CLOSER_TAKE];
    (void)unused;
    pthread_mutex_lock(&closer.mu);
    for (;;) {
        if (closer.count == 0) {
            while (closer.count == 0)
                pthread_cond_wait(&closer.cv, &closer.mu);
            /* a guest removing files forgets them one by one: let the
             * next ones gather, one wake-up for a few (an evicted file's
             * space comes back up to 5 ms later) */
            struct timespec gather = {0, CLOSER_GATHER_NS};
            pthread_mutex_unlock(&closer.mu);
            nanosleep(&gather, NULL);
            pthread_mutex_lock(&closer.mu);
        }
        unsigned n = closer.count < CLOSER_TAKE ? closer.count : CLOSER_TAKE;
        for (unsigned i = 0; i < n; i++)
            mine[i] = closer.fds[(closer.head + i) % CLOSER_QUEUE];
        closer.head = (closer.head + n) % CLOSER_QUEUE;
        closer.count -= n;
        closer.closing = n;
        pthread_mutex_unlock(&closer.mu);
        for (unsigned i = 0; i < n; i++)
            close(mine[i]);
        pthread_mutex_lock(&closer.mu);
        closer.closing = 0;
        closer.closed += n;
    }
    return NULL;
}

/* called with closer.mu held */
static void closer_start(void)
{
    sigset_t all, old;
    pthread_t t;
    pthread_attr_t attr;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int ok = pthread_attr_init(&attr) == 0;
    if (ok) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        ok = pthread_create(&t, &attr, closer_main, NULL) == 0;
        pthread_attr_destroy(&attr);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    closer.state = ok ? 1 : -1;
}

static PyObject *fastops_close_later(PyObject *module, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "close_later: fds is not a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int *fds = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *fds);
    if (fds == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(fds);
            Py_DECREF(seq);
            return NULL;
        }
        if (v < 0 || v > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "close_later: not an fd");
            PyMem_Free(fds);
            Py_DECREF(seq);
            return NULL;
        }
        fds[i] = (int)v;
    }
    Py_DECREF(seq);
    Py_ssize_t queued = 0;
    pthread_mutex_lock(&closer.mu);
    if (closer.state == 0 && n > 0)
        closer_start();
    if (closer.state == 1) {
        while (queued < n && closer.count < CLOSER_QUEUE) {
            closer.fds[(closer.head + closer.count) % CLOSER_QUEUE] = fds[queued++];
            closer.count++;
        }
        if (queued)
            pthread_cond_signal(&closer.cv);
    }
    pthread_mutex_unlock(&closer.mu);
    if (queued < n) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = queued; i < n; i++)
            close(fds[i]);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(fds);
    Py_RETURN_NONE;
}

static PyObject *fastops_closer_stats(PyObject *module, PyObject *unused)
{
    pthread_mutex_lock(&closer.mu);
    unsigned pending = closer.count + closer.closing;
    unsigned long long closed = closer.closed;
    int state = closer.state;
    pthread_mutex_unlock(&closer.mu);
    return Py_BuildValue("(IKi)", pending, closed, state);
}
