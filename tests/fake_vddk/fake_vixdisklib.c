/*
 * A fake libvixDiskLib.so for tests: VMware VDDK's published C signatures and
 * x86-64 struct layouts (see /work/shared/VMWARE.md), declared here on their
 * own (not shared with vddk_ext), with disks backed by local files.
 *
 * Disk paths:
 *   "[ds] dir/name.vmdk"  ->  DSDIR/dir/name-flat.vmdk if it exists, else DSDIR/dir/name.vmdk,
 *                             where DSDIR is the datastore's entry in FAKE_VDDK_DATASTORES
 *                             ("ds1=/dir1:ds2=/dir2") or else $FAKE_VDDK_ROOT/ds.
 *   anything else         ->  used as a local file path (VDDK's local mode, no server).
 *   The file is the raw (flat) disk; capacity = its size / 512 sectors.
 *
 * Strictness (each mirrors a rule of the real library or of VMWARE.md):
 *   InitEx must come first (once, on the main thread, non-NULL log callbacks); Open/Close never
 *   overlap; a handle is never entered by two threads at once (abort); requests are <= 2 MiB
 *   (VIX_E_INVALID_ARG); Close with async reads pending and Disconnect with handles open abort;
 *   QueryAllocatedBlocks wants chunk >= 128 sectors, aligned ranges, <= 512 Ki chunks.
 *   ReadAsync/WriteAsync return VIX_ASYNC and complete in Wait (or when 64 are queued),
 *   calling the callback; GetErrorText returns a strdup'd string (NULL for unknown codes).
 *   Per handle it counts ReadAsync and Wait calls and the most requests ever in flight (queued
 *   and not yet completed); Close traces them: "close read_async=A wait=W max_in_flight=M".
 *
 * Environment (read at ConnectEx; counters are per connection):
 *   FAKE_VDDK_ROOT, FAKE_VDDK_DATASTORES   the path mapping above
 *   FAKE_VDDK_THUMBPRINT        expected thumbprint; another one fails Open with VIX_E_FAIL
 *   FAKE_VDDK_USER, FAKE_VDDK_PASSWORD_FILE   expected credentials (Open: VIX_E_FAIL)
 *   FAKE_VDDK_FAULTS            comma list of:
 *       read_fail=N:CODE  write_fail=N:CODE   the Nth read/write (from 1) fails with CODE
 *       drop_after=N        reads after the Nth find the connection lost (HOST_TCP_CONN_LOST)
 *       drop_after_writes=N writes after the Nth find the connection lost, and so does every
 *                           later call of the connection
 *       read_async_fail=N:CODE  the Nth ReadAsync call returns CODE at once (nothing queued)
 *       slow_read_ms=M      a read completes M ms after it was issued: Read sleeps M ms; async
 *                           reads in flight together wait out their latencies side by side
 *                           (a network round trip each, not a queue of them)
 *       slow_open_ms=M
 *       login_at_connect=1  the thumbprint and login are checked by ConnectEx (as a vCenter
 *                           connection does) instead of by Open
 *       connect_fail=CODE open_fail=CODE info_fail=CODE flush_fail=CODE query_fail=CODE
 *       close_fail=CODE
 *       extra_sectors=N     GetInfo claims N sectors more than the file holds
 *   FAKE_VDDK_REQUIRE_LD_PATH=1 InitEx fails unless this library's directory is on
 *                               LD_LIBRARY_PATH (as the real VDDK needs for its own libraries)
 *   FAKE_VDDK_SECRET_SCAN=1     ConnectEx aborts if the password is in /proc/self/cmdline or
 *                               /proc/self/environ
 *   FAKE_VDDK_REQUIRE_PREPARE=1 a remote Open fails with VIX_E_FAIL unless PrepareForAccess was
 *                               called for the connection's vmxSpec more often than EndAccess
 *   FAKE_VDDK_FAULTS also: prepare_fail=CODE end_access_fail=CODE
 *   FAKE_VDDK_TRACE=FILE        appends one line per call: "read START COUNT", "query ...",
 *                               "prepare VMXSPEC IDENTITY", "end_access VMXSPEC IDENTITY", ...
 *
 * Build variants (build.sh): -DFAKE_NO_QUERY (no QueryAllocatedBlocks/FreeBlockList),
 * -DFAKE_NO_ASYNC (no ReadAsync/WriteAsync/Wait), -DFAKE_BROKEN (no VixDiskLib_GetInfo),
 * -DFAKE_NO_ACCESS (no PrepareForAccess/EndAccess).
 */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

/* ------------------------------------------------------------ published ABI */

typedef uint64_t VixError;
typedef uint64_t VixDiskLibSectorType;
typedef void VixDiskLibGenericLogFunc(const char *fmt, va_list args);
typedef void (*VixDiskLibCompletionCB)(void *cbData, VixError result);

#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_INVALID_ARG 3
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_NOT_SUPPORTED 6
#define VIX_E_HOST_TCP_CONN_LOST 14011
#define VIX_E_DISK_OUTOFRANGE 16007
#define VIX_ASYNC 25000
#define VIX_ERROR_CODE(e) ((e) & 0xFFFF)

#define SECTOR 512
#define FLAG_UNBUFFERED 1
#define FLAG_SINGLE_LINK 2
#define FLAG_READ_ONLY 4
#define MIN_CHUNK 128
#define MAX_CHUNKS (512 * 1024)
#define MAX_REQUEST_SECTORS 4096   /* 2 MiB */

typedef struct {
    char *vmxSpec;
    char *serverName;
    char *thumbPrint;
    long privateUse;
    int credType;                   /* 1 uid, 2 session id */
    union {
        struct { char *userName; char *password; } uid;
        struct { char *cookie; char *userName; char *key; } sessionId;
        void *genericCreds;
    } creds;
    uint32_t port;
    uint32_t nfcHostPort;
    char *vimApiVer;
    char reserved[8];
    void *state;
    union { struct { char *a, *b, *c; } s; } spec;
    int specType;
} VixDiskLibConnectParams;

typedef struct { uint32_t cylinders, heads, sectors; } VixDiskLibGeometry;
typedef struct {
    VixDiskLibGeometry biosGeo, physGeo;
    VixDiskLibSectorType capacity;
    int adapterType;
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
} VixDiskLibInfo;
typedef struct { VixDiskLibSectorType offset, length; } VixDiskLibBlock;
typedef struct { uint32_t numBlocks; VixDiskLibBlock blocks[1]; } VixDiskLibBlockList;

_Static_assert(__builtin_offsetof(VixDiskLibConnectParams, credType) == 32, "");
_Static_assert(__builtin_offsetof(VixDiskLibConnectParams, creds) == 40, "");
_Static_assert(__builtin_offsetof(VixDiskLibConnectParams, port) == 64, "");
_Static_assert(__builtin_offsetof(VixDiskLibConnectParams, nfcHostPort) == 68, "");
_Static_assert(__builtin_offsetof(VixDiskLibConnectParams, vimApiVer) == 72, "");
_Static_assert(__builtin_offsetof(VixDiskLibConnectParams, spec) == 96, "");
_Static_assert(__builtin_offsetof(VixDiskLibConnectParams, specType) == 120, "");
_Static_assert(sizeof(VixDiskLibConnectParams) == 128, "");
_Static_assert(__builtin_offsetof(VixDiskLibInfo, capacity) == 24, "");
_Static_assert(__builtin_offsetof(VixDiskLibInfo, parentFileNameHint) == 40, "");
_Static_assert(__builtin_offsetof(VixDiskLibInfo, logicalSectorSize) == 56, "");
_Static_assert(__builtin_offsetof(VixDiskLibBlockList, blocks) == 8, "");

/* ------------------------------------------------------------------ state */

typedef struct {
    int read_fail_n, write_fail_n, read_async_fail_n, drop_after, drop_after_writes;
    int slow_read_ms, slow_open_ms;
    int login_at_connect;
    VixError read_fail, write_fail, read_async_fail, connect_fail, open_fail, info_fail;
    VixError flush_fail;
    VixError query_fail, close_fail, prepare_fail, end_access_fail;
    uint64_t extra_sectors;
} faults;

typedef struct conn {
    int remote, readonly, lost, handles;
    char *thumbprint, *user, *password;   /* copies of what ConnectEx was given */
    char *vmx;                            /* its vmxSpec */
    char *transport;               /* the mode Open will report */
    faults f;
    int reads, writes, read_asyncs;
} conn;

typedef struct async_req {
    int write;
    VixDiskLibSectorType start, count;
    uint8_t *buf;
    VixDiskLibCompletionCB cb;
    void *data;
    struct timespec due;            /* when the (simulated) server's answer arrives */
} async_req;

#define ASYNC_MAX 64

typedef struct handle {
    conn *c;
    int fd, readonly;
    uint64_t file_sectors, capacity;
    int busy;                       /* entered by a thread */
    async_req q[ASYNC_MAX];
    int nq;
    int read_asyncs, waits, max_in_flight;   /* traced by Close */
} handle;

static VixDiskLibGenericLogFunc *log_fn, *warn_fn, *panic_fn;
static int initialised;
static int open_close_busy;
static pthread_t worker;
static pthread_mutex_t worker_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t worker_cond = PTHREAD_COND_INITIALIZER;
static int worker_stop;
static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;

static void say(VixDiskLibGenericLogFunc *fn, const char *fmt, ...)
{
    va_list ap;

    if (fn == NULL)
        return;
    va_start(ap, fmt);
    fn(fmt, ap);
    va_end(ap);
}

static void trace(const char *fmt, ...)
{
    const char *path = getenv("FAKE_VDDK_TRACE");
    va_list ap;
    FILE *f;

    if (path == NULL || !*path)
        return;
    pthread_mutex_lock(&trace_lock);
    f = fopen(path, "a");
    if (f != NULL) {
        va_start(ap, fmt);
        vfprintf(f, fmt, ap);
        va_end(ap);
        fputc('\n', f);
        fclose(f);
    }
    pthread_mutex_unlock(&trace_lock);
}

static void die(const char *fmt, ...)
{
    va_list ap;

    fputs("fake libvixDiskLib: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

    if (ms > 0)
        nanosleep(&ts, NULL);
}

#ifndef FAKE_NO_ASYNC
/* now + ms on CLOCK_MONOTONIC */
static struct timespec deadline_ms(int ms)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L)
        t.tv_sec++, t.tv_nsec -= 1000000000L;
    return t;
}

static void sleep_until(struct timespec t)
{
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR)
        ;
}
#endif

static void enter(handle *h, const char *fn)
{
    if (__atomic_exchange_n(&h->busy, 1, __ATOMIC_SEQ_CST))
        die("VixDiskLib_%s: handle %p entered by two threads at once", fn, (void *)h);
}

static void leave(handle *h)
{
    __atomic_store_n(&h->busy, 0, __ATOMIC_SEQ_CST);
}

static void enter_open_close(const char *fn)
{
    if (__atomic_exchange_n(&open_close_busy, 1, __ATOMIC_SEQ_CST))
        die("VixDiskLib_%s: Open/Close/ConnectEx/Disconnect overlap in two threads", fn);
}

static void leave_open_close(void)
{
    __atomic_store_n(&open_close_busy, 0, __ATOMIC_SEQ_CST);
}

/* ------------------------------------------------------------------ faults */

static VixError parse_code(const char *s)
{
    return (VixError)strtoull(s, NULL, 0);
}

static void parse_faults(faults *f)
{
    const char *env = getenv("FAKE_VDDK_FAULTS");
    char *copy, *item, *save = NULL;

    memset(f, 0, sizeof *f);
    if (env == NULL)
        return;
    copy = strdup(env);
    for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *v = strchr(item, '=');
        if (v == NULL)
            die("bad FAKE_VDDK_FAULTS item %s", item);
        *v++ = '\0';
        if (strcmp(item, "read_fail") == 0 || strcmp(item, "write_fail") == 0
            || strcmp(item, "read_async_fail") == 0) {
            char *colon = strchr(v, ':');
            int n = atoi(v);
            VixError code = colon ? parse_code(colon + 1) : VIX_E_FAIL;
            if (strcmp(item, "read_fail") == 0)
                f->read_fail_n = n, f->read_fail = code;
            else if (item[0] == 'w')
                f->write_fail_n = n, f->write_fail = code;
            else
                f->read_async_fail_n = n, f->read_async_fail = code;
        } else if (strcmp(item, "drop_after") == 0) f->drop_after = atoi(v);
        else if (strcmp(item, "drop_after_writes") == 0) f->drop_after_writes = atoi(v);
        else if (strcmp(item, "slow_read_ms") == 0) f->slow_read_ms = atoi(v);
        else if (strcmp(item, "slow_open_ms") == 0) f->slow_open_ms = atoi(v);
        else if (strcmp(item, "login_at_connect") == 0) f->login_at_connect = atoi(v);
        else if (strcmp(item, "connect_fail") == 0) f->connect_fail = parse_code(v);
        else if (strcmp(item, "open_fail") == 0) f->open_fail = parse_code(v);
        else if (strcmp(item, "info_fail") == 0) f->info_fail = parse_code(v);
        else if (strcmp(item, "flush_fail") == 0) f->flush_fail = parse_code(v);
        else if (strcmp(item, "query_fail") == 0) f->query_fail = parse_code(v);
        else if (strcmp(item, "close_fail") == 0) f->close_fail = parse_code(v);
        else if (strcmp(item, "prepare_fail") == 0) f->prepare_fail = parse_code(v);
        else if (strcmp(item, "end_access_fail") == 0) f->end_access_fail = parse_code(v);
        else if (strcmp(item, "extra_sectors") == 0) f->extra_sectors = strtoull(v, NULL, 0);
        else die("unknown FAKE_VDDK_FAULTS item %s", item);
    }
    free(copy);
}

/* ------------------------------------------------------------------- text */

API char *VixDiskLib_GetErrorText(VixError err, const char *locale)
{
    const char *text;

    (void)locale;
    switch (VIX_ERROR_CODE(err)) {
    case VIX_OK: text = "The operation was successful"; break;
    case VIX_E_FAIL: text = "Unknown error"; break;
    case VIX_E_INVALID_ARG: text = "One of the parameters was invalid"; break;
    case VIX_E_FILE_NOT_FOUND: text = "The file was not found"; break;
    case VIX_E_NOT_SUPPORTED: text = "The operation is not supported"; break;
    case VIX_E_HOST_TCP_CONN_LOST: text = "The network connection to the host was lost"; break;
    case VIX_E_DISK_OUTOFRANGE: text = "The sector is out of range of the disk"; break;
    default: return NULL;
    }
    return strdup(text);
}

API void VixDiskLib_FreeErrorText(char *text)
{
    free(text);
}

/* ------------------------------------------------------------ init / exit */

static void *worker_main(void *arg)
{
    (void)arg;
    say(log_fn, "fake VDDK worker thread %ld started\n", (long)syscall(SYS_gettid));
    pthread_mutex_lock(&worker_lock);
    while (!worker_stop)
        pthread_cond_wait(&worker_cond, &worker_lock);
    pthread_mutex_unlock(&worker_lock);
    return NULL;
}

static int dir_on_ld_path(void)
{
    const char *ld = getenv("LD_LIBRARY_PATH");
    char dir[4096], *slash, *copy, *item, *save = NULL;
    Dl_info info;
    int found = 0;

    if (ld == NULL || !dladdr((void *)dir_on_ld_path, &info) || info.dli_fname == NULL)
        return 0;
    if (realpath(info.dli_fname, dir) == NULL)
        return 0;
    slash = strrchr(dir, '/');
    if (slash != NULL)
        *slash = '\0';
    copy = strdup(ld);
    for (item = strtok_r(copy, ":", &save); item && !found; item = strtok_r(NULL, ":", &save)) {
        char real[4096];
        found = realpath(item, real) != NULL && strcmp(real, dir) == 0;
    }
    free(copy);
    return found;
}

API VixError VixDiskLib_InitEx(uint32_t major, uint32_t minor, VixDiskLibGenericLogFunc *log,
                               VixDiskLibGenericLogFunc *warn, VixDiskLibGenericLogFunc *panic,
                               const char *libDir, const char *configFile)
{
    trace("init %u.%u main=%d", major, minor, (pid_t)syscall(SYS_gettid) == getpid());
    if (log == NULL || warn == NULL || panic == NULL || major < 5 || major > 8)
        return VIX_E_INVALID_ARG;
    if (initialised || (pid_t)syscall(SYS_gettid) != getpid())
        return VIX_E_FAIL;
    if (getenv("FAKE_VDDK_REQUIRE_LD_PATH") && !dir_on_ld_path()) {
        say(warn, "cannot load libcrypto.so.3 / libssl.so.3: VDDK's lib64 is not on "
                  "LD_LIBRARY_PATH\n");
        return VIX_E_FAIL;
    }
    log_fn = log;
    warn_fn = warn;
    panic_fn = panic;
    worker_stop = 0;
    if (pthread_create(&worker, NULL, worker_main, NULL) != 0)
        return VIX_E_FAIL;
    initialised = 1;
    say(log_fn, "VixDiskLib: fake libvixDiskLib initialised for API %u.%u, libDir %s, "
                "config %s\n", major, minor, libDir ? libDir : "(none)",
        configFile ? configFile : "(none)");
    return VIX_OK;
}

API void VixDiskLib_Exit(void)
{
    trace("exit");
    if (!initialised)
        return;
    pthread_mutex_lock(&worker_lock);
    worker_stop = 1;
    pthread_cond_signal(&worker_cond);
    pthread_mutex_unlock(&worker_lock);
    pthread_join(worker, NULL);
    say(log_fn, "VixDiskLib: exiting\n");
    initialised = 0;
}

/* ------------------------------------------------------- connect params */

API VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void)
{
    return calloc(1, sizeof(VixDiskLibConnectParams));
}

/* Frees the strings inside too: a caller that keeps its own must clear the pointers first. */
API void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *p)
{
    if (p == NULL)
        return;
    free(p->vmxSpec);
    free(p->serverName);
    free(p->thumbPrint);
    if (p->credType == 1) {
        free(p->creds.uid.userName);
        free(p->creds.uid.password);
    } else if (p->credType == 2) {
        free(p->creds.sessionId.cookie);
        free(p->creds.sessionId.userName);
        free(p->creds.sessionId.key);
    }
    free(p);
}

/* ------------------------------------------------------------ connections */

static int file_contains(const char *path, const char *needle)
{
    char buf[1 << 16];
    ssize_t n;
    int fd = open(path, O_RDONLY), found = 0;
    size_t len = strlen(needle);

    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n > 0 && len > 0)
        found = memmem(buf, (size_t)n, needle, len) != NULL;
    return found;
}

static const char *pick_transport(const char *modes)
{
    static const char *const known[] = {"nbdssl", "nbd"};
    char *copy, *item, *save = NULL;
    const char *found = NULL;
    size_t i;

    if (modes == NULL)
        return "nbdssl";
    copy = strdup(modes);
    for (item = strtok_r(copy, ":", &save); item && !found; item = strtok_r(NULL, ":", &save))
        for (i = 0; i < 2 && !found; i++)
            if (strcmp(item, known[i]) == 0)
                found = known[i];
    free(copy);
    return found;
}

static VixError check_remote(conn *c);

static void conn_free(conn *c)
{
    free(c->transport);
    free(c->thumbprint);
    free(c->user);
    free(c->vmx);
    if (c->password)
        explicit_bzero(c->password, strlen(c->password));
    free(c->password);
    free(c);
}

API VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *p, char readOnly,
                                  const char *snapshotRef, const char *transportModes,
                                  conn **out)
{
    const char *mode = "file";
    conn *c;

    trace("connect %s snapshot=%s transports=%s", p && p->serverName ? p->serverName : "local",
          snapshotRef ? snapshotRef : "-", transportModes ? transportModes : "-");
    if (!initialised)
        return VIX_E_FAIL;
    if (out == NULL)
        return VIX_E_INVALID_ARG;
    if (p != NULL && p->serverName != NULL) {
        const char *pw = p->credType == 1 ? p->creds.uid.password
                         : p->credType == 2 ? p->creds.sessionId.key : NULL;
        if (p->vmxSpec == NULL || strncmp(p->vmxSpec, "moref=", 6) != 0 || p->port == 0
            || (p->credType != 1 && p->credType != 2) || p->specType != 0
            || (snapshotRef && strncmp(snapshotRef, "snapshot-", 9) != 0))
            return VIX_E_INVALID_ARG;
        if (getenv("FAKE_VDDK_SECRET_SCAN") && pw && *pw
            && (file_contains("/proc/self/cmdline", pw) || file_contains("/proc/self/environ", pw)))
            die("ConnectEx: the password is visible in /proc/self/cmdline or environ");
        mode = pick_transport(transportModes);
    }
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return VIX_E_FAIL;
    parse_faults(&c->f);
    if (c->f.connect_fail) {
        VixError err = c->f.connect_fail;
        free(c);
        return err;
    }
    c->remote = p != NULL && p->serverName != NULL;
    if (c->remote) {
        const char *user = p->credType == 1 ? p->creds.uid.userName : p->creds.sessionId.userName;
        const char *pw = p->credType == 1 ? p->creds.uid.password : p->creds.sessionId.key;
        c->thumbprint = p->thumbPrint ? strdup(p->thumbPrint) : NULL;
        c->user = user ? strdup(user) : NULL;
        c->password = pw ? strdup(pw) : NULL;
        c->vmx = strdup(p->vmxSpec);
    }
    c->readonly = readOnly != 0;
    c->transport = mode ? strdup(mode) : NULL;
    if (c->remote && c->f.login_at_connect) {
        VixError err = check_remote(c);
        if (err != VIX_OK) {
            conn_free(c);
            return err;
        }
    }
    *out = c;
    say(log_fn, "VixDiskLib: connected to %s (%s)\n", c->remote ? p->serverName : "local host",
        readOnly ? "read-only" : "read-write");
    return VIX_OK;
}

API VixError VixDiskLib_Disconnect(conn *c)
{
    trace("disconnect");
    if (c == NULL)
        return VIX_E_INVALID_ARG;
    enter_open_close("Disconnect");
    if (c->handles != 0)
        die("VixDiskLib_Disconnect: %d handle(s) of this connection still open", c->handles);
    conn_free(c);
    leave_open_close();
    return VIX_OK;
}

/* ------------------------------------------------------ prepare / end access */

#ifndef FAKE_NO_ACCESS
/* PrepareForAccess minus EndAccess calls, per vmxSpec (vCenter's "migration disabled"). */
#define ACCESS_MAX 64
static struct { char *vmx; int count; } access_table[ACCESS_MAX];
static pthread_mutex_t access_lock = PTHREAD_MUTEX_INITIALIZER;

static int *access_count(const char *vmx, int create)
{
    int i, free_slot = -1;

    for (i = 0; i < ACCESS_MAX; i++) {
        if (access_table[i].vmx && strcmp(access_table[i].vmx, vmx) == 0)
            return &access_table[i].count;
        if (!access_table[i].vmx && free_slot < 0)
            free_slot = i;
    }
    if (!create || free_slot < 0)
        return NULL;
    access_table[free_slot].vmx = strdup(vmx);
    return &access_table[free_slot].count;
}

/* As vCenter would: valid parameters and a login, then the count for the VM. */
static VixError access_call(const VixDiskLibConnectParams *p, const char *identity, int end)
{
    const char *fn = end ? "end_access" : "prepare";
    conn c = {0};
    faults f;
    VixError err;
    int *n;

    trace("%s %s %s", fn, p && p->vmxSpec ? p->vmxSpec : "(null)", identity ? identity : "(null)");
    if (!initialised)
        return VIX_E_FAIL;
    if (p == NULL || identity == NULL || !*identity || p->serverName == NULL
        || p->vmxSpec == NULL || strncmp(p->vmxSpec, "moref=", 6) != 0
        || (p->credType != 1 && p->credType != 2))
        return VIX_E_INVALID_ARG;
    parse_faults(&f);
    if ((err = end ? f.end_access_fail : f.prepare_fail) != VIX_OK)
        return err;
    c.remote = 1;
    c.thumbprint = p->thumbPrint;
    c.user = p->credType == 1 ? p->creds.uid.userName : p->creds.sessionId.userName;
    c.password = p->credType == 1 ? p->creds.uid.password : p->creds.sessionId.key;
    if ((err = check_remote(&c)) != VIX_OK)
        return err;
    pthread_mutex_lock(&access_lock);
    n = access_count(p->vmxSpec, !end);
    if (n != NULL && (!end || *n > 0))
        *n += end ? -1 : 1;
    pthread_mutex_unlock(&access_lock);
    say(log_fn, "VixDiskLib: %s %s for %s\n", end ? "EndAccess" : "PrepareForAccess",
        p->vmxSpec, identity);
    return VIX_OK;
}

API VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *p, const char *identity)
{
    return access_call(p, identity, 0);
}

/* Without a PrepareForAccess first: VIX_OK, as vCenter has nothing to re-enable. */
API VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *p, const char *identity)
{
    return access_call(p, identity, 1);
}

static int access_prepared(const char *vmx)
{
    int *n, ok;

    pthread_mutex_lock(&access_lock);
    n = vmx ? access_count(vmx, 0) : NULL;
    ok = n != NULL && *n > 0;
    pthread_mutex_unlock(&access_lock);
    return ok;
}
#else
static int access_prepared(const char *vmx)
{
    (void)vmx;
    return 0;
}
#endif

/* ------------------------------------------------------------ open/close */

static char *map_path(const char *path)
{
    const char *close_br, *rest, *dsmap = getenv("FAKE_VDDK_DATASTORES");
    const char *root = getenv("FAKE_VDDK_ROOT");
    char ds[256], dir[4096] = "", *out;
    size_t dslen, restlen;

    if (path[0] != '[')
        return strdup(path);
    close_br = strchr(path, ']');
    if (close_br == NULL || (size_t)(close_br - path - 1) >= sizeof ds)
        return NULL;
    dslen = (size_t)(close_br - path - 1);
    memcpy(ds, path + 1, dslen);
    ds[dslen] = '\0';
    for (rest = close_br + 1; *rest == ' '; rest++)
        ;
    if (dsmap != NULL) {   /* "ds1=/dir1:ds2=/dir2" */
        char *copy = strdup(dsmap), *item, *save = NULL;
        for (item = strtok_r(copy, ":", &save); item; item = strtok_r(NULL, ":", &save)) {
            char *eq = strchr(item, '=');
            if (eq && (size_t)(eq - item) == dslen && strncmp(item, ds, dslen) == 0)
                snprintf(dir, sizeof dir, "%s", eq + 1);
        }
        free(copy);
    }
    if (!dir[0] && root != NULL)
        snprintf(dir, sizeof dir, "%s/%s", root, ds);
    if (!dir[0])
        return NULL;
    restlen = strlen(rest);
    out = malloc(strlen(dir) + restlen + 16);
    if (restlen > 5 && strcmp(rest + restlen - 5, ".vmdk") == 0) {
        sprintf(out, "%s/%.*s-flat.vmdk", dir, (int)(restlen - 5), rest);
        if (access(out, F_OK) == 0)
            return out;
    }
    sprintf(out, "%s/%s", dir, rest);
    return out;
}

/* The expected password, from FAKE_VDDK_PASSWORD_FILE (trailing newline dropped), or NULL. */
static char *expected_password(void)
{
    const char *path = getenv("FAKE_VDDK_PASSWORD_FILE");
    char buf[1024];
    ssize_t n;
    int fd;

    if (path == NULL || (fd = open(path, O_RDONLY)) < 0)
        return NULL;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0)
        return NULL;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    buf[n] = '\0';
    return strdup(buf);
}

/* As a server would: the certificate's thumbprint, then the login. */
static VixError check_remote(conn *c)
{
    const char *thumb = getenv("FAKE_VDDK_THUMBPRINT"), *user = getenv("FAKE_VDDK_USER");
    char *password = expected_password();
    int ok;

    if (thumb != NULL && (c->thumbprint == NULL || strcasecmp(thumb, c->thumbprint) != 0)) {
        free(password);
        say(warn_fn, "VixDiskLib: SSL Verification failed: the server's thumbprint %s does "
                     "not match %s\n", thumb, c->thumbprint ? c->thumbprint : "(none)");
        return VIX_E_FAIL;
    }
    ok = (user == NULL || (c->user && strcmp(user, c->user) == 0))
         && (password == NULL || (c->password && strcmp(password, c->password) == 0));
    free(password);
    if (!ok) {
        say(warn_fn, "VixDiskLib: login failed: incorrect user name or password\n");
        return VIX_E_FAIL;
    }
    return VIX_OK;
}

API VixError VixDiskLib_Open(conn *c, const char *path, uint32_t flags, handle **out)
{
    VixError err = VIX_OK;
    char *file = NULL;
    struct stat st;
    handle *h = NULL;
    int fd;

    trace("open %s flags=%u", path ? path : "(null)", flags);
    if (c == NULL || path == NULL || out == NULL
        || (flags & ~(uint32_t)(FLAG_UNBUFFERED | FLAG_SINGLE_LINK | FLAG_READ_ONLY)))
        return VIX_E_INVALID_ARG;
    enter_open_close("Open");
    sleep_ms(c->f.slow_open_ms);
    if (!initialised) {
        err = VIX_E_FAIL;
        goto done;
    }
    if (c->f.open_fail) {
        err = c->f.open_fail;
        goto done;
    }
    if (c->remote && c->transport == NULL) {
        say(warn_fn, "VixDiskLib: no usable transport mode among those requested\n");
        err = VIX_E_FAIL;
        goto done;
    }
    if (c->remote && (err = check_remote(c)) != VIX_OK)
        goto done;
    if (c->remote && getenv("FAKE_VDDK_REQUIRE_PREPARE") && !access_prepared(c->vmx)) {
        say(warn_fn, "VixDiskLib: %s: no PrepareForAccess in effect for this VM\n", c->vmx);
        err = VIX_E_FAIL;
        goto done;
    }
    file = map_path(path);
    if (file == NULL) {
        err = VIX_E_FILE_NOT_FOUND;
        goto done;
    }
    fd = open(file, (c->readonly || (flags & FLAG_READ_ONLY) ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
        say(warn_fn, "VixDiskLib: cannot open %s (%s): %s\n", path, file, strerror(errno));
        err = errno == ENOENT ? VIX_E_FILE_NOT_FOUND : VIX_E_FAIL;
        goto done;
    }
    fstat(fd, &st);
    h = calloc(1, sizeof *h);
    h->c = c;
    h->fd = fd;
    h->readonly = c->readonly || (flags & FLAG_READ_ONLY);
    h->file_sectors = (uint64_t)st.st_size / SECTOR;
    h->capacity = h->file_sectors + c->f.extra_sectors;
    if (st.st_size % SECTOR)
        say(warn_fn, "VixDiskLib: %s: size %lld is not a multiple of 512\n", file,
            (long long)st.st_size);
    c->handles++;
    *out = h;
    say(log_fn, "VixDiskLib: opened %s (%s, %s)\n", path, c->transport ? c->transport : "file",
        h->readonly ? "read-only" : "read-write");
done:
    free(file);
    leave_open_close();
    return err;
}

API VixError VixDiskLib_Close(handle *h)
{
    VixError err;

    if (h == NULL)
        return VIX_E_INVALID_ARG;
    trace("close read_async=%d wait=%d max_in_flight=%d", h->read_asyncs, h->waits,
          h->max_in_flight);
    enter_open_close("Close");
    enter(h, "Close");
    if (h->nq)
        die("VixDiskLib_Close: %d async requests pending (Wait first)", h->nq);
    err = h->c->f.close_fail;
    h->c->handles--;
    close(h->fd);
    leave(h);
    free(h);
    leave_open_close();
    return err;
}

/* ------------------------------------------------------------------ info */

#ifndef FAKE_BROKEN
API VixError VixDiskLib_GetInfo(handle *h, VixDiskLibInfo **info)
{
    VixDiskLibInfo *i;
    VixError err = VIX_OK;

    if (h == NULL || info == NULL)
        return VIX_E_INVALID_ARG;
    enter(h, "GetInfo");
    if (h->c->lost || h->c->f.info_fail) {
        err = h->c->lost ? VIX_E_HOST_TCP_CONN_LOST : h->c->f.info_fail;
    } else {
        i = calloc(1, sizeof *i);
        i->capacity = h->capacity;
        i->adapterType = 3;
        i->numLinks = 1;
        i->uuid = strdup("60 00 C2 9a 7d 2a 64 4f-8c 5a 3e 3e 1c 33 f0 01");
        i->logicalSectorSize = i->physicalSectorSize = SECTOR;
        *info = i;
    }
    leave(h);
    return err;
}
#endif

API void VixDiskLib_FreeInfo(VixDiskLibInfo *info)
{
    if (info != NULL) {
        free(info->parentFileNameHint);
        free(info->uuid);
        free(info);
    }
}

API const char *VixDiskLib_GetTransportMode(handle *h)
{
    const char *mode;

    enter(h, "GetTransportMode");
    mode = h->c->transport ? h->c->transport : "file";
    leave(h);
    return mode;
}

/* -------------------------------------------------------------------- I/O */

static VixError check_io(handle *h, VixDiskLibSectorType start, VixDiskLibSectorType n)
{
    if (h->c->lost)
        return VIX_E_HOST_TCP_CONN_LOST;
    if (n > MAX_REQUEST_SECTORS) {
        say(warn_fn, "VixDiskLib: request of %" PRIu64 " sectors exceeds the NFC limit\n", n);
        return VIX_E_INVALID_ARG;
    }
    if (start > h->capacity || n > h->capacity - start)
        return VIX_E_DISK_OUTOFRANGE;
    return VIX_OK;
}

static VixError do_read(handle *h, VixDiskLibSectorType start, VixDiskLibSectorType n,
                        uint8_t *buf)
{
    conn *c = h->c;
    VixError err = check_io(h, start, n);
    size_t len = (size_t)n * SECTOR, done = 0;

    trace("read %" PRIu64 " %" PRIu64, start, n);
    if (err != VIX_OK)
        return err;
    c->reads++;
    if (c->f.drop_after && c->reads > c->f.drop_after) {
        c->lost = 1;
        say(warn_fn, "VixDiskLib: NBD_ClientOpen: connection to host lost after %d reads\n",
            c->f.drop_after);
        return VIX_E_HOST_TCP_CONN_LOST;
    }
    if (c->f.read_fail_n && c->reads == c->f.read_fail_n)
        return c->f.read_fail;
    if (start + n > h->file_sectors)   /* the file shrank or GetInfo lied */
        return VIX_E_DISK_OUTOFRANGE;
    while (done < len) {
        ssize_t r = pread(h->fd, buf + done, len - done, (off_t)(start * SECTOR + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return VIX_E_FAIL;
        done += (size_t)r;
    }
    return VIX_OK;
}

static VixError do_write(handle *h, VixDiskLibSectorType start, VixDiskLibSectorType n,
                         const uint8_t *buf)
{
    conn *c = h->c;
    VixError err = check_io(h, start, n);
    size_t len = (size_t)n * SECTOR, done = 0;

    trace("write %" PRIu64 " %" PRIu64, start, n);
    if (err != VIX_OK)
        return err;
    if (h->readonly)
        return VIX_E_FAIL;
    c->writes++;
    if (c->f.drop_after_writes && c->writes > c->f.drop_after_writes) {
        c->lost = 1;
        say(warn_fn, "VixDiskLib: NBD_ClientWrite: connection to host lost after %d writes\n",
            c->f.drop_after_writes);
        return VIX_E_HOST_TCP_CONN_LOST;
    }
    if (c->f.write_fail_n && c->writes == c->f.write_fail_n)
        return c->f.write_fail;
    while (done < len) {
        ssize_t r = pwrite(h->fd, buf + done, len - done, (off_t)(start * SECTOR + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return VIX_E_FAIL;
        done += (size_t)r;
    }
    if (start + n > h->file_sectors)
        h->file_sectors = start + n;
    return VIX_OK;
}

API VixError VixDiskLib_Read(handle *h, VixDiskLibSectorType start, VixDiskLibSectorType n,
                             uint8_t *buf)
{
    VixError err;

    if (h == NULL || buf == NULL)
        return VIX_E_INVALID_ARG;
    enter(h, "Read");
    sleep_ms(h->c->f.slow_read_ms);
    err = do_read(h, start, n, buf);
    leave(h);
    return err;
}

API VixError VixDiskLib_Write(handle *h, VixDiskLibSectorType start, VixDiskLibSectorType n,
                              const uint8_t *buf)
{
    VixError err;

    if (h == NULL || buf == NULL)
        return VIX_E_INVALID_ARG;
    enter(h, "Write");
    err = do_write(h, start, n, buf);
    leave(h);
    return err;
}

API VixError VixDiskLib_Flush(handle *h)
{
    VixError err;

    if (h == NULL)
        return VIX_E_INVALID_ARG;
    enter(h, "Flush");
    trace("flush");
    err = h->c->lost ? VIX_E_HOST_TCP_CONN_LOST : h->c->f.flush_fail;
    if (err == VIX_OK && !h->readonly && fsync(h->fd) != 0)
        err = VIX_E_FAIL;
    leave(h);
    return err;
}

#ifndef FAKE_NO_ASYNC
static void complete_one(handle *h)
{
    async_req r = h->q[0];
    VixError err;

    memmove(h->q, h->q + 1, (size_t)(h->nq - 1) * sizeof h->q[0]);
    h->nq--;
    sleep_until(r.due);
    err = r.write ? do_write(h, r.start, r.count, r.buf) : do_read(h, r.start, r.count, r.buf);
    r.cb(r.data, err);
}

static VixError submit(handle *h, int write, VixDiskLibSectorType start,
                       VixDiskLibSectorType n, uint8_t *buf, VixDiskLibCompletionCB cb,
                       void *data)
{
    if (h == NULL || buf == NULL || cb == NULL)
        return VIX_E_INVALID_ARG;
    enter(h, write ? "WriteAsync" : "ReadAsync");
    if (!write) {
        conn *c = h->c;
        h->read_asyncs++;
        if (c->f.read_async_fail_n && ++c->read_asyncs == c->f.read_async_fail_n) {
            leave(h);
            return c->f.read_async_fail;
        }
    }
    if (h->nq == ASYNC_MAX)
        complete_one(h);
    h->q[h->nq++] = (async_req){write, start, n, buf, cb, data,
                                deadline_ms(write ? 0 : h->c->f.slow_read_ms)};
    if (h->nq > h->max_in_flight)
        h->max_in_flight = h->nq;
    leave(h);
    return VIX_ASYNC;
}

API VixError VixDiskLib_ReadAsync(handle *h, VixDiskLibSectorType start,
                                  VixDiskLibSectorType n, uint8_t *buf,
                                  VixDiskLibCompletionCB cb, void *data)
{
    return submit(h, 0, start, n, buf, cb, data);
}

API VixError VixDiskLib_WriteAsync(handle *h, VixDiskLibSectorType start,
                                   VixDiskLibSectorType n, const uint8_t *buf,
                                   VixDiskLibCompletionCB cb, void *data)
{
    return submit(h, 1, start, n, (uint8_t *)buf, cb, data);
}

API VixError VixDiskLib_Wait(handle *h)
{
    if (h == NULL)
        return VIX_E_INVALID_ARG;
    enter(h, "Wait");
    h->waits++;
    while (h->nq > 0)
        complete_one(h);
    leave(h);
    return VIX_OK;
}
#endif

/* -------------------------------------------------------- allocated blocks */

#ifndef FAKE_NO_QUERY
static int add_block(VixDiskLibBlockList **l, uint32_t *cap, uint64_t off, uint64_t len)
{
    VixDiskLibBlockList *b = *l;

    if (b->numBlocks > 0) {
        VixDiskLibBlock *last = &b->blocks[b->numBlocks - 1];
        if (last->offset + last->length >= off) {
            if (off + len > last->offset + last->length)
                last->length = off + len - last->offset;
            return 0;
        }
    }
    if (b->numBlocks == *cap) {
        *cap *= 2;
        b = realloc(b, sizeof *b + (size_t)*cap * sizeof b->blocks[0]);
        if (b == NULL)
            return -1;
        *l = b;
    }
    b->blocks[b->numBlocks].offset = off;
    b->blocks[b->numBlocks].length = len;
    b->numBlocks++;
    return 0;
}

API VixError VixDiskLib_QueryAllocatedBlocks(handle *h, VixDiskLibSectorType start,
                                             VixDiskLibSectorType n, VixDiskLibSectorType chunk,
                                             VixDiskLibBlockList **out)
{
    uint64_t end_sector = start + n, file_end;
    uint32_t cap = 16;
    VixDiskLibBlockList *l;
    VixError err = VIX_OK;
    off_t pos;

    if (h == NULL || out == NULL)
        return VIX_E_INVALID_ARG;
    enter(h, "QueryAllocatedBlocks");
    trace("query %" PRIu64 " %" PRIu64 " %" PRIu64, start, n, chunk);
    if (h->c->lost || h->c->f.query_fail) {
        err = h->c->lost ? VIX_E_HOST_TCP_CONN_LOST : h->c->f.query_fail;
        goto done;
    }
    if (chunk < MIN_CHUNK || (chunk & (chunk - 1)) || start % chunk || n % chunk || n == 0
        || n / chunk > MAX_CHUNKS) {
        err = VIX_E_INVALID_ARG;
        goto done;
    }
    if (start > h->capacity || n > h->capacity - start) {
        err = VIX_E_DISK_OUTOFRANGE;
        goto done;
    }
    l = calloc(1, sizeof *l + cap * sizeof l->blocks[0]);
    file_end = h->file_sectors * SECTOR;
    pos = (off_t)(start * SECTOR);
    while ((uint64_t)pos < end_sector * SECTOR && (uint64_t)pos < file_end) {
        off_t data = lseek(h->fd, pos, SEEK_DATA), hole;
        uint64_t a, b;
        if (data < 0)
            break;
        hole = lseek(h->fd, data, SEEK_HOLE);
        if ((uint64_t)data >= end_sector * SECTOR)
            break;
        a = (uint64_t)data / SECTOR / chunk * chunk;
        b = ((uint64_t)hole + chunk * SECTOR - 1) / SECTOR / chunk * chunk;
        if (b > end_sector)
            b = end_sector;
        if (add_block(&l, &cap, a, b - a) != 0) {
            err = VIX_E_FAIL;
            goto done;
        }
        pos = hole;
    }
    *out = l;
done:
    leave(h);
    return err;
}

API VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *l)
{
    free(l);
    return VIX_OK;
}
#endif
