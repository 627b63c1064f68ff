/* Multi-index hashing (see mih_core.h): table construction by counting sort, and exact kNN
 * and radius search that grow a search radius over the substring tables.
 *
 * Why it is exact: if two codes differ in d bits, one of the m substrings differs in at
 * most floor(d / m) of them (pigeonhole). Searching every table for keys within radius r of
 * the query's substring finds every code at distance <= m*r + m - 1; more finely, once
 * substrings 0..j have been searched at radius r (and the rest at r - 1), every code at
 * distance <= m*r + j has been seen. kNN stops as soon as the k-th best distance seen is
 * within that guaranteed radius: every code that could tie or beat it has then been seen,
 * so the k best by (distance, position) are exactly those of a full scan.
 *
 * Each query's work (table lookups plus candidates examined) is bounded by max_work; a
 * query that passes it gives up and is answered by the caller with a linear scan, so a
 * collection on which the tables do not pay off costs little more than the scan. */
#include "mih_core.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "threads.h"

/* After this many queries of one thread, the rest skip the tables when those tried so far
 * cost more than scanning would have (a query that gave up cost its work cap, as much as a
 * scan, and then the scan): the codes are evidently not structured enough. */
#define SKIP_AFTER 16
/* Keys looked up together, so that their memory accesses overlap. */
#define BATCH 32

static uint32_t sub_key(const uint8_t *code, size_t nbytes, uint32_t start, uint32_t width) {
    const size_t byte = start >> 3;
    uint64_t v = 0;
    for (size_t b = 0; b < 4 && byte + b < nbytes; b++) v |= (uint64_t)code[byte + b] << (8 * b);
    return (uint32_t)(v >> (start & 7)) & ((1u << width) - 1u);
}

static inline __attribute__((always_inline)) uint32_t hamming(const uint8_t *a, const uint8_t *b, size_t nb) {
    uint32_t d = 0;
    size_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        d += (uint32_t)__builtin_popcountll(x ^ y);
    }
    for (; i < nb; i++) d += (uint32_t)__builtin_popcount((unsigned)(a[i] ^ b[i]));
    return d;
}

/* out[i] = distance of the query to code pos[i]: portable, and with the POPCNT
 * instruction where the CPU has it (chosen at run time; the build targets any x86-64). */
typedef void (*dist_batch_fn)(const uint8_t *q, const uint8_t *db, size_t nb, const uint32_t *pos,
                              size_t count, uint16_t *out);

static void dist_batch_generic(const uint8_t *q, const uint8_t *db, size_t nb, const uint32_t *pos,
                               size_t count, uint16_t *out) {
    for (size_t i = 0; i < count; i++) out[i] = (uint16_t)hamming(q, db + (size_t)pos[i] * nb, nb);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("popcnt"))) static void dist_batch_popcnt(const uint8_t *q, const uint8_t *db, size_t nb,
                                                              const uint32_t *pos, size_t count, uint16_t *out) {
    for (size_t i = 0; i < count; i++) out[i] = (uint16_t)hamming(q, db + (size_t)pos[i] * nb, nb);
}
#endif

static dist_batch_fn pick_dist_batch(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (cmh_simd_current() >= CMH_SIMD_POPCNT && cmh_simd_current() != CMH_SIMD_NEON) return dist_batch_popcnt;
#endif
    return dist_batch_generic;
}

size_t cmh_mih_offsets_len(size_t m, const uint32_t *width) {
    size_t total = 0;
    for (size_t j = 0; j < m; j++) total += ((size_t)1 << width[j]) + 1;
    return total;
}

/* Counting sort of rows 0..n of src by substring (start, width): off (2^width + 1) gets the
 * bucket bounds, out[off[key]..off[key + 1]) the rows of bucket key in increasing order. */
static void sort_by_key(const uint8_t *src, size_t n, size_t nbytes, uint32_t start, uint32_t width,
                        uint32_t *keys, int32_t *off, int32_t *out) {
    const size_t size = (size_t)1 << width;
    memset(off, 0, (size + 1) * sizeof *off);
    for (size_t i = 0; i < n; i++) {
        keys[i] = sub_key(src + i * nbytes, nbytes, start, width);
        off[keys[i] + 1]++;
    }
    for (size_t key = 0; key < size; key++) off[key + 1] += off[key];
    /* Place the rows, counting each bucket's fill in its start offset (shifted down one
     * slot), which ends as the next bucket's start: no cursor array needed. */
    for (size_t i = 0; i < n; i++) out[off[keys[i]]++] = (int32_t)i;
    for (size_t key = size; key > 0; key--) off[key] = off[key - 1];
    off[0] = 0;
}

int cmh_mih_build(const uint8_t *db, size_t n, size_t nbytes, size_t m, const uint32_t *start,
                  const uint32_t *width, int32_t *offsets, int32_t *perm, int32_t *ranks, uint8_t *ordered) {
    uint32_t *keys = malloc((n ? n : 1) * sizeof *keys);
    if (!keys) return -1;
    sort_by_key(db, n, nbytes, start[0], width[0], keys, offsets, perm); /* rank order */
    for (size_t r = 0; r < n; r++) {
        if (r + 16 < n) __builtin_prefetch(db + (size_t)perm[r + 16] * nbytes);
        memcpy(ordered + r * nbytes, db + (size_t)perm[r] * nbytes, nbytes);
    }
    /* The other tables sort the ranks, read in order from the copy. */
    size_t base = ((size_t)1 << width[0]) + 1;
    for (size_t j = 1; j < m; j++) {
        sort_by_key(ordered, n, nbytes, start[j], width[j], keys, offsets + base, ranks + (j - 1) * n);
        base += ((size_t)1 << width[j]) + 1;
    }
    free(keys);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Per-thread workspace. */

typedef struct {
    uint64_t *seen; /* bitmap over ranks, all clear between queries */
    uint32_t *hist; /* candidates per distance */
    uint16_t *cd;   /* candidates: distance, and rank (< n_tab) or position (scanned codes) */
    uint32_t *cp;
    size_t count, cap;
    uint64_t *keys; /* (distance << 32 | position), for sorting */
    size_t keys_cap;
    uint32_t *pend; /* new candidates of a batch of keys, and their distances */
    uint16_t *pend_d;
    size_t pend_cap;
} workspace;

static int ws_init(workspace *w, size_t n_tab, size_t bits) {
    memset(w, 0, sizeof *w);
    w->seen = calloc(n_tab / 64 + 1, sizeof *w->seen);
    w->hist = malloc((bits + 2) * sizeof *w->hist);
    return w->seen && w->hist ? 0 : -1;
}

static void ws_free(workspace *w) {
    free(w->seen);
    free(w->hist);
    free(w->cd);
    free(w->cp);
    free(w->keys);
    free(w->pend);
    free(w->pend_d);
}

static int ws_reserve(workspace *w, size_t need) {
    if (need <= w->pend_cap) return 0;
    size_t cap = w->pend_cap ? w->pend_cap : 1024;
    while (cap < need) cap *= 2;
    uint32_t *pend = realloc(w->pend, cap * sizeof *pend);
    if (!pend) return -1;
    w->pend = pend;
    uint16_t *pend_d = realloc(w->pend_d, cap * sizeof *pend_d);
    if (!pend_d) return -1;
    w->pend_d = pend_d;
    w->pend_cap = cap;
    return 0;
}

static int ws_push(workspace *w, uint32_t d, uint32_t p) {
    if (w->count == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 256;
        uint16_t *cd = realloc(w->cd, cap * sizeof *cd);
        if (!cd) return -1;
        w->cd = cd;
        uint32_t *cp = realloc(w->cp, cap * sizeof *cp);
        if (!cp) return -1;
        w->cp = cp;
        w->cap = cap;
    }
    w->cd[w->count] = (uint16_t)d;
    w->cp[w->count] = p;
    w->count++;
    w->hist[d]++;
    return 0;
}

static int ws_push_batch(workspace *w, dist_batch_fn dist, const uint8_t *q, const uint8_t *db, size_t nb,
                         size_t np) {
    dist(q, db, nb, w->pend, np, w->pend_d);
    for (size_t i = 0; i < np; i++)
        if (ws_push(w, w->pend_d[i], w->pend[i]) < 0) return -1;
    return 0;
}

static void ws_reset(workspace *w, size_t n_tab, size_t bits) {
    for (size_t i = 0; i < w->count; i++)
        if (w->cp[i] < n_tab) w->seen[w->cp[i] >> 6] &= ~((uint64_t)1 << (w->cp[i] & 63));
    w->count = 0;
    memset(w->hist, 0, (bits + 1) * sizeof *w->hist);
}

static int cmp_u64(const void *a, const void *b) {
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The candidates at distance <= limit, their ranks turned into positions, sorted by
 * (distance, position) into w->keys. Only these few read perm, so the search itself never
 * needs positions. */
static int ws_sorted(workspace *w, const cmh_mih_tables *t, uint32_t limit, size_t *out_len) {
    if (w->count > w->keys_cap) {
        uint64_t *keys = realloc(w->keys, w->count * sizeof *keys);
        if (!keys) return -1;
        w->keys = keys;
        w->keys_cap = w->count;
    }
    size_t len = 0;
    for (size_t i = 0; i < w->count; i++) {
        if (w->cd[i] > limit) continue;
        uint32_t p = w->cp[i];
        if (p < t->n_tab) {
            p = (uint32_t)t->perm[p];
            if (p >= t->n_tab) continue; /* damaged perm */
        }
        w->keys[len++] = (uint64_t)w->cd[i] << 32 | p;
    }
    if (len > 1) qsort(w->keys, len, sizeof *w->keys, cmp_u64); /* keys may still be NULL when len is 0 */
    *out_len = len;
    return 0;
}

/* The smallest distance D with at least k candidates at distance <= D, or UINT32_MAX. */
static uint32_t kth_distance(const uint32_t *hist, size_t bits, size_t k) {
    size_t below = 0;
    for (size_t d = 0; d <= bits; d++) {
        below += hist[d];
        if (below >= k) return (uint32_t)d;
    }
    return UINT32_MAX;
}

/* ------------------------------------------------------------------------------------ */
/* One query: grow the radius until done (kNN: the k-th best is guaranteed; range: the
 * radius reaches radius / m). Returns the path, or -1 when out of memory. */

typedef struct {
    const uint8_t *q, *db;
    size_t nq, n, nb, bits;
    const cmh_mih_tables *t;
    size_t k;          /* kNN: k; 0 for radius search */
    uint32_t radius;   /* radius search */
    size_t max_work;
    dist_batch_fn dist_batch;
    int64_t *stats;
    int32_t *out_d;    /* kNN outputs */
    int64_t *out_i;
    /* radius search: per-thread hit lists and per-query counts */
    uint64_t **hits;
    size_t *hits_len, *counts;
    int failed;
} mih_ctx;

static int query_one(const mih_ctx *c, workspace *w, size_t qi, int64_t *lookups_out, int64_t *cands_out) {
    const cmh_mih_tables *t = c->t;
    const uint8_t *qc = c->q + qi * c->nb;
    const size_t n_tab = t->n_tab, m = t->m;
    const uint8_t *ordered = t->ordered;
    const int knn = c->k > 0;
    const uint32_t keep = knn ? UINT32_MAX : c->radius; /* candidates farther are not kept */
    size_t work = 0, lookups = 0;
    /* Codes the tables do not cover yet: scanned. */
    for (size_t p = n_tab; p < c->n; p++) {
        const uint32_t d = hamming(qc, c->db + p * c->nb, c->nb);
        if (d <= keep && ws_push(w, d, (uint32_t)p) < 0) return -1;
    }
    uint32_t qkey[64];
    uint32_t maxr = 0;
    for (size_t j = 0; j < m; j++) {
        qkey[j] = sub_key(qc, c->nb, t->start[j], t->width[j]);
        if (t->width[j] > maxr) maxr = t->width[j];
    }
    if (!knn) maxr = c->radius / (uint32_t)m;
    int done = 0;
    size_t base[64];
    for (size_t j = 0, b = 0; j < m; j++) {
        base[j] = b;
        b += ((size_t)1 << t->width[j]) + 1;
    }
    for (uint32_t r = 0; r <= maxr && !done; r++) {
        for (size_t j = 0; j < m && !done; j++) {
            const uint32_t width = t->width[j];
            if (r > width) continue;
            const int32_t *off = t->offsets + base[j];
            /* Table 0's buckets are spans of ranks; the others list theirs. */
            const int32_t *rk = j ? t->ranks + (j - 1) * n_tab : NULL;
            const uint32_t limit = 1u << width;
            uint32_t mask = r ? (1u << r) - 1u : 0;
            int more = 1;
            while (more) {
                /* A batch of keys, in stages that each prefetch what the next one reads, so
                 * that the random accesses (offsets, ranks, codes) overlap. */
                uint32_t keys[BATCH];
                int64_t lo[BATCH], hi[BATCH];
                size_t nk = 0;
                while (more && nk < BATCH) {
                    keys[nk++] = qkey[j] ^ mask;
                    if (r == 0) {
                        more = 0;
                    } else { /* next mask with r bits set (Gosper's hack), within the width */
                        const uint32_t low = mask & (0u - mask), ripple = mask + low;
                        mask = (((ripple ^ mask) >> 2) / low) | ripple;
                        more = mask < limit && ripple != 0;
                    }
                }
                for (size_t i = 0; i < nk; i++) __builtin_prefetch(&off[keys[i]]);
                for (size_t i = 0; i < nk; i++) {
                    lo[i] = off[keys[i]] < 0 ? 0 : off[keys[i]];
                    hi[i] = off[keys[i] + 1] > (int64_t)n_tab ? (int64_t)n_tab : off[keys[i] + 1];
                    if (lo[i] < hi[i] && rk) __builtin_prefetch(&rk[lo[i]]);
                }
                for (size_t i = 0; i < nk; i++)
                    for (int64_t s = lo[i]; s < hi[i]; s++) {
                        const uint32_t p = rk ? (uint32_t)rk[s] : (uint32_t)s;
                        if (p < n_tab) __builtin_prefetch(&w->seen[p >> 6]);
                    }
                size_t np = 0;
                for (size_t i = 0; i < nk; i++) {
                    if (hi[i] > lo[i] && ws_reserve(w, np + (size_t)(hi[i] - lo[i])) < 0) return -1;
                    for (int64_t s = lo[i]; s < hi[i]; s++) {
                        const uint32_t p = rk ? (uint32_t)rk[s] : (uint32_t)s;
                        if (p >= n_tab) continue;
                        uint64_t *word = &w->seen[p >> 6];
                        const uint64_t bit = (uint64_t)1 << (p & 63);
                        if (*word & bit) continue;
                        *word |= bit;
                        w->pend[np++] = p;
                        __builtin_prefetch(ordered + (size_t)p * c->nb);
                    }
                }
                /* Every candidate is kept, also beyond a search radius: the list says which
                 * bits of `seen` to clear, and the results filter by distance. */
                if (ws_push_batch(w, c->dist_batch, qc, ordered, c->nb, np) < 0) return -1;
                lookups += nk;
                work += nk + np;
                if (work > c->max_work) {
                    *lookups_out = (int64_t)lookups;
                    *cands_out = (int64_t)w->count;
                    return CMH_MIH_OVER;
                }
            }
            if (r >= width) done = 1; /* every key of table j visited: every code seen */
            if (knn) {
                /* Substrings 0..j are done at radius r, the rest at r - 1. */
                const uint64_t guaranteed = (uint64_t)m * r + j;
                const uint32_t kth = kth_distance(w->hist, c->bits, c->k);
                if (kth != UINT32_MAX && kth <= guaranteed) done = 1;
            }
        }
    }
    *lookups_out = (int64_t)lookups;
    *cands_out = (int64_t)w->count;
    return CMH_MIH_TABLES;
}

static void knn_emit(mih_ctx *c, workspace *w, size_t qi) {
    int32_t *od = c->out_d + qi * c->k;
    int64_t *oi = c->out_i + qi * c->k;
    const uint32_t kth = kth_distance(w->hist, c->bits, c->k);
    size_t len = 0;
    if (ws_sorted(w, c->t, kth == UINT32_MAX ? (uint32_t)c->bits : kth, &len) < 0) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    size_t r = 0;
    for (; r < c->k && r < len; r++) {
        od[r] = (int32_t)(w->keys[r] >> 32);
        oi[r] = (int64_t)(w->keys[r] & 0xFFFFFFFFu);
    }
    for (; r < c->k; r++) {
        od[r] = INT32_MAX;
        oi[r] = -1;
    }
}

static void worker(void *p, size_t tid, size_t nt) {
    mih_ctx *c = (mih_ctx *)p;
    size_t qb, qe;
    cmh_split(c->nq, nt, tid, &qb, &qe);
    workspace w;
    if (ws_init(&w, c->t->n_tab, c->bits) < 0) {
        ws_free(&w);
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    memset(w.hist, 0, (c->bits + 1) * sizeof *w.hist);
    size_t tried = 0;
    uint64_t spent = 0; /* work of the queries tried, a gave-up one counted as two caps */
    for (size_t qi = qb; qi < qe; qi++) {
        int64_t *st = c->stats + qi * 3;
        st[1] = st[2] = 0;
        if (tried >= SKIP_AFTER && spent > (uint64_t)tried * c->max_work) {
            st[0] = CMH_MIH_SKIPPED;
            if (!c->k) c->counts[qi] = 0;
            continue;
        }
        const int path = query_one(c, &w, qi, &st[1], &st[2]);
        if (path < 0) {
            __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
            break;
        }
        st[0] = path;
        tried++;
        spent += path == CMH_MIH_TABLES ? (uint64_t)(st[1] + st[2]) : 2 * (uint64_t)c->max_work;
        if (path == CMH_MIH_TABLES) {
            if (c->k) {
                knn_emit(c, &w, qi);
            } else {
                size_t len = 0;
                if (ws_sorted(&w, c->t, c->radius, &len) < 0) {
                    __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
                    break;
                }
                size_t need = c->hits_len[tid] + len;
                uint64_t *grown = realloc(c->hits[tid], (need ? need : 1) * sizeof *grown);
                if (!grown) {
                    __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
                    break;
                }
                c->hits[tid] = grown;
                if (len) memcpy(grown + c->hits_len[tid], w.keys, len * sizeof *grown);
                c->hits_len[tid] = need;
                c->counts[qi] = len;
            }
        } else if (!c->k) {
            c->counts[qi] = 0;
        }
        ws_reset(&w, c->t->n_tab, c->bits);
    }
    ws_free(&w);
}

static size_t plan_threads(size_t nq, size_t threads) {
    size_t nt = threads < nq ? threads : nq;
    return nt ? nt : 1;
}

int cmh_mih_knn(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes,
                const cmh_mih_tables *t, size_t k, size_t max_work, size_t threads, int32_t *out_d,
                int64_t *out_i, int64_t *stats) {
    if (nq == 0) return 0;
    mih_ctx c = {.q = q, .db = db, .nq = nq, .n = n, .nb = nbytes, .bits = nbytes * 8, .t = t,
                 .k = k, .max_work = max_work, .dist_batch = pick_dist_batch(), .stats = stats, .out_d = out_d, .out_i = out_i};
    cmh_parallel(plan_threads(nq, threads), worker, &c);
    return c.failed ? -1 : 0;
}

struct cmh_mih_range {
    mih_ctx c;
    size_t nt;
};

cmh_mih_range *cmh_mih_range_run(const uint8_t *q, size_t nq, const uint8_t *db, size_t n,
                                 size_t nbytes, const cmh_mih_tables *t, size_t radius,
                                 size_t max_work, size_t threads) {
    cmh_mih_range *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    const size_t bits = nbytes * 8;
    r->nt = plan_threads(nq, threads);
    r->c = (mih_ctx){.q = q, .db = db, .nq = nq, .n = n, .nb = nbytes, .bits = bits, .t = t,
                     .radius = (uint32_t)(radius < bits ? radius : bits), .max_work = max_work,
                     .dist_batch = pick_dist_batch()};
    r->c.stats = calloc(nq * 3 + 1, sizeof *r->c.stats);
    r->c.hits = calloc(r->nt, sizeof *r->c.hits);
    r->c.hits_len = calloc(r->nt, sizeof *r->c.hits_len);
    r->c.counts = calloc(nq + 1, sizeof *r->c.counts);
    if (!r->c.stats || !r->c.hits || !r->c.hits_len || !r->c.counts) {
        cmh_mih_range_free(r);
        return NULL;
    }
    if (nq) cmh_parallel(r->nt, worker, &r->c);
    if (r->c.failed) {
        cmh_mih_range_free(r);
        return NULL;
    }
    return r;
}

size_t cmh_mih_range_total(const cmh_mih_range *r) {
    size_t total = 0;
    for (size_t t = 0; t < r->nt; t++) total += r->c.hits_len[t];
    return total;
}

void cmh_mih_range_fill(cmh_mih_range *r, int64_t *lims, int32_t *out_d, int64_t *out_i,
                        int64_t *stats) {
    const mih_ctx *c = &r->c;
    lims[0] = 0;
    size_t at = 0;
    for (size_t t = 0; t < r->nt; t++) { /* thread t holds the hits of its queries, in order */
        size_t qb, qe, h = 0;
        cmh_split(c->nq, r->nt, t, &qb, &qe);
        for (size_t qi = qb; qi < qe; qi++) {
            for (size_t i = 0; i < c->counts[qi]; i++, h++, at++) {
                out_d[at] = (int32_t)(c->hits[t][h] >> 32);
                out_i[at] = (int64_t)(c->hits[t][h] & 0xFFFFFFFFu);
            }
            lims[qi + 1] = (int64_t)at;
        }
    }
    memcpy(stats, c->stats, c->nq * 3 * sizeof *stats);
}

void cmh_mih_range_free(cmh_mih_range *r) {
    if (!r) return;
    if (r->c.hits)
        for (size_t t = 0; t < r->nt; t++) free(r->c.hits[t]);
    free(r->c.hits);
    free(r->c.hits_len);
    free(r->c.counts);
    free(r->c.stats);
    free(r);
}
