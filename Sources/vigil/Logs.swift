import ArgumentParser
import Foundation
import Logging
import VigilCore
import VigilServer

#if os(Linux)
import CMalloc
#endif

/// `--log-outputs`: `default` / `stderr`, `stdout`, or files (appended to).
final class LogOutputs: @unchecked Sendable {
    private let handles: [FileHandle]
    private let lock = NSLock()

    private init(_ handles: [FileHandle]) { self.handles = handles }

    static func open(_ names: [String]) throws -> LogOutputs {
        var handles: [FileHandle] = []
        for name in names.isEmpty ? ["default"] : names {
            switch name {
            case "default", "stderr": handles.append(.standardError)
            case "stdout": handles.append(.standardOutput)
            default:
                if !FileManager.default.fileExists(atPath: name) {
                    guard FileManager.default.createFile(atPath: name, contents: nil) else {
                        throw ConfigFile.Failure(description: "cannot create --log-outputs file \(name)")
                    }
                }
                guard let h = FileHandle(forWritingAtPath: name) else {
                    throw ConfigFile.Failure(description: "cannot open --log-outputs file \(name)")
                }
                h.seekToEndOfFile()
                handles.append(h)
            }
        }
        return LogOutputs(handles)
    }

    func write(_ line: String) {
        let data = Data(line.utf8)
        lock.withLock { for h in handles { h.write(data) } }
    }
}

/// etcd's `--logger zap` lines: one JSON object per line with `level`, `ts`, `caller`, `msg` and
/// the metadata as fields.
struct ZapJSONLogHandler: LogHandler {
    let label: String
    let outputs: LogOutputs
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    init(label: String, outputs: LogOutputs) {
        self.label = label
        self.outputs = outputs
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// UTC with milliseconds, as etcd 3.5's zap lines: `2026-11-30T14:10:00.123Z`.
    static func timestamp() -> String {
        var tv = timeval()
        gettimeofday(&tv, nil)
        var t = tv.tv_sec
        var parts = tm()
        gmtime_r(&t, &parts)
        return String(
            format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1,
            Int(parts.tm_mday), Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec), Int(tv.tv_usec / 1000))
    }

    static func levelName(_ level: Logger.Level) -> String {
        switch level {
        case .trace, .debug: "debug"
        case .info, .notice: "info"
        case .warning: "warn"
        case .error: "error"
        case .critical: "fatal"
        }
    }

    func log(
        level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?, source: String,
        file: String, function: String, line: UInt
    ) {
        let caller = file.split(separator: "/").suffix(2).joined(separator: "/") + ":\(line)"
        var fields: [(String, String)] = [
            ("level", Self.levelName(level)), ("ts", Self.timestamp()), ("caller", caller),
            ("msg", message.description),
        ]
        for (k, v) in metadata.merging(explicit ?? [:], uniquingKeysWith: { $1 }).sorted(by: { $0.key < $1.key }) {
            fields.append((k, v.description))
        }
        let body = fields.map { "\(JSONText.quote($0.0)):\(JSONText.quote($0.1))" }.joined(separator: ",")
        outputs.write("{" + body + "}\n")
    }
}

/// `vigil --version`: etcd's lines (tools read "etcd Version: …"), and Vigil's own beside them.
/// etcd's `--log-level` names.
func parseLogLevel(_ name: String) throws -> Logger.Level {
    switch name.lowercased() {
    case "debug": return .debug
    case "info": return .info
    case "warn", "warning": return .warning
    case "error": return .error
    case "panic", "fatal": return .critical
    case let other: throw ValidationError("unknown --log-level \(other)")
    }
}

/// Text log lines on standard error (etcd's capnslog default).
func bootstrapTextLogs(_ level: Logger.Level) {
    LoggingSystem.bootstrap { label in
        var h = StreamLogHandler.standardError(label: label)
        h.logLevel = level
        return h
    }
}

/// Buffers of 128 KiB and more (the watch hub's tables, large responses) get their own mappings
/// and go back to the system when freed. glibc's default raises this threshold each time such a
/// buffer is freed, after which big buffers come from the heap and leave holes there that the
/// process keeps.
///
/// The heaps themselves keep up to 2 MiB free at their top and grow 256 KiB at a time: the loop
/// runs on a thread of its own, whose heap glibc otherwise shrinks (an `mprotect`) whenever 128
/// KiB at its top is free and grows again on the next burst of requests, a few per cent of the
/// loop's time under load.
func tuneMalloc() {
    #if os(Linux)
    mallopt(M_MMAP_THRESHOLD, 128 << 10)
    mallopt(M_TRIM_THRESHOLD, 2 << 20)
    mallopt(M_TOP_PAD, 256 << 10)
    #endif
}

enum VersionText {
    static var text: String {
        #if arch(x86_64)
        let arch = "amd64"
        #elseif arch(arm64)
        let arch = "arm64"
        #else
        let arch = "unknown"
        #endif
        return """
            etcd Version: \(VigilServer.etcdVersion)
            Git SHA: Not provided (Vigil is not built from etcd's tree)
            Go Version: not applicable (Vigil is written in Swift)
            Go OS/Arch: linux/\(arch)
            Vigil Version: \(VigilServer.version)
            """
    }
}
