import EtcdProto
import Foundation

// The public value types of the etcd client (and of VigilServer's in-process API, which answers
// with the same ones), and their conversions to and from etcd's protobuf messages.

/// A key and its value at one revision (etcd's `mvccpb.KeyValue`).
public struct KeyValue: Sendable, Hashable {
    public var key: [UInt8]
    public var value: [UInt8]
    /// The revision of the key's latest creation.
    public var createRevision: Int64
    /// The revision of the key's latest change.
    public var modRevision: Int64
    /// How many times the key was written since it was created (1 after the first put).
    public var version: Int64
    /// The lease the key is attached to (0: none).
    public var lease: Int64

    public init(
        key: [UInt8], value: [UInt8], createRevision: Int64 = 0, modRevision: Int64 = 0, version: Int64 = 0,
        lease: Int64 = 0
    ) {
        self.key = key
        self.value = value
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.lease = lease
    }

    /// The key as UTF-8 text.
    public var keyString: String { String(decoding: key, as: UTF8.self) }
    /// The value as UTF-8 text.
    public var valueString: String { String(decoding: value, as: UTF8.self) }

    public init(_ p: Mvccpb_KeyValue) {
        self.init(
            key: [UInt8](p.key), value: [UInt8](p.value), createRevision: p.createRevision,
            modRevision: p.modRevision, version: p.version, lease: p.lease)
    }
}

/// Which server answered, and at what revision.
public struct ResponseHeader: Sendable, Hashable {
    public var clusterID: UInt64
    public var memberID: UInt64
    /// The store's revision when the request was served.
    public var revision: Int64
    public var raftTerm: UInt64

    public init(_ p: Etcdserverpb_ResponseHeader) {
        clusterID = p.clusterID
        memberID = p.memberID
        revision = p.revision
        raftTerm = p.raftTerm
    }
}

/// The keys a request covers: one key, a prefix, every key from one on, a half-open range, or all.
public struct KeyRange: Sendable, Hashable {
    public var key: [UInt8]
    /// etcd's `range_end`: empty for one key, `[0]` for "from `key` on".
    public var rangeEnd: [UInt8]

    public init(key: [UInt8], rangeEnd: [UInt8] = []) {
        self.key = key
        self.rangeEnd = rangeEnd
    }

    public static func key(_ key: [UInt8]) -> KeyRange { KeyRange(key: key) }
    public static func key(_ key: String) -> KeyRange { KeyRange(key: Array(key.utf8)) }
    /// Every key that starts with `prefix` (an empty prefix: every key).
    public static func prefix(_ prefix: [UInt8]) -> KeyRange {
        KeyRange(key: prefix.isEmpty ? [0] : prefix, rangeEnd: prefixEnd(prefix))
    }
    public static func prefix(_ prefix: String) -> KeyRange { .prefix(Array(prefix.utf8)) }
    /// Every key from `key` on.
    public static func fromKey(_ key: [UInt8]) -> KeyRange { KeyRange(key: key.isEmpty ? [0] : key, rangeEnd: [0]) }
    public static func fromKey(_ key: String) -> KeyRange { .fromKey(Array(key.utf8)) }
    /// Keys in [`start`, `end`).
    public static func range(_ start: [UInt8], _ end: [UInt8]) -> KeyRange { KeyRange(key: start, rangeEnd: end) }
    public static func range(_ start: String, _ end: String) -> KeyRange {
        KeyRange(key: Array(start.utf8), rangeEnd: Array(end.utf8))
    }
    /// Every key.
    public static var all: KeyRange { KeyRange(key: [0], rangeEnd: [0]) }

    /// The end of the range of keys that start with `prefix` (etcd's `GetPrefixRangeEnd`).
    public static func prefixEnd(_ prefix: [UInt8]) -> [UInt8] {
        var end = prefix
        while let last = end.last {
            if last < 0xFF {
                end[end.count - 1] = last + 1
                return end
            }
            end.removeLast()
        }
        return [0]
    }
}

/// How a range is read.
public struct RangeOptions: Sendable, Hashable {
    public enum SortOrder: Sendable, Hashable { case none, ascend, descend }
    public enum SortTarget: Sendable, Hashable { case key, version, createRevision, modRevision, value }

    /// At most this many keys (0: no limit); `RangeResult.more` tells whether there were more.
    public var limit: Int64 = 0
    /// Read at this revision (0: the newest).
    public var revision: Int64 = 0
    public var sortOrder = SortOrder.none
    public var sortTarget = SortTarget.key
    /// Served by the member asked, without a consensus round (may be stale on a cluster).
    public var serializable = false
    public var keysOnly = false
    public var countOnly = false
    public var minModRevision: Int64 = 0
    public var maxModRevision: Int64 = 0
    public var minCreateRevision: Int64 = 0
    public var maxCreateRevision: Int64 = 0

    public init() {}
}

/// A range's answer.
public struct RangeResult: Sendable {
    public var header: ResponseHeader
    public var kvs: [KeyValue]
    /// Whether the limit left keys out.
    public var more: Bool
    /// How many keys the range holds (all of them, whatever the limit).
    public var count: Int64
}

/// How a key is written.
public struct PutOptions: Sendable, Hashable {
    /// Attach the key to this lease (0: none).
    public var lease: Int64 = 0
    /// Answer with the key's previous value.
    public var prevKV = false
    /// Keep the current value (change the lease only).
    public var ignoreValue = false
    /// Keep the current lease.
    public var ignoreLease = false
    public init(lease: Int64 = 0, prevKV: Bool = false) {
        self.lease = lease
        self.prevKV = prevKV
    }
}

public struct PutResult: Sendable {
    public var header: ResponseHeader
    /// The previous value, when asked for and the key existed.
    public var prevKV: KeyValue?
}

public struct DeleteResult: Sendable {
    public var header: ResponseHeader
    /// How many keys were deleted.
    public var deleted: Int64
    /// The deleted keys' values, when asked for.
    public var prevKVs: [KeyValue]
}

/// One comparison of a transaction's guard.
public struct Compare: Sendable, Hashable {
    public enum Result: Sendable, Hashable { case equal, notEqual, greater, less }
    public enum Target: Sendable, Hashable {
        case version(Int64)
        case createRevision(Int64)
        case modRevision(Int64)
        case value([UInt8])
        case lease(Int64)
    }
    public var range: KeyRange
    public var result: Result
    public var target: Target

    public init(_ range: KeyRange, _ result: Result, _ target: Target) {
        self.range = range
        self.result = result
        self.target = target
    }

    public static func version(_ key: String, _ r: Result, _ v: Int64) -> Compare { Compare(.key(key), r, .version(v)) }
    public static func createRevision(_ key: String, _ r: Result, _ v: Int64) -> Compare {
        Compare(.key(key), r, .createRevision(v))
    }
    public static func modRevision(_ key: String, _ r: Result, _ v: Int64) -> Compare {
        Compare(.key(key), r, .modRevision(v))
    }
    public static func value(_ key: String, _ r: Result, _ v: String) -> Compare {
        Compare(.key(key), r, .value(Array(v.utf8)))
    }
    public static func lease(_ key: String, _ r: Result, _ v: Int64) -> Compare { Compare(.key(key), r, .lease(v)) }
}

/// One operation of a transaction.
public indirect enum Op: Sendable {
    case range(KeyRange, RangeOptions)
    case put(key: [UInt8], value: [UInt8], PutOptions)
    case delete(KeyRange, prevKV: Bool)
    case txn(Txn)

    public static func get(_ key: String, _ options: RangeOptions = RangeOptions()) -> Op { .range(.key(key), options) }
    public static func put(_ key: String, _ value: String, _ options: PutOptions = PutOptions()) -> Op {
        .put(key: Array(key.utf8), value: Array(value.utf8), options)
    }
    public static func delete(_ key: String) -> Op { .delete(.key(key), prevKV: false) }
}

/// A transaction: if every comparison holds, the `success` operations, otherwise the `failure`
/// ones, all at one revision. Built as `Txn().when(…).then(…).else(…)`.
public struct Txn: Sendable {
    public var compare: [Compare] = []
    public var success: [Op] = []
    public var failure: [Op] = []
    public init() {}

    public func when(_ c: Compare...) -> Txn { when(c) }
    public func then(_ ops: Op...) -> Txn { then(ops) }
    public func `else`(_ ops: Op...) -> Txn { `else`(ops) }
    public func when(_ c: [Compare]) -> Txn {
        var t = self
        t.compare += c
        return t
    }
    public func then(_ ops: [Op]) -> Txn {
        var t = self
        t.success += ops
        return t
    }
    public func `else`(_ ops: [Op]) -> Txn {
        var t = self
        t.failure += ops
        return t
    }
}

public struct TxnResult: Sendable {
    public var header: ResponseHeader
    /// Whether the comparisons held (the `success` operations ran).
    public var succeeded: Bool
    /// One answer per operation that ran, in order.
    public var responses: [OpResult]
}

public indirect enum OpResult: Sendable {
    case range(RangeResult)
    case put(PutResult)
    case delete(DeleteResult)
    case txn(TxnResult)
}

/// A lease's grant.
public struct Lease: Sendable, Hashable {
    public var id: Int64
    /// Seconds it lives without a keep-alive.
    public var ttl: Int64
    public init(id: Int64, ttl: Int64) {
        self.id = id
        self.ttl = ttl
    }
}

/// A lease's remaining life.
public struct LeaseInfo: Sendable {
    public var id: Int64
    /// Seconds left (-1: the lease does not exist, or expired).
    public var ttl: Int64
    public var grantedTTL: Int64
    /// The keys attached, when asked for.
    public var keys: [[UInt8]]
}

/// How a watch is made.
public struct WatchOptions: Sendable, Hashable {
    /// The first revision to deliver (0: changes from now on). Older revisions replay history.
    public var startRevision: Int64 = 0
    /// Each event carries the key's previous value.
    public var prevKV = false
    public var noPut = false
    public var noDelete = false
    /// Empty batches now and then tell the revision the watch has reached.
    public var progressNotify = false
    public init(startRevision: Int64 = 0, prevKV: Bool = false) {
        self.startRevision = startRevision
        self.prevKV = prevKV
    }
}

/// One change seen by a watch.
public struct WatchEvent: Sendable, Hashable {
    public enum Kind: Sendable, Hashable { case put, delete }
    public var kind: Kind
    /// The key after the change (after a delete: the key, with `modRevision` the delete's revision).
    public var kv: KeyValue
    /// The key before the change, when asked for and it existed.
    public var prevKV: KeyValue?

    public init(kind: Kind, kv: KeyValue, prevKV: KeyValue? = nil) {
        self.kind = kind
        self.kv = kv
        self.prevKV = prevKV
    }

    public init(_ p: Mvccpb_Event) {
        kind = p.type == .delete ? .delete : .put
        kv = KeyValue(p.kv)
        prevKV = p.hasPrevKv ? KeyValue(p.prevKv) : nil
    }

    /// The revision of the change.
    public var revision: Int64 { kv.modRevision }
}

/// What a watch delivers at a time: the events of one or more revisions, in order, or none (a
/// progress notification: the watch has seen everything through `header.revision`).
public struct WatchBatch: Sendable {
    public var header: ResponseHeader
    public var events: [WatchEvent]
    public var isProgressNotification: Bool { events.isEmpty }
}

/// What the client's calls throw.
public enum EtcdClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The server refused the request: its gRPC status code and etcd's message
    /// (e.g. `etcdserver: requested lease not found`).
    case rpc(code: Int, message: String)
    /// No endpoint could be reached, or the connection was lost during a call that is not safe to repeat.
    case unavailable(String)
    /// The watch's start revision, or the revision read, was compacted at this revision.
    case compacted(revision: Int64)
    /// The server canceled the watch, for this reason.
    case watchCanceled(String)
    /// The lease expired or was revoked while kept alive.
    case leaseExpired(Int64)
    /// Refused before sending: the request is not one etcd would serve.
    case invalidArgument(String)
    /// The client was closed.
    case closed

    public var description: String {
        switch self {
        case .rpc(let code, let message): return "rpc error: code = \(code) desc = \(message)"
        case .unavailable(let why): return "unavailable: \(why)"
        case .compacted(let r): return "required revision has been compacted (compacted at \(r))"
        case .watchCanceled(let why): return "watch canceled: \(why)"
        case .leaseExpired(let id): return "lease \(id) expired"
        case .invalidArgument(let why): return "invalid argument: \(why)"
        case .closed: return "client closed"
        }
    }

    /// etcd's message, for `.rpc`.
    public var message: String? {
        if case .rpc(_, let m) = self { return m }
        return nil
    }
}

// MARK: - Protobuf conversions (shared with VigilServer's in-process API)

extension KeyRange {
    /// A watch etcd would accept but that could never fire (an empty key, or an end not after the
    /// key) is refused before it is sent; other requests carry such ranges to the server, which
    /// answers with etcd's own error.
    func checkWatchable() throws(EtcdClientError) {
        if key.isEmpty { throw .invalidArgument("empty key") }
        if !rangeEnd.isEmpty && rangeEnd != [0] && !key.lexicographicallyPrecedes(rangeEnd) {
            throw .invalidArgument("empty range: range end must come after the key")
        }
    }
}

extension RangeOptions.SortOrder {
    var proto: Etcdserverpb_RangeRequest.SortOrder {
        switch self {
        case .none: return .none
        case .ascend: return .ascend
        case .descend: return .descend
        }
    }
}

extension RangeOptions.SortTarget {
    var proto: Etcdserverpb_RangeRequest.SortTarget {
        switch self {
        case .key: return .key
        case .version: return .version
        case .createRevision: return .create
        case .modRevision: return .mod
        case .value: return .value
        }
    }
}

/// Builds etcd's request messages from the public types and reads its answers back.
public enum EtcdMessages {
    public static func range(_ r: KeyRange, _ o: RangeOptions) throws(EtcdClientError) -> Etcdserverpb_RangeRequest {
        var p = Etcdserverpb_RangeRequest()
        p.key = Data(r.key)
        p.rangeEnd = Data(r.rangeEnd)
        p.limit = o.limit
        p.revision = o.revision
        p.sortOrder = o.sortOrder.proto
        p.sortTarget = o.sortTarget.proto
        p.serializable = o.serializable
        p.keysOnly = o.keysOnly
        p.countOnly = o.countOnly
        p.minModRevision = o.minModRevision
        p.maxModRevision = o.maxModRevision
        p.minCreateRevision = o.minCreateRevision
        p.maxCreateRevision = o.maxCreateRevision
        return p
    }

    public static func put(
        _ key: [UInt8], _ value: [UInt8], _ o: PutOptions
    ) throws(EtcdClientError)
        -> Etcdserverpb_PutRequest
    {
        var p = Etcdserverpb_PutRequest()
        p.key = Data(key)
        p.value = Data(value)
        p.lease = o.lease
        p.prevKv = o.prevKV
        p.ignoreValue = o.ignoreValue
        p.ignoreLease = o.ignoreLease
        return p
    }

    public static func delete(_ r: KeyRange, prevKV: Bool) throws(EtcdClientError) -> Etcdserverpb_DeleteRangeRequest {
        var p = Etcdserverpb_DeleteRangeRequest()
        p.key = Data(r.key)
        p.rangeEnd = Data(r.rangeEnd)
        p.prevKv = prevKV
        return p
    }

    public static func txn(_ t: Txn) throws(EtcdClientError) -> Etcdserverpb_TxnRequest {
        var p = Etcdserverpb_TxnRequest()
        p.compare = try t.compare.map { c throws(EtcdClientError) in try compare(c) }
        p.success = try t.success.map { o throws(EtcdClientError) in try op(o) }
        p.failure = try t.failure.map { o throws(EtcdClientError) in try op(o) }
        return p
    }

    static func compare(_ c: Compare) throws(EtcdClientError) -> Etcdserverpb_Compare {
        var p = Etcdserverpb_Compare()
        p.key = Data(c.range.key)
        p.rangeEnd = Data(c.range.rangeEnd)
        switch c.result {
        case .equal: p.result = .equal
        case .notEqual: p.result = .notEqual
        case .greater: p.result = .greater
        case .less: p.result = .less
        }
        switch c.target {
        case .version(let v):
            p.target = .version
            p.targetUnion = .version(v)
        case .createRevision(let v):
            p.target = .create
            p.targetUnion = .createRevision(v)
        case .modRevision(let v):
            p.target = .mod
            p.targetUnion = .modRevision(v)
        case .value(let v):
            p.target = .value
            p.targetUnion = .value(Data(v))
        case .lease(let v):
            p.target = .lease
            p.targetUnion = .lease(v)
        }
        return p
    }

    static func op(_ o: Op) throws(EtcdClientError) -> Etcdserverpb_RequestOp {
        var p = Etcdserverpb_RequestOp()
        switch o {
        case .range(let r, let opts): p.request = .requestRange(try range(r, opts))
        case .put(let k, let v, let opts): p.request = .requestPut(try put(k, v, opts))
        case .delete(let r, let prev): p.request = .requestDeleteRange(try delete(r, prevKV: prev))
        case .txn(let t): p.request = .requestTxn(try txn(t))
        }
        return p
    }

    public static func watchCreate(
        _ r: KeyRange, _ o: WatchOptions
    ) throws(EtcdClientError)
        -> Etcdserverpb_WatchCreateRequest
    {
        try r.checkWatchable()
        var c = Etcdserverpb_WatchCreateRequest()
        c.key = Data(r.key)
        c.rangeEnd = Data(r.rangeEnd)
        c.startRevision = o.startRevision
        c.prevKv = o.prevKV
        c.progressNotify = o.progressNotify
        c.fragment = true
        if o.noPut { c.filters.append(.noput) }
        if o.noDelete { c.filters.append(.nodelete) }
        return c
    }

    public static func leaseGrant(ttl: Int64, id: Int64) -> Etcdserverpb_LeaseGrantRequest {
        var p = Etcdserverpb_LeaseGrantRequest()
        p.ttl = ttl
        p.id = id
        return p
    }

    public static func leaseRevoke(_ id: Int64) -> Etcdserverpb_LeaseRevokeRequest {
        var p = Etcdserverpb_LeaseRevokeRequest()
        p.id = id
        return p
    }

    public static func timeToLive(_ id: Int64, keys: Bool) -> Etcdserverpb_LeaseTimeToLiveRequest {
        var p = Etcdserverpb_LeaseTimeToLiveRequest()
        p.id = id
        p.keys = keys
        return p
    }

    public static func keepAlive(_ id: Int64) -> Etcdserverpb_LeaseKeepAliveRequest {
        var p = Etcdserverpb_LeaseKeepAliveRequest()
        p.id = id
        return p
    }

    public static func result(_ p: Etcdserverpb_RangeResponse) -> RangeResult {
        RangeResult(header: ResponseHeader(p.header), kvs: p.kvs.map(KeyValue.init), more: p.more, count: p.count)
    }

    public static func result(_ p: Etcdserverpb_PutResponse) -> PutResult {
        PutResult(header: ResponseHeader(p.header), prevKV: p.hasPrevKv ? KeyValue(p.prevKv) : nil)
    }

    public static func result(_ p: Etcdserverpb_DeleteRangeResponse) -> DeleteResult {
        DeleteResult(header: ResponseHeader(p.header), deleted: p.deleted, prevKVs: p.prevKvs.map(KeyValue.init))
    }

    public static func result(_ p: Etcdserverpb_TxnResponse) -> TxnResult {
        TxnResult(
            header: ResponseHeader(p.header), succeeded: p.succeeded,
            responses: p.responses.compactMap { r -> OpResult? in
                switch r.response {
                case .responseRange(let x): return .range(result(x))
                case .responsePut(let x): return .put(result(x))
                case .responseDeleteRange(let x): return .delete(result(x))
                case .responseTxn(let x): return .txn(result(x))
                case nil: return nil
                }
            })
    }

    public static func result(_ p: Etcdserverpb_LeaseTimeToLiveResponse) -> LeaseInfo {
        LeaseInfo(id: p.id, ttl: p.ttl, grantedTTL: p.grantedTtl, keys: p.keys.map { [UInt8]($0) })
    }
}
