/* Checked access to the buffers handed in from Python. Every function that acquires a
 * buffer releases it on every path through cmh_release(). */
#ifndef CMHASH_PYARGS_H
#define CMHASH_PYARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* A read-only, C-contiguous, 2-D uint8 matrix (rows x cols), e.g. packed codes. */
typedef struct {
    Py_buffer view;
    int held;
    const uint8_t *data;
    size_t rows, cols;
} cmh_matrix;

/* A writable, C-contiguous output buffer of `count` items of dtype "int32", "int64" or
 * "float64" (checked exactly: kind and size, native byte order). */
typedef struct {
    Py_buffer view;
    int held;
    void *data;
} cmh_out;

/* 0 on success; -1 with TypeError/ValueError set naming `func` and `arg`. */
int cmh_get_matrix(PyObject *obj, const char *func, const char *arg, cmh_matrix *m);
int cmh_get_out(PyObject *obj, const char *func, const char *arg, const char *dtype, size_t count,
                cmh_out *o);
/* The same for a read-only input buffer (data is then not to be written). */
int cmh_get_in(PyObject *obj, const char *func, const char *arg, const char *dtype, size_t count,
               cmh_out *o);
void cmh_release_matrix(cmh_matrix *m);
void cmh_release_out(cmh_out *o);

/* Code lengths the kernels take: 1..CMH_MAX_BYTES bytes. -1 with ValueError otherwise. */
int cmh_check_code_bytes(size_t nbytes, const char *func);

/* `threads` argument: 0 means "all CPUs"; negative is an error. -1 with ValueError. */
int cmh_resolve_threads(Py_ssize_t threads, const char *func, size_t *out);

#endif
