/*
 * ThreadLock: the thread lock of a shared table (filetable.LockedTable's
 * _tlock) as a C object, so that the request path takes it with a plain
 * call instead of a Python method call; included by _fastops.c after
 * _tablelock.h. docs/compiled.md, "The thread lock without a method
 * call", says why and what it saved.
 *
 * A table's lock is per process (TableLock, the record lock); the thread
 * lock keeps two threads of one process apart, taken before the table
 * lock everywhere (LockedTable._lock). C takes it without waiting for the
 * length of one serve or batch call (a holder means Python's turn). With
 * threading.Lock that was PyObject_CallMethodOneArg(lock, "acquire",
 * False): a method lookup, a bound call and lock.acquire's keyword
 * parsing, then a second method call to release it: about 5 % of a
 * request worker's time in a guest's cold stat loop (perf, DWARF call
 * graphs). Here it is PyThread_acquire_lock(lock, NOWAIT_LOCK), the call
 * threading.Lock itself makes, on a lock of CPython's own kind.
 *
 * The Python side is threading.Lock's (the subset the tables and tests
 * use): acquire(blocking=True) -> bool (a blocking acquire waits with the
 * GIL released and runs signal handlers when interrupted, as
 * threading.Lock does), release() (RuntimeError when not held), locked(),
 * and the with statement. Like threading.Lock it is not reentrant, and a
 * fork while another thread holds it leaves the child's copy held; the
 * tables make theirs in each worker before it starts a thread
 * (LockedTable.prepare_lock).
 *
 * thread_lock_try(lock) / thread_lock_give(lock): what the request path
 * calls, for a ThreadLock or (tables made before the extension was
 * loaded, in tests) any object with threading.Lock's methods.
 */

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    int held;               /* with the GIL: taken and not yet given back */
} ThreadLock;

static PyTypeObject ThreadLockType;

/* taken without waiting: 1, or 0 (busy, or an error: cleared) */
static int thread_lock_try(PyObject *lock)
{
    if (Py_IS_TYPE(lock, &ThreadLockType)) {
        ThreadLock *t = (ThreadLock *)lock;
        if (!PyThread_acquire_lock(t->lock, NOWAIT_LOCK))
            return 0;
        t->held = 1;
        return 1;
    }
    PyObject *got = PyObject_CallMethod(lock, "acquire", "O", Py_False);
    int taken = got == Py_True;
    Py_XDECREF(got);
    PyErr_Clear();
    return taken;
}

/* given back (after thread_lock_try returned 1); an exception already set
 * stays set */
static void thread_lock_give(PyObject *lock)
{
    if (Py_IS_TYPE(lock, &ThreadLockType)) {
        ThreadLock *t = (ThreadLock *)lock;
        t->held = 0;
        PyThread_release_lock(t->lock);
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_XDECREF(PyObject_CallMethod(lock, "release", NULL));
    PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* ---- the Python type ------------------------------------------------------ */

static PyObject *threadlock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "ThreadLock() takes no arguments");
        return NULL;
    }
    ThreadLock *self = (ThreadLock *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if ((self->lock = PyThread_allocate_lock()) == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void threadlock_dealloc(ThreadLock *self)
{
    if (self->lock != NULL) {
        if (self->held)
            PyThread_release_lock(self->lock);
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* a blocking acquire: the GIL released while waiting; 0, or -1 (a signal
 * handler raised) */
static int threadlock_wait(ThreadLock *self)
{
    for (;;) {
        PyLockStatus r;
        Py_BEGIN_ALLOW_THREADS
        r = PyThread_acquire_lock_timed(self->lock, -1, 1);
        Py_END_ALLOW_THREADS
        if (r == PY_LOCK_ACQUIRED)
            return 0;
        if (r == PY_LOCK_INTR && Py_MakePendingCalls() < 0)
            return -1;
    }
}

static PyObject *threadlock_acquire(ThreadLock *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"blocking", NULL};
    int blocking = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:acquire", names, &blocking))
        return NULL;
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        if (!blocking)
            Py_RETURN_FALSE;
        if (threadlock_wait(self) < 0)
            return NULL;
    }
    self->held = 1;
    Py_RETURN_TRUE;
}

static PyObject *threadlock_release(ThreadLock *self, PyObject *unused)
{
    if (!self->held) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    self->held = 0;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *threadlock_locked(ThreadLock *self, PyObject *unused)
{
    return PyBool_FromLong(self->held);
}

static PyObject *threadlock_enter(ThreadLock *self, PyObject *unused)
{
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK) && threadlock_wait(self) < 0)
        return NULL;
    self->held = 1;
    Py_RETURN_TRUE;
}

static PyObject *threadlock_exit(ThreadLock *self, PyObject *args)
{
    return threadlock_release(self, NULL);
}

static PyMethodDef threadlock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))threadlock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True) -> bool, as threading.Lock's"},
    {"release", (PyCFunction)threadlock_release, METH_NOARGS, "release(); RuntimeError when not held"},
    {"locked", (PyCFunction)threadlock_locked, METH_NOARGS, "locked() -> bool"},
    {"__enter__", (PyCFunction)threadlock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)threadlock_exit, METH_VARARGS, NULL},
    {NULL},
};

static PyTypeObject ThreadLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.fuse._fastops.ThreadLock",
    .tp_basicsize = sizeof(ThreadLock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ThreadLock(): a shared table's thread lock, threading.Lock's interface, taken by the "
              "request path with a plain C call (_threadlock.h)",
    .tp_new = threadlock_new,
    .tp_dealloc = (destructor)threadlock_dealloc,
    .tp_methods = threadlock_methods,
};
