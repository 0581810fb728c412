import EtcdProto
import EventLoop
import Foundation

/// A run's plan: what it drives, for how long, with which traffic and faults.
public struct Profile: Codable, Sendable {
    public var name: String
    public var target: TargetKind
    public var seconds: Double
    public var mix = TrafficMix()
    public var faults: [FaultPlan] = []
    /// Failpoints on from the start (a deliberately broken server).
    public var serverFailpoints: String?
    /// The validators this run must find broken (for a broken server); empty: none may be.
    public var expect: [String] = []

    public init(name: String, target: TargetKind, seconds: Double, faults: [FaultPlan] = []) {
        self.name = name
        self.target = target
        self.seconds = seconds
        self.faults = faults
    }
}

extension Profile {
    /// CI's short profiles: every validator, a kill, a failpoint crash, a pause past the leases'
    /// TTL, against Vigil and against etcd 3.4; and two broken servers the validators must catch.
    public static let ci: [Profile] = [
        Profile(
            name: "vigil-faults", target: .vigil, seconds: 24,
            faults: [
                FaultPlan(at: 5, .kill),
                FaultPlan(
                    at: 10, .failpoint(name: "walAfterWrite", spec: "20%panic", holdMilliseconds: 3000, trigger: "")),
                FaultPlan(at: 15, .pause(milliseconds: 4000)),
            ]),
        Profile(
            name: "etcd-faults", target: .etcd, seconds: 16,
            faults: [FaultPlan(at: 5, .kill), FaultPlan(at: 9, .pause(milliseconds: 4000))]),
        brokenHub, brokenLock, brokenLease, brokenLog,
    ]

    /// The hub drops one delivery in 200: the watch validators must say so.
    public static var brokenHub: Profile {
        var p = Profile(name: "broken-hub", target: .vigil, seconds: 6)
        p.serverFailpoints = "hubSkipEvent=0.5%return"
        p.expect = ["watch.reliable"]
        return p
    }

    /// Lock and Campaign answered without waiting their turn now and then: the lock validator
    /// must say so.
    public static var brokenLock: Profile {
        var p = Profile(name: "broken-lock", target: .vigil, seconds: 6)
        p.serverFailpoints = "lockIgnoreQueue=30%return"
        p.expect = ["lock.safety", "election.safety"]
        return p
    }

    /// Expired leases are never revoked: the lease validator must say so.
    public static var brokenLease: Profile {
        var p = Profile(name: "broken-lease", target: .vigil, seconds: 8)
        p.serverFailpoints = "leaseBeforeRevoke=return"
        p.expect = ["lease"]
        return p
    }

    /// Some log records are acknowledged but never written, then the server is killed: the lost
    /// writes must show.
    public static var brokenLog: Profile {
        var p = Profile(name: "broken-log", target: .vigil, seconds: 8, faults: [FaultPlan(at: 4, .kill)])
        p.serverFailpoints = "walWrite=2%return"
        p.expect = ["durability"]
        return p
    }

    /// `make robustness`: every failpoint in turn, kills, pauses, longer runs, the mirror over a
    /// 3-member cluster, and etcd.
    public static var all: [Profile] {
        func fp(_ name: String, _ spec: String, trigger: String = "", hold: Int = 4000) -> FaultPlan.Kind {
            .failpoint(name: name, spec: spec, holdMilliseconds: hold, trigger: trigger)
        }
        let crashes: [(String, FaultPlan.Kind)] = [
            ("wal-before-write", fp("walBeforeWrite", "10%panic")),
            ("wal-after-write", fp("walAfterWrite", "10%panic")),
            ("wal-enospc", fp("walWrite", "1*error(ENOSPC)")),
            ("checkpoint-midway", fp("checkpointMidway", "panic")),
            ("checkpoint-before-commit", fp("checkpointBeforeCommit", "panic")),
            ("compaction-midway", fp("compactionMidway", "30%panic")),
            ("defrag-before-swap", fp("defragBeforeSwap", "panic", trigger: "defrag")),
            ("snapshot-mid-send", fp("snapshotMidSend", "panic", trigger: "snapshot")),
            ("lease-before-revoke", fp("leaseBeforeRevoke", "panic", hold: 8000)),
            ("watch-slow-send", fp("watchBeforeSend", "2%sleep(100)", hold: 5000)),
        ]
        var out = crashes.map { name, kind in
            Profile(
                name: "failpoint-" + name, target: .vigil, seconds: 30,
                faults: [FaultPlan(at: 5, kind), FaultPlan(at: 15, kind), FaultPlan(at: 24, .kill)])
        }
        out.append(
            Profile(
                name: "vigil-kills", target: .vigil, seconds: 60,
                faults: stride(from: 6.0, to: 56, by: 8).map { FaultPlan(at: $0, .kill) }))
        out.append(
            Profile(
                name: "vigil-pauses", target: .vigil, seconds: 40,
                faults: [
                    FaultPlan(at: 5, .pause(milliseconds: 4500)), FaultPlan(at: 18, .pause(milliseconds: 1000)),
                    FaultPlan(at: 28, .pause(milliseconds: 6000)),
                ]))
        out.append(
            Profile(
                name: "etcd-kills-pauses", target: .etcd, seconds: 40,
                faults: [
                    FaultPlan(at: 6, .kill), FaultPlan(at: 14, .pause(milliseconds: 4500)), FaultPlan(at: 24, .kill),
                    FaultPlan(at: 32, .pause(milliseconds: 1500)),
                ]))
        out.append(
            Profile(
                name: "mirror-members", target: .mirror, seconds: 40,
                faults: [
                    FaultPlan(at: 6, .kill), FaultPlan(at: 14, .pause(milliseconds: 4500)), FaultPlan(at: 24, .kill),
                ]))
        return out + [brokenHub, brokenLock, brokenLease, brokenLog]
    }
}

/// What a run found.
public struct RunReport: Codable, Sendable {
    public var profile: Profile
    public var seed: UInt64
    public var violations: [Violation]
    public var stats: [String: String]
    /// Where the history and the server's log were written, if anywhere.
    public var directory: String?

    /// Whether the run did what it had to: no violation, or for a broken server every one it
    /// expected.
    public var passed: Bool {
        if profile.expect.isEmpty { return violations.allSatisfy { $0.known != nil } }
        return profile.expect.allSatisfy { e in violations.contains { $0.validator == e } }
    }

    public var summary: String {
        var lines = [
            "\(profile.name) (\(profile.target), \(Int(profile.seconds)) s, seed \(seed)): "
                + (passed ? "passed" : "FAILED")
                + (profile.expect.isEmpty
                    ? "" : " (a broken server; expected \(profile.expect.joined(separator: ", ")))")
        ]
        lines.append("  " + stats.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        if let f = profile.serverFailpoints { lines.append("  failpoints from the start: \(f)") }
        for v in violations { lines.append(v.description) }
        let known = violations.filter { $0.known != nil }.count
        if known > 0 { lines.append("  \(known) of these are known bugs of \(profile.target), named above") }
        if let d = directory { lines.append("  history and logs: \(d)") }
        return lines.joined(separator: "\n")
    }
}

/// Runs the validators on a recorded history.
public enum Validation {
    public static func validate(_ h: History, target: TargetKind = .vigil) -> [Violation] {
        var t = monotonicNanos()
        func lap(_ what: String) {
            if ProcessInfo.processInfo.environment["VIGIL_ROBUSTNESS_TIMES"] != nil {
                FileHandle.standardError.write(Data("\(what): \((monotonicNanos() - t) / 1_000_000) ms\n".utf8))
            }
            t = monotonicNanos()
        }
        let ref = Reference(h)
        lap("reference")
        let attr = Attribution(h, ref)
        lap("attribution")
        var v: [Violation] = []
        LinearizabilityValidator.validate(h, ref, attr, into: &v)
        lap("linearizability")
        WatchValidator.validate(h, ref, into: &v)
        lap("watch")
        LockValidator.validate(h, ref, into: &v)
        lap("lock")
        // etcd's leader adds its election timeout and a 500 ms tick to a lease's end.
        LeaseValidator.validate(h, ref, bound: target == .vigil ? 2_000_000_000 : 3_000_000_000, into: &v)
        DurabilityValidator.validate(h, ref, into: &v)
        lap("lease, durability")
        return capped(v)
    }

    /// At most five violations of each validator, then how many more.
    static func capped(_ all: [Violation], each: Int = 5) -> [Violation] {
        var seen: [String: Int] = [:]
        var out: [Violation] = []
        for v in all {
            seen[v.validator, default: 0] += 1
            if seen[v.validator]! <= each { out.append(v) }
        }
        for (validator, n) in seen.sorted(by: { $0.key < $1.key }) where n > each {
            out.append(Violation(validator: validator, message: "\(n - each) more like these", window: []))
        }
        return out
    }
}

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
