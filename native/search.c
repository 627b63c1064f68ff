/* Exact search in Hamming space over packed codes: the full distance matrix, the k
 * nearest neighbours and radius search.
 *
 * Each entry point is a thin wrapper: it parses and checks its arguments, then releases
 * the GIL around plain C that calls no Python API. Outputs of a known size are allocated
 * by the caller (numpy) and passed in; radius search returns bytearrays.
 *
 * kNN keeps memory at O(nq*k + threads*block): the database is read in blocks that stay
 * in L2 while every query of a thread is compared with them; a block's distances go to a
 * small per-thread uint16 buffer that is scanned against the query's current threshold.
 * Survivors (distance, position) go to a per-query candidate list that is filtered down
 * to k whenever it fills up, which also tightens the threshold. */
#include "pyargs.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "threads.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CMH_X86 1
#include <immintrin.h>
#else
#define CMH_X86 0
#endif

/* Below this many database codes per thread, splitting one query's scan over threads
 * costs more (thread start-up) than it saves. */
#define MIN_CODES_PER_THREAD 16384

static int mul_overflows(size_t a, size_t b, size_t *out) {
    return __builtin_mul_overflow(a, b, out);
}

/* Codes per database block: the block and its uint16 distances stay in L1 while each
 * query of the thread is compared with it. 16 KiB measured best on the 2-vCPU EPYC dev
 * box: at 32 KiB two threads scaled by only ~1.15x (the vCPUs appear to share a core's L1),
 * at 16 KiB by ~1.95x. */
static size_t block_codes(size_t nbytes) {
    size_t b = (size_t)(16 * 1024) / nbytes;
    if (b < 128) b = 128;
    if (b > 8192) b = 8192;
    return b;
}

static void set_failed(int *flag) { __atomic_store_n(flag, 1, __ATOMIC_RELAXED); }

/* ------------------------------------------------------------------------------------ */
/* Candidate lists for kNN. */

typedef struct {
    uint16_t *dist;
    int64_t *pos;
    size_t count;
    uint32_t limit; /* new candidates need distance < limit; held ones have <= limit */
} cand_list;

/* Keep the k best of the list by (distance, position). The list is always in position
 * order (appends come in database order, filtering keeps the order), so among items at
 * the cut-off distance the first ones in the list are the ones to keep. Afterwards only
 * distances below the cut-off can enter: a later item at the cut-off has a larger
 * position and would lose. `hist` has room for limit + 1 counters. */
static void cand_compact(cand_list *c, size_t k, uint32_t *hist) {
    if (c->count <= k) return;
    const size_t lim = c->limit;
    memset(hist, 0, (lim + 1) * sizeof *hist);
    for (size_t i = 0; i < c->count; i++) hist[c->dist[i]]++;
    size_t below = 0, cut = 0;
    for (cut = 0; cut <= lim; cut++) {
        if (below + hist[cut] >= k) break;
        below += hist[cut];
    }
    size_t take = k - below, w = 0;
    for (size_t i = 0; i < c->count; i++) {
        const uint16_t d = c->dist[i];
        if (d < cut || (d == cut && take > 0)) {
            if (d == cut) take--;
            c->dist[w] = d;
            c->pos[w] = c->pos[i];
            w++;
        }
    }
    c->count = w;
    c->limit = (uint32_t)cut;
}

/* Write the best k of `c` sorted by (distance, position) into od/oi (k slots), padding
 * with INT32_MAX / -1. A stable counting sort keeps position order within a distance. */
static void cand_emit(cand_list *c, size_t k, uint32_t *hist, int32_t *od, int64_t *oi) {
    cand_compact(c, k, hist);
    const size_t lim = c->limit;
    memset(hist, 0, (lim + 1) * sizeof *hist);
    for (size_t i = 0; i < c->count; i++) hist[c->dist[i]]++;
    uint32_t start = 0;
    for (size_t d = 0; d <= lim; d++) {
        uint32_t h = hist[d];
        hist[d] = start;
        start += h;
    }
    for (size_t i = 0; i < c->count; i++) {
        uint32_t at = hist[c->dist[i]]++;
        od[at] = c->dist[i];
        oi[at] = c->pos[i];
    }
    for (size_t r = c->count; r < k; r++) {
        od[r] = INT32_MAX;
        oi[r] = -1;
    }
}

/* Append the candidates of one block of distances d[0..len) (positions base + j). */
typedef void (*scan_fn)(cand_list *c, const uint16_t *d, size_t len, int64_t base, size_t k,
                        size_t cap, uint32_t *hist);

#define PUSH_CANDIDATE(c, dv, p)                                                                \
    do {                                                                                        \
        (c)->dist[(c)->count] = (dv);                                                           \
        (c)->pos[(c)->count] = (p);                                                             \
        if (++(c)->count == cap) cand_compact((c), k, hist);                                    \
    } while (0)

/* Portable scan: a min over 32 distances (which compilers vectorise) skips the groups
 * where nothing can enter, which is almost all of them once the threshold is tight. */
#define DEFINE_SCAN(SUFFIX, ATTR)                                                               \
    ATTR static void scan_##SUFFIX(cand_list *c, const uint16_t *d, size_t len, int64_t base,  \
                                   size_t k, size_t cap, uint32_t *hist) {                      \
        size_t j = 0;                                                                           \
        for (; j + 32 <= len; j += 32) {                                                        \
            uint16_t m = UINT16_MAX;                                                            \
            for (int i = 0; i < 32; i++) m = d[j + i] < m ? d[j + i] : m;                       \
            if (m >= c->limit) continue;                                                        \
            for (size_t i = j; i < j + 32; i++)                                                 \
                if (d[i] < c->limit) PUSH_CANDIDATE(c, d[i], base + (int64_t)i);                \
        }                                                                                       \
        for (; j < len; j++)                                                                    \
            if (d[j] < c->limit) PUSH_CANDIDATE(c, d[j], base + (int64_t)j);                    \
    }

DEFINE_SCAN(generic, )
#if CMH_X86
/* AVX2: the minimum of 64 distances is tested against the threshold with one saturating
 * subtraction (nonzero where limit - d > 0); groups that can hold a candidate are
 * scanned one by one. */
__attribute__((target("avx2"))) static void scan_avx2(cand_list *c, const uint16_t *d, size_t len,
                                                     int64_t base, size_t k, size_t cap,
                                                     uint32_t *hist) {
    size_t j = 0;
    for (; j + 64 <= len; j += 64) {
        const __m256i *v = (const __m256i *)(d + j);
        __m256i m = _mm256_min_epu16(_mm256_min_epu16(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)),
                                     _mm256_min_epu16(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
        __m256i below = _mm256_subs_epu16(_mm256_set1_epi16((short)c->limit), m);
        if (_mm256_testz_si256(below, below)) continue;
        for (size_t i = j; i < j + 64; i++)
            if (d[i] < c->limit) PUSH_CANDIDATE(c, d[i], base + (int64_t)i);
    }
    for (; j < len; j++)
        if (d[j] < c->limit) PUSH_CANDIDATE(c, d[j], base + (int64_t)j);
}

/* AVX-512: one compare gives a mask of the 32 distances below the threshold. */
__attribute__((target("avx512f,avx512bw"))) static void scan_avx512(cand_list *c,
                                                                   const uint16_t *d,
                                                                   size_t len, int64_t base,
                                                                   size_t k, size_t cap,
                                                                   uint32_t *hist) {
    for (size_t j = 0; j < len; j += 32) {
        const __mmask32 valid = len - j >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (len - j)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi16(valid, d + j);
        uint32_t m = _mm512_mask_cmplt_epu16_mask(valid, v, _mm512_set1_epi16((short)c->limit));
        while (m) {
            const unsigned i = (unsigned)__builtin_ctz(m);
            m &= m - 1;
            if (d[j + i] >= c->limit) continue; /* the threshold tightened in this group */
            PUSH_CANDIDATE(c, d[j + i], base + (int64_t)(j + i));
        }
    }
}
#endif

static scan_fn pick_scan(void) {
#if CMH_X86
    switch (cmh_simd_current()) {
    case CMH_SIMD_AVX512: return scan_avx512;
    case CMH_SIMD_AVX2: return scan_avx2;
    default: break;
    }
#endif
    return scan_generic;
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

/* How to split the work: over queries when there are enough of them, else over the
 * database (each thread a range of it, for all queries). */
typedef struct {
    size_t nthreads;
    int split_db;
} work_plan;

static work_plan plan_work(size_t nq, size_t n, size_t threads) {
    work_plan p = {1, 0};
    if (nq >= threads) {
        p.nthreads = threads;
    } else {
        size_t by_db = n / MIN_CODES_PER_THREAD;
        if (by_db > threads) by_db = threads;
        if (by_db >= 2) {
            p.nthreads = by_db;
            p.split_db = 1;
        } else {
            p.nthreads = nq > 0 ? nq : 1;
        }
    }
    if (p.nthreads < 1) p.nthreads = 1;
    return p;
}

/* Thread tid's share of a plan: queries [*qb, *qe) against database items [*jb, *je). */
static void plan_share(const work_plan *plan, size_t nq, size_t n, size_t tid, size_t nt, size_t *qb,
                       size_t *qe, size_t *jb, size_t *je) {
    *qb = 0, *qe = nq, *jb = 0, *je = n;
    if (plan->split_db)
        cmh_split(n, nt, tid, jb, je);
    else
        cmh_split(nq, nt, tid, qb, qe);
}

/* ------------------------------------------------------------------------------------ */
/* distances() */

typedef struct {
    const uint8_t *q, *db;
    size_t nq, n, nb;
    cmh_dist_fn kern;
    work_plan plan;
    int32_t *out;
    int failed;
} dist_ctx;

static void dist_worker(void *p, size_t tid, size_t nt) {
    dist_ctx *c = (dist_ctx *)p;
    size_t qb, qe, jb, je;
    plan_share(&c->plan, c->nq, c->n, tid, nt, &qb, &qe, &jb, &je);
    const size_t blk = block_codes(c->nb);
    uint16_t *buf = malloc(blk * sizeof *buf);
    if (!buf) {
        set_failed(&c->failed);
        return;
    }
    for (size_t i = qb; i < qe; i++) {
        int32_t *row = c->out + i * c->n;
        for (size_t j0 = jb; j0 < je; j0 += blk) {
            size_t len = je - j0 < blk ? je - j0 : blk;
            c->kern(c->q + i * c->nb, c->db + j0 * c->nb, len, c->nb, buf);
            for (size_t j = 0; j < len; j++) row[j0 + j] = buf[j];
        }
    }
    free(buf);
}

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
    if (cmh_get_out(outobj, "distances", "out", 4, count, &out) < 0) {
        cmh_release_matrix(&q);
        cmh_release_matrix(&db);
        return NULL;
    }
    dist_ctx c = {q.data, db.data, q.rows, db.rows, q.cols, cmh_dist_kernel(q.cols),
                  plan_work(q.rows, db.rows, threads), (int32_t *)out.data, 0};
    if (c.nq > 0 && c.n > 0) {
        Py_BEGIN_ALLOW_THREADS
        cmh_parallel(c.plan.nthreads, dist_worker, &c);
        Py_END_ALLOW_THREADS
    }
    cmh_release_out(&out);
    cmh_release_matrix(&q);
    cmh_release_matrix(&db);
    if (c.failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------ */
/* knn() */

typedef struct {
    const uint8_t *q, *db;
    size_t nq, n, nb, bits, k, cap;
    cmh_dist_fn kern;
    scan_fn scan;
    work_plan plan;
    cand_list *lists; /* split over queries: nq lists; over db: nthreads * nq */
    int32_t *out_d;
    int64_t *out_i;
    size_t k_out; /* row length of the outputs (the k asked for, maybe > n) */
    int failed;
} knn_ctx;

static void knn_worker(void *p, size_t tid, size_t nt) {
    knn_ctx *c = (knn_ctx *)p;
    size_t qb, qe, jb, je;
    plan_share(&c->plan, c->nq, c->n, tid, nt, &qb, &qe, &jb, &je);
    cand_list *lists = c->plan.split_db ? c->lists + tid * c->nq : c->lists + qb;
    const size_t blk = block_codes(c->nb);
    uint16_t *buf = malloc(blk * sizeof *buf);
    uint32_t *hist = malloc((c->bits + 2) * sizeof *hist);
    if (!buf || !hist) {
        free(buf);
        free(hist);
        set_failed(&c->failed);
        return;
    }
    const size_t nq_t = qe - qb;
    for (size_t j0 = jb; j0 < je; j0 += blk) {
        const size_t len = je - j0 < blk ? je - j0 : blk;
        const uint8_t *block = c->db + j0 * c->nb;
        for (size_t i = 0; i < nq_t; i++) {
            cand_list *l = &lists[i];
            if (l->limit == 0) continue; /* k items at distance 0 already: nothing can enter */
            c->kern(c->q + (qb + i) * c->nb, block, len, c->nb, buf);
            c->scan(l, buf, len, (int64_t)j0, c->k, c->cap, hist);
        }
    }
    if (c->plan.split_db) {
        for (size_t i = 0; i < nq_t; i++) cand_compact(&lists[i], c->k, hist);
    } else {
        for (size_t i = 0; i < nq_t; i++)
            cand_emit(&lists[i], c->k_out, hist, c->out_d + (qb + i) * c->k_out,
                      c->out_i + (qb + i) * c->k_out);
    }
    free(buf);
    free(hist);
}

/* After a split over the database: the lists of thread 0, 1, ... cover increasing
 * positions, so their concatenation is in position order and compacts like one list. */
static int knn_merge(knn_ctx *c) {
    const size_t nt = c->plan.nthreads;
    size_t room;
    if (mul_overflows(nt, c->k, &room)) return -1;
    uint16_t *dist = malloc(room * sizeof *dist);
    int64_t *pos = malloc(room * sizeof *pos);
    uint32_t *hist = malloc((c->bits + 2) * sizeof *hist);
    if (!dist || !pos || !hist) {
        free(dist);
        free(pos);
        free(hist);
        return -1;
    }
    for (size_t i = 0; i < c->nq; i++) {
        cand_list m = {dist, pos, 0, (uint32_t)c->bits + 1};
        for (size_t t = 0; t < nt; t++) {
            const cand_list *l = &c->lists[t * c->nq + i];
            memcpy(dist + m.count, l->dist, l->count * sizeof *dist);
            memcpy(pos + m.count, l->pos, l->count * sizeof *pos);
            m.count += l->count;
        }
        cand_emit(&m, c->k_out, hist, c->out_d + i * c->k_out, c->out_i + i * c->k_out);
    }
    free(dist);
    free(pos);
    free(hist);
    return 0;
}

/* Everything after argument checks, without the GIL. 0, or -1 when out of memory. */
static int knn_run(knn_ctx *c) {
    if (c->nq == 0) return 0;
    if (c->n == 0) {
        for (size_t r = 0; r < c->nq * c->k_out; r++) {
            c->out_d[r] = INT32_MAX;
            c->out_i[r] = -1;
        }
        return 0;
    }
    /* Room per list: 2k (at least k + 64) amortises each filtering over k appends; never
     * more than the codes one list can see. */
    size_t range = c->plan.split_db ? (c->n + c->plan.nthreads - 1) / c->plan.nthreads : c->n;
    size_t cap = c->k + (c->k > 64 ? c->k : 64);
    if (cap > range) cap = range;
    if (cap < 1) cap = 1;
    c->cap = cap;
    size_t nlists = c->plan.split_db ? c->plan.nthreads * c->nq : c->nq, slots;
    if (mul_overflows(nlists, cap, &slots) || slots > SIZE_MAX / sizeof(int64_t)) return -1;
    c->lists = malloc(nlists * sizeof *c->lists);
    uint16_t *dist = malloc(slots * sizeof *dist);
    int64_t *pos = malloc(slots * sizeof *pos);
    int rc = 0;
    if (!c->lists || !dist || !pos) {
        rc = -1;
        goto done;
    }
    for (size_t l = 0; l < nlists; l++)
        c->lists[l] = (cand_list){dist + l * cap, pos + l * cap, 0, (uint32_t)c->bits + 1};
    cmh_parallel(c->plan.nthreads, knn_worker, c);
    if (c->failed) {
        rc = -1;
        goto done;
    }
    if (c->plan.split_db) rc = knn_merge(c);
done:
    free(c->lists);
    free(dist);
    free(pos);
    c->lists = NULL;
    return rc;
}

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
    if (cmh_get_out(odobj, "knn", "out_distances", 4, count, &od) < 0) goto fail;
    if (cmh_get_out(oiobj, "knn", "out_labels", 8, count, &oi) < 0) goto fail;
    const size_t k_out = (size_t)k_arg;
    knn_ctx c = {
        .q = q.data, .db = db.data, .nq = q.rows, .n = db.rows, .nb = q.cols,
        .bits = q.cols * 8, .k = k_out < db.rows ? k_out : db.rows,
        .kern = cmh_dist_kernel(q.cols), .scan = pick_scan(),
        .plan = plan_work(q.rows, db.rows, threads), .out_d = (int32_t *)od.data,
        .out_i = (int64_t *)oi.data, .k_out = k_out,
    };
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = knn_run(&c);
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

typedef struct {
    uint16_t *dist;
    int64_t *pos;
    size_t count, cap;
} grow_buf;

static int grow_push(grow_buf *g, uint16_t d, int64_t p) {
    if (g->count == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 1024;
        uint16_t *nd = realloc(g->dist, cap * sizeof *nd);
        if (!nd) return -1;
        g->dist = nd;
        int64_t *np = realloc(g->pos, cap * sizeof *np);
        if (!np) return -1;
        g->pos = np;
        g->cap = cap;
    }
    g->dist[g->count] = d;
    g->pos[g->count] = p;
    g->count++;
    return 0;
}

typedef struct {
    const uint8_t *q, *db;
    size_t nq, n, nb;
    uint16_t radius; /* inclusive, at most the code length in bits */
    cmh_dist_fn kern;
    work_plan plan;
    grow_buf *bufs;  /* one per thread */
    size_t *counts;  /* hits per query: [q] over queries, [t * nq + q] over db */
    int failed;
} range_ctx;

static void range_worker(void *p, size_t tid, size_t nt) {
    range_ctx *c = (range_ctx *)p;
    size_t qb, qe, jb, je;
    plan_share(&c->plan, c->nq, c->n, tid, nt, &qb, &qe, &jb, &je);
    size_t *counts = c->plan.split_db ? c->counts + tid * c->nq : c->counts;
    grow_buf *g = &c->bufs[tid];
    const size_t blk = block_codes(c->nb);
    uint16_t *buf = malloc(blk * sizeof *buf);
    if (!buf) {
        set_failed(&c->failed);
        return;
    }
    const uint16_t r = c->radius;
    for (size_t i = qb; i < qe; i++) {
        const size_t before = g->count;
        for (size_t j0 = jb; j0 < je; j0 += blk) {
            const size_t len = je - j0 < blk ? je - j0 : blk;
            c->kern(c->q + i * c->nb, c->db + j0 * c->nb, len, c->nb, buf);
            for (size_t j = 0; j < len; j++) {
                if (buf[j] <= r && grow_push(g, buf[j], (int64_t)(j0 + j)) < 0) {
                    set_failed(&c->failed);
                    free(buf);
                    return;
                }
            }
        }
        counts[i] = g->count - before;
    }
    free(buf);
}

/* Gather each query's hits from the thread buffers (in thread order, so in position
 * order) into the outputs, sorted stably by distance. */
static int range_fill(range_ctx *c, int64_t *lims, int32_t *od, int64_t *oi) {
    const size_t nt = c->plan.nthreads;
    size_t *cursor = calloc(nt, sizeof *cursor);
    size_t *hist = malloc(((size_t)c->radius + 1) * sizeof *hist);
    if (!cursor || !hist) {
        free(cursor);
        free(hist);
        return -1;
    }
    for (size_t i = 0; i < c->nq; i++) {
        size_t t_first = 0, t_last = nt, qb, qe;
        if (!c->plan.split_db) { /* only the thread that owned query i holds its hits */
            for (size_t t = 0; t < nt; t++) {
                cmh_split(c->nq, nt, t, &qb, &qe);
                if (i >= qb && i < qe) {
                    t_first = t;
                    t_last = t + 1;
                    break;
                }
            }
        }
        memset(hist, 0, ((size_t)c->radius + 1) * sizeof *hist);
        for (size_t t = t_first; t < t_last; t++) {
            const size_t cnt = c->plan.split_db ? c->counts[t * c->nq + i] : c->counts[i];
            const uint16_t *d = c->bufs[t].dist + cursor[t];
            for (size_t h = 0; h < cnt; h++) hist[d[h]]++;
        }
        size_t at = (size_t)lims[i];
        for (size_t d = 0; d <= c->radius; d++) {
            size_t h = hist[d];
            hist[d] = at;
            at += h;
        }
        for (size_t t = t_first; t < t_last; t++) {
            const size_t cnt = c->plan.split_db ? c->counts[t * c->nq + i] : c->counts[i];
            const uint16_t *d = c->bufs[t].dist + cursor[t];
            const int64_t *p = c->bufs[t].pos + cursor[t];
            for (size_t h = 0; h < cnt; h++) {
                size_t w = hist[d[h]]++;
                od[w] = d[h];
                oi[w] = p[h];
            }
            cursor[t] += cnt;
        }
    }
    free(cursor);
    free(hist);
    return 0;
}

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
    const size_t bits = q.cols * 8;
    range_ctx c = {
        .q = q.data, .db = db.data, .nq = q.rows, .n = db.rows, .nb = q.cols,
        .radius = (uint16_t)((size_t)radius_arg < bits ? (size_t)radius_arg : bits),
        .kern = cmh_dist_kernel(q.cols), .plan = plan_work(q.rows, db.rows, threads),
    };
    PyObject *lims_obj = NULL, *d_obj = NULL, *i_obj = NULL, *result = NULL;
    const size_t nt = c.plan.nthreads;
    size_t ncounts = c.plan.split_db ? nt * c.nq : c.nq;
    int rc = 0;
    c.bufs = calloc(nt, sizeof *c.bufs);
    c.counts = calloc(ncounts ? ncounts : 1, sizeof *c.counts);
    if (!c.bufs || !c.counts) {
        PyErr_NoMemory();
        goto done;
    }
    if (c.nq > 0 && c.n > 0) {
        Py_BEGIN_ALLOW_THREADS
        cmh_parallel(nt, range_worker, &c);
        Py_END_ALLOW_THREADS
    }
    if (c.failed) {
        PyErr_NoMemory();
        goto done;
    }
    size_t total = 0;
    for (size_t t = 0; t < nt; t++) total += c.bufs[t].count;
    lims_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)((c.nq + 1) * sizeof(int64_t)));
    d_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(total * sizeof(int32_t)));
    i_obj = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(total * sizeof(int64_t)));
    if (!lims_obj || !d_obj || !i_obj) goto done;
    int64_t *lims = (int64_t *)PyByteArray_AS_STRING(lims_obj);
    lims[0] = 0;
    for (size_t i = 0; i < c.nq; i++) {
        size_t hits = 0;
        if (c.plan.split_db)
            for (size_t t = 0; t < nt; t++) hits += c.counts[t * c.nq + i];
        else
            hits = c.counts[i];
        lims[i + 1] = lims[i] + (int64_t)hits;
    }
    int32_t *od = (int32_t *)PyByteArray_AS_STRING(d_obj);
    int64_t *oi = (int64_t *)PyByteArray_AS_STRING(i_obj);
    /* The bytearrays are ours alone until returned, so they can be filled without the GIL. */
    Py_BEGIN_ALLOW_THREADS
    rc = range_fill(&c, lims, od, oi);
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
    if (c.bufs)
        for (size_t t = 0; t < nt; t++) {
            free(c.bufs[t].dist);
            free(c.bufs[t].pos);
        }
    free(c.bufs);
    free(c.counts);
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
