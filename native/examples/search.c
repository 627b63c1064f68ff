/* cmhash-search: search an index file written by cmhash.HashIndex.save, without Python.
 *
 *   cmhash-search [-t THREADS] [-v] INDEX QUERIES K          the K nearest codes
 *   cmhash-search [-t THREADS] [-v] -r RADIUS INDEX QUERIES  every code within RADIUS
 *
 * QUERIES is a file of packed query codes back to back, bits/8 bytes each (what
 * numpy's `codes.tobytes()` writes for a uint8 array of shape (nq, bits/8)). Prints one
 * line per result, "query rank id distance", nearest first (rows a small index cannot fill
 * are left out). -v verifies the payload checksum and the ids at open; -t sets the worker
 * threads (default: all CPUs).
 *
 * Exit status: 0, the cmhash_status code of a failed call (message on stderr), or 64 for
 * a usage error. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmhash.h"

#define EXIT_USAGE 64

static int usage(const char *why) {
    fprintf(stderr,
            "cmhash-search: %s\n"
            "usage: cmhash-search [-t THREADS] [-v] INDEX QUERIES K\n"
            "       cmhash-search [-t THREADS] [-v] -r RADIUS INDEX QUERIES\n",
            why);
    return EXIT_USAGE;
}

/* A non-negative decimal number, or -1. */
static long long parse_count(const char *s) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    return (errno || end == s || *end || v < 0) ? -1 : v;
}

/* Reads the whole query file; NULL (message printed) on failure. */
static uint8_t *read_queries(const char *path, size_t nbytes, size_t *nq) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cmhash-search: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    while (buf) {
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap) break;
        uint8_t *grown = realloc(buf, cap * 2);
        if (!grown) free(buf);
        buf = grown;
        cap *= 2;
    }
    const int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        fprintf(stderr, "cmhash-search: %s: %s\n", path, buf ? "read error" : "out of memory");
        free(buf);
        return NULL;
    }
    if (len % nbytes != 0) {
        fprintf(stderr, "cmhash-search: %s: %zu bytes is not a whole number of %zu-byte codes\n", path, len,
                nbytes);
        free(buf);
        return NULL;
    }
    *nq = len / nbytes;
    return buf;
}

static int report(int status) {
    fprintf(stderr, "cmhash-search: %s: %s\n", cmhash_strerror(status), cmhash_last_error());
    return status;
}

static int print_knn(const cmhash_index *idx, const uint8_t *queries, size_t nq, size_t k, size_t threads) {
    if (nq > 0 && k > SIZE_MAX / 8 / nq) {
        fprintf(stderr, "cmhash-search: %zu queries x K=%zu results do not fit in memory\n", nq, k);
        return CMHASH_ERR_NO_MEMORY;
    }
    const size_t cells = nq > 0 ? nq * k : 1;
    int32_t *dist = malloc(cells * sizeof *dist);
    int64_t *ids = malloc(cells * sizeof *ids);
    int rc = (!dist || !ids) ? CMHASH_ERR_NO_MEMORY : cmhash_knn(idx, queries, nq, k, threads, dist, ids);
    for (size_t i = 0; rc == CMHASH_OK && i < nq; i++)
        for (size_t r = 0; r < k && ids[i * k + r] >= 0; r++)
            printf("%zu %zu %" PRId64 " %" PRId32 "\n", i, r, ids[i * k + r], dist[i * k + r]);
    free(dist);
    free(ids);
    return rc == CMHASH_OK ? rc : report(rc);
}

static int print_range(const cmhash_index *idx, const uint8_t *queries, size_t nq, size_t radius,
                       size_t threads) {
    cmhash_range_result *res;
    int rc = cmhash_range(idx, queries, nq, radius, threads, &res);
    if (rc != CMHASH_OK) return report(rc);
    for (size_t i = 0; i < nq; i++)
        for (int64_t j = res->lims[i]; j < res->lims[i + 1]; j++)
            printf("%zu %" PRId64 " %" PRId64 " %" PRId32 "\n", i, j - res->lims[i], res->ids[j],
                   res->distances[j]);
    cmhash_range_result_free(res);
    return CMHASH_OK;
}

int main(int argc, char **argv) {
    long long threads = 0, radius = -1, k = 0;
    unsigned flags = 0;
    int opt;
    while ((opt = getopt(argc, argv, "t:vr:")) != -1) {
        if (opt == 't' && (threads = parse_count(optarg)) < 0) return usage("-t needs a number >= 0");
        if (opt == 'r' && (radius = parse_count(optarg)) < 0) return usage("-r needs a number >= 0");
        if (opt == 'v') flags |= CMHASH_OPEN_VERIFY;
        if (opt == '?') return usage("unknown option");
    }
    if (argc - optind != (radius < 0 ? 3 : 2)) return usage("wrong number of arguments");
    if (radius < 0 && (k = parse_count(argv[optind + 2])) < 1) return usage("K must be a number >= 1");

    cmhash_index *idx;
    int rc = cmhash_index_open(argv[optind], flags, &idx);
    if (rc != CMHASH_OK) return report(rc);
    size_t nq;
    uint8_t *queries = read_queries(argv[optind + 1], cmhash_index_bits(idx) / 8, &nq);
    if (!queries)
        rc = CMHASH_ERR_IO;
    else if (radius < 0)
        rc = print_knn(idx, queries, nq, (size_t)k, (size_t)threads);
    else
        rc = print_range(idx, queries, nq, (size_t)radius, (size_t)threads);
    free(queries);
    cmhash_index_close(idx);
    return rc;
}
