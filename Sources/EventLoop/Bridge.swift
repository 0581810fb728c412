import Foundation

// The one crossing between a loop and Swift concurrency. Everything that runs on a loop and is
// reached from async code (VigilServer's in-process API, the EtcdClient) goes through these three:
// work goes in through a `LoopInbox`, answers come back through `LoopInbox.perform`'s
// continuation, and streams come back through a `LoopFedStream`.

/// Work queued for a loop from any thread: one wakeup per batch, run in order on the loop.
public final class LoopInbox: @unchecked Sendable {
    private let lock = NSLock()
    private var queued: [() -> Void] = []
    private var wakeup: Wakeup?

    /// Made on the loop. The inbox does not keep the loop running by itself.
    public init(loop: EventLoop) {
        let live = Wakeup(loop: loop) { [unowned self] in drain() }
        live.unref()
        wakeup = live
    }

    /// Queues `body` for the loop. False when the inbox is closed: `body` will not run.
    @discardableResult
    public func submit(_ body: @escaping () -> Void) -> Bool {
        lock.withLock {
            guard let wakeup else { return false }
            queued.append(body)
            wakeup.signal()
            return true
        }
    }

    /// Runs what is queued (on the loop).
    public func drain() {
        let work = lock.withLock { () -> [() -> Void] in
            let w = queued
            queued.removeAll()
            return w
        }
        for w in work { w() }
    }

    /// Closes the inbox (on the loop): later `submit`s fail; what was queued runs now.
    public func close() {
        let w = lock.withLock { () -> Wakeup? in
            let w = wakeup
            wakeup = nil
            return w
        }
        w?.close()
        drain()
    }

    /// Runs `body` on the loop and waits for the answer it passes to its callback, which it must
    /// call exactly once, on the loop. `closed` is thrown when the inbox no longer takes work, or
    /// closes before `body` ran.
    public func perform<T: Sendable>(
        closed: @autoclosure () -> any Error,
        _ body: @escaping (@escaping (Result<T, any Error>) -> Void) -> Void
    ) async throws -> T {
        try await perform(closed: closed()) { done -> (() -> Void)? in
            body(done)
            return nil
        }
    }

    /// `perform` for work that can be stopped: `body` returns what stops it (run on the loop if
    /// the task is cancelled first; the task then gets `CancellationError`, whatever the work answers).
    public func perform<T: Sendable>(
        closed: @autoclosure () -> any Error,
        _ body: @escaping (@escaping (Result<T, any Error>) -> Void) -> (() -> Void)?
    ) async throws -> T {
        let closedError = closed()
        let stop = StopBox()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, any Error>) in
                let once = ResumeOnce(c)
                stop.setOnCancel { once.resume(.failure(CancellationError())) }
                let queued = submit {
                    stop.set(
                        body { result in
                            stop.markAnswered()
                            once.resume(result)
                        })
                }
                if !queued { once.resume(.failure(closedError)) }
                if Task.isCancelled {
                    once.resume(.failure(CancellationError()))
                    stop.cancel(self)
                }
            }
        } onCancel: {
            stop.cancel(self)
        }
    }
}

/// What stops a `perform`'s work, handed from the loop to a cancelling task. Once the work has
/// answered, a cancellation stops nothing.
private final class StopBox: @unchecked Sendable {
    private let lock = NSLock()
    private var stop: (() -> Void)?
    private var cancelled = false
    private var answered = false
    private var onCancel: (() -> Void)?

    func setOnCancel(_ f: @escaping () -> Void) { lock.withLock { onCancel = f } }

    /// On the loop: the work answered.
    func markAnswered() {
        lock.withLock {
            answered = true
            stop = nil
        }
    }

    /// On the loop, once the work started.
    func set(_ s: (() -> Void)?) {
        let now = lock.withLock { () -> Bool in
            if answered { return false }
            if cancelled { return true }
            stop = s
            return false
        }
        if now { s?() }
    }

    func cancel(_ inbox: LoopInbox) {
        let (first, resume) = lock.withLock { () -> (Bool, (() -> Void)?) in
            let first = !cancelled && !answered
            cancelled = true
            return (first, onCancel)
        }
        guard first else { return }
        resume?()
        inbox.submit { [self] in
            let s = lock.withLock { () -> (() -> Void)? in
                let s = stop
                stop = nil
                return s
            }
            s?()
        }
    }
}

/// A continuation resumed at most once (an answer that comes twice is dropped).
private final class ResumeOnce<T: Sendable>: @unchecked Sendable {
    private var c: CheckedContinuation<T, any Error>?
    private let lock = NSLock()
    init(_ c: CheckedContinuation<T, any Error>) { self.c = c }
    func resume(_ r: Result<T, any Error>) {
        let c = lock.withLock { () -> CheckedContinuation<T, any Error>? in
            let c = self.c
            self.c = nil
            return c
        }
        c?.resume(with: r)
    }
}

/// An event loop running on a thread of its own, for programs that are not built around one (a
/// client library inside an async program). Work reaches it through `inbox`.
public final class LoopThread: @unchecked Sendable {
    /// The loop; touch it only from work submitted through `inbox`.
    public let loop: EventLoop
    public let inbox: LoopInbox
    private let thread: Thread
    /// Entered while the thread runs (any number of callers may wait for its end).
    private let running = DispatchGroup()
    private let stateLock = NSLock()
    private var shuttingDown = false
    private var keepAlive: Wakeup?

    /// Starts the thread; returns once the loop runs.
    public init(name: String) throws {
        let ready = DispatchSemaphore(value: 0)
        let made = Made()
        let running = running
        running.enter()
        thread = Thread {
            do {
                let loop = try EventLoop()
                made.loop = loop
                made.inbox = LoopInbox(loop: loop)
                // Referenced: the loop runs until `shutdown`, even with nothing else to do.
                made.keepAlive = Wakeup(loop: loop) {}
            } catch {
                made.error = error
            }
            ready.signal()
            guard let loop = made.loop else { return running.leave() }
            loop.run()
            loop.shutdown()
            loop.drain()
            running.leave()
        }
        thread.name = name
        thread.stackSize = 4 << 20
        thread.start()
        ready.wait()
        if let e = made.error { throw e }
        loop = made.loop!
        inbox = made.inbox!
        keepAlive = made.keepAlive
    }

    private final class Made: @unchecked Sendable {
        var loop: EventLoop?
        var inbox: LoopInbox?
        var keepAlive: Wakeup?
        var error: (any Error)?
    }

    /// Runs `cleanup` on the loop, then stops it and waits for the thread to end (from the loop's
    /// own thread: without waiting). The first call does it; later ones only wait.
    public func shutdown(_ cleanup: @escaping () -> Void = {}) {
        let first = stateLock.withLock { () -> Bool in
            defer { shuttingDown = true }
            return !shuttingDown
        }
        if first {
            inbox.submit { [self] in
                cleanup()
                inbox.close()
                keepAlive?.close()
                keepAlive = nil
                loop.stop()
            }
        }
        if !loop.inLoop { running.wait() }
    }
}

/// A `LoopFedStream` misused.
public enum LoopFedStreamError: Error, Sendable {
    /// Two tasks read one stream at once (it has one consumer).
    case concurrentReaders
}

/// Elements made on a loop and read by an async consumer, bounded by bytes: the producer sees
/// `queuedBytes` and asks for `onDrained` (the watch hub parks a stream whose consumer lags and
/// resumes it when drained), so a consumer that stops reading never makes memory grow without
/// bound. When the consumer goes away (its task is cancelled, or its iterator is dropped),
/// `onCancel` runs on the loop.
public final class LoopFedStream<Element: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [(Element, Int)] = []
    private var head = 0
    private var bytes = 0
    private var waiter: CheckedContinuation<Element?, any Error>?
    private var ended = false
    private var endError: (any Error)?
    private var drainWanted = false
    private let inbox: LoopInbox
    private let lowWater: Int
    /// On the loop: the consumer took enough after `notifyWhenDrained`.
    public var onDrained: (() -> Void)?
    /// On the loop, once: the consumer went away before the stream ended.
    public var onCancel: (() -> Void)?

    /// `lowWater`: `onDrained` fires once the unread bytes fall to this.
    public init(inbox: LoopInbox, lowWater: Int = 0) {
        self.inbox = inbox
        self.lowWater = lowWater
    }

    // MARK: the producer's side (on the loop)

    /// Bytes pushed and not yet read.
    public var queuedBytes: Int { lock.withLock { bytes } }

    /// Whether the consumer is gone or the stream ended.
    public var isEnded: Bool { lock.withLock { ended } }

    /// Hands `element` (`size` bytes of it count against the bound) to the consumer.
    public func push(_ element: Element, size: Int) {
        let w = lock.withLock { () -> CheckedContinuation<Element?, any Error>? in
            guard !ended else { return nil }
            if let w = waiter {
                waiter = nil
                return w
            }
            items.append((element, size))
            bytes += size
            return nil
        }
        w?.resume(returning: element)
    }

    /// Ends the stream after what was pushed: the consumer then sees `error`, or the end.
    public func finish(throwing error: (any Error)? = nil) {
        let w = lock.withLock { () -> CheckedContinuation<Element?, any Error>? in
            guard !ended else { return nil }
            ended = true
            endError = error
            onCancel = nil
            guard head == items.count, let w = waiter else { return nil }
            waiter = nil
            return w
        }
        if let w {
            if let error { w.resume(throwing: error) } else { w.resume(returning: nil) }
        }
    }

    /// Asks for one `onDrained` call once the consumer has read down to the low-water mark.
    public func notifyWhenDrained() {
        let now = lock.withLock { () -> Bool in
            if bytes <= lowWater { return true }
            drainWanted = true
            return false
        }
        if now { inbox.submit { [self] in onDrained?() } }
    }

    // MARK: the consumer's side (any task)

    /// The next element, nil at the end; throws the stream's error, or `CancellationError` when
    /// the task is cancelled (the producer is then told through `onCancel`).
    public func next() async throws -> Element? {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Element?, any Error>) in
                take(c)
            }
        } onCancel: {
            cancel()
        }
    }

    /// Answers `c` with the next element, the end, or later (it waits as `waiter`).
    private func take(_ c: CheckedContinuation<Element?, any Error>) {
        var element: Element?
        var drained = false
        var end = false
        var error: (any Error)?
        lock.lock()
        if head < items.count {
            let (e, size) = items[head]
            head += 1
            bytes -= size
            if head == items.count {
                items.removeAll(keepingCapacity: items.count < 1024)
                head = 0
            } else if head > 1024 && head * 2 > items.count {
                items.removeFirst(head)
                head = 0
            }
            drained = drainWanted && bytes <= lowWater
            if drained { drainWanted = false }
            element = e
        } else if ended {
            end = true
            error = endError
        } else if Task.isCancelled {
            end = true
            error = CancellationError()
        } else if waiter != nil {
            end = true
            error = LoopFedStreamError.concurrentReaders
        } else {
            waiter = c
        }
        lock.unlock()
        if let element {
            if drained { inbox.submit { [self] in onDrained?() } }
            c.resume(returning: element)
        } else if end {
            if let error { c.resume(throwing: error) } else { c.resume(returning: nil) }
        }
    }

    /// The consumer is gone: the stream ends, unread elements are dropped, `onCancel` runs on the loop.
    public func cancel() {
        let w = lock.withLock { () -> (CheckedContinuation<Element?, any Error>?, Bool) in
            let first = !ended
            ended = true
            endError = CancellationError()
            items.removeAll()
            head = 0
            bytes = 0
            let w = waiter
            waiter = nil
            return (w, first)
        }
        w.0?.resume(throwing: CancellationError())
        if w.1 {
            inbox.submit { [self] in
                let cb = onCancel
                onCancel = nil
                cb?()
            }
        }
    }
}
