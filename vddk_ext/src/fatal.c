/* fatal.c: a one-line message and a documented exit code when the process dies on a fault.
 *
 * The local index is an LMDB file read through mmap. A damaged page can point past the end of
 * the file (SIGBUS) or into nonsense (SIGSEGV), and LMDB's own checks end in abort(). Python can
 * not catch any of these: its signal handlers run between bytecodes, after the faulting
 * instruction has been retried forever. So the handler lives here, does only what is
 * async-signal-safe (write, _exit) and prints a message the caller formatted in advance.
 */
#include "module.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FATAL_MESSAGE_MAX 2048
/* room for a stack overflow's SIGSEGV handler to run on */
#define FATAL_STACK_SIZE (64 * 1024)

static const int fatal_signals[] = {SIGBUS, SIGSEGV, SIGABRT, SIGILL, SIGFPE};
static const char *const fatal_names[] = {"SIGBUS", "SIGSEGV", "SIGABRT", "SIGILL", "SIGFPE"};
#define FATAL_COUNT (sizeof fatal_signals / sizeof fatal_signals[0])

static char fatal_head[FATAL_MESSAGE_MAX];
static size_t fatal_head_len;
static char fatal_tail[FATAL_MESSAGE_MAX];
static size_t fatal_tail_len;
static int fatal_code;

static void write_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, p, n);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static void fatal_handler(int sig)
{
    const char *name = "a fatal signal";
    size_t i;

    for (i = 0; i < FATAL_COUNT; i++)
        if (fatal_signals[i] == sig)
            name = fatal_names[i];
    write_all(fatal_head, fatal_head_len);
    write_all(name, strlen(name));
    write_all(fatal_tail, fatal_tail_len);
    _exit(fatal_code);
}

static int copy_text(PyObject *text, char *to, size_t *len, const char *what)
{
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);

    if (s == NULL)
        return -1;
    if ((size_t)n >= FATAL_MESSAGE_MAX) {
        PyErr_Format(PyExc_ValueError, "the %s of the fatal-signal message is over %d bytes",
                     what, FATAL_MESSAGE_MAX - 1);
        return -1;
    }
    memcpy(to, s, (size_t)n);
    *len = (size_t)n;
    return 0;
}

static int use_alternate_stack(void)
{
    static void *stack;
    stack_t ss;

    if (stack != NULL)
        return 0;
    stack = malloc(FATAL_STACK_SIZE);
    if (stack == NULL)
        return -1;
    ss.ss_sp = stack;
    ss.ss_size = FATAL_STACK_SIZE;
    ss.ss_flags = 0;
    return sigaltstack(&ss, NULL);
}

PyObject *on_fatal_signal(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"head", "tail", "exit_code", NULL};
    PyObject *head, *tail;
    int code;
    struct sigaction sa;
    size_t i;

    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UUi:on_fatal_signal", kwlist, &head, &tail,
                                     &code))
        return NULL;
    if (code < 0 || code > 255) {
        PyErr_SetString(PyExc_ValueError, "exit_code must be 0-255");
        return NULL;
    }
    if (copy_text(head, fatal_head, &fatal_head_len, "head") != 0
        || copy_text(tail, fatal_tail, &fatal_tail_len, "tail") != 0)
        return NULL;
    fatal_code = code;
    (void)use_alternate_stack();  /* without one, only a stack overflow goes unreported */
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fatal_handler;
    sa.sa_flags = SA_ONSTACK | SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    for (i = 0; i < FATAL_COUNT; i++)
        if (sigaction(fatal_signals[i], &sa, NULL) != 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}
