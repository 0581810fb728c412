import CLibUV
import Dispatch

#if canImport(Glibc)
import Glibc
#endif

/// An error from libuv, carrying its negative status code and libuv's own text.
public struct UVError: Error, CustomStringConvertible {
    public let code: Int32
    public var description: String { String(cString: uv_strerror(code)) }
}

/// Throws when a libuv call returned a negative status.
@discardableResult
func check(_ status: Int32) throws -> Int32 {
    if status < 0 { throw UVError(code: status) }
    return status
}

/// The one event loop. Every handle created from it must only be touched on the loop's thread;
/// the only thread-safe entry is `Wakeup.signal()`.
///
/// Each loop turn ends with the "before sleep" hooks (a `uv_prepare` handle): subsystems gather
/// work during the turn and flush it there once, as redis's `beforeSleep` does.
public final class EventLoop {
    let raw: UnsafeMutablePointer<uv_loop_t>
    /// The thread that runs the loop (the creating one until `run` is first called).
    private var owner = pthread_self()
    private let prepare = UnsafeMutablePointer<uv_prepare_t>.allocate(capacity: 1)
    private var beforeSleepHooks: [() -> Void] = []
    private var pendingOnce: [() -> Void] = []
    private var prepareStarted = false
    /// Where every connection of this loop reads into: libuv allocates, reads and calls back
    /// for one connection at a time, and readers copy what they keep. One buffer per loop
    /// rather than one per connection (64 KiB each, mostly untouched, but pages once touched stay).
    let readBuffer = UnsafeMutableRawPointer.allocate(byteCount: EventLoop.readBufferSize, alignment: 16)
    static let readBufferSize = 64 * 1024

    public init() throws {
        raw = .allocate(capacity: 1)
        try check(uv_loop_init(raw))
        raw.pointee.data = Unmanaged.passUnretained(self).toOpaque()
    }

    deinit {
        uv_loop_close(raw)
        prepare.deallocate()
        raw.deallocate()
        readBuffer.deallocate()
    }

    /// Tunes the process's allocator for short loop turns: glibc's fast bins defer merging freed
    /// chunks until some large allocation consolidates them all at once, so freeing a large
    /// compaction's history stalls a turn for tens of milliseconds; without them, frees merge as
    /// they happen. Process-wide: the `vigil` executable calls it; an embedding program may choose.
    public static func preferShortTurns() { vigil_disable_malloc_fastbins() }

    /// Milliseconds of the loop's cached clock (monotonic).
    public var nowMilliseconds: UInt64 { uv_now(raw) }

    /// Runs until `stop()` or until nothing keeps the loop alive.
    public func run() {
        owner = pthread_self()
        startPrepare()
        uv_run(raw, UV_RUN_DEFAULT)
    }

    /// Runs one turn, waiting for I/O if nothing is ready (for blocking test clients).
    public func runOnce() {
        owner = pthread_self()
        startPrepare()
        uv_run(raw, UV_RUN_ONCE)
    }

    /// Whether the caller is on the loop's thread.
    public var inLoop: Bool { pthread_equal(pthread_self(), owner) != 0 }

    /// Traps in debug builds when called off the loop's thread (loop-confined state is touched
    /// only from the loop; see `LoopBound`). Free in release builds.
    @inline(__always)
    public func assertInLoop(file: StaticString = #fileID, line: UInt = #line) {
        assert(inLoop, "touched off its event loop's thread", file: file, line: line)
    }

    /// Runs turns until `done()` or until `seconds` pass, for programs that drive the loop
    /// themselves (clients, tests, benchmarks); a ticking timer keeps a quiet loop checking the
    /// deadline. Returns `done()`.
    @discardableResult
    public func run(forAtMost seconds: Double, until done: () -> Bool) -> Bool {
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(max(0, seconds) * 1e9)
        let tick = LoopTimer(loop: self, timeoutMs: 20, repeatMs: 20) {}
        defer { tick.cancel() }
        while !done() && DispatchTime.now().uptimeNanoseconds < deadline { runOnce() }
        return done()
    }

    /// Asks `run()` to return after the current turn.
    public func stop() { uv_stop(raw) }

    /// Registers `hook` to run at the end of every loop turn, before the loop polls for I/O.
    public func addBeforeSleep(_ hook: @escaping () -> Void) {
        beforeSleepHooks.append(hook)
        startPrepare()
    }

    /// Runs `work` once at the end of the current turn (before sleeping).
    public func atEndOfTurn(_ work: @escaping () -> Void) {
        pendingOnce.append(work)
    }

    private func startPrepare() {
        guard !prepareStarted else { return }
        prepareStarted = true
        prepare.initialize(to: uv_prepare_t())
        uv_prepare_init(raw, prepare)
        prepare.pointee.data = Unmanaged.passUnretained(self).toOpaque()
        uv_prepare_start(prepare) { handle in
            let loop = Unmanaged<EventLoop>.fromOpaque(handle!.pointee.data).takeUnretainedValue()
            loop.runBeforeSleep()
        }
        // The prepare handle alone must not keep the loop alive.
        uv_unref(asHandle(prepare))
    }

    private var turnObserver: ((UInt64) -> Void)?
    private var lastTurnEnd: UInt64 = 0
    private var lastIdle: UInt64 = 0

    /// Reports how long each loop turn kept the loop busy (nanoseconds, time waiting for I/O
    /// excluded), measured as each turn ends. Call before `run()`.
    public func measureTurns(_ observe: @escaping (UInt64) -> Void) {
        uv_loop_configure_idle_time(raw)
        turnObserver = observe
        lastTurnEnd = uv_hrtime()
        lastIdle = uv_metrics_idle_time(raw)
        startPrepare()
    }

    /// Runs queued end-of-turn work and the hooks; work may queue more work, which runs too.
    func runBeforeSleep() {
        defer { if turnObserver != nil { observeTurn() } }
        var rounds = 0
        repeat {
            while !pendingOnce.isEmpty {
                let work = pendingOnce
                pendingOnce.removeAll(keepingCapacity: true)
                for w in work { w() }
            }
            for hook in beforeSleepHooks { hook() }
            rounds += 1
        } while !pendingOnce.isEmpty && rounds < 16
    }

    private func observeTurn() {
        let now = uv_hrtime()
        let idle = uv_metrics_idle_time(raw)
        let elapsed = now &- lastTurnEnd
        let waited = idle &- lastIdle
        lastTurnEnd = now
        lastIdle = idle
        turnObserver?(elapsed > waited ? elapsed - waited : 0)
    }

    /// Runs the loop until no handle or request keeps it alive (after `shutdown()` and closing
    /// every handle: lets in-flight work and close callbacks finish).
    public func drain() { uv_run(raw, UV_RUN_DEFAULT) }

    /// Closes the prepare handle so that the loop can finish.
    public func shutdown() {
        if prepareStarted {
            uv_prepare_stop(prepare)
            uv_close(asHandle(prepare), nil)
            prepareStarted = false
        }
    }
}

/// Casts any libuv handle pointer to the base `uv_handle_t`.
@inline(__always)
func asHandle<T>(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<uv_handle_t> {
    UnsafeMutableRawPointer(p).assumingMemoryBound(to: uv_handle_t.self)
}

@inline(__always)
func asStream<T>(_ p: UnsafeMutablePointer<T>) -> UnsafeMutablePointer<uv_stream_t> {
    UnsafeMutableRawPointer(p).assumingMemoryBound(to: uv_stream_t.self)
}

/// Owns a heap-allocated libuv handle and keeps its Swift owner alive until libuv's close
/// callback has run (uvloop's `UVHandle` rule: a handle must not be freed before then).
final class HandleBox<T> {
    let pointer: UnsafeMutablePointer<T>
    private var closing = false

    init() {
        pointer = .allocate(capacity: 1)
        UnsafeMutableRawPointer(pointer).initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T>.size)
    }

    /// Sets `data` to an owning reference to `owner`; released in the close callback.
    func bind(_ owner: AnyObject) {
        asHandle(pointer).pointee.data = Unmanaged.passRetained(owner).toOpaque()
    }

    var isClosing: Bool { closing }

    func close() {
        guard !closing else { return }
        closing = true
        uv_close(asHandle(pointer)) { handle in
            guard let handle else { return }
            if let data = handle.pointee.data {
                Unmanaged<AnyObject>.fromOpaque(data).release()
            }
            handle.deallocate()
        }
    }
}

/// A repeating or one-shot timer on the loop.
public final class LoopTimer {
    private let box = HandleBox<uv_timer_t>()
    private let callback: () -> Void
    private let oneShot: Bool

    /// Starts a timer firing after `timeoutMs` and then every `repeatMs` (0 = once).
    public init(loop: EventLoop, timeoutMs: UInt64, repeatMs: UInt64 = 0, _ callback: @escaping () -> Void) {
        self.callback = callback
        self.oneShot = repeatMs == 0
        uv_timer_init(loop.raw, box.pointer)
        box.bind(self)
        uv_timer_start(
            box.pointer,
            { t in
                let me = Unmanaged<LoopTimer>.fromOpaque(t!.pointee.data).takeUnretainedValue()
                me.callback()
                if me.oneShot { me.cancel() }
            }, timeoutMs, repeatMs)
    }

    /// Stops the timer and releases it; safe to call more than once.
    public func cancel() {
        guard !box.isClosing else { return }
        uv_timer_stop(box.pointer)
        box.close()
    }

    /// Lets the loop exit even if this timer is active.
    public func unref() { uv_unref(asHandle(box.pointer)) }
}

/// The one thread-safe way into the loop: `signal()` may be called from any thread; repeated
/// signals coalesce into one callback on the loop.
public final class Wakeup: @unchecked Sendable {
    private let box = HandleBox<uv_async_t>()
    private let callback: () -> Void

    public init(loop: EventLoop, _ callback: @escaping () -> Void) {
        self.callback = callback
        uv_async_init(loop.raw, box.pointer) { a in
            let me = Unmanaged<Wakeup>.fromOpaque(a!.pointee.data).takeUnretainedValue()
            me.callback()
        }
        box.bind(self)
    }

    public func signal() { uv_async_send(box.pointer) }
    public func unref() { uv_unref(asHandle(box.pointer)) }
    public func close() { box.close() }
}

/// Runs blocking work on libuv's thread pool and its completion back on the loop.
public enum ThreadPool {
    private final class Job {
        let work: @Sendable () -> Void
        let done: () -> Void
        init(work: @escaping @Sendable () -> Void, done: @escaping () -> Void) {
            self.work = work
            self.done = done
        }
    }

    /// Queues `work` on the pool; `done` runs on the loop thread after `work` returned.
    /// `work` must not touch loop-confined state.
    public static func submit(on loop: EventLoop, work: @escaping @Sendable () -> Void, done: @escaping () -> Void) {
        let req = UnsafeMutablePointer<uv_work_t>.allocate(capacity: 1)
        req.initialize(to: uv_work_t())
        req.pointee.data = Unmanaged.passRetained(Job(work: work, done: done)).toOpaque()
        let rc = uv_queue_work(
            loop.raw, req,
            { r in
                Unmanaged<Job>.fromOpaque(r!.pointee.data).takeUnretainedValue().work()
            },
            { r, _ in
                let job = Unmanaged<Job>.fromOpaque(r!.pointee.data).takeRetainedValue()
                r!.deallocate()
                job.done()
            })
        precondition(rc == 0, "uv_queue_work failed: \(UVError(code: rc))")
    }
}

/// Handles SIGINT/SIGTERM on the loop.
public final class SignalWatcher {
    private let box = HandleBox<uv_signal_t>()
    private let callback: (Int32) -> Void

    public init(loop: EventLoop, signal: Int32, _ callback: @escaping (Int32) -> Void) {
        self.callback = callback
        // A parent may have started us with the signal blocked (test runners do): unblock it on
        // this thread so that it is delivered at all.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, signal)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
        uv_signal_init(loop.raw, box.pointer)
        box.bind(self)
        uv_signal_start(
            box.pointer,
            { s, signum in
                let me = Unmanaged<SignalWatcher>.fromOpaque(s!.pointee.data).takeUnretainedValue()
                me.callback(signum)
            }, signal)
        uv_unref(asHandle(box.pointer))
    }

    public func close() { box.close() }
}
