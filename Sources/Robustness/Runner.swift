import EtcdProto
import EventLoop
import Foundation

/// Runs profiles: starts the target, drives the traffic on a loop, injects the faults from a
/// thread of their own, reads the final state, then validates.
public enum Runner {
    public static func run(
        _ profile: Profile, seed: UInt64, output: String? = nil, keepHistory: Bool = false,
        log: @escaping @Sendable (String) -> Void = { _ in }
    ) throws -> RunReport {
        log("\(profile.name): starting \(profile.target) (seed \(seed))")
        let server = try ServerUnderTest(kind: profile.target, failpoints: profile.serverFailpoints, seed: seed)
        defer { server.shutdown() }
        let loop = try EventLoop()
        defer { loop.shutdown() }
        let traffic = Traffic(loop: loop, mix: profile.mix, seed: seed, endpoints: { server.endpoints })
        let started = monotonicNanos()
        traffic.start()

        let faultsDone = Flag()
        let faults = profile.faults.sorted { $0.at < $1.at }
        let thread = Thread {
            for f in faults {
                let due = started + Int64(f.at * 1e9)
                while monotonicNanos() < due { usleep(10_000) }
                log("\(profile.name): \(f.kind) at \(f.at) s")
                server.inject(f.kind)
            }
            faultsDone.set()
        }
        thread.start()
        _ = loop.run(forAtMost: profile.seconds) { false }
        _ = loop.run(forAtMost: 120) { faultsDone.isSet }
        traffic.stop()
        _ = loop.run(forAtMost: 10) { traffic.inFlight == 0 }

        // The final state, once the server answers (it may still be restarting).
        let conn = traffic.connection()
        var final: Operation?
        let deadline = monotonicNanos() + 30_000_000_000
        while final == nil && monotonicNanos() < deadline {
            var attempt: Operation?
            traffic.history.finalTime = monotonicNanos()
            traffic.perform(conn, client: 0, .range(key: "\0", end: "\0", revision: 0, limit: 0)) { attempt = $0 }
            _ = loop.run(forAtMost: 5) { attempt != nil }
            if let a = attempt, a.succeeded { final = a } else { _ = loop.run(forAtMost: 0.2) { false } }
        }
        if let f = final, case .range(let kvs, _, _)? = f.response {
            traffic.history.finalRevision = f.revision
            traffic.history.finalState = kvs
            // The collector must have everything through the final revision.
            _ = loop.run(forAtMost: 20) { traffic.collectorRevision >= f.revision }
        }
        traffic.collector?.close()
        traffic.closeAll()
        // Timers left by the clients fire and do nothing; connections finish closing.
        _ = loop.run(forAtMost: 1.5) { false }

        var history = traffic.history
        (history.faults, history.restarts) = server.recorded()
        log("\(profile.name): validating \(history.operations.count) operations, \(history.watches.count) watches")
        let t0 = monotonicNanos()
        var violations = Validation.validate(history, target: profile.target)
        if profile.target == .etcd { KnownEtcdIssues.annotate(&violations) }
        log("\(profile.name): validated in \((monotonicNanos() - t0) / 1_000_000) ms")
        var report = RunReport(profile: profile, seed: seed, violations: violations, stats: stats(history))
        if let output, !report.passed || keepHistory {
            let dir = output + "/\(profile.name)-\(seed)"
            try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            try? encoder.encode(history).write(to: URL(fileURLWithPath: dir + "/history.json"))
            try? encoder.encode(report).write(to: URL(fileURLWithPath: dir + "/report.json"))
            try? server.log.write(toFile: dir + "/server.log", atomically: true, encoding: .utf8)
            report.directory = dir
        }
        return report
    }

    /// What the run did, in numbers.
    static func stats(_ h: History) -> [String: String] {
        let ops = h.operations
        let handOvers = lockHandOvers(h)
        var s: [String: String] = [
            "operations": "\(ops.count)",
            "answered": "\(ops.filter(\.succeeded).count)",
            "unknown": "\(ops.filter(\.unknown).count)",
            "revisions": "\(h.finalRevision)",
            "watches": "\(h.watches.count)",
            "events": "\(h.watches.reduce(0) { $0 + $1.responses.reduce(0) { $0 + $1.events.count } })",
            "locks": "\(h.locks.filter { $0.kind == .lock && $0.acquired }.count)",
            "campaigns": "\(h.locks.filter { $0.kind == .campaign && $0.acquired }.count)",
            "leases": "\(h.leases.count)",
            "faults": "\(h.faults.count)",
        ]
        if !h.faults.isEmpty {
            s["fault list"] = "[" + h.faults.map { "\($0.kind) \($0.detail)" }.joined(separator: "; ") + "]"
        }
        if !handOvers.isEmpty {
            let sorted = handOvers.sorted()
            s["lock hand-over p50/p99 ms"] =
                String(
                    format: "%.1f/%.1f", sorted[sorted.count / 2],
                    sorted[min(sorted.count - 1, sorted.count * 99 / 100)])
        }
        return s
    }

    /// Milliseconds from an Unlock's answer to the next holder's Lock answer (0 if it came
    /// first), for holders that were waiting when the lock was released.
    static func lockHandOvers(_ h: History) -> [Double] {
        let locks = h.locks.filter { $0.kind == .lock && $0.acquired }.sorted { $0.returned! < $1.returned! }
        var out: [Double] = []
        for (prev, next) in zip(locks, locks.dropFirst()) {
            guard let release = prev.releaseCall, let released = prev.releaseReturned, next.call < release else {
                continue
            }
            out.append(Double(max(0, next.returned! - released)) / 1e6)
        }
        return out
    }
}

/// A flag set on one thread and read on another.
final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}
