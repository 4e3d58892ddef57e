/*
 * Polling in the wait loop (docs/compiled.md, "Polling"), included by
 * _fastops.c: after a round that served chains, FastOps.wait looks at the
 * ring's avail.idx for a short window before it sleeps in epoll_wait.
 *
 * Why: at queue depth 1 the guest's next request often comes a few
 * microseconds after our reply. Sleeping costs a wake-up per request (the
 * scheduler, the idle vCPU of a VM: more than the request itself), and
 * the guest pays a kick (an eventfd write, or a VM exit) for each. While
 * the loop polls, the ring is "quiet" (_vqcore_api.h: take leaves
 * avail_event behind, so with EVENT_IDX the guest stops kicking), and a
 * request found by polling costs neither a sleep nor a kick.
 *
 * The window adapts to the guest, the way QEMU's event loop adapts its
 * poll-max-ns (util/aio-posix.c describes the rule; this is our code):
 * with block_ns the time from the end of the round that served to the
 * next chain (found by polling, or by the wake-up after it),
 *   block_ns <= window:      the window was enough, kept;
 *   block_ns > max:          polling could not have caught it: window 0;
 *   otherwise (block_ns < max, window < max): doubled (from 0: 4 us),
 *                            at most max.
 * So a guest whose requests come further apart than max (a slow guest,
 * an idle one) costs no polling at all after one miss, and one that keeps
 * coming back quickly gets a window just long enough. Only a round that
 * served chains is followed by a window: an idle worker never polls.
 * max 0 (--poll-max-us 0) turns it off.
 *
 * No new system call: the spin is plain loads, and clock_gettime is the
 * vDSO's, as for the meter and Python's own clocks (docs/compiled.md: no
 * policy lists it).
 */

#include <time.h>

#define POLL_START_NS 4000LL        /* the first window after growing from 0 */
#define POLL_MAX_NS 1000000000LL    /* the largest max accepted (1 s: tests; --poll-max-us stops at 1 ms) */

struct poll_conf {
    int64_t max_ns;                 /* 0: never poll */
    int64_t ns;                     /* the window now, 0 .. max_ns */
    unsigned long long found;       /* rounds whose chain polling found */
    unsigned long long missed;      /* windows that ran out */
    unsigned long long spun_ns;     /* time spent polling */
    uint64_t *w;                    /* the meter's slot (held by FastOps) or NULL: the three below */
    Py_ssize_t w_found, w_missed, w_ns;     /* counters.POLL_FOUND, POLL_MISSED, POLL_NS */
};

static inline int64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* the next window after a wait of block_ns, by the rule above */
static int64_t poll_next(int64_t ns, int64_t max_ns, int64_t block_ns)
{
    if (block_ns <= ns)
        return ns;
    if (block_ns > max_ns)
        return 0;
    if (ns < max_ns) {
        ns = ns ? ns * 2 : POLL_START_NS;
        if (ns > max_ns)
            ns = max_ns;
    }
    return ns;
}

/* look at the ring until a chain is there (1) or the window, counted from
 * `from`, ran out (0). Touches no Python object: callable without the GIL
 * (the Core's buffers stay held by the waiting thread); pending is
 * _vqcore's (_vqcore_api.h). */
static int poll_spin(struct poll_conf *p, int (*pending)(PyObject *), PyObject *core, int64_t from)
{
    int64_t start = mono_ns(), now = start;
    int found = 0;
    while (now - from < p->ns) {
        for (int i = 0; i < 16 && !found; i++) {
            found = pending(core);
            cpu_relax();
        }
        now = mono_ns();
        if (found)
            break;
    }
    p->spun_ns += (unsigned long long)(now - start);
    if (found)
        p->found++;
    else
        p->missed++;
    if (p->w) {
        add(p->w, found ? p->w_found : p->w_missed, 1);
        add(p->w, p->w_ns, (uint64_t)(now - start));
    }
    return found;
}

/* FastOps.enable_polling(max_ns[, window_ns[, meter_words]]): window_ns,
 * the first window (default 0: polling starts once a guest came back
 * quickly); meter_words, (found, missed, ns) word indices of the meter's
 * slot (words, nwords: NULL without a meter) or None */
static PyObject *poll_enable(struct poll_conf *p, PyObject *args, uint64_t *words, Py_ssize_t nwords)
{
    long long max_ns, ns = 0;
    PyObject *meter = Py_None;
    if (!PyArg_ParseTuple(args, "L|LO:enable_polling", &max_ns, &ns, &meter))
        return NULL;
    if (max_ns < 0 || max_ns > POLL_MAX_NS || ns < 0 || ns > max_ns) {
        PyErr_Format(PyExc_ValueError, "enable_polling: need 0 <= window_ns %lld <= max_ns %lld <= %lld", ns,
                     max_ns, POLL_MAX_NS);
        return NULL;
    }
    Py_ssize_t v[3] = {0, 0, 0};
    if (meter != Py_None) {
        if (!PyArg_ParseTuple(meter, "nnn:enable_polling meter_words", &v[0], &v[1], &v[2]))
            return NULL;
        for (int i = 0; i < 3; i++)
            if (words == NULL || v[i] < 0 || v[i] >= nwords) {
                PyErr_SetString(PyExc_ValueError, "FastOps: metrics layout outside the slot");
                return NULL;
            }
    }
    p->max_ns = max_ns;
    p->ns = ns;
    p->w = meter != Py_None ? words : NULL;
    p->w_found = v[0], p->w_missed = v[1], p->w_ns = v[2];
    Py_RETURN_NONE;
}

/* FastOps.poll_stats() */
static PyObject *poll_stats(const struct poll_conf *p)
{
    return Py_BuildValue("(LLKKK)", (long long)p->max_ns, (long long)p->ns, p->found, p->missed, p->spun_ns);
}

/* _fastops.poll_next(ns, max_ns, block_ns): the rule, for tests */
static PyObject *fastops_poll_next(PyObject *module, PyObject *args)
{
    long long ns, max_ns, block_ns;
    if (!PyArg_ParseTuple(args, "LLL", &ns, &max_ns, &block_ns))
        return NULL;
    return PyLong_FromLongLong(poll_next(ns, max_ns, block_ns));
}
