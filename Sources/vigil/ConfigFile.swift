import Foundation
import Yams

/// etcd's YAML configuration file (`--config-file`), flattened to flag names: the same keys as
/// the flags (`data-dir`, `listen-client-urls`, …), the TLS settings nested under
/// `client-transport-security` and `peer-transport-security` as etcd nests them, lists joined
/// with commas. Yams parses the YAML (libyaml): a format library made for the job.
enum ConfigFile {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// The flag name an `ETCD_*` variable stands for: `ETCD_DATA_DIR` → `data-dir`.
    static func key(forEnvironment env: String) -> String {
        env.dropFirst("ETCD_".count).lowercased().replacingOccurrences(of: "_", with: "-")
    }

    /// Keys whose value is a Go duration: a bare number in the file is nanoseconds, as Go's JSON
    /// decoding of `time.Duration` reads it.
    static let durations: Set<String> = [
        "experimental-watch-progress-notify-interval", "auto-compaction-check-interval",
    ]

    static func load(_ path: String) throws -> [String: String] {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw Failure(description: "cannot read --config-file \(path): \(error.localizedDescription)")
        }
        let parsed: Any?
        do { parsed = try Yams.load(yaml: text) } catch {
            throw Failure(description: "--config-file \(path) is not valid YAML: \(error)")
        }
        guard let top = parsed as? [String: Any] else {
            if parsed == nil { return [:] }
            throw Failure(description: "--config-file \(path): expected a mapping of etcd's settings at the top level")
        }
        var out: [String: String] = [:]
        for (key, value) in top {
            switch key {
            case "client-transport-security", "peer-transport-security":
                guard let nested = value as? [String: Any] else {
                    throw Failure(description: "--config-file \(path): \(key) must be a mapping")
                }
                let peer = key.hasPrefix("peer")
                for (k, v) in nested {
                    let name = k == "crl-file" ? (peer ? "peer-crl-file" : "client-crl-file") : (peer ? "peer-" + k : k)
                    if let s = scalar(v, key: name) { out[name] = s }
                }
            default:
                if let s = scalar(value, key: key) { out[key] = s }
            }
        }
        for (name, value) in out where IgnoredFlags.known[name] != nil {
            IgnoredFlags.seen.append((name, value))
            out[name] = nil
        }
        return out
    }

    private static func scalar(_ v: Any, key: String) -> String? {
        switch v {
        case let b as Bool: return b ? "true" : "false"
        case let i as Int:
            return durations.contains(key) ? "\(max(1, i / 1_000_000))ms" : String(i)
        case let d as Double: return String(d)
        case let s as String: return s
        case let a as [Any]: return a.compactMap { scalar($0, key: key) }.joined(separator: ",")
        default: return nil
        }
    }
}

/// `--config-file`'s settings, read once at start (the command is a value type, decoded by
/// ArgumentParser, so they live here).
final class FileSettings: @unchecked Sendable {
    static let shared = FileSettings()
    var values: [String: String]?
}
