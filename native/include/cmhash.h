/* cmhash C library: exact Hamming search over a .cmhidx index file written by
 * cmhash.HashIndex.save, without Python.
 *
 * Build with `make -C native` (libcmhash.a, libcmhash.so and the example cmhash-search);
 * link with -lcmhash -pthread. Plain C11 and pthreads.
 *
 * Errors: every function that can fail returns a cmhash_status (CMHASH_OK = 0).
 * cmhash_strerror(code) names the code; cmhash_last_error() gives the detailed message of
 * the last call that failed on the calling thread (which file, which field, what to do).
 * Outputs are left unspecified when a call fails.
 *
 * Threads: an open index is read-only; any number of threads may search it at once.
 * `threads` arguments give the worker threads of one call; 0 means all CPUs of the process.
 *
 * SIMD: the distance kernels are chosen at run time from the CPU (AVX-512, AVX2, POPCNT or
 * portable C on x86-64; NEON on ARM64). The environment variable CMHASH_SIMD pins a level
 * (generic, popcnt, avx2, avx512, neon), as for the Python package; a level the CPU cannot
 * run makes every call fail with CMHASH_ERR_SIMD rather than fall back silently.
 */
#ifndef CMHASH_H
#define CMHASH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CMHASH_API __attribute__((visibility("default")))
#else
#define CMHASH_API
#endif

typedef enum cmhash_status {
    CMHASH_OK = 0,
    CMHASH_ERR_ARGUMENT = 1,         /* a NULL pointer, k < 1, a code length out of range ... */
    CMHASH_ERR_NO_MEMORY = 2,        /* the result or the work space did not fit in memory */
    CMHASH_ERR_IO = 3,               /* the file could not be opened, read or mapped */
    CMHASH_ERR_NOT_INDEX = 4,        /* the file does not start with the index magic */
    CMHASH_ERR_VERSION = 5,          /* a format major version this library does not read */
    CMHASH_ERR_TRUNCATED = 6,        /* the file is shorter than its header says */
    CMHASH_ERR_HEADER_CHECKSUM = 7,  /* the header's CRC-32 does not match */
    CMHASH_ERR_HEADER = 8,           /* impossible header values (flags, bits, offset, lengths) */
    CMHASH_ERR_PAYLOAD_CHECKSUM = 9, /* CMHASH_OPEN_VERIFY: the codes or ids are corrupted */
    CMHASH_ERR_IDS = 10,             /* CMHASH_OPEN_VERIFY: negative or duplicate ids */
    CMHASH_ERR_SIMD = 11             /* CMHASH_SIMD names a level this CPU cannot run */
} cmhash_status;

/* A short fixed description of a status code ("file truncated"); never NULL. */
CMHASH_API const char *cmhash_strerror(int status);

/* The detailed message of the last failed call on this thread ("" when none failed). The
 * text stays valid until the next failing call on the same thread. */
CMHASH_API const char *cmhash_last_error(void);

/* The SIMD level the kernels run at ("avx512", "neon" ...). */
CMHASH_API const char *cmhash_simd_level(void);

/* ------------------------------------------------------------------------------------ */
/* Index files */

typedef struct cmhash_index cmhash_index;

enum cmhash_open_flags {
    /* Also check what HashIndex.load checks on the data: the payload CRC-32 (reads the whole
     * file once) and that ids are non-negative and unique. Without it only the header is
     * read at open, and pages are read as searches touch them. */
    CMHASH_OPEN_VERIFY = 1
};

/* Open an index file (format 1.x) read-only and memory-mapped. Checks the magic, the major
 * version, the header CRC-32, flags, bits, payload offset, payload length and the file size
 * (sections a 1.1 file holds after the ids are ignored). *out is NULL on failure. */
CMHASH_API int cmhash_index_open(const char *path, unsigned flags, cmhash_index **out);

/* Unmap and free; NULL is ignored. No search may be running on the index. */
CMHASH_API void cmhash_index_close(cmhash_index *idx);

CMHASH_API uint32_t cmhash_index_bits(const cmhash_index *idx);    /* bits per code */
CMHASH_API uint64_t cmhash_index_count(const cmhash_index *idx);   /* number of codes */
CMHASH_API uint32_t cmhash_index_version(const cmhash_index *idx); /* major * 100 + minor */

/* ------------------------------------------------------------------------------------ */
/* Search. Queries are nq packed codes of bits/8 bytes each, back to back, as
 * cmhash.pack_codes writes them (bit i is bit i % 8 of byte i / 8, docs/formats.md). */

/* The k nearest codes of each query: rows of k (distance, id) in out_dist (int32, nq * k)
 * and out_ids (int64, nq * k), sorted by distance, then by position in the file, as
 * HashIndex.search. When k > count a row ends with distance INT32_MAX and id -1. */
CMHASH_API int cmhash_knn(const cmhash_index *idx, const uint8_t *queries, size_t nq, size_t k,
                          size_t threads, int32_t *out_dist, int64_t *out_ids);

/* Radius search results in CSR form: query i's hits are entries lims[i] .. lims[i+1]-1
 * of distances and ids (sorted by distance, then position). Free with
 * cmhash_range_result_free. */
typedef struct cmhash_range_result {
    size_t nq;
    size_t total;       /* = lims[nq] */
    int64_t *lims;      /* nq + 1 offsets */
    int32_t *distances; /* total */
    int64_t *ids;       /* total */
} cmhash_range_result;

/* Every code within Hamming distance `radius` (inclusive) of each query. */
CMHASH_API int cmhash_range(const cmhash_index *idx, const uint8_t *queries, size_t nq,
                            size_t radius, size_t threads, cmhash_range_result **out);
CMHASH_API void cmhash_range_result_free(cmhash_range_result *result);

/* The distance matrix of plain arrays: out[i * n + j] = Hamming distance of query i to
 * db code j, codes of nbytes bytes (1 .. 8191). Meant for small inputs (nq * n ints). */
CMHASH_API int cmhash_distances(const uint8_t *queries, size_t nq, const uint8_t *db, size_t n,
                                size_t nbytes, size_t threads, int32_t *out);

#ifdef __cplusplus
}
#endif

#endif
