import EtcdProto
import MVCC

/// Identity of this single-member cluster, as it appears in every response header.
public struct MemberIdentity: Sendable {
    public var clusterID: UInt64
    public var memberID: UInt64
    public var raftTerm: UInt64
    public var name: String
    public var peerURLs: [String]
    public var clientURLs: [String]

    public init(clusterID: UInt64, memberID: UInt64, raftTerm: UInt64 = 2, name: String, peerURLs: [String],
                clientURLs: [String]) {
        self.clusterID = clusterID
        self.memberID = memberID
        self.raftTerm = raftTerm
        self.name = name
        self.peerURLs = peerURLs
        self.clientURLs = clientURLs
    }
}

/// Limits taken from the command line (etcd's names and defaults).
public struct Limits: Sendable {
    /// `--max-request-bytes`.
    public var maxRequestBytes = 1_572_864
    /// `--max-txn-ops`.
    public var maxTxnOps = 128
    public init() {}
    /// gRPC's receive limit: the request limit plus 512 KiB, as etcd sets it.
    public var maxReceiveMessageBytes: Int { maxRequestBytes + 512 * 1024 }
}

/// Where writes wait to become durable. The server runs one group commit per loop turn and calls
/// back in revision order once the backend has fsynced.
public protocol CommitGate: AnyObject {
    /// Runs `body` on the loop once every revision up to `revision` is durable (at once if it is).
    func whenDurable(_ revision: Int64, _ body: @escaping () -> Void)
    /// Runs `body` on the loop once everything written so far, revisions or not (e.g. lease
    /// records), is durable.
    func whenFlushed(_ body: @escaping () -> Void)
    /// Called after each write transaction that changed something (event fan-out hooks here).
    func published(_ events: [Event], revision: Int64)
}

/// The backend operations Maintenance needs; each runs off the loop and calls back on it.
public protocol MaintenanceBackend: AnyObject {
    func defragment(_ done: @escaping ((any Error)?) -> Void)
    func hash(_ done: @escaping (Result<UInt32, any Error>) -> Void)
    /// Writes a consistent copy of the store to a temporary file and gives its path (the caller
    /// deletes it).
    func snapshot(_ done: @escaping (Result<String, any Error>) -> Void)
}

/// Shared state of the services: store, identity, limits, commit gate.
public final class ServerContext {
    public let store: KVStore
    public let identity: MemberIdentity
    public let limits: Limits
    public unowned let gate: any CommitGate
    /// Tells whether a lease exists (a lessor plugs in here; without one, no lease exists).
    public var leaseExists: (Int64) -> Bool = { _ in false }
    /// Size of the backend file in bytes (as of the last commit).
    public var dbSize: () -> Int64 = { 0 }
    /// Bytes of the backend holding data (free pages excluded).
    public var dbSizeInUse: () -> Int64 = { 0 }
    /// `--quota-backend-bytes` (already defaulted).
    public var quotaBytes: Int64 = 2 << 30
    /// Defragment, hash and snapshot, which need the backend and the thread pool.
    public weak var maintenance: (any MaintenanceBackend)?
    /// Runs `work` off the loop, then `done` on the loop (the server plugs in its thread pool;
    /// without one both run at once). Password hashing goes here.
    public var offload: (_ work: @escaping () -> Void, _ done: @escaping () -> Void) -> Void = { work, done in
        work()
        done()
    }
    public private(set) lazy var alarms = Alarms(store: store, memberID: identity.memberID)

    private var compactionWaiters: [() -> Void] = []

    /// Runs `body` once the compaction in progress has removed its history and that is durable
    /// (at the next flush if none is in progress): a physical Compact answers then.
    public func whenCompacted(_ body: @escaping () -> Void) {
        if store.compactionPending { compactionWaiters.append(body) } else { gate.whenFlushed(body) }
    }

    /// Removes a bounded slice of compacted history (the server calls this each loop turn while
    /// `store.compactionPending`); returns true when the compaction is complete.
    @discardableResult
    public func compactionStep(maxRevisions: Int) -> Bool {
        guard store.compactStep(maxRevisions: maxRevisions) else { return false }
        let waiters = compactionWaiters
        compactionWaiters = []
        for w in waiters { gate.whenFlushed(w) }
        return true
    }

    /// etcd's quota check before a write that adds `cost` bytes: refused while NOSPACE is active,
    /// and raises NOSPACE when the write would pass the quota.
    public func checkQuota(_ cost: Int) throws(EtcdError) {
        guard cost > 0 else { return }
        if alarms.isActive(.corrupt) { throw .corrupt }
        if alarms.isActive(.nospace) { throw .noSpace }
        if dbSize() + Int64(cost) > quotaBytes {
            alarms.activate(.nospace)
            throw .noSpace
        }
    }

    public init(store: KVStore, identity: MemberIdentity, limits: Limits, gate: any CommitGate) {
        self.store = store
        self.identity = identity
        self.limits = limits
        self.gate = gate
    }

    /// A full response header at `revision`.
    public func header(_ revision: Int64) -> Etcdserverpb_ResponseHeader {
        var h = Etcdserverpb_ResponseHeader()
        h.clusterID = identity.clusterID
        h.memberID = identity.memberID
        h.raftTerm = identity.raftTerm
        h.revision = revision
        return h
    }
}
