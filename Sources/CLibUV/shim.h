#pragma once
#include <uv.h>

/* uv_loop_configure is variadic, which Swift cannot call: one wrapper per option used. */
static inline int uv_loop_configure_idle_time(uv_loop_t *loop) {
    return uv_loop_configure(loop, UV_METRICS_IDLE_TIME);
}

#include <malloc.h>

/* Turns off glibc's fast bins (see EventLoop.preferShortTurns). */
static inline void vigil_disable_malloc_fastbins(void) {
    mallopt(M_MXFAST, 0);
}
