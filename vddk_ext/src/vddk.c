/*
 * vddk.c: the VDDK backend (see vddk.h): loading libvixDiskLib, its log
 * queue, connections, and the bio_backend_ops over VixDiskLib_*.
 */
#define _GNU_SOURCE

#include "vddk.h"
#include "vixdisklib.h"

#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SECTOR VIXDISKLIB_SECTOR_SIZE
#define LOG_QUEUE_LEN 256

/* ============================================================== log queue */

static struct {
    pthread_mutex_t lock;
    struct { int level; char text[BIO_VDDK_LOG_MAX]; } q[LOG_QUEUE_LEN];
    size_t head, count;
    unsigned long dropped;
    int pending;   /* count != 0, read without the lock */
} logq = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void log_push(int level, const char *fmt, va_list ap)
{
    char text[BIO_VDDK_LOG_MAX];
    size_t n;

    vsnprintf(text, sizeof text, fmt, ap);
    n = strlen(text);
    while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r'))
        text[--n] = '\0';
    pthread_mutex_lock(&logq.lock);
    if (logq.count == LOG_QUEUE_LEN) {
        logq.dropped++;
    } else {
        size_t slot = (logq.head + logq.count) % LOG_QUEUE_LEN;
        logq.q[slot].level = level;
        memcpy(logq.q[slot].text, text, n + 1);
        logq.count++;
        __atomic_store_n(&logq.pending, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&logq.lock);
}

static void log_info(const char *fmt, va_list ap) { log_push(BIO_VDDK_LOG_INFO, fmt, ap); }
static void log_warn(const char *fmt, va_list ap) { log_push(BIO_VDDK_LOG_WARN, fmt, ap); }
static void log_panic(const char *fmt, va_list ap) { log_push(BIO_VDDK_LOG_PANIC, fmt, ap); }

static void log_note(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_note(int level, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    log_push(level, fmt, ap);
    va_end(ap);
}

int bio_vddk_log_pending(void)
{
    return __atomic_load_n(&logq.pending, __ATOMIC_ACQUIRE);
}

int bio_vddk_log_pop(int *level, char *buf, size_t size, unsigned long *dropped)
{
    int got = 0;

    pthread_mutex_lock(&logq.lock);
    *dropped = logq.dropped;
    logq.dropped = 0;
    if (logq.count > 0) {
        *level = logq.q[logq.head].level;
        snprintf(buf, size, "%s", logq.q[logq.head].text);
        logq.head = (logq.head + 1) % LOG_QUEUE_LEN;
        logq.count--;
        got = 1;
    }
    __atomic_store_n(&logq.pending, logq.count != 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&logq.lock);
    return got;
}

/* ================================================================ library */

#define DECLARE_FN(name, ret, params) ret (*name) params;

static struct {
    pthread_mutex_t lock;      /* library state, ConnectEx/Open/Close/Disconnect */
    void *dl;
    char *libdir, *soname;
    int state;                 /* 0 not loaded, 1 initialised, 2 exited */
    int open_disks;
    struct {
        VDDK_REQUIRED_FUNCTIONS(DECLARE_FN)
        VDDK_OPTIONAL_FUNCTIONS(DECLARE_FN)
    } fn;
} lib = {.lock = PTHREAD_MUTEX_INITIALIZER};

#define FN lib.fn

static const char *const lib_versions[] = {"9", "8", "7", "6"};

int bio_vddk_state(void) { return lib.state; }
const char *bio_vddk_library(void) { return lib.soname; }

int bio_vddk_has(const char *name)
{
#define HAS(fn_name, ret, params) if (strcmp(name, #fn_name) == 0) return FN.fn_name != NULL;
    VDDK_REQUIRED_FUNCTIONS(HAS)
    VDDK_OPTIONAL_FUNCTIONS(HAS)
#undef HAS
    return 0;
}

/* dlopen the first libvixDiskLib.so.N under libdir/lib64, then libdir. */
static void *lib_dlopen(const char *libdir, char **soname, bio_error *e)
{
    static const char *const subdirs[] = {"/lib64", ""};
    char path[4096], why[512] = "";
    size_t i, j;

    for (i = 0; i < 2; i++) {
        for (j = 0; j < sizeof lib_versions / sizeof lib_versions[0]; j++) {
            void *dl;
            snprintf(path, sizeof path, "%s%s/libvixDiskLib.so.%s", libdir, subdirs[i],
                     lib_versions[j]);
            dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
            if (dl != NULL) {
                *soname = strdup(path);
                return dl;
            }
            if (why[0] == '\0' && access(path, F_OK) == 0)   /* there but unloadable: say why */
                snprintf(why, sizeof why, "; %s", dlerror());
        }
    }
    bio_fail(e, ENOENT, "cannot load VDDK: no usable libvixDiskLib.so.9/.8/.7/.6 in %s/lib64 "
             "or %s%s", libdir, libdir, why);
    return NULL;
}

static int lib_resolve(void *dl, const char *soname, bio_error *e)
{
    memset(&FN, 0, sizeof FN);
#define REQUIRED(name, ret, params)                                                      \
    *(void **)&FN.name = dlsym(dl, "VixDiskLib_" #name);                                 \
    if (FN.name == NULL) {                                                               \
        bio_fail(e, ENOSYS, "cannot use VDDK library %s: required function "             \
                 "VixDiskLib_" #name " is missing (a broken or too old VDDK?)", soname);  \
        return -1;                                                                       \
    }
#define OPTIONAL(name, ret, params) *(void **)&FN.name = dlsym(dl, "VixDiskLib_" #name);
    VDDK_REQUIRED_FUNCTIONS(REQUIRED)
    VDDK_OPTIONAL_FUNCTIONS(OPTIONAL)
#undef REQUIRED
#undef OPTIONAL
    /* optional functions come in pairs: use neither unless both exist */
    if (FN.ReadAsync == NULL || FN.Wait == NULL)
        FN.ReadAsync = NULL, FN.Wait = NULL;
    if (FN.QueryAllocatedBlocks == NULL || FN.FreeBlockList == NULL)
        FN.QueryAllocatedBlocks = NULL, FN.FreeBlockList = NULL;
    if (FN.AllocateConnectParams == NULL || FN.FreeConnectParams == NULL)
        FN.AllocateConnectParams = NULL, FN.FreeConnectParams = NULL;
    if (FN.PrepareForAccess == NULL || FN.EndAccess == NULL)
        FN.PrepareForAccess = NULL, FN.EndAccess = NULL;
    return 0;
}

static int vix_errno(VixError err)
{
    switch (VIX_ERROR_CODE(err)) {
    case VIX_E_INVALID_ARG: return EINVAL;
    case VIX_E_FILE_NOT_FOUND: return ENOENT;
    case VIX_E_NOT_SUPPORTED: return EOPNOTSUPP;
    case VIX_E_HOST_TCP_CONN_LOST: return ECONNRESET;
    case VIX_E_DISK_OUTOFRANGE: return ERANGE;
    default: return EIO;
    }
}

/* Fills e for a failed VDDK call: "<what>: VixDiskLib_<fn>: <VDDK's text> (VIX error N)<hint>". */
static void vix_fail(bio_error *e, VixError err, const char *fn, const char *hint,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void vix_fail(bio_error *e, VixError err, const char *fn, const char *hint,
                     const char *fmt, ...)
{
    char what[BIO_ERRMSG_MAX / 2];
    char *text = FN.GetErrorText ? FN.GetErrorText(err, NULL) : NULL;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    bio_fail(e, vix_errno(err), "%s: VixDiskLib_%s: %s (VIX error %" PRIu64 ")%s", what, fn,
             text ? text : "VDDK gave no description", (uint64_t)VIX_ERROR_CODE(err),
             hint ? hint : "");
    e->vix = err;
    snprintf(e->vix_text, sizeof e->vix_text, "%s", text ? text : "");
    if (text != NULL)
        FN.FreeErrorText(text);
}

static int on_main_thread(void)
{
    return (pid_t)syscall(SYS_gettid) == getpid();
}

int bio_vddk_init(const char *libdir, const char *config_file, bio_error *e)
{
    int rc = -1;
    VixError err;
    char *soname = NULL;
    void *dl;

    pthread_mutex_lock(&lib.lock);
    if (lib.state == 1 && strcmp(lib.libdir, libdir) == 0) {
        rc = 0;
    } else if (lib.state == 1) {
        bio_fail(e, EBUSY, "VDDK is already initialised from %s in this process; "
                 "it cannot also be used from %s", lib.libdir, libdir);
    } else if (lib.state == 2) {
        bio_fail(e, EBUSY, "VDDK was shut down (Exit) in this process and cannot be "
                 "initialised again");
    } else if (!on_main_thread()) {
        bio_fail(e, EPERM, "VDDK must be initialised on the main thread "
                 "(call vddk_init() before starting threads)");
    } else if ((dl = lib_dlopen(libdir, &soname, e)) != NULL) {
        if (lib_resolve(dl, soname, e) != 0) {
            dlclose(dl);
            free(soname);
        } else if ((err = FN.InitEx(6, 0, log_info, log_warn, log_panic, libdir,
                                    config_file)) != VIX_OK) {
            vix_fail(e, err, "InitEx", NULL, "cannot initialise VDDK from %s", soname);
            dlclose(dl);
            free(soname);
        } else {
            lib.dl = dl;
            lib.soname = soname;
            lib.libdir = strdup(libdir);
            lib.state = 1;
            rc = 0;
        }
    }
    pthread_mutex_unlock(&lib.lock);
    return rc;
}

int bio_vddk_exit(bio_error *e)
{
    int rc = 0;

    pthread_mutex_lock(&lib.lock);
    if (lib.state == 1 && lib.open_disks > 0) {
        bio_fail(e, EBUSY, "cannot shut VDDK down: %d disk(s) still open", lib.open_disks);
        rc = -1;
    } else if (lib.state == 1) {
        FN.Exit();
        lib.state = 2;   /* the library stays mapped: VDDK's threads may outlive Exit */
    }
    pthread_mutex_unlock(&lib.lock);
    return rc;
}

/* ============================================================ connections */

typedef struct vddk_ctx {
    VixDiskLibConnection conn;
    VixDiskLibHandle handle;
    VixDiskLibConnectParams *params;   /* NULL for a local disk */
    char *strings[8];                  /* our copies the params point to */
    size_t nstrings;
    int use_async;
    size_t queue_depth;                /* async reads in flight at once */
    char transport[32];
    const char *path;                  /* the owning disk's path */
} vddk_ctx;

static char *ctx_strdup(vddk_ctx *c, const char *s)
{
    char *p;

    if (s == NULL)
        return NULL;
    p = strdup(s);
    if (p != NULL)
        c->strings[c->nstrings++] = p;
    return p;
}

/* Frees the connection parameters, wiping the secrets first. */
static void ctx_free_params(vddk_ctx *c)
{
    size_t i;

    if (c->params != NULL) {
        memset(&c->params->creds, 0, sizeof c->params->creds);
        c->params->vmxSpec = c->params->serverName = c->params->thumbPrint = NULL;
        if (FN.FreeConnectParams != NULL)
            FN.FreeConnectParams(c->params);
        else
            free(c->params);
        c->params = NULL;
    }
    for (i = 0; i < c->nstrings; i++) {
        explicit_bzero(c->strings[i], strlen(c->strings[i]));
        free(c->strings[i]);
    }
    c->nstrings = 0;
}

/* What is missing from p for a remote connection (path only when need_path), or NULL. */
static const char *missing_param(const bio_vddk_params *p, int need_path)
{
    if (need_path && (p->path == NULL || !*p->path))
        return "path";
    if (p->server == NULL)
        return need_path ? NULL : "server";
    if (p->thumbprint == NULL)
        return "thumbprint (the SHA-1 fingerprint of the server's certificate)";
    if (p->vmx_spec == NULL)
        return "vmx_spec (\"moref=vm-N\")";
    if (p->user == NULL)
        return "user";
    if (p->password == NULL && p->cookie == NULL)
        return "password or cookie";
    return NULL;
}

static int check_params(const bio_vddk_params *p, bio_error *e)
{
    const char *missing = missing_param(p, 1);

    if (missing != NULL) {
        bio_fail(e, EINVAL, "cannot open %s on %s: %s is required", p->path ? p->path : "a disk",
                 p->server ? p->server : "a local host", missing);
        return -1;
    }
    return 0;
}

static int ctx_make_params(vddk_ctx *c, const bio_vddk_params *p, bio_error *e)
{
    VixDiskLibConnectParams *cp;

    if (p->server == NULL)
        return 0;
    cp = FN.AllocateConnectParams ? FN.AllocateConnectParams() : calloc(1, sizeof *cp);
    if (cp == NULL) {
        bio_fail(e, ENOMEM, "out of memory connecting to %s", p->server);
        return -1;
    }
    c->params = cp;
    cp->vmxSpec = ctx_strdup(c, p->vmx_spec);
    cp->serverName = ctx_strdup(c, p->server);
    cp->thumbPrint = ctx_strdup(c, p->thumbprint);
    cp->port = p->port ? p->port : 443;
    cp->nfcHostPort = p->nfc_port;
    cp->specType = VIXDISKLIB_SPEC_VMX;
    if (p->cookie != NULL) {
        cp->credType = VIXDISKLIB_CRED_SESSIONID;
        cp->creds.sessionId.cookie = ctx_strdup(c, p->cookie);
        cp->creds.sessionId.userName = ctx_strdup(c, p->user);
        cp->creds.sessionId.key = ctx_strdup(c, p->password);
    } else {
        cp->credType = VIXDISKLIB_CRED_UID;
        cp->creds.uid.userName = ctx_strdup(c, p->user);
        cp->creds.uid.password = ctx_strdup(c, p->password);
    }
    if (!cp->vmxSpec || !cp->serverName || !cp->thumbPrint
        || (p->password && !(cp->credType == VIXDISKLIB_CRED_UID ? cp->creds.uid.password
                                                                 : cp->creds.sessionId.key))) {
        bio_fail(e, ENOMEM, "out of memory connecting to %s", p->server);
        return -1;
    }
    return 0;
}

/* With lib.lock held: Close and Disconnect whatever is open, free c. Returns the first error. */
static int ctx_teardown(vddk_ctx *c, const char *path, bio_error *e)
{
    VixError err;
    int rc = 0;

    if (c->handle != NULL && (err = FN.Close(c->handle)) != VIX_OK) {
        vix_fail(e, err, "Close", NULL, "error closing %s", path);
        rc = -1;
    }
    if (c->conn != NULL && (err = FN.Disconnect(c->conn)) != VIX_OK && rc == 0) {
        vix_fail(e, err, "Disconnect", NULL, "error disconnecting %s", path);
        rc = -1;
    }
    ctx_free_params(c);
    free(c);
    return rc;
}

/*
 * A VIX_E_FAIL ("Unknown error") from a call that logs in to a server
 * (ConnectEx, Open, PrepareForAccess, EndAccess) is, in practice, a
 * certificate that does not match the thumbprint or a refused login: say so,
 * and how to check the thumbprint. NULL for other errors.
 */
static const char *login_hint(const bio_vddk_params *p, VixError err, char *buf, size_t size)
{
    if (p->server == NULL || VIX_ERROR_CODE(err) != VIX_E_FAIL)
        return NULL;
    snprintf(buf, size, "; the likely cause: the server's certificate thumbprint does not match "
             "the one given (%s), or the user name or password is wrong; check the thumbprint "
             "with: openssl s_client -connect %s:%" PRIu32 " </dev/null | openssl x509 -noout "
             "-fingerprint -sha1", p->thumbprint ? p->thumbprint : "none", p->server,
             p->port ? p->port : 443);
    return buf;
}

/* With lib.lock held: connect, open, read the capacity and the transport. */
static int ctx_open(vddk_ctx *c, const bio_vddk_params *p, uint64_t *capacity, bio_error *e)
{
    const char *where = p->server ? p->server : "the local host";
    uint32_t flags = (p->readonly ? VIXDISKLIB_FLAG_OPEN_READ_ONLY : 0)
                     | (p->single_link ? VIXDISKLIB_FLAG_OPEN_SINGLE_LINK : 0);
    VixDiskLibInfo *info = NULL;
    const char *mode;
    char hint[BIO_ERRMSG_MAX / 2];
    VixError err;

    if (ctx_make_params(c, p, e) != 0)
        return -1;
    err = FN.ConnectEx(c->params, (char)(p->readonly != 0), p->snapshot_ref, p->transports,
                       &c->conn);
    if (err != VIX_OK) {
        c->conn = NULL;
        vix_fail(e, err, "ConnectEx", login_hint(p, err, hint, sizeof hint),
                 "cannot connect to %s for %s", where, p->path);
        return -1;
    }
    err = FN.Open(c->conn, p->path, flags, &c->handle);
    if (err != VIX_OK) {
        c->handle = NULL;
        vix_fail(e, err, "Open", login_hint(p, err, hint, sizeof hint), "cannot open %s on %s",
                 p->path, where);
        return -1;
    }
    err = FN.GetInfo(c->handle, &info);
    if (err != VIX_OK) {
        vix_fail(e, err, "GetInfo", NULL, "cannot get the size of %s on %s", p->path, where);
        return -1;
    }
    *capacity = info->capacity;
    FN.FreeInfo(info);
    if (*capacity > UINT64_MAX / SECTOR) {
        bio_fail(e, EINVAL, "%s on %s: VDDK reports an impossible capacity of %" PRIu64
                 " sectors", p->path, where, *capacity);
        return -1;
    }
    *capacity *= SECTOR;
    mode = FN.GetTransportMode(c->handle);
    snprintf(c->transport, sizeof c->transport, "%s", mode ? mode : "unknown");
    c->use_async = FN.ReadAsync != NULL && !p->no_async;
    c->queue_depth = p->queue_depth ? p->queue_depth : BIO_VDDK_QUEUE_DEPTH;
    return 0;
}

/* ================================================================ access */

int bio_vddk_access(const bio_vddk_params *p, const char *identity, int end, int *called,
                    bio_error *e)
{
    const char *fn = end ? "EndAccess" : "PrepareForAccess";
    const char *vm = p->vmx_spec ? p->vmx_spec : "a VM";
    const char *missing = missing_param(p, 0);
    vddk_ctx c = {0};
    char hint[BIO_ERRMSG_MAX / 2];
    VixError err;
    int rc = -1;

    *called = 0;
    if (missing != NULL || identity == NULL || !*identity) {
        bio_fail(e, EINVAL, "cannot call VixDiskLib_%s for %s: %s is required", fn, vm,
                 missing ? missing : "identity");
        return -1;
    }
    pthread_mutex_lock(&lib.lock);
    if (lib.state != 1) {
        bio_fail(e, EINVAL, "cannot call VixDiskLib_%s for %s: VDDK is %s", fn, vm,
                 lib.state == 0 ? "not initialised (call vddk_init first)" : "shut down");
    } else if (FN.PrepareForAccess == NULL) {
        rc = 0;   /* an older VDDK: nothing to tell vCenter */
    } else if (ctx_make_params(&c, p, e) == 0) {
        err = end ? FN.EndAccess(c.params, identity) : FN.PrepareForAccess(c.params, identity);
        *called = 1;
        if (err != VIX_OK)
            vix_fail(e, err, fn, login_hint(p, err, hint, sizeof hint), "%s of %s on %s failed",
                     end ? "ending access" : "preparing for access", vm, p->server);
        else
            rc = 0;
    }
    ctx_free_params(&c);
    pthread_mutex_unlock(&lib.lock);
    return rc;
}

/* ================================================================ backend */

static int check_sectors(vddk_ctx *c, const char *what, uint64_t offset, uint64_t len,
                         bio_error *e)
{
    if (offset % SECTOR == 0 && len % SECTOR == 0)
        return 0;
    bio_fail(e, EINVAL, "cannot %s %" PRIu64 " bytes at offset %" PRIu64 " of %s: VDDK reads "
             "and writes whole sectors of %d bytes", what, len, offset, c->path, SECTOR);
    return -1;
}

static int vddk_read(void *ctx, uint64_t offset, size_t len, void *buf, bio_error *e)
{
    vddk_ctx *c = ctx;
    VixError err;

    if (check_sectors(c, "read", offset, len, e) != 0)
        return -1;
    err = FN.Read(c->handle, offset / SECTOR, len / SECTOR, buf);
    if (err != VIX_OK) {
        vix_fail(e, err, "Read", NULL, "cannot read %zu bytes at offset %" PRIu64 " of %s",
                 len, offset, c->path);
        return -1;
    }
    return 0;
}

#define ASYNC_PENDING UINT64_MAX

static void async_done(void *data, VixError result)
{
    __atomic_store_n((uint64_t *)data, (uint64_t)result, __ATOMIC_RELEASE);
}

/* Fills e for request r, whose ReadAsync failed with (or whose callback reported) result. */
static int read_failed(vddk_ctx *c, const bio_request *r, uint64_t result, bio_error *e)
{
    if (result == ASYNC_PENDING)
        bio_fail(e, EIO, "cannot read %zu bytes at offset %" PRIu64 " of %s: VDDK's Wait "
                 "returned before the read completed", r->len, r->offset, c->path);
    else
        vix_fail(e, (VixError)result, "ReadAsync", NULL, "cannot read %zu bytes at offset %"
                 PRIu64 " of %s", r->len, r->offset, c->path);
    return -1;
}

/*
 * One wave: submits reqs[0..n) with ReadAsync (all in flight together), then
 * Waits, always, so that no request outlives the call even when one was
 * refused. Fails with the first failed request in offset order.
 */
static int read_wave(vddk_ctx *c, const bio_request *reqs, size_t n, bio_error *e)
{
    uint64_t result[BIO_READV_MAX];
    size_t i, submitted;
    VixError err = VIX_OK, werr;

    for (submitted = 0; submitted < n; submitted++) {
        const bio_request *r = &reqs[submitted];
        result[submitted] = ASYNC_PENDING;
        err = FN.ReadAsync(c->handle, r->offset / SECTOR, r->len / SECTOR, r->buf, async_done,
                           &result[submitted]);
        if (err == VIX_OK)   /* completed at once; the callback may or may not have run */
            __atomic_store_n(&result[submitted], (uint64_t)VIX_OK, __ATOMIC_RELEASE);
        else if (err != VIX_ASYNC)
            break;
    }
    werr = FN.Wait(c->handle);
    for (i = 0; i < submitted; i++) {
        uint64_t res = __atomic_load_n(&result[i], __ATOMIC_ACQUIRE);
        if (res != VIX_OK)
            return read_failed(c, &reqs[i], res, e);
    }
    if (submitted < n)
        return read_failed(c, &reqs[submitted], err, e);
    if (werr != VIX_OK) {
        vix_fail(e, werr, "Wait", NULL, "cannot read from %s", c->path);
        return -1;
    }
    return 0;
}

/*
 * Up to queue_depth requests in flight. VDDK's Wait waits for every request
 * of the handle, so the window is refilled a wave at a time.
 */
static int vddk_readv(void *ctx, const bio_request *reqs, size_t n, bio_error *e)
{
    vddk_ctx *c = ctx;
    size_t i, k;

    for (i = 0; i < n; i++)
        if (check_sectors(c, "read", reqs[i].offset, reqs[i].len, e) != 0)
            return -1;
    for (i = 0; i < n; i += k) {
        k = c->use_async ? (n - i < c->queue_depth ? n - i : c->queue_depth) : 1;
        if (c->use_async ? read_wave(c, reqs + i, k, e) != 0
                         : vddk_read(ctx, reqs[i].offset, reqs[i].len, reqs[i].buf, e) != 0)
            return -1;
    }
    return 0;
}

static int vddk_write(void *ctx, uint64_t offset, size_t len, const void *buf, bio_error *e)
{
    vddk_ctx *c = ctx;
    VixError err;

    if (check_sectors(c, "write", offset, len, e) != 0)
        return -1;
    while (len > 0) {   /* the read loop caps reads; writes are capped here */
        size_t k = len < BIO_VDDK_MAX_REQUEST ? len : BIO_VDDK_MAX_REQUEST;
        err = FN.Write(c->handle, offset / SECTOR, k / SECTOR, buf);
        if (err != VIX_OK) {
            vix_fail(e, err, "Write", NULL, "cannot write %zu bytes at offset %" PRIu64 " of %s",
                     k, offset, c->path);
            return -1;
        }
        offset += k;
        len -= k;
        buf = (const unsigned char *)buf + k;
    }
    return 0;
}

static int vddk_write_zeroes(void *ctx, uint64_t offset, uint64_t len, bio_error *e)
{
    static const unsigned char zeros[1 << 16];

    while (len > 0) {   /* VDDK has no hole punching: write zero sectors */
        size_t k = len < sizeof zeros ? (size_t)len : sizeof zeros;
        if (vddk_write(ctx, offset, k, zeros, e) != 0)
            return -1;
        offset += k;
        len -= k;
    }
    return 0;
}

static int vddk_flush(void *ctx, bio_error *e)
{
    vddk_ctx *c = ctx;
    VixError err = FN.Flush(c->handle);

    if (err != VIX_OK) {
        vix_fail(e, err, "Flush", NULL, "cannot flush %s", c->path);
        return -1;
    }
    return 0;
}

/* Appends one QueryAllocatedBlocks answer for [start, start + count) sectors, checked. */
static int append_block_list(vddk_ctx *c, const VixDiskLibBlockList *l, uint64_t start,
                             uint64_t count, bio_extent_list *out, bio_error *e)
{
    uint64_t prev_end = start;
    uint32_t i;

    for (i = 0; i < l->numBlocks; i++) {
        uint64_t off = l->blocks[i].offset, len = l->blocks[i].length;
        if (off < prev_end || len > count || off - start > count - len) {
            bio_fail(e, EIO, "VDDK returned an invalid allocated block list for %s "
                     "(block %" PRIu32 " at sector %" PRIu64 ", %" PRIu64 " sectors, asked "
                     "for sectors %" PRIu64 "-%" PRIu64 ")", c->path, i, off, len, start,
                     start + count);
            return -1;
        }
        if (bio_extent_append(out, off * SECTOR, len * SECTOR) != 0) {
            bio_fail(e, ENOMEM, "out of memory listing the extents of %s", c->path);
            return -1;
        }
        prev_end = off + len;
    }
    return 0;
}

static int vddk_allocated_extents(void *ctx, uint64_t capacity, bio_extent_list *out,
                                  bio_error *e)
{
    vddk_ctx *c = ctx;
    uint64_t sectors = capacity / SECTOR;
    uint64_t chunks = sectors / VIXDISKLIB_MIN_CHUNK_SIZE, done = 0;
    uint64_t tail = chunks * VIXDISKLIB_MIN_CHUNK_SIZE * SECTOR;

    if (FN.QueryAllocatedBlocks == NULL)
        goto whole_disk;
    while (done < chunks) {
        uint64_t n = chunks - done < VIXDISKLIB_MAX_CHUNK_NUMBER ? chunks - done
                                                                 : VIXDISKLIB_MAX_CHUNK_NUMBER;
        uint64_t start = done * VIXDISKLIB_MIN_CHUNK_SIZE, count = n * VIXDISKLIB_MIN_CHUNK_SIZE;
        VixDiskLibBlockList *l = NULL;
        VixError err = FN.QueryAllocatedBlocks(c->handle, start, count,
                                               VIXDISKLIB_MIN_CHUNK_SIZE, &l);
        int rc;
        if (VIX_ERROR_CODE(err) == VIX_E_NOT_SUPPORTED && done == 0) {
            log_note(BIO_VDDK_LOG_INFO, "QueryAllocatedBlocks is not supported for %s "
                     "(transport %s): reading the whole disk", c->path, c->transport);
            goto whole_disk;
        }
        if (err != VIX_OK) {
            vix_fail(e, err, "QueryAllocatedBlocks", NULL, "cannot list the allocated "
                     "extents of %s", c->path);
            return -1;
        }
        rc = append_block_list(c, l, start, count, out, e);
        FN.FreeBlockList(l);
        if (rc != 0)
            return -1;
        done += n;
    }
    /* a last partial chunk cannot be queried: count it as allocated */
    if (tail < capacity && bio_extent_append(out, tail, capacity - tail) != 0)
        goto nomem;
    return 0;
whole_disk:
    out->n = 0;
    if (bio_extent_append(out, 0, capacity) != 0)
        goto nomem;
    return 0;
nomem:
    bio_fail(e, ENOMEM, "out of memory listing the extents of %s", c->path);
    return -1;
}

static int vddk_close(void *ctx, bio_error *e)
{
    vddk_ctx *c = ctx;
    int rc;

    pthread_mutex_lock(&lib.lock);
    rc = ctx_teardown(c, c->path, e);
    lib.open_disks--;
    pthread_mutex_unlock(&lib.lock);
    return rc;
}

static const bio_backend_ops vddk_ops = {
    .name = "vddk",
    .read = vddk_read,
    .write = vddk_write,
    .write_zeroes = vddk_write_zeroes,
    .flush = vddk_flush,
    .allocated_extents = vddk_allocated_extents,
    .close = vddk_close,
    .readv = vddk_readv,
};

const char *bio_vddk_transport(const bio_disk *d)
{
    return d->ops == &vddk_ops ? ((const vddk_ctx *)d->ctx)->transport : NULL;
}

int bio_open_vddk(const bio_vddk_params *p, bio_disk **out, bio_error *e)
{
    uint64_t capacity = 0;
    vddk_ctx *c;
    bio_error ignored;
    bio_disk *d;

    if (check_params(p, e) != 0)
        return -1;
    c = calloc(1, sizeof *c);
    if (c == NULL) {
        bio_fail(e, ENOMEM, "out of memory opening %s", p->path);
        return -1;
    }
    c->path = p->path;   /* until the disk owns its copy */
    pthread_mutex_lock(&lib.lock);
    if (lib.state != 1) {
        bio_fail(e, EINVAL, "cannot open %s: VDDK is %s", p->path,
                 lib.state == 0 ? "not initialised (call vddk_init first)" : "shut down");
        free(c);
        pthread_mutex_unlock(&lib.lock);
        return -1;
    }
    if (ctx_open(c, p, &capacity, e) != 0) {
        ctx_teardown(c, p->path, &ignored);
        pthread_mutex_unlock(&lib.lock);
        return -1;
    }
    lib.open_disks++;
    pthread_mutex_unlock(&lib.lock);
    if (bio_disk_new(&vddk_ops, c, p->path, BIO_KIND_VDDK, capacity, !p->readonly,
                     BIO_VDDK_MAX_REQUEST, &d, e) != 0)
        return -1;   /* bio_disk_new closed c */
    c->path = d->path;
    *out = d;
    return 0;
}
