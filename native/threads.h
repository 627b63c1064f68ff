/* A minimal fork-join helper over pthreads. No Python API in here. */
#ifndef CMHASH_THREADS_H
#define CMHASH_THREADS_H

#include <stddef.h>

/* fn(ctx, tid, nthreads) runs once for every tid in [0, nthreads); tid 0 runs on the
 * calling thread. Returns 0, or an errno value when a thread could not be started (the
 * work of threads that did not start is then done on the calling thread, so callers
 * still get complete results). */
typedef void (*cmh_task_fn)(void *ctx, size_t tid, size_t nthreads);
int cmh_parallel(size_t nthreads, cmh_task_fn fn, void *ctx);

/* The number of CPUs this process may run on (at least 1). */
size_t cmh_cpu_count(void);

/* Split [0, total) into nparts near-equal ranges; range `part` is [*begin, *end). */
void cmh_split(size_t total, size_t nparts, size_t part, size_t *begin, size_t *end);

#endif
