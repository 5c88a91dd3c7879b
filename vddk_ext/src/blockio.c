/*
 * blockio.c: disks, the local backend and the block read loop.
 * No Python here; see blockio.h for the words and conventions.
 */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64

#include "blockio.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/fs.h>

#define ZERO_PAGE_SIZE 65536
static const unsigned char zero_page[ZERO_PAGE_SIZE];

/* ------------------------------------------------------------------ errors */

void bio_fail(bio_error *e, int err, const char *fmt, ...)
{
    va_list ap;

    e->err = err;
    e->vix = 0;
    e->vix_text[0] = '\0';
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
}

void bio_fail_errno(bio_error *e, int err, const char *fmt, ...)
{
    char tmp[128];
    const char *s = strerror_r(err, tmp, sizeof tmp);
    size_t used;
    va_list ap;

    e->err = err;
    e->vix = 0;
    e->vix_text[0] = '\0';
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    used = strlen(e->msg);
    snprintf(e->msg + used, sizeof e->msg - used, ": %s", s);
}

/* ----------------------------------------------------------------- helpers */

int bio_is_zero(const void *p, size_t n)
{
    const unsigned char *c = p;
    uint64_t head[2] = {0, 0};

    /* Most data blocks differ from zero in their first bytes. */
    if (n >= sizeof head) {
        memcpy(head, c, sizeof head);
        if (head[0] | head[1])
            return 0;
    }
    while (n > 0) {
        size_t k = n < ZERO_PAGE_SIZE ? n : ZERO_PAGE_SIZE;
        if (memcmp(c, zero_page, k) != 0)
            return 0;
        c += k;
        n -= k;
    }
    return 1;
}

void *bio_alloc_aligned(size_t n)
{
    void *p = NULL;

    if (posix_memalign(&p, BIO_ALIGN, n ? n : 1) != 0)
        return NULL;
    return p;
}

const char *bio_kind_name(bio_kind kind)
{
    switch (kind) {
    case BIO_KIND_FILE: return "file";
    case BIO_KIND_BLOCKDEV: return "blockdev";
    case BIO_KIND_VDDK: return "vddk";
    }
    return "unknown";
}

int bio_extent_append(bio_extent_list *l, uint64_t offset, uint64_t length)
{
    if (length == 0)
        return 0;
    if (l->n > 0 && l->v[l->n - 1].offset + l->v[l->n - 1].length == offset) {
        l->v[l->n - 1].length += length;
        return 0;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        bio_extent *v = realloc(l->v, cap * sizeof *v);
        if (v == NULL)
            return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n].offset = offset;
    l->v[l->n].length = length;
    l->n++;
    return 0;
}

void bio_extent_list_free(bio_extent_list *l)
{
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

/* ------------------------------------------------------------ local backend */

typedef struct local_ctx {
    int fd;
    int dfd;            /* the same file opened with O_DIRECT, or -1 */
    int *direct;        /* the owning disk's flag: cleared with dfd */
    int blockdev;
    const char *path;   /* the owning disk's path */
} local_ctx;

static int aligned(uint64_t offset, size_t len, const void *buf)
{
    return ((offset | len | (uintptr_t)buf) & (BIO_ALIGN - 1)) == 0;
}

/* A file system that opened O_DIRECT but turns its writes down: buffered from now on. */
static void drop_direct(local_ctx *c)
{
    close(c->dfd);
    c->dfd = -1;
    *c->direct = 0;
}

static int local_read(void *ctx, uint64_t offset, size_t len, void *buf, bio_error *e)
{
    local_ctx *c = ctx;
    unsigned char *p = buf;

    while (len > 0) {
        ssize_t n = pread(c->fd, p, len, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            bio_fail_errno(e, errno, "cannot read %zu bytes at offset %" PRIu64 " of %s",
                           len, offset, c->path);
            return -1;
        }
        if (n == 0) {
            bio_fail(e, EIO, "unexpected end of file at offset %" PRIu64 " of %s (file shrank?)",
                     offset, c->path);
            return -1;
        }
        p += n;
        offset += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int local_write(void *ctx, uint64_t offset, size_t len, const void *buf, bio_error *e)
{
    local_ctx *c = ctx;
    const unsigned char *p = buf;

    while (len > 0) {
        /* the aligned front of an aligned write past the page cache, the tail through it */
        int direct = c->dfd >= 0 && len >= BIO_ALIGN && aligned(offset, 0, p);
        size_t take = direct ? len & ~(size_t)(BIO_ALIGN - 1) : len;
        ssize_t n = pwrite(direct ? c->dfd : c->fd, p, take, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EINVAL && direct) {
            drop_direct(c);
            continue;
        }
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            bio_fail_errno(e, err, "cannot write %zu bytes at offset %" PRIu64 " of %s",
                           len, offset, c->path);
            return -1;
        }
        p += n;
        offset += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_zero_buffers(local_ctx *c, uint64_t offset, uint64_t len, bio_error *e)
{
    while (len > 0) {
        size_t k = len < ZERO_PAGE_SIZE ? (size_t)len : ZERO_PAGE_SIZE;
        if (local_write(c, offset, k, zero_page, e) != 0)
            return -1;
        offset += k;
        len -= k;
    }
    return 0;
}

static int unsupported(int err)
{
    return err == EOPNOTSUPP || err == ENOSYS || err == EINVAL || err == ENOTTY;
}

static int local_write_zeroes(void *ctx, uint64_t offset, uint64_t len, bio_error *e)
{
    local_ctx *c = ctx;
    int rc;

    if (!c->blockdev) {
        do {
            rc = fallocate(c->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           (off_t)offset, (off_t)len);
        } while (rc != 0 && errno == EINTR);
    } else if (offset % 512 == 0 && len % 512 == 0) {
        uint64_t range[2] = {offset, len};
        rc = ioctl(c->fd, BLKZEROOUT, range);
    } else {
        rc = -1;
        errno = EINVAL;
    }
    if (rc == 0)
        return 0;
    if (!unsupported(errno)) {
        bio_fail_errno(e, errno, "cannot zero %" PRIu64 " bytes at offset %" PRIu64 " of %s",
                       len, offset, c->path);
        return -1;
    }
    return write_zero_buffers(c, offset, len, e);
}

static int local_flush(void *ctx, bio_error *e)
{
    local_ctx *c = ctx;
    int rc;

    do {
        rc = fsync(c->fd);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
        bio_fail_errno(e, errno, "cannot flush %s", c->path);
        return -1;
    }
    return 0;
}

/* Data extents of a regular file by SEEK_DATA/SEEK_HOLE; 1 = unsupported. */
static int seek_extents(local_ctx *c, uint64_t capacity, bio_extent_list *out, bio_error *e)
{
    off_t pos = 0;

    while ((uint64_t)pos < capacity) {
        off_t data = lseek(c->fd, pos, SEEK_DATA), hole;
        if (data < 0 && errno == ENXIO)
            return 0;
        if (data < 0 && errno == EINVAL && out->n == 0)
            return 1;
        if (data < 0)
            goto fail;
        hole = lseek(c->fd, data, SEEK_HOLE);
        if (hole < 0)
            goto fail;
        if ((uint64_t)data >= capacity)
            return 0;
        if ((uint64_t)hole > capacity)
            hole = (off_t)capacity;
        if (bio_extent_append(out, (uint64_t)data, (uint64_t)(hole - data)) != 0) {
            bio_fail(e, ENOMEM, "out of memory listing the extents of %s", c->path);
            return -1;
        }
        pos = hole;
    }
    return 0;
fail:
    bio_fail_errno(e, errno, "cannot list the allocated extents of %s", c->path);
    return -1;
}

static int local_allocated_extents(void *ctx, uint64_t capacity, bio_extent_list *out, bio_error *e)
{
    local_ctx *c = ctx;

    if (!c->blockdev) {
        int rc = seek_extents(c, capacity, out, e);
        if (rc <= 0)
            return rc;
    }
    if (bio_extent_append(out, 0, capacity) != 0) {
        bio_fail(e, ENOMEM, "out of memory listing the extents of %s", c->path);
        return -1;
    }
    return 0;
}

static int local_close(void *ctx, bio_error *e)
{
    local_ctx *c = ctx;
    int rc, err;

    if (c->dfd >= 0)
        close(c->dfd);
    rc = close(c->fd);   /* never retried on EINTR: the fd is gone on Linux */
    err = errno;

    if (rc != 0 && err != EINTR)
        bio_fail_errno(e, err, "error closing %s", c->path);
    free(c);
    return rc != 0 && err != EINTR ? -1 : 0;
}

static const bio_backend_ops local_ops = {
    .name = "local",
    .read = local_read,
    .write = local_write,
    .write_zeroes = local_write_zeroes,
    .flush = local_flush,
    .allocated_extents = local_allocated_extents,
    .close = local_close,
};

static const char *file_type_name(mode_t mode)
{
    if (S_ISFIFO(mode))
        return "FIFO";
    if (S_ISSOCK(mode))
        return "socket";
    if (S_ISCHR(mode))
        return "character device";
    return "special file";
}

/* Capacity and kind of an open fd; creates to create_size when asked. */
static int local_probe(int fd, const char *path, int create, uint64_t create_size,
                       uint64_t *capacity, int *blockdev, bio_error *e)
{
    struct stat st;

    if (fstat(fd, &st) != 0) {
        bio_fail_errno(e, errno, "cannot stat %s", path);
        return -1;
    }
    if (S_ISDIR(st.st_mode)) {
        bio_fail_errno(e, EISDIR, "cannot open %s", path);
        return -1;
    }
    if (S_ISBLK(st.st_mode)) {
        if (create) {
            bio_fail(e, EINVAL, "cannot open %s: create_size is only for regular files", path);
            return -1;
        }
        if (ioctl(fd, BLKGETSIZE64, capacity) != 0) {
            bio_fail_errno(e, errno, "cannot get the size of block device %s", path);
            return -1;
        }
        *blockdev = 1;
        return 0;
    }
    if (!S_ISREG(st.st_mode)) {
        bio_fail(e, EINVAL, "cannot open %s: it is a %s, not a regular file or block device",
                 path, file_type_name(st.st_mode));
        return -1;
    }
    if (create && ftruncate(fd, (off_t)create_size) != 0) {
        bio_fail_errno(e, errno, "cannot set the size of %s to %" PRIu64, path, create_size);
        return -1;
    }
    *capacity = create ? create_size : (uint64_t)st.st_size;
    *blockdev = 0;
    return 0;
}

/* Back to blocking I/O once the fd is known to be a file or a block device. */
static int clear_nonblock(int fd, const char *path, bio_error *e)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) {
        bio_fail_errno(e, errno, "cannot open %s", path);
        return -1;
    }
    return 0;
}

/* The file of fd opened once more with O_DIRECT (through /proc: the same inode, whatever
 * the path names now), or -1 when the file system or the kernel refuses it. */
static int reopen_direct(int fd)
{
    char proc[64];
    struct stat a, b;
    int dfd;

    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    do {
        dfd = open(proc, O_WRONLY | O_DIRECT | O_CLOEXEC | O_NOCTTY);
    } while (dfd < 0 && errno == EINTR);
    if (dfd < 0)
        return -1;
    if (fstat(fd, &a) != 0 || fstat(dfd, &b) != 0 || a.st_dev != b.st_dev
        || a.st_ino != b.st_ino) {
        close(dfd);
        return -1;
    }
    return dfd;
}

int bio_open_local(const char *path, int writable, int create, uint64_t create_size, int direct,
                   bio_disk **out, bio_error *e)
{
    /* O_NONBLOCK: opening a FIFO with no writer must not hang; its type is refused below */
    int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK
                | (create ? O_CREAT : 0);
    int fd, blockdev = 0;
    uint64_t capacity = 0;
    local_ctx *c;
    bio_disk *d;

    if (create_size > (uint64_t)INT64_MAX) {
        bio_fail(e, EFBIG, "cannot create %s: size %" PRIu64 " is too large", path, create_size);
        return -1;
    }
    do {
        fd = open(path, flags, 0600);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        bio_fail_errno(e, errno, "cannot open %s", path);
        return -1;
    }
    if (local_probe(fd, path, create, create_size, &capacity, &blockdev, e) != 0
        || clear_nonblock(fd, path, e) != 0)
        goto fail;
    c = malloc(sizeof *c);
    if (c == NULL) {
        bio_fail(e, ENOMEM, "out of memory opening %s", path);
        goto fail;
    }
    c->fd = fd;
    c->dfd = writable && direct ? reopen_direct(fd) : -1;
    c->blockdev = blockdev;
    c->path = path;   /* until the disk owns its copy */
    if (bio_disk_new(&local_ops, c, path, blockdev ? BIO_KIND_BLOCKDEV : BIO_KIND_FILE,
                     capacity, writable, 0, &d, e) != 0)
        return -1;   /* bio_disk_new closed c and its fds */
    c->path = d->path;
    c->direct = &d->direct;
    d->direct = c->dfd >= 0;
    *out = d;
    return 0;
fail:
    close(fd);
    return -1;
}

/* A second handle on the file of local disk d (the same inode, through /proc), writable as d
 * is and direct when d is: for writes from several threads at once, each with its own handle
 * (the page cache is bypassed: no contention in it). */
int bio_reopen_local(bio_disk *d, bio_disk **out, bio_error *e)
{
    const local_ctx *old = d->ctx;
    char proc[64];
    local_ctx *c;
    bio_disk *n;
    int fd;

    if (d->ops != &local_ops) {
        bio_fail(e, EINVAL, "cannot reopen %s: only local disks can be", d->path);
        return -1;
    }
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", old->fd);
    do {
        fd = open(proc, (d->writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOCTTY);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        bio_fail_errno(e, errno, "cannot open %s again", d->path);
        return -1;
    }
    c = malloc(sizeof *c);
    if (c == NULL) {
        close(fd);
        bio_fail(e, ENOMEM, "out of memory opening %s", d->path);
        return -1;
    }
    *c = (local_ctx){.fd = fd, .dfd = d->direct ? reopen_direct(fd) : -1,
                     .blockdev = old->blockdev, .path = d->path};
    if (bio_disk_new(&local_ops, c, d->path, d->kind, d->capacity, d->writable, 0, &n, e) != 0)
        return -1;
    c->path = n->path;
    c->direct = &n->direct;
    n->direct = c->dfd >= 0;
    *out = n;
    return 0;
}

/* ------------------------------------------------------------------- disks */

int bio_disk_new(const bio_backend_ops *ops, void *ctx, const char *path, bio_kind kind,
                 uint64_t capacity, int writable, size_t max_request, bio_disk **out, bio_error *e)
{
    bio_disk *d = calloc(1, sizeof *d);
    char *p = strdup(path);

    if (d == NULL || p == NULL) {
        bio_error ignored;
        free(d);
        free(p);
        ops->close(ctx, &ignored);
        bio_fail(e, ENOMEM, "out of memory opening %s", path);
        return -1;
    }
    d->ops = ops;
    d->ctx = ctx;
    d->path = p;
    d->capacity = capacity;
    d->kind = kind;
    d->writable = writable;
    d->max_request = max_request;
    *out = d;
    return 0;
}

int bio_close(bio_disk *d, bio_error *e)
{
    int rc = d->ops->close(d->ctx, e);

    free(d->stage);
    free(d->path);
    free(d);
    return rc;
}

static int check_range(const bio_disk *d, const char *what, uint64_t offset, uint64_t len,
                       bio_error *e)
{
    if (len > d->capacity || offset > d->capacity - len) {
        bio_fail(e, EINVAL, "cannot %s %" PRIu64 " bytes at offset %" PRIu64 " of %s: "
                 "beyond the end of the disk (capacity %" PRIu64 ")",
                 what, len, offset, d->path, d->capacity);
        return -1;
    }
    return 0;
}

static int check_writable(const bio_disk *d, bio_error *e)
{
    if (!d->writable) {
        bio_fail(e, EBADF, "cannot write to %s: the disk is open read-only", d->path);
        return -1;
    }
    return 0;
}

int bio_pread(bio_disk *d, uint64_t offset, size_t len, void *buf, bio_error *e)
{
    if (check_range(d, "read", offset, len, e) != 0)
        return -1;
    return len ? d->ops->read(d->ctx, offset, len, buf, e) : 0;
}

int bio_pwrite(bio_disk *d, uint64_t offset, size_t len, const void *buf, bio_error *e)
{
    if (check_writable(d, e) != 0 || check_range(d, "write", offset, len, e) != 0)
        return -1;
    return len ? d->ops->write(d->ctx, offset, len, buf, e) : 0;
}

int bio_write_zeroes(bio_disk *d, uint64_t offset, uint64_t len, bio_error *e)
{
    if (check_writable(d, e) != 0 || check_range(d, "zero", offset, len, e) != 0)
        return -1;
    return len ? d->ops->write_zeroes(d->ctx, offset, len, e) : 0;
}

int bio_flush(bio_disk *d, bio_error *e)
{
    return d->ops->flush(d->ctx, e);
}

int bio_allocated_extents(bio_disk *d, bio_extent_list *out, bio_error *e)
{
    if (d->ops->allocated_extents(d->ctx, d->capacity, out, e) != 0) {
        bio_extent_list_free(out);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ blocks */

int bio_block_size_valid(uint64_t block_size)
{
    return block_size >= BIO_MIN_BLOCK_SIZE && block_size <= BIO_MAX_BLOCK_SIZE
           && (block_size & (block_size - 1)) == 0;
}

uint64_t bio_block_length(uint64_t capacity, uint32_t block_size, uint64_t block)
{
    uint64_t nblocks = capacity / block_size + (capacity % block_size != 0);

    if (block >= nblocks)
        return 0;
    if (block == nblocks - 1 && capacity % block_size != 0)
        return capacity % block_size;
    return block_size;
}

static int block_beyond_end(const bio_disk *d, uint32_t block_size, uint64_t block, bio_error *e)
{
    bio_fail(e, EINVAL, "block %" PRIu64 " is beyond the end of %s "
             "(capacity %" PRIu64 " bytes, %" PRIu64 " blocks of %" PRIu32 " bytes)",
             block, d->path, d->capacity,
             d->capacity / block_size + (d->capacity % block_size != 0), block_size);
    return -1;
}

int bio_check_blocks(const bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n,
                     size_t *bad, bio_error *e)
{
    size_t i;

    for (i = 1; i < n; i++) {
        if (blocks[i] <= blocks[i - 1]) {
            *bad = i;
            bio_fail(e, EINVAL, "blocks must be strictly increasing: blocks[%zu] = %" PRIu64
                     " follows blocks[%zu] = %" PRIu64, i, blocks[i], i - 1, blocks[i - 1]);
            return -2;
        }
    }
    if (n > 0 && bio_block_length(d->capacity, block_size, blocks[n - 1]) == 0) {
        *bad = n - 1;
        return block_beyond_end(d, block_size, blocks[n - 1], e);
    }
    return 0;
}

/* Bytes per request: the smaller cap, a multiple of BIO_ALIGN, and of block_size if larger. */
static size_t request_size(const bio_disk *d, uint32_t block_size, size_t max_request)
{
    size_t req = max_request;

    if (d->max_request != 0 && d->max_request < req)
        req = d->max_request;
    req -= req % BIO_ALIGN;
    if (req < BIO_ALIGN)
        req = BIO_ALIGN;
    if (req >= block_size)
        req -= req % block_size;
    return req;
}

/*
 * Requests of one batch waiting for the backend's readv: a backend with readv
 * gets all of a batch's requests together (BIO_READV_MAX per call) so that it
 * can keep several in flight; over a network each request then no longer
 * waits for the previous one's round trip.
 */
typedef struct read_queue {
    bio_disk *d;
    bio_request reqs[BIO_READV_MAX];
    size_t n;
} read_queue;

static int queue_flush(read_queue *q, bio_error *e)
{
    size_t n = q->n;

    q->n = 0;
    return n ? q->d->ops->readv(q->d->ctx, q->reqs, n, e) : 0;
}

/* Reads [start, end) into buf in requests of req bytes: queued for readv, else read at once. */
static int read_range(read_queue *q, uint64_t start, uint64_t end, size_t req,
                      unsigned char *buf, bio_error *e)
{
    bio_disk *d = q->d;
    uint64_t pos;

    for (pos = start; pos < end; pos += req) {
        size_t k = end - pos < req ? (size_t)(end - pos) : req;
        if (d->ops->readv == NULL) {
            if (d->ops->read(d->ctx, pos, k, buf + (pos - start), e) != 0)
                return -1;
            continue;
        }
        if (q->n == BIO_READV_MAX && queue_flush(q, e) != 0)
            return -1;
        q->reqs[q->n++] = (bio_request){.offset = pos, .len = k, .buf = buf + (pos - start)};
    }
    return 0;
}

/* Reads (or queues) count contiguous blocks from first into buf; zero-fills past the end. */
static int read_run(read_queue *q, uint32_t block_size, uint64_t first, size_t count, size_t req,
                    unsigned char *buf, uint64_t *bytes, bio_error *e)
{
    uint64_t start = first * block_size;
    uint64_t end = (first + count) * block_size;

    if (end > q->d->capacity)
        end = q->d->capacity;
    memset(buf + (end - start), 0, (size_t)(count * block_size - (end - start)));
    if (read_range(q, start, end, req, buf, e) != 0)
        return -1;
    *bytes += end - start;
    return 0;
}

int bio_read_blocks(bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n,
                    size_t max_request, unsigned char *buf, unsigned char *zero,
                    uint64_t *bytes_read, bio_error *e)
{
    size_t req = request_size(d, block_size, max_request);
    size_t per_request = req >= block_size ? req / block_size : 1;
    size_t i = 0, j, k, bad;
    read_queue q = {.d = d, .n = 0};
    uint64_t bytes = 0;

    if (!bio_block_size_valid(block_size)) {
        bio_fail(e, EINVAL, "invalid block size %" PRIu32, block_size);
        return -1;
    }
    if (bio_check_blocks(d, block_size, blocks, n, &bad, e) != 0)
        return -1;
    while (i < n) {
        for (j = i + 1; j < n && j - i < per_request && blocks[j] == blocks[j - 1] + 1; j++)
            ;
        if (read_run(&q, block_size, blocks[i], j - i, req, buf + i * block_size, &bytes, e) != 0)
            return -1;
        i = j;
    }
    if (queue_flush(&q, e) != 0)
        return -1;
    for (k = 0; k < n; k++)
        zero[k] = (unsigned char)bio_is_zero(buf + k * block_size, block_size);
    *bytes_read += bytes;
    return 0;
}

/* The bytes of block `block` that `len` bytes of data p write (its real length), or 0 with
 * e filled when they cannot be written there. */
static uint64_t block_write_length(const bio_disk *d, uint32_t block_size, uint64_t block,
                                   const unsigned char *p, size_t len, bio_error *e)
{
    uint64_t real = bio_block_length(d->capacity, block_size, block);

    if (real == 0) {
        block_beyond_end(d, block_size, block, e);
        return 0;
    }
    if (len != real && len != block_size) {
        bio_fail(e, EINVAL, "cannot write %zu bytes at block %" PRIu64 " of %s: "
                 "the block is %" PRIu64 " bytes", len, block, d->path, real);
        return 0;
    }
    if (len > real && !bio_is_zero(p + real, len - real)) {
        bio_fail(e, EINVAL, "cannot write block %" PRIu64 " of %s: the data past the end "
                 "of the disk (%" PRIu64 " bytes in) is not zero", block, d->path, real);
        return 0;
    }
    return real;
}

static int check_write(const bio_disk *d, uint32_t block_size, bio_error *e)
{
    if (check_writable(d, e) != 0)
        return -1;
    if (!bio_block_size_valid(block_size)) {
        bio_fail(e, EINVAL, "invalid block size %" PRIu32, block_size);
        return -1;
    }
    return 0;
}

int bio_write_blocks(bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n,
                     const void *data, size_t len, bio_error *e)
{
    const unsigned char *p = data;
    size_t i;

    if (check_write(d, block_size, e) != 0)
        return -1;
    for (i = 0; i < n; i++) {
        uint64_t block = blocks[i];   /* read once: the caller's array may change */
        uint64_t real = block_write_length(d, block_size, block, p, len, e);
        if (real == 0)
            return -1;
        if (d->ops->write(d->ctx, block * block_size, (size_t)real, p, e) != 0)
            return -1;
    }
    return 0;
}

/* One block of a bio_write_chunks call: where, whose data, and its place in the call (so that
 * a block listed twice is still written in the caller's order). */
typedef struct placed_block {
    uint64_t block;
    size_t chunk;
    size_t order;
} placed_block;

static int by_block(const void *a, const void *b)
{
    const placed_block *x = a, *y = b;

    if (x->block != y->block)
        return x->block < y->block ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* The disk's staging buffer, at least `size` bytes and BIO_ALIGN-aligned. */
static unsigned char *stage_of(bio_disk *d, size_t size, bio_error *e)
{
    if (d->stage_size < size) {
        free(d->stage);
        d->stage_size = 0;
        if (posix_memalign((void **)&d->stage, BIO_ALIGN, size) != 0) {
            d->stage = NULL;
            bio_fail(e, ENOMEM, "out of memory writing to %s", d->path);
            return NULL;
        }
        d->stage_size = size;
    }
    return d->stage;
}

/* How many of the sorted blocks v[0..n) follow each other on the disk with their data
 * following each other in the caller's memory from an aligned start (0: the start is not
 * aligned): written with one request straight from there. */
static size_t in_place_run(uint32_t block_size, const placed_block *v, size_t n,
                           const void *const *data)
{
    const unsigned char *first = data[v[0].chunk];
    size_t k = 1;

    if (((uintptr_t)first & (BIO_ALIGN - 1)) != 0)
        return 0;
    while (k < n && v[k].block == v[0].block + k
           && (const unsigned char *)data[v[k].chunk] == first + k * (size_t)block_size)
        k++;
    return k;
}

/* The bytes of the k blocks from `block` on (the disk's last block may be short). */
static size_t run_bytes(const bio_disk *d, uint32_t block_size, uint64_t block, size_t k)
{
    return (k - 1) * (size_t)block_size
           + (size_t)bio_block_length(d->capacity, block_size, block + k - 1);
}

/* The sorted blocks `v` (their real lengths checked), a request per run of consecutive ones:
 * from the caller's memory where their data lies in order there from an aligned start, else
 * copied into the staging buffer first. */
static int write_runs(bio_disk *d, uint32_t block_size, const placed_block *v, size_t n,
                      const void *const *data, bio_error *e)
{
    size_t cap = block_size > BIO_STAGE_BYTES ? block_size : BIO_STAGE_BYTES;
    size_t i = 0, j, k;

    while (i < n) {
        size_t bytes = 0;
        unsigned char *stage;

        if ((k = in_place_run(block_size, v + i, n - i, data)) > 0) {
            if (d->ops->write(d->ctx, v[i].block * block_size,
                              run_bytes(d, block_size, v[i].block, k), data[v[i].chunk], e) != 0)
                return -1;
            i += k;
            continue;
        }
        if ((stage = stage_of(d, cap, e)) == NULL)
            return -1;
        for (j = i; j < n && v[j].block == v[i].block + (j - i) && bytes + block_size <= cap;
             j++) {
            uint64_t real = bio_block_length(d->capacity, block_size, v[j].block);
            memcpy(stage + bytes, data[v[j].chunk], (size_t)real);
            bytes += (size_t)real;
        }
        if (d->ops->write(d->ctx, v[i].block * block_size, bytes, stage, e) != 0)
            return -1;
        i = j;
    }
    return 0;
}

int bio_write_chunks(bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n_blocks,
                     const uint64_t *counts, const void *const *data, const size_t *lens,
                     size_t n_chunks, bio_error *e)
{
    placed_block *v;
    size_t i, k, at = 0;
    int rc = -1;

    if (!d->direct) {   /* the page cache merges small writes: each block as it comes */
        for (i = 0; i < n_chunks; i++) {
            if (bio_write_blocks(d, block_size, blocks + at, (size_t)counts[i], data[i], lens[i],
                                 e) != 0)
                return -1;
            at += counts[i];
        }
        return 0;
    }
    if (check_write(d, block_size, e) != 0)
        return -1;
    v = malloc((n_blocks ? n_blocks : 1) * sizeof *v);
    if (v == NULL) {
        bio_fail(e, ENOMEM, "out of memory writing to %s", d->path);
        return -1;
    }
    for (i = 0; i < n_chunks; i++) {
        for (k = 0; k < counts[i]; k++, at++) {
            if (at == n_blocks) {
                bio_fail(e, EINVAL, "write_chunks: the counts add up to more than %zu blocks",
                         n_blocks);
                goto done;
            }
            v[at] = (placed_block){blocks[at], i, at};   /* read once: the array may change */
            if (block_write_length(d, block_size, v[at].block, data[i], lens[i], e) == 0)
                goto done;
        }
    }
    qsort(v, n_blocks, sizeof *v, by_block);
    rc = write_runs(d, block_size, v, n_blocks, data, e);
done:
    free(v);
    return rc;
}
