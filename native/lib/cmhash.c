/* The cmhash C library (include/cmhash.h): index files opened by mmap, checked field by
 * field, and searched with the same kernels as the Python extension (kernels.c,
 * search_core.c, threads.c). No Python API in here.
 *
 * File format 1.x, integers little-endian (sdk/cmhash/index.py writes it):
 *   0  magic "CMHIDX\0\1"   8 u16 major (1)   10 u16 minor   12 u32 flags (0)
 *   16 u32 bits             20 u32 payload offset (64)        24 u64 count
 *   32 u64 next id          40 u64 payload length             48 u32 payload CRC-32
 *   52 u32 index kind (1.1; zero in 1.0)   56 u32 reserved    60 u32 CRC-32 of bytes 0..59
 *   64 codes (count * bits/8), zero padding to a multiple of 64, ids (count * int64)
 * Sections a 1.1 file holds after the ids are not read: codes and ids are scanned whatever
 * the index kind. */
#define _POSIX_C_SOURCE 200809L
#include "cmhash.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels.h"
#include "search_core.h"
#include "threads.h"

#define HEADER_SIZE 64
#define ALIGN 64
#define MAX_THREADS 1024 /* as the Python extension: more only costs memory */

static const unsigned char MAGIC[8] = {'C', 'M', 'H', 'I', 'D', 'X', 0, 1};

struct cmhash_index {
    const uint8_t *map; /* header + payload, read-only */
    size_t map_len;
    const uint8_t *codes;
    const uint8_t *ids; /* count little-endian int64, 64-byte aligned */
    size_t count, nbytes;
    uint32_t bits, major, minor;
};

/* ------------------------------------------------------------------------------------ */
/* Errors */

static _Thread_local char last_error[768];

static int fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

const char *cmhash_strerror(int status) {
    switch (status) {
    case CMHASH_OK: return "success";
    case CMHASH_ERR_ARGUMENT: return "invalid argument";
    case CMHASH_ERR_NO_MEMORY: return "out of memory";
    case CMHASH_ERR_IO: return "cannot read the file";
    case CMHASH_ERR_NOT_INDEX: return "not a cmhash index file";
    case CMHASH_ERR_VERSION: return "unsupported index format version";
    case CMHASH_ERR_TRUNCATED: return "index file truncated";
    case CMHASH_ERR_HEADER_CHECKSUM: return "index header checksum mismatch";
    case CMHASH_ERR_HEADER: return "bad index header values";
    case CMHASH_ERR_PAYLOAD_CHECKSUM: return "index payload checksum mismatch";
    case CMHASH_ERR_IDS: return "negative or duplicate ids in the index";
    case CMHASH_ERR_SIMD: return "CMHASH_SIMD names a level this CPU cannot run";
    default: return "unknown status code";
    }
}

const char *cmhash_last_error(void) { return last_error; }

/* The system's text for an errno value (strerror is not thread-safe). */
static const char *errno_text(int err, char *buf, size_t len) {
    if (strerror_r(err, buf, len) != 0) snprintf(buf, len, "error %d", err);
    return buf;
}

/* CMHASH_SIMD is applied once, before the first search; a bad value fails every call. */
static pthread_once_t simd_once = PTHREAD_ONCE_INIT;
static int simd_env_status;

static void apply_simd_env(void) { simd_env_status = cmh_simd_from_env(); }

static int check_simd(void) {
    pthread_once(&simd_once, apply_simd_env);
    if (simd_env_status == 0) return CMHASH_OK;
    return fail(CMHASH_ERR_SIMD,
                "CMHASH_SIMD=%s: not a level this CPU can run (choose from generic, popcnt, avx2, "
                "avx512 on x86-64, generic, neon on ARM64); unset it to use the best level",
                getenv("CMHASH_SIMD"));
}

const char *cmhash_simd_level(void) {
    pthread_once(&simd_once, apply_simd_env);
    return cmh_simd_name(cmh_simd_current());
}

/* ------------------------------------------------------------------------------------ */
/* Index files */

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static int64_t id_at(const cmhash_index *idx, size_t pos) { return (int64_t)le64(idx->ids + 8 * pos); }

/* zlib's CRC-32 (reflected polynomial 0xEDB88320), one byte per step. */
static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void make_crc_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int b = 0; b < 8; b++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const uint8_t *p, size_t n) {
    pthread_once(&crc_once, make_crc_table);
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static int cmp_i64(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static const char REDO[] = "re-create it with HashIndex.save";

/* The payload checksum and the ids, as HashIndex.load checks them. */
static int verify_payload(const cmhash_index *idx, const char *path, uint32_t want_crc) {
    const uint32_t crc = crc32_of(idx->map + HEADER_SIZE, idx->map_len - HEADER_SIZE);
    if (crc != want_crc)
        return fail(CMHASH_ERR_PAYLOAD_CHECKSUM,
                    "%s: payload checksum mismatch (file says %#010x, data gives %#010x): the codes "
                    "or ids are corrupted; restore the file from a backup or %s",
                    path, want_crc, crc, REDO);
    if (idx->count == 0) return CMHASH_OK;
    int64_t *sorted = malloc(idx->count * sizeof *sorted);
    if (!sorted) return fail(CMHASH_ERR_NO_MEMORY, "%s: no memory to check %zu ids", path, idx->count);
    for (size_t i = 0; i < idx->count; i++) sorted[i] = id_at(idx, i);
    qsort(sorted, idx->count, sizeof *sorted, cmp_i64);
    int rc = CMHASH_OK;
    if (sorted[0] < 0)
        rc = fail(CMHASH_ERR_IDS, "%s: the file holds negative ids; %s", path, REDO);
    for (size_t i = 1; rc == CMHASH_OK && i < idx->count; i++)
        if (sorted[i] == sorted[i - 1])
            rc = fail(CMHASH_ERR_IDS, "%s: the file holds duplicate ids (%lld); %s", path,
                      (long long)sorted[i], REDO);
    free(sorted);
    return rc;
}

/* Reads up to HEADER_SIZE bytes from the start of the file; the count read, or -1. */
static ssize_t read_head(int fd, uint8_t *head) {
    size_t got = 0;
    while (got < HEADER_SIZE) {
        ssize_t r = pread(fd, head + got, HEADER_SIZE - got, (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/* Checks the header against the file size; on success fills idx (but for the mapping)
 * and *payload_len, *payload_crc. */
static int check_header(const char *path, const uint8_t *head, size_t got, uint64_t size,
                        cmhash_index *idx, uint64_t *payload_len, uint32_t *payload_crc) {
    const size_t magic_seen = got < sizeof MAGIC ? got : sizeof MAGIC;
    if (memcmp(head, MAGIC, magic_seen) != 0)
        return fail(CMHASH_ERR_NOT_INDEX,
                    "%s: not a cmhash index (it does not start with b\"CMHIDX\\x00\\x01\"); give a file "
                    "written by HashIndex.save", path);
    if (got >= 12) {
        const uint32_t major = (uint32_t)head[8] | (uint32_t)head[9] << 8;
        const uint32_t minor = (uint32_t)head[10] | (uint32_t)head[11] << 8;
        if (major != 1)
            return fail(CMHASH_ERR_VERSION,
                        "%s: index format version %u.%u is not supported; this library reads "
                        "versions 1.x; upgrade cmhash or %s", path, major, minor, REDO);
        idx->major = major;
        idx->minor = minor;
    }
    if (got < HEADER_SIZE)
        return fail(CMHASH_ERR_TRUNCATED, "%s: truncated file (%llu bytes, the header alone is %d); %s",
                    path, (unsigned long long)size, HEADER_SIZE, REDO);
    if (crc32_of(head, 60) != le32(head + 60))
        return fail(CMHASH_ERR_HEADER_CHECKSUM, "%s: header checksum mismatch: the header is corrupted; %s",
                    path, REDO);
    const uint32_t flags = le32(head + 12), bits = le32(head + 16), offset = le32(head + 20);
    const uint64_t count = le64(head + 24);
    *payload_len = le64(head + 40);
    *payload_crc = le32(head + 48);
    if (flags != 0)
        return fail(CMHASH_ERR_HEADER, "%s: bad header values: unknown flags %#x; %s", path, flags, REDO);
    if (bits == 0 || bits % 8 != 0 || bits > 8u * CMH_MAX_BYTES)
        return fail(CMHASH_ERR_HEADER,
                    "%s: bad header values: bits=%u is not a positive multiple of 8 up to %d; %s", path,
                    bits, 8 * CMH_MAX_BYTES, REDO);
    if (offset != HEADER_SIZE)
        return fail(CMHASH_ERR_HEADER, "%s: bad header values: payload offset %u (expected %d); %s",
                    path, offset, HEADER_SIZE, REDO);
    /* codes, padding to 64 bytes, ids; any overflow makes the count impossible */
    const uint64_t nbytes = bits / 8;
    uint64_t codes_len, ids_len, expected;
    const int overflow = __builtin_mul_overflow(count, nbytes, &codes_len) ||
                         __builtin_mul_overflow(count, (uint64_t)8, &ids_len) ||
                         __builtin_add_overflow(codes_len, (uint64_t)(-codes_len % ALIGN), &expected) ||
                         __builtin_add_overflow(expected, ids_len, &expected) ||
                         expected > UINT64_MAX - HEADER_SIZE;
    if (overflow || *payload_len != expected)
        return fail(CMHASH_ERR_HEADER,
                    "%s: bad header values: payload length %llu does not match %llu codes of %u bits; %s",
                    path, (unsigned long long)*payload_len, (unsigned long long)count, bits, REDO);
    if (size < HEADER_SIZE + *payload_len)
        return fail(CMHASH_ERR_TRUNCATED,
                    "%s: truncated file: %llu bytes, the header announces %llu (%llu codes of %u bits); %s",
                    path, (unsigned long long)size, (unsigned long long)(HEADER_SIZE + *payload_len),
                    (unsigned long long)count, bits, REDO);
    /* in 1.0 the kind and reserved words were reserved: zero, as HashIndex.load requires */
    if (idx->minor == 0 && (le32(head + 52) != 0 || le32(head + 56) != 0))
        return fail(CMHASH_ERR_HEADER, "%s: bad header values: bytes 52..59 of a format 1.0 file must be zero; %s",
                    path, REDO);
    /* 1.0 files end with the ids; 1.1 files may hold sections after them */
    if (idx->minor == 0 && size > HEADER_SIZE + *payload_len)
        return fail(CMHASH_ERR_HEADER, "%s: %llu unexpected bytes after the payload of a format 1.0 file; %s",
                    path, (unsigned long long)(size - HEADER_SIZE - *payload_len), REDO);
    if (HEADER_SIZE + *payload_len > SIZE_MAX)
        return fail(CMHASH_ERR_NO_MEMORY, "%s: %llu bytes are too many to map on this system", path,
                    (unsigned long long)(HEADER_SIZE + *payload_len));
    idx->bits = bits;
    idx->nbytes = (size_t)nbytes;
    idx->count = (size_t)count;
    idx->map_len = (size_t)(HEADER_SIZE + *payload_len);
    return CMHASH_OK;
}

int cmhash_index_open(const char *path, unsigned flags, cmhash_index **out) {
    if (!out) return fail(CMHASH_ERR_ARGUMENT, "cmhash_index_open: out is NULL");
    *out = NULL;
    if (!path) return fail(CMHASH_ERR_ARGUMENT, "cmhash_index_open: path is NULL");
    if (flags & ~(unsigned)CMHASH_OPEN_VERIFY)
        return fail(CMHASH_ERR_ARGUMENT, "cmhash_index_open: unknown flags %#x (known: CMHASH_OPEN_VERIFY)",
                    flags);
    int rc = check_simd();
    if (rc != CMHASH_OK) return rc;
    char why[128];
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(CMHASH_ERR_IO, "%s: cannot open: %s", path, errno_text(errno, why, sizeof why));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = fail(CMHASH_ERR_IO, "%s: cannot stat: %s", path, errno_text(errno, why, sizeof why));
        goto done_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = fail(CMHASH_ERR_IO, "%s: not a regular file; give the path of a file written by HashIndex.save",
                  path);
        goto done_fd;
    }
    uint8_t head[HEADER_SIZE] = {0};
    const ssize_t got = read_head(fd, head);
    if (got < 0) {
        rc = fail(CMHASH_ERR_IO, "%s: cannot read: %s", path, errno_text(errno, why, sizeof why));
        goto done_fd;
    }
    cmhash_index *idx = calloc(1, sizeof *idx);
    if (!idx) {
        rc = fail(CMHASH_ERR_NO_MEMORY, "cmhash_index_open: out of memory");
        goto done_fd;
    }
    uint64_t payload_len = 0;
    uint32_t payload_crc = 0;
    rc = check_header(path, head, (size_t)got, (uint64_t)st.st_size, idx, &payload_len, &payload_crc);
    if (rc != CMHASH_OK) goto fail_idx;
    void *map = mmap(NULL, idx->map_len, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        rc = fail(CMHASH_ERR_IO, "%s: cannot map %zu bytes: %s", path, idx->map_len, errno_text(errno, why, sizeof why));
        goto fail_idx;
    }
    idx->map = map;
    idx->codes = idx->map + HEADER_SIZE;
    const size_t codes_len = idx->count * idx->nbytes;
    idx->ids = idx->codes + codes_len + (-codes_len % ALIGN);
    if (flags & CMHASH_OPEN_VERIFY) {
        rc = verify_payload(idx, path, payload_crc);
        if (rc != CMHASH_OK) {
            cmhash_index_close(idx);
            goto done_fd;
        }
    }
    *out = idx;
    goto done_fd;
fail_idx:
    free(idx);
done_fd:
    close(fd); /* the mapping stays valid */
    return rc;
}

void cmhash_index_close(cmhash_index *idx) {
    if (!idx) return;
    if (idx->map) munmap((void *)idx->map, idx->map_len);
    free(idx);
}

uint32_t cmhash_index_bits(const cmhash_index *idx) { return idx ? idx->bits : 0; }
uint64_t cmhash_index_count(const cmhash_index *idx) { return idx ? idx->count : 0; }
uint32_t cmhash_index_version(const cmhash_index *idx) { return idx ? idx->major * 100 + idx->minor : 0; }

/* ------------------------------------------------------------------------------------ */
/* Search */

static size_t resolve_threads(size_t threads) {
    if (threads == 0) threads = cmh_cpu_count();
    return threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* Common checks of a search call on an index. */
static int check_search(const char *func, const cmhash_index *idx, const uint8_t *queries, size_t nq) {
    int rc = check_simd();
    if (rc != CMHASH_OK) return rc;
    if (!idx) return fail(CMHASH_ERR_ARGUMENT, "%s: idx is NULL", func);
    if (nq > 0 && !queries) return fail(CMHASH_ERR_ARGUMENT, "%s: queries is NULL", func);
    return CMHASH_OK;
}

int cmhash_knn(const cmhash_index *idx, const uint8_t *queries, size_t nq, size_t k, size_t threads,
               int32_t *out_dist, int64_t *out_ids) {
    int rc = check_search("cmhash_knn", idx, queries, nq);
    if (rc != CMHASH_OK) return rc;
    if (k < 1) return fail(CMHASH_ERR_ARGUMENT, "cmhash_knn: k must be >= 1, got %zu", k);
    size_t cells, bytes;
    if (__builtin_mul_overflow(nq, k, &cells) || __builtin_mul_overflow(cells, (size_t)8, &bytes))
        return fail(CMHASH_ERR_ARGUMENT, "cmhash_knn: %zu queries x k=%zu results do not fit in memory",
                    nq, k);
    if (nq > 0 && (!out_dist || !out_ids))
        return fail(CMHASH_ERR_ARGUMENT, "cmhash_knn: out_dist or out_ids is NULL");
    if (cmh_knn(queries, nq, idx->codes, idx->count, idx->nbytes, k, resolve_threads(threads), out_dist,
                out_ids) < 0)
        return fail(CMHASH_ERR_NO_MEMORY, "cmhash_knn: out of memory (%zu queries, k=%zu)", nq, k);
    for (size_t i = 0; i < cells; i++)
        if (out_ids[i] >= 0) out_ids[i] = id_at(idx, (size_t)out_ids[i]);
    return CMHASH_OK;
}

int cmhash_range(const cmhash_index *idx, const uint8_t *queries, size_t nq, size_t radius,
                 size_t threads, cmhash_range_result **out) {
    if (!out) return fail(CMHASH_ERR_ARGUMENT, "cmhash_range: out is NULL");
    *out = NULL;
    int rc = check_search("cmhash_range", idx, queries, nq);
    if (rc != CMHASH_OK) return rc;
    size_t lims_bytes;
    if (__builtin_add_overflow(nq, (size_t)1, &lims_bytes) ||
        __builtin_mul_overflow(lims_bytes, sizeof(int64_t), &lims_bytes))
        return fail(CMHASH_ERR_ARGUMENT, "cmhash_range: %zu queries do not fit in memory", nq);
    cmh_range *r = cmh_range_run(queries, nq, idx->codes, idx->count, idx->nbytes, radius,
                                 resolve_threads(threads));
    if (!r) return fail(CMHASH_ERR_NO_MEMORY, "cmhash_range: out of memory (%zu queries)", nq);
    const size_t total = cmh_range_total(r);
    cmhash_range_result *res = calloc(1, sizeof *res);
    if (res) {
        res->nq = nq;
        res->total = total;
        res->lims = malloc(lims_bytes);
        /* total <= nq * count codes, each already held in memory by the search */
        res->distances = malloc((total ? total : 1) * sizeof *res->distances);
        res->ids = malloc((total ? total : 1) * sizeof *res->ids);
    }
    if (!res || !res->lims || !res->distances || !res->ids ||
        cmh_range_fill(r, res->lims, res->distances, res->ids) < 0) {
        cmh_range_free(r);
        cmhash_range_result_free(res);
        return fail(CMHASH_ERR_NO_MEMORY, "cmhash_range: out of memory for %zu results", total);
    }
    cmh_range_free(r);
    for (size_t i = 0; i < total; i++) res->ids[i] = id_at(idx, (size_t)res->ids[i]);
    *out = res;
    return CMHASH_OK;
}

void cmhash_range_result_free(cmhash_range_result *result) {
    if (!result) return;
    free(result->lims);
    free(result->distances);
    free(result->ids);
    free(result);
}

int cmhash_distances(const uint8_t *queries, size_t nq, const uint8_t *db, size_t n, size_t nbytes,
                     size_t threads, int32_t *out) {
    int rc = check_simd();
    if (rc != CMHASH_OK) return rc;
    if (nbytes < 1 || nbytes > CMH_MAX_BYTES)
        return fail(CMHASH_ERR_ARGUMENT, "cmhash_distances: nbytes must be 1..%d, got %zu", CMH_MAX_BYTES,
                    nbytes);
    size_t cells, bytes;
    if (__builtin_mul_overflow(nq, n, &cells) || __builtin_mul_overflow(cells, sizeof(int32_t), &bytes))
        return fail(CMHASH_ERR_ARGUMENT, "cmhash_distances: a %zu x %zu matrix does not fit in memory", nq, n);
    if ((nq > 0 && !queries) || (n > 0 && !db) || (cells > 0 && !out))
        return fail(CMHASH_ERR_ARGUMENT, "cmhash_distances: queries, db or out is NULL");
    if (cmh_distances(queries, nq, db, n, nbytes, resolve_threads(threads), out) < 0)
        return fail(CMHASH_ERR_NO_MEMORY, "cmhash_distances: out of memory");
    return CMHASH_OK;
}
