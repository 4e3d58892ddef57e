/*
 * The C interface of daemon.virtio._vqcore for daemon.fuse._fastops
 * (docs/compiled.md, stage 3): the worker's batch loop pops, serves and
 * pushes the requests C serves without making a Python object per chain.
 * _vqcore exports one struct vqcore_api in the capsule VQCORE_CAPSULE;
 * _fastops imports it (PyCapsule_Import) when a FastOps is made.
 *
 * A raw chain is the chain walked by _vqcore's own walk, with every check,
 * into C-side iovecs of the largest guest region (adjacent buffers merged,
 * as the Python walk merges its views). Anything a raw walk cannot take
 * (a malformed ring or chain, a buffer or indirect table outside the
 * largest region, more buffers than these arrays hold, a released queue)
 * makes peek answer -1 without a Python error and without taking the
 * chain: the caller's Python then pops it with VirtQueue.pop, which
 * reports a malformed chain exactly as it always has.
 */
#ifndef VQCORE_API_H
#define VQCORE_API_H

#include <Python.h>
#include <stdint.h>
#include <sys/uio.h>

#define VQCORE_CAPSULE "daemon.virtio._vqcore._C_API"
#define VQCORE_API_VERSION 4    /* 3: VQ_RAW_READABLE 16 -> 1040; 4: pending, quiet */
/* Merged buffers a raw chain holds, each part: IOV_MAX (1024) payload
 * buffers, the headers, and some. A WRITE from the guest's page cache
 * (cache=auto without DIRECT_IO) brings one readable buffer per 4 KiB page
 * of its data, 258 for 1 MiB (max_pages 256, the in header and the args):
 * with 16 such WRITEs were left to Python, at 3-5 times the CPU. */
#define VQ_RAW_READABLE 1040
#define VQ_RAW_WRITABLE 1040

struct vq_raw_chain {
    uint32_t head;
    int nr, nw;                 /* iovecs used in r and w */
    uint64_t rsize, wsize;      /* bytes in each part */
    struct iovec r[VQ_RAW_READABLE];
    struct iovec w[VQ_RAW_WRITABLE];
};

struct vqcore_api {
    unsigned int version;       /* VQCORE_API_VERSION */
    PyTypeObject *core_type;    /* _vqcore.Core: check before any call */
    /* the next available chain walked into *c, not taken: 1; 0: none is
     * available (pop would return None); -1: the next chain is for
     * VirtQueue.pop (see above). Never sets a Python error. */
    int (*peek)(PyObject *core, struct vq_raw_chain *c);
    /* take the chain peek returned (pop's index update and, with
     * EVENT_IDX, avail_event); returns the new last avail index */
    unsigned int (*take)(PyObject *core);
    /* push(head, written), as Core.push: visible at the next publish */
    void (*push)(PyObject *core, uint32_t head, uint32_t written);
    /* version 2 (the wait loop, docs/compiled.md): publish as Core.publish
     * (1: signal the guest, 0: not; -1: a released queue, nothing done),
     * giving the last avail index (the progress record's DONE); and
     * used.idx as last published (PUB_FROM) */
    int (*publish)(PyObject *core, unsigned int *last_avail);
    unsigned int (*published)(PyObject *core);
    /* version 4 (polling, docs/compiled.md "Polling"): 1 if avail.idx moved
     * past the last avail index (one relaxed load, no fence: peek's
     * acquire comes after), else 0 (a released queue too) */
    int (*pending)(PyObject *core);
    /* quiet(core, 1): take stops moving avail_event, so with EVENT_IDX
     * the guest stops kicking once it passed the last one written.
     * quiet(core, 0): avail_event = the last avail index again, a full
     * fence, then as pending: what the guest published meanwhile
     * without a kick. 0 for a released queue. */
    int (*quiet)(PyObject *core, int on);
};

#endif
