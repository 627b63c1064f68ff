/* Python entry points for exact search in Hamming space (search_core.c does the work).
 *
 * Each entry point is a thin wrapper: it parses and checks its arguments, then releases
 * the GIL around plain C that calls no Python API. Outputs of a known size are allocated
 * by the caller (numpy) and passed in; radius search returns bytearrays. */
#include "pyargs.h"

#include "search_core.h"

static int mul_overflows(size_t a, size_t b, size_t *out) {
    return __builtin_mul_overflow(a, b, out);
}

/* ------------------------------------------------------------------------------------ */
/* Shared argument handling. */

/* Acquire queries and db, check they are codes of one length. 0 or -1 (error set, both
 * released). */
static int get_code_pair(PyObject *qobj, PyObject *dbobj, const char *func, cmh_matrix *q,
                         cmh_matrix *db) {
    db->held = 0;
    if (cmh_get_matrix(qobj, func, "queries", q) < 0) return -1;
    if (cmh_get_matrix(dbobj, func, "db", db) < 0) goto fail;
    if (q->cols != db->cols) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): queries have %zu bytes per code (%zu bits) but db has %zu bytes per "
                     "code (%zu bits); both must have the same code length",
                     func, q->cols, q->cols * 8, db->cols, db->cols * 8);
        goto fail;
    }
    if (cmh_check_code_bytes(q->cols, func) < 0) goto fail;
    if (db->rows > (size_t)INT64_MAX / 2 || q->rows > (size_t)INT64_MAX / 2) {
        PyErr_Format(PyExc_ValueError, "%s(): too many codes", func);
        goto fail;
    }
    return 0;
fail:
    cmh_release_matrix(q);
    cmh_release_matrix(db);
    return -1;
}

/* ------------------------------------------------------------------------------------ */
/* distances() */

PyDoc_STRVAR(distances_doc,
             "distances(queries, db, out, threads=0) -> None\n\n"
             "Write the Hamming distance of every query to every database code into `out`.\n\n"
             "queries: C-contiguous uint8 (nq, nbytes); db: C-contiguous uint8 (n, nbytes);\n"
             "out: writable C-contiguous int32 buffer of nq*n items (row-major (nq, n)).\n"
             "threads: 0 = all CPUs. The matrix is nq*n: meant for small inputs; use knn()\n"
             "or range_search() for large ones.");
static PyObject *distances(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"queries", "db", "out", "threads", NULL};
    PyObject *qobj, *dbobj, *outobj;
    Py_ssize_t threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|n:distances", kwlist, &qobj, &dbobj,
                                     &outobj, &threads_arg))
        return NULL;
    size_t threads;
    if (cmh_resolve_threads(threads_arg, "distances", &threads) < 0) return NULL;
    cmh_matrix q, db;
    if (get_code_pair(qobj, dbobj, "distances", &q, &db) < 0) return NULL;
    size_t count, bytes;
    if (mul_overflows(q.rows, db.rows, &count) || mul_overflows(count, 4, &bytes)) {
        PyErr_Format(PyExc_ValueError, "distances(): %zu x %zu distances do not fit in memory",
                     q.rows, db.rows);
        cmh_release_matrix(&q);
        cmh_release_matrix(&db);
        return NULL;
    }
    cmh_out out;
    if (cmh_get_out(outobj, "distances", "out", "int32", count, &out) < 0) {
        cmh_release_matrix(&q);
        cmh_release_matrix(&db);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cmh_distances(q.data, q.rows, db.data, db.rows, q.cols, threads, (int32_t *)out.data);
    Py_END_ALLOW_THREADS
    cmh_release_out(&out);
    cmh_release_matrix(&q);
    cmh_release_matrix(&db);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------ */
/* knn() */

PyDoc_STRVAR(knn_doc,
             "knn(queries, db, k, out_distances, out_labels, threads=0) -> None\n\n"
             "Exact k nearest neighbours by Hamming distance.\n\n"
             "queries: C-contiguous uint8 (nq, nbytes); db: C-contiguous uint8 (n, nbytes).\n"
             "out_distances: writable int32 buffer of nq*k items; out_labels: writable int64\n"
             "buffer of nq*k items (database positions), both row-major (nq, k).\n"
             "Each row is sorted by distance, then by position (ties are deterministic).\n"
             "When k > n, the rest of a row is padded with distance INT32_MAX and label -1,\n"
             "as FAISS does. Memory is O(nq*k + threads*block); no nq x n matrix is built.\n"
             "threads: 0 = all CPUs; few queries split the database over the threads.");
static PyObject *knn(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"queries", "db", "k", "out_distances", "out_labels", "threads", NULL};
    PyObject *qobj, *dbobj, *odobj, *oiobj;
    Py_ssize_t k_arg, threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOnOO|n:knn", kwlist, &qobj, &dbobj, &k_arg,
                                     &odobj, &oiobj, &threads_arg))
        return NULL;
    if (k_arg < 1) {
        PyErr_Format(PyExc_ValueError, "knn(): k must be >= 1, got %zd", k_arg);
        return NULL;
    }
    size_t threads;
    if (cmh_resolve_threads(threads_arg, "knn", &threads) < 0) return NULL;
    cmh_matrix q, db;
    if (get_code_pair(qobj, dbobj, "knn", &q, &db) < 0) return NULL;
    cmh_out od = {.held = 0}, oi = {.held = 0};
    size_t count, bytes;
    if (mul_overflows(q.rows, (size_t)k_arg, &count) || mul_overflows(count, 8, &bytes)) {
        PyErr_Format(PyExc_ValueError, "knn(): %zu queries x k=%zd results do not fit in memory",
                     q.rows, k_arg);
        goto fail;
    }
    if (cmh_get_out(odobj, "knn", "out_distances", "int32", count, &od) < 0) goto fail;
    if (cmh_get_out(oiobj, "knn", "out_labels", "int64", count, &oi) < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = cmh_knn(q.data, q.rows, db.data, db.rows, q.cols, (size_t)k_arg, threads,
                 (int32_t *)od.data, (int64_t *)oi.data);
    Py_END_ALLOW_THREADS
    cmh_release_out(&od);
    cmh_release_out(&oi);
    cmh_release_matrix(&q);
    cmh_release_matrix(&db);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    cmh_release_out(&od);
    cmh_release_out(&oi);
    cmh_release_matrix(&q);
    cmh_release_matrix(&db);
    return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* range_search() */

PyDoc_STRVAR(range_search_doc,
             "range_search(queries, db, radius, threads=0) -> (lims, distances, labels)\n\n"
             "Every database code within Hamming distance `radius` of each query, INCLUSIVE\n"
             "(distance <= radius, the usual 'within Hamming radius r'). Note that FAISS's\n"
             "binary range_search is strict (distance < radius).\n\n"
             "Returns three bytearrays: lims, int64 (nq + 1) CSR offsets; distances, int32;\n"
             "labels, int64 database positions. The hits of query i are\n"
             "[lims[i], lims[i+1]), sorted by distance, then position.\n"
             "threads: 0 = all CPUs. MemoryError when the results do not fit in memory.");
static PyObject *range_search(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"queries", "db", "radius", "threads", NULL};
    PyObject *qobj, *dbobj;
    Py_ssize_t radius_arg, threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOn|n:range_search", kwlist, &qobj, &dbobj,
                                     &radius_arg, &threads_arg))
        return NULL;
    if (radius_arg < 0) {
        PyErr_Format(PyExc_ValueError, "range_search(): radius must be >= 0, got %zd", radius_arg);
        return NULL;
    }
    size_t threads;
    if (cmh_resolve_threads(threads_arg, "range_search", &threads) < 0) return NULL;
    cmh_matrix q, db;
    if (get_code_pair(qobj, dbobj, "range_search", &q, &db) < 0) return NULL;
    cmh_range *r;
    Py_BEGIN_ALLOW_THREADS
    r = cmh_range_run(q.data, q.rows, db.data, db.rows, q.cols, (size_t)radius_arg, threads);
    Py_END_ALLOW_THREADS
    PyObject *lims_obj = NULL, *d_obj = NULL, *i_obj = NULL, *result = NULL;
    if (!r) {
        PyErr_NoMemory();
        goto done;
    }
    const size_t total = cmh_range_total(r);
    lims_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)((q.rows + 1) * sizeof(int64_t)));
    d_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(total * sizeof(int32_t)));
    i_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(total * sizeof(int64_t)));
    if (!lims_obj || !d_obj || !i_obj) goto done;
    int64_t *lims = (int64_t *)PyByteArray_AS_STRING(lims_obj);
    int32_t *od = (int32_t *)PyByteArray_AS_STRING(d_obj);
    int64_t *oi = (int64_t *)PyByteArray_AS_STRING(i_obj);
    int rc;
    /* The bytearrays are ours alone until returned, so they can be filled without the GIL. */
    Py_BEGIN_ALLOW_THREADS
    rc = cmh_range_fill(r, lims, od, oi);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyTuple_Pack(3, lims_obj, d_obj, i_obj);
done:
    Py_XDECREF(lims_obj);
    Py_XDECREF(d_obj);
    Py_XDECREF(i_obj);
    cmh_range_free(r);
    cmh_release_matrix(&q);
    cmh_release_matrix(&db);
    return result;
}

PyMethodDef cmh_search_methods[] = {
    {"distances", (PyCFunction)(void (*)(void))distances, METH_VARARGS | METH_KEYWORDS,
     distances_doc},
    {"knn", (PyCFunction)(void (*)(void))knn, METH_VARARGS | METH_KEYWORDS, knn_doc},
    {"range_search", (PyCFunction)(void (*)(void))range_search, METH_VARARGS | METH_KEYWORDS,
     range_search_doc},
    {NULL, NULL, 0, NULL},
};
