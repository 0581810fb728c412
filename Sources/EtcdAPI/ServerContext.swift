import Auth
import EtcdProto
import GRPC
import MVCC
import VigilCore
import WatchHub

/// Identity of this single-member cluster, as it appears in every response header.
public struct MemberIdentity: Sendable {
    public var clusterID: UInt64
    public var memberID: UInt64
    public var raftTerm: UInt64
    public var name: String
    public var peerURLs: [String]
    public var clientURLs: [String]

    public init(
        clusterID: UInt64, memberID: UInt64, raftTerm: UInt64 = 2, name: String, peerURLs: [String],
        clientURLs: [String]
    ) {
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

/// Where answers wait for durability. The server runs one group commit per loop turn and calls
/// back in revision order once the backend has fsynced. (Watchers need no call here: the store
/// tells them, see `StoreObserver`.)
public protocol CommitGate: AnyObject {
    /// Runs `body` on the loop once every revision up to `revision` is durable (at once if it is).
    func whenDurable(_ revision: Int64, _ body: @escaping () -> Void)
    /// Runs `body` on the loop once everything written so far, revisions or not (e.g. lease
    /// records), is durable.
    func whenFlushed(_ body: @escaping () -> Void)
    /// Runs `body` once everything written so far is also in the backend's B+tree (past the
    /// write-ahead log): a physical compaction answers when the space it frees shows.
    func whenCheckpointed(_ body: @escaping () -> Void)
}

extension CommitGate {
    public func whenCheckpointed(_ body: @escaping () -> Void) { whenFlushed(body) }
}

/// The backend as Maintenance sees it: its sizes, and copies that run off the loop and call back
/// on it.
public protocol MaintenanceBackend: AnyObject {
    /// Size of the backend file in bytes (as of the last commit).
    var dbSize: Int64 { get }
    /// Bytes of the backend holding data (free pages excluded).
    var dbSizeInUse: Int64 { get }
    func defragment(_ done: @escaping ((any Error)?) -> Void)
    func hash(_ done: @escaping (Result<UInt32, any Error>) -> Void)
    /// HashKV of the history up to `revision` (the caller has waited for compaction and for the
    /// commits up to it), computed off the loop.
    func hashKV(upTo revision: Int64, _ done: @escaping (Result<UInt32, any Error>) -> Void)
    /// Writes a consistent copy of the store to a temporary file and gives its path (the caller
    /// deletes it).
    func snapshot(_ done: @escaping (Result<String, any Error>) -> Void)
}

/// What a previous run left in the backend outside the key space: meta entries (leases, alarms,
/// the auth flag and revision) and named blobs (auth users and roles).
public struct RestoredState: Sendable {
    public var meta: [String: Int64]
    public var blobs: [String: [UInt8]]
    public init(meta: [String: Int64] = [:], blobs: [String: [UInt8]] = [:]) {
        self.meta = meta
        self.blobs = blobs
    }
}

/// Everything the services are built from, given at once (nothing is plugged in afterwards).
public struct ServerDependencies {
    public var store: KVStore
    public var identity: MemberIdentity
    public var limits: Limits
    /// `--quota-backend-bytes`, already defaulted.
    public var quotaBytes: Int64
    public var commits: any CommitGate
    public var backend: any MaintenanceBackend
    /// Measures lease TTLs and token lifetimes.
    public var clock: any MonotonicClock
    /// Wall-clock milliseconds at start (etcd's lease ID generator seeds from it).
    public var wallClockMilliseconds: Int64
    /// Runs slow work (password hashing) off the loop.
    public var offload: Offload
    public var hasher: any PasswordHasher
    public var restored: RestoredState
    public var watch: WatchHubConfig
    public var auth: AuthConfig

    public init(
        store: KVStore, identity: MemberIdentity, limits: Limits = Limits(), quotaBytes: Int64 = 2 << 30,
        commits: any CommitGate, backend: any MaintenanceBackend, clock: any MonotonicClock,
        wallClockMilliseconds: Int64, offload: @escaping Offload, hasher: any PasswordHasher,
        restored: RestoredState = RestoredState(), watch: WatchHubConfig = WatchHubConfig(),
        auth: AuthConfig = AuthConfig()
    ) {
        self.store = store
        self.identity = identity
        self.limits = limits
        self.quotaBytes = quotaBytes
        self.commits = commits
        self.backend = backend
        self.clock = clock
        self.wallClockMilliseconds = wallClockMilliseconds
        self.offload = offload
        self.hasher = hasher
        self.restored = restored
        self.watch = watch
        self.auth = auth
    }
}

/// State the services share: store, identity, limits, durability, backend, alarms.
public final class ServerContext {
    public let store: KVStore
    /// This member; its peer URLs change with MemberUpdate (kept in the backend).
    public private(set) var identity: MemberIdentity
    public let limits: Limits
    public let quotaBytes: Int64
    public let commits: any CommitGate
    public let backend: any MaintenanceBackend
    public let alarms: Alarms

    init(_ deps: ServerDependencies) {
        store = deps.store
        identity = deps.identity
        if let saved = deps.restored.blobs[Self.peerURLsBlob], !saved.isEmpty {
            identity.peerURLs = String(decoding: saved, as: UTF8.self).split(separator: "\n").map(String.init)
        }
        limits = deps.limits
        quotaBytes = deps.quotaBytes
        commits = deps.commits
        backend = deps.backend
        alarms = Alarms(store: deps.store, memberID: deps.identity.memberID, restoring: deps.restored.meta)
    }

    static let peerURLsBlob = "member/peerURLs"

    /// MemberUpdate of this member: new peer URLs, kept across restarts (they do not change its ID).
    public func updatePeerURLs(_ urls: [String]) {
        identity.peerURLs = urls
        store.setBlob(Self.peerURLsBlob, Array(urls.joined(separator: "\n").utf8))
    }

    private var compactionWaiters: [() -> Void] = []

    /// Runs `body` once the compaction in progress has removed its history and that is durable
    /// (at the next flush if none is in progress): a physical Compact answers then.
    public func whenCompacted(_ body: @escaping () -> Void) {
        if store.compactionPending { compactionWaiters.append(body) } else { commits.whenCheckpointed(body) }
    }

    /// Removes a bounded slice of compacted history (the server calls this each loop turn while
    /// `store.compactionPending`); returns true when the compaction is complete.
    @discardableResult
    public func compactionStep(maxRevisions: Int) -> Bool {
        Failpoint.trigger("compactionMidway")
        guard store.compactStep(maxRevisions: maxRevisions) else { return false }
        let waiters = compactionWaiters
        compactionWaiters = []
        for w in waiters { commits.whenCheckpointed(w) }
        return true
    }

    /// `--max-request-bytes`: writes, txns and auth changes over it are refused.
    public func checkSize(_ n: Int) throws(EtcdError) {
        if n > limits.maxRequestBytes { throw .requestTooLarge }
    }

    /// etcd's quota check before a write that adds `cost` bytes: refused while NOSPACE is active,
    /// and raises NOSPACE when the write would pass the quota.
    public func checkQuota(_ cost: Int) throws(EtcdError) {
        guard cost > 0 else { return }
        if alarms.isActive(.corrupt) { throw .corrupt }
        if alarms.isActive(.nospace) { throw .noSpace }
        if backend.dbSize + Int64(cost) > quotaBytes {
            alarms.activate(.nospace)
            throw .noSpace
        }
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

extension EtcdError {
    /// The status a gRPC call ends with for this error.
    public var status: GRPCStatus { GRPCStatus(code.grpcCode, message, cause: self) }

    /// The etcd error for a store error.
    public static func from(_ e: MVCCError) -> EtcdError {
        switch e {
        case .compacted: .compacted
        case .futureRevision: .futureRevision
        }
    }
}
