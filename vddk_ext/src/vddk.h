/*
 * vddk: the VDDK backend of blockio, usable without Python.
 *
 * The library: libvixDiskLib is loaded once per process with dlopen at run
 * time (never linked), from LIBDIR/lib64/libvixDiskLib.so.{9,8,7,6}, then
 * LIBDIR/libvixDiskLib.so.{9,8,7,6}. bio_vddk_init loads it, checks every
 * required symbol and calls InitEx; it must run on the process's main thread
 * before any I/O thread touches VDDK. bio_vddk_exit calls Exit once no disk
 * is open; the library cannot be initialised again afterwards.
 *
 * Disks: bio_open_vddk makes one connection (ConnectEx) and one handle
 * (Open) per disk; ConnectEx/Open/Close/Disconnect run under one global
 * mutex. Reads use ReadAsync + Wait when the library has them, else Read:
 * the requests of a batch go out in waves of up to queue_depth in flight
 * (default BIO_VDDK_QUEUE_DEPTH), each wave drained by one Wait; a failed
 * request fails the batch once its wave is drained. Every request is at
 * most 2 MiB. Errors carry the VixError and VDDK's text in bio_error.vix*.
 *
 * Logging: VDDK's log/warn/panic callbacks may run on any thread, VDDK's
 * own included. They format the message and append it to a bounded queue
 * under a private mutex, never waiting on anything else; the embedder
 * drains the queue (bio_vddk_log_pop) when convenient.
 */
#ifndef VDDK_EXT_VDDK_H
#define VDDK_EXT_VDDK_H

#include "blockio.h"

#define BIO_VDDK_MAX_REQUEST (2u << 20)
#define BIO_VDDK_QUEUE_DEPTH 16     /* default async reads in flight per handle */
#define BIO_VDDK_LOG_MAX 1024       /* bytes per queued message */

typedef enum { BIO_VDDK_LOG_INFO = 0, BIO_VDDK_LOG_WARN = 1, BIO_VDDK_LOG_PANIC = 2 } bio_vddk_level;

typedef struct bio_vddk_params {
    const char *path;            /* "[datastore] dir/disk.vmdk", or a local .vmdk without server */
    const char *server;          /* NULL: a local disk (no connection parameters) */
    uint32_t port;               /* 0 = 443 */
    uint32_t nfc_port;           /* 0 = VDDK's default (902) */
    const char *thumbprint;      /* SHA-1 "xx:xx:...", required with server */
    const char *user;
    const char *password;        /* with user: credType UID */
    const char *cookie;          /* instead of password: credType SESSIONID (key = password) */
    const char *vmx_spec;        /* "moref=vm-16", required with server */
    const char *snapshot_ref;    /* "snapshot-42" or NULL */
    const char *transports;      /* "nbdssl:nbd", NULL = VDDK's default order */
    int readonly;
    int single_link;             /* VIXDISKLIB_FLAG_OPEN_SINGLE_LINK */
    int no_async;                /* read with Read even when ReadAsync exists */
    unsigned queue_depth;        /* async reads in flight, 1..BIO_READV_MAX; 0 = the default */
} bio_vddk_params;

/* 0 = not loaded, 1 = initialised, 2 = exited. */
int bio_vddk_state(void);
/* The loaded library's path, or NULL. */
const char *bio_vddk_library(void);
/* Whether an optional function is in use: "QueryAllocatedBlocks", "ReadAsync", ... */
int bio_vddk_has(const char *name);

/* Loads libdir's library and calls InitEx; a no-op when already initialised from libdir. */
int bio_vddk_init(const char *libdir, const char *config_file, bio_error *e);
/* Calls Exit; fails while a disk is open. A no-op unless initialised. */
int bio_vddk_exit(bio_error *e);

int bio_open_vddk(const bio_vddk_params *p, bio_disk **out, bio_error *e);
/*
 * PrepareForAccess (end = 0) or EndAccess (end = 1) for p's VM (p->server, thumbprint, vmx_spec,
 * user, password/cookie; path and snapshot_ref unused), identifying the application as identity.
 * A no-op (0, *called = 0) when the library lacks the pair; else *called = 1.
 */
int bio_vddk_access(const bio_vddk_params *p, const char *identity, int end, int *called,
                    bio_error *e);
/* The transport VDDK chose for a disk of kind BIO_KIND_VDDK ("nbdssl", "file", ...). */
const char *bio_vddk_transport(const bio_disk *d);

/* Log queue: 1 and a message if one was queued, else 0. *dropped = messages lost to overflow. */
int bio_vddk_log_pop(int *level, char *buf, size_t size, unsigned long *dropped);
int bio_vddk_log_pending(void);

#endif /* VDDK_EXT_VDDK_H */
