#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Named points where a test build misbehaves on purpose, as etcd's gofail does: it crashes, sleeps,
/// fails with an error or takes a deliberately wrong branch there, so that the robustness suite can
/// show what a crash or a stall at that exact point does, and that its validators catch a broken
/// server.
///
/// Failpoints exist only in debug builds (`swift build`, which the tests use); in a release build
/// `hit` is a constant `nil` and every call site compiles away. They are switched on by the
/// environment when the process starts:
///
///     VIGIL_FAILPOINTS='walBeforeWrite=10%panic;watchBeforeSend=sleep(200);walWrite=2*error(ENOSPC)'
///
/// Each term is gofail's `[<percent>%][<count>*]<action>[(<argument>)]`: the action runs at each
/// hit with the given probability (default 100%), at most `count` times (default: no limit).
/// Actions: `panic` (the process dies at once with SIGKILL, as a crash there would leave it),
/// `sleep(ms)` (the thread that hit it sleeps), `error(ENOSPC)` and `return` (the call site decides
/// what they mean; only call sites that can fail or branch honour them), `off`.
/// `VIGIL_FAILPOINT_SEED` seeds the percentages (a run is then reproducible).
public enum Failpoint {
    /// What a failpoint does when it fires.
    public enum Action: Equatable, Sendable {
        case panic
        case sleep(milliseconds: Int)
        case error(String)
        case `return`
    }

    /// The points, by name: where they sit, for the robustness suite's list.
    public static let names: [String: String] = [
        "walBeforeWrite": "before a group commit's record is written to the write-ahead log",
        "walAfterWrite": "after the record is durable, before anyone is answered",
        "walWrite":
            "the log write itself (error(ENOSPC): the disk is full; return: (broken) the record is not written)",
        "checkpointMidway": "inside a checkpoint: its records are in LMDB, its removals and meta entries not yet",
        "checkpointBeforeCommit": "a checkpoint's records are in LMDB, the log sequence they cover not yet",
        "compactionMidway": "before each step of a compaction's removal of old revisions",
        "defragBeforeSwap": "the defragmented copy has replaced the file, before the database reopens on it",
        "snapshotMidSend": "between two chunks of a Snapshot being sent",
        "snapshotMidRestore": "while --restore-snapshot writes the new data directory",
        "watchBeforeSend": "before a watch response is written to its stream",
        "leaseBeforeRevoke": "an expired lease is about to be revoked (return: (broken) it never is)",
        // Deliberately broken servers, to show that the validators catch them.
        "hubSkipEvent": "(broken on purpose) the watch hub drops one event of a revision",
        "lockIgnoreQueue": "(broken on purpose) a Lock or Campaign is answered without waiting its turn",
    ]

    #if DEBUG
    private final class Point {
        let action: Action
        let percent: Double
        var remaining: Int
        init(_ s: PointSpec) {
            action = s.action
            percent = s.percent
            remaining = s.count
        }
    }

    private final class Table: @unchecked Sendable {
        var points: [String: Point]
        var random: UInt64
        var lock = pthread_mutex_t()
        init(_ spec: String?, seed: UInt64) {
            points = Failpoint.parse(spec ?? "").mapValues(Point.init)
            random = seed | 1
            pthread_mutex_init(&lock, nil)
        }
    }

    private static let table: Table = {
        let spec = getenv("VIGIL_FAILPOINTS").map { String(cString: $0) }
        let seed = getenv("VIGIL_FAILPOINT_SEED").flatMap { UInt64(String(cString: $0)) } ?? 0x9E37_79B9_7F4A_7C15
        return Table(spec, seed: seed)
    }()

    /// Whether any failpoint is switched on (a cheap test at each call site).
    public static let enabled: Bool = !table.points.isEmpty
    #else
    public static let enabled = false
    #endif

    /// Parses `VIGIL_FAILPOINTS`; unknown names and bad terms are skipped with a line on stderr.
    static func parse(_ spec: String) -> [String: PointSpec] {
        var out: [String: PointSpec] = [:]
        for term in spec.split(separator: ";") {
            let parts = term.split(separator: "=", maxSplits: 1).map { String($0).trimmed }
            guard parts.count == 2, names[parts[0]] != nil, let p = PointSpec(parts[1]) else {
                complain("failpoint: ignored '\(term)'")
                continue
            }
            out[parts[0]] = p
        }
        return out
    }

    /// What fires at `name` now, if anything (consumes one of its counts). Call sites that can only
    /// crash or sleep use `trigger`.
    @inline(__always)
    public static func hit(_ name: StaticString) -> Action? {
        #if DEBUG
        guard enabled else { return nil }
        return fire(String(describing: name))
        #else
        return nil
        #endif
    }

    /// Runs `name`'s crash or sleep, if it fires; other actions are the call site's to honour.
    @inline(__always)
    public static func trigger(_ name: StaticString) {
        #if DEBUG
        guard enabled, let a = fire(String(describing: name)) else { return }
        perform(a, name: String(describing: name))
        #endif
    }

    /// Crashes or sleeps for `a` (nothing for the actions the call site decides on).
    public static func perform(_ a: Action, name: String) {
        switch a {
        case .panic:
            raise(SIGKILL)
        case .sleep(let ms):
            usleep(UInt32(ms) * 1000)
        case .error, .return:
            break
        }
    }

    #if DEBUG
    private static func fire(_ name: String) -> Action? {
        let t = table
        pthread_mutex_lock(&t.lock)
        defer { pthread_mutex_unlock(&t.lock) }
        guard let p = t.points[name], p.remaining != 0 else { return nil }
        if p.percent < 100 {
            // xorshift64*: seeded, so a run with the same seed fires at the same hits.
            t.random ^= t.random >> 12
            t.random ^= t.random << 25
            t.random ^= t.random >> 27
            let r = Double((t.random &* 0x2545_F491_4F6C_DD1D) >> 11) / Double(1 << 53)
            guard r * 100 < p.percent else { return nil }
        }
        if p.remaining > 0 { p.remaining -= 1 }
        complain("failpoint \(name): \(p.action)")
        return p.action
    }
    #endif

    private static func complain(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }
}

extension Failpoint {
    /// One parsed term: `[<percent>%][<count>*]<action>[(<argument>)]`.
    public struct PointSpec: Equatable, Sendable {
        public var action: Action
        public var percent: Double = 100
        /// How many times it may fire (-1: no limit).
        public var count: Int = -1

        public init?(_ text: String) {
            var rest = Substring(text)
            if let i = rest.firstIndex(of: "%") {
                guard let p = Double(rest[..<i]), p >= 0, p <= 100 else { return nil }
                percent = p
                rest = rest[rest.index(after: i)...]
            }
            if let i = rest.firstIndex(of: "*") {
                guard let n = Int(rest[..<i]), n >= 0 else { return nil }
                count = n
                rest = rest[rest.index(after: i)...]
            }
            var argument: String?
            var name = rest
            if let open = rest.firstIndex(of: "("), rest.last == ")" {
                name = rest[..<open]
                argument = String(rest[rest.index(after: open)..<rest.index(before: rest.endIndex)])
            }
            switch (name, argument) {
            case ("panic", nil): action = .panic
            case ("sleep", let a?):
                guard let ms = Int(a), ms >= 0 else { return nil }
                action = .sleep(milliseconds: ms)
            case ("error", let a): action = .error(a ?? "EIO")
            case ("return", _): action = .return
            case ("off", nil):
                action = .return
                count = 0
            default: return nil
            }
        }
    }
}

extension String {
    fileprivate var trimmed: String {
        var s = Substring(self)
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}
