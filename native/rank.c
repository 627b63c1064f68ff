/* Ranking metrics over packed codes without a comparison sort.
 *
 * For one query, the database is ranked by Hamming distance, ties broken by database
 * position (a stable sort on distance). Distances are small integers (0..bits), so the
 * ranking is a counting sort: the position of item j at distance d is
 *     N_<d  (items at a smaller distance)
 *   + s_j   (items at distance d earlier in the database)  + 1.
 *
 * Pass 1 walks the database in order, block by block: distances from the SIMD kernel,
 * relevance (query and item share a label) from the packed label rows, and running
 * per-distance counters, which give s_j (and r_j, the same count over relevant items)
 * for every relevant item as it goes by. The relevant items are kept, in database
 * order, in a per-thread list of (d, s, r), at most n entries.
 * Pass 2 walks that list: after prefix sums over the histograms each relevant item's
 * position and rank among relevant items are known, hence AP@all, AP@k and P@k.
 *
 * The running counters are a chain of read-modify-writes on a few hot cells (distances
 * cluster), so the database is cut into CMH_STREAMS contiguous stripes counted by
 * interleaved, independent counters; a stripe's counts are offset afterwards by the
 * totals of the stripes before it, which gives exactly the in-order counts.
 *
 * Everything per query is summed in database order, one query per thread at a time, so
 * results do not depend on the thread count. */
#include "pyargs.h"

#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "threads.h"

#define CMH_STREAMS 4   /* independent counter stripes per query */
#define CMH_BLOCK 1024  /* items per stripe handled per step */

typedef struct {
    /* inputs */
    const uint8_t *q, *db, *ql, *dbl;
    size_t nq, n, nbytes, lbytes, bins;
    cmh_dist_fn dist;
    const size_t *map_ks, *prec_ks;
    size_t n_map, n_prec;
    const double *inv; /* inv[p] = 1 / p for p = 1..n: a multiply instead of a divide */
    /* outputs */
    int64_t *hist_all, *hist_rel;
    double *ap, *prec;
    /* per-thread workspaces */
    void **work;
} rank_ctx;

/* One thread's workspace, carved out of a single allocation. */
typedef struct {
    uint16_t *dist;       /* CMH_STREAMS * CMH_BLOCK */
    uint8_t *rel;         /* CMH_STREAMS * CMH_BLOCK */
    uint64_t *cnt;        /* bins * CMH_STREAMS running counters, cnt[d * CMH_STREAMS + t]:
                           * items (low 32 bits) and relevant items (high 32 bits) of
                           * stripe t seen so far at distance d: one read-modify-write */
    uint64_t *nless, *rless;          /* bins: items / relevant items at smaller distance */
    uint64_t *soff, *roff;            /* CMH_STREAMS * bins: counts of earlier stripes */
    uint16_t *list_d;                 /* n: distance of each relevant item */
    uint64_t *list_c;                 /* n: that counter just before the relevant item */
    size_t list_len[CMH_STREAMS], list_start[CMH_STREAMS];
    double *ap_sum;                   /* n_map */
    uint64_t *ap_hits, *prec_hits;    /* n_map, n_prec */
    uint8_t *base;                    /* the allocation all of the above live in */
} workspace;

/* Reserve count * size bytes at *off (64-byte aligned); returns the start offset. Sets
 * *bad on overflow, so one layout function both sizes and carves the workspace. */
static size_t reserve(size_t *off, size_t count, size_t size, int *bad) {
    size_t start = *off, bytes;
    if (__builtin_mul_overflow(count, size, &bytes) || __builtin_add_overflow(bytes, 63, &bytes) ||
        __builtin_add_overflow(start, bytes & ~(size_t)63, off))
        *bad = 1;
    return start;
}

/* Lays a workspace out at `base` (NULL: only measures). Returns its size, 0 on overflow. */
static size_t workspace_layout(uint8_t *base, workspace *w, size_t n, size_t bins, size_t n_map,
                               size_t n_prec) {
    int bad = 0;
    size_t off = 0;
#define CARVE(field, type, count)                                     \
    {                                                                 \
        size_t at_ = reserve(&off, (count), sizeof(type), &bad);      \
        if (base) w->field = (type *)(void *)(base + at_);            \
    }
    CARVE(dist, uint16_t, CMH_STREAMS * CMH_BLOCK);
    CARVE(rel, uint8_t, CMH_STREAMS * CMH_BLOCK);
    CARVE(cnt, uint64_t, CMH_STREAMS * bins);
    CARVE(nless, uint64_t, bins);
    CARVE(rless, uint64_t, bins);
    CARVE(soff, uint64_t, CMH_STREAMS * bins);
    CARVE(roff, uint64_t, CMH_STREAMS * bins);
    CARVE(list_d, uint16_t, n);
    CARVE(list_c, uint64_t, n);
    CARVE(ap_sum, double, n_map);
    CARVE(ap_hits, uint64_t, n_map);
    CARVE(prec_hits, uint64_t, n_prec);
#undef CARVE
    return bad ? 0 : off;
}

static workspace *workspace_new(size_t n, size_t bins, size_t n_map, size_t n_prec) {
    workspace probe;
    size_t bytes = workspace_layout(NULL, &probe, n, bins, n_map, n_prec);
    if (bytes == 0) return NULL;
    workspace *w = malloc(sizeof(workspace));
    uint8_t *base = aligned_alloc(64, bytes);
    if (!w || !base) {
        free(w);
        free(base);
        return NULL;
    }
    workspace_layout(base, w, n, bins, n_map, n_prec);
    w->base = base;
    return w;
}

static void workspace_free(workspace *w) {
    if (!w) return;
    free(w->base);
    free(w);
}

static inline uint64_t load_u64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* rel[j] = 1 when label row a and row j of db (lbytes each) share a set bit. Fixed widths
 * get loops the compiler vectorises (Python pads label rows to 1, 2, 4, 8 or 8m bytes). */
static void any_common(const uint8_t *a, const uint8_t *db, size_t m, size_t lbytes, uint8_t *rel) {
    switch (lbytes) {
    case 1: {
        const uint8_t x = a[0];
        for (size_t j = 0; j < m; j++) rel[j] = (x & db[j]) != 0;
        return;
    }
    case 2: {
        uint16_t x, y;
        memcpy(&x, a, 2);
        for (size_t j = 0; j < m; j++) {
            memcpy(&y, db + 2 * j, 2);
            rel[j] = (x & y) != 0;
        }
        return;
    }
    case 4: {
        uint32_t x, y;
        memcpy(&x, a, 4);
        for (size_t j = 0; j < m; j++) {
            memcpy(&y, db + 4 * j, 4);
            rel[j] = (x & y) != 0;
        }
        return;
    }
    case 8: {
        const uint64_t x = load_u64(a);
        for (size_t j = 0; j < m; j++) rel[j] = (x & load_u64(db + 8 * j)) != 0;
        return;
    }
    default:
        cmh_any_common(a, db, m, lbytes, rel);
    }
}

/* Pass 1 for one query: histograms and the list of relevant items. */
static void count_query(const rank_ctx *c, workspace *w, const uint8_t *q, const uint8_t *ql) {
    const size_t n = c->n, bins = c->bins;
    size_t begin[CMH_STREAMS], end[CMH_STREAMS];
    for (size_t t = 0; t < CMH_STREAMS; t++) {
        cmh_split(n, CMH_STREAMS, t, &begin[t], &end[t]);
        w->list_start[t] = begin[t]; /* stripe t's relevant items go to list[begin[t]...] */
        w->list_len[t] = 0;
    }
    memset(w->cnt, 0, CMH_STREAMS * bins * sizeof(uint64_t));
    uint64_t *const cnt = w->cnt;
    uint16_t *const ld = w->list_d;
    uint64_t *const lc = w->list_c;
    /* v + 1 + (e << 32) counts an item, and in the high half a relevant one (e = 1) */

    for (size_t step = 0;; step++) {
        size_t len[CMH_STREAMS], most = 0;
        for (size_t t = 0; t < CMH_STREAMS; t++) {
            size_t from = begin[t] + step * CMH_BLOCK;
            len[t] = from < end[t] ? (end[t] - from < CMH_BLOCK ? end[t] - from : CMH_BLOCK) : 0;
            if (len[t] > most) most = len[t];
            if (len[t]) {
                c->dist(q, c->db + from * c->nbytes, len[t], c->nbytes, w->dist + t * CMH_BLOCK);
                any_common(ql, c->dbl + from * c->lbytes, len[t], c->lbytes, w->rel + t * CMH_BLOCK);
            }
        }
        if (most == 0) break;
        if (len[CMH_STREAMS - 1] == most) {
            /* Every stripe has `most` items this step (stripes differ by at most one item
             * in total, and only the last step is short), so the four run interleaved.
             * Branch-free: every item is written at its stripe's list end, and the list
             * only grows when the item is relevant (relevance is close to a coin flip). */
            size_t at[CMH_STREAMS];
            for (size_t t = 0; t < CMH_STREAMS; t++) at[t] = w->list_start[t] + w->list_len[t];
            const uint16_t *dist = w->dist;
            const uint8_t *rel = w->rel;
            for (size_t j = 0; j < most; j++) {
#pragma GCC unroll 16
                for (size_t t = 0; t < CMH_STREAMS; t++) {
                    const size_t d = dist[t * CMH_BLOCK + j];
                    const uint64_t e = rel[t * CMH_BLOCK + j];
                    const uint64_t v = cnt[d * CMH_STREAMS + t];
                    cnt[d * CMH_STREAMS + t] = v + 1 + (e << 32);
                    ld[at[t]] = (uint16_t)d;
                    lc[at[t]] = v;
                    at[t] += e;
                }
            }
            for (size_t t = 0; t < CMH_STREAMS; t++) w->list_len[t] = at[t] - w->list_start[t];
        } else {
            for (size_t t = 0; t < CMH_STREAMS; t++) {
                const uint16_t *dt = w->dist + t * CMH_BLOCK;
                const uint8_t *et = w->rel + t * CMH_BLOCK;
                size_t i = w->list_start[t] + w->list_len[t];
                for (size_t j = 0; j < len[t]; j++) {
                    const size_t d = dt[j];
                    const uint64_t v = cnt[d * CMH_STREAMS + t];
                    cnt[d * CMH_STREAMS + t] = v + 1 + ((uint64_t)et[j] << 32);
                    if (et[j]) {
                        ld[i] = (uint16_t)d;
                        lc[i] = v;
                        i++;
                    }
                }
                w->list_len[t] = i - w->list_start[t];
            }
        }
    }
}

/* Pass 2 for one query: write its histograms, APs and precisions. */
static void score_query(const rank_ctx *c, workspace *w, size_t qi) {
    const size_t bins = c->bins;
    int64_t *ha = c->hist_all + qi * bins, *hr = c->hist_rel + qi * bins;
    uint64_t below = 0, rbelow = 0;
    for (size_t d = 0; d < bins; d++) {
        uint64_t tot = 0, rtot = 0;
        for (size_t t = 0; t < CMH_STREAMS; t++) {
            /* items of distance d in the stripes before t, and below d overall */
            w->soff[t * bins + d] = tot;
            w->roff[t * bins + d] = rtot;
            const uint64_t v = w->cnt[d * CMH_STREAMS + t];
            tot += (uint32_t)v;
            rtot += v >> 32;
        }
        ha[d] = (int64_t)tot;
        hr[d] = (int64_t)rtot;
        w->nless[d] = below;
        w->rless[d] = rbelow;
        below += tot;
        rbelow += rtot;
    }
    /* Fold N_<d + 1 and R_<d + 1 into the stripe offsets: one add per item below. */
    for (size_t t = 0; t < CMH_STREAMS; t++)
        for (size_t d = 0; d < bins; d++) {
            w->soff[t * bins + d] += w->nless[d] + 1;
            w->roff[t * bins + d] += w->rless[d] + 1;
        }

    const size_t n_map = c->n_map, n_prec = c->n_prec;
    for (size_t i = 0; i < n_map; i++) w->ap_sum[i] = 0.0, w->ap_hits[i] = 0;
    for (size_t i = 0; i < n_prec; i++) w->prec_hits[i] = 0;
    /* The common case, AP@all alone, without the cutoff tests. */
    const int all_only = n_map == 1 && c->map_ks[0] >= c->n && n_prec == 0;
    double sum_all = 0.0;
    for (size_t t = 0; t < CMH_STREAMS; t++) {
        const uint64_t *so = w->soff + t * bins, *ro = w->roff + t * bins;
        const size_t start = w->list_start[t], stop = start + w->list_len[t];
        for (size_t m = start; m < stop; m++) {
            const uint16_t d = w->list_d[m];
            const uint64_t v = w->list_c[m];
            const uint64_t pos = so[d] + (uint32_t)v; /* 1-based position in the ranking */
            const uint64_t rank = ro[d] + (v >> 32);  /* 1-based rank among relevant items */
            /* signed conversion: one instruction (values are < 2^32) */
            const double p = (double)(int64_t)rank * c->inv[pos];
            if (all_only) {
                sum_all += p;
                continue;
            }
            for (size_t i = 0; i < n_map; i++) {
                const int in = pos <= c->map_ks[i];
                w->ap_sum[i] += in ? p : 0.0;
                w->ap_hits[i] += (uint64_t)in;
            }
            for (size_t i = 0; i < n_prec; i++) w->prec_hits[i] += pos <= c->prec_ks[i];
        }
    }
    if (all_only) {
        w->ap_sum[0] = sum_all;
        w->ap_hits[0] = rbelow;
    }
    for (size_t i = 0; i < n_map; i++)
        c->ap[qi * n_map + i] = w->ap_hits[i] ? w->ap_sum[i] / (double)w->ap_hits[i] : 0.0;
    for (size_t i = 0; i < n_prec; i++) {
        const size_t k = c->prec_ks[i] < c->n ? c->prec_ks[i] : c->n;
        c->prec[qi * n_prec + i] = (double)w->prec_hits[i] / (double)k;
    }
}

static void rank_task(void *p, size_t tid, size_t nthreads) {
    const rank_ctx *c = (const rank_ctx *)p;
    workspace *w = (workspace *)c->work[tid];
    size_t begin, end;
    cmh_split(c->nq, nthreads, tid, &begin, &end);
    for (size_t qi = begin; qi < end; qi++) {
        count_query(c, w, c->q + qi * c->nbytes, c->ql + qi * c->lbytes);
        score_query(c, w, qi);
    }
}

/* Parse a sequence of cutoffs (ints >= 1) into a malloc'ed array; values above n are
 * clamped to n (the whole ranking). 0 with *out set (NULL for an empty sequence), -1
 * with an exception. */
static int parse_ks(PyObject *obj, const char *arg, size_t n, size_t **out, size_t *count) {
    *out = NULL;
    *count = 0;
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "rank_metrics(): %s must be a sequence of ints, not '%.200s'",
                     arg, Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (len == 0) {
        Py_DECREF(seq);
        return 0;
    }
    size_t *ks = PyMem_Malloc((size_t)len * sizeof(size_t));
    if (!ks) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyIndex_Check(item) || PyBool_Check(item)) {
            PyErr_Format(PyExc_TypeError, "rank_metrics(): %s[%zd] must be an int, not '%.200s'", arg,
                         i, Py_TYPE(item)->tp_name);
            goto fail;
        }
        Py_ssize_t k = PyNumber_AsSsize_t(item, NULL); /* clamps huge values */
        if (k == -1 && PyErr_Occurred()) goto fail;
        if (k < 1) {
            PyErr_Format(PyExc_ValueError, "rank_metrics(): %s[%zd] must be >= 1, got %zd", arg, i, k);
            goto fail;
        }
        ks[i] = (size_t)k < n ? (size_t)k : n;
    }
    Py_DECREF(seq);
    *out = ks;
    *count = (size_t)len;
    return 0;
fail:
    PyMem_Free(ks);
    Py_DECREF(seq);
    return -1;
}

PyDoc_STRVAR(
    rank_metrics_doc,
    "rank_metrics(q_codes, db_codes, q_labels, db_labels, map_ks, prec_ks, hist_all, hist_rel,\n"
    "             ap, prec, threads=0) -> None\n\n"
    "Rank the database for every query by Hamming distance, ties broken by database\n"
    "position (a stable sort), with no comparison sort, and write the rank metrics.\n\n"
    "q_codes (nq, nbytes), db_codes (n, nbytes): packed codes, C-contiguous uint8.\n"
    "q_labels (nq, lbytes), db_labels (n, lbytes): packed multi-hot labels, uint8; an item\n"
    "  is relevant to a query when they share a set bit.\n"
    "map_ks, prec_ks: sequences of cutoffs k >= 1 (k >= n means the whole ranking).\n"
    "Outputs, preallocated and C-contiguous, bins = 8 * nbytes + 1:\n"
    "  hist_all, hist_rel: int64 (nq, bins), items / relevant items at each distance;\n"
    "  ap: float64 (nq, len(map_ks)), AP with a rank cutoff at k: mean over the relevant\n"
    "      items at positions <= k of precision at that position (0 when there are none);\n"
    "  prec: float64 (nq, len(prec_ks)), relevant items in the top min(k, n) / min(k, n).\n"
    "threads: 0 = all CPUs. The GIL is released; results do not depend on it.\n"
    "TypeError / ValueError for bad arguments, MemoryError when workspaces do not fit.");

static PyObject *rank_metrics(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q_codes", "db_codes", "q_labels", "db_labels", "map_ks", "prec_ks",
                             "hist_all", "hist_rel", "ap", "prec", "threads", NULL};
    static const char *F = "rank_metrics";
    PyObject *oq, *odb, *oql, *odbl, *omk, *opk, *oha, *ohr, *oap, *opr;
    Py_ssize_t threads_arg = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOO|n:rank_metrics", kwlist, &oq, &odb,
                                     &oql, &odbl, &omk, &opk, &oha, &ohr, &oap, &opr, &threads_arg))
        return NULL;

    cmh_matrix q = {0}, db = {0}, ql = {0}, dbl = {0};
    cmh_out ha = {0}, hr = {0}, ap = {0}, pr = {0};
    size_t *map_ks = NULL, *prec_ks = NULL, n_map = 0, n_prec = 0, nthreads = 1;
    void **work = NULL;
    double *inv = NULL;
    PyObject *result = NULL;

    if (cmh_resolve_threads(threads_arg, F, &nthreads) < 0) goto done;
    if (cmh_get_matrix(oq, F, "q_codes", &q) < 0 || cmh_get_matrix(odb, F, "db_codes", &db) < 0 ||
        cmh_get_matrix(oql, F, "q_labels", &ql) < 0 || cmh_get_matrix(odbl, F, "db_labels", &dbl) < 0)
        goto done;
    if (q.cols != db.cols) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): query codes have %zu bytes (%zu bits) but database codes %zu bytes (%zu bits)",
                     F, q.cols, 8 * q.cols, db.cols, 8 * db.cols);
        goto done;
    }
    if (cmh_check_code_bytes(q.cols, F) < 0) goto done;
    if (ql.rows != q.rows || dbl.rows != db.rows) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): %zu query codes but %zu query label rows, %zu database codes but %zu "
                     "database label rows; each code needs its label row",
                     F, q.rows, ql.rows, db.rows, dbl.rows);
        goto done;
    }
    if (ql.cols != dbl.cols || ql.cols == 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): query and database label rows must have the same, non-zero width; "
                     "got %zu and %zu bytes",
                     F, ql.cols, dbl.cols);
        goto done;
    }
    if (db.rows == 0) {
        PyErr_Format(PyExc_ValueError, "%s(): the database is empty; there is nothing to rank", F);
        goto done;
    }
    if (db.rows >= UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s(): at most %u database items are supported, got %zu", F,
                     UINT32_MAX - 1, db.rows);
        goto done;
    }
    if (parse_ks(omk, "map_ks", db.rows, &map_ks, &n_map) < 0 ||
        parse_ks(opk, "prec_ks", db.rows, &prec_ks, &n_prec) < 0)
        goto done;

    const size_t nq = q.rows, bins = 8 * q.cols + 1;
    size_t hist_count, ap_count, prec_count;
    if (__builtin_mul_overflow(nq, bins, &hist_count) || __builtin_mul_overflow(nq, n_map, &ap_count) ||
        __builtin_mul_overflow(nq, n_prec, &prec_count) || hist_count > PY_SSIZE_T_MAX / 8 ||
        ap_count > PY_SSIZE_T_MAX / 8 || prec_count > PY_SSIZE_T_MAX / 8) {
        PyErr_Format(PyExc_ValueError, "%s(): output sizes overflow", F);
        goto done;
    }
    if (cmh_get_out(oha, F, "hist_all", 8, hist_count, &ha) < 0 ||
        cmh_get_out(ohr, F, "hist_rel", 8, hist_count, &hr) < 0 ||
        cmh_get_out(oap, F, "ap", 8, ap_count, &ap) < 0 ||
        cmh_get_out(opr, F, "prec", 8, prec_count, &pr) < 0)
        goto done;
    if (((uintptr_t)ha.data | (uintptr_t)hr.data | (uintptr_t)ap.data | (uintptr_t)pr.data) % 8) {
        PyErr_Format(PyExc_ValueError, "%s(): output buffers must be 8-byte aligned", F);
        goto done;
    }
    if (nq == 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (nthreads > nq) nthreads = nq;

    inv = malloc((db.rows + 1) * sizeof(double)); /* db.rows < 2^32: no overflow */
    work = PyMem_Calloc(nthreads, sizeof(void *));
    if (!work || !inv) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t t = 0; t < nthreads; t++) {
        work[t] = workspace_new(db.rows, bins, n_map, n_prec);
        if (!work[t]) {
            PyErr_Format(PyExc_MemoryError,
                         "%s(): cannot allocate the workspace for %zu threads over %zu database "
                         "items; use fewer threads",
                         F, nthreads, db.rows);
            goto done;
        }
    }

    inv[0] = 0.0;
    for (size_t p = 1; p <= db.rows; p++) inv[p] = 1.0 / (double)p;
    rank_ctx ctx = {
        .q = q.data, .db = db.data, .ql = ql.data, .dbl = dbl.data,
        .nq = nq, .n = db.rows, .nbytes = q.cols, .lbytes = ql.cols, .bins = bins,
        .dist = cmh_dist_kernel(q.cols),
        .map_ks = map_ks, .prec_ks = prec_ks, .n_map = n_map, .n_prec = n_prec,
        .hist_all = (int64_t *)ha.data, .hist_rel = (int64_t *)hr.data,
        .ap = (double *)ap.data, .prec = (double *)pr.data, .work = work, .inv = inv,
    };
    Py_BEGIN_ALLOW_THREADS
    cmh_parallel(nthreads, rank_task, &ctx); /* complete results even if a thread failed */
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);

done:
    free(inv);
    if (work) {
        for (size_t t = 0; t < nthreads; t++) workspace_free(work[t]);
        PyMem_Free(work);
    }
    PyMem_Free(map_ks);
    PyMem_Free(prec_ks);
    cmh_release_out(&ha);
    cmh_release_out(&hr);
    cmh_release_out(&ap);
    cmh_release_out(&pr);
    cmh_release_matrix(&q);
    cmh_release_matrix(&db);
    cmh_release_matrix(&ql);
    cmh_release_matrix(&dbl);
    return result;
}

PyMethodDef cmh_rank_methods[] = {
    {"rank_metrics", (PyCFunction)(void (*)(void))rank_metrics, METH_VARARGS | METH_KEYWORDS,
     rank_metrics_doc},
    {NULL, NULL, 0, NULL},
};
