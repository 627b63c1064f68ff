#include "pyargs.h"

#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "threads.h"

int cmh_get_matrix(PyObject *obj, const char *func, const char *arg, cmh_matrix *m) {
    m->held = 0;
    if (PyObject_GetBuffer(obj, &m->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s(): %s must be a C-contiguous uint8 array of shape (n, nbytes), not '%.200s'"
                     " (use numpy.ascontiguousarray(x, dtype=numpy.uint8))",
                     func, arg, Py_TYPE(obj)->tp_name);
        return -1;
    }
    m->held = 1;
    const char *fmt = m->view.format ? m->view.format : "B";
    if (m->view.itemsize != 1 || (strcmp(fmt, "B") != 0 && strcmp(fmt, "=B") != 0 &&
                                  strcmp(fmt, "<B") != 0 && strcmp(fmt, "|B") != 0)) {
        PyErr_Format(PyExc_TypeError, "%s(): %s must hold uint8 (format 'B'), got format '%s'",
                     func, arg, fmt);
        cmh_release_matrix(m);
        return -1;
    }
    if (m->view.ndim != 2) {
        PyErr_Format(PyExc_ValueError, "%s(): %s must be 2-D (n, nbytes), got %d dimension(s)",
                     func, arg, m->view.ndim);
        cmh_release_matrix(m);
        return -1;
    }
    m->rows = (size_t)m->view.shape[0];
    m->cols = (size_t)m->view.shape[1];
    m->data = (const uint8_t *)m->view.buf;
    return 0;
}

/* Whether a buffer's struct format is one native-order scalar of the kind ("int": signed
 * integer, "float": floating point); the size is checked separately (itemsize). */
static int format_is(const char *fmt, const char *kind) {
    if (fmt == NULL) fmt = "B";
    if (*fmt == '@' || *fmt == '=' || *fmt == '|') fmt++;
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<') fmt++;
#else
    else if (*fmt == '>' || *fmt == '!') fmt++;
#endif
    if (fmt[0] == '\0' || fmt[1] != '\0') return 0;
    return strchr(strcmp(kind, "int") == 0 ? "bhilqn" : "efd", fmt[0]) != NULL;
}

static int get_buffer(PyObject *obj, const char *func, const char *arg, const char *dtype, size_t count,
                      cmh_out *o, int writable) {
    o->held = 0;
    const int is_float = strncmp(dtype, "float", 5) == 0;
    const size_t itemsize = (size_t)atoi(dtype + (is_float ? 5 : 3)) / 8; /* "int32" -> 4 */
    if (PyObject_GetBuffer(obj, &o->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s(): %s must be a %sC-contiguous %s array, not '%.200s'",
                     func, arg, writable ? "writable " : "", dtype, Py_TYPE(obj)->tp_name);
        return -1;
    }
    o->held = 1;
    /* The exact dtype, not only the byte size: a float32 buffer of the right length would
     * otherwise receive integer bit patterns. */
    if (o->view.itemsize != (Py_ssize_t)itemsize || !format_is(o->view.format, is_float ? "float" : "int")) {
        PyErr_Format(PyExc_TypeError, "%s(): %s must be an array of %s, got format '%s' with itemsize %zd",
                     func, arg, dtype, o->view.format ? o->view.format : "B", o->view.itemsize);
        cmh_release_out(o);
        return -1;
    }
    if ((size_t)o->view.len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s(): %s must hold %zu items of %s (%zu bytes), got %zd bytes",
                     func, arg, count, dtype, count * itemsize, o->view.len);
        cmh_release_out(o);
        return -1;
    }
    o->data = o->view.buf;
    return 0;
}

int cmh_get_out(PyObject *obj, const char *func, const char *arg, const char *dtype, size_t count,
                cmh_out *o) {
    return get_buffer(obj, func, arg, dtype, count, o, 1);
}

int cmh_get_in(PyObject *obj, const char *func, const char *arg, const char *dtype, size_t count,
               cmh_out *o) {
    return get_buffer(obj, func, arg, dtype, count, o, 0);
}

void cmh_release_matrix(cmh_matrix *m) {
    if (m->held) PyBuffer_Release(&m->view);
    m->held = 0;
}

void cmh_release_out(cmh_out *o) {
    if (o->held) PyBuffer_Release(&o->view);
    o->held = 0;
}

int cmh_check_code_bytes(size_t nbytes, const char *func) {
    if (nbytes == 0 || nbytes > CMH_MAX_BYTES) {
        PyErr_Format(PyExc_ValueError, "%s(): codes must be 1 to %d bytes (8 to %d bits), got %zu bytes",
                     func, CMH_MAX_BYTES, CMH_MAX_BYTES * 8, nbytes);
        return -1;
    }
    return 0;
}

int cmh_resolve_threads(Py_ssize_t threads, const char *func, size_t *out) {
    if (threads < 0) {
        PyErr_Format(PyExc_ValueError, "%s(): threads must be >= 0 (0 = all CPUs), got %zd", func,
                     threads);
        return -1;
    }
    *out = threads == 0 ? cmh_cpu_count() : (size_t)threads;
    if (*out > 1024) *out = 1024; /* more threads than that only costs memory */
    return 0;
}
