#define _GNU_SOURCE
#include "alloc_count.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define VIGIL_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define VIGIL_SANITIZED 1
#endif

#ifdef VIGIL_SANITIZED
/* Sanitizers own the allocator: no interposition, no counts. */
uint64_t alloc_count(void) { return 0; }
int alloc_count_enabled(void) { return 0; }
#else
int alloc_count_enabled(void) { return 1; }
#include <dlfcn.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

static _Atomic uint64_t count;
static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void (*real_free)(void *);

/* dlsym may allocate before the real functions are known: serve that from a small arena. */
static char bootstrap[4096];
static size_t bootstrap_used;

static void *bootstrap_alloc(size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (bootstrap_used + n > sizeof bootstrap) return NULL;
    void *p = bootstrap + bootstrap_used;
    bootstrap_used += n;
    return p;
}

static int resolving;

static void resolve(void) {
    if (real_malloc || resolving) return;
    resolving = 1;
    real_calloc = dlsym(RTLD_NEXT, "calloc");
    real_malloc = dlsym(RTLD_NEXT, "malloc");
    real_realloc = dlsym(RTLD_NEXT, "realloc");
    real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    real_free = dlsym(RTLD_NEXT, "free");
    resolving = 0;
}

uint64_t alloc_count(void) { return atomic_load(&count); }

void *malloc(size_t n) {
    resolve();
    if (!real_malloc) return bootstrap_alloc(n);
    atomic_fetch_add(&count, 1);
    return real_malloc(n);
}

void *calloc(size_t a, size_t b) {
    resolve();
    if (!real_calloc) {
        void *p = bootstrap_alloc(a * b);
        if (p) memset(p, 0, a * b);
        return p;
    }
    atomic_fetch_add(&count, 1);
    return real_calloc(a, b);
}

void *realloc(void *p, size_t n) {
    resolve();
    atomic_fetch_add(&count, 1);
    return real_realloc(p, n);
}

int posix_memalign(void **out, size_t align, size_t n) {
    resolve();
    atomic_fetch_add(&count, 1);
    return real_posix_memalign(out, align, n);
}

void *aligned_alloc(size_t align, size_t n) {
    resolve();
    atomic_fetch_add(&count, 1);
    return real_aligned_alloc(align, n);
}

void free(void *p) {
    if ((char *)p >= bootstrap && (char *)p < bootstrap + sizeof bootstrap) return;
    resolve();
    if (real_free) real_free(p);
}
#endif

#include <malloc.h>

uint64_t heap_in_use(void) {
    struct mallinfo2 m = mallinfo2();
    return (uint64_t)(m.uordblks + m.hblkhd);
}
