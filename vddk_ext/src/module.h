/*
 * module.h: what module.c (Disk, BlockReader, Batch) and pyvddk.c (the VDDK
 * entry points) share inside the extension vddk_ext._vddk_ext.
 */
#ifndef VDDK_EXT_MODULE_H
#define VDDK_EXT_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>

#include "blockio.h"

#define API_VERSION 1   /* bumped on incompatible changes; additions keep it */

typedef struct {
    PyObject_HEAD
    bio_disk *disk;          /* NULL once closed; changed only with lock held */
    pthread_mutex_t lock;
    PyObject *path;          /* str */
    PyObject *transport;     /* str for VDDK disks, None otherwise */
    uint64_t capacity;
    bio_kind kind;
} DiskObject;

extern PyTypeObject DiskType;
extern PyObject *DiskError;

/* Sets DiskError (or VixError when e->vix is set) from e; returns NULL. */
PyObject *raise_bio(const bio_error *e);
/* A new Disk owning d; steals path. On failure closes d. */
PyObject *disk_wrap(bio_disk *d, PyObject *path, PyObject *transport);

/* pyvddk.c */
PyObject *raise_vix(const bio_error *e);
void pyvddk_drain_log(void);   /* VDDK's queued log messages -> logging; keeps a pending error */
int pyvddk_add_to_module(PyObject *m);
PyObject *on_fatal_signal(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *pyvddk_open(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *pyvddk_init(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *pyvddk_exit(PyObject *module, PyObject *unused);
PyObject *pyvddk_info(PyObject *module, PyObject *unused);
PyObject *pyvddk_prepare_for_access(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *pyvddk_end_access(PyObject *module, PyObject *args, PyObject *kwargs);

#define PYVDDK_METHODS                                                                         \
    {"open_vddk", (PyCFunction)(void (*)(void))pyvddk_open, METH_VARARGS | METH_KEYWORDS,      \
     "open_vddk(path, *, server=None, ...) -> Disk; see vddk_ext.open_vddk"},                  \
    {"vddk_init", (PyCFunction)(void (*)(void))pyvddk_init, METH_VARARGS | METH_KEYWORDS,      \
     "vddk_init(libdir=None, *, config_file=None): load VDDK and call InitEx (main thread)"},  \
    {"vddk_exit", (PyCFunction)pyvddk_exit, METH_NOARGS,                                      \
     "vddk_exit(): VixDiskLib_Exit once no VDDK disk is open; final for the process"},        \
    {"vddk_info", (PyCFunction)pyvddk_info, METH_NOARGS,                                      \
     "vddk_info() -> dict: state, library path, optional functions in use"},                 \
    {"vddk_prepare_for_access", (PyCFunction)(void (*)(void))pyvddk_prepare_for_access,       \
     METH_VARARGS | METH_KEYWORDS,                                                             \
     "vddk_prepare_for_access(*, server, ..., identity='repo-engine') -> bool: "              \
     "VixDiskLib_PrepareForAccess (False: the library lacks it)"},                             \
    {"vddk_end_access", (PyCFunction)(void (*)(void))pyvddk_end_access,                       \
     METH_VARARGS | METH_KEYWORDS,                                                             \
     "vddk_end_access(*, server, ..., identity='repo-engine') -> bool: "                      \
     "VixDiskLib_EndAccess (False: the library lacks it)"},

#endif /* VDDK_EXT_MODULE_H */
