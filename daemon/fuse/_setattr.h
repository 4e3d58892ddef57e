/*
 * SETATTR in C (docs/compiled.md, "SETATTR in C"), included by _fastops.c
 * (one translation unit: it uses that file's request, state and reply
 * helpers, and GETATTR's reply, attr_answer). The reference is
 * attrs.do_setattr with its _open_fd and _timespec.
 *
 * Served here, under the shared checks of serve_req (a writable part of at
 * least 16 + 104 bytes, GETATTR's), when:
 *   - FastOps.enable_setattr was called (fastpath.make: the SETATTR row is
 *     attrs.do_setattr, so no --readonly, and GETATTR's stock attr reply,
 *     so no --translate-uid/-gid);
 *   - no request extensions, fuse_setattr_in whole (shorter: Python's
 *     EINVAL), at most MAX_ARGS;
 *   - valid holds only FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_ATIME,
 *     FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW: chmod,
 *     chown and utimensat, what tar -x sends (as root it restores every
 *     file's owner). Size (truncate, KILL_SUIDGID), LOCKOWNER, CTIME and
 *     unknown bits are Python's; the ids are the guest's as they are
 *     (--translate-uid/-gid, which maps them, keeps SETATTR in Python:
 *     fastpath.setattr_unsupported);
 *   - the nodeid is the root or one whose O_PATH fd this worker caches
 *     (GETATTR's cached_fd), and fstat of it says it is not a symlink
 *     (Python: EOPNOTSUPP for chmod; any symlink is Python's); an fstat
 *     failure is Python's too;
 *   - with FATTR_FH: the fh is an open file this worker holds of that very
 *     nodeid (GETATTR_FH's open_fd); any other fh is Python's (it copies
 *     another worker's or falls back to the inode).
 * The caller's ids play no part: do_setattr runs with the worker's own
 * credentials whoever asks (attrs.py, "Credentials"), and so does C.
 * Then, the request answered from here on (in the batch loop its chain is
 * taken and recorded first, as WRITE's), in do_setattr's order, the GIL
 * released around each call:
 *   1. FATTR_MODE: fchmod(open fd) or chmod("<fd>") through the magic link
 *      (the worker's cwd is /proc/self/fd), mode & 07777, as os.fchmod /
 *      os.chmod; an error is the error reply;
 *   2. FATTR_UID/FATTR_GID: fchownat(inode fd, "", uid or -1, gid or -1,
 *      AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), as attrs._fchownat; an error
 *      is the error reply (the chmod before it stays made, as in Python);
 *   3. times: nanoseconds of a set (not _NOW) time at or above 1e9 are
 *      EINVAL (after the chmod, as in Python); seconds as int64 (above
 *      OFFSET_MAX they wrap, as _timespec); UTIME_NOW / UTIME_OMIT as the
 *      bits say; futimens(open fd) or utimensat(AT_FDCWD, "<fd>", 0);
 *   4. GETATTR's reply (attr_answer) from fstat of the open fd or the
 *      inode's, its errno the error reply, a stat struct.pack would refuse
 *      EIO (Python's answer then).
 * Counted under SETATTR. System calls: fstat, chmod, fchmod, fchownat, utimensat:
 * all on policy/request.policy already.
 */

#define SETATTR_IN 88           /* abi.SETATTR_IN */
#define FATTR_MODE (1u << 0)
#define FATTR_UID (1u << 1)
#define FATTR_GID (1u << 2)
#define FATTR_ATIME (1u << 4)
#define FATTR_MTIME (1u << 5)
#define FATTR_FH (1u << 6)
#define FATTR_ATIME_NOW (1u << 7)
#define FATTR_MTIME_NOW (1u << 8)
#define SETATTR_SERVED (FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_ATIME | FATTR_MTIME | FATTR_FH | FATTR_ATIME_NOW | FATTR_MTIME_NOW)

/* fuse_setattr_in, as abi.SETATTR_IN ("<I4xQQQQQQIIII4xII4x") */
struct setattr_in {
    uint32_t valid, padding;
    uint64_t fh, size, lock_owner, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5;
};

_Static_assert(sizeof(struct setattr_in) == SETATTR_IN, "fuse_setattr_in");

/* attrs._timespec: -1 for EINVAL (nanoseconds of a set time) */
static int setattr_time(uint32_t valid, uint32_t set_bit, uint32_t now_bit, uint64_t sec, uint32_t nsec,
                        struct timespec *t)
{
    if (valid & now_bit) {
        t->tv_sec = 0;
        t->tv_nsec = UTIME_NOW;
    } else if (valid & set_bit) {
        if (nsec >= 1000000000u)
            return -1;
        t->tv_sec = (time_t)(int64_t)sec;
        t->tv_nsec = nsec;
    } else {
        t->tv_sec = 0;
        t->tv_nsec = UTIME_OMIT;
    }
    return 0;
}

/* SETATTR; NOT_HANDLED or the bytes written; *error: the reply's errno */
static Py_ssize_t fast_setattr(FastOps *self, const struct state *st, const struct req *q,
                               const struct in_header *h, int *error)
{
    Py_ssize_t nargs = (Py_ssize_t)h->len - IN_HEADER;
    struct setattr_in a;
    if (h->total_extlen || nargs < SETATTR_IN || nargs > MAX_ARGS
            || iov_copy(q->r, q->nr, IN_HEADER, &a, sizeof a, 0) < 0)
        return NOT_HANDLED;
    __asm__ volatile("" : "+m"(a));   /* the copy, never guest memory again */
    if (a.valid & ~SETATTR_SERVED)
        return NOT_HANDLED;
    int fd = cached_fd(self, st, h->nodeid), open = -1;
    if (fd < 0)
        return NOT_HANDLED;
    if (a.valid & FATTR_FH) {
        Py_ssize_t of;
        open = open_fd(st, a.fh, &of);
        if (open < 0 || of < 0 || (uint64_t)of != h->nodeid)
            return NOT_HANDLED;
    }
    struct stat s;
    int rc, err;
    Py_BEGIN_ALLOW_THREADS
    rc = fstat(fd, &s);
    Py_END_ALLOW_THREADS
    if (rc != 0 || S_ISLNK(s.st_mode))
        return NOT_HANDLED;
    /* answered from here on (serve_req checked room for the reply) */
    if (q->take != NULL)
        take_chain(q->take);
    char path[16];
    snprintf(path, sizeof path, "%d", fd);
    if (a.valid & FATTR_MODE) {
        mode_t mode = a.mode & 07777;
        Py_BEGIN_ALLOW_THREADS
        rc = open >= 0 ? fchmod(open, mode) : chmod(path, mode);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc != 0)
            return error_reply(q, h->unique, err, error);
    }
    if (a.valid & (FATTR_UID | FATTR_GID)) {
        uid_t uid = a.valid & FATTR_UID ? (uid_t)a.uid : (uid_t)-1;
        gid_t gid = a.valid & FATTR_GID ? (gid_t)a.gid : (gid_t)-1;
        Py_BEGIN_ALLOW_THREADS
        rc = fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc != 0)
            return error_reply(q, h->unique, err, error);
    }
    if (a.valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW)) {
        struct timespec t[2];
        if (setattr_time(a.valid, FATTR_ATIME, FATTR_ATIME_NOW, a.atime, a.atimensec, &t[0]) < 0
                || setattr_time(a.valid, FATTR_MTIME, FATTR_MTIME_NOW, a.mtime, a.mtimensec, &t[1]) < 0)
            return error_reply(q, h->unique, EINVAL, error);
        Py_BEGIN_ALLOW_THREADS
        rc = open >= 0 ? futimens(open, t) : utimensat(AT_FDCWD, path, t, 0);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc != 0)
            return error_reply(q, h->unique, err, error);
    }
    return attr_answer(self, q, h->unique, open >= 0 ? open : fd, EIO, error);
}

/* enable_setattr(meter_words): see fastops_methods */
static PyObject *fastops_enable_setattr(FastOps *self, PyObject *args)
{
    PyObject *words;
    if (!PyArg_ParseTuple(args, "O", &words))
        return NULL;
    struct op_words w = {-1, -1, -1, -1};
    if (meter_op_words(self, words, "enable_setattr", &w) < 0)
        return NULL;
    self->setattr = 1;
    self->m.setattr = w;
    Py_RETURN_NONE;
}
