/// Work done in bounded steps at the end of loop turns ("bounded step, then re-arm"): while
/// `pending()` says there is work, each turn ends with one `step()`, and the loop does not sleep
/// after a step (a zero timeout keeps it turning), so requests are served between steps and no
/// step holds the loop for long. The turn after the last step runs too: what a step wrote (a
/// lease's deletions, a slice of compaction) joins that turn's group commit at once, however the
/// end-of-turn hooks are ordered. Compaction, watchers catching up and lease expiry run this way.
///
/// Checking `pending()` costs one call per loop turn: keep it a field read.
public final class LoopStepper {
    private let loop: EventLoop
    private let pending: () -> Bool
    private let step: () -> Void
    private var keepTurning: LoopTimer?
    private var stopped = false

    /// Starts checking at the end of every turn until `stop()`.
    public init(loop: EventLoop, pending: @escaping () -> Bool, step: @escaping () -> Void) {
        self.loop = loop
        self.pending = pending
        self.step = step
        loop.addBeforeSleep { [weak self] in self?.endOfTurn() }
    }

    private func endOfTurn() {
        guard !stopped, pending() else { return }
        step()
        if keepTurning == nil {
            keepTurning = LoopTimer(loop: loop, timeoutMs: 0) { [weak self] in self?.keepTurning = nil }
        }
    }

    /// Stops for good (the loop's hook stays, doing nothing).
    public func stop() {
        stopped = true
        keepTurning?.cancel()
        keepTurning = nil
    }
}

/// A value that may be touched only on its loop's thread, checked in debug builds (swift-nio's
/// `NIOLoopBound`). It may be handed to other threads, but only read or written back on the loop:
/// what crosses to the loop is the box, never an access.
public struct LoopBound<Value>: @unchecked Sendable {
    public let loop: EventLoop
    private var stored: Value

    /// Made on the loop.
    public init(_ value: Value, loop: EventLoop) {
        loop.assertInLoop()
        self.loop = loop
        stored = value
    }

    public var value: Value {
        get {
            loop.assertInLoop()
            return stored
        }
        set {
            loop.assertInLoop()
            stored = newValue
        }
    }
}
