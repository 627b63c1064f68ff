/* Python entry points for multi-index hashing (mih_core.c does the work): table building,
 * kNN and radius search. Each checks every size and offset it is given, then releases the
 * GIL around plain C. Tables are int32 arrays; their contents are not trusted (the search
 * clamps every bucket bound and position), only their sizes. */
#include "pyargs.h"

#include "mih_core.h"

/* A 1-D-or-more C-contiguous int32 buffer; *len is its item count. 0 or -1 (error set). */
static int get_i32(PyObject *obj, const char *func, const char *arg, int writable, cmh_out *o,
                   size_t *len) {
    o->held = 0;
    if (PyObject_GetBuffer(obj, &o->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s(): %s must be a %sC-contiguous int32 array, not '%.200s'", func, arg,
                     writable ? "writable " : "", Py_TYPE(obj)->tp_name);
        return -1;
    }
    o->held = 1;
    const char *f = o->view.format ? o->view.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (o->view.itemsize != 4 || strcmp(f, "i") != 0) {
        PyErr_Format(PyExc_TypeError, "%s(): %s must be an int32 array, got format '%s'", func, arg,
                     o->view.format ? o->view.format : "B");
        cmh_release_out(o);
        return -1;
    }
    *len = (size_t)o->view.len / 4;
    o->data = o->view.buf;
    return 0;
}

/* Everything one call needs: codes, the substring layout and the tables. */
typedef struct {
    cmh_matrix db;
    cmh_out start_buf, width_buf, off_buf, pos_buf;
    uint32_t start[64], width[64];
    cmh_mih_tables t;
} mih_args;

static void release_args(mih_args *a) {
    cmh_release_matrix(&a->db);
    cmh_release_out(&a->start_buf);
    cmh_release_out(&a->width_buf);
    cmh_release_out(&a->off_buf);
    cmh_release_out(&a->pos_buf);
}

/* 0, or -1 with an error set and everything released. */
static int get_args(const char *func, PyObject *dbobj, PyObject *start, PyObject *width, PyObject *offsets,
                    PyObject *positions, Py_ssize_t n_tab, int writable_tables, mih_args *a) {
    memset(a, 0, sizeof *a);
    size_t ms, mw, noff, npos;
    if (cmh_get_matrix(dbobj, func, "db", &a->db) < 0) goto fail;
    if (cmh_check_code_bytes(a->db.cols, func) < 0) goto fail;
    if (get_i32(start, func, "start", 0, &a->start_buf, &ms) < 0 ||
        get_i32(width, func, "width", 0, &a->width_buf, &mw) < 0)
        goto fail;
    if (ms != mw || ms < 1 || ms > 64) {
        PyErr_Format(PyExc_ValueError, "%s(): start and width must have the same length, 1 to 64 (got %zu and %zu)",
                     func, ms, mw);
        goto fail;
    }
    const size_t bits = a->db.cols * 8;
    for (size_t j = 0; j < ms; j++) {
        const int32_t s = ((const int32_t *)a->start_buf.data)[j], w = ((const int32_t *)a->width_buf.data)[j];
        if (w < 1 || w > CMH_MIH_MAX_WIDTH || s < 0 || (size_t)s + (size_t)w > bits) {
            PyErr_Format(PyExc_ValueError, "%s(): substring %zu (start %d, width %d) must lie within the %zu bits "
                         "of a code and be 1 to %d bits wide", func, j, s, w, bits, CMH_MIH_MAX_WIDTH);
            goto fail;
        }
        a->start[j] = (uint32_t)s;
        a->width[j] = (uint32_t)w;
    }
    if (n_tab < 0 || (size_t)n_tab > a->db.rows || a->db.rows >= (size_t)INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s(): n_tab must be within 0..len(db) and len(db) below 2**31 (got %zd of %zu)",
                     func, n_tab, a->db.rows);
        goto fail;
    }
    if (get_i32(offsets, func, "offsets", writable_tables, &a->off_buf, &noff) < 0 ||
        get_i32(positions, func, "positions", writable_tables, &a->pos_buf, &npos) < 0)
        goto fail;
    const size_t need_off = cmh_mih_offsets_len(ms, a->width);
    if (noff != need_off || npos != ms * (size_t)n_tab) {
        PyErr_Format(PyExc_ValueError, "%s(): the tables must hold %zu offsets and %zu positions, got %zu and %zu",
                     func, need_off, ms * (size_t)n_tab, noff, npos);
        goto fail;
    }
    a->t = (cmh_mih_tables){ms, a->start, a->width, (const int32_t *)a->off_buf.data,
                            (const int32_t *)a->pos_buf.data, (size_t)n_tab};
    return 0;
fail:
    release_args(a);
    return -1;
}

static int get_queries(PyObject *qobj, const char *func, const mih_args *a, cmh_matrix *q) {
    if (cmh_get_matrix(qobj, func, "queries", q) < 0) return -1;
    if (q->cols != a->db.cols) {
        PyErr_Format(PyExc_ValueError, "%s(): queries have %zu bytes per code but db has %zu", func, q->cols,
                     a->db.cols);
        cmh_release_matrix(q);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(mih_build_doc,
             "mih_build(db, start, width, offsets, positions) -> None\n\n"
             "Build the multi-index tables of all codes of db (uint8 (n, nbytes), n < 2**31):\n"
             "substring j is width[j] bits (1..24) from bit start[j] (int32 arrays, 1 to 64\n"
             "substrings). offsets: writable int32 of sum(2**width + 1); positions: writable\n"
             "int32 of m * n. Table j's bucket `key` holds positions[j*n + offsets[b_j + key]\n"
             ": j*n + offsets[b_j + key + 1]] with b_j = sum over i < j of 2**width[i] + 1.");
static PyObject *mih_build(PyObject *self, PyObject *args) {
    PyObject *dbobj, *start, *width, *offsets, *positions;
    if (!PyArg_ParseTuple(args, "OOOOO:mih_build", &dbobj, &start, &width, &offsets, &positions)) return NULL;
    cmh_matrix probe;
    if (cmh_get_matrix(dbobj, "mih_build", "db", &probe) < 0) return NULL;
    const Py_ssize_t n = (Py_ssize_t)probe.rows;
    cmh_release_matrix(&probe);
    mih_args a;
    if (get_args("mih_build", dbobj, start, width, offsets, positions, n, 1, &a) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cmh_mih_build(a.db.data, a.db.rows, a.db.cols, a.t.m, a.start, a.width, (int32_t *)a.off_buf.data,
                       (int32_t *)a.pos_buf.data);
    Py_END_ALLOW_THREADS
    release_args(&a);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(mih_knn_doc,
             "mih_knn(queries, db, start, width, offsets, positions, n_tab, k, max_work, out_distances,\n"
             "        out_labels, stats, threads=0) -> None\n\n"
             "Exact k nearest neighbours through the tables (which cover db[:n_tab]; the rest\n"
             "of db is scanned). out_distances int32 and out_labels int64 (nq*k); stats int64\n"
             "(nq*3): per query the path (0 tables, 1 gave up past max_work, 2 skipped), table\n"
             "lookups and candidates. Rows of queries with path != 0 are not written.");
static PyObject *mih_knn(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"queries", "db", "start", "width", "offsets", "positions", "n_tab", "k", "max_work",
                             "out_distances", "out_labels", "stats", "threads", NULL};
    PyObject *qobj, *dbobj, *start, *width, *offsets, *positions, *odobj, *oiobj, *stobj;
    Py_ssize_t n_tab, k, max_work, threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOnnnOOO|n:mih_knn", kwlist, &qobj, &dbobj, &start, &width,
                                     &offsets, &positions, &n_tab, &k, &max_work, &odobj, &oiobj, &stobj,
                                     &threads_arg))
        return NULL;
    if (k < 1 || max_work < 0) {
        PyErr_Format(PyExc_ValueError, "mih_knn(): k must be >= 1 and max_work >= 0 (got %zd, %zd)", k, max_work);
        return NULL;
    }
    size_t threads;
    if (cmh_resolve_threads(threads_arg, "mih_knn", &threads) < 0) return NULL;
    mih_args a;
    if (get_args("mih_knn", dbobj, start, width, offsets, positions, n_tab, 0, &a) < 0) return NULL;
    cmh_matrix q = {.held = 0};
    cmh_out od = {.held = 0}, oi = {.held = 0}, st = {.held = 0};
    PyObject *result = NULL;
    if (get_queries(qobj, "mih_knn", &a, &q) < 0) goto done;
    size_t count;
    if (__builtin_mul_overflow(q.rows, (size_t)k, &count) || count > (size_t)PY_SSIZE_T_MAX / 8) {
        PyErr_Format(PyExc_ValueError, "mih_knn(): %zu queries x k=%zd results do not fit in memory", q.rows, k);
        goto done;
    }
    if (cmh_get_out(odobj, "mih_knn", "out_distances", "int32", count, &od) < 0 ||
        cmh_get_out(oiobj, "mih_knn", "out_labels", "int64", count, &oi) < 0 ||
        cmh_get_out(stobj, "mih_knn", "stats", "int64", q.rows * 3, &st) < 0)
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cmh_mih_knn(q.data, q.rows, a.db.data, a.db.rows, a.db.cols, &a.t, (size_t)k, (size_t)max_work, threads,
                     (int32_t *)od.data, (int64_t *)oi.data, (int64_t *)st.data);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    cmh_release_out(&od);
    cmh_release_out(&oi);
    cmh_release_out(&st);
    cmh_release_matrix(&q);
    release_args(&a);
    return result;
}

PyDoc_STRVAR(mih_range_doc,
             "mih_range(queries, db, start, width, offsets, positions, n_tab, radius, max_work,\n"
             "          threads=0) -> (lims, distances, labels, stats)\n\n"
             "Every code within Hamming distance `radius` (inclusive) through the tables, as\n"
             "bytearrays like range_search(), plus stats (int64 nq*3, as for mih_knn). Queries\n"
             "with path != 0 have no hits listed: the caller scans for them.");
static PyObject *mih_range(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"queries", "db", "start", "width", "offsets", "positions", "n_tab", "radius",
                             "max_work", "threads", NULL};
    PyObject *qobj, *dbobj, *start, *width, *offsets, *positions;
    Py_ssize_t n_tab, radius, max_work, threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOnnn|n:mih_range", kwlist, &qobj, &dbobj, &start, &width,
                                     &offsets, &positions, &n_tab, &radius, &max_work, &threads_arg))
        return NULL;
    if (radius < 0 || max_work < 0) {
        PyErr_Format(PyExc_ValueError, "mih_range(): radius and max_work must be >= 0 (got %zd, %zd)", radius,
                     max_work);
        return NULL;
    }
    size_t threads;
    if (cmh_resolve_threads(threads_arg, "mih_range", &threads) < 0) return NULL;
    mih_args a;
    if (get_args("mih_range", dbobj, start, width, offsets, positions, n_tab, 0, &a) < 0) return NULL;
    cmh_matrix q = {.held = 0};
    cmh_mih_range *r = NULL;
    PyObject *lims_obj = NULL, *d_obj = NULL, *i_obj = NULL, *st_obj = NULL, *result = NULL;
    if (get_queries(qobj, "mih_range", &a, &q) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    r = cmh_mih_range_run(q.data, q.rows, a.db.data, a.db.rows, a.db.cols, &a.t, (size_t)radius,
                          (size_t)max_work, threads);
    Py_END_ALLOW_THREADS
    if (!r) {
        PyErr_NoMemory();
        goto done;
    }
    const size_t total = cmh_mih_range_total(r);
    lims_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)((q.rows + 1) * sizeof(int64_t)));
    d_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(total * sizeof(int32_t)));
    i_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(total * sizeof(int64_t)));
    st_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(q.rows * 3 * sizeof(int64_t)));
    if (!lims_obj || !d_obj || !i_obj || !st_obj) goto done;
    cmh_mih_range_fill(r, (int64_t *)PyByteArray_AS_STRING(lims_obj), (int32_t *)PyByteArray_AS_STRING(d_obj),
                       (int64_t *)PyByteArray_AS_STRING(i_obj), (int64_t *)PyByteArray_AS_STRING(st_obj));
    result = PyTuple_Pack(4, lims_obj, d_obj, i_obj, st_obj);
done:
    Py_XDECREF(lims_obj);
    Py_XDECREF(d_obj);
    Py_XDECREF(i_obj);
    Py_XDECREF(st_obj);
    cmh_mih_range_free(r);
    cmh_release_matrix(&q);
    release_args(&a);
    return result;
}

PyMethodDef cmh_mih_methods[] = {
    {"mih_build", mih_build, METH_VARARGS, mih_build_doc},
    {"mih_knn", (PyCFunction)(void (*)(void))mih_knn, METH_VARARGS | METH_KEYWORDS, mih_knn_doc},
    {"mih_range", (PyCFunction)(void (*)(void))mih_range, METH_VARARGS | METH_KEYWORDS, mih_range_doc},
    {NULL, NULL, 0, NULL},
};
