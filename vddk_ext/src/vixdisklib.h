/*
 * vixdisklib.h: the part of VMware's libvixDiskLib C ABI that vddk_ext uses,
 * written from the published facts in /work/shared/VMWARE.md (x86-64 layout).
 * Never linked: vddk.c resolves every function with dlsym. The test library
 * in tests/fake_vddk/ declares the same ABI independently, so a mistake here
 * does not hide itself by being copied there.
 */
#ifndef VDDK_EXT_VIXDISKLIB_H
#define VDDK_EXT_VIXDISKLIB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint64_t VixError;
#define VIX_ERROR_CODE(e) ((e) & 0xFFFF)

#define VIX_OK 0
#define VIX_E_FAIL 1
#define VIX_E_INVALID_ARG 3
#define VIX_E_FILE_NOT_FOUND 4
#define VIX_E_NOT_SUPPORTED 6
#define VIX_E_HOST_TCP_CONN_LOST 14011
#define VIX_E_DISK_OUTOFRANGE 16007
#define VIX_ASYNC 25000

#define VIXDISKLIB_SECTOR_SIZE 512
#define VIXDISKLIB_FLAG_OPEN_UNBUFFERED 1
#define VIXDISKLIB_FLAG_OPEN_SINGLE_LINK 2
#define VIXDISKLIB_FLAG_OPEN_READ_ONLY 4
#define VIXDISKLIB_MIN_CHUNK_SIZE 128              /* sectors */
#define VIXDISKLIB_MAX_CHUNK_NUMBER (512 * 1024)   /* chunks per QueryAllocatedBlocks */

typedef void *VixDiskLibConnection;
typedef void *VixDiskLibHandle;
typedef void VixDiskLibGenericLogFunc(const char *fmt, va_list args);
typedef void (*VixDiskLibCompletionCB)(void *cbData, VixError result);

typedef enum { VIXDISKLIB_CRED_UID = 1, VIXDISKLIB_CRED_SESSIONID = 2 } VixDiskLibCredType;
typedef enum { VIXDISKLIB_SPEC_VMX = 0 } VixDiskLibSpecType;

typedef struct VixDiskLibConnectParams {
    char *vmxSpec;                          /* @0  "moref=vm-16" */
    char *serverName;                       /* @8 */
    char *thumbPrint;                       /* @16 */
    long privateUse;                        /* @24 reserved */
    VixDiskLibCredType credType;            /* @32 */
    union {                                 /* @40 */
        struct { char *userName; char *password; } uid;
        struct { char *cookie; char *userName; char *key; } sessionId;
    } creds;
    uint32_t port;                          /* @64 */
    uint32_t nfcHostPort;                   /* @68 */
    char *vimApiVer;                        /* @72 */
    char reserved[8];                       /* @80 */
    void *state;                            /* @88 */
    union { void *opaque[3]; } spec;        /* @96 */
    VixDiskLibSpecType specType;            /* @120 */
} VixDiskLibConnectParams;

typedef struct { uint32_t cylinders, heads, sectors; } VixDiskLibGeometry;

typedef struct VixDiskLibInfo {
    VixDiskLibGeometry biosGeo;             /* @0 */
    VixDiskLibGeometry physGeo;             /* @12 */
    uint64_t capacity;                      /* @24 sectors */
    int adapterType;                        /* @32 */
    int numLinks;                           /* @36 */
    char *parentFileNameHint;               /* @40 */
    char *uuid;                             /* @48 */
    /* logicalSectorSize @56 and physicalSectorSize @60 exist only from VDDK 7: never read */
} VixDiskLibInfo;

typedef struct { uint64_t offset, length; } VixDiskLibBlock;   /* sectors */
typedef struct {
    uint32_t numBlocks;
    VixDiskLibBlock blocks[1];              /* @8, numBlocks of them */
} VixDiskLibBlockList;

_Static_assert(offsetof(VixDiskLibConnectParams, credType) == 32, "credType @32");
_Static_assert(offsetof(VixDiskLibConnectParams, creds) == 40, "creds @40");
_Static_assert(offsetof(VixDiskLibConnectParams, port) == 64, "port @64");
_Static_assert(offsetof(VixDiskLibConnectParams, vimApiVer) == 72, "vimApiVer @72");
_Static_assert(offsetof(VixDiskLibConnectParams, state) == 88, "state @88");
_Static_assert(offsetof(VixDiskLibConnectParams, spec) == 96, "spec @96");
_Static_assert(offsetof(VixDiskLibConnectParams, specType) == 120, "specType @120");
_Static_assert(sizeof(VixDiskLibConnectParams) == 128, "ConnectParams is 128 bytes");
_Static_assert(offsetof(VixDiskLibInfo, capacity) == 24, "capacity @24");
_Static_assert(offsetof(VixDiskLibInfo, uuid) == 48, "uuid @48");
_Static_assert(offsetof(VixDiskLibBlockList, blocks) == 8, "blocks @8");

/*
 * The functions, as X(name, return type, parameters). Required ones must all
 * resolve; an optional one may be missing (older VDDK), and is used only
 * when its partner (QueryAllocatedBlocks/FreeBlockList, ReadAsync/Wait,
 * AllocateConnectParams/FreeConnectParams, PrepareForAccess/EndAccess) resolved too.
 */
#define VDDK_REQUIRED_FUNCTIONS(X)                                                              \
    X(InitEx, VixError, (uint32_t major, uint32_t minor, VixDiskLibGenericLogFunc *log,        \
                         VixDiskLibGenericLogFunc *warn, VixDiskLibGenericLogFunc *panic,      \
                         const char *libDir, const char *configFile))                          \
    X(Exit, void, (void))                                                                       \
    X(ConnectEx, VixError, (const VixDiskLibConnectParams *params, char readOnly,              \
                            const char *snapshotRef, const char *transportModes,              \
                            VixDiskLibConnection *connection))                                 \
    X(Disconnect, VixError, (VixDiskLibConnection connection))                                  \
    X(Open, VixError, (const VixDiskLibConnection connection, const char *path,                \
                       uint32_t flags, VixDiskLibHandle *handle))                              \
    X(Close, VixError, (VixDiskLibHandle handle))                                               \
    X(GetInfo, VixError, (VixDiskLibHandle handle, VixDiskLibInfo **info))                      \
    X(FreeInfo, void, (VixDiskLibInfo *info))                                                   \
    X(GetTransportMode, const char *, (VixDiskLibHandle handle))                               \
    X(Read, VixError, (VixDiskLibHandle handle, uint64_t startSector, uint64_t numSectors,     \
                       uint8_t *buf))                                                          \
    X(Write, VixError, (VixDiskLibHandle handle, uint64_t startSector, uint64_t numSectors,    \
                        const uint8_t *buf))                                                   \
    X(Flush, VixError, (VixDiskLibHandle handle))                                               \
    X(GetErrorText, char *, (VixError err, const char *locale))                                 \
    X(FreeErrorText, void, (char *text))

#define VDDK_OPTIONAL_FUNCTIONS(X)                                                              \
    X(ReadAsync, VixError, (VixDiskLibHandle handle, uint64_t startSector,                     \
                            uint64_t numSectors, uint8_t *buf, VixDiskLibCompletionCB cb,      \
                            void *cbData))                                                     \
    X(Wait, VixError, (VixDiskLibHandle handle))                                                \
    X(QueryAllocatedBlocks, VixError, (VixDiskLibHandle handle, uint64_t startSector,          \
                                       uint64_t numSectors, uint64_t chunkSize,                \
                                       VixDiskLibBlockList **blockList))                       \
    X(FreeBlockList, VixError, (VixDiskLibBlockList *blockList))                                \
    X(AllocateConnectParams, VixDiskLibConnectParams *, (void))                                 \
    X(FreeConnectParams, void, (VixDiskLibConnectParams *params))                               \
    X(PrepareForAccess, VixError, (const VixDiskLibConnectParams *params,                      \
                                   const char *identity))                                      \
    X(EndAccess, VixError, (const VixDiskLibConnectParams *params, const char *identity))

#endif /* VDDK_EXT_VIXDISKLIB_H */
