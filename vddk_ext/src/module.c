/*
 * module.c: the CPython wrapper vddk_ext._vddk_ext over the blockio core.
 *
 * Types: Disk (one bio_disk and a mutex), BlockReader (an iterator of
 * Batch over a copied block list, owning a free list of buffers), Batch
 * (one buffer: data, block numbers and zero flags; exports its data through
 * the buffer protocol), and two internal helpers (_BatchArray for the 'Q'
 * and 'B' arrays, _BatchIter for iter(batch)).
 *
 * Locking: every use of a bio_disk happens with the GIL released and the
 * Disk's mutex held, so one handle is never used by two threads at once and
 * close() cannot free it under a reader. Buffer lifetime: a Batch holds its
 * reader; its buffer goes back to the reader's free list when the Batch is
 * deallocated, which cannot happen while a memoryview of it (export count
 * > 0) is alive, since every such view holds a reference to the Batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "module.h"

#define FREE_LIST_MAX 4   /* buffers kept for reuse per reader */

PyObject *DiskError;

PyObject *raise_bio(const bio_error *e)
{
    PyObject *msg = PyUnicode_DecodeFSDefault(e->msg);
    PyObject *args;

    if (e->vix != 0)
        return raise_vix(e);
    if (msg == NULL)
        return NULL;
    args = Py_BuildValue("(iN)", e->err, msg);
    if (args != NULL) {
        PyErr_SetObject(DiskError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *raise_closed(const char *what)
{
    PyErr_Format(PyExc_ValueError, "%s is closed", what);
    return NULL;
}

/* A 1-D C-contiguous buffer of native uint64; on success the caller releases view. */
static int get_u64_buffer(PyObject *obj, Py_buffer *view)
{
    const char *f;

    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
        PyErr_Format(PyExc_TypeError, "blocks must be a 1-D C-contiguous buffer of uint64, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || *f == (PY_LITTLE_ENDIAN ? '<' : '>'))
        f++;
    if (view->ndim != 1 || view->itemsize != 8
        || !(strcmp(f, "Q") == 0 || (strcmp(f, "L") == 0 && sizeof(unsigned long) == 8))) {
        PyErr_Format(PyExc_TypeError, "blocks must be a 1-D C-contiguous buffer of uint64 "
                     "(got format '%s', ndim %d)", view->format ? view->format : "B", view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int check_block_size(Py_ssize_t block_size)
{
    if (block_size < 0 || !bio_block_size_valid((uint64_t)block_size)) {
        PyErr_Format(PyExc_ValueError, "block_size must be a power of two from %u to %u, not %zd",
                     BIO_MIN_BLOCK_SIZE, BIO_MAX_BLOCK_SIZE, block_size);
        return -1;
    }
    return 0;
}

/* ===================================================================== Disk */

/* Without the GIL: lock the handle and return it, or NULL (unlocked) if closed. */
static bio_disk *lock_disk(DiskObject *self)
{
    bio_disk *d;

    pthread_mutex_lock(&self->lock);
    d = self->disk;
    if (d == NULL)
        pthread_mutex_unlock(&self->lock);
    return d;
}

static int disk_check_open(DiskObject *self)
{
    if (self->disk == NULL) {
        raise_closed("disk");
        return -1;
    }
    return 0;
}

/*
 * Runs `call`, an int expression using the local `d`, with the GIL released
 * and the handle locked; rc becomes CLOSED_RC when the disk is closed.
 */
#define CLOSED_RC 1
#define WITH_DISK(self, rc, call)                \
    Py_BEGIN_ALLOW_THREADS                       \
    bio_disk *d = lock_disk(self);               \
    if (d == NULL) {                             \
        (rc) = CLOSED_RC;                        \
    } else {                                     \
        (rc) = (call);                           \
        pthread_mutex_unlock(&(self)->lock);     \
    }                                            \
    Py_END_ALLOW_THREADS                         \
    if ((self)->kind == BIO_KIND_VDDK)           \
        pyvddk_drain_log();

/* None, or the exception for rc: ValueError when closed, else DiskError. */
static PyObject *disk_result(int rc, const bio_error *e)
{
    if (rc == CLOSED_RC)
        return raise_closed("disk");
    if (rc != 0)
        return raise_bio(e);
    Py_RETURN_NONE;
}

static PyObject *open_local(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "writable", "create_size", "direct", NULL};
    PyObject *path = NULL, *create_obj = Py_None, *encoded;
    int writable = 0, direct = 0, rc;
    long long create_size = 0;
    bio_disk *d = NULL;
    bio_error err;

    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&|$pOp:open_local", kwlist,
                                     PyUnicode_FSDecoder, &path, &writable, &create_obj,
                                     &direct))
        return NULL;
    if (create_obj != Py_None) {
        create_size = PyLong_AsLongLong(create_obj);
        if (create_size == -1 && PyErr_Occurred())
            goto fail;
        if (create_size < 0 || !writable) {
            PyErr_SetString(PyExc_ValueError, create_size < 0 ? "create_size must be >= 0"
                                                              : "create_size requires writable=True");
            goto fail;
        }
    }
    encoded = PyUnicode_EncodeFSDefault(path);
    if (encoded == NULL)
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    rc = bio_open_local(PyBytes_AS_STRING(encoded), writable, create_obj != Py_None,
                        (uint64_t)create_size, direct, &d, &err);
    Py_END_ALLOW_THREADS
    Py_DECREF(encoded);
    if (rc != 0) {
        raise_bio(&err);
        goto fail;
    }
    return disk_wrap(d, path, Py_None);
fail:
    Py_DECREF(path);
    return NULL;
}

PyObject *disk_wrap(bio_disk *d, PyObject *path, PyObject *transport)
{
    DiskObject *self = PyObject_New(DiskObject, &DiskType);
    bio_error err;

    if (self == NULL) {
        Py_BEGIN_ALLOW_THREADS
        bio_close(d, &err);
        Py_END_ALLOW_THREADS
        Py_DECREF(path);
        return NULL;
    }
    self->disk = d;
    pthread_mutex_init(&self->lock, NULL);
    self->path = path;
    self->transport = Py_NewRef(transport);
    self->capacity = d->capacity;
    self->kind = d->kind;
    return (PyObject *)self;
}

static void disk_dealloc(DiskObject *self)
{
    bio_error err;

    if (self->disk != NULL) {   /* nobody else can hold the lock now */
        Py_BEGIN_ALLOW_THREADS
        bio_close(self->disk, &err);
        Py_END_ALLOW_THREADS
        if (self->kind == BIO_KIND_VDDK)
            pyvddk_drain_log();
    }
    pthread_mutex_destroy(&self->lock);
    Py_XDECREF(self->path);
    Py_XDECREF(self->transport);
    PyObject_Free(self);
}

static PyObject *disk_close(DiskObject *self, PyObject *unused)
{
    bio_disk *d;
    bio_error err;
    int rc = 0;

    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    d = lock_disk(self);
    if (d != NULL) {
        self->disk = NULL;
        rc = bio_close(d, &err);
        pthread_mutex_unlock(&self->lock);
    }
    Py_END_ALLOW_THREADS
    if (self->kind == BIO_KIND_VDDK)
        pyvddk_drain_log();
    if (rc != 0)
        return raise_bio(&err);
    Py_RETURN_NONE;
}

/* Disk.reopen(): a second handle on the same local file (bio_reopen_local). */
static PyObject *disk_reopen(DiskObject *self, PyObject *unused)
{
    bio_disk *n = NULL;
    bio_error err;
    int rc = 0;

    (void)unused;
    WITH_DISK(self, rc, bio_reopen_local(d, &n, &err));
    if (rc != 0)
        return disk_result(rc, &err);
    return disk_wrap(n, Py_NewRef(self->path), Py_None);
}

static PyObject *disk_enter(DiskObject *self, PyObject *unused)
{
    (void)unused;
    if (disk_check_open(self) != 0)
        return NULL;
    return Py_NewRef(self);
}

static PyObject *disk_exit(DiskObject *self, PyObject *args)
{
    PyObject *r;

    (void)args;
    r = disk_close(self, NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *disk_allocated_extents(DiskObject *self, PyObject *unused)
{
    bio_extent_list l = {NULL, 0, 0};
    bio_error err;
    int rc = 0;
    PyObject *list;
    size_t i;

    (void)unused;
    WITH_DISK(self, rc, bio_allocated_extents(d, &l, &err));
    if (rc != 0)
        return disk_result(rc, &err);
    list = PyList_New((Py_ssize_t)l.n);
    for (i = 0; list != NULL && i < l.n; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)l.v[i].offset,
                                    (unsigned long long)l.v[i].length);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    bio_extent_list_free(&l);
    return list;
}

static PyObject *disk_pwrite(DiskObject *self, PyObject *args)
{
    long long offset;
    Py_buffer data;
    bio_error err;
    int rc = 0;

    if (!PyArg_ParseTuple(args, "Ly*:pwrite", &offset, &data))
        return NULL;
    if (offset < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "offset must be >= 0");
        return NULL;
    }
    WITH_DISK(self, rc, bio_pwrite(d, (uint64_t)offset, (size_t)data.len, data.buf, &err));
    PyBuffer_Release(&data);
    return disk_result(rc, &err);
}

static PyObject *disk_write_zeroes(DiskObject *self, PyObject *args)
{
    long long offset, length;
    bio_error err;
    int rc = 0;

    if (!PyArg_ParseTuple(args, "LL:write_zeroes", &offset, &length))
        return NULL;
    if (offset < 0 || length < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and length must be >= 0");
        return NULL;
    }
    WITH_DISK(self, rc, bio_write_zeroes(d, (uint64_t)offset, (uint64_t)length, &err));
    return disk_result(rc, &err);
}

static PyObject *disk_flush(DiskObject *self, PyObject *unused)
{
    bio_error err;
    int rc = 0;

    (void)unused;
    WITH_DISK(self, rc, bio_flush(d, &err));
    return disk_result(rc, &err);
}

static PyObject *disk_write_blocks(DiskObject *self, PyObject *args)
{
    Py_ssize_t block_size;
    PyObject *blocks_obj;
    Py_buffer blocks, data;
    bio_error err;
    int rc = 0;

    if (!PyArg_ParseTuple(args, "nOy*:write_blocks", &block_size, &blocks_obj, &data))
        return NULL;
    if (check_block_size(block_size) != 0 || get_u64_buffer(blocks_obj, &blocks) != 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    WITH_DISK(self, rc, bio_write_blocks(d, (uint32_t)block_size, blocks.buf,
                                         (size_t)(blocks.len / 8), data.buf, (size_t)data.len,
                                         &err));
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&data);
    return disk_result(rc, &err);
}

/* The chunks of a write_chunks call: a buffer per chunk, held until the writes are done. */
typedef struct {
    Py_buffer *views;
    Py_ssize_t n;
} chunk_views;

static void release_chunks(chunk_views *c)
{
    Py_ssize_t i;

    for (i = 0; i < c->n; i++)
        PyBuffer_Release(&c->views[i]);
    PyMem_Free(c->views);
}

static int get_chunks(PyObject *seq, chunk_views *c)
{
    PyObject *fast = PySequence_Fast(seq, "chunks must be a sequence of bytes-like objects");
    Py_ssize_t count;

    c->n = 0;
    c->views = NULL;
    if (fast == NULL)
        return -1;
    count = PySequence_Fast_GET_SIZE(fast);
    c->views = PyMem_Calloc(count ? (size_t)count : 1, sizeof(Py_buffer));
    if (c->views == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (; c->n < count; c->n++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, c->n), &c->views[c->n],
                               PyBUF_SIMPLE) != 0) {
            Py_DECREF(fast);
            release_chunks(c);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

/* Chunk i of `c` at the next counts[i] entries of `blocks` (n_blocks: their sum). */
static int write_chunk_list(bio_disk *d, uint32_t block_size, const uint64_t *blocks,
                            size_t n_blocks, const uint64_t *counts, const chunk_views *c,
                            bio_error *e)
{
    const void **data = malloc((c->n ? (size_t)c->n : 1) * sizeof *data);
    size_t *lens = malloc((c->n ? (size_t)c->n : 1) * sizeof *lens);
    Py_ssize_t i;
    int rc = -1;

    if (data == NULL || lens == NULL) {
        bio_fail(e, ENOMEM, "out of memory writing to %s", d->path);
    } else {
        for (i = 0; i < c->n; i++) {
            data[i] = c->views[i].buf;
            lens[i] = (size_t)c->views[i].len;
        }
        rc = bio_write_chunks(d, block_size, blocks, n_blocks, counts, data, lens,
                              (size_t)c->n, e);
    }
    free(data);
    free(lens);
    return rc;
}

/* Whether counts (one per chunk) add up to exactly n_blocks, without overflow. */
static int counts_fit(const Py_buffer *counts, Py_ssize_t n_chunks, uint64_t n_blocks)
{
    const uint64_t *count = counts->buf;
    uint64_t left = n_blocks;
    Py_ssize_t i;

    if (counts->len / 8 != n_chunks)
        return 0;
    for (i = 0; i < n_chunks; i++) {
        if (count[i] > left)
            return 0;
        left -= count[i];
    }
    return left == 0;
}

static PyObject *disk_write_chunks(DiskObject *self, PyObject *args)
{
    Py_ssize_t block_size;
    PyObject *blocks_obj, *counts_obj, *chunks_obj, *result = NULL;
    Py_buffer blocks, counts;
    chunk_views chunks;
    bio_error err;
    int rc = 0;

    if (!PyArg_ParseTuple(args, "nOOO:write_chunks", &block_size, &blocks_obj, &counts_obj,
                          &chunks_obj))
        return NULL;
    if (check_block_size(block_size) != 0 || get_u64_buffer(blocks_obj, &blocks) != 0)
        return NULL;
    if (get_u64_buffer(counts_obj, &counts) != 0) {
        PyBuffer_Release(&blocks);
        return NULL;
    }
    if (get_chunks(chunks_obj, &chunks) != 0) {
        PyBuffer_Release(&blocks);
        PyBuffer_Release(&counts);
        return NULL;
    }
    if (!counts_fit(&counts, chunks.n, (uint64_t)(blocks.len / 8))) {
        PyErr_Format(PyExc_ValueError, "write_chunks: %zd chunks, %zd counts, %zd blocks: need "
                     "one count per chunk, adding up to the number of blocks",
                     chunks.n, counts.len / 8, blocks.len / 8);
    } else {
        WITH_DISK(self, rc, write_chunk_list(d, (uint32_t)block_size, blocks.buf,
                                             (size_t)(blocks.len / 8), counts.buf, &chunks,
                                             &err));
        result = disk_result(rc, &err);
    }
    release_chunks(&chunks);
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&counts);
    return result;
}

static PyObject *disk_reader(DiskObject *self, PyObject *args, PyObject *kwargs);

static PyObject *disk_get_capacity(DiskObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->capacity);
}

static PyObject *disk_get_kind(DiskObject *self, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(bio_kind_name(self->kind));
}

static PyObject *disk_get_transport(DiskObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->transport);
}

static PyObject *disk_get_path(DiskObject *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->path);
}

static PyObject *disk_get_direct(DiskObject *self, void *closure)
{
    int direct = 0;

    (void)closure;
    /* another thread's write holds the lock for as long as the disk takes: waiting for it
       with the GIL held would stop every thread of the process meanwhile */
    Py_BEGIN_ALLOW_THREADS
    bio_disk *d = lock_disk(self);
    if (d != NULL) {
        direct = d->direct;
        pthread_mutex_unlock(&self->lock);
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(direct);
}

static PyObject *disk_get_closed(DiskObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->disk == NULL);
}

static PyObject *disk_repr(DiskObject *self)
{
    return PyUnicode_FromFormat("<vddk_ext.Disk %R kind=%s capacity=%llu%s>", self->path,
                                bio_kind_name(self->kind), (unsigned long long)self->capacity,
                                self->disk == NULL ? " closed" : "");
}

static PyMethodDef disk_methods[] = {
    {"allocated_extents", (PyCFunction)disk_allocated_extents, METH_NOARGS,
     "allocated_extents() -> list of (offset, length) data extents, merged and sorted"},
    {"reader", (PyCFunction)(void (*)(void))disk_reader, METH_VARARGS | METH_KEYWORDS,
     "reader(block_size, blocks, *, batch_bytes=4 MiB, max_request=1 MiB) -> BlockReader"},
    {"write_blocks", (PyCFunction)disk_write_blocks, METH_VARARGS,
     "write_blocks(block_size, blocks, data): write data at every listed block"},
    {"write_chunks", (PyCFunction)disk_write_chunks, METH_VARARGS,
     "write_chunks(block_size, blocks, counts, chunks): chunk i at the next counts[i] of "
     "blocks, all in one call"},
    {"pwrite", (PyCFunction)disk_pwrite, METH_VARARGS, "pwrite(offset, data)"},
    {"write_zeroes", (PyCFunction)disk_write_zeroes, METH_VARARGS,
     "write_zeroes(offset, length): holes on regular files, BLKZEROOUT on block devices"},
    {"flush", (PyCFunction)disk_flush, METH_NOARGS, "flush(): fsync"},
    {"reopen", (PyCFunction)disk_reopen, METH_NOARGS,
     "reopen() -> Disk: another handle on the same local file (writable and direct as this)"},
    {"close", (PyCFunction)disk_close, METH_NOARGS, "close(); idempotent"},
    {"__enter__", (PyCFunction)disk_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)disk_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef disk_getset[] = {
    {"capacity", (getter)disk_get_capacity, NULL, "capacity in bytes", NULL},
    {"kind", (getter)disk_get_kind, NULL, "\"file\", \"blockdev\" or \"vddk\"", NULL},
    {"path", (getter)disk_get_path, NULL, "the path given to open_local or open_vddk", NULL},
    {"transport", (getter)disk_get_transport, NULL,
     "the VDDK transport in use (\"nbdssl\", \"hotadd\", ...), None for local disks", NULL},
    {"direct", (getter)disk_get_direct, NULL,
     "True while aligned writes bypass the page cache (open_local(direct=True))", NULL},
    {"closed", (getter)disk_get_closed, NULL, "True once close() was called", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject DiskType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vddk_ext.Disk",
    .tp_basicsize = sizeof(DiskObject),
    .tp_dealloc = (destructor)disk_dealloc,
    .tp_repr = (reprfunc)disk_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An open disk; made by open_local() or open_vddk().",
    .tp_methods = disk_methods,
    .tp_getset = disk_getset,
};

/* ============================================================ BlockReader */

typedef struct ring_buf {
    struct ring_buf *next;
    unsigned char *data;     /* batch_blocks * block_size bytes, BIO_ALIGN-aligned */
    unsigned char *zero;     /* batch_blocks flags */
    uint64_t blocks[];       /* batch_blocks block numbers */
} ring_buf;

typedef struct {
    PyObject_HEAD
    DiskObject *disk;        /* NULL once closed */
    uint64_t *blocks;
    size_t nblocks, pos;
    size_t block_size, batch_blocks, max_request;
    ring_buf *free_list;
    size_t nfree;
    Py_ssize_t buffers_allocated;
    unsigned long long bytes_read;
    int closed;
} ReaderObject;

static PyTypeObject ReaderType, BatchType, BatchArrayType, BatchIterType;

static void ring_buf_free(ring_buf *b)
{
    free(b->data);
    free(b);
}

static ring_buf *reader_take_buf(ReaderObject *self)
{
    ring_buf *b = self->free_list;

    if (b != NULL) {
        self->free_list = b->next;
        self->nfree--;
        return b;
    }
    b = malloc(sizeof *b + self->batch_blocks * (sizeof(uint64_t) + 1));
    if (b == NULL)
        return (ring_buf *)PyErr_NoMemory();
    b->zero = (unsigned char *)(b->blocks + self->batch_blocks);
    b->data = bio_alloc_aligned(self->batch_blocks * self->block_size);
    if (b->data == NULL) {
        free(b);
        return (ring_buf *)PyErr_NoMemory();
    }
    self->buffers_allocated++;
    return b;
}

static void reader_give_buf(ReaderObject *self, ring_buf *b)
{
    if (self->closed || self->nfree >= FREE_LIST_MAX) {
        ring_buf_free(b);
        return;
    }
    b->next = self->free_list;
    self->free_list = b;
    self->nfree++;
}

static PyObject *disk_reader(DiskObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"block_size", "blocks", "batch_bytes", "max_request", NULL};
    Py_ssize_t block_size, batch_bytes = 4 << 20, max_request = 1 << 20;
    PyObject *blocks_obj;
    Py_buffer view;
    ReaderObject *r;
    bio_error err;
    size_t n, bad = 0;
    int rc = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nO|$nn:reader", kwlist, &block_size,
                                     &blocks_obj, &batch_bytes, &max_request))
        return NULL;
    if (disk_check_open(self) != 0 || check_block_size(block_size) != 0)
        return NULL;
    if (batch_bytes < block_size) {
        PyErr_Format(PyExc_ValueError, "batch_bytes must be >= block_size (%zd), not %zd",
                     block_size, batch_bytes);
        return NULL;
    }
    if (max_request < BIO_ALIGN) {
        PyErr_Format(PyExc_ValueError, "max_request must be >= %d, not %zd", BIO_ALIGN, max_request);
        return NULL;
    }
    if (get_u64_buffer(blocks_obj, &view) != 0)
        return NULL;
    n = (size_t)(view.len / 8);
    r = PyObject_New(ReaderObject, &ReaderType);
    if (r == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    r->disk = (DiskObject *)Py_NewRef(self);
    r->blocks = PyMem_Malloc(n ? n * sizeof(uint64_t) : 1);
    r->nblocks = n;
    r->pos = 0;
    r->block_size = (size_t)block_size;
    r->batch_blocks = (size_t)(batch_bytes / block_size);
    r->max_request = (size_t)max_request;
    r->free_list = NULL;
    r->nfree = 0;
    r->buffers_allocated = 0;
    r->bytes_read = 0;
    r->closed = 0;
    if (r->blocks == NULL) {
        PyBuffer_Release(&view);
        Py_DECREF(r);
        return PyErr_NoMemory();
    }
    memcpy(r->blocks, view.buf, n * sizeof(uint64_t));
    PyBuffer_Release(&view);
    WITH_DISK(self, rc, bio_check_blocks(d, (uint32_t)block_size, r->blocks, n, &bad, &err));
    if (rc != 0) {
        Py_DECREF(r);
        if (rc == -2)   /* not strictly increasing */
            return PyErr_Format(PyExc_ValueError, "%s", err.msg);
        return disk_result(rc, &err);
    }
    return (PyObject *)r;
}

static void reader_release(ReaderObject *self)
{
    ring_buf *b;

    self->closed = 1;
    while ((b = self->free_list) != NULL) {
        self->free_list = b->next;
        ring_buf_free(b);
    }
    self->nfree = 0;
    PyMem_Free(self->blocks);
    self->blocks = NULL;
    self->nblocks = self->pos = 0;
    Py_CLEAR(self->disk);
}

static void reader_dealloc(ReaderObject *self)
{
    reader_release(self);
    PyObject_Free(self);
}

static PyObject *reader_close(ReaderObject *self, PyObject *unused)
{
    (void)unused;
    reader_release(self);
    Py_RETURN_NONE;
}

typedef struct {
    PyObject_HEAD
    ReaderObject *reader;    /* owns the free list the buffer returns to */
    ring_buf *buf;
    Py_ssize_t count;
    size_t block_size;
    uint64_t capacity;
    Py_ssize_t exports;      /* live buffer exports (Batch and _BatchArray) */
} BatchObject;

static PyObject *reader_next(ReaderObject *self)
{
    DiskObject *disk = self->disk;
    size_t n;
    ring_buf *b;
    bio_error err;
    uint64_t nread = 0;
    int rc = 0;
    BatchObject *batch;

    if (self->closed)
        return raise_closed("reader");
    if (self->pos >= self->nblocks)
        return NULL;
    b = reader_take_buf(self);
    if (b == NULL)
        return NULL;
    n = self->nblocks - self->pos;
    if (n > self->batch_blocks)
        n = self->batch_blocks;
    memcpy(b->blocks, self->blocks + self->pos, n * sizeof(uint64_t));
    self->pos += n;          /* reserved: another thread may call next() meanwhile */
    Py_INCREF(disk);         /* close() may drop the reader's reference */
    WITH_DISK(disk, rc, bio_read_blocks(d, (uint32_t)self->block_size, b->blocks, n,
                                        self->max_request, b->data, b->zero, &nread, &err));
    self->bytes_read += nread;
    if (rc != 0) {
        reader_give_buf(self, b);
        Py_DECREF(disk);
        return disk_result(rc, &err);
    }
    batch = PyObject_New(BatchObject, &BatchType);
    if (batch == NULL) {
        reader_give_buf(self, b);
        Py_DECREF(disk);
        return NULL;
    }
    batch->reader = (ReaderObject *)Py_NewRef(self);
    batch->buf = b;
    batch->count = (Py_ssize_t)n;
    batch->block_size = self->block_size;
    batch->capacity = disk->capacity;
    batch->exports = 0;
    Py_DECREF(disk);
    return (PyObject *)batch;
}

static PyMethodDef reader_methods[] = {
    {"close", (PyCFunction)reader_close, METH_NOARGS,
     "close(): stop reading and free the idle buffers; live batches stay valid"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef reader_members[] = {
    {"buffers_allocated", T_PYSSIZET, offsetof(ReaderObject, buffers_allocated), READONLY,
     "how many batch buffers were ever allocated"},
    {"bytes_read", T_ULONGLONG, offsetof(ReaderObject, bytes_read), READONLY,
     "bytes read from the disk so far"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vddk_ext.BlockReader",
    .tp_basicsize = sizeof(ReaderObject),
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An iterator of Batch; made by Disk.reader().",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)reader_next,
    .tp_methods = reader_methods,
    .tp_members = reader_members,
};

/* ==================================================================== Batch */

static void batch_dealloc(BatchObject *self)
{
    /* exports > 0 is impossible (each export holds a reference); leak rather than free. */
    if (self->exports == 0)
        reader_give_buf(self->reader, self->buf);
    Py_DECREF(self->reader);
    PyObject_Free(self);
}

static int batch_getbuffer(BatchObject *self, Py_buffer *view, int flags)
{
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->buf->data,
                          self->count * (Py_ssize_t)self->block_size, 1, flags) != 0)
        return -1;
    self->exports++;
    return 0;
}

static void batch_releasebuffer(BatchObject *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static PyBufferProcs batch_as_buffer = {
    .bf_getbuffer = (getbufferproc)batch_getbuffer,
    .bf_releasebuffer = (releasebufferproc)batch_releasebuffer,
};

/* memoryview of bytes [start, stop) of the batch's data. */
static PyObject *batch_slice(PyObject *mv, Py_ssize_t start, Py_ssize_t stop)
{
    PyObject *a = PyLong_FromSsize_t(start), *b = PyLong_FromSsize_t(stop), *slice, *r;

    slice = (a && b) ? PySlice_New(a, b, NULL) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (slice == NULL)
        return NULL;
    r = PyObject_GetItem(mv, slice);
    Py_DECREF(slice);
    return r;
}

static Py_ssize_t batch_block_len(BatchObject *self, Py_ssize_t k)
{
    return (Py_ssize_t)bio_block_length(self->capacity, (uint32_t)self->block_size,
                                        self->buf->blocks[k]);
}

static PyObject *batch_block(BatchObject *self, PyObject *arg)
{
    Py_ssize_t k = PyLong_AsSsize_t(arg), start;
    PyObject *mv, *r;

    if (k == -1 && PyErr_Occurred())
        return NULL;
    if (k < 0 || k >= self->count) {
        PyErr_Format(PyExc_IndexError, "block index %zd out of range (count %zd)", k, self->count);
        return NULL;
    }
    mv = PyMemoryView_FromObject((PyObject *)self);
    if (mv == NULL)
        return NULL;
    start = k * (Py_ssize_t)self->block_size;
    r = batch_slice(mv, start, start + batch_block_len(self, k));
    Py_DECREF(mv);
    return r;
}

typedef struct {
    PyObject_HEAD
    BatchObject *batch;
    void *ptr;
    Py_ssize_t shape, itemsize;
    char *format;
} BatchArrayObject;

static PyObject *batch_array(BatchObject *self, void *ptr, Py_ssize_t itemsize, char *format)
{
    BatchArrayObject *a = PyObject_New(BatchArrayObject, &BatchArrayType);
    PyObject *mv;

    if (a == NULL)
        return NULL;
    a->batch = (BatchObject *)Py_NewRef(self);
    a->ptr = ptr;
    a->shape = self->count;
    a->itemsize = itemsize;
    a->format = format;
    mv = PyMemoryView_FromObject((PyObject *)a);
    Py_DECREF(a);
    return mv;
}

static PyObject *batch_get_blocks(BatchObject *self, void *closure)
{
    (void)closure;
    return batch_array(self, self->buf->blocks, 8, "Q");
}

static PyObject *batch_get_zero(BatchObject *self, void *closure)
{
    (void)closure;
    return batch_array(self, self->buf->zero, 1, "B");
}

static PyObject *batch_get_data(BatchObject *self, void *closure)
{
    (void)closure;
    return PyMemoryView_FromObject((PyObject *)self);
}

static PyObject *batch_get_count(BatchObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->count);
}

static PyObject *batch_iter(BatchObject *self);

static PyObject *batch_repr(BatchObject *self)
{
    return PyUnicode_FromFormat("<vddk_ext.Batch count=%zd first=%llu>", self->count,
                                (unsigned long long)(self->count ? self->buf->blocks[0] : 0));
}

static PyMethodDef batch_methods[] = {
    {"block", (PyCFunction)batch_block, METH_O,
     "block(k) -> memoryview of block k's bytes (short for the disk's last block)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef batch_getset[] = {
    {"count", (getter)batch_get_count, NULL, "blocks in this batch", NULL},
    {"blocks", (getter)batch_get_blocks, NULL, "memoryview 'Q' of the block numbers", NULL},
    {"zero", (getter)batch_get_zero, NULL, "memoryview 'B': 1 where the block is all zero", NULL},
    {"data", (getter)batch_get_data, NULL, "read-only memoryview of count * block_size bytes", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vddk_ext.Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_dealloc = (destructor)batch_dealloc,
    .tp_repr = (reprfunc)batch_repr,
    .tp_as_buffer = &batch_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Blocks read by one BlockReader.__next__; its buffer is reused once released.",
    .tp_iter = (getiterfunc)batch_iter,
    .tp_methods = batch_methods,
    .tp_getset = batch_getset,
};

/* ========================================================== _BatchArray */

static void batch_array_dealloc(BatchArrayObject *self)
{
    Py_DECREF(self->batch);
    PyObject_Free(self);
}

static int batch_array_getbuffer(BatchArrayObject *self, Py_buffer *view, int flags)
{
    if (flags & PyBUF_WRITABLE) {
        PyErr_SetString(PyExc_BufferError, "batch arrays are read-only");
        view->obj = NULL;
        return -1;
    }
    view->obj = Py_NewRef(self);
    view->buf = self->ptr;
    view->len = self->shape * self->itemsize;
    view->readonly = 1;
    view->itemsize = self->itemsize;
    view->format = (flags & PyBUF_FORMAT) ? self->format : NULL;
    view->ndim = 1;
    view->shape = (flags & PyBUF_ND) ? &self->shape : NULL;
    view->strides = (flags & PyBUF_STRIDES) == PyBUF_STRIDES ? &self->itemsize : NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    self->batch->exports++;
    return 0;
}

static void batch_array_releasebuffer(BatchArrayObject *self, Py_buffer *view)
{
    (void)view;
    self->batch->exports--;
}

static PyBufferProcs batch_array_as_buffer = {
    .bf_getbuffer = (getbufferproc)batch_array_getbuffer,
    .bf_releasebuffer = (releasebufferproc)batch_array_releasebuffer,
};

static PyTypeObject BatchArrayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vddk_ext._BatchArray",
    .tp_basicsize = sizeof(BatchArrayObject),
    .tp_dealloc = (destructor)batch_array_dealloc,
    .tp_as_buffer = &batch_array_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Exports a Batch's block numbers or zero flags.",
};

/* =========================================================== _BatchIter */

typedef struct {
    PyObject_HEAD
    BatchObject *batch;
    PyObject *mv;            /* memoryview of the batch's data */
    Py_ssize_t k;
} BatchIterObject;

static PyObject *batch_iter(BatchObject *self)
{
    BatchIterObject *it;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)self);

    if (mv == NULL)
        return NULL;
    it = PyObject_New(BatchIterObject, &BatchIterType);
    if (it == NULL) {
        Py_DECREF(mv);
        return NULL;
    }
    it->batch = (BatchObject *)Py_NewRef(self);
    it->mv = mv;
    it->k = 0;
    return (PyObject *)it;
}

static void batch_iter_dealloc(BatchIterObject *self)
{
    Py_DECREF(self->mv);
    Py_DECREF(self->batch);
    PyObject_Free(self);
}

static PyObject *batch_iter_next(BatchIterObject *self)
{
    BatchObject *b = self->batch;
    Py_ssize_t k = self->k, start;
    PyObject *view;

    if (k >= b->count)
        return NULL;
    self->k++;
    if (b->buf->zero[k])
        return Py_BuildValue("(KO)", (unsigned long long)b->buf->blocks[k], Py_None);
    start = k * (Py_ssize_t)b->block_size;
    view = batch_slice(self->mv, start, start + batch_block_len(b, k));
    if (view == NULL)
        return NULL;
    return Py_BuildValue("(KN)", (unsigned long long)b->buf->blocks[k], view);
}

static PyTypeObject BatchIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vddk_ext._BatchIter",
    .tp_basicsize = sizeof(BatchIterObject),
    .tp_dealloc = (destructor)batch_iter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Yields (block_number, memoryview or None) for each block of a Batch.",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)batch_iter_next,
};

/* =================================================================== module */

static PyMethodDef module_methods[] = {
    {"open_local", (PyCFunction)(void (*)(void))open_local, METH_VARARGS | METH_KEYWORDS,
     "open_local(path, *, writable=False, create_size=None) -> Disk"},
    {"on_fatal_signal", (PyCFunction)(void (*)(void))on_fatal_signal, METH_VARARGS | METH_KEYWORDS,
     "on_fatal_signal(head, tail, exit_code): on SIGBUS, SIGSEGV, SIGABRT, SIGILL or SIGFPE, "
     "write head + the signal's name + tail to stderr and _exit(exit_code)"},
    PYVDDK_METHODS
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vddk_ext._vddk_ext",
    .m_doc = "Block I/O for vddk_ext: local files, block devices and VDDK disks.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__vddk_ext(void)
{
    PyTypeObject *types[] = {&DiskType, &ReaderType, &BatchType, &BatchArrayType, &BatchIterType};
    const char *names[] = {"Disk", "BlockReader", "Batch", NULL, NULL};
    PyObject *m;
    size_t i;

    for (i = 0; i < sizeof types / sizeof types[0]; i++)
        if (PyType_Ready(types[i]) != 0)
            return NULL;
    m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    DiskError = PyErr_NewExceptionWithDoc(
        "vddk_ext.DiskError", "An I/O error on a disk; errno is set and the message names the disk.",
        PyExc_OSError, NULL);
    if (DiskError == NULL || PyModule_AddObjectRef(m, "DiskError", DiskError) != 0
        || PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) != 0
        || pyvddk_add_to_module(m) != 0)
        goto fail;
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i] != NULL && PyModule_AddObjectRef(m, names[i], (PyObject *)types[i]) != 0)
            goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
