import Foundation

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
