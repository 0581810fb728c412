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

/// Durable storage under the store. `commit` runs on a worker thread, one at a time, and must make
/// the batch durable (fsync) before it returns.
public protocol Backend: AnyObject, Sendable {
    func commit(_ batch: WriteBatch) throws
}

/// Where the values of durable records are read from once the store no longer holds them (the
/// backend's B+tree, read through its memory map). Called on the store's thread.
public protocol ValueSource: AnyObject {
    /// The values stored at `revs` (each a live record the source holds), in the same order; an
    /// empty value for one it does not hold.
    func values(at revs: [Revision]) -> [Bytes]
    /// One value (the common single-key read).
    func value(at rev: Revision) -> Bytes
}

extension ValueSource {
    public func value(at rev: Revision) -> Bytes { values(at: [rev]).first ?? [] }
}

/// Meta keys the store persists.
public enum MetaKey {
    public static let currentRevision = "currentRevision"
    public static let compactRevision = "compactRevision"
}

/// One revision of a key in the index: everything but the value (`version` 0 marks a deletion).
struct IndexEntry {
    var rev: Revision
    var create: Int64
    var version: Int64
    var lease: Int64
    var isTombstone: Bool { version == 0 }
}

/// The history of one key: its revisions in order, values left out (etcd's `keyIndex`).
final class KeyHistory {
    var entries: [IndexEntry] = []

    /// The entry at store revision `rev` (the last change with main ≤ rev), nil if none.
    @inline(__always)
    func entry(at rev: Int64) -> IndexEntry? {
        guard let i = lastIndex(atOrBefore: rev) else { return nil }
        return entries[i]
    }

    /// The live entry at `rev`, nil if absent or deleted.
    @inline(__always)
    func live(at rev: Int64) -> IndexEntry? {
        guard let e = entry(at: rev), !e.isTombstone else { return nil }
        return e
    }

    func lastIndex(atOrBefore rev: Int64) -> Int? {
        if let last = entries.last, last.rev.main <= rev { return entries.count - 1 }
        var lo = 0, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].rev.main <= rev { lo = mid + 1 } else { hi = mid }
        }
        return lo == 0 ? nil : lo - 1
    }

    var latest: IndexEntry? {
        guard let e = entries.last, !e.isTombstone else { return nil }
        return e
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

/// The multi-version key-value store: an in-memory index of every key's revisions down to the
/// compacted revision (keys, revisions, versions and leases; no values), written through to a
/// `Backend` by group commits. Values not yet in the backend's B+tree stay in memory (`recent`);
/// the others are read from the `ValueSource` when a read needs them.
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
    /// Revisions in the index (live, deleted and tombstones), for the memory figures.
    public private(set) var indexedRevisionCount = 0
    private var observers = Observers()

    /// Values the value source does not hold yet, by revision, and their revisions in order (with
    /// `recentHead` the first still held): all of them in a store without a source.
    private var recent: [Revision: Bytes] = [:]
    private var recentOrder: [Revision] = []
    private var recentHead = 0
    /// Bytes of values in `recent`.
    public private(set) var recentBytes = 0
    private let source: (any ValueSource)?

    /// Adds an observer of every change (held weakly; see `StoreObserver`).
    public func addObserver(_ o: any StoreObserver) { observers.add(o) }

    public func removeObserver(_ o: any StoreObserver) { observers.remove(o) }

    /// A store holding everything in memory (tests, tools).
    public init() { source = nil }

    /// A store over a backend's records: `load` calls its argument with every record in revision
    /// order (values not needed: later reads get them from `source`).
    public init(
        meta: [String: Int64], source: any ValueSource,
        load: ((_ rev: Revision, _ key: Bytes, _ kv: KeyValue?) -> Void) throws -> Void
    ) rethrows {
        self.source = source
        var maxRev: Int64 = 1
        // Entries are gathered in one flat array first and each key's history is then made at
        // its exact size: grown one entry at a time, the histories' abandoned smaller buffers
        // would stay as scattered free memory (about 30 bytes a revision) that malloc cannot give back.
        var ids: [Bytes: Int32] = [:]
        var keyList: [Bytes] = []
        var flat: [(id: Int32, entry: IndexEntry)] = []
        try load { rev, key, kv in
            let id: Int32
            if let known = ids[key] {
                id = known
            } else {
                id = Int32(keyList.count)
                ids[key] = id
                keyList.append(key)
            }
            flat.append((id, Self.entry(rev, kv)))
            maxRev = max(maxRev, rev.main)
        }
        ids = [:]
        var counts = [Int](repeating: 0, count: keyList.count)
        for f in flat { counts[Int(f.id)] += 1 }
        let histories = counts.map { n in
            let h = KeyHistory()
            h.entries.reserveCapacity(n)
            return h
        }
        for f in flat { histories[Int(f.id)].entries.append(f.entry) }
        indexedRevisionCount = flat.count
        flat = []
        index.reserveCapacity(keyList.count)
        for (i, key) in keyList.enumerated() { index[key] = histories[i] }
        finishLoading(meta: meta, maxRevision: maxRev)
    }

    /// Rebuilds an in-memory store from records (values included).
    public convenience init(records: [Record], meta: [String: Int64]) {
        self.init()
        var maxRev: Int64 = 1
        for r in records.sorted(by: { $0.rev < $1.rev }) {
            history(r.key).entries.append(Self.entry(r.rev, r.kv))
            indexedRevisionCount += 1
            if let kv = r.kv { keepRecent(r.rev, kv.value) }
            maxRev = max(maxRev, r.rev.main)
        }
        finishLoading(meta: meta, maxRevision: maxRev)
    }

    private func finishLoading(meta: [String: Int64], maxRevision: Int64) {
        keys = SortedKeys(sorted: index.keys.sorted { compareBytes($0, $1) < 0 })
        compactRevision = meta[MetaKey.compactRevision] ?? -1
        currentRevision = max(maxRevision, meta[MetaKey.currentRevision] ?? 1, compactRevision)
        committedRevision = currentRevision
        liveKeyCount = index.values.reduce(0) { $0 + ($1.latest == nil ? 0 : 1) }
    }

    /// The key's history, made (unlisted in `keys`) if new.
    private func history(_ key: Bytes) -> KeyHistory {
        if let h = index[key] { return h }
        let h = KeyHistory()
        index[key] = h
        return h
    }

    private static func entry(_ rev: Revision, _ kv: KeyValue?) -> IndexEntry {
        guard let kv else { return IndexEntry(rev: rev, create: 0, version: 0, lease: 0) }
        return IndexEntry(rev: rev, create: kv.createRevision, version: kv.version, lease: kv.lease)
    }

    // MARK: Values

    private func keepRecent(_ rev: Revision, _ value: Bytes) {
        recent[rev] = value
        recentOrder.append(rev)
        recentBytes += value.count
    }

    /// Lets go of the values the source now holds: every revision up to `revision` (the backend
    /// moved them to its B+tree). They go in `releaseStep`s (a checkpoint may cover many). A store
    /// without a source keeps them.
    public func releaseValues(through revision: Int64) {
        guard source != nil else { return }
        releaseTarget = max(releaseTarget, revision)
    }

    private var releaseTarget: Int64 = 0

    /// Whether values wait for `releaseStep`.
    public var releasePending: Bool {
        recentHead < recentOrder.count && recentOrder[recentHead].main <= releaseTarget
    }

    /// Drops up to `max` of the values `releaseValues` let go of; true when none is left.
    @discardableResult
    public func releaseStep(max: Int = 20_000) -> Bool {
        var n = 0
        while n < max, recentHead < recentOrder.count, recentOrder[recentHead].main <= releaseTarget {
            if let v = recent.removeValue(forKey: recentOrder[recentHead]) { recentBytes -= v.count }
            recentHead += 1
            n += 1
        }
        if recentHead == recentOrder.count {
            recentOrder.removeAll(keepingCapacity: recentOrder.count < 65536)
            recentHead = 0
        } else if recentHead > 65536 {
            recentOrder.removeFirst(recentHead)
            recentHead = 0
        }
        return !releasePending
    }

    /// Values held in memory (not yet in the source).
    public var recentCount: Int { recent.count }

    /// The key-values of `found` (each a live entry), values read from memory or, together in one
    /// read, from the source; `withValues` false leaves them empty.
    private func materialize(_ found: [(Bytes, IndexEntry)], withValues: Bool) -> [KeyValue] {
        var kvs: [KeyValue] = []
        kvs.reserveCapacity(found.count)
        var missing: [Int] = []
        for (i, (key, e)) in found.enumerated() {
            var value: Bytes = []
            if withValues {
                if let v = recent[e.rev] {
                    value = v
                } else if source != nil {
                    missing.append(i)
                }
            }
            kvs.append(
                KeyValue(
                    key: key, createRevision: e.create, modRevision: e.rev.main, version: e.version, value: value,
                    lease: e.lease))
        }
        guard !missing.isEmpty, let source else { return kvs }
        if missing.count == 1 {
            kvs[missing[0]].value = source.value(at: found[missing[0]].1.rev)
            return kvs
        }
        let values = source.values(at: missing.map { found[$0].1.rev })
        for (j, i) in missing.enumerated() where j < values.count { kvs[i].value = values[j] }
        return kvs
    }

    private func materialize(_ key: Bytes, _ e: IndexEntry, withValue: Bool) -> KeyValue {
        materialize([(key, e)], withValues: withValue)[0]
    }

    /// Reads the value of an event's previous key-value if the write left it for later (it was in
    /// the source only): etcd reads `prev_kv` for a watcher at send time, at the revision before
    /// the event. Drops the previous key-value if compaction removed it meanwhile.
    public func loadPrevValue(_ event: inout Event) {
        guard event.prevValuePending, let prev = event.prevKV else { return }
        event.prevValuePending = false
        guard let h = index[prev.key], let e = h.live(at: event.kv.modRevision - 1), e.rev.main == prev.modRevision
        else {
            event.prevKV = nil
            return
        }
        event.prevKV = materialize(prev.key, e, withValue: true)
    }

    // MARK: Reads

    /// Checks a requested read revision: ≤ 0 means `latest`.
    public func resolve(revision: Int64, latest: Int64) throws(MVCCError) -> Int64 {
        if revision <= 0 { return latest }
        if revision > latest { throw .futureRevision }
        if revision < compactRevision { throw .compacted }
        return revision
    }

    /// Reads `[key, end)` (etcd conventions) at `revision` (≤ 0: the committed revision).
    /// `limit` 0 = no limit; `count` is always the full count. `keysOnly` leaves values empty
    /// (and unread).
    public func range(
        _ key: Bytes, _ end: Bytes, revision: Int64 = 0, limit: Int = 0,
        countOnly: Bool = false, keysOnly: Bool = false
    ) throws(MVCCError) -> RangeResult {
        let rev = try resolve(revision: revision, latest: committedRevision)
        return scan(key, end, at: rev, limit: limit, countOnly: countOnly, keysOnly: keysOnly)
    }

    /// At most `limit` (≥ 1) live key-values of `[key, end)` at `revision`, from `key` on, and
    /// whether more follow: one chunk of a streamed range. Unlike `range` it stops at the chunk,
    /// counting nothing beyond it, so that a range read chunk by chunk costs what it returns.
    public func rangeChunk(
        _ key: Bytes, _ end: Bytes, revision: Int64, limit: Int, keysOnly: Bool = false
    ) throws(MVCCError) -> (kvs: [KeyValue], more: Bool) {
        let rev = try resolve(revision: revision, latest: committedRevision)
        var found: [(Bytes, IndexEntry)] = []
        var more = false
        if end.isEmpty {
            if let e = index[key]?.live(at: rev) { found.append((key, e)) }
            return (materialize(found, withValues: !keysOnly), false)
        }
        let upper: Bytes? = end == [0] ? nil : end
        if let upper, compareBytes(upper, key) <= 0 { return ([], false) }
        keys.forEach(from: key, to: upper) { k in
            guard let e = index[k]!.live(at: rev) else { return true }
            if found.count == limit {
                more = true
                return false
            }
            found.append((k, e))
            return true
        }
        return (materialize(found, withValues: !keysOnly), more)
    }

    /// The live entries of `[key, end)` at `rev`, up to `limit` (0: all), and the full count.
    private func liveEntries(
        _ key: Bytes, _ end: Bytes, at rev: Int64, limit: Int, countOnly: Bool
    )
        -> (found: [(Bytes, IndexEntry)], count: Int)
    {
        var found: [(Bytes, IndexEntry)] = []
        if end.isEmpty {
            guard let e = index[key]?.live(at: rev) else { return ([], 0) }
            if !countOnly { found.append((key, e)) }
            return (found, 1)
        }
        let upper: Bytes? = end == [0] ? nil : end
        if let upper, compareBytes(upper, key) <= 0 { return ([], 0) }
        if !countOnly {
            keys.forEach(from: key, to: upper) { k in
                if let e = index[k]!.live(at: rev) { found.append((k, e)) }
                return limit <= 0 || found.count < limit
            }
            // Everything was visited: the count is at hand.
            if limit <= 0 || found.count < limit {
                rememberCount(key, end, rev, found.count)
                return (found, found.count)
            }
        }
        return (found, liveCount(key, end, upper, at: rev))
    }

    /// The last count of live keys in `[key, end)` at a revision: a count at a fixed revision never
    /// changes, so the next page of a paginated read (the same end and revision, a later start)
    /// counts only the keys between the two starts instead of the whole rest of the range.
    private var lastCount: (key: Bytes, end: Bytes, revision: Int64, count: Int)?

    private func rememberCount(_ key: Bytes, _ end: Bytes, _ rev: Int64, _ count: Int) {
        // Only committed revisions are fixed: a write txn reads at its own, still being written.
        if rev <= committedRevision { lastCount = (key, end, rev, count) }
    }

    private func liveCount(_ key: Bytes, _ end: Bytes, _ upper: Bytes?, at rev: Int64) -> Int {
        var count = 0
        if let c = lastCount, c.end == end, c.revision == rev, rev <= committedRevision, rev >= compactRevision,
            compareBytes(c.key, key) <= 0
        {
            // The keys from the last start up to this one leave the count.
            var skipped = 0
            keys.forEach(from: c.key, to: key) { k in
                if index[k]!.live(at: rev) != nil { skipped += 1 }
                return true
            }
            count = c.count - skipped
        } else {
            keys.forEach(from: key, to: upper) { k in
                if index[k]!.live(at: rev) != nil { count += 1 }
                return true
            }
        }
        rememberCount(key, end, rev, count)
        return count
    }

    func scan(
        _ key: Bytes, _ end: Bytes, at rev: Int64, limit: Int, countOnly: Bool, keysOnly: Bool = false
    )
        -> RangeResult
    {
        let (found, count) = liveEntries(key, end, at: rev, limit: limit, countOnly: countOnly)
        return RangeResult(kvs: materialize(found, withValues: !keysOnly), count: count, revision: rev)
    }

    /// The changes to keys in `[key, end)` with revisions in `from...to`, in revision order, each
    /// with the key's previous state (if still in history; its value read only if `prevValues`).
    /// For watchers catching up from history. Callers keep `from` ≥ the compact revision.
    public func events(
        _ key: Bytes, _ end: Bytes, from: Int64, to: Int64, prevValues: Bool = true
    )
        -> [(Revision, Event)]
    {
        var changes: [(key: Bytes, entry: IndexEntry, prev: IndexEntry?)] = []
        func collect(_ k: Bytes, _ h: KeyHistory) {
            // First entry with main ≥ from.
            var i = (h.lastIndex(atOrBefore: from - 1) ?? -1) + 1
            while i < h.entries.count, h.entries[i].rev.main <= to {
                let prev = i > 0 && !h.entries[i - 1].isTombstone ? h.entries[i - 1] : nil
                changes.append((k, h.entries[i], prev))
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
        changes.sort { $0.entry.rev < $1.entry.rev }
        let puts = materialize(changes.filter { !$0.entry.isTombstone }.map { ($0.key, $0.entry) }, withValues: true)
        let withPrev = changes.compactMap { c in c.prev.map { (c.key, $0) } }
        let prevs = materialize(withPrev, withValues: prevValues)
        var out: [(Revision, Event)] = []
        out.reserveCapacity(changes.count)
        var p = 0, q = 0
        for c in changes {
            var prev: KeyValue?
            if c.prev != nil {
                prev = prevs[q]
                q += 1
            }
            var event: Event
            if c.entry.isTombstone {
                event = Event(kind: .delete, kv: KeyValue(key: c.key, modRevision: c.entry.rev.main), prevKV: prev)
            } else {
                event = Event(kind: .put, kv: puts[p], prevKV: prev)
                p += 1
            }
            event.prevValuePending = prev != nil && !prevValues
            out.append((c.entry.rev, event))
        }
        return out
    }

    // MARK: Writes

    /// Starts a write transaction at revision `currentRevision + 1`. Only one may be open at a time.
    public func beginWrite() -> WriteTxn { WriteTxn(store: self, revision: currentRevision + 1) }

    // MARK: Mirrored writes (revisions chosen by an upstream store)

    /// Starts a write transaction at `revision`, past `currentRevision`: a mirror writes at the
    /// revisions of the store it copies, gaps and all (the revisions between hold changes to keys
    /// it does not copy).
    public func beginWrite(at revision: Int64) -> WriteTxn {
        precondition(revision > currentRevision, "mirrored revision \(revision) is not past \(currentRevision)")
        return WriteTxn(store: self, revision: revision)
    }

    /// Moves the revision to `revision` with no change of its own (the copied store changed keys
    /// this one does not hold); readers see it once committed, and watchers' progress with them.
    public func advance(to revision: Int64) {
        guard revision > currentRevision else { return }
        currentRevision = revision
        pending.meta[MetaKey.currentRevision] = revision
    }

    /// Loads a copied store's state at `revision` without telling the observers (nobody watched
    /// the changes): each of `kvs` is written at its own mod revision, keeping its create
    /// revision, version and lease, and each of `deleted` is deleted at `revision`. A key already
    /// here must have its new mod revision past `currentRevision` (else it is skipped);
    /// `revision` is at least every mod revision. The history before is unknown: the caller
    /// compacts at `revision`.
    public func loadMirrored(_ kvs: [KeyValue], deleted: [Bytes], at revision: Int64) {
        let sorted = kvs.sorted { $0.modRevision < $1.modRevision }
        var last: Int64 = 0
        var sub: Int64 = 0
        for kv in sorted {
            // A change older than the key's last one here is not newer state: skipped.
            guard kv.modRevision > currentRevision || index[kv.key] == nil else { continue }
            sub = kv.modRevision == last ? sub + 1 : 0
            last = kv.modRevision
            apply(Revision(main: kv.modRevision, sub: sub), key: kv.key, kv: kv)
        }
        sub = last == revision ? sub + 1 : 0
        for key in deleted where index[key]?.latest != nil {
            apply(Revision(main: revision, sub: sub), key: key, kv: nil)
            sub += 1
        }
        if revision > currentRevision {
            currentRevision = revision
            pending.meta[MetaKey.currentRevision] = revision
        }
    }

    /// Every live key's latest state, values left out (a mirror compares it with a reload).
    public func liveModRevisions() -> [(key: Bytes, modRevision: Int64)] {
        var out: [(Bytes, Int64)] = []
        out.reserveCapacity(liveKeyCount)
        for (k, h) in index { if let e = h.latest { out.append((k, e.rev.main)) } }
        return out
    }

    /// Appends a change to `key`'s history (`history`: the key's, if the caller looked it up).
    fileprivate func apply(_ rev: Revision, key: Bytes, kv: KeyValue?, history: KeyHistory? = nil) {
        let h: KeyHistory
        if let known = history ?? index[key] {
            h = known
        } else {
            h = KeyHistory()
            index[key] = h
            keys.insert(key)
        }
        let wasLive = h.latest != nil
        h.entries.append(Self.entry(rev, kv))
        indexedRevisionCount += 1
        if let kv { keepRecent(rev, kv.value) }
        liveKeyCount += (kv != nil ? 1 : 0) - (wasLive ? 1 : 0)
        pending.records.append(Record(rev: rev, key: key, kv: kv))
    }

    fileprivate func history(of key: Bytes) -> KeyHistory? { index[key] }

    /// The latest live state in `h`; its value read only if `withValue` or already in memory
    /// (`valueLoaded` says which; `lookInMemory` false leaves it unread unless `withValue`).
    fileprivate func latest(
        _ key: Bytes, in h: KeyHistory?, withValue: Bool, lookInMemory: Bool = true
    ) -> (kv: KeyValue, valueLoaded: Bool)? {
        guard let e = h?.latest else { return nil }
        var value: Bytes = []
        var loaded = true
        if !withValue && !lookInMemory {
            loaded = false
        } else if let v = recent[e.rev] {
            value = v
        } else if let source {
            if withValue { value = source.value(at: e.rev) } else { loaded = false }
        }
        let kv = KeyValue(
            key: key, createRevision: e.create, modRevision: e.rev.main, version: e.version, value: value,
            lease: e.lease)
        return (kv, loaded)
    }

    fileprivate func finishWrite(revision: Int64, events: [Event]) {
        currentRevision = revision
        revisionPending = true
        observers.forEach { $0.store(self, wrote: events, at: revision) }
    }

    // MARK: Compaction

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
            if h.entries[keep].isTombstone { keep += 1 }
            let n = min(keep, budget)
            if n > 0 {
                for e in h.entries[0..<n] {
                    pending.removed.append(e.rev)
                    if let v = recent.removeValue(forKey: e.rev) { recentBytes -= v.count }
                }
                h.entries.removeFirst(n)
                indexedRevisionCount -= n
                budget -= n
            }
            guard n == keep else { continue }  // more of this key next step
            if h.entries.isEmpty {
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

    // MARK: Meta and group commit

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
    public var hasPending: Bool { revisionPending || !pending.isEmpty }
    /// A write transaction ended since the last batch: the batch records the store revision (once
    /// per batch rather than once per write).
    private var revisionPending = false

    /// Hands over everything written since the last call, for one group commit.
    public func takeBatch() -> WriteBatch? {
        if revisionPending {
            revisionPending = false
            pending.meta[MetaKey.currentRevision] = currentRevision
        }
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

    // MARK: Hashes

    /// CRC-32C over the history kept up to `revision` (0 = current), in revision order: equal
    /// histories (same writes, same compaction) give equal hashes (etcd's HashKV). Reads every
    /// value: a store over a backend hashes there instead (`RecordHasher` over its records).
    public func hashKV(revision: Int64) throws(MVCCError) -> UInt32 {
        let upTo = try checkHashRevision(revision)
        var found: [(Bytes, IndexEntry)] = []
        for (key, h) in index {
            for e in h.entries where e.rev.main <= upTo { found.append((key, e)) }
        }
        found.sort { $0.1.rev < $1.1.rev }
        let live = found.filter { !$0.1.isTombstone }
        var values = materialize(live, withValues: true).makeIterator()
        var hasher = RecordHasher()
        for (key, e) in found {
            hasher.add(Record(rev: e.rev, key: key, kv: e.isTombstone ? nil : values.next()))
        }
        return hasher.value
    }

    /// The revision a HashKV at `revision` covers (0 = current), or its error.
    public func checkHashRevision(_ revision: Int64) throws(MVCCError) -> Int64 {
        let upTo = revision <= 0 ? currentRevision : revision
        if upTo > currentRevision { throw .futureRevision }
        if compactRevision > 0 && upTo < compactRevision { throw .compacted }
        return upTo
    }

    /// Number of keys with history (live or not) in the index.
    public var indexedKeyCount: Int { keys.count }
}

/// HashKV's hash: CRC-32C over records in revision order (revision, key, and for a live record
/// its create revision, version, lease and value; -1 for a deletion).
public struct RecordHasher {
    private var crc = CRC32C()
    public init() {}

    private mutating func int(_ v: Int64) {
        var b = v.bigEndian
        withUnsafeBytes(of: &b) { crc.update($0) }
    }

    public mutating func add(_ r: Record) {
        crc.update(r.rev.bytes)
        int(Int64(r.key.count))
        crc.update(r.key)
        if let kv = r.kv {
            int(kv.createRevision)
            int(kv.version)
            int(kv.lease)
            int(Int64(kv.value.count))
            crc.update(kv.value)
        } else {
            int(-1)
        }
    }

    public var value: UInt32 { crc.value }
}

/// A write transaction: reads see its own earlier writes; `end()` makes all its changes one
/// revision. Nothing is written to the backend until `KVStore.takeBatch()`.
public final class WriteTxn {
    private let store: KVStore
    /// The revision this transaction writes at.
    public let revision: Int64
    private var sub: Int64 = 0
    public private(set) var events: [Event] = []

    fileprivate init(store: KVStore, revision: Int64) {
        self.store = store
        self.revision = revision
    }

    public var changed: Bool { !events.isEmpty }

    /// Reads at the latest state including this transaction's writes. `revision` > 0 reads history
    /// (checked against the store revision before this transaction).
    public func range(
        _ key: Bytes, _ end: Bytes, revision: Int64 = 0, limit: Int = 0,
        countOnly: Bool = false, keysOnly: Bool = false
    ) throws(MVCCError) -> RangeResult {
        let rev: Int64
        if revision <= 0 {
            rev = self.revision
        } else {
            rev = try store.resolve(revision: revision, latest: store.currentRevision)
        }
        var r = store.scan(key, end, at: rev, limit: limit, countOnly: countOnly, keysOnly: keysOnly)
        r.revision = changed ? self.revision : store.currentRevision
        return r
    }

    /// The key's latest state, including this transaction's writes (its value left empty unless
    /// `withValue`).
    public func get(_ key: Bytes, withValue: Bool = true) -> KeyValue? {
        store.latest(key, in: store.history(of: key), withValue: withValue)?.kv
    }

    /// Writes `key`. Returns the previous state, its value read only if `prevValue` or at hand
    /// (the event's previous value is otherwise read when a watcher needs it).
    @discardableResult
    public func put(_ key: Bytes, value: Bytes, lease: Int64, prevValue: Bool = false) -> KeyValue? {
        let history = store.history(of: key)
        // The previous value, unless asked for, is read when a watcher wants it (most puts have
        // no watcher with prev_kv: a lookup saved per put).
        let found = store.latest(key, in: history, withValue: prevValue, lookInMemory: false)
        let prev = found?.kv
        let kv = KeyValue(
            key: key, createRevision: prev?.createRevision ?? revision, modRevision: revision,
            version: (prev?.version ?? 0) + 1, value: value, lease: lease)
        store.apply(Revision(main: revision, sub: sub), key: key, kv: kv, history: history)
        sub += 1
        var event = Event(kind: .put, kv: kv, prevKV: prev)
        event.prevValuePending = found.map { !$0.valueLoaded } ?? false
        events.append(event)
        return prev
    }

    /// Writes a copied store's state of `kv.key` as it is there (create revision, version, lease
    /// and value), at this transaction's revision. Returns the previous state, as `put` does.
    @discardableResult
    public func put(mirrored kv: KeyValue) -> KeyValue? {
        let history = store.history(of: kv.key)
        let found = store.latest(kv.key, in: history, withValue: false)
        var written = kv
        written.modRevision = revision
        store.apply(Revision(main: revision, sub: sub), key: kv.key, kv: written, history: history)
        sub += 1
        var event = Event(kind: .put, kv: written, prevKV: found?.kv)
        event.prevValuePending = found.map { !$0.valueLoaded } ?? false
        events.append(event)
        return found?.kv
    }

    /// Deletes the live keys in `[key, end)`. Returns their previous states in key order (values
    /// read only if `prevValues`).
    @discardableResult
    public func deleteRange(_ key: Bytes, _ end: Bytes, prevValues: Bool = false) -> [KeyValue] {
        let live = store.scan(key, end, at: revision, limit: 0, countOnly: false, keysOnly: !prevValues).kvs
        for prev in live {
            store.apply(Revision(main: revision, sub: sub), key: prev.key, kv: nil)
            sub += 1
            var event = Event(kind: .delete, kv: KeyValue(key: prev.key, modRevision: revision), prevKV: prev)
            event.prevValuePending = !prevValues
            events.append(event)
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
