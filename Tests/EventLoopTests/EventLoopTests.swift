import Foundation
import Testing

@testable import EventLoop

@Suite struct EventLoopTests {
    @Test func timersFireInDeadlineOrderAndRepeatUntilCancelled() throws {
        let loop = try EventLoop()
        var fired: [String] = []
        let late = LoopTimer(loop: loop, timeoutMs: 30) { fired.append("30") }
        let early = LoopTimer(loop: loop, timeoutMs: 10) { fired.append("10") }
        var ticks = 0
        var repeating: LoopTimer?
        repeating = LoopTimer(loop: loop, timeoutMs: 5, repeatMs: 5) {
            ticks += 1
            if ticks == 4 { repeating?.cancel() }
        }
        let cancelled = LoopTimer(loop: loop, timeoutMs: 1) { fired.append("never") }
        cancelled.cancel()
        #expect(loop.run(forAtMost: 5) { fired.count == 2 && ticks == 4 })
        #expect(fired == ["10", "30"])
        // Nothing more: the repeating timer stopped at its fourth tick.
        loop.run(forAtMost: 0.05) { false }
        #expect(ticks == 4)
        _ = (late, early)
        loop.shutdown()
        loop.drain()
    }

    @Test func wakeupsFromOtherThreadsCoalesceIntoCallbacksOnTheLoop() throws {
        let loop = try EventLoop()
        var onLoop = true
        var calls = 0
        let wake = Wakeup(loop: loop) {
            calls += 1
            onLoop = onLoop && loop.inLoop
        }
        let sent = Counter()
        let threads = (0..<4).map { _ in
            Thread {
                for _ in 0..<1000 { wake.signal() }
                sent.add(1000)
            }
        }
        threads.forEach { $0.start() }
        #expect(loop.run(forAtMost: 10) { sent.value == 4000 && calls > 0 })
        loop.run(forAtMost: 0.05) { false }  // the last signals' callback
        #expect(onLoop)
        #expect(calls >= 1 && calls < 4000, "repeated signals coalesce (\(calls) callbacks)")
        wake.close()
        loop.shutdown()
        loop.drain()
    }

    @Test func threadPoolWorkRunsOffTheLoopAndCompletesOnIt() throws {
        let loop = try EventLoop()
        let seenOffLoop = Counter()
        var completions = 0
        var doneOnLoop = true
        for _ in 0..<8 {
            ThreadPool.submit(
                on: loop,
                work: { seenOffLoop.add(1) },
                done: {
                    completions += 1
                    doneOnLoop = doneOnLoop && loop.inLoop
                })
        }
        #expect(loop.run(forAtMost: 10) { completions == 8 })
        #expect(seenOffLoop.value == 8 && doneOnLoop)
        // The work ran on pool threads, not the loop's.
        let workThread = Box<Bool>(true)
        var finished = false
        let loopThread = pthread_self()
        ThreadPool.submit(
            on: loop, work: { workThread.set(pthread_equal(pthread_self(), loopThread) != 0) },
            done: { finished = true })
        #expect(loop.run(forAtMost: 10) { finished })
        #expect(workThread.get() == false)
        loop.shutdown()
        loop.drain()
    }

    @Test func aStepperRunsOneStepPerTurnAndLetsTimersInBetween() throws {
        let loop = try EventLoop()
        var remaining = 50
        var steps = 0
        var log: [String] = []
        let stepper = LoopStepper(
            loop: loop, pending: { remaining > 0 },
            step: {
                remaining -= 1
                steps += 1
                log.append("step")
            })
        // A timer due at once fires between steps, not after all of them.
        let t = LoopTimer(loop: loop, timeoutMs: 0) { log.append("timer") }
        #expect(loop.run(forAtMost: 5) { remaining == 0 })
        #expect(steps == 50)
        let timerAt = try #require(log.firstIndex(of: "timer"))
        #expect(timerAt < 5, "the timer ran after \(timerAt) steps")
        // Done: no more steps, and stopping is final.
        stepper.stop()
        remaining = 3
        loop.run(forAtMost: 0.05) { false }
        #expect(steps == 50)
        _ = t
        loop.shutdown()
        loop.drain()
    }

    /// What the last step wrote is seen by end-of-turn hooks registered before the stepper (the
    /// group commit's) on the next turn, even when nothing else would wake the loop.
    @Test func theTurnAfterTheLastStepRunsToo() throws {
        let loop = try EventLoop()
        var written = false
        var seenByEarlierHook = false
        loop.addBeforeSleep { if written { seenByEarlierHook = true } }
        var pending = true
        let stepper = LoopStepper(
            loop: loop, pending: { pending },
            step: {
                written = true
                pending = false
            })
        let once = LoopTimer(loop: loop, timeoutMs: 0) {}  // one turn, then nothing keeps the loop alive
        loop.run()
        #expect(written && seenByEarlierHook)
        _ = (stepper, once)
        loop.shutdown()
        loop.drain()
    }

    @Test func endOfTurnWorkRunsBeforeTheLoopSleeps() throws {
        let loop = try EventLoop()
        var order: [String] = []
        let t = LoopTimer(loop: loop, timeoutMs: 0) {
            order.append("timer")
            loop.atEndOfTurn {
                order.append("end of turn")
                loop.atEndOfTurn { order.append("queued by end of turn") }
            }
        }
        #expect(loop.run(forAtMost: 5) { order.count == 3 })
        #expect(order == ["timer", "end of turn", "queued by end of turn"])
        _ = t
        loop.shutdown()
        loop.drain()
    }

    @Test func loopBoundValuesAreReadOnTheirLoop() throws {
        let loop = try EventLoop()
        var bound = LoopBound(41, loop: loop)
        bound.value += 1
        #expect(bound.value == 42)
        #expect(loop.inLoop)
        let other = Box<Bool>(true)
        let loopThread = pthread_self()
        let thread = Thread { other.set(pthread_equal(pthread_self(), loopThread) != 0) }
        thread.start()
        while !thread.isFinished { usleep(1000) }
        #expect(other.get() == false, "another thread is not the loop's")
        loop.shutdown()
        loop.drain()
    }

    #if DEBUG
    /// In debug builds a loop-bound value read off its loop's thread traps (in a child process).
    @Test func touchingALoopBoundValueOffItsLoopTraps() async {
        await #expect(processExitsWith: .failure) {
            let loop = try EventLoop()
            let bound = LoopBound(1, loop: loop)
            let thread = Thread { _ = bound.value }
            thread.start()
            sleep(10)
        }
    }
    #endif
}

/// A counter shared with other threads.
final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add(_ k: Int) { lock.withLock { n += k } }
    var value: Int { lock.withLock { n } }
}

final class Box<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var v: T
    init(_ v: T) { self.v = v }
    func set(_ x: T) { lock.withLock { v = x } }
    func get() -> T { lock.withLock { v } }
}
