import Foundation

/// etcd flags that mean nothing for a single member without Raft, a WAL or a profiler: accepted
/// (so that etcd's command lines, kubeadm's among them, start Vigil unchanged), checked for type,
/// and logged once as ignored.
enum IgnoredFlags {
    enum Kind { case bool, unsigned, duration, string }

    static let known: [String: Kind] = [
        "snapshot-count": .unsigned, "heartbeat-interval": .unsigned, "election-timeout": .unsigned,
        "max-snapshots": .unsigned, "max-wals": .unsigned, "experimental-initial-corrupt-check": .bool,
        "experimental-corrupt-check-time": .duration, "enable-pprof": .bool, "enable-v2": .bool,
        "experimental-enable-v2v3": .string, "strict-reconfig-check": .bool, "pre-vote": .bool,
        "metrics": .string, "host-whitelist": .string, "experimental-backend-bbolt-freelist-type": .string,
        "experimental-memory-mlock": .bool, "experimental-snapshot-catchup-entries": .unsigned,
        "experimental-compaction-batch-limit": .unsigned, "experimental-warning-apply-duration": .duration,
        "grpc-keepalive-min-time": .duration, "grpc-keepalive-interval": .duration,
        "grpc-keepalive-timeout": .duration, "log-package-levels": .string, "debug": .bool,
        "peer-cert-allowed-cn": .string, "experimental-peer-skip-client-san-verification": .bool,
        "force-new-cluster": .bool,
    ]

    /// The ignored flags seen, with their values (logged at start).
    nonisolated(unsafe) static var seen: [(String, String)] = []

    struct BadValue: Error, CustomStringConvertible {
        let description: String
    }

    /// Takes the ignored flags out of `args` (`--flag value`, `--flag=value`, or a bare boolean),
    /// checking each value's type.
    static func extract(_ args: [String]) throws -> [String] {
        var out: [String] = []
        var i = 0
        while i < args.count {
            let a = args[i]
            i += 1
            guard a.hasPrefix("-") else {
                out.append(a)
                continue
            }
            let body = a.drop { $0 == "-" }
            let name = String(body.split(separator: "=", maxSplits: 1)[0])
            guard let kind = known[name] else {
                out.append(a)
                continue
            }
            var value: String
            if let eq = body.firstIndex(of: "=") {
                value = String(body[body.index(after: eq)...])
            } else if kind == .bool {
                value = "true"
            } else {
                guard i < args.count else { throw BadValue(description: "flag needs an argument: --\(name)") }
                value = args[i]
                i += 1
            }
            try check(name, kind, &value)
            seen.append((name, value))
        }
        return out
    }

    static func check(_ name: String, _ kind: Kind, _ value: inout String) throws {
        let ok: Bool
        switch kind {
        case .bool: ok = ["true", "false", "1", "0", "t", "f", "TRUE", "FALSE", "True", "False"].contains(value)
        case .unsigned: ok = UInt64(value) != nil
        case .duration:
            ok = value.range(of: #"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"#, options: .regularExpression) != nil
        case .string: ok = true
        }
        if !ok { throw BadValue(description: "invalid value \"\(value)\" for flag --\(name)") }
    }
}
