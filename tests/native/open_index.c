/* Test driver for the C library's file reader: opens each index file named on the command
 * line, without and with CMHASH_OPEN_VERIFY, and searches the ones that open. Prints one
 * line per file: "open=<status> verify=<status> knn=<status> range=<status>" (-1 where a
 * step did not run). tests/robustness/test_clib_fuzz.py feeds it damaged files, built with
 * the sanitizers, and checks the status codes; any crash or sanitizer report fails it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmhash.h"

/* A kNN and a radius search with two queries (all zeros, all ones) on an open index;
 * reads every code and maps every id found. */
static void search(const cmhash_index *idx, int *knn_rc, int *range_rc) {
    const size_t nbytes = cmhash_index_bits(idx) / 8, k = 3;
    uint8_t *q = malloc(2 * nbytes);
    int32_t dist[2 * 3];
    int64_t ids[2 * 3];
    if (!q) return;
    memset(q, 0, nbytes);
    memset(q + nbytes, 0xFF, nbytes);
    *knn_rc = cmhash_knn(idx, q, 2, k, 2, dist, ids);
    cmhash_range_result *res;
    *range_rc = cmhash_range(idx, q, 2, nbytes * 4, 2, &res);
    if (*range_rc == CMHASH_OK) cmhash_range_result_free(res);
    free(q);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int open_rc, verify_rc, knn_rc = -1, range_rc = -1;
        cmhash_index *idx;
        open_rc = cmhash_index_open(argv[i], 0, &idx);
        if (open_rc == CMHASH_OK) {
            search(idx, &knn_rc, &range_rc);
            cmhash_index_close(idx);
        } else if (idx != NULL || cmhash_last_error()[0] == '\0') {
            printf("a failed open must set *out to NULL and leave a message\n");
            return 1;
        }
        verify_rc = cmhash_index_open(argv[i], CMHASH_OPEN_VERIFY, &idx);
        cmhash_index_close(idx);
        printf("open=%d verify=%d knn=%d range=%d\n", open_rc, verify_rc, knn_rc, range_rc);
    }
    return 0;
}
