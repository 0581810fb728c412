import Foundation
import MVCC
import Testing

@testable import LMDBBackend

private func b(_ s: String) -> Bytes { Array(s.utf8) }

/// A fresh LMDB directory, removed afterwards.
final class TempDir {
    let path = NSTemporaryDirectory() + "vigil-lmdb-test-\(UUID().uuidString)"
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Writes through a store and commits its batches, as the group commit does.
private func write(_ store: KVStore, _ backend: LMDBBackend, _ body: (WriteTxn) -> Void) throws {
    let t = store.beginWrite()
    body(t)
    t.end()
    if let batch = store.takeBatch() { try backend.commit(batch) }
}

@Suite struct LMDBBackendTests {
    @Test func committedRecordsMetaAndBlobsComeBackAfterReopening() throws {
        let dir = TempDir()
        do {
            let backend = try LMDBBackend(path: dir.path, mapSize: 1 << 26, noSync: true)
            let store = KVStore()
            try write(store, backend) { $0.put(b("a"), value: b("1"), lease: 7) }
            try write(store, backend) { $0.put(b("a"), value: b("2"), lease: 0) }
            try write(store, backend) { $0.deleteRange(b("a"), []) }
            store.setMeta("lease/7", 30)
            store.setBlob("auth/user/x", b("blob"))
            if let batch = store.takeBatch() { try backend.commit(batch) }
        }
        let backend = try LMDBBackend(path: dir.path, mapSize: 1 << 26, noSync: true)
        let (records, meta) = try backend.load()
        #expect(records.map(\.rev.main) == [2, 3, 4])
        #expect(
            records[0].kv
                == KeyValue(key: b("a"), createRevision: 2, modRevision: 2, version: 1, value: b("1"), lease: 7))
        #expect(records[2].kv == nil, "a deletion is a tombstone")
        #expect(meta["lease/7"] == 30 && meta[MetaKey.currentRevision] == 4)
        #expect(try backend.loadBlobs() == ["auth/user/x": b("blob")])
        // The store rebuilt from them reads as before.
        let store = KVStore(records: records, meta: meta)
        #expect(store.currentRevision == 4)
        #expect(try store.range(b("a"), [], revision: 3).kvs.first?.value == b("2"))
    }

    @Test func compactionRemovesRecordsAndMetaCanBeDeleted() throws {
        let dir = TempDir()
        let backend = try LMDBBackend(path: dir.path, mapSize: 1 << 26, noSync: true)
        let store = KVStore()
        for i in 0..<10 { try write(store, backend) { $0.put(b("k"), value: b("\(i)"), lease: 0) } }
        store.setMeta("gone", 1)
        if let batch = store.takeBatch() { try backend.commit(batch) }
        store.markCommitted(store.currentRevision)
        try store.compact(8)
        store.finishCompaction()
        store.removeMeta("gone")
        if let batch = store.takeBatch() { try backend.commit(batch) }
        let (records, meta) = try backend.load()
        #expect(records.map(\.rev.main) == [8, 9, 10, 11])
        #expect(meta["gone"] == nil && meta[MetaKey.compactRevision] == 8)
    }

    @Test func hashIsStableAndFollowsContentNotHistoryOfTheFile() throws {
        let d1 = TempDir(), d2 = TempDir()
        let b1 = try LMDBBackend(path: d1.path, mapSize: 1 << 26, noSync: true)
        let b2 = try LMDBBackend(path: d2.path, mapSize: 1 << 26, noSync: true)
        let s1 = KVStore(), s2 = KVStore()
        for (s, be) in [(s1, b1), (s2, b2)] {
            for i in 0..<50 { try write(s, be) { $0.put(b("k\(i % 7)"), value: b("v\(i)"), lease: 0) } }
        }
        #expect(try b1.hash() == b2.hash())
        let before = try b1.hash()
        try b1.defragment()
        #expect(try b1.hash() == before, "defragmenting rewrites the file, not its content")
        try write(s1, b1) { $0.put(b("new"), value: b("x"), lease: 0) }
        #expect(try b1.hash() != before)
    }

    @Test func defragmentGivesBackFreedSpaceAndACopyOpensAsTheSameStore() throws {
        let dir = TempDir()
        let backend = try LMDBBackend(path: dir.path, mapSize: 1 << 28, noSync: true)
        let store = KVStore()
        let big = Bytes(repeating: 1, count: 4096)
        for i in 0..<2000 { try write(store, backend) { $0.put(b("k\(i % 10)"), value: big, lease: 0) } }
        store.markCommitted(store.currentRevision)
        try store.compact(store.currentRevision)
        store.finishCompaction()
        if let batch = store.takeBatch() { try backend.commit(batch) }
        let grown = backend.lastSizes
        #expect(grown.inUse < grown.allocated / 4, "most pages are free after the compaction")
        try backend.defragment()
        #expect(backend.lastSizes.allocated < grown.allocated / 4)
        let copy = dir.path + "/copy.mdb"
        try backend.copy(to: copy)
        let restored = dir.path + "-restored"
        defer { try? FileManager.default.removeItem(atPath: restored) }
        try FileManager.default.createDirectory(atPath: restored, withIntermediateDirectories: true)
        try FileManager.default.moveItem(atPath: copy, toPath: restored + "/data.mdb")
        let again = try LMDBBackend(path: restored, mapSize: 1 << 28, noSync: true)
        #expect(try again.hash() == backend.hash())
        #expect(try again.load().records.count == 10)
    }

    @Test func recordCodecRoundTrips() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<500 {
            let key = Bytes(
                (0..<Int.random(in: 0...300, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
            let rev = Revision(
                main: Int64.random(in: 1...Int64.max, using: &rng), sub: Int64.random(in: 0...100, using: &rng))
            let live = Bool.random(using: &rng)
            let kv =
                live
                ? KeyValue(
                    key: key, createRevision: Int64.random(in: 1...1000, using: &rng), modRevision: rev.main,
                    version: Int64.random(in: 1...1000, using: &rng),
                    value: Bytes(repeating: 9, count: Int.random(in: 0...100)),
                    lease: Int64.random(in: 0...1000, using: &rng)) : nil
            let r = Record(rev: rev, key: key, kv: kv)
            let enc = RecordCodec.encode(r)
            let dec = enc.withUnsafeBytes { RecordCodec.decode(rev: rev, $0) }
            #expect(dec == r)
        }
    }
}
