/*
 * pyvddk.c: the Python face of the VDDK backend: vddk_init, open_vddk,
 * vddk_exit, vddk_info, the VixError exception, and VDDK's log queue drained
 * into the logger "repo_engine.vddk" (only ever with the GIL held, from the
 * thread that returns from a VDDK call; VDDK's callbacks never touch Python).
 */
#include "module.h"

#include <stdlib.h>
#include <string.h>

#include "vddk.h"

static PyObject *VixError;
static PyObject *vddk_logger;   /* logging.getLogger("repo_engine.vddk"), made on first use */

#define LOGGER_NAME "repo_engine.vddk"

/* ================================================================== errors */

PyObject *raise_vix(const bio_error *e)
{
    PyObject *msg = PyUnicode_DecodeUTF8(e->msg, (Py_ssize_t)strlen(e->msg), "replace");
    PyObject *exc = NULL, *text = NULL, *code = NULL, *full = NULL;

    if (msg == NULL)
        return NULL;
    exc = PyObject_CallFunction(VixError, "(iN)", e->err, msg);
    text = PyUnicode_DecodeUTF8(e->vix_text, (Py_ssize_t)strlen(e->vix_text), "replace");
    code = PyLong_FromUnsignedLongLong(e->vix & 0xFFFF);
    full = PyLong_FromUnsignedLongLong(e->vix);
    if (exc != NULL && text != NULL && code != NULL && full != NULL
        && PyObject_SetAttrString(exc, "code", code) == 0
        && PyObject_SetAttrString(exc, "vix_error", full) == 0
        && PyObject_SetAttrString(exc, "text", text) == 0)
        PyErr_SetObject(VixError, exc);
    Py_XDECREF(exc);
    Py_XDECREF(text);
    Py_XDECREF(code);
    Py_XDECREF(full);
    return NULL;
}

/* ================================================================= logging */

static const int log_levels[] = {20, 30, 50};   /* INFO, WARNING, CRITICAL */

static int log_one(int level, const char *text)
{
    PyObject *r;

    if (vddk_logger == NULL) {
        PyObject *logging = PyImport_ImportModule("logging");
        if (logging == NULL)
            return -1;
        vddk_logger = PyObject_CallMethod(logging, "getLogger", "s", LOGGER_NAME);
        Py_DECREF(logging);
        if (vddk_logger == NULL)
            return -1;
    }
    r = PyObject_CallMethod(vddk_logger, "log", "iss", level, "%s", text);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

void pyvddk_drain_log(void)
{
    PyObject *type, *value, *tb;
    char text[BIO_VDDK_LOG_MAX];
    unsigned long dropped = 0;
    int level;

    if (!bio_vddk_log_pending())
        return;
    PyErr_Fetch(&type, &value, &tb);
    for (;;) {
        int got = bio_vddk_log_pop(&level, text, sizeof text, &dropped);
        if (dropped) {
            char note[96];
            snprintf(note, sizeof note, "%lu VDDK log messages were dropped (queue full)",
                     dropped);
            if (log_one(30, note) != 0)
                goto unraisable;
        }
        if (!got)
            break;
        if (log_one(log_levels[level], text) != 0)
            goto unraisable;
    }
    PyErr_Restore(type, value, tb);
    return;
unraisable:
    PyErr_WriteUnraisable(NULL);
    PyErr_Restore(type, value, tb);
}

/* ============================================================ entry points */

static PyObject *raise_and_drain(const bio_error *e)
{
    pyvddk_drain_log();
    return raise_bio(e);
}

/* Initialises VDDK from libdir (str/bytes/path or None = $VDDK_LIBDIR). 0 or -1 with an error. */
static int init_from(PyObject *libdir_obj, const char *config_file)
{
    PyObject *encoded = NULL;
    const char *libdir;
    bio_error err;
    int rc;

    if (libdir_obj != Py_None) {
        if (!PyUnicode_FSConverter(libdir_obj, &encoded))
            return -1;
        libdir = PyBytes_AS_STRING(encoded);
    } else if ((libdir = getenv("VDDK_LIBDIR")) == NULL || !*libdir) {
        PyErr_SetString(PyExc_ValueError, "no VDDK library directory: pass libdir= "
                        "(--vddk-libdir) or set VDDK_LIBDIR");
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = bio_vddk_init(libdir, config_file, &err);
    Py_END_ALLOW_THREADS
    Py_XDECREF(encoded);
    if (rc != 0) {
        raise_and_drain(&err);
        return -1;
    }
    pyvddk_drain_log();
    return 0;
}

PyObject *pyvddk_init(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"libdir", "config_file", NULL};
    PyObject *libdir = Py_None;
    const char *config_file = NULL;

    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O$z:vddk_init", kwlist, &libdir,
                                     &config_file))
        return NULL;
    if (init_from(libdir, config_file) != 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *pyvddk_exit(PyObject *module, PyObject *unused)
{
    bio_error err;
    int rc;

    (void)module;
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    rc = bio_vddk_exit(&err);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return raise_and_drain(&err);
    pyvddk_drain_log();
    Py_RETURN_NONE;
}

PyObject *pyvddk_info(PyObject *module, PyObject *unused)
{
    static const char *const states[] = {"unloaded", "initialised", "exited"};
    static const char *const optional[] = {"ReadAsync", "QueryAllocatedBlocks",
                                           "AllocateConnectParams", "PrepareForAccess"};
    const char *path = bio_vddk_library();
    PyObject *library = path ? PyUnicode_DecodeFSDefault(path) : Py_NewRef(Py_None);
    PyObject *functions = library ? PyDict_New() : NULL;
    size_t i;

    (void)module;
    (void)unused;
    for (i = 0; functions != NULL && i < sizeof optional / sizeof optional[0]; i++)
        if (PyDict_SetItemString(functions, optional[i],
                                 bio_vddk_has(optional[i]) ? Py_True : Py_False) != 0)
            Py_CLEAR(functions);
    if (functions == NULL) {
        Py_XDECREF(library);
        return NULL;
    }
    return Py_BuildValue("{sssNsN}", "state", states[bio_vddk_state()], "library", library,
                         "functions", functions);
}

/* A secret (str or bytes, or None) copied into memory we wipe; *out NULL for None. */
static int copy_secret(PyObject *obj, const char *name, char **out)
{
    const char *p;
    Py_ssize_t n;

    *out = NULL;
    if (obj == Py_None)
        return 0;
    if (PyUnicode_Check(obj)) {
        p = PyUnicode_AsUTF8AndSize(obj, &n);
        if (p == NULL)
            return -1;
    } else if (PyBytes_Check(obj)) {
        p = PyBytes_AS_STRING(obj);
        n = PyBytes_GET_SIZE(obj);
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be str or bytes, not %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if ((Py_ssize_t)strlen(p) != n) {
        PyErr_Format(PyExc_ValueError, "%s contains a NUL byte", name);
        return -1;
    }
    *out = PyMem_Malloc((size_t)n + 1);
    if (*out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*out, p, (size_t)n + 1);
    return 0;
}

static void free_secret(char *s)
{
    if (s != NULL) {
        explicit_bzero(s, strlen(s));
        PyMem_Free(s);
    }
}

/* What open_vddk and the access calls share before calling VDDK: load it if needed (or again
 * from another libdir), then copy the secrets into C memory that free_params wipes. */
static int ready_params(PyObject *libdir, const char *config_file, PyObject *password_obj,
                        PyObject *cookie_obj, bio_vddk_params *p)
{
    char *password = NULL, *cookie = NULL;

    if ((bio_vddk_state() == 0 || libdir != Py_None) && init_from(libdir, config_file) != 0)
        return -1;
    if (copy_secret(password_obj, "password", &password) != 0
        || copy_secret(cookie_obj, "cookie", &cookie) != 0) {
        free_secret(password);
        return -1;
    }
    p->password = password;
    p->cookie = cookie;
    return 0;
}

static void free_params(bio_vddk_params *p)
{
    free_secret((char *)p->password);
    free_secret((char *)p->cookie);
}

PyObject *pyvddk_open(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"path", "server", "port", "nfc_port", "thumbprint", "user",
                             "password", "cookie", "vmx_spec", "snapshot_ref", "transports",
                             "libdir", "config_file", "readonly", "single_link", "async_reads",
                             "queue_depth", NULL};
    bio_vddk_params p = {0};
    PyObject *path, *password_obj = Py_None, *cookie_obj = Py_None, *libdir = Py_None;
    PyObject *transport;
    const char *config_file = NULL;
    unsigned int port = 443, nfc_port = 0;
    int readonly = 1, single_link = 0, async_reads = 1, queue_depth = BIO_VDDK_QUEUE_DEPTH, rc;
    bio_disk *d = NULL;
    bio_error err;

    (void)module;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "U|$zIIzzOOzzzOzpppi:open_vddk", kwlist, &path, &p.server, &port,
            &nfc_port, &p.thumbprint, &p.user, &password_obj, &cookie_obj, &p.vmx_spec,
            &p.snapshot_ref, &p.transports, &libdir, &config_file, &readonly, &single_link,
            &async_reads, &queue_depth))
        return NULL;
    if (queue_depth < 1 || queue_depth > BIO_READV_MAX) {
        PyErr_Format(PyExc_ValueError, "queue_depth must be 1-%d, not %d", BIO_READV_MAX,
                     queue_depth);
        return NULL;
    }
    if (port == 0 || port > 65535 || nfc_port > 65535) {
        PyErr_Format(PyExc_ValueError, "port must be 1-65535 and nfc_port 0-65535");
        return NULL;
    }
    p.path = PyUnicode_AsUTF8(path);
    if (p.path == NULL)
        return NULL;
    if (ready_params(libdir, config_file, password_obj, cookie_obj, &p) != 0)
        return NULL;
    p.port = port;
    p.nfc_port = nfc_port;
    p.readonly = readonly;
    p.single_link = single_link;
    p.no_async = !async_reads;
    p.queue_depth = (unsigned)queue_depth;
    Py_BEGIN_ALLOW_THREADS
    rc = bio_open_vddk(&p, &d, &err);
    Py_END_ALLOW_THREADS
    free_params(&p);
    if (rc != 0)
        return raise_and_drain(&err);
    pyvddk_drain_log();
    transport = PyUnicode_FromString(bio_vddk_transport(d));
    if (transport == NULL) {
        Py_BEGIN_ALLOW_THREADS
        bio_close(d, &err);
        Py_END_ALLOW_THREADS
        return NULL;
    }
    path = disk_wrap(d, Py_NewRef(path), transport);
    Py_DECREF(transport);
    return path;
}

/* vddk_prepare_for_access / vddk_end_access: True when VDDK was called, False without the pair. */
static PyObject *access_call(PyObject *args, PyObject *kwargs, int end)
{
    static char *kwlist[] = {"server", "port", "thumbprint", "user", "password", "cookie",
                             "vmx_spec", "identity", "libdir", "config_file", NULL};
    bio_vddk_params p = {0};
    PyObject *password_obj = Py_None, *cookie_obj = Py_None, *libdir = Py_None;
    const char *identity = "repo-engine", *config_file = NULL;
    unsigned int port = 443;
    int rc, called = 0;
    bio_error err;

    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, end ? "|$sIzzOOzsOz:vddk_end_access" : "|$sIzzOOzsOz:vddk_prepare_for_access",
            kwlist, &p.server, &port, &p.thumbprint, &p.user, &password_obj, &cookie_obj,
            &p.vmx_spec, &identity, &libdir, &config_file))
        return NULL;
    if (p.server == NULL) {
        PyErr_SetString(PyExc_TypeError, "server= is required");
        return NULL;
    }
    if (port == 0 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "port must be 1-65535");
        return NULL;
    }
    if (ready_params(libdir, config_file, password_obj, cookie_obj, &p) != 0)
        return NULL;
    p.port = port;
    Py_BEGIN_ALLOW_THREADS
    rc = bio_vddk_access(&p, identity, end, &called, &err);
    Py_END_ALLOW_THREADS
    free_params(&p);
    if (rc != 0)
        return raise_and_drain(&err);
    pyvddk_drain_log();
    return PyBool_FromLong(called);
}

PyObject *pyvddk_prepare_for_access(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    return access_call(args, kwargs, 0);
}

PyObject *pyvddk_end_access(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    return access_call(args, kwargs, 1);
}

int pyvddk_add_to_module(PyObject *m)
{
    VixError = PyErr_NewExceptionWithDoc(
        "vddk_ext.VixError",
        "A VDDK call failed: .code is VIX_ERROR_CODE (e.g. 14011 connection lost), .vix_error "
        "the full 64-bit VixError, .text VDDK's own description; errno is set, the message "
        "names the disk and the VixDiskLib function.",
        DiskError, NULL);
    if (VixError == NULL || PyModule_AddObjectRef(m, "VixError", VixError) != 0)
        return -1;
    return 0;
}
