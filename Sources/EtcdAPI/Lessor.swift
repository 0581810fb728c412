import Foundation
import MVCC

/// One lease: its granted TTL, when it expires (loop milliseconds) and the keys attached to it.
final class Lease {
    let id: Int64
    let ttl: Int64
    var expiry: UInt64
    var keys: Set<Bytes> = []

    init(id: Int64, ttl: Int64, expiry: UInt64) {
        self.id = id
        self.ttl = ttl
        self.expiry = expiry
    }
}

/// A binary min-heap of (expiry, lease id). Renewals push a new entry and leave the old one to be
/// skipped when it surfaces, so each operation is O(log n) and a tick costs in proportion to the
/// leases that expire, not to all leases.
struct ExpiryHeap {
    private var items: [(expiry: UInt64, id: Int64)] = []
    var count: Int { items.count }
    var min: (expiry: UInt64, id: Int64)? { items.first }

    mutating func push(_ expiry: UInt64, _ id: Int64) {
        items.append((expiry, id))
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if items[parent].expiry <= items[i].expiry { break }
            items.swapAt(parent, i)
            i = parent
        }
    }

    mutating func pop() -> (expiry: UInt64, id: Int64)? {
        guard !items.isEmpty else { return nil }
        let top = items[0]
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < items.count && items[l].expiry < items[m].expiry { m = l }
                if r < items.count && items[r].expiry < items[m].expiry { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
        }
        return top
    }
}

/// The lessor: grants, renews and revokes leases, keeps each lease's keys (from the events of every
/// write), persists leases with the keys (meta entries `lease/<id>` → TTL, in the same group commits)
/// and expires them on the loop in bounded batches.
public final class Lessor {
    /// etcd's minimum TTL with default timings: ceil(1.5 × election timeout) = 2 s.
    public static let minTTL: Int64 = 2
    public static let maxTTL: Int64 = 9_000_000_000
    static let metaPrefix = "lease/"

    private let ctx: ServerContext
    private let now: () -> UInt64
    private var leases: [Int64: Lease] = [:]
    private var heap = ExpiryHeap()
    private let idBase: Int64
    private var idCounter: Int64 = 0
    /// Counters for metrics.
    public struct Stats: Sendable {
        public var granted = 0
        public var revoked = 0
        public var renewed = 0
    }
    public private(set) var stats = Stats()
    /// Leases revoked per expiry step at most.
    public var revokeBatch = 500

    /// Restores the persisted leases (each with its TTL refreshed from now, as etcd does after a
    /// restart) and re-attaches their keys.
    /// - Parameter now: the loop's clock in milliseconds.
    public init(context: ServerContext, meta: [String: Int64], now: @escaping () -> UInt64) {
        ctx = context
        self.now = now
        // etcd's ID generator: member ID's low 16 bits, then a millisecond timestamp, then a counter.
        let ms = Int64(Date().timeIntervalSince1970 * 1000)
        idBase = Int64(bitPattern: (context.identity.memberID & 0xFFFF) << 48) | ((ms & ((1 << 40) - 1)) << 8)
        let t = now()
        for (name, ttl) in meta where name.hasPrefix(Self.metaPrefix) {
            guard let id = Int64(name.dropFirst(Self.metaPrefix.count)) else { continue }
            let l = Lease(id: id, ttl: ttl, expiry: t + UInt64(ttl) * 1000)
            leases[id] = l
            heap.push(l.expiry, id)
        }
        if !leases.isEmpty, let live = try? context.store.range([0], [0]) {
            for kv in live.kvs where kv.lease != 0 { leases[kv.lease]?.keys.insert(kv.key) }
        }
    }

    public var count: Int { leases.count }

    public func exists(_ id: Int64) -> Bool { leases[id] != nil }

    private func metaName(_ id: Int64) -> String { Self.metaPrefix + String(id) }

    private func nextID() -> Int64 {
        repeat {
            idCounter += 1
            let id = (idBase &+ idCounter) & Int64.max
            if id != 0 && leases[id] == nil { return id }
        } while true
    }

    /// Grants a lease (ID 0: the server picks one). Returns the ID and the granted TTL.
    public func grant(id: Int64, ttl: Int64) throws(EtcdError) -> (id: Int64, ttl: Int64) {
        if ttl > Self.maxTTL { throw .leaseTTLTooLarge }
        try ctx.checkQuota(64)
        let ttl = max(ttl, Self.minTTL)
        let id = id == 0 ? nextID() : id
        if leases[id] != nil { throw .leaseExist }
        let l = Lease(id: id, ttl: ttl, expiry: now() + UInt64(ttl) * 1000)
        leases[id] = l
        heap.push(l.expiry, id)
        ctx.store.setMeta(metaName(id), ttl)
        stats.granted += 1
        return (id, ttl)
    }

    /// Revokes a lease: its keys are deleted in one revision, with the lease record in the same
    /// commit. Returns the revision after it.
    public func revoke(_ id: Int64) throws(EtcdError) -> Int64 {
        guard let l = leases.removeValue(forKey: id) else { throw .leaseNotFound }
        let txn = ctx.store.beginWrite()
        for key in l.keys.sorted(by: { compareBytes($0, $1) < 0 }) { txn.deleteRange(key, []) }
        let events = txn.end()
        if !events.isEmpty { ctx.gate.published(events, revision: txn.revision) }
        ctx.store.removeMeta(metaName(id))
        stats.revoked += 1
        return ctx.store.currentRevision
    }

    /// Renews a lease for its full TTL; returns the TTL, or 0 for an unknown or expired lease.
    public func renew(_ id: Int64) -> Int64 {
        let t = now()
        guard let l = leases[id], l.expiry > t else { return 0 }
        l.expiry = t + UInt64(l.ttl) * 1000
        heap.push(l.expiry, id)
        stats.renewed += 1
        return l.ttl
    }

    /// Remaining TTL in whole seconds, granted TTL and keys (sorted); nil for an unknown lease.
    public func timeToLive(_ id: Int64) -> (remaining: Int64, granted: Int64, keys: [Bytes])? {
        guard let l = leases[id] else { return nil }
        let t = now()
        let remaining = l.expiry > t ? Int64((l.expiry - t) / 1000) : 0
        return (remaining, l.ttl, l.keys.sorted { compareBytes($0, $1) < 0 })
    }

    /// The keys attached to a lease (none for an unknown one).
    public func keys(_ id: Int64) -> Set<Bytes> { leases[id]?.keys ?? [] }

    /// All lease IDs, soonest expiry first.
    public func all() -> [Int64] {
        leases.values.sorted { ($0.expiry, $0.id) < ($1.expiry, $1.id) }.map(\.id)
    }

    /// Keeps each lease's key set in step with a write's events.
    public func observe(_ events: [Event]) {
        guard !leases.isEmpty else { return }
        for e in events {
            if let p = e.prevKV, p.lease != 0 { leases[p.lease]?.keys.remove(p.key) }
            if e.kind == .put && e.kv.lease != 0 { leases[e.kv.lease]?.keys.insert(e.kv.key) }
        }
    }

    /// Revokes up to `revokeBatch` expired leases. Returns true if more have expired already
    /// (the caller runs another step on a later loop turn).
    @discardableResult
    public func expireStep() -> Bool {
        let t = now()
        var revoked = 0
        while revoked < revokeBatch, let top = heap.min, top.expiry <= t {
            _ = heap.pop()
            // Skip entries left behind by renewals and revocations.
            guard let l = leases[top.id], l.expiry == top.expiry else { continue }
            _ = try? revoke(top.id)
            revoked += 1
        }
        if let top = heap.min { return top.expiry <= t }
        return false
    }
}
