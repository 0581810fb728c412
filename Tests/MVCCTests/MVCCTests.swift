import Testing

@testable import MVCC

private func b(_ s: String) -> Bytes { Array(s.utf8) }

/// Writes one put in its own revision and marks it durable.
@discardableResult
private func put(_ s: KVStore, _ k: String, _ v: String, lease: Int64 = 0) -> Int64 {
    let t = s.beginWrite()
    t.put(b(k), value: b(v), lease: lease)
    _ = t.end()
    s.markCommitted(s.currentRevision)
    return t.revision
}

@discardableResult
private func del(_ s: KVStore, _ k: String, _ end: String = "") -> Int {
    let t = s.beginWrite()
    let n = t.deleteRange(b(k), b(end)).count
    _ = t.end()
    s.markCommitted(s.currentRevision)
    return n
}

@Suite struct RevisionRules {
    @Test func freshStoreIsAtRevisionOne() throws {
        let s = KVStore()
        #expect(s.currentRevision == 1)
        #expect(s.compactRevision == -1)
        #expect(try s.range(b("a"), []).count == 0)
    }

    @Test func putsBumpRevisionAndVersion() throws {
        let s = KVStore()
        #expect(put(s, "a", "1") == 2)
        #expect(put(s, "a", "2") == 3)
        let kv = try #require(try s.range(b("a"), []).kvs.first)
        #expect(kv.createRevision == 2)
        #expect(kv.modRevision == 3)
        #expect(kv.version == 2)
        #expect(kv.value == b("2"))
    }

    @Test func deleteResetsGenerationAndNoOpDeleteKeepsRevision() throws {
        let s = KVStore()
        put(s, "a", "1")
        #expect(del(s, "a") == 1)
        #expect(s.currentRevision == 3)
        #expect(del(s, "a") == 0)
        #expect(s.currentRevision == 3, "deleting nothing makes no revision")
        put(s, "a", "again")
        let kv = try #require(try s.range(b("a"), []).kvs.first)
        #expect(kv.createRevision == 4)
        #expect(kv.version == 1)
    }

    @Test func historicalReads() throws {
        let s = KVStore()
        put(s, "a", "1")  // 2
        put(s, "a", "2")  // 3
        del(s, "a")  // 4
        #expect(try s.range(b("a"), [], revision: 2).kvs.first?.value == b("1"))
        #expect(try s.range(b("a"), [], revision: 3).kvs.first?.value == b("2"))
        #expect(try s.range(b("a"), [], revision: 4).count == 0)
        #expect(throws: MVCCError.futureRevision) { try s.range(b("a"), [], revision: 5) }
    }

    @Test func oneTxnIsOneRevisionWithOrderedSubRevisions() throws {
        let s = KVStore()
        let t = s.beginWrite()
        t.put(b("x"), value: b("1"), lease: 0)
        t.put(b("y"), value: b("2"), lease: 0)
        #expect(t.get(b("x"))?.value == b("1"), "a txn reads its own writes")
        let events = t.end()
        #expect(events.count == 2)
        #expect(s.currentRevision == 2)
        let batch = try #require(s.takeBatch())
        #expect(batch.records.map(\.rev) == [Revision(main: 2, sub: 0), Revision(main: 2, sub: 1)])
        #expect(batch.revision == 2)
    }

    @Test func readersSeeOnlyCommittedRevisions() throws {
        let s = KVStore()
        let t = s.beginWrite()
        t.put(b("a"), value: b("1"), lease: 0)
        _ = t.end()
        #expect(s.currentRevision == 2)
        #expect(try s.range(b("a"), []).count == 0, "not durable yet")
        s.markCommitted(2)
        #expect(try s.range(b("a"), []).count == 1)
    }
}

@Suite struct Ranges {
    func store() -> KVStore {
        let s = KVStore()
        for k in ["a", "ab", "abc", "b", "c\u{ff}", "d"] { put(s, k, "v" + k) }
        return s
    }

    @Test func prefixEnd() {
        #expect(KeyRange.prefixEnd(b("aa")) == b("ab"))
        #expect(KeyRange.prefixEnd([0x61, 0xFF]) == [0x62])
        #expect(KeyRange.prefixEnd([0xFF, 0xFF]) == [0])
    }

    @Test func rangeForms() throws {
        let s = store()
        #expect(try s.range(b("a"), KeyRange.prefixEnd(b("a"))).kvs.map(\.key) == [b("a"), b("ab"), b("abc")])
        #expect(try s.range(b("b"), [0]).count == 3, "from-key")
        #expect(try s.range([0], [0]).count == 6, "everything")
        #expect(try s.range(b("b"), b("a")).count == 0, "end before key")
        let limited = try s.range(b("a"), [0], limit: 2)
        #expect(limited.kvs.count == 2)
        #expect(limited.count == 6, "count ignores the limit")
        #expect(try s.range(b("a"), [0], countOnly: true).kvs.isEmpty)
    }
}

@Suite struct Compaction {
    @Test func compactKeepsLatestAndRefusesOlderReads() throws {
        let s = KVStore()
        put(s, "a", "1")  // 2
        put(s, "a", "2")  // 3
        put(s, "b", "1")  // 4
        del(s, "b")  // 5
        put(s, "c", "1")  // 6
        try s.compact(5)
        s.finishCompaction()
        #expect(s.compactRevision == 5)
        #expect(throws: MVCCError.compacted) { try s.range(b("a"), [], revision: 4) }
        #expect(try s.range(b("a"), [], revision: 5).kvs.first?.value == b("2"))
        #expect(try s.range(b("b"), [], revision: 5).count == 0)
        #expect(s.indexedKeyCount == 2, "b's history is gone entirely")
        #expect(throws: MVCCError.compacted) { try s.compact(5) }
        #expect(throws: MVCCError.futureRevision) { try s.compact(7) }
        let batch = try #require(s.takeBatch())
        #expect(batch.removed.contains(Revision(main: 2)))
        #expect(batch.removed.contains(Revision(main: 5)))
        #expect(!batch.removed.contains(Revision(main: 3)))
    }

    @Test func compactionRunsInBoundedSteps() throws {
        let s = KVStore()
        for i in 0..<100 {
            put(s, "k\(i)", "1")
            put(s, "k\(i)", "2")
        }
        let rev = s.currentRevision
        try s.compact(rev)
        // Logically compacted at once; history removed 10 revisions (keys visited count too) per step.
        #expect(throws: MVCCError.compacted) { try s.range(b("k1"), [], revision: rev - 1) }
        #expect(s.compactionPending)
        var steps = 0
        while !s.compactStep(maxRevisions: 10) { steps += 1 }
        // 100 keys, each visited once and with one revision removed: 200 units of work.
        #expect(steps == 19)
        #expect(!s.compactionPending)
        var removed: [Revision] = []
        while let batch = s.takeBatch() { removed += batch.removed }
        #expect(removed.count == 100, "one superseded revision per key")
        #expect(try s.range(b("k"), b("l")).kvs.allSatisfy { $0.value == b("2") })
    }

    @Test func restoreRebuildsTheSameState() throws {
        let s = KVStore()
        put(s, "a", "1")
        put(s, "b", "2")
        del(s, "a")
        var records: [Record] = []
        while let batch = s.takeBatch() { records += batch.records }
        let r = KVStore(records: records, meta: [MetaKey.currentRevision: 4])
        #expect(r.currentRevision == 4)
        #expect(try r.range([0], [0]).kvs.map(\.key) == [b("b")])
        #expect(try r.range(b("a"), [], revision: 2).kvs.first?.value == b("1"))
    }
}

@Suite struct SortedKeySet {
    @Test func randomInsertsAndRemovesKeepOrder() {
        var set = SortedKeys(maxChunk: 8)
        var model = Set<Bytes>()
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let k = Bytes((0..<Int.random(in: 1...3, using: &rng)).map { _ in UInt8.random(in: 0...5, using: &rng) })
            if Bool.random(using: &rng) {
                #expect(set.insert(k) == model.insert(k).inserted)
            } else {
                #expect(set.remove(k) == (model.remove(k) != nil))
            }
            #expect(set.verifyInvariants())
        }
        var seen: [Bytes] = []
        set.forEach(from: [], to: nil) {
            seen.append($0)
            return true
        }
        #expect(seen == model.sorted { compareBytes($0, $1) < 0 })
    }
}

/// Records what a store tells its observers.
private final class Recorder: StoreObserver {
    var log: [String] = []
    func store(_ store: KVStore, wrote events: [Event], at revision: Int64) {
        log.append(
            "wrote \(revision): "
                + events.map { "\($0.kind == .put ? "P" : "D") \(String(decoding: $0.kv.key, as: UTF8.self))" }.joined(
                    separator: ","))
    }
    func store(_ store: KVStore, committedThrough revision: Int64) { log.append("committed \(revision)") }
    func store(_ store: KVStore, compactedAt revision: Int64) { log.append("compacted \(revision)") }
}

@Suite struct WatchableStore {
    @Test func everyWriteReachesTheObserversWhenItsTransactionEnds() throws {
        let s = KVStore()
        let r = Recorder(), r2 = Recorder()
        s.addObserver(r)
        s.addObserver(r2)
        let t = s.beginWrite()
        t.put(b("a"), value: b("1"), lease: 0)
        t.put(b("b"), value: b("2"), lease: 0)
        #expect(r.log.isEmpty, "nothing is told before the transaction ends")
        t.end()
        // A transaction that changes nothing makes no revision and tells nobody.
        let empty = s.beginWrite()
        empty.deleteRange(b("zz"), [])
        empty.end()
        // A range delete is one revision of several deletions.
        let d = s.beginWrite()
        d.deleteRange(b("a"), b("c"))
        d.end()
        #expect(r.log == ["wrote 2: P a,P b", "wrote 3: D a,D b"])
        s.markCommitted(3)
        s.markCommitted(3)  // no news: not told again
        try s.compact(3)
        #expect(r.log == ["wrote 2: P a,P b", "wrote 3: D a,D b", "committed 3", "compacted 3"])
        #expect(r2.log == r.log)
    }

    @Test func observersAreHeldWeaklyAndCanLeave() {
        let s = KVStore()
        var r: Recorder? = Recorder()
        weak let gone = r
        s.addObserver(r!)
        r = nil
        #expect(gone == nil, "the store does not keep its observers alive")
        let kept = Recorder()
        s.addObserver(kept)
        put(s, "k", "v")
        s.removeObserver(kept)
        put(s, "k", "w")
        #expect(kept.log == ["wrote 2: P k", "committed 2"])
    }
}

@Suite struct Checksums {
    /// CRC-32C's check value, and the same over every split of longer input (the eight-byte steps
    /// and the byte tail agree).
    @Test func crc32cMatchesTheStandardCheckValueAndIgnoresSplits() {
        var c = CRC32C()
        c.update(Array("123456789".utf8))
        #expect(c.value == 0xE306_9283)
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
        var whole = CRC32C()
        whole.update(data)
        for split in [1, 3, 8, 13, 500, 999] {
            var parts = CRC32C()
            parts.update(Array(data[..<split]))
            parts.update(Array(data[split...]))
            #expect(parts.value == whole.value, "split at \(split)")
        }
        // Bytewise reference.
        var ref: UInt32 = 0xFFFF_FFFF
        for b in data {
            ref ^= UInt32(b)
            for _ in 0..<8 { ref = ref & 1 != 0 ? (ref >> 1) ^ 0x82F6_3B78 : ref >> 1 }
        }
        #expect(whole.value == ref ^ 0xFFFF_FFFF)
    }
}

/// A mirror's writes: at the revisions of the store it copies, gaps and all.
@Suite struct MirroredWrites {
    @Test func loadKeepsUpstreamRevisionsAndWritesGoOnAtTheirs() throws {
        let s = KVStore()
        s.loadMirrored(
            [
                KeyValue(key: b("a"), createRevision: 3, modRevision: 7, version: 2, value: b("1"), lease: 0),
                KeyValue(key: b("b"), createRevision: 9, modRevision: 9, version: 1, value: b("2"), lease: 5),
            ], deleted: [], at: 12)
        try s.compact(12)
        s.markCommitted(12)
        #expect(s.currentRevision == 12)
        let a = try #require(try s.range(b("a"), []).kvs.first)
        #expect(a.createRevision == 3 && a.modRevision == 7 && a.version == 2)
        #expect(try s.range(b("b"), []).kvs.first?.lease == 5)
        #expect(throws: MVCCError.compacted) { try s.range(b("a"), [], revision: 11) }
        // The next upstream change is at 20: the store's revision jumps there.
        let t = s.beginWrite(at: 20)
        t.put(mirrored: KeyValue(key: b("a"), createRevision: 3, modRevision: 20, version: 3, value: b("x"), lease: 0))
        t.deleteRange(b("b"), [])
        #expect(t.end().map(\.kv.modRevision) == [20, 20])
        s.markCommitted(20)
        #expect(try s.range(b("a"), []).kvs.first?.version == 3)
        #expect(try s.range(b("b"), []).kvs.isEmpty)
        #expect(try s.range(b("b"), [], revision: 19).kvs.count == 1)
        // Progress without a change of its own.
        s.advance(to: 25)
        #expect(s.currentRevision == 25)
        #expect(s.takeBatch()?.revision == 25)
    }

    @Test func reloadAppliesTheDifferenceOnly() throws {
        let s = KVStore()
        s.loadMirrored(
            [
                KeyValue(key: b("kept"), createRevision: 2, modRevision: 2, version: 1, value: b("1"), lease: 0),
                KeyValue(key: b("gone"), createRevision: 3, modRevision: 3, version: 1, value: b("1"), lease: 0),
            ], deleted: [], at: 4)
        // Reloaded at 10: "kept" changed at 8, "new" made at 9, "gone" deleted somewhere before 10.
        s.loadMirrored(
            [
                KeyValue(key: b("kept"), createRevision: 2, modRevision: 8, version: 2, value: b("2"), lease: 0),
                KeyValue(key: b("new"), createRevision: 9, modRevision: 9, version: 1, value: b("n"), lease: 0),
            ], deleted: [b("gone")], at: 10)
        s.markCommitted(10)
        #expect(try s.range(b("a"), b("z")).kvs.map { String(decoding: $0.value, as: UTF8.self) } == ["2", "n"])
        #expect(s.liveModRevisions().count == 2)
        #expect(s.currentRevision == 10)
    }
}

/// Paginated reads at one revision (kube-apiserver's lists): each page's count is the whole
/// range's, whichever way the count was reached (a later page counts only what it skipped).
@Suite struct PaginatedCountTests {
    private func k(_ i: Int) -> Bytes {
        let digits = String(i)
        return Array(("p/" + String(repeating: "0", count: max(0, 5 - digits.count)) + digits).utf8)
    }

    @Test func everyPageCountsTheWholeRange() throws {
        let store = KVStore()
        var rng = SystemRandomNumberGenerator()
        for i in 0..<2000 {
            let t = store.beginWrite()
            t.put(k(i), value: [1], lease: 0)
            if i % 7 == 0 { t.deleteRange(k(Int.random(in: 0...i, using: &rng)), []) }
            t.end()
            _ = store.takeBatch()
            store.markCommitted(t.revision)
        }
        let pinned = store.committedRevision
        // Writes after the pinned revision change nothing at it.
        for i in 0..<50 {
            let t = store.beginWrite()
            t.put(k(3000 + i), value: [2], lease: 0)
            t.deleteRange(k(i * 11), [])
            t.end()
            _ = store.takeBatch()
            store.markCommitted(t.revision)
        }
        let end = Array("p0".utf8)
        let total = try store.range(Array("p/".utf8), end, revision: pinned, countOnly: true).count
        var key = Array("p/".utf8)
        var seen = 0
        while true {
            let page = try store.range(key, end, revision: pinned, limit: 77)
            #expect(page.count == total - seen, "a page counts the rest of the range from its start")
            seen += page.kvs.count
            guard page.kvs.count == 77, let last = page.kvs.last else { break }
            key = last.key + [0]
        }
        #expect(seen == total)
        // And at the latest revision, from the start again: the whole range now.
        let now = try store.range(Array("p/".utf8), end, limit: 10)
        #expect(now.count == (try store.range(Array("p/".utf8), end, countOnly: true).count))
    }
}
