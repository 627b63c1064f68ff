/* Checks the native kernels without Python: distances, kNN and radius search
 * (search_core.h), the raw distance kernels and the label-overlap test (kernels.h), at
 * every SIMD level this CPU runs, against naive bit-by-bit references on random codes of
 * many lengths, odd sizes and inputs full of ties.
 *
 * Built and run by tests/test_native_kernels.py for this machine and, under qemu, for
 * ARM64; docs/native.md gives the commands. Exit status 0 when every check passed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "search_core.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static int failures = 0;
static long checks = 0;

static uint64_t next_random(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

#define CHECK(cond, ...)                                                                         \
    do {                                                                                         \
        checks++;                                                                                \
        if (!(cond)) {                                                                           \
            if (failures++ < 20) {                                                               \
                printf("FAIL %s:%d: ", __FILE__, __LINE__);                                      \
                printf(__VA_ARGS__);                                                             \
                printf("\n");                                                                    \
            }                                                                                    \
        }                                                                                        \
    } while (0)

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        printf("out of memory\n");
        exit(2);
    }
    return p;
}

/* n random codes; with `ties` 1, drawn from four distinct codes (long runs of equal
 * distances); with `ties` 2, every third code all zeros and every third all ones (distances
 * of the full code length to an all-zero query). One spare byte in front so that callers
 * can test unaligned starts. */
static uint8_t *random_codes(size_t n, size_t nb, int ties) {
    uint8_t *buf = xmalloc(n * nb + 1), *codes = buf + 1;
    uint8_t pool[4][64];
    for (int p = 0; p < 4; p++)
        for (size_t b = 0; b < sizeof pool[p]; b++) pool[p][b] = (uint8_t)next_random();
    for (size_t i = 0; i < n; i++)
        for (size_t b = 0; b < nb; b++)
            codes[i * nb + b] = ties == 1   ? pool[(i * 7 + i / 5) % 4][b % 64] ^ (uint8_t)(b / 64)
                                : ties == 2 ? (i % 3 == 0 ? 0 : i % 3 == 1 ? 0xFF : (uint8_t)next_random())
                                            : (uint8_t)next_random();
    return codes;
}

static void free_codes(uint8_t *codes) { free(codes - 1); }

static unsigned naive_distance(const uint8_t *a, const uint8_t *b, size_t nb) {
    unsigned d = 0;
    for (size_t i = 0; i < nb; i++)
        for (int bit = 0; bit < 8; bit++) d += ((a[i] ^ b[i]) >> bit) & 1u;
    return d;
}

/* Database positions sorted by (distance, position): the order every result follows. */
typedef struct {
    unsigned d;
    int64_t pos;
} hit;

static int hit_order(const void *x, const void *y) {
    const hit *a = x, *b = y;
    if (a->d != b->d) return a->d < b->d ? -1 : 1;
    return (a->pos > b->pos) - (a->pos < b->pos);
}

static hit *sorted_hits(const uint8_t *query, const uint8_t *db, size_t n, size_t nb) {
    hit *h = xmalloc(n * sizeof *h);
    for (size_t j = 0; j < n; j++) h[j] = (hit){naive_distance(query, db + j * nb, nb), (int64_t)j};
    qsort(h, n, sizeof *h, hit_order);
    return h;
}

static void check_kernel(size_t nb, size_t n) {
    uint8_t *q = random_codes(1, nb, 0), *db = random_codes(n + 1, nb, 0);
    uint16_t *out = xmalloc((n + 1) * sizeof *out);
    cmh_dist_fn kern = cmh_dist_kernel(nb);
    /* from the start of the buffer, and one code in (another alignment for odd lengths) */
    for (size_t start = 0; start <= 1; start++) {
        kern(q, db + start * nb, n, nb, out);
        for (size_t j = 0; j < n; j++)
            CHECK(out[j] == naive_distance(q, db + (start + j) * nb, nb),
                  "kernel nb=%zu n=%zu j=%zu: %u != %u", nb, n, j, out[j],
                  naive_distance(q, db + (start + j) * nb, nb));
    }
    free(out);
    free_codes(q);
    free_codes(db);
}

static void check_search(size_t nb, size_t nq, size_t n, int ties, size_t threads) {
    uint8_t *q = random_codes(nq, nb, ties == 2 ? 2 : 0), *db = random_codes(n, nb, ties);
    hit **ref = xmalloc(nq * sizeof *ref);
    for (size_t i = 0; i < nq; i++) ref[i] = sorted_hits(q + i * nb, db, n, nb);

    int32_t *dist = xmalloc(nq * n * sizeof *dist);
    CHECK(cmh_distances(q, nq, db, n, nb, threads, dist) == 0, "distances: out of memory");
    for (size_t i = 0; i < nq; i++)
        for (size_t j = 0; j < n; j++)
            CHECK((unsigned)dist[i * n + j] == naive_distance(q + i * nb, db + j * nb, nb),
                  "distances nb=%zu i=%zu j=%zu", nb, i, j);
    free(dist);

    const size_t ks[] = {1, 5, 100, n > 0 ? n : 1, n + 3};
    for (size_t kk = 0; kk < sizeof ks / sizeof ks[0]; kk++) {
        const size_t k = ks[kk];
        int32_t *od = xmalloc(nq * k * sizeof *od);
        int64_t *oi = xmalloc(nq * k * sizeof *oi);
        CHECK(cmh_knn(q, nq, db, n, nb, k, threads, od, oi) == 0, "knn: out of memory");
        for (size_t i = 0; i < nq; i++)
            for (size_t r = 0; r < k; r++) {
                const int32_t want_d = r < n ? (int32_t)ref[i][r].d : INT32_MAX;
                const int64_t want_i = r < n ? ref[i][r].pos : -1;
                CHECK(od[i * k + r] == want_d && oi[i * k + r] == want_i,
                      "knn nb=%zu nq=%zu n=%zu k=%zu ties=%d threads=%zu: query %zu rank %zu is "
                      "(%d, %lld), expected (%d, %lld)", nb, nq, n, k, ties, threads, i, r,
                      od[i * k + r], (long long)oi[i * k + r], want_d, (long long)want_i);
            }
        free(od);
        free(oi);
    }

    const size_t radii[] = {0, nb * 3, nb * 4, nb * 8, nb * 8 + 5};
    for (size_t rr = 0; rr < sizeof radii / sizeof radii[0]; rr++) {
        const size_t radius = radii[rr];
        cmh_range *res = cmh_range_run(q, nq, db, n, nb, radius, threads);
        CHECK(res != NULL, "range_search: out of memory");
        if (!res) continue;
        const size_t total = cmh_range_total(res);
        int64_t *lims = xmalloc((nq + 1) * sizeof *lims);
        int32_t *od = xmalloc(total * sizeof *od);
        int64_t *oi = xmalloc(total * sizeof *oi);
        CHECK(cmh_range_fill(res, lims, od, oi) == 0, "range fill: out of memory");
        CHECK(lims[0] == 0 && (size_t)lims[nq] == total, "range lims nb=%zu", nb);
        for (size_t i = 0; i < nq; i++) {
            size_t want = 0;
            while (want < n && ref[i][want].d <= radius) want++;
            CHECK((size_t)(lims[i + 1] - lims[i]) == want, "range nb=%zu r=%zu query %zu: %lld hits, expected %zu",
                  nb, radius, i, (long long)(lims[i + 1] - lims[i]), want);
            for (size_t h = 0; h < want && (int64_t)h < lims[i + 1] - lims[i]; h++)
                CHECK((unsigned)od[lims[i] + h] == ref[i][h].d && oi[lims[i] + h] == ref[i][h].pos,
                      "range nb=%zu r=%zu query %zu hit %zu", nb, radius, i, h);
        }
        free(lims);
        free(od);
        free(oi);
        cmh_range_free(res);
    }
    for (size_t i = 0; i < nq; i++) free(ref[i]);
    free(ref);
    free_codes(q);
    free_codes(db);
}

/* 256-bit codes whose distances to the (all-zero) queries are 255 and 256: byte sums
 * saturate there, so the threshold tests of the planar kernels must stay exact. The codes
 * at 255 come last, after the threshold has settled at 256, in a full step of 64 codes
 * (padding codes would pass the test anyway). */
static void check_far_codes(void) {
    const size_t nb = 32, nq = 20, n = 320, k = 100, near = 300;
    uint8_t *q = xmalloc(nq * nb), *db = xmalloc(n * nb);
    memset(q, 0, nq * nb);
    memset(db, 0xFF, n * nb);
    for (size_t j = near; j < n; j++) db[j * nb + j % nb] = 0x7F; /* one bit clear: 255 */
    int32_t *od = xmalloc(nq * k * sizeof *od);
    int64_t *oi = xmalloc(nq * k * sizeof *oi);
    CHECK(cmh_knn(q, nq, db, n, nb, k, 1, od, oi) == 0, "far codes: out of memory");
    for (size_t i = 0; i < nq; i++)
        for (size_t r = 0; r < k; r++) {
            const int32_t want_d = r < n - near ? 255 : 256;
            const int64_t want_i = r < n - near ? (int64_t)(near + r) : (int64_t)(r - (n - near));
            CHECK(od[i * k + r] == want_d && oi[i * k + r] == want_i,
                  "far codes: query %zu rank %zu is (%d, %lld), expected (%d, %lld)", i, r, od[i * k + r],
                  (long long)oi[i * k + r], want_d, (long long)want_i);
        }
    free(q);
    free(db);
    free(od);
    free(oi);
}

static void check_any_common(size_t nb, size_t n) {
    uint8_t *a = random_codes(1, nb, 0), *db = random_codes(n, nb, 0), *out = xmalloc(n);
    for (size_t j = 0; j < n; j++) /* sparse rows, so that both answers occur */
        for (size_t b = 0; b < nb; b++) db[j * nb + b] &= (uint8_t)(next_random() & next_random() & next_random());
    cmh_any_common(a, db, n, nb, out);
    for (size_t j = 0; j < n; j++) {
        int want = 0;
        for (size_t b = 0; b < nb; b++) want |= (a[b] & db[j * nb + b]) != 0;
        CHECK(out[j] == want, "any_common nb=%zu j=%zu", nb, j);
    }
    free(out);
    free_codes(a);
    free_codes(db);
}

/* Codes per database block in search_core.c (16 KiB, 128 to 8192 codes). */
static size_t block_codes(size_t nb) {
    const size_t b = 16384 / nb;
    return b < 128 ? 128 : b > 8192 ? 8192 : b;
}

int main(void) {
    /* 8 to 1024 bits and odd byte counts around the kernels' fixed widths */
    const size_t lengths[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 48, 63, 64, 65, 96, 100, 128};
    const size_t sizes[] = {0, 1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 1000};
    const size_t nlengths = sizeof lengths / sizeof lengths[0], nsizes = sizeof sizes / sizeof sizes[0];
    int levels_run = 0;
    for (int level = 0; level < CMH_SIMD_COUNT; level++) {
        if (!cmh_simd_supported(level)) continue;
        cmh_simd_set(level);
        const int before = failures;
        const long checks_before = checks;
        for (size_t l = 0; l < nlengths; l++) {
            const size_t nb = lengths[l];
            for (size_t s = 0; s < nsizes; s++) check_kernel(nb, sizes[s]);
            for (int ties = 0; ties <= 1; ties++) {
                check_search(nb, 3, 37, ties, 2);
                /* several blocks of the database (16 KiB each) and many list compactions */
                check_search(nb, 3, 2 * block_codes(nb) + 123, ties, 1 + (size_t)ties * 2);
            }
            check_any_common(nb, 300);
        }
        /* fewer queries than threads: the database is split over the threads */
        const size_t split_lengths[] = {1, 8, 32};
        for (size_t l = 0; l < 3; l++)
            for (int ties = 0; ties <= 1; ties++) check_search(split_lengths[l], 1, 40000, ties, 3);
        /* many queries per thread (the planar kernels at avx2, 8 to 32 bytes), over several
         * of their blocks, with ties and with codes at the full distance from the query */
        const size_t planar_lengths[] = {4, 8, 16, 24, 32, 40};
        for (size_t l = 0; l < 6; l++)
            for (int ties = 0; ties <= 2; ties++) check_search(planar_lengths[l], 40, 2 * 1024 + 77, ties, 2);
        check_far_codes();
        check_kernel(CMH_MAX_BYTES, 40); /* the longest codes: distances up to 65,528 */
        check_search(CMH_MAX_BYTES, 2, 20, 1, 2);
        check_search(8, 0, 50, 0, 2); /* no queries */
        check_search(8, 5, 0, 0, 2);  /* empty database */
        printf("%-8s %ld checks, %d failed\n", cmh_simd_name(level), checks - checks_before,
               failures - before);
        levels_run++;
    }
    printf("%s: %d SIMD levels, %ld checks, %d failed\n", failures ? "FAILED" : "OK", levels_run, checks,
           failures);
    return failures ? 1 : 0;
}
