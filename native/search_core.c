/* Exact search in Hamming space over packed codes: the full distance matrix, the k
 * nearest neighbours and radius search. Plain C, no Python API: search.c wraps it for
 * Python, and tests/native drives it directly.
 *
 * kNN keeps memory at O(nq*k + threads*block): the database is read in blocks that stay
 * in L1 while every query of a thread is compared with them; a block's distances go to a
 * small per-thread uint16 buffer that is scanned against the query's current threshold.
 * Survivors (distance, position) go to a per-query candidate list that is filtered down
 * to k whenever it fills up, which also tightens the threshold. Where the level has planar
 * kernels (kernels.h) and a thread has many queries, blocks are packed once and compared
 * with the precomputed tables of up to PLANAR_TABLE_BYTES of queries (knn_planar). */
#include "search_core.h"

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
/* AVX2: d < limit where the saturating difference limit - d is nonzero. The minimum of
 * 64 distances is tested first; in the rare groups that pass, a byte mask of the 16
 * distances of each vector that pass leads to the candidates. */
__attribute__((target("avx2"))) static void scan_avx2(cand_list *c, const uint16_t *d, size_t len,
                                                     int64_t base, size_t k, size_t cap,
                                                     uint32_t *hist) {
    size_t j = 0;
    for (; j + 64 <= len; j += 64) {
        const __m256i *v = (const __m256i *)(d + j);
        const __m256i limit = _mm256_set1_epi16((short)c->limit);
        __m256i m = _mm256_min_epu16(_mm256_min_epu16(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)),
                                     _mm256_min_epu16(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
        __m256i below = _mm256_subs_epu16(limit, m);
        if (_mm256_testz_si256(below, below)) continue;
        for (size_t g = 0; g < 4; g++) {
            __m256i none = _mm256_cmpeq_epi16(_mm256_subs_epu16(limit, _mm256_loadu_si256(v + g)),
                                              _mm256_setzero_si256());
            uint32_t hits = ~(uint32_t)_mm256_movemask_epi8(none) & 0x55555555u; /* bit 2i: item i */
            while (hits) {
                const size_t i = j + 16 * g + (unsigned)__builtin_ctz(hits) / 2;
                hits &= hits - 1;
                if (d[i] < c->limit) /* the threshold may have tightened in this group */
                    PUSH_CANDIDATE(c, d[i], base + (int64_t)i);
            }
        }
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

typedef struct {
    const uint8_t *q, *db;
    size_t nq, n, nb, bits, k, cap;
    cmh_dist_fn kern;
    scan_fn scan;
    cmh_planar planar;
    int has_planar; /* planar kernels exist for this level and code length */
    work_plan plan;
    cand_list *lists; /* split over queries: nq lists; over db: nthreads * nq */
    int32_t *out_d;
    int64_t *out_i;
    size_t k_out; /* row length of the outputs (the k asked for, maybe > n) */
    int failed;
} knn_ctx;

/* kNN of queries [qb, qb + nq_t) over database items [jb, je), one query at a time per
 * block of the database. */
static void knn_scan_blocks(knn_ctx *c, cand_list *lists, size_t qb, size_t nq_t, size_t jb, size_t je,
                            uint16_t *buf, uint32_t *hist) {
    const size_t blk = block_codes(c->nb);
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
}

/* Planar kernels (kernels.h) pay for packing each database block once per pass, so they
 * need enough queries per pass to win; a pass takes as many queries as fit in
 * PLANAR_TABLE_BYTES of tables (L2), and the packed block is PLANAR_BLOCK_BYTES (L1). */
#define PLANAR_MIN_QUERIES 16
#define PLANAR_TABLE_BYTES (256 * 1024)
#define PLANAR_BLOCK_BYTES (16 * 1024)

/* kNN of queries [qb, qb + nq_t) over database items [jb, je) with the planar kernels:
 * 0, or -1 when out of memory. */
static int knn_planar(knn_ctx *c, cand_list *lists, size_t qb, size_t nq_t, size_t jb, size_t je,
                      uint32_t *hist) {
    const size_t nb = c->nb, table_bytes = 64 * nb, group = CMH_PLANAR_GROUP;
    const size_t blk = PLANAR_BLOCK_BYTES / (2 * nb) / group * group;
    size_t chunk = PLANAR_TABLE_BYTES / table_bytes;
    if (chunk > nq_t) chunk = nq_t;
    /* 32-byte loads that straddle cache lines would cost about a third more */
    uint8_t *tables = aligned_alloc(64, chunk * table_bytes);
    uint8_t *packed = aligned_alloc(64, cmh_planar_bytes(blk, nb));
    uint16_t *dist = malloc(blk * sizeof *dist);
    uint32_t *steps = malloc(blk / group * sizeof *steps);
    int rc = (tables && packed && dist && steps) ? 0 : -1;
    for (size_t q0 = 0; rc == 0 && q0 < nq_t; q0 += chunk) {
        const size_t qn = nq_t - q0 < chunk ? nq_t - q0 : chunk;
        for (size_t i = 0; i < qn; i++) c->planar.table(c->q + (qb + q0 + i) * nb, nb, tables + i * table_bytes);
        for (size_t j0 = jb; j0 < je; j0 += blk) {
            const size_t len = je - j0 < blk ? je - j0 : blk;
            c->planar.pack(c->db + j0 * nb, len, nb, packed);
            for (size_t i = 0; i < qn; i++) {
                cand_list *l = &lists[q0 + i];
                if (l->limit == 0) continue;
                const size_t listed = c->planar.dist(tables + i * table_bytes, packed, len, nb, l->limit, dist, steps);
                for (size_t s = 0; s < listed; s++) {
                    const size_t at = (size_t)steps[s] * group, m = len - at < group ? len - at : group;
                    c->scan(l, dist + at, m, (int64_t)(j0 + at), c->k, c->cap, hist);
                }
            }
        }
    }
    free(tables);
    free(packed);
    free(dist);
    free(steps);
    return rc;
}


static void knn_worker(void *p, size_t tid, size_t nt) {
    knn_ctx *c = (knn_ctx *)p;
    size_t qb, qe, jb, je;
    plan_share(&c->plan, c->nq, c->n, tid, nt, &qb, &qe, &jb, &je);
    cand_list *lists = c->plan.split_db ? c->lists + tid * c->nq : c->lists + qb;
    uint16_t *buf = malloc(block_codes(c->nb) * sizeof *buf);
    uint32_t *hist = malloc((c->bits + 2) * sizeof *hist);
    if (!buf || !hist) {
        free(buf);
        free(hist);
        set_failed(&c->failed);
        return;
    }
    const size_t nq_t = qe - qb;
    if (c->has_planar && !c->plan.split_db && nq_t >= PLANAR_MIN_QUERIES) {
        if (knn_planar(c, lists, qb, nq_t, jb, je, hist) < 0) set_failed(&c->failed);
    } else {
        knn_scan_blocks(c, lists, qb, nq_t, jb, je, buf, hist);
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

/* 0, or -1 when out of memory. */
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

struct cmh_range {
    const uint8_t *q, *db;
    size_t nq, n, nb;
    uint16_t radius; /* inclusive, at most the code length in bits */
    cmh_dist_fn kern;
    work_plan plan;
    grow_buf *bufs;  /* one per thread */
    size_t *counts;  /* hits per query: [q] over queries, [t * nq + q] over db */
    int failed;
};

static void range_worker(void *p, size_t tid, size_t nt) {
    cmh_range *c = (cmh_range *)p;
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
int cmh_range_fill(cmh_range *c, int64_t *lims, int32_t *od, int64_t *oi) {
    const size_t nt = c->plan.nthreads;
    lims[0] = 0;
    for (size_t i = 0; i < c->nq; i++) {
        size_t hits = 0;
        if (c->plan.split_db)
            for (size_t t = 0; t < nt; t++) hits += c->counts[t * c->nq + i];
        else
            hits = c->counts[i];
        lims[i + 1] = lims[i] + (int64_t)hits;
    }
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


/* ------------------------------------------------------------------------------------ */
/* Entry points. */

int cmh_distances(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes,
                  size_t threads, int32_t *out) {
    dist_ctx c = {q, db, nq, n, nbytes, cmh_dist_kernel(nbytes), plan_work(nq, n, threads), out, 0};
    if (nq > 0 && n > 0) cmh_parallel(c.plan.nthreads, dist_worker, &c);
    return c.failed ? -1 : 0;
}

int cmh_knn(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes, size_t k,
            size_t threads, int32_t *out_d, int64_t *out_i) {
    knn_ctx c = {
        .q = q, .db = db, .nq = nq, .n = n, .nb = nbytes, .bits = nbytes * 8,
        .k = k < n ? k : n, .kern = cmh_dist_kernel(nbytes), .scan = pick_scan(),
        .plan = plan_work(nq, n, threads), .out_d = out_d, .out_i = out_i, .k_out = k,
    };
    c.has_planar = cmh_planar_kernels(nbytes, &c.planar);
    return knn_run(&c);
}

cmh_range *cmh_range_run(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes,
                         size_t radius, size_t threads) {
    const size_t bits = nbytes * 8;
    cmh_range *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    *c = (cmh_range){
        .q = q, .db = db, .nq = nq, .n = n, .nb = nbytes,
        .radius = (uint16_t)(radius < bits ? radius : bits), .kern = cmh_dist_kernel(nbytes),
        .plan = plan_work(nq, n, threads),
    };
    const size_t nt = c->plan.nthreads, ncounts = c->plan.split_db ? nt * nq : nq;
    c->bufs = calloc(nt, sizeof *c->bufs);
    c->counts = calloc(ncounts ? ncounts : 1, sizeof *c->counts);
    if (c->bufs && c->counts && nq > 0 && n > 0) cmh_parallel(nt, range_worker, c);
    if (!c->bufs || !c->counts || c->failed) {
        cmh_range_free(c);
        return NULL;
    }
    return c;
}

size_t cmh_range_total(const cmh_range *c) {
    size_t total = 0;
    for (size_t t = 0; t < c->plan.nthreads; t++) total += c->bufs[t].count;
    return total;
}

void cmh_range_free(cmh_range *c) {
    if (!c) return;
    if (c->bufs)
        for (size_t t = 0; t < c->plan.nthreads; t++) {
            free(c->bufs[t].dist);
            free(c->bufs[t].pos);
        }
    free(c->bufs);
    free(c->counts);
    free(c);
}
