import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Nanoseconds on the monotonic clock: every time in a history (calls, returns, responses,
/// faults) is on it, whichever thread recorded it.
public func monotonicNanos() -> Int64 {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Int64(t.tv_sec) * 1_000_000_000 + Int64(t.tv_nsec)
}

/// A key-value as a client saw it (keys and values of the traffic are ASCII).
public struct KV: Codable, Hashable, Sendable, CustomStringConvertible {
    public var key: String
    public var value: String
    public var createRevision: Int64
    public var modRevision: Int64
    public var version: Int64
    public var lease: Int64

    public init(
        key: String, value: String, createRevision: Int64, modRevision: Int64, version: Int64, lease: Int64 = 0
    ) {
        self.key = key
        self.value = value
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.lease = lease
    }

    public var description: String {
        "\(key)=\(value)@c\(createRevision)/m\(modRevision)/v\(version)" + (lease != 0 ? "/l\(lease)" : "")
    }
}

// MARK: KV operations

/// A single-key operation inside a transaction (the traffic's txns hold only these).
public enum TxnOp: Codable, Hashable, Sendable {
    case get(String)
    case put(String, value: String, lease: Int64)
    case delete(String)

    public var key: String {
        switch self {
        case .get(let k), .put(let k, _, _), .delete(let k): k
        }
    }
}

/// A transaction compare on one key (`result` is always EQUAL in the traffic).
public struct Compare: Codable, Hashable, Sendable {
    public enum Target: String, Codable, Sendable { case version, mod, create, value }
    public var key: String
    public var target: Target
    public var number: Int64
    public var value: String
    public init(key: String, target: Target, number: Int64 = 0, value: String = "") {
        self.key = key
        self.target = target
        self.number = number
        self.value = value
    }

    /// Whether the compare holds on `kv` (an absent key compares as zero, and VALUE is false).
    public func holds(on kv: KV?) -> Bool {
        switch target {
        case .version: (kv?.version ?? 0) == number
        case .mod: (kv?.modRevision ?? 0) == number
        case .create: (kv?.createRevision ?? 0) == number
        case .value: kv.map { $0.value == value } ?? false
        }
    }
}

/// What a client asked.
public enum Request: Codable, Hashable, Sendable {
    /// A range: one key (`end` empty) or `[key, end)`; `revision` 0 reads the latest.
    case range(key: String, end: String, revision: Int64, limit: Int64)
    /// A put or a delete is a txn with one op and no compares.
    case txn(compares: [Compare], success: [TxnOp], failure: [TxnOp])
    case leaseGrant(ttl: Int64)
    case leaseRevoke(id: Int64)
    case compact(revision: Int64)

    /// The keys a request may write.
    public var writtenKeys: Set<String> {
        guard case .txn(_, let s, let f) = self else { return [] }
        return Set((s + f).compactMap { if case .get = $0 { nil } else { $0.key } })
    }
}

/// One op's result inside a txn answer.
public enum TxnResult: Codable, Hashable, Sendable {
    case got(KV?)
    case put
    case deleted(Int64)
}

/// What the server answered.
public enum Response: Codable, Hashable, Sendable {
    case range(kvs: [KV], count: Int64, more: Bool)
    case txn(succeeded: Bool, results: [TxnResult])
    case leaseGrant(id: Int64, ttl: Int64)
    case leaseRevoke
    case compact
}

/// One request and its outcome. `returned` is nil when the outcome is unknown (a timeout, a
/// connection lost): the request may or may not have taken effect.
public struct Operation: Codable, Sendable {
    public var id: Int
    public var client: Int
    public var request: Request
    public var call: Int64
    public var returned: Int64?
    public var response: Response?
    /// The response header's revision (writes: the revision they made, or the current one).
    public var revision: Int64
    /// The error text when the server refused it (a definite answer: nothing happened).
    public var error: String?

    public var succeeded: Bool { returned != nil && error == nil && response != nil }
    public var unknown: Bool { returned == nil }
}

// MARK: Watches

/// A watch event as received.
public struct EventRecord: Codable, Hashable, Sendable, CustomStringConvertible {
    public var isPut: Bool
    public var kv: KV
    public var prevKV: KV?
    public var revision: Int64 { kv.modRevision }
    public init(isPut: Bool, kv: KV, prevKV: KV?) {
        self.isPut = isPut
        self.kv = kv
        self.prevKV = prevKV
    }
    public var description: String { (isPut ? "PUT " : "DELETE ") + kv.description }
}

/// One watch response (fragments joined, as etcd's client joins them).
public struct WatchResponseRecord: Codable, Sendable {
    public var time: Int64
    public var headerRevision: Int64
    public var events: [EventRecord]
    public var created = false
    public var canceled = false
    public var compactRevision: Int64 = 0
    public var cancelReason = ""
    /// How many fragments it came in (1 unless the watch asked for fragments).
    public var fragments = 1

    /// etcd's client definition of a progress notification.
    public var isProgress: Bool {
        events.isEmpty && !created && !canceled && compactRevision == 0 && headerRevision != 0
    }
}

/// One watch request on a stream and every response it got, until canceled or the stream ended.
public struct WatchRecord: Codable, Sendable {
    public var id: Int
    public var client: Int
    public var key: String
    /// etcd's range_end ("" one key, "\0" every key from `key`).
    public var end: String
    public var startRevision: Int64
    public var prevKV = false
    public var progressNotify = false
    public var noPut = false
    public var noDelete = false
    public var fragment = false
    /// The end-of-everything watch that makes the reference history.
    public var isCollector = false
    public var opened: Int64
    public var responses: [WatchResponseRecord] = []
    /// Times RequestProgress was sent on the stream while this watch was its only one.
    public var progressRequests: [Int64] = []
    /// Why it ended: "canceled", "compacted", "closed" (stream or connection), "done".
    public var ended: String?

    /// Whether `key` falls in the watched range.
    public func covers(_ k: String) -> Bool { KeySpace.contains(k, key: key, end: end) }
}

/// etcd's `[key, range_end)` conventions on the traffic's ASCII keys.
public enum KeySpace {
    public static func contains(_ k: String, key: String, end: String) -> Bool {
        if end.isEmpty { return k == key }
        if end == "\0" { return k >= key }
        return k >= key && k < end
    }

    /// The end of the range of every key with `prefix` (etcd's `WithPrefix`).
    public static func prefixEnd(_ prefix: String) -> String {
        var b = Array(prefix.utf8)
        while let last = b.last {
            if last < 0xff {
                b[b.count - 1] = last + 1
                return String(decoding: b, as: UTF8.self)
            }
            b.removeLast()
        }
        return "\0"
    }
}

// MARK: Locks, elections, leases, faults

/// One Lock or Campaign, and its release (Unlock, Resign) if it got that far.
public struct LockRecord: Codable, Sendable {
    public enum Kind: String, Codable, Sendable { case lock, campaign }
    public var kind: Kind
    public var client: Int
    public var name: String
    /// The lease asked for (0: a session of the server's).
    public var lease: Int64
    public var call: Int64
    public var returned: Int64?
    public var error: String?
    public var key: String?
    public var headerRevision: Int64 = 0
    /// Campaign: the leader key's create revision and lease as answered.
    public var leaderRevision: Int64 = 0
    public var leaderLease: Int64 = 0
    public var releaseCall: Int64?
    public var releaseReturned: Int64?
    public var releaseRevision: Int64 = 0

    public var acquired: Bool { returned != nil && error == nil && key != nil }
}

/// What an election's Observe stream or a Leader call reported.
public struct LeaderReport: Codable, Sendable {
    public var client: Int
    public var time: Int64
    public var headerRevision: Int64
    public var kv: KV?
    /// From an Observe stream (else a Leader call); `stream` numbers the stream.
    public var stream: Int?
}

/// A lease and how it was kept: granted, renewed (each keep-alive answer), revoked.
public struct LeaseRecord: Codable, Sendable {
    public var id: Int64
    public var ttl: Int64
    public var granted: Int64
    /// Keep-alive answers: when, and the TTL they gave (0: the lease was gone).
    public var renewals: [Renewal] = []
    public var revokeCall: Int64?
    public var keys: [String] = []

    public struct Renewal: Codable, Sendable {
        public var time: Int64
        public var ttl: Int64
    }
}

/// A fault the run injected, and when.
public struct FaultRecord: Codable, Sendable {
    public var kind: String
    public var detail: String
    public var start: Int64
    public var end: Int64
}

/// Everything one run recorded.
public struct History: Codable, Sendable {
    public var operations: [Operation] = []
    public var watches: [WatchRecord] = []
    public var locks: [LockRecord] = []
    public var leaders: [LeaderReport] = []
    public var leases: [LeaseRecord] = []
    public var faults: [FaultRecord] = []
    /// When the server (re)started serving: leases restart their TTL there, as etcd's do.
    public var restarts: [Int64] = []
    /// The run's last revision and every key's state there (read once the traffic stopped).
    public var finalRevision: Int64 = 0
    public var finalState: [KV] = []
    /// When the final read was sent.
    public var finalTime: Int64 = 0
    public init() {}
}
