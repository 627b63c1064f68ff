/* Hamming distance kernels and their run-time selection. No Python API in here.
 *
 * A code is `nbytes` bytes; a database is `n` codes stored back to back (row-major,
 * no padding). Every kernel computes out[j] = popcount(q XOR db[j]) for j < n.
 * Distances fit in uint16 because codes are limited to CMH_MAX_BYTES bytes.
 */
#ifndef CMHASH_KERNELS_H
#define CMHASH_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define CMH_MAX_BYTES 8191 /* 65,528 bits: every distance fits in uint16 */

/* Levels 1-3 are x86-64 only and 4 is ARM64 only; a CPU supports a subset, listed from
 * slowest to fastest by increasing number. */
enum cmh_simd_level {
    CMH_SIMD_GENERIC = 0, /* portable C, no special instructions */
    CMH_SIMD_POPCNT = 1,  /* scalar POPCNT instruction */
    CMH_SIMD_AVX2 = 2,    /* AVX2 nibble-lookup popcount (64-bit and 256+-bit codes; planar kernels for
                           * many queries, see below), POPCNT otherwise */
    CMH_SIMD_AVX512 = 3,  /* AVX-512 VPOPCNTDQ + BW */
    CMH_SIMD_NEON = 4,    /* ARM64 Advanced SIMD: vcnt byte counts summed by pairwise adds */
    CMH_SIMD_COUNT = 5
};

typedef void (*cmh_dist_fn)(const uint8_t *q, const uint8_t *db, size_t n, size_t nbytes,
                            uint16_t *out);

const char *cmh_simd_name(int level);
int cmh_simd_supported(int level);   /* 1 when this CPU (and OS) can run that level */
int cmh_simd_best(void);             /* highest supported level */
int cmh_simd_current(void);          /* the level kernels are chosen for now */
int cmh_simd_set(int level);         /* 0 on success, -1 when unsupported */
int cmh_simd_level_named(const char *name); /* the level of that name, or -1 */
/* Pins the level named by the environment variable CMHASH_SIMD when it is set and not empty:
 * 0 when unset or pinned, -1 when it names no level this CPU can run. */
int cmh_simd_from_env(void);

/* The distance kernel for this code length at the current level. */
cmh_dist_fn cmh_dist_kernel(size_t nbytes);

/* Planar kernels, for many queries against one database block: `pack` rewrites n codes
 * (zero codes pad them to a multiple of CMH_PLANAR_GROUP) into cmh_planar_bytes(n, nbytes)
 * bytes; `table` turns a query into 64 * nbytes bytes; `dist` compares that query with the
 * packed codes in steps of CMH_PLANAR_GROUP: a step where every distance is >= limit may be
 * skipped, any other writes the exact distances of its codes (padding included) to
 * out[s * CMH_PLANAR_GROUP ...] and its number s to steps[]; it returns how many steps it
 * listed. cmh_planar_kernels fills `out` and returns 1 when the current level has them
 * for this code length (AVX2, 8 to 32 bytes in steps of 8), else returns 0. */
#define CMH_PLANAR_GROUP 64
typedef struct {
    void (*pack)(const uint8_t *db, size_t n, size_t nbytes, uint8_t *out);
    void (*table)(const uint8_t *q, size_t nbytes, uint8_t *out);
    size_t (*dist)(const uint8_t *tables, const uint8_t *packed, size_t n, size_t nbytes, uint32_t limit,
                   uint16_t *out, uint32_t *steps);
} cmh_planar;
int cmh_planar_kernels(size_t nbytes, cmh_planar *out);
static inline size_t cmh_planar_bytes(size_t n, size_t nbytes) {
    return (n + CMH_PLANAR_GROUP - 1) / CMH_PLANAR_GROUP * CMH_PLANAR_GROUP * 2 * nbytes;
}

/* out[j] = 1 when a AND db[j] has a set bit (two label sets share a label), else 0; fast
 * paths for the label widths Python pads to (1, 2, 4, 8 bytes). */
void cmh_any_common(const uint8_t *a, const uint8_t *db, size_t n, size_t nbytes, uint8_t *out);

#endif
