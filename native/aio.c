/* zeroinf._native_aio: an asynchronous O_DIRECT reader over the kernel AIO syscalls.
 *
 * Raw syscalls (io_setup/io_submit/io_getevents/io_destroy) with <linux/aio_abi.h>, so the
 * build needs only gcc and the Python headers: no libaio, which the device machine lacks.
 *
 * Model: Python submits requests (fd, file offset, length, destination address). One I/O thread
 * per Reader, written in plain C and never touching the GIL, cuts requests into blocks of
 * `block_size` bytes and keeps up to `queue_depth` blocks in the kernel, oldest request first.
 * A completion raises an eventfd (IOCB_FLAG_RESFD); Python's submit() raises the same eventfd,
 * so the thread sleeps in one read() and wakes for either. Short reads resubmit the remainder,
 * EINTR/EAGAIN resubmit the block, other errors fail the request with errno and the offset.
 * wait() releases the GIL and sleeps on a condition variable in slices so Ctrl-C still works.
 *
 * A request is reported finished only when none of its blocks is still in the kernel: after
 * wait() returns or raises, nothing writes into the destination any more.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ERR_EOF (-1)        /* request.err: the file ended before the request did */
#define MAX_RETRIES 64      /* per block, for EINTR/EAGAIN completions */
#define WAIT_SLICE_NS 100000000L /* wait() re-checks Python signals every 100 ms */

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **cbs) {
    return syscall(SYS_io_submit, ctx, n, cbs);
}
static long sys_io_getevents(aio_context_t ctx, long min_nr, long nr, struct io_event *ev,
                             struct timespec *timeout) {
    return syscall(SYS_io_getevents, ctx, min_nr, nr, ev, timeout);
}

typedef struct request {
    uint64_t id;
    int fd;
    int direct;           /* O_DIRECT: a short read that breaks alignment can only be EOF */
    int64_t offset;       /* file offset of the first byte */
    uint64_t length;
    char *dest;
    char *path;           /* for messages; may be NULL */
    uint64_t assigned;    /* bytes handed to blocks so far */
    uint64_t nread;       /* bytes that arrived */
    int blocks;           /* blocks of this request not yet released (in kernel or to retry) */
    int err;              /* 0, an errno, or ERR_EOF */
    int64_t err_offset;   /* file offset where the first failure happened */
    int finished;
    struct request *next;  /* registry of unconsumed requests */
    struct request *pnext; /* queue of requests with unassigned bytes */
} request;

typedef struct {
    struct iocb cb;
    request *req;
    int retries;
    int shortened; /* test hook: this block already had a fake short read */
} block;

typedef struct {
    PyObject_HEAD
    aio_context_t ctx;
    int efd;
    int qd;
    uint64_t block_size;
    int test_short_reads; /* test hook: report the first completion of each block as half */
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t done_cv;
    int sync_ready; /* mu and done_cv initialised */
    block *blocks;
    int *free_stack;
    int nfree;
    int *retry;
    int nretry;
    int in_kernel;
    request *reqs;
    request *pend_head, *pend_tail;
    uint64_t next_id;
    int stop;
    int closed;
    int fatal; /* errno of an io_getevents failure: the context is unusable */
} Reader;

/* ---- helpers; all with r->mu held unless said otherwise ---- */

static void wake(Reader *r) {
    uint64_t one = 1;
    /* EAGAIN only if the counter is about to overflow, which means the thread is awake anyway */
    while (write(r->efd, &one, sizeof one) < 0 && errno == EINTR) {
    }
}

static void maybe_finish(Reader *r, request *q) {
    if (!q->finished && q->blocks == 0 && (q->err || q->assigned == q->length)) {
        q->finished = 1;
        pthread_cond_broadcast(&r->done_cv);
    }
}

static void fail(Reader *r, request *q, int err, int64_t at) {
    if (!q->err || at < q->err_offset) {
        q->err = err;
        q->err_offset = at;
    }
    if (r->pend_head == q) { /* only the head can have unassigned bytes left */
        r->pend_head = q->pnext;
        if (!r->pend_head) r->pend_tail = NULL;
    }
}

static void release_block(Reader *r, int b) {
    request *q = r->blocks[b].req;
    r->blocks[b].req = NULL;
    r->free_stack[r->nfree++] = b;
    q->blocks--;
    maybe_finish(r, q);
}

static void complete(Reader *r, const struct io_event *ev) {
    int b = (int)ev->data;
    block *blk = &r->blocks[b];
    request *q = blk->req;
    int64_t res = ev->res;
    uint64_t want = blk->cb.aio_nbytes;
    r->in_kernel--;
    if (r->test_short_reads && !blk->shortened && res == (int64_t)want && want > 4096) {
        res = (int64_t)((want / 2) & ~(uint64_t)4095); /* the rest is read again */
        blk->shortened = 1;
    }
    if (res < 0) {
        int e = (int)-res;
        if ((e == EINTR || e == EAGAIN) && blk->retries++ < MAX_RETRIES && !q->err && !r->stop) {
            r->retry[r->nretry++] = b;
            return;
        }
        fail(r, q, e, (int64_t)blk->cb.aio_offset);
    } else if ((uint64_t)res < want) {
        q->nread += (uint64_t)res;
        int64_t at = (int64_t)blk->cb.aio_offset + res;
        /* 0 bytes, or an O_DIRECT read cut off the 4096 grid that every request is on: the
         * file ended (resubmitting the unaligned rest would only fail with EINVAL). */
        if (res == 0 || (q->direct && (res % 4096) != 0)) {
            fail(r, q, ERR_EOF, at);
        } else if (!q->err && !r->stop) {
            blk->cb.aio_buf += (uint64_t)res;
            blk->cb.aio_offset += res;
            blk->cb.aio_nbytes -= (uint64_t)res;
            r->retry[r->nretry++] = b;
            return;
        } else if (!q->err) {
            fail(r, q, ECANCELED, at);
        }
    } else {
        q->nread += (uint64_t)res;
    }
    release_block(r, b);
}

/* Fill `batch` with blocks to submit: retries first, then new blocks from the oldest request. */
static int fill(Reader *r, struct iocb **batch) {
    int n = 0;
    if (r->stop) { /* closing: cancel what the kernel has not seen yet */
        while (r->nretry) {
            int b = r->retry[--r->nretry];
            fail(r, r->blocks[b].req, ECANCELED, (int64_t)r->blocks[b].cb.aio_offset);
            release_block(r, b);
        }
        while (r->pend_head) {
            request *q = r->pend_head;
            fail(r, q, ECANCELED, q->offset + (int64_t)q->assigned);
            maybe_finish(r, q);
        }
        return 0;
    }
    while (r->nretry) batch[n++] = &r->blocks[r->retry[--r->nretry]].cb;
    while (r->nfree && r->pend_head) {
        request *q = r->pend_head;
        int b = r->free_stack[--r->nfree];
        block *blk = &r->blocks[b];
        uint64_t len = q->length - q->assigned;
        if (len > r->block_size) len = r->block_size;
        memset(&blk->cb, 0, sizeof blk->cb);
        blk->cb.aio_data = (uint64_t)b;
        blk->cb.aio_lio_opcode = IOCB_CMD_PREAD;
        blk->cb.aio_fildes = (uint32_t)q->fd;
        blk->cb.aio_buf = (uint64_t)(uintptr_t)(q->dest + q->assigned);
        blk->cb.aio_nbytes = len;
        blk->cb.aio_offset = q->offset + (int64_t)q->assigned;
        blk->cb.aio_flags = IOCB_FLAG_RESFD;
        blk->cb.aio_resfd = (uint32_t)r->efd;
        blk->req = q;
        blk->retries = 0;
        blk->shortened = 0;
        q->assigned += len;
        q->blocks++;
        if (q->assigned == q->length) {
            r->pend_head = q->pnext;
            if (!r->pend_head) r->pend_tail = NULL;
        }
        batch[n++] = &blk->cb;
    }
    return n;
}

/* ---- the I/O thread (no GIL, never calls into Python) ---- */

static void *io_main(void *arg) {
    Reader *r = arg;
    struct iocb **batch = malloc(sizeof *batch * (size_t)r->qd);
    struct io_event *events = malloc(sizeof *events * (size_t)r->qd);
    pthread_mutex_lock(&r->mu);
    if (!batch || !events) r->fatal = ENOMEM;
    pthread_mutex_unlock(&r->mu);
    for (;;) {
        pthread_mutex_lock(&r->mu);
        if (r->fatal) { /* fail everything; nothing is in the kernel (or it never will be reaped) */
            r->stop = 1;
        }
        int n = batch && events ? fill(r, batch) : 0;
        int idle = r->stop && r->in_kernel == 0 && r->nretry == 0;
        pthread_mutex_unlock(&r->mu);
        if (idle && n == 0) break;

        int sent = 0, again = 0;
        while (sent < n) {
            long ret = sys_io_submit(r->ctx, n - sent, batch + sent);
            int e = ret < 0 ? errno : EAGAIN;
            pthread_mutex_lock(&r->mu);
            if (ret > 0) {
                r->in_kernel += (int)ret;
                sent += (int)ret;
            } else if (e == EAGAIN || e == EINTR) { /* kernel short of resources: retry later */
                while (sent < n) r->retry[r->nretry++] = (int)batch[--n]->aio_data;
                again = 1;
            } else { /* this block is refused (EINVAL: misaligned, EBADF, ...): fail its request */
                int b = (int)batch[sent]->aio_data;
                fail(r, r->blocks[b].req, e, (int64_t)batch[sent]->aio_offset);
                release_block(r, b);
                sent++;
            }
            pthread_mutex_unlock(&r->mu);
        }

        pthread_mutex_lock(&r->mu);
        int in_kernel = r->in_kernel;
        pthread_mutex_unlock(&r->mu);
        if (again && in_kernel == 0) {
            struct timespec ms = {0, 1000000L};
            nanosleep(&ms, NULL);
            continue;
        }
        /* Sleep until a completion or a submit()/close() bumps the eventfd. The counter keeps
         * every bump made since the last read, so no wake-up is lost. */
        uint64_t count;
        if (read(r->efd, &count, sizeof count) < 0 && errno != EINTR && errno != EAGAIN) {
            int e = errno;
            pthread_mutex_lock(&r->mu);
            r->fatal = e;
            pthread_mutex_unlock(&r->mu);
        }
        if (in_kernel == 0) continue;
        struct timespec zero = {0, 0};
        long got = sys_io_getevents(r->ctx, 0, r->qd, events, &zero);
        int e = got < 0 ? errno : 0;
        pthread_mutex_lock(&r->mu);
        if (got < 0 && e != EINTR) r->fatal = e;
        for (long i = 0; i < got; i++) complete(r, &events[i]);
        int fatal = r->fatal;
        pthread_mutex_unlock(&r->mu);
        if (fatal) break;
    }
    free(batch);
    free(events);
    pthread_mutex_lock(&r->mu);
    if (r->in_kernel) { /* only after a fatal error: io_destroy waits for the kernel to finish
                         * with the buffers, so no request below ends while still being written */
        pthread_mutex_unlock(&r->mu);
        sys_io_destroy(r->ctx);
        pthread_mutex_lock(&r->mu);
        r->ctx = 0;
        r->in_kernel = 0;
    }
    /* Fail requests still waiting (only after a fatal error). */
    r->stop = 1;
    while (r->pend_head) fail(r, r->pend_head, r->fatal ? r->fatal : ECANCELED, 0);
    for (request *q = r->reqs; q; q = q->next) {
        if (!q->finished) {
            if (!q->err) fail(r, q, r->fatal ? r->fatal : ECANCELED, q->offset);
            q->finished = 1;
        }
    }
    pthread_cond_broadcast(&r->done_cv);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* ---- Python type ---- */

static request *find(Reader *r, uint64_t id, request ***link) {
    request **p = &r->reqs;
    while (*p && (*p)->id != id) p = &(*p)->next;
    if (link) *link = p;
    return *p;
}

static void free_request(request *q) {
    free(q->path);
    free(q);
}

static PyObject *raise_failure(const request *q) {
    char where[512];
    if (q->path)
        snprintf(where, sizeof where, "%s", q->path);
    else
        snprintf(where, sizeof where, "fd %d", q->fd);
    PyObject *exc;
    if (q->err == ERR_EOF) {
        exc = PyObject_CallFunction(
            PyExc_EOFError, "s",
            "unexpected end of file (truncated?)");
    } else {
        exc = PyObject_CallFunction(PyExc_OSError, "is", q->err, strerror(q->err));
    }
    if (!exc) return NULL;
    PyObject *at = PyLong_FromLongLong(q->err_offset);
    PyObject *nread = PyLong_FromUnsignedLongLong(q->nread);
    PyObject *file = PyUnicode_DecodeFSDefault(where);
    if (at && nread && file) {
        /* structured fields for the Python layer's message */
        PyObject_SetAttrString(exc, "offset", at);
        PyObject_SetAttrString(exc, "nread", nread);
        PyObject_SetAttrString(exc, "where", file);
    }
    Py_XDECREF(at);
    Py_XDECREF(nread);
    Py_XDECREF(file);
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

static void shutdown_reader(Reader *r) {
    if (r->closed) return;
    r->closed = 1;
    if (r->thread_started) {
        pthread_mutex_lock(&r->mu);
        r->stop = 1;
        pthread_mutex_unlock(&r->mu);
        wake(r);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(r->thread, NULL);
        Py_END_ALLOW_THREADS
        r->thread_started = 0;
    }
    if (r->ctx) { /* waits for any block still in the kernel */
        Py_BEGIN_ALLOW_THREADS
        sys_io_destroy(r->ctx);
        Py_END_ALLOW_THREADS
        r->ctx = 0;
    }
    if (r->efd >= 0) close(r->efd);
    r->efd = -1;
    if (r->sync_ready) { /* under mu: a wait() in another thread may be scanning the list */
        pthread_mutex_lock(&r->mu);
        while (r->reqs) {
            request *q = r->reqs;
            r->reqs = q->next;
            free_request(q);
        }
        r->pend_head = r->pend_tail = NULL;
        pthread_mutex_unlock(&r->mu);
    }
}

static void Reader_dealloc(Reader *r) {
    shutdown_reader(r);
    if (r->sync_ready) {
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->done_cv);
    }
    free(r->blocks);
    free(r->free_stack);
    free(r->retry);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Reader *r = (Reader *)type->tp_alloc(type, 0);
    if (r) {
        r->efd = -1;
        r->closed = 1; /* until __init__ succeeds */
    }
    return (PyObject *)r;
}

static int Reader_init(Reader *r, PyObject *args, PyObject *kw) {
    static char *names[] = {"queue_depth", "block_size", "test_short_reads", NULL};
    int qd = 32, test_short = 0;
    unsigned long long bs = 1 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iKp", names, &qd, &bs, &test_short)) return -1;
    if (!r->closed || r->sync_ready) {
        PyErr_SetString(PyExc_RuntimeError, "Reader is already initialised");
        return -1;
    }
    if (qd < 1 || qd > 4096) {
        PyErr_Format(PyExc_ValueError, "queue_depth %d not in [1, 4096]", qd);
        return -1;
    }
    if (bs == 0 || bs % 4096 || bs > (1ULL << 30)) {
        PyErr_Format(PyExc_ValueError, "block_size %llu is not a multiple of 4096 in (0, 1 GiB]",
                     bs);
        return -1;
    }
    r->qd = qd;
    r->block_size = bs;
    r->test_short_reads = test_short;
    r->next_id = 1;
    r->blocks = calloc((size_t)qd, sizeof *r->blocks);
    r->free_stack = calloc((size_t)qd, sizeof *r->free_stack);
    r->retry = calloc((size_t)qd, sizeof *r->retry);
    if (!r->blocks || !r->free_stack || !r->retry) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < qd; i++) r->free_stack[i] = qd - 1 - i;
    r->nfree = qd;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    r->sync_ready = 1;
    r->closed = 0;
    r->efd = eventfd(0, EFD_CLOEXEC);
    if (r->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        shutdown_reader(r);
        return -1;
    }
    if (sys_io_setup((unsigned)qd, &r->ctx) < 0) {
        int e = errno;
        r->ctx = 0;
        shutdown_reader(r);
        PyErr_Format(PyExc_OSError, "io_setup(%d) failed: %s (see /proc/sys/fs/aio-max-nr)", qd,
                     strerror(e));
        return -1;
    }
    /* The I/O thread blocks every signal: they belong to Python's main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&r->thread, NULL, io_main, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        shutdown_reader(r);
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->thread_started = 1;
    return 0;
}

static int check_open(Reader *r) {
    if (r->closed) {
        PyErr_SetString(PyExc_ValueError, "I/O operation on a closed Reader");
        return -1;
    }
    return 0;
}

static PyObject *Reader_open(Reader *r, PyObject *args, PyObject *kw) {
    static char *names[] = {"path", "direct", NULL};
    PyObject *path = NULL;
    int direct = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|p", names, PyUnicode_FSConverter, &path,
                                     &direct))
        return NULL;
    int fd;
    const char *p = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS
    fd = open(p, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(path);
        return NULL;
    }
    Py_DECREF(path);
    return PyLong_FromLong(fd);
}

static PyObject *Reader_submit(Reader *r, PyObject *args, PyObject *kw) {
    static char *names[] = {"fd", "offset", "length", "dest", "path", NULL};
    int fd;
    long long offset, length;
    unsigned long long dest;
    PyObject *path = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iLLK|O&", names, &fd, &offset, &length, &dest,
                                     PyUnicode_FSConverter, &path))
        return NULL;
    if (check_open(r) < 0 || offset < 0 || length < 0) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "negative offset %lld or length %lld", offset, length);
        Py_XDECREF(path);
        return NULL;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) {
        Py_XDECREF(path);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    request *q = calloc(1, sizeof *q);
    if (!q) {
        Py_XDECREF(path);
        return PyErr_NoMemory();
    }
    q->fd = fd;
    q->direct = (flags & O_DIRECT) != 0;
    q->offset = offset;
    q->length = (uint64_t)length;
    q->dest = (char *)(uintptr_t)dest;
    if (path) {
        q->path = strdup(PyBytes_AS_STRING(path));
        Py_DECREF(path);
    }
    pthread_mutex_lock(&r->mu);
    q->id = r->next_id++;
    q->next = r->reqs;
    r->reqs = q;
    if (r->stop) {
        fail(r, q, r->fatal ? r->fatal : ECANCELED, offset);
        q->finished = 1;
    } else if (length == 0) {
        q->finished = 1;
    } else {
        if (r->pend_tail)
            r->pend_tail->pnext = q;
        else
            r->pend_head = q;
        r->pend_tail = q;
    }
    uint64_t id = q->id;
    pthread_mutex_unlock(&r->mu);
    wake(r);
    return PyLong_FromUnsignedLongLong(id);
}

static PyObject *Reader_done(Reader *r, PyObject *arg) {
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || check_open(r) < 0) return NULL;
    pthread_mutex_lock(&r->mu);
    request *q = find(r, id, NULL);
    int fin = q ? q->finished : -1;
    pthread_mutex_unlock(&r->mu);
    if (fin < 0) return PyErr_Format(PyExc_KeyError, "unknown request id %llu", id);
    return PyBool_FromLong(fin);
}

/* wait(id, timeout=None) -> True when the request completed (it is then forgotten), False when
 * the timeout passed first. A failed request raises OSError/EOFError carrying .offset (the file
 * offset of the failure), .nread and .where. */
static PyObject *Reader_wait(Reader *r, PyObject *args, PyObject *kw) {
    static char *names[] = {"id", "timeout", NULL};
    unsigned long long id;
    PyObject *timeout_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|O", names, &id, &timeout_obj)) return NULL;
    if (check_open(r) < 0) return NULL;
    double timeout = -1.0;
    if (timeout_obj != Py_None) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (PyErr_Occurred()) return NULL;
        if (timeout < 0) timeout = 0;
    }
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        request *q, **link;
        int state; /* -1 unknown, 0 pending, 1 finished (unlinked into q) */
        struct timespec now, until;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double elapsed = (double)(now.tv_sec - start.tv_sec) + 1e-9 * (double)(now.tv_nsec - start.tv_nsec);
        double slice = 0.1;
        if (timeout >= 0 && timeout - elapsed < slice) slice = timeout - elapsed;
        if (slice < 0) slice = 0;
        until = now;
        until.tv_nsec += (long)(slice * 1e9);
        until.tv_sec += until.tv_nsec / 1000000000L;
        until.tv_nsec %= 1000000000L;
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&r->mu);
        q = find(r, id, &link);
        if (q && !q->finished && slice > 0) pthread_cond_timedwait(&r->done_cv, &r->mu, &until);
        q = find(r, id, &link); /* another thread may have consumed it meanwhile */
        state = !q ? -1 : q->finished;
        if (state == 1) *link = q->next;
        pthread_mutex_unlock(&r->mu);
        Py_END_ALLOW_THREADS
        if (state < 0) return PyErr_Format(PyExc_KeyError, "unknown request id %llu", id);
        if (state == 1) {
            PyObject *res = q->err ? raise_failure(q) : Py_NewRef(Py_True);
            free_request(q);
            return res;
        }
        if (PyErr_CheckSignals() < 0) return NULL;
        if (timeout >= 0 && elapsed + slice >= timeout) Py_RETURN_FALSE;
    }
}

static PyObject *Reader_close(Reader *r, PyObject *unused) {
    shutdown_reader(r);
    Py_RETURN_NONE;
}

static PyObject *Reader_get_qd(Reader *r, void *c) { return PyLong_FromLong(r->qd); }
static PyObject *Reader_get_bs(Reader *r, void *c) {
    return PyLong_FromUnsignedLongLong(r->block_size);
}

static PyMethodDef Reader_methods[] = {
    {"open", (PyCFunction)(void (*)(void))Reader_open, METH_VARARGS | METH_KEYWORDS,
     "open(path, direct=True) -> fd. O_RDONLY | O_CLOEXEC, plus O_DIRECT when direct."},
    {"submit", (PyCFunction)(void (*)(void))Reader_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(fd, offset, length, dest, path=None) -> request id. Reads `length` bytes at file "
     "`offset` into the memory at address `dest`, which must stay valid until wait() returns. "
     "For O_DIRECT fds, offset, length and dest must be aligned to the logical block size."},
    {"done", (PyCFunction)Reader_done, METH_O, "done(id) -> bool, without consuming the request."},
    {"wait", (PyCFunction)(void (*)(void))Reader_wait, METH_VARARGS | METH_KEYWORDS,
     "wait(id, timeout=None) -> True when complete, False on timeout; raises OSError (errno) "
     "or EOFError with attributes offset, nread, where on failure."},
    {"close", (PyCFunction)Reader_close, METH_NOARGS,
     "Cancel reads not yet submitted, wait for those in the kernel, free the context."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"queue_depth", (getter)Reader_get_qd, NULL, "blocks in flight at most", NULL},
    {"block_size", (getter)Reader_get_bs, NULL, "bytes per block", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zeroinf._native_aio.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reader(queue_depth=32, block_size=1<<20): asynchronous reads with kernel AIO.",
    .tp_new = Reader_new,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zeroinf._native_aio",
    "Asynchronous O_DIRECT reads over the kernel AIO syscalls (no libaio needed).", -1, NULL,
};

PyMODINIT_FUNC PyInit__native_aio(void) {
    if (PyType_Ready(&ReaderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
