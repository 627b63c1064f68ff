/* Python entry points for multi-index hashing (mih_core.c does the work): table building,
 * kNN and radius search. Each checks every size and offset it is given, then releases the
 * GIL around plain C. Tables are int32 arrays (offsets, perm, ranks) and a uint8 copy of the
 * codes in rank order; their contents are not trusted (the search clamps every bucket bound,
 * rank and perm entry), only their sizes. */
#include "pyargs.h"

#include "mih_core.h"

/* A 1-D-or-more C-contiguous buffer of int32 (`dtype` "int32", format 'i') or uint8
 * ("uint8", format 'B'); *len is its item count. 0 or -1 (error set). */
static int get_array(PyObject *obj, const char *func, const char *arg, const char *dtype, int writable, cmh_out *o,
                     size_t *len) {
    const int is_u8 = strcmp(dtype, "uint8") == 0;
    const Py_ssize_t itemsize = is_u8 ? 1 : 4;
    o->held = 0;
    if (PyObject_GetBuffer(obj, &o->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s(): %s must be a %sC-contiguous %s array, not '%.200s'", func, arg,
                     writable ? "writable " : "", dtype, Py_TYPE(obj)->tp_name);
        return -1;
    }
    o->held = 1;
    const char *f = o->view.format ? o->view.format : "B";
    if (*f == '<' || *f == '=' || *f == '@' || (is_u8 && *f == '|')) f++;
    if (o->view.itemsize != itemsize || strcmp(f, is_u8 ? "B" : "i") != 0) {
        PyErr_Format(PyExc_TypeError, "%s(): %s must be an array of %s, got format '%s'", func, arg, dtype,
                     o->view.format ? o->view.format : "B");
        cmh_release_out(o);
        return -1;
    }
    *len = (size_t)o->view.len / (size_t)itemsize;
    o->data = o->view.buf;
    return 0;
}

/* Everything one call needs: codes, the substring layout and the tables. */
typedef struct {
    cmh_matrix db;
    cmh_out start_buf, width_buf, off_buf, perm_buf, ranks_buf, ord_buf;
    uint32_t start[64], width[64];
    cmh_mih_tables t;
} mih_args;

static void release_args(mih_args *a) {
    cmh_release_matrix(&a->db);
    cmh_release_out(&a->start_buf);
    cmh_release_out(&a->width_buf);
    cmh_release_out(&a->off_buf);
    cmh_release_out(&a->perm_buf);
    cmh_release_out(&a->ranks_buf);
    cmh_release_out(&a->ord_buf);
}

/* The tables' arguments, in the order every entry point takes them. */
typedef struct {
    PyObject *start, *width, *offsets, *perm, *ranks, *ordered;
} table_objs;

/* 0, or -1 with an error set and everything released. */
static int get_args(const char *func, PyObject *dbobj, const table_objs *o, Py_ssize_t n_tab, int writable_tables,
                    mih_args *a) {
    memset(a, 0, sizeof *a);
    size_t ms, mw, noff, nperm, nranks, nord;
    if (cmh_get_matrix(dbobj, func, "db", &a->db) < 0) goto fail;
    if (cmh_check_code_bytes(a->db.cols, func) < 0) goto fail;
    if (get_array(o->start, func, "start", "int32", 0, &a->start_buf, &ms) < 0 ||
        get_array(o->width, func, "width", "int32", 0, &a->width_buf, &mw) < 0)
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
    if (get_array(o->offsets, func, "offsets", "int32", writable_tables, &a->off_buf, &noff) < 0 ||
        get_array(o->perm, func, "perm", "int32", writable_tables, &a->perm_buf, &nperm) < 0 ||
        get_array(o->ranks, func, "ranks", "int32", writable_tables, &a->ranks_buf, &nranks) < 0 ||
        get_array(o->ordered, func, "ordered", "uint8", writable_tables, &a->ord_buf, &nord) < 0)
        goto fail;
    const size_t need_off = cmh_mih_offsets_len(ms, a->width), n = (size_t)n_tab;
    if (noff != need_off || nperm != n || nranks != (ms - 1) * n || nord != n * a->db.cols) {
        PyErr_Format(PyExc_ValueError, "%s(): the tables must hold %zu offsets, %zu perm, %zu ranks and %zu bytes of "
                     "ordered codes, got %zu, %zu, %zu and %zu", func, need_off, n, (ms - 1) * n, n * a->db.cols,
                     noff, nperm, nranks, nord);
        goto fail;
    }
    a->t = (cmh_mih_tables){ms, a->start, a->width, (const int32_t *)a->off_buf.data,
                            (const int32_t *)a->perm_buf.data, (const int32_t *)a->ranks_buf.data,
                            (const uint8_t *)a->ord_buf.data, n};
    return 0;
fail:
    release_args(a);
    return -1;
}

/* A build writes its outputs while reading the codes and its own offsets: none of them may
 * share memory with another. 0, or -1 with ValueError. */
static int check_disjoint(const char *func, const mih_args *a) {
    const struct {
        const Py_buffer *v;
        const char *name;
    } b[] = {{&a->db.view, "db"}, {&a->off_buf.view, "offsets"}, {&a->perm_buf.view, "perm"},
             {&a->ranks_buf.view, "ranks"}, {&a->ord_buf.view, "ordered"}};
    const size_t nb = sizeof b / sizeof *b;
    for (size_t i = 0; i < nb; i++)
        for (size_t j = i + 1; j < nb; j++) {
            const uintptr_t p = (uintptr_t)b[i].v->buf, q = (uintptr_t)b[j].v->buf;
            if (b[i].v->len > 0 && b[j].v->len > 0 && p < q + (uintptr_t)b[j].v->len &&
                q < p + (uintptr_t)b[i].v->len) {
                PyErr_Format(PyExc_ValueError, "%s(): %s and %s share memory", func, b[i].name, b[j].name);
                return -1;
            }
        }
    return 0;
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
             "mih_build(db, start, width, offsets, perm, ranks, ordered) -> None\n\n"
             "Build the multi-index tables of all codes of db (uint8 (n, nbytes), n < 2**31):\n"
             "substring j is width[j] bits (1..24) from bit start[j] (int32 arrays, 1 to 64\n"
             "substrings). Outputs, all writable: offsets int32 of sum(2**width + 1); perm int32\n"
             "of n (rank -> position, the codes in table 0's bucket order); ranks int32 of\n"
             "(m - 1) * n; ordered uint8 of n * nbytes (db[perm]). Table 0's bucket `key` is\n"
             "ranks offsets[key] : offsets[key + 1]; table j >= 1's is ranks[(j-1)*n +\n"
             "offsets[b_j + key] : (j-1)*n + offsets[b_j + key + 1]], b_j = sum over i < j of\n"
             "2**width[i] + 1.");
static PyObject *mih_build(PyObject *self, PyObject *args) {
    PyObject *dbobj;
    table_objs o;
    if (!PyArg_ParseTuple(args, "OOOOOOO:mih_build", &dbobj, &o.start, &o.width, &o.offsets, &o.perm, &o.ranks,
                          &o.ordered))
        return NULL;
    cmh_matrix probe;
    if (cmh_get_matrix(dbobj, "mih_build", "db", &probe) < 0) return NULL;
    const Py_ssize_t n = (Py_ssize_t)probe.rows;
    cmh_release_matrix(&probe);
    mih_args a;
    if (get_args("mih_build", dbobj, &o, n, 1, &a) < 0) return NULL;
    if (check_disjoint("mih_build", &a) < 0) {
        release_args(&a);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cmh_mih_build(a.db.data, a.db.rows, a.db.cols, a.t.m, a.start, a.width, (int32_t *)a.off_buf.data,
                       (int32_t *)a.perm_buf.data, (int32_t *)a.ranks_buf.data, (uint8_t *)a.ord_buf.data);
    Py_END_ALLOW_THREADS
    release_args(&a);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(mih_knn_doc,
             "mih_knn(queries, db, start, width, offsets, perm, ranks, ordered, n_tab, k, max_work,\n"
             "        out_distances, out_labels, stats, threads=0) -> None\n\n"
             "Exact k nearest neighbours through the tables of mih_build (which cover\n"
             "db[:n_tab]; the rest of db is scanned). out_distances int32 and out_labels int64 (nq*k); stats int64\n"
             "(nq*3): per query the path (0 tables, 1 gave up past max_work, 2 skipped), table\n"
             "lookups and candidates. Rows of queries with path != 0 are not written.");
static PyObject *mih_knn(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"queries", "db", "start", "width", "offsets", "perm", "ranks", "ordered", "n_tab", "k",
                             "max_work", "out_distances", "out_labels", "stats", "threads", NULL};
    PyObject *qobj, *dbobj, *odobj, *oiobj, *stobj;
    table_objs o;
    Py_ssize_t n_tab, k, max_work, threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOnnnOOO|n:mih_knn", kwlist, &qobj, &dbobj, &o.start,
                                     &o.width, &o.offsets, &o.perm, &o.ranks, &o.ordered, &n_tab, &k, &max_work,
                                     &odobj, &oiobj, &stobj, &threads_arg))
        return NULL;
    if (k < 1 || max_work < 0) {
        PyErr_Format(PyExc_ValueError, "mih_knn(): k must be >= 1 and max_work >= 0 (got %zd, %zd)", k, max_work);
        return NULL;
    }
    size_t threads;
    if (cmh_resolve_threads(threads_arg, "mih_knn", &threads) < 0) return NULL;
    mih_args a;
    if (get_args("mih_knn", dbobj, &o, n_tab, 0, &a) < 0) return NULL;
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
             "mih_range(queries, db, start, width, offsets, perm, ranks, ordered, n_tab, radius,\n"
             "          max_work, threads=0) -> (lims, distances, labels, stats)\n\n"
             "Every code within Hamming distance `radius` (inclusive) through the tables, as\n"
             "bytearrays like range_search(), plus stats (int64 nq*3, as for mih_knn). Queries\n"
             "with path != 0 have no hits listed: the caller scans for them.");
static PyObject *mih_range(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"queries", "db", "start", "width", "offsets", "perm", "ranks", "ordered", "n_tab",
                             "radius", "max_work", "threads", NULL};
    PyObject *qobj, *dbobj;
    table_objs o;
    Py_ssize_t n_tab, radius, max_work, threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOnnn|n:mih_range", kwlist, &qobj, &dbobj, &o.start,
                                     &o.width, &o.offsets, &o.perm, &o.ranks, &o.ordered, &n_tab, &radius, &max_work,
                                     &threads_arg))
        return NULL;
    if (radius < 0 || max_work < 0) {
        PyErr_Format(PyExc_ValueError, "mih_range(): radius and max_work must be >= 0 (got %zd, %zd)", radius,
                     max_work);
        return NULL;
    }
    size_t threads;
    if (cmh_resolve_threads(threads_arg, "mih_range", &threads) < 0) return NULL;
    mih_args a;
    if (get_args("mih_range", dbobj, &o, n_tab, 0, &a) < 0) return NULL;
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
