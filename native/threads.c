#define _GNU_SOURCE
#include "threads.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct {
    cmh_task_fn fn;
    void *ctx;
    size_t tid, nthreads;
} task_arg;

static void *task_main(void *p) {
    task_arg *a = (task_arg *)p;
    a->fn(a->ctx, a->tid, a->nthreads);
    return NULL;
}

int cmh_parallel(size_t nthreads, cmh_task_fn fn, void *ctx) {
    if (nthreads <= 1) {
        fn(ctx, 0, 1);
        return 0;
    }
    pthread_t *ids = calloc(nthreads, sizeof(pthread_t));
    task_arg *args = calloc(nthreads, sizeof(task_arg));
    unsigned char *started = calloc(nthreads, 1);
    if (!ids || !args || !started) {
        free(ids);
        free(args);
        free(started);
        /* No memory for bookkeeping: do every part here, in order. */
        for (size_t t = 0; t < nthreads; t++) fn(ctx, t, nthreads);
        return 0;
    }
    int err = 0;
    for (size_t t = 1; t < nthreads; t++) {
        args[t] = (task_arg){fn, ctx, t, nthreads};
        int rc = pthread_create(&ids[t], NULL, task_main, &args[t]);
        if (rc == 0)
            started[t] = 1;
        else
            err = rc;
    }
    fn(ctx, 0, nthreads);
    for (size_t t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            fn(ctx, t, nthreads);
    }
    free(ids);
    free(args);
    free(started);
    return err;
}

size_t cmh_cpu_count(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int c = CPU_COUNT(&set);
        if (c > 0) return (size_t)c;
    }
#endif
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c > 0 ? (size_t)c : 1;
}

void cmh_split(size_t total, size_t nparts, size_t part, size_t *begin, size_t *end) {
    size_t base = total / nparts, extra = total % nparts;
    *begin = part * base + (part < extra ? part : extra);
    *end = *begin + base + (part < extra ? 1 : 0);
}
