/* Multi-index hashing: exact k-nearest-neighbour and radius search in Hamming space through
 * hash tables on substrings of the codes. No Python API in here.
 *
 * A code of `nbytes` bytes is split into m substrings, substring j being the `width[j]`
 * bits (1..CMH_MIH_MAX_WIDTH) from bit `start[j]` (bit i is bit i % 8 of byte i / 8). The
 * tables cover database positions [0, n_tab); positions [n_tab, n) (codes added since the
 * tables were built) are scanned.
 *
 * Layout: the covered codes are numbered by *rank*, their order in table 0 (by substring-0
 * key, then position). perm[rank] is the code's position and ordered[rank] a copy of the
 * code, so codes that share a key sit together in memory: a bucket's candidates are read
 * from a few cache lines rather than from one random line each. Table j's bucket `key`
 * spans [offsets[base[j] + key], offsets[base[j] + key + 1]), with base[j] = sum over i < j
 * of (2^width[i] + 1): for table 0 the span is the ranks themselves; for j >= 1 it indexes
 * ranks[(j - 1) * n_tab ...], listed in increasing order within a bucket.
 *
 * Search never reads outside the arrays whatever their contents: bucket bounds, ranks and
 * perm entries are clamped to the table, so damaged tables give wrong answers, never a crash. */
#ifndef CMHASH_MIH_CORE_H
#define CMHASH_MIH_CORE_H

#include <stddef.h>
#include <stdint.h>

#define CMH_MIH_MAX_WIDTH 24

typedef struct {
    size_t m;
    const uint32_t *start, *width;
    const int32_t *offsets; /* sum_j (2^width[j] + 1) */
    const int32_t *perm;    /* n_tab: rank -> position */
    const int32_t *ranks;   /* (m - 1) * n_tab: tables 1..m-1 */
    const uint8_t *ordered; /* n_tab * nbytes: the code of each rank */
    size_t n_tab;
} cmh_mih_tables;

/* Number of offsets entries of the tables (sum of 2^width + 1). */
size_t cmh_mih_offsets_len(size_t m, const uint32_t *width);

/* Build the tables of db[0..n) (counting sorts) into offsets, perm, ranks and ordered.
 * Returns 0, or -1 out of memory. */
int cmh_mih_build(const uint8_t *db, size_t n, size_t nbytes, size_t m, const uint32_t *start,
                  const uint32_t *width, int32_t *offsets, int32_t *perm, int32_t *ranks, uint8_t *ordered);

/* Per-query report: path (CMH_MIH_TABLES: answered by the tables; CMH_MIH_OVER: gave up when
 * its work passed max_work; CMH_MIH_SKIPPED: not tried because earlier queries of the same
 * thread mostly gave up), table lookups and candidates examined. */
enum { CMH_MIH_TABLES = 0, CMH_MIH_OVER = 1, CMH_MIH_SKIPPED = 2 };

/* k nearest (1 <= k): rows of out_d / out_i (nq x k) sorted by distance, then position,
 * padded with INT32_MAX / -1. Rows of queries that gave up are left for the caller to fill
 * (with a scan). stats: nq x 3 int64 (path, lookups, candidates). 0, or -1 out of memory. */
int cmh_mih_knn(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes,
                const cmh_mih_tables *t, size_t k, size_t max_work, size_t threads, int32_t *out_d,
                int64_t *out_i, int64_t *stats);

/* Radius search (distance <= radius). cmh_mih_range_run returns NULL when out of memory;
 * cmh_mih_range_total gives the number of hits, cmh_mih_range_fill writes lims (nq + 1),
 * distances and positions (each query's hits sorted by distance, then position; none for
 * a query that gave up) and the stats as for kNN. */
typedef struct cmh_mih_range cmh_mih_range;
cmh_mih_range *cmh_mih_range_run(const uint8_t *q, size_t nq, const uint8_t *db, size_t n,
                                 size_t nbytes, const cmh_mih_tables *t, size_t radius,
                                 size_t max_work, size_t threads);
size_t cmh_mih_range_total(const cmh_mih_range *r);
void cmh_mih_range_fill(cmh_mih_range *r, int64_t *lims, int32_t *out_d, int64_t *out_i,
                        int64_t *stats);
void cmh_mih_range_free(cmh_mih_range *r);

#endif
