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
 * order, in a per-thread list, at most n entries.
 * Pass 2 walks that list: after prefix sums over the histograms each relevant item's
 * position and rank among relevant items are known, hence AP@all, AP@k and P@k.
 *
 * The running counters are a chain of read-modify-writes on a few hot cells (distances
 * cluster), so the database is cut into contiguous stripes, four of them counted at a
 * time by interleaved, independent counters; a stripe's counts are offset afterwards by
 * the totals of the stripes before it, which gives exactly the in-order counts.
 *
 * A counter is one 64-bit word (d << 48 | r << 24 | s), so each item costs one counter
 * update and one list store, and the list entry is the counter just before the item.
 * Stripes are kept under 2^24 items so s and r fit (d < 2^16: see CMH_MAX_BYTES).
 *
 * Everything per query is summed in database order, one query per thread at a time, so
 * results do not depend on the thread count. */
#include "pyargs.h"

#include <stdlib.h>

#include "kernels.h"
#include "threads.h"

#define CMH_INTERLEAVE 4 /* stripes counted together */
#define CMH_BLOCK 1024   /* items per stripe handled per step */
#define CMH_SHIFT 24     /* counter word: s in bits 0..23, r in 24..47, d in 48..63 */
#define CMH_FIELD ((UINT64_C(1) << CMH_SHIFT) - 1)
#define CMH_STRIPE_MAX CMH_FIELD

typedef struct {
    /* inputs */
    const uint8_t *q, *db, *ql, *dbl;
    size_t nq, n, nbytes, lbytes, bins, stripes;
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
    uint16_t *dist;               /* CMH_INTERLEAVE * CMH_BLOCK */
    uint8_t *rel;                 /* CMH_INTERLEAVE * CMH_BLOCK */
    uint64_t *cnt;                /* stripes * bins counter words; stripes g*4..g*4+3 at
                                   * cnt[(g * bins + d) * 4 + t], interleaved */
    uint64_t *nless, *rless;      /* bins: items / relevant items at smaller distance */
    uint64_t *soff, *roff;        /* stripes * bins: counts of earlier stripes, + N_<d + 1 */
    uint64_t *list;               /* n: counter word just before each relevant item */
    size_t *list_start, *list_len; /* stripes */
    double *ap_sum;               /* n_map */
    uint64_t *ap_hits, *prec_hits; /* n_map, n_prec */
    uint8_t *base;                /* the allocation all of the above live in */
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
static size_t workspace_layout(uint8_t *base, workspace *w, size_t n, size_t bins, size_t stripes,
                               size_t n_map, size_t n_prec) {
    int bad = 0;
    size_t off = 0, cells = 0;
    if (__builtin_mul_overflow(stripes, bins, &cells)) return 0;
#define CARVE(field, type, count)                                     \
    {                                                                 \
        size_t at_ = reserve(&off, (count), sizeof(type), &bad);      \
        if (base) w->field = (type *)(void *)(base + at_);            \
    }
    CARVE(dist, uint16_t, CMH_INTERLEAVE * CMH_BLOCK);
    CARVE(rel, uint8_t, CMH_INTERLEAVE * CMH_BLOCK);
    CARVE(cnt, uint64_t, cells);
    CARVE(nless, uint64_t, bins);
    CARVE(rless, uint64_t, bins);
    CARVE(soff, uint64_t, cells);
    CARVE(roff, uint64_t, cells);
    CARVE(list, uint64_t, n);
    CARVE(list_start, size_t, stripes);
    CARVE(list_len, size_t, stripes);
    CARVE(ap_sum, double, n_map);
    CARVE(ap_hits, uint64_t, n_map);
    CARVE(prec_hits, uint64_t, n_prec);
#undef CARVE
    return bad ? 0 : off;
}

static workspace *workspace_new(size_t n, size_t bins, size_t stripes, size_t n_map, size_t n_prec) {
    workspace probe;
    size_t bytes = workspace_layout(NULL, &probe, n, bins, stripes, n_map, n_prec);
    if (bytes == 0) return NULL;
    workspace *w = malloc(sizeof(workspace));
    uint8_t *base = aligned_alloc(64, bytes);
    if (!w || !base) {
        free(w);
        free(base);
        return NULL;
    }
    workspace_layout(base, w, n, bins, stripes, n_map, n_prec);
    w->base = base;
    return w;
}

static void workspace_free(workspace *w) {
    if (!w) return;
    free(w->base);
    free(w);
}

/* Stripe count for n >= 1 items: groups of CMH_INTERLEAVE, every stripe < 2^24 items. */
static size_t stripe_count(size_t n) {
    const size_t per_group = CMH_INTERLEAVE * CMH_STRIPE_MAX;
    return CMH_INTERLEAVE * ((n + per_group - 1) / per_group);
}

/* Counts items of one stripe's block: counter words are T apart (the stripes' counters
 * are interleaved). Branch-free: every item is written at the list end, and the list
 * only grows when the item is relevant (relevance is close to a coin flip). */
static inline void count_stripe(uint64_t *restrict cnt, uint64_t *restrict list,
                                const uint16_t *restrict dist, const uint8_t *restrict rel,
                                size_t len, size_t *at) {
    size_t end = *at;
    for (size_t j = 0; j < len; j++) {
        const size_t d = dist[j];
        const uint64_t e = rel[j], v = cnt[d * CMH_INTERLEAVE];
        cnt[d * CMH_INTERLEAVE] = v + 1 + (e << CMH_SHIFT); /* one item; e: one relevant */
        list[end] = v;
        end += e;
    }
    *at = end;
}

/* The same over all four stripes' blocks of `len` items, interleaved item by item, so
 * the four counter chains overlap. */
static inline void count_interleaved(uint64_t *restrict cnt, uint64_t *restrict list,
                                     const uint16_t *restrict dist, const uint8_t *restrict rel,
                                     size_t len, size_t at[CMH_INTERLEAVE]) {
    size_t end[CMH_INTERLEAVE];
    for (size_t t = 0; t < CMH_INTERLEAVE; t++) end[t] = at[t];
    for (size_t j = 0; j < len; j++) {
#pragma GCC unroll 16
        for (size_t t = 0; t < CMH_INTERLEAVE; t++) {
            const size_t d = dist[t * CMH_BLOCK + j];
            const uint64_t e = rel[t * CMH_BLOCK + j], v = cnt[d * CMH_INTERLEAVE + t];
            cnt[d * CMH_INTERLEAVE + t] = v + 1 + (e << CMH_SHIFT);
            list[end[t]] = v;
            end[t] += e;
        }
    }
    for (size_t t = 0; t < CMH_INTERLEAVE; t++) at[t] = end[t];
}

/* Pass 1 over stripes g*4 .. g*4+3 for one query: counters and the relevant-item list. */
static void count_group(const rank_ctx *c, workspace *w, const uint8_t *q, const uint8_t *ql,
                        size_t g) {
    const size_t T = CMH_INTERLEAVE;
    size_t begin[CMH_INTERLEAVE], end[CMH_INTERLEAVE], at[CMH_INTERLEAVE];
    for (size_t t = 0; t < T; t++) {
        cmh_split(c->n, c->stripes, g * T + t, &begin[t], &end[t]);
        w->list_start[g * T + t] = at[t] = begin[t]; /* stripe's relevant items go to list[begin...] */
    }
    uint64_t *const cnt = w->cnt + g * c->bins * T;
    for (size_t d = 0; d < c->bins; d++)
        for (size_t t = 0; t < T; t++) cnt[d * T + t] = (uint64_t)d << (2 * CMH_SHIFT);

    for (size_t step = 0;; step++) {
        size_t len[CMH_INTERLEAVE], most = 0;
        for (size_t t = 0; t < T; t++) {
            size_t from = begin[t] + step * CMH_BLOCK;
            len[t] = from < end[t] ? (end[t] - from < CMH_BLOCK ? end[t] - from : CMH_BLOCK) : 0;
            if (len[t] > most) most = len[t];
            if (len[t]) {
                c->dist(q, c->db + from * c->nbytes, len[t], c->nbytes, w->dist + t * CMH_BLOCK);
                cmh_any_common(ql, c->dbl + from * c->lbytes, len[t], c->lbytes, w->rel + t * CMH_BLOCK);
            }
        }
        if (most == 0) break;
        if (len[T - 1] == most) {
            /* Every stripe has `most` items this step (stripes differ by at most one item
             * in total, and only the last step is short), so the four run interleaved. */
            count_interleaved(cnt, w->list, w->dist, w->rel, most, at);
        } else {
            for (size_t t = 0; t < T; t++)
                count_stripe(cnt + t, w->list, w->dist + t * CMH_BLOCK, w->rel + t * CMH_BLOCK,
                             len[t], &at[t]);
        }
    }
    for (size_t t = 0; t < T; t++) w->list_len[g * T + t] = at[t] - begin[t];
}

/* Pass 2 for one query: write its histograms, APs and precisions. */
static void score_query(const rank_ctx *c, workspace *w, size_t qi) {
    const size_t bins = c->bins, stripes = c->stripes, T = CMH_INTERLEAVE;
    int64_t *ha = c->hist_all + qi * bins, *hr = c->hist_rel + qi * bins;
    uint64_t below = 0, rbelow = 0;
    for (size_t d = 0; d < bins; d++) {
        uint64_t tot = 0, rtot = 0;
        for (size_t s = 0; s < stripes; s++) {
            /* items of distance d in the stripes before s, and below d overall */
            w->soff[s * bins + d] = tot;
            w->roff[s * bins + d] = rtot;
            const uint64_t v = w->cnt[((s / T) * bins + d) * T + s % T];
            tot += v & CMH_FIELD;
            rtot += (v >> CMH_SHIFT) & CMH_FIELD;
        }
        ha[d] = (int64_t)tot;
        hr[d] = (int64_t)rtot;
        w->nless[d] = below;
        w->rless[d] = rbelow;
        below += tot;
        rbelow += rtot;
    }
    /* Fold N_<d + 1 and R_<d + 1 into the stripe offsets: one add per item below. */
    for (size_t s = 0; s < stripes; s++)
        for (size_t d = 0; d < bins; d++) {
            w->soff[s * bins + d] += w->nless[d] + 1;
            w->roff[s * bins + d] += w->rless[d] + 1;
        }

    const size_t n_map = c->n_map, n_prec = c->n_prec;
    for (size_t i = 0; i < n_map; i++) w->ap_sum[i] = 0.0, w->ap_hits[i] = 0;
    for (size_t i = 0; i < n_prec; i++) w->prec_hits[i] = 0;
    /* The common case, AP@all alone, without the cutoff tests, in four partial sums (one
     * chain of dependent adds would cost an add's latency per item); fixed order, so the
     * result is the same on every run. */
    const int all_only = n_map == 1 && c->map_ks[0] >= c->n && n_prec == 0;
    double part[4] = {0.0, 0.0, 0.0, 0.0};
#define POSITION(v) (so[(v) >> (2 * CMH_SHIFT)] + ((v) & CMH_FIELD)) /* 1-based, in the ranking */
#define RANK(v) (ro[(v) >> (2 * CMH_SHIFT)] + (((v) >> CMH_SHIFT) & CMH_FIELD)) /* among relevant */
    /* signed conversion: one instruction (values are < 2^32) */
#define PRECISION(v) ((double)(int64_t)RANK(v) * c->inv[POSITION(v)])
    for (size_t s = 0; s < stripes; s++) {
        const uint64_t *so = w->soff + s * bins, *ro = w->roff + s * bins;
        const uint64_t *list = w->list + w->list_start[s];
        const size_t len = w->list_len[s];
        if (all_only) {
            size_t m = 0;
            for (; m + 4 <= len; m += 4)
                for (size_t u = 0; u < 4; u++) part[u] += PRECISION(list[m + u]);
            for (; m < len; m++) part[m % 4] += PRECISION(list[m]);
            continue;
        }
        for (size_t m = 0; m < len; m++) {
            const uint64_t v = list[m], pos = POSITION(v);
            const double p = PRECISION(v);
            for (size_t i = 0; i < n_map; i++) {
                const int in = pos <= c->map_ks[i];
                w->ap_sum[i] += in ? p : 0.0;
                w->ap_hits[i] += (uint64_t)in;
            }
            for (size_t i = 0; i < n_prec; i++) w->prec_hits[i] += pos <= c->prec_ks[i];
        }
    }
#undef PRECISION
#undef RANK
#undef POSITION
    if (all_only) {
        w->ap_sum[0] = (part[0] + part[1]) + (part[2] + part[3]);
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
        for (size_t g = 0; g < c->stripes / CMH_INTERLEAVE; g++)
            count_group(c, w, c->q + qi * c->nbytes, c->ql + qi * c->lbytes, g);
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
    if (cmh_get_out(oha, F, "hist_all", "int64", hist_count, &ha) < 0 ||
        cmh_get_out(ohr, F, "hist_rel", "int64", hist_count, &hr) < 0 ||
        cmh_get_out(oap, F, "ap", "float64", ap_count, &ap) < 0 ||
        cmh_get_out(opr, F, "prec", "float64", prec_count, &pr) < 0)
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
    const size_t stripes = stripe_count(db.rows);

    inv = malloc((db.rows + 1) * sizeof(double)); /* db.rows < 2^32: no overflow */
    work = PyMem_Calloc(nthreads, sizeof(void *));
    if (!work || !inv) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t t = 0; t < nthreads; t++) {
        work[t] = workspace_new(db.rows, bins, stripes, n_map, n_prec);
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
        .stripes = stripes,
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
