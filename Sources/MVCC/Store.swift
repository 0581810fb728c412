/// One stored change: the key's state after revision `rev`, or a tombstone (`kv == nil`).
public struct Record: Equatable, Sendable {
    public var rev: Revision
    public var key: Bytes
    public var kv: KeyValue?
    public init(rev: Revision, key: Bytes, kv: KeyValue?) {
        self.rev = rev
        self.key = key
        self.kv = kv
    }
}

/// What one group commit writes: new records, records removed by compaction, and the meta values.
public struct WriteBatch: Sendable {
    public var records: [Record] = []
    public var removed: [Revision] = []
    public var meta: [String: Int64] = [:]
    /// Meta entries to delete (after `meta` is applied).
    public var removedMeta: [String] = []
    /// Named byte values outside the key space (auth users and roles); nil deletes the name.
    public var blobs: [String: Bytes?] = [:]
    /// The store revision this batch makes durable.
    public var revision: Int64 = 0
    public var isEmpty: Bool {
        records.isEmpty && removed.isEmpty && meta.isEmpty && removedMeta.isEmpty && blobs.isEmpty
    }
    public init() {}
}

/// Durable storage under the store. `load` runs once at start; `commit` runs on a worker thread,
/// one at a time, and must make the batch durable (fsync) before it returns.
public protocol Backend: AnyObject, Sendable {
    func load() throws -> (records: [Record], meta: [String: Int64])
    func commit(_ batch: WriteBatch) throws
}

/// Meta keys the store persists.
public enum MetaKey {
    public static let currentRevision = "currentRevision"
    public static let compactRevision = "compactRevision"
}

/// The history of one key: its states in revision order (nil = deleted at that revision).
final class KeyHistory {
    var revs: [Revision] = []
    var states: [KeyValue?] = []

    /// The state at store revision `rev` (the last change with main ≤ rev), nil if absent.
    func get(at rev: Int64) -> KeyValue? {
        guard let i = lastIndex(atOrBefore: rev) else { return nil }
        return states[i]
    }

    func lastIndex(atOrBefore rev: Int64) -> Int? {
        var lo = 0, hi = revs.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if revs[mid].main <= rev { lo = mid + 1 } else { hi = mid }
        }
        return lo == 0 ? nil : lo - 1
    }

    var latest: KeyValue? { states.last ?? nil }

    func append(_ rev: Revision, _ kv: KeyValue?) {
        revs.append(rev)
        states.append(kv)
    }
}

/// Result of a range read.
public struct RangeResult: Sendable {
    public var kvs: [KeyValue]
    /// Live keys in the range at the read revision (not reduced by the limit).
    public var count: Int
    /// The revision the range was read at.
    public var revision: Int64

    public init(kvs: [KeyValue], count: Int, revision: Int64) {
        self.kvs = kvs
        self.count = count
        self.revision = revision
    }
}

/// The multi-version key-value store: an in-memory index of every key's history down to the
/// compacted revision, written through to a `Backend` by group commits.
///
/// Revisions: a fresh store is at revision 1; each write transaction that changes something makes
/// one new revision. Changes are visible to writers at once (`currentRevision`), and to readers
/// once the backend made them durable (`committedRevision`): a read never returns data that a crash
/// could lose.
///
/// Worked example: put a=1 (rev 2), put a=2 (rev 3), delete a (rev 4), put a=3 (rev 5) gives
/// `a`'s history 2:{v1,create 2} 3:{v2,create 2} 4:tombstone 5:{v1,create 5}. Reading at 4 finds the
/// tombstone (absent); at 3 the second put. Compact(4) keeps only what reads at ≥ 4 need: the
/// tombstone at 4 (itself not needed, so dropped) and rev 5.
public final class KVStore {
    public private(set) var currentRevision: Int64 = 1
    public private(set) var committedRevision: Int64 = 1
    /// -1 until the first compaction, as in etcd.
    public private(set) var compactRevision: Int64 = -1

    private var keys = SortedKeys()
    private var index: [Bytes: KeyHistory] = [:]
    private var pending = WriteBatch()
    /// Live keys at the current revision.
    public private(set) var liveKeyCount = 0
    private var observers = Observers()

    /// Adds an observer of every change (held weakly; see `StoreObserver`).
    public func addObserver(_ o: any StoreObserver) { observers.add(o) }

    public func removeObserver(_ o: any StoreObserver) { observers.remove(o) }

    public init() {}

    /// Rebuilds the store from what a backend holds.
    public init(records: [Record], meta: [String: Int64]) {
        var maxRev: Int64 = 1
        for r in records.sorted(by: { $0.rev < $1.rev }) {
            let h: KeyHistory
            if let e = index[r.key] {
                h = e
            } else {
                h = KeyHistory()
                index[r.key] = h
            }
            h.append(r.rev, r.kv)
            maxRev = max(maxRev, r.rev.main)
        }
        keys = SortedKeys(sorted: index.keys.sorted { compareBytes($0, $1) < 0 })
        compactRevision = meta[MetaKey.compactRevision] ?? -1
        currentRevision = max(maxRev, meta[MetaKey.currentRevision] ?? 1, compactRevision)
        committedRevision = currentRevision
        liveKeyCount = index.values.reduce(0) { $0 + ($1.latest == nil ? 0 : 1) }
    }

    /// Checks a requested read revision: ≤ 0 means `latest`.
    public func resolve(revision: Int64, latest: Int64) throws(MVCCError) -> Int64 {
        if revision <= 0 { return latest }
        if revision > latest { throw .futureRevision }
        if revision < compactRevision { throw .compacted }
        return revision
    }

    /// Reads `[key, end)` (etcd conventions) at `revision` (≤ 0: the committed revision).
    /// `limit` 0 = no limit; `count` is always the full count.
    public func range(
        _ key: Bytes, _ end: Bytes, revision: Int64 = 0, limit: Int = 0,
        countOnly: Bool = false
    ) throws(MVCCError) -> RangeResult {
        let rev = try resolve(revision: revision, latest: committedRevision)
        return scan(key, end, at: rev, limit: limit, countOnly: countOnly)
    }

    func scan(_ key: Bytes, _ end: Bytes, at rev: Int64, limit: Int, countOnly: Bool) -> RangeResult {
        var kvs: [KeyValue] = []
        var count = 0
        if end.isEmpty {
            if let kv = index[key]?.get(at: rev) {
                count = 1
                if !countOnly { kvs.append(kv) }
            }
            return RangeResult(kvs: kvs, count: count, revision: rev)
        }
        let upper: Bytes? = end == [0] ? nil : end
        if let upper, compareBytes(upper, key) <= 0 { return RangeResult(kvs: [], count: 0, revision: rev) }
        keys.forEach(from: key, to: upper) { k in
            if let kv = index[k]!.get(at: rev) {
                count += 1
                if !countOnly && (limit <= 0 || kvs.count < limit) { kvs.append(kv) }
            }
            return true
        }
        return RangeResult(kvs: kvs, count: count, revision: rev)
    }

    /// The changes to keys in `[key, end)` with revisions in `from...to`, in revision order, each
    /// with the key's previous state (if still in history). For watchers catching up from history.
    /// Callers keep `from` ≥ the compact revision.
    public func events(_ key: Bytes, _ end: Bytes, from: Int64, to: Int64) -> [(Revision, Event)] {
        var out: [(Revision, Event)] = []
        func collect(_ k: Bytes, _ h: KeyHistory) {
            // First entry with main ≥ from.
            var i = (h.lastIndex(atOrBefore: from - 1) ?? -1) + 1
            while i < h.revs.count, h.revs[i].main <= to {
                let rev = h.revs[i]
                let prev = i > 0 ? h.states[i - 1] : nil
                if let kv = h.states[i] {
                    out.append((rev, Event(kind: .put, kv: kv, prevKV: prev)))
                } else {
                    out.append((rev, Event(kind: .delete, kv: KeyValue(key: k, modRevision: rev.main), prevKV: prev)))
                }
                i += 1
            }
        }
        if end.isEmpty {
            if let h = index[key] { collect(key, h) }
        } else {
            let upper: Bytes? = end == [0] ? nil : end
            if upper == nil || compareBytes(upper!, key) > 0 {
                keys.forEach(from: key, to: upper) { k in
                    collect(k, index[k]!)
                    return true
                }
            }
        }
        out.sort { $0.0 < $1.0 }
        return out
    }

    /// Starts a write transaction at revision `currentRevision + 1`. Only one may be open at a time.
    public func beginWrite() -> WriteTxn { WriteTxn(store: self) }

    fileprivate func apply(_ rev: Revision, key: Bytes, kv: KeyValue?) {
        let h: KeyHistory
        if let e = index[key] {
            h = e
        } else {
            h = KeyHistory()
            index[key] = h
            keys.insert(key)
        }
        let wasLive = h.latest != nil
        h.append(rev, kv)
        liveKeyCount += (kv != nil ? 1 : 0) - (wasLive ? 1 : 0)
        pending.records.append(Record(rev: rev, key: key, kv: kv))
    }

    fileprivate func latest(_ key: Bytes) -> KeyValue? { index[key]?.latest }

    fileprivate func finishWrite(revision: Int64, events: [Event]) {
        currentRevision = revision
        pending.meta[MetaKey.currentRevision] = revision
        observers.forEach { $0.store(self, wrote: events, at: revision) }
    }

    /// Keys still to prune for the compaction in progress, and the revision to prune to.
    private var compactionKeys: [Bytes] = []
    private var compactionNext = 0
    private var compactionPrune: Int64 = 0

    /// Whether removal of compacted history is still under way (see `compactStep`).
    public var compactionPending: Bool { compactionNext < compactionKeys.count }

    /// Compacts at `revision`: reads below it fail with `compacted` from now on; the history
    /// itself — for each key, every change older than its newest change at or before `revision`
    /// (and that one too if it is a deletion) — is removed by `compactStep` calls, a bounded number
    /// of keys at a time, so that a large compaction never holds the loop.
    public func compact(_ revision: Int64) throws(MVCCError) {
        if revision <= compactRevision { throw .compacted }
        if revision > currentRevision { throw .futureRevision }
        compactRevision = revision
        pending.meta[MetaKey.compactRevision] = revision
        // Prune no further than what readers at the committed revision still need; the rest of the
        // history below `revision` goes at the next compaction.
        compactionPrune = min(revision, committedRevision)
        compactionKeys = Array(index.keys)
        compactionNext = 0
        observers.forEach { $0.store(self, compactedAt: revision) }
    }

    /// Removes up to `maxRevisions` revisions of compacted history (a key visited counts as one;
    /// a key with a long history is done over several steps); returns true when none is left.
    @discardableResult
    public func compactStep(maxRevisions: Int = 20_000) -> Bool {
        var budget = maxRevisions
        while compactionNext < compactionKeys.count && budget > 0 {
            let key = compactionKeys[compactionNext]
            budget -= 1
            guard let h = index[key], var keep = h.lastIndex(atOrBefore: compactionPrune) else {
                compactionNext += 1
                continue
            }
            if h.states[keep] == nil { keep += 1 }
            let n = min(keep, budget)
            if n > 0 {
                pending.removed.append(contentsOf: h.revs[0..<n])
                h.revs.removeFirst(n)
                h.states.removeFirst(n)
                budget -= n
            }
            guard n == keep else { continue }  // more of this key next step
            if h.revs.isEmpty {
                index[key] = nil
                keys.remove(key)
            }
            compactionNext += 1
        }
        if compactionNext >= compactionKeys.count {
            compactionKeys = []
            compactionNext = 0
            return true
        }
        return false
    }

    /// Runs a compaction's removal to the end at once (tests, tools).
    public func finishCompaction() { while !compactStep(maxRevisions: Int.max / 2) {} }

    /// Records a meta entry (e.g. a lease) in the next group commit.
    public func setMeta(_ name: String, _ value: Int64) {
        pending.removedMeta.removeAll { $0 == name }
        pending.meta[name] = value
    }

    /// Deletes a meta entry in the next group commit.
    public func removeMeta(_ name: String) {
        pending.meta[name] = nil
        pending.removedMeta.append(name)
    }

    /// Records a named byte value (nil: deletes it) in the next group commit.
    public func setBlob(_ name: String, _ value: Bytes?) {
        pending.blobs[name] = .some(value)
    }

    /// Whether something is waiting for the next group commit.
    public var hasPending: Bool { !pending.isEmpty }

    /// Hands over everything written since the last call, for one group commit.
    public func takeBatch() -> WriteBatch? {
        guard !pending.isEmpty else { return nil }
        var b = pending
        b.revision = currentRevision
        pending = WriteBatch()
        return b
    }

    /// Marks revisions up to `revision` durable (after the backend committed their batch).
    public func markCommitted(_ revision: Int64) {
        guard revision > committedRevision else { return }
        committedRevision = revision
        observers.forEach { $0.store(self, committedThrough: revision) }
    }

    /// CRC-32C over the history kept up to `revision` (0 = current), in revision order: equal
    /// histories (same writes, same compaction) give equal hashes (etcd's HashKV).
    public func hashKV(revision: Int64) throws(MVCCError) -> UInt32 {
        let upTo = revision <= 0 ? currentRevision : revision
        if upTo > currentRevision { throw .futureRevision }
        if compactRevision > 0 && upTo < compactRevision { throw .compacted }
        var records: [(Revision, Bytes, KeyValue?)] = []
        for (key, h) in index {
            for (i, rev) in h.revs.enumerated() where rev.main <= upTo { records.append((rev, key, h.states[i])) }
        }
        records.sort { $0.0 < $1.0 }
        var crc = CRC32C()
        func int(_ v: Int64) {
            var b = v.bigEndian
            withUnsafeBytes(of: &b) { crc.update($0) }
        }
        for (rev, key, kv) in records {
            crc.update(rev.bytes)
            int(Int64(key.count))
            crc.update(key)
            if let kv {
                int(kv.createRevision)
                int(kv.version)
                int(kv.lease)
                int(Int64(kv.value.count))
                crc.update(kv.value)
            } else {
                int(-1)
            }
        }
        return crc.value
    }

    /// Number of keys with history (live or not) in the index.
    public var indexedKeyCount: Int { keys.count }
}

/// A write transaction: reads see its own earlier writes; `end()` makes all its changes one
/// revision. Nothing is written to the backend until `KVStore.takeBatch()`.
public final class WriteTxn {
    private let store: KVStore
    /// The revision this transaction writes at.
    public let revision: Int64
    private var sub: Int64 = 0
    public private(set) var events: [Event] = []

    fileprivate init(store: KVStore) {
        self.store = store
        self.revision = store.currentRevision + 1
    }

    public var changed: Bool { !events.isEmpty }

    /// Reads at the latest state including this transaction's writes. `revision` > 0 reads history
    /// (checked against the store revision before this transaction).
    public func range(
        _ key: Bytes, _ end: Bytes, revision: Int64 = 0, limit: Int = 0,
        countOnly: Bool = false
    ) throws(MVCCError) -> RangeResult {
        let rev: Int64
        if revision <= 0 {
            rev = self.revision
        } else {
            rev = try store.resolve(revision: revision, latest: store.currentRevision)
        }
        var r = store.scan(key, end, at: rev, limit: limit, countOnly: countOnly)
        r.revision = changed ? self.revision : store.currentRevision
        return r
    }

    /// The key's latest state, including this transaction's writes.
    public func get(_ key: Bytes) -> KeyValue? { store.latest(key) }

    /// Writes `key`. Returns the previous state.
    @discardableResult
    public func put(_ key: Bytes, value: Bytes, lease: Int64) -> KeyValue? {
        let prev = store.latest(key)
        let kv = KeyValue(
            key: key, createRevision: prev?.createRevision ?? revision, modRevision: revision,
            version: (prev?.version ?? 0) + 1, value: value, lease: lease)
        store.apply(Revision(main: revision, sub: sub), key: key, kv: kv)
        sub += 1
        events.append(Event(kind: .put, kv: kv, prevKV: prev))
        return prev
    }

    /// Deletes the live keys in `[key, end)`. Returns their previous states in key order.
    @discardableResult
    public func deleteRange(_ key: Bytes, _ end: Bytes) -> [KeyValue] {
        let live = store.scan(key, end, at: revision, limit: 0, countOnly: false).kvs
        for prev in live {
            store.apply(Revision(main: revision, sub: sub), key: prev.key, kv: nil)
            sub += 1
            events.append(Event(kind: .delete, kv: KeyValue(key: prev.key, modRevision: revision), prevKV: prev))
        }
        return live
    }

    /// Closes the transaction; returns its events (empty if nothing changed: no new revision).
    /// The store's observers hear of the changes here.
    @discardableResult
    public func end() -> [Event] {
        if changed { store.finishWrite(revision: revision, events: events) }
        return events
    }
}
