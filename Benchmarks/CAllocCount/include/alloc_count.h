#pragma once
#include <stdint.h>

/* Allocations (malloc, calloc, realloc, posix_memalign, aligned_alloc) made by this process
   since it started. Linking this target into an executable interposes the allocator entry
   points; they forward to the C library's. For micro-benchmarks only. */
uint64_t alloc_count(void);

/* 0 in sanitizer builds, where the allocator is not interposed (counts stay 0). */
int alloc_count_enabled(void);

/* Bytes the C library's allocator has handed out and not taken back (mallinfo2: arena chunks in
   use plus mmapped chunks). */
uint64_t heap_in_use(void);
