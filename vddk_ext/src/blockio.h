/*
 * blockio: the I/O core of vddk_ext, usable without Python.
 *
 * Words:
 *   disk      an open handle (bio_disk) on a backend; has a capacity in bytes.
 *   backend   a vtable (bio_backend_ops) plus its private context. The local
 *             backend (regular files, block devices) lives in blockio.c; a
 *             VDDK backend (dlopen of libvixDiskLib) fills the same table.
 *   block     block_size bytes at offset block * block_size. The disk's last
 *             block may be short when the capacity is not a multiple of
 *             block_size; its slot in a buffer is zero-filled past the end.
 *   request   one call of ops->read; at most the smaller of the caller's
 *             max_request and the backend's cap (bio_disk.max_request).
 *
 * Conventions: functions return 0 on success and -1 on failure, filling a
 * bio_error with an errno value and a message naming the disk. Nothing here
 * locks: a caller that shares a bio_disk between threads serialises its use.
 */
#ifndef VDDK_EXT_BLOCKIO_H
#define VDDK_EXT_BLOCKIO_H

#include <stddef.h>
#include <stdint.h>

#define BIO_ERRMSG_MAX 1024
#define BIO_ALIGN 4096                   /* buffer and request alignment */
#define BIO_MIN_BLOCK_SIZE 4096u
#define BIO_MAX_BLOCK_SIZE (16u << 20)

#define BIO_VIXTEXT_MAX 256

typedef struct bio_error {
    int err;                    /* errno value */
    char msg[BIO_ERRMSG_MAX];   /* complete message, e.g. "cannot open /x: No such file or directory" */
    uint64_t vix;               /* the VixError when VDDK failed, else 0 (bio_fail clears it) */
    char vix_text[BIO_VIXTEXT_MAX];   /* VDDK's GetErrorText for vix, "" if none */
} bio_error;

/* One read of a vectored request list (bio_backend_ops.readv). */
typedef struct bio_request {
    uint64_t offset;
    size_t len;
    void *buf;
} bio_request;

#define BIO_READV_MAX 64   /* requests handed to one readv call; the most a backend keeps in flight */

typedef struct bio_extent {
    uint64_t offset;
    uint64_t length;
} bio_extent;

typedef struct bio_extent_list {
    bio_extent *v;
    size_t n;
    size_t cap;
} bio_extent_list;

typedef enum bio_kind {
    BIO_KIND_FILE = 0,
    BIO_KIND_BLOCKDEV = 1,
    BIO_KIND_VDDK = 2
} bio_kind;

/*
 * Backend operations. Offsets and lengths are in bytes and already checked
 * against the capacity (and, for writes, the disk is writable). A backend
 * with a sector interface converts; one with a request cap sets
 * bio_disk.max_request so the block read loop never exceeds it.
 */
typedef struct bio_backend_ops {
    const char *name;
    int (*read)(void *ctx, uint64_t offset, size_t len, void *buf, bio_error *e);
    int (*write)(void *ctx, uint64_t offset, size_t len, const void *buf, bio_error *e);
    int (*write_zeroes)(void *ctx, uint64_t offset, uint64_t len, bio_error *e);
    int (*flush)(void *ctx, bio_error *e);
    int (*allocated_extents)(void *ctx, uint64_t capacity, bio_extent_list *out, bio_error *e);
    int (*close)(void *ctx, bio_error *e);   /* frees ctx even when it fails */
    /*
     * Optional (NULL = one read call per request): reads up to BIO_READV_MAX
     * requests, which the backend may have in flight at once (VDDK's
     * ReadAsync + Wait); returns only when none is left in flight, failing
     * with the error of the first request that failed.
     */
    int (*readv)(void *ctx, const bio_request *reqs, size_t n, bio_error *e);
} bio_backend_ops;

typedef struct bio_disk {
    const bio_backend_ops *ops;
    void *ctx;
    char *path;              /* owned copy, used in messages */
    uint64_t capacity;       /* bytes */
    bio_kind kind;
    int writable;
    size_t max_request;      /* backend cap on one request in bytes; 0 = none */
    /* 1 while writes of BIO_ALIGN-aligned requests bypass the page cache (a local disk opened
     * with direct; 0 again if the file system turns such a write down) */
    int direct;
    unsigned char *stage;    /* bio_write_chunks' aligned buffer of stage_size bytes, or NULL */
    size_t stage_size;
} bio_disk;

/* Errors. */
void bio_fail(bio_error *e, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void bio_fail_errno(bio_error *e, int err, const char *fmt, ...)   /* appends ": strerror(err)" */
    __attribute__((format(printf, 3, 4)));

/* Disks. bio_disk_new is for backends: it takes ownership of ctx. */
int bio_disk_new(const bio_backend_ops *ops, void *ctx, const char *path, bio_kind kind,
                 uint64_t capacity, int writable, size_t max_request, bio_disk **out, bio_error *e);
/* direct: writable local disks also get an O_DIRECT descriptor, used for every write whose
 * offset, length and buffer are BIO_ALIGN-aligned (none when the file system refuses it) */
int bio_open_local(const char *path, int writable, int create, uint64_t create_size, int direct,
                   bio_disk **out, bio_error *e);
int bio_reopen_local(bio_disk *d, bio_disk **out, bio_error *e);   /* same file, new handle */
int bio_close(bio_disk *d, bio_error *e);   /* always frees d */
const char *bio_kind_name(bio_kind kind);

/* Byte I/O, bounds-checked against the capacity. */
int bio_pread(bio_disk *d, uint64_t offset, size_t len, void *buf, bio_error *e);
int bio_pwrite(bio_disk *d, uint64_t offset, size_t len, const void *buf, bio_error *e);
int bio_write_zeroes(bio_disk *d, uint64_t offset, uint64_t len, bio_error *e);
int bio_flush(bio_disk *d, bio_error *e);
int bio_allocated_extents(bio_disk *d, bio_extent_list *out, bio_error *e);
int bio_extent_append(bio_extent_list *l, uint64_t offset, uint64_t length);   /* merges; -1 = ENOMEM */
void bio_extent_list_free(bio_extent_list *l);

/* Blocks. */
int bio_block_size_valid(uint64_t block_size);
uint64_t bio_block_length(uint64_t capacity, uint32_t block_size, uint64_t block);
/* 0 = fine; -2 = not strictly increasing (*bad = index); -1 = beyond the end (*bad = index). */
int bio_check_blocks(const bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n,
                     size_t *bad, bio_error *e);
/*
 * The block read loop: reads blocks[0..n) (strictly increasing, on the disk)
 * into buf (n * block_size bytes, BIO_ALIGN-aligned), slot k for blocks[k].
 * Contiguous blocks are merged into requests of at most max_request bytes;
 * a backend with readv gets all of them together (BIO_READV_MAX per call).
 * zero[k] is set to 1 when block k is all zero. On success *bytes_read grows
 * by the bytes read (each block's real length).
 */
int bio_read_blocks(bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n,
                    size_t max_request, unsigned char *buf, unsigned char *zero,
                    uint64_t *bytes_read, bio_error *e);
/*
 * Writes the same data at every listed block. len is block_size, or the real
 * length of the disk's last block; a full-size buffer written at a short last
 * block must be zero past the end of the disk.
 */
int bio_write_blocks(bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n,
                     const void *data, size_t len, bio_error *e);
/*
 * Chunk i (data[i], lens[i] bytes: as for bio_write_blocks) at the next counts[i]
 * entries of blocks (n_blocks in all). On a direct disk the blocks are sorted and
 * each run of consecutive ones is written with one request that bypasses the page
 * cache: straight from the caller's memory when their data follows each other there
 * from a BIO_ALIGN-aligned start (chunks decoded into one aligned buffer, block_size
 * apart), else copied into an aligned buffer of the disk first (up to BIO_STAGE_BYTES).
 */
#define BIO_STAGE_BYTES (2u << 20)
int bio_write_chunks(bio_disk *d, uint32_t block_size, const uint64_t *blocks, size_t n_blocks,
                     const uint64_t *counts, const void *const *data, const size_t *lens,
                     size_t n_chunks, bio_error *e);

/* Helpers. */
int bio_is_zero(const void *p, size_t n);
void *bio_alloc_aligned(size_t n);   /* BIO_ALIGN-aligned; free with free() */

#endif /* VDDK_EXT_BLOCKIO_H */
