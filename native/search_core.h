/* Exact search over packed binary codes by Hamming distance. No Python API in here.
 *
 * Codes are `nbytes` bytes (1..CMH_MAX_BYTES), stored back to back: queries q (nq codes)
 * and database db (n codes). `threads` is the number of threads to use (at least 1). The
 * kernels of the current SIMD level (kernels.h) are used. Functions return 0, or -1 when
 * memory ran out (outputs are then undefined). */
#ifndef CMHASH_SEARCH_CORE_H
#define CMHASH_SEARCH_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

/* out[i * n + j] = distance of query i to database code j. */
int cmh_distances(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes,
                  size_t threads, int32_t *out);

/* The k nearest codes of each query: rows of k (distance, position) pairs in out_d and
 * out_i, sorted by distance, then position. When k > n a row ends with distance INT32_MAX
 * and position -1. k >= 1. */
int cmh_knn(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes, size_t k,
            size_t threads, int32_t *out_d, int64_t *out_i);

/* Radius search, inclusive (distance <= radius), in two steps so that the caller can
 * allocate the outputs: cmh_range_run finds the hits (NULL when out of memory), then
 * cmh_range_fill writes lims (nq + 1 CSR offsets) and the cmh_range_total hits, each
 * query's sorted by distance, then position. cmh_range_free releases the result. */
typedef struct cmh_range cmh_range;
cmh_range *cmh_range_run(const uint8_t *q, size_t nq, const uint8_t *db, size_t n, size_t nbytes,
                         size_t radius, size_t threads);
size_t cmh_range_total(const cmh_range *r);
int cmh_range_fill(cmh_range *r, int64_t *lims, int32_t *out_d, int64_t *out_i);
void cmh_range_free(cmh_range *r);

#endif
