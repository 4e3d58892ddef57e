/*
 * The compiled core of a split virtqueue (docs/compiled.md): pop, the chain
 * walk, push and publish of daemon/virtio/virtqueue.py in C, with the same
 * rules, the same results (Chain/IoVec of memoryview slices) and the same
 * VirtQueueError messages. virtqueue.py is the reference: read its
 * docstring for the rules; daemon/virtio/fast.py wraps this type.
 *
 * Guest memory is shared with a running guest: every field of a ring or a
 * descriptor is read once into a local (read_once) and only the local is
 * checked and used, so a guest changing it concurrently cannot make us use
 * an unchecked value. Every buffer is checked against its region with no
 * 64-bit wrap (fits()).
 *
 * Lifetimes: a Core holds buffer exports of the ring views and of the hot
 * region's view; release() drops them and must run before the views are
 * released (fast.py's VirtQueue.release does that).
 *
 * The capsule _C_API (_vqcore_api.h) gives _fastops's batch loop the same
 * walk into C-side iovecs (a raw chain) without taking the chain, then
 * take and push: one walk (walk_into) serves both, its sink deciding
 * whether buffers become Python views or iovecs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_vqcore_api.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ring fields are stored in native byte order: little-endian hosts only"
#endif

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_INDIRECT_ENTRIES 1024
#define MAX_QUEUE_SIZE 32768

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

typedef struct {
    PyObject_HEAD
    Py_buffer desc, avail, used, hot;
    int held;               /* the four buffers are held */
    PyObject *hot_view;     /* slices of it become the IoVec views */
    PyObject *gpa_views;    /* GuestMemory.gpa_views, for other regions */
    PyObject *chain_type, *iovec_type, *error;
    uint32_t num, mask;
    int event_idx;
    int quiet;              /* take leaves avail_event alone (api_quiet) */
    uint16_t last_avail, used_idx, published_idx, signalled_used;
    int signalled_valid;
    uint64_t hot_start, hot_end;
    long last_head;         /* the head being walked, for fast.py's messages */
} Core;

static PyObject *s_head, *s_readable, *s_writable, *s_views, *s_size, *s_join, *s_empty;

/* one read of a 16-bit shared field, never torn (aligned: checked at init) */
static inline uint16_t load16(const unsigned char *base, size_t off)
{
    return __atomic_load_n((const uint16_t *)(base + off), __ATOMIC_RELAXED);
}

static inline void store16(unsigned char *base, size_t off, uint16_t v)
{
    __atomic_store_n((uint16_t *)(base + off), v, __ATOMIC_RELEASE);
}

/* a descriptor copied out once; the asm tells the compiler the copy may
 * have changed, so it never re-reads guest memory in its place */
static inline void read_once(struct desc *d, const unsigned char *p)
{
    memcpy(d, p, sizeof *d);
    __asm__ volatile("" : "+m"(*d));
}

/* [addr, addr+len) inside [start, end), without 64-bit overflow */
static inline int fits(uint64_t addr, uint64_t len, uint64_t start, uint64_t end)
{
    return start <= addr && addr <= end && len <= end - addr;
}

static void core_drop(Core *self)
{
    if (self->held) {
        PyBuffer_Release(&self->desc);
        PyBuffer_Release(&self->avail);
        PyBuffer_Release(&self->used);
        PyBuffer_Release(&self->hot);
        self->held = 0;
    }
    Py_CLEAR(self->hot_view);
    Py_CLEAR(self->gpa_views);
    Py_CLEAR(self->chain_type);
    Py_CLEAR(self->iovec_type);
    Py_CLEAR(self->error);
}

static void core_dealloc(Core *self)
{
    core_drop(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int core_init(Core *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"desc", "avail", "used", "num", "event_idx", "last_avail_idx", "used_idx",
                            "hot_start", "hot_end", "hot_view", "gpa_views", "chain_type", "iovec_type",
                            "error", NULL};
    PyObject *desc, *avail, *used, *hot_view, *gpa_views, *chain_type, *iovec_type, *error;
    unsigned int num, last, used_idx;
    int event_idx;
    unsigned long long hot_start, hot_end;
    if (self->held) {
        PyErr_SetString(PyExc_RuntimeError, "Core is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOIpIIKKOOOOO", names, &desc, &avail, &used, &num,
                                     &event_idx, &last, &used_idx, &hot_start, &hot_end, &hot_view,
                                     &gpa_views, &chain_type, &iovec_type, &error))
        return -1;
    if (num == 0 || num > MAX_QUEUE_SIZE || (num & (num - 1)) || last > 0xFFFF || used_idx > 0xFFFF
        || hot_end < hot_start || !PyType_Check(chain_type) || !PyType_Check(iovec_type)) {
        PyErr_SetString(PyExc_ValueError, "bad queue parameters");
        return -1;
    }
    int flags = PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS;
    if (PyObject_GetBuffer(desc, &self->desc, flags) < 0)
        return -1;
    if (PyObject_GetBuffer(avail, &self->avail, flags) < 0)
        goto fail1;
    if (PyObject_GetBuffer(used, &self->used, flags) < 0)
        goto fail2;
    if (PyObject_GetBuffer(hot_view, &self->hot, flags) < 0)
        goto fail3;
    size_t ev = event_idx ? 2 : 0;
    if ((size_t)self->desc.len < 16 * (size_t)num || (size_t)self->avail.len < 4 + 2 * (size_t)num + ev
        || (size_t)self->used.len < 4 + 8 * (size_t)num + ev || (uint64_t)self->hot.len != hot_end - hot_start
        || ((uintptr_t)self->avail.buf & 1) || ((uintptr_t)self->used.buf & 3)) {
        PyErr_SetString(PyExc_ValueError, "ring views too short or misaligned");
        goto fail4;
    }
    self->held = 1;
    Py_INCREF(hot_view);
    self->hot_view = hot_view;
    Py_INCREF(gpa_views);
    self->gpa_views = gpa_views;
    Py_INCREF(chain_type);
    self->chain_type = chain_type;
    Py_INCREF(iovec_type);
    self->iovec_type = iovec_type;
    Py_INCREF(error);
    self->error = error;
    self->num = num;
    self->mask = num - 1;
    self->event_idx = event_idx;
    self->quiet = 0;
    self->last_avail = (uint16_t)last;
    self->used_idx = self->published_idx = self->signalled_used = (uint16_t)used_idx;
    self->signalled_valid = 0;
    self->hot_start = hot_start;
    self->hot_end = hot_end;
    self->last_head = -1;
    return 0;
fail4:
    PyBuffer_Release(&self->hot);
fail3:
    PyBuffer_Release(&self->used);
fail2:
    PyBuffer_Release(&self->avail);
fail1:
    PyBuffer_Release(&self->desc);
    return -1;
}

static int check_held(Core *self)
{
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "queue released");
        return 0;
    }
    return 1;
}

/* hot_view[start:end] appended to list */
static int append_slice(Core *self, PyObject *list, Py_ssize_t start, Py_ssize_t end)
{
    PyObject *a = PyLong_FromSsize_t(start), *b = PyLong_FromSsize_t(end), *slice = NULL, *view = NULL;
    int rc = -1;
    if (a && b && (slice = PySlice_New(a, b, NULL)) && (view = PyObject_GetItem(self->hot_view, slice)))
        rc = PyList_Append(list, view);
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(slice);
    Py_XDECREF(view);
    return rc;
}

/* list += gpa_views(addr, len) (may raise GuestMemoryError) */
static int extend_gpa(Core *self, PyObject *list, uint64_t addr, uint32_t len)
{
    PyObject *parts = PyObject_CallFunction(self->gpa_views, "KI", (unsigned long long)addr, (unsigned int)len);
    if (!parts)
        return -1;
    PyObject *r = PySequence_InPlaceConcat(list, parts);
    Py_DECREF(parts);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* a non-empty buffer added to one stream: in the largest region it extends
 * the current run [*start, *end) (hot_view offsets; *end -1 = no run) or
 * starts a new one, the finished run becoming a view; elsewhere the run is
 * closed and gpa_views adds the buffer's views (virtqueue.py's _walk) */
static int add_buffer(Core *self, PyObject *list, Py_ssize_t *start, Py_ssize_t *end, uint64_t addr,
                      uint32_t len)
{
    if (fits(addr, len, self->hot_start, self->hot_end)) {
        Py_ssize_t off = (Py_ssize_t)(addr - self->hot_start);
        if (off == *end) {
            *end += len;
            return 0;
        }
        if (*end >= 0 && append_slice(self, list, *start, *end) < 0)
            return -1;
        *start = off;
        *end = off + len;
        return 0;
    }
    if (*end >= 0) {
        if (append_slice(self, list, *start, *end) < 0)
            return -1;
        *end = -1;
    }
    return extend_gpa(self, list, addr, len);
}

static PyObject *new_slots(PyObject *type, PyObject *n1, PyObject *v1, PyObject *n2, PyObject *v2,
                           PyObject *n3, PyObject *v3)
{
    PyTypeObject *tp = (PyTypeObject *)type;
    PyObject *obj = tp->tp_alloc(tp, 0);
    if (!obj)
        return NULL;
    if (PyObject_GenericSetAttr(obj, n1, v1) < 0 || PyObject_GenericSetAttr(obj, n2, v2) < 0
        || (n3 && PyObject_GenericSetAttr(obj, n3, v3) < 0)) {
        Py_DECREF(obj);
        return NULL;
    }
    return obj;
}

static PyObject *iovec(Core *self, PyObject *views, uint64_t size)
{
    PyObject *n = PyLong_FromUnsignedLongLong(size);
    if (!n)
        return NULL;
    PyObject *iov = new_slots(self->iovec_type, s_views, views, s_size, n, NULL, NULL);
    Py_DECREF(n);
    return iov;
}

/* where a walk puts what it finds: Python lists of views (a Chain, with
 * the VirtQueueError messages of virtqueue.py), or a raw chain of C-side
 * iovecs (no Python object, no error set: -1 sends the chain to pop) */
struct sink {
    struct vq_raw_chain *raw;   /* NULL: Python */
    PyObject *readable, *writable;
    Py_ssize_t r_start, r_end, w_start, w_end;  /* runs, hot_view offsets; end -1 = none */
    uint64_t rsize, wsize;      /* bytes in each part, once walked */
    PyObject *table_obj;
    Py_buffer table_buf;
    int table_held;
};

#define WALK_FAIL(...)                             \
    do {                                           \
        if (!s->raw)                               \
            PyErr_Format(self->error, __VA_ARGS__); \
        return -1;                                 \
    } while (0)

/* a non-empty buffer added to a raw chain's stream: only the largest
 * region, merged with the stream's last iovec when adjacent */
static int raw_add(Core *self, struct iovec *iov, int *n, int cap, uint64_t addr, uint32_t len)
{
    if (!fits(addr, len, self->hot_start, self->hot_end))
        return -1;
    unsigned char *p = (unsigned char *)self->hot.buf + (addr - self->hot_start);
    if (*n && (unsigned char *)iov[*n - 1].iov_base + iov[*n - 1].iov_len == p) {
        iov[*n - 1].iov_len += len;
        return 0;
    }
    if (*n == cap)
        return -1;
    iov[*n].iov_base = p;
    iov[*n].iov_len = len;
    (*n)++;
    return 0;
}

/* an indirect table outside the largest region (Python only: another
 * region, or straddling two, joined into a copy) */
static const unsigned char *far_table(Core *self, struct sink *s, uint64_t addr, uint32_t len)
{
    PyObject *parts = PyObject_CallFunction(self->gpa_views, "KI", (unsigned long long)addr, (unsigned int)len);
    if (!parts)
        return NULL;
    if (PyList_Check(parts) && PyList_GET_SIZE(parts) == 1) {
        s->table_obj = PyList_GET_ITEM(parts, 0);
        Py_INCREF(s->table_obj);
    } else {
        s->table_obj = PyObject_CallMethodObjArgs(s_empty, s_join, parts, NULL);
    }
    Py_DECREF(parts);
    if (!s->table_obj || PyObject_GetBuffer(s->table_obj, &s->table_buf, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    s->table_held = 1;
    if ((size_t)s->table_buf.len < len) {
        PyErr_SetString(PyExc_ValueError, "indirect table view too short");
        return NULL;
    }
    return (const unsigned char *)s->table_buf.buf;
}

/* the chain starting at head (< num) into s, with every rule of
 * virtqueue.py VirtQueue._walk in its order; 0 or -1 */
static int walk_into(Core *self, uint32_t head, struct sink *s)
{
    const unsigned char *table = (const unsigned char *)self->desc.buf;
    const unsigned char *hot = (const unsigned char *)self->hot.buf;
    uint64_t hot_start = self->hot_start, hot_end = self->hot_end;
    uint64_t readable_size = 0, writable_size = 0;
    uint32_t size = self->num, budget = self->num, index = head;
    int in_indirect = 0, seen_writable = 0;
    struct vq_raw_chain *raw = s->raw;
    struct desc d;

    for (;;) {
        if (budget == 0)
            WALK_FAIL("chain %u is longer than its table (%u): a descriptor loop", head, size);
        budget--;
        read_once(&d, table + ((size_t)index << 4));
        if (d.flags & DESC_F_INDIRECT) {
            if (in_indirect)
                WALK_FAIL("chain %u: nested indirect descriptor", head);
            if (d.flags & DESC_F_NEXT)
                WALK_FAIL("chain %u: indirect descriptor with NEXT", head);
            if (d.len == 0 || (d.len & 15) || d.len > MAX_INDIRECT_ENTRIES * 16)
                WALK_FAIL("chain %u: indirect table length %u", head, d.len);
            if (fits(d.addr, d.len, hot_start, hot_end))
                table = hot + (d.addr - hot_start);
            else if (raw || !(table = far_table(self, s, d.addr, d.len)))
                return -1;
            size = budget = d.len >> 4;
            in_indirect = 1;
            index = 0;
            continue;
        }
        if (d.flags & DESC_F_WRITE) {
            seen_writable = 1;
            if (d.len) {
                if (raw ? raw_add(self, raw->w, &raw->nw, VQ_RAW_WRITABLE, d.addr, d.len)
                        : add_buffer(self, s->writable, &s->w_start, &s->w_end, d.addr, d.len))
                    return -1;
                writable_size += d.len;
            }
        } else if (seen_writable) {
            WALK_FAIL("chain %u: device-readable descriptor after a writable one", head);
        } else if (d.len) {
            if (raw ? raw_add(self, raw->r, &raw->nr, VQ_RAW_READABLE, d.addr, d.len)
                    : add_buffer(self, s->readable, &s->r_start, &s->r_end, d.addr, d.len))
                return -1;
            readable_size += d.len;
        }
        if (!(d.flags & DESC_F_NEXT)) {
            if (raw) {
                raw->head = head;
                raw->rsize = readable_size;
                raw->wsize = writable_size;
                return 0;
            }
            if (s->r_end >= 0 && append_slice(self, s->readable, s->r_start, s->r_end) < 0)
                return -1;
            if (s->w_end >= 0 && append_slice(self, s->writable, s->w_start, s->w_end) < 0)
                return -1;
            s->rsize = readable_size;
            s->wsize = writable_size;
            return 0;
        }
        if (d.next >= size)
            WALK_FAIL("chain %u: next index %u out of range (%u)", head, (unsigned)d.next, size);
        index = d.next;
    }
}

/* the chain starting at head (< num) as a Chain: virtqueue.py VirtQueue._walk */
static PyObject *walk(Core *self, uint32_t head)
{
    struct sink s = {.raw = NULL, .r_start = -1, .r_end = -1, .w_start = -1, .w_end = -1};
    PyObject *result = NULL;

    self->last_head = head;
    s.readable = PyList_New(0);
    s.writable = PyList_New(0);
    if (s.readable && s.writable && walk_into(self, head, &s) == 0) {
        PyObject *riov = iovec(self, s.readable, s.rsize);
        PyObject *wiov = riov ? iovec(self, s.writable, s.wsize) : NULL;
        PyObject *h = wiov ? PyLong_FromUnsignedLong(head) : NULL;
        if (h)
            result = new_slots(self->chain_type, s_head, h, s_readable, riov, s_writable, wiov);
        Py_XDECREF(h);
        Py_XDECREF(riov);
        Py_XDECREF(wiov);
    }
    if (s.table_held)
        PyBuffer_Release(&s.table_buf);
    Py_XDECREF(s.table_obj);
    /* on an error the views made so far go with their lists (a memoryview
     * releases its export when freed), as in virtqueue.py */
    Py_XDECREF(s.readable);
    Py_XDECREF(s.writable);
    return result;
}

/* the head at the next avail index, not taken: 1 (*head set), 0 if none
 * is available, -1 if avail.idx jumped more than num ahead (with the
 * VirtQueueError when errors is set) */
static int avail_head(Core *self, uint16_t *head, int errors)
{
    const unsigned char *avail = (const unsigned char *)self->avail.buf;
    uint16_t last = self->last_avail;
    uint16_t avail_idx = load16(avail, 2);
    if (avail_idx == last) {
        if (!self->event_idx)
            return 0;
        /* the guest may have published without seeing our avail_event */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        avail_idx = load16(avail, 2);
        if (avail_idx == last)
            return 0;
    }
    /* the ring entries are read after the index (acquire) */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if ((uint16_t)(avail_idx - last) > self->num) {
        if (errors)
            PyErr_Format(self->error, "avail index jumped from %u to %u (queue size %u)", (unsigned)last,
                         (unsigned)avail_idx, self->num);
        return -1;
    }
    *head = load16(avail, 4 + 2 * (size_t)(last & self->mask));
    return 1;
}

/* with EVENT_IDX: ask the guest to kick once it publishes past idx */
static inline void set_avail_event(Core *self, uint16_t idx)
{
    store16((unsigned char *)self->used.buf, 4 + 8 * (size_t)self->num, idx);
}

/* take the entry avail_head returned: the next avail index, avail_event */
static uint16_t take(Core *self)
{
    uint16_t last = (uint16_t)(self->last_avail + 1);
    self->last_avail = last;
    if (self->event_idx && !self->quiet)
        set_avail_event(self, last);
    return last;
}

static PyObject *core_pop(Core *self, PyObject *unused)
{
    if (!check_held(self))
        return NULL;
    uint16_t head;
    int rc = avail_head(self, &head, 1);
    if (rc <= 0)
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    take(self);
    if (head >= self->num) {
        PyErr_Format(self->error, "head index %u out of range (queue size %u)", (unsigned)head, self->num);
        return NULL;
    }
    return walk(self, head);
}

static PyObject *core_chain_at(Core *self, PyObject *arg)
{
    if (!check_held(self))
        return NULL;
    long head = PyLong_AsLong(arg);
    if (head == -1 && PyErr_Occurred())
        return NULL;
    if (head < 0 || head >= (long)self->num) {
        PyErr_Format(self->error, "head index %ld out of range (queue size %u)", head, self->num);
        return NULL;
    }
    return walk(self, (uint32_t)head);
}

/* a used element, visible at the next publish */
static void push_elem(Core *self, uint32_t head, uint32_t written)
{
    uint32_t elem[2] = {head, written};
    size_t slot = self->used_idx & self->mask;
    memcpy((unsigned char *)self->used.buf + 4 + 8 * slot, elem, sizeof elem);
    self->used_idx = (uint16_t)(self->used_idx + 1);
}

static PyObject *core_push(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!check_held(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "push(head, written)");
        return NULL;
    }
    unsigned long head = PyLong_AsUnsignedLong(args[0]);
    if (head == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long written = PyLong_AsUnsignedLong(args[1]);
    if (written == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (head > 0xFFFFFFFFul || written > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "used element field does not fit 32 bits");
        return NULL;
    }
    push_elem(self, (uint32_t)head, (uint32_t)written);
    Py_RETURN_NONE;
}

/* store used.idx; 1: signal the guest (the call eventfd), 0: not */
static int publish(Core *self)
{
    uint16_t new = self->used_idx;
    if (new == self->published_idx)
        return 0;
    /* release: the used elements are visible before the index; one store */
    store16((unsigned char *)self->used.buf, 2, new);
    self->published_idx = new;
    if (!self->event_idx) {
        self->signalled_used = new;
        return 1;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t old = self->signalled_used;
    int valid = self->signalled_valid;
    self->signalled_used = new;
    self->signalled_valid = 1;
    if (!valid)
        return 1;
    uint16_t event = load16((const unsigned char *)self->avail.buf, 4 + 2 * (size_t)self->num);
    /* vring_need_event */
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

static PyObject *core_publish(Core *self, PyObject *unused)
{
    if (!check_held(self))
        return NULL;
    return PyBool_FromLong(publish(self));
}

static PyObject *core_release(Core *self, PyObject *unused)
{
    core_drop(self);
    Py_RETURN_NONE;
}

static PyObject *get_last_avail(Core *self, void *c) { return PyLong_FromLong(self->last_avail); }
static PyObject *get_used_idx(Core *self, void *c) { return PyLong_FromLong(self->used_idx); }
static PyObject *get_published(Core *self, void *c) { return PyLong_FromLong(self->published_idx); }
static PyObject *get_last_head(Core *self, void *c) { return PyLong_FromLong(self->last_head); }
static PyObject *get_quiet(Core *self, void *c) { return PyBool_FromLong(self->quiet); }

static int set_last_avail(Core *self, PyObject *v, void *c)
{
    long x = v ? PyLong_AsLong(v) : -1;
    if (x == -1 && (!v || PyErr_Occurred())) {
        if (!v)
            PyErr_SetString(PyExc_AttributeError, "cannot delete last_avail_idx");
        return -1;
    }
    if (x < 0 || x > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "avail index is not a u16");
        return -1;
    }
    self->last_avail = (uint16_t)x;
    return 0;
}

static PyGetSetDef core_getset[] = {
    {"last_avail_idx", (getter)get_last_avail, (setter)set_last_avail, "next avail index to pop", NULL},
    {"used_idx", (getter)get_used_idx, NULL, "used index after the pushed elements", NULL},
    {"published_idx", (getter)get_published, NULL, "used.idx as last stored", NULL},
    {"last_head", (getter)get_last_head, NULL, "head of the chain walked last", NULL},
    {"quiet", (getter)get_quiet, NULL, "take leaves avail_event alone (FastOps.wait's polling)", NULL},
    {NULL},
};

static PyMethodDef core_methods[] = {
    {"pop", (PyCFunction)core_pop, METH_NOARGS, "the next available Chain, or None"},
    {"chain_at", (PyCFunction)core_chain_at, METH_O, "chain head walked again"},
    {"push", (PyCFunction)(void (*)(void))core_push, METH_FASTCALL, "queue a used element"},
    {"publish", (PyCFunction)core_publish, METH_NOARGS, "store used.idx; True to signal"},
    {"release", (PyCFunction)core_release, METH_NOARGS, "drop the buffer exports"},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.virtio._vqcore.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled pop/walk/push/publish of one split virtqueue.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
};

/* -- the C interface for _fastops (_vqcore_api.h) ------------------------------ */
static int api_peek(PyObject *core, struct vq_raw_chain *c)
{
    Core *self = (Core *)core;
    uint16_t head;
    if (!self->held)
        return -1;
    int rc = avail_head(self, &head, 0);
    if (rc <= 0)
        return rc;
    if (head >= self->num)
        return -1;
    c->nr = c->nw = 0;
    struct sink s = {.raw = c};
    return walk_into(self, head, &s) == 0 ? 1 : -1;
}

static unsigned int api_take(PyObject *core) { return take((Core *)core); }

static void api_push(PyObject *core, uint32_t head, uint32_t written) { push_elem((Core *)core, head, written); }

static int api_publish(PyObject *core, unsigned int *last_avail)
{
    Core *self = (Core *)core;
    if (!self->held)
        return -1;
    *last_avail = self->last_avail;
    return publish(self);
}

static unsigned int api_published(PyObject *core) { return ((Core *)core)->published_idx; }

static int api_pending(PyObject *core)
{
    Core *self = (Core *)core;
    return self->held && load16((const unsigned char *)self->avail.buf, 2) != self->last_avail;
}

#define USED_F_NO_NOTIFY 1

static int api_quiet(PyObject *core, int on)
{
    Core *self = (Core *)core;
    self->quiet = on;
    if (!self->held)
        return 0;
    if (!self->event_idx)   /* the guest reads used.flags instead (VRING_USED_F_NO_NOTIFY) */
        store16((unsigned char *)self->used.buf, 0, on ? USED_F_NO_NOTIFY : 0);
    if (on)
        return 0;
    if (self->event_idx)
        set_avail_event(self, self->last_avail);
    /* the guest's avail.idx store and our avail_event store, each before
     * the other's load: one of us sees the other (the kick, or the chain) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return api_pending(core);
}

static struct vqcore_api api = {VQCORE_API_VERSION, &CoreType, api_peek, api_take, api_push, api_publish,
                                api_published, api_pending, api_quiet};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_vqcore", "Compiled split-virtqueue core (see virtqueue.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__vqcore(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    if (!(s_head = PyUnicode_InternFromString("head")) || !(s_readable = PyUnicode_InternFromString("readable"))
        || !(s_writable = PyUnicode_InternFromString("writable")) || !(s_views = PyUnicode_InternFromString("views"))
        || !(s_size = PyUnicode_InternFromString("size")) || !(s_join = PyUnicode_InternFromString("join"))
        || !(s_empty = PyBytes_FromStringAndSize("", 0)))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *capsule = PyCapsule_New(&api, VQCORE_CAPSULE, NULL);
    if (!capsule || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
