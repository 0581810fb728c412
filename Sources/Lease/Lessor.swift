import VigilCore

/// A key, as raw bytes (the lessor does not know the store's key type).
public typealias LeaseKey = [UInt8]

/// One lease: its granted TTL, when it expires (clock milliseconds) and the keys attached to it.
final class Lease {
    let id: Int64
    let ttl: Int64
    var expiry: UInt64
    var keys: Set<LeaseKey> = []

    init(id: Int64, ttl: Int64, expiry: UInt64) {
        self.id = id
        self.ttl = ttl
        self.expiry = expiry
    }
}

/// The lessor: grants, renews and revokes leases, keeps the keys attached to each, and expires them
/// in bounded steps. It knows no store, as etcd's lessor does not: it is handed
/// - a **range-deleter** that deletes a revoked lease's keys in one revision (the store's write
///   transaction, whose end tells the watchers),
/// - a **recorder** that makes a lease (or its removal) durable in the next commit,
/// - a **clock** (the loop's in the server, a manual one in tests).
/// The keys come from outside too: whoever watches the store's writes calls `attach` / `detach`.
///
/// Single-threaded: call it from the loop only.
public final class Lessor {
    /// etcd's minimum TTL with default timings: ceil(1.5 × election timeout) = 2 s.
    public static let minTTL: Int64 = 2
    public static let maxTTL: Int64 = 9_000_000_000

    /// Counters for metrics.
    public struct Stats: Sendable {
        public var granted = 0
        public var revoked = 0
        public var renewed = 0
    }
    public private(set) var stats = Stats()
    /// Leases revoked per expiry step at most.
    public var revokeBatch = 500

    private let clock: any MonotonicClock
    private let deleteKeys: ([LeaseKey]) -> Void
    private let record: (_ id: Int64, _ ttl: Int64?) -> Void
    private var leases: [Int64: Lease] = [:]
    private var heap = ExpiryHeap()
    private let idBase: Int64
    private var idCounter: Int64 = 0

    /// - Parameters:
    ///   - clock: measures TTLs.
    ///   - memberID, idEpochMilliseconds: etcd's lease ID generator starts from the member ID's
    ///     low 16 bits and a wall-clock millisecond timestamp.
    ///   - restored: leases a previous run recorded; each gets its full TTL from now, as etcd
    ///     gives them after a restart.
    ///   - deleteKeys: deletes the given keys in one revision (nothing happens for an empty list).
    ///   - record: records a lease's TTL (nil: its removal) in the next commit.
    public init(
        clock: any MonotonicClock, memberID: UInt64, idEpochMilliseconds: Int64,
        restored: [(id: Int64, ttl: Int64)] = [],
        deleteKeys: @escaping ([LeaseKey]) -> Void,
        record: @escaping (_ id: Int64, _ ttl: Int64?) -> Void
    ) {
        self.clock = clock
        self.deleteKeys = deleteKeys
        self.record = record
        let ms = idEpochMilliseconds
        idBase = Int64(bitPattern: (memberID & 0xFFFF) << 48) | ((ms & ((1 << 40) - 1)) << 8)
        let t = clock.nowMilliseconds
        for (id, ttl) in restored {
            let l = Lease(id: id, ttl: ttl, expiry: t + UInt64(max(ttl, 0)) * 1000)
            leases[id] = l
            heap.push(l.expiry, id)
        }
    }

    public var count: Int { leases.count }

    public func exists(_ id: Int64) -> Bool { leases[id] != nil }

    private func nextID() -> Int64 {
        repeat {
            idCounter += 1
            let id = (idBase &+ idCounter) & Int64.max
            if id != 0 && leases[id] == nil { return id }
        } while true
    }

    /// Grants a lease (ID 0: the lessor picks one). Returns the ID and the granted TTL (at least
    /// `minTTL`).
    public func grant(id: Int64, ttl: Int64) throws(EtcdError) -> (id: Int64, ttl: Int64) {
        if ttl > Self.maxTTL { throw .leaseTTLTooLarge }
        let ttl = max(ttl, Self.minTTL)
        let id = id == 0 ? nextID() : id
        if leases[id] != nil { throw .leaseExist }
        let l = Lease(id: id, ttl: ttl, expiry: clock.nowMilliseconds + UInt64(ttl) * 1000)
        leases[id] = l
        heap.push(l.expiry, id)
        record(id, ttl)
        stats.granted += 1
        return (id, ttl)
    }

    /// Revokes a lease: its keys are deleted in one revision, and its record goes in the same
    /// commit.
    public func revoke(_ id: Int64) throws(EtcdError) {
        guard let l = leases.removeValue(forKey: id) else { throw .leaseNotFound }
        let keys = l.keys.sorted { $0.lexicographicallyPrecedes($1) }
        if !keys.isEmpty { deleteKeys(keys) }
        record(id, nil)
        stats.revoked += 1
    }

    /// Renews a lease for its full TTL; returns the TTL, or 0 for an unknown or expired lease.
    public func renew(_ id: Int64) -> Int64 {
        let t = clock.nowMilliseconds
        guard let l = leases[id], l.expiry > t else { return 0 }
        l.expiry = t + UInt64(l.ttl) * 1000
        heap.push(l.expiry, id)
        stats.renewed += 1
        return l.ttl
    }

    /// Remaining TTL in whole seconds, granted TTL and keys (sorted); nil for an unknown lease.
    public func timeToLive(_ id: Int64) -> (remaining: Int64, granted: Int64, keys: [LeaseKey])? {
        guard let l = leases[id] else { return nil }
        let t = clock.nowMilliseconds
        let remaining = l.expiry > t ? Int64((l.expiry - t) / 1000) : 0
        return (remaining, l.ttl, l.keys.sorted { $0.lexicographicallyPrecedes($1) })
    }

    /// The keys attached to a lease (none for an unknown one).
    public func keys(_ id: Int64) -> Set<LeaseKey> { leases[id]?.keys ?? [] }

    /// All lease IDs, soonest expiry first.
    public func all() -> [Int64] {
        leases.values.sorted { ($0.expiry, $0.id) < ($1.expiry, $1.id) }.map(\.id)
    }

    /// A key now carries `lease` (a put with it). Unknown leases are ignored.
    public func attach(_ key: LeaseKey, to lease: Int64) { leases[lease]?.keys.insert(key) }

    /// A key no longer carries `lease` (deleted, or put with another lease).
    public func detach(_ key: LeaseKey, from lease: Int64) { leases[lease]?.keys.remove(key) }

    /// Revokes up to `revokeBatch` expired leases. Returns true if more have expired already
    /// (the caller runs another step on a later loop turn).
    @discardableResult
    public func expireStep() -> Bool {
        let t = clock.nowMilliseconds
        var revoked = 0
        while revoked < revokeBatch, let top = heap.min, top.expiry <= t {
            _ = heap.pop()
            // Skip entries left behind by renewals and revocations.
            guard let l = leases[top.id], l.expiry == top.expiry else { continue }
            if let a = Failpoint.hit("leaseBeforeRevoke") {
                // `return`: the lease is forgotten by the expiry heap and never revoked (broken).
                if a == .return { continue }
                Failpoint.perform(a, name: "leaseBeforeRevoke")
            }
            try? revoke(top.id)
            revoked += 1
        }
        if let top = heap.min { return top.expiry <= t }
        return false
    }

    /// The expiry heap keeps its order (for tests).
    func verifyInvariants() -> Bool { heap.verifyInvariants() }
}
