import Foundation
import Glibc
import MVCC
import Testing

@testable import LMDBBackend

private func b(_ s: String) -> Bytes { Array(s.utf8) }

/// A store over a logged backend, as the server builds it: the index from LMDB, values read back.
private func open(_ dir: TempDir, mapSize: Int = 1 << 26, sync: Bool = false) throws -> (LMDBBackend, KVStore) {
    let backend = try LMDBBackend(path: dir.path, mapSize: mapSize, noSync: !sync, log: true)
    let store = try KVStore(meta: try backend.loadMeta(), source: backend) { add in
        try backend.forEachRecord(values: false) { add($0.rev, $0.key, $0.kv) }
    }
    return (backend, store)
}

/// One write transaction and its group commit, as the commit coordinator makes them.
private func write(_ store: KVStore, _ backend: LMDBBackend, _ body: (WriteTxn) -> Void) throws {
    let t = store.beginWrite()
    body(t)
    t.end()
    if let batch = store.takeBatch() {
        try backend.commit(batch)
        store.markCommitted(batch.revision)
    }
}

/// Whether files in `dir` open with O_DIRECT (tmpfs refuses it).
private func takesDirectIO(_ dir: String) -> Bool {
    let p = dir + "/direct-probe"
    let fd = Glibc.open(p, O_RDWR | O_CREAT | __O_DIRECT, 0o600)
    defer { unlink(p) }
    guard fd >= 0 else { return false }
    close(fd)
    return true
}

private func segments(_ dir: TempDir) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir.path + "/wal")) ?? []).filter { $0.hasSuffix(".wal") }
        .sorted()
}

@Suite struct WriteAheadLogTests {
    @Test func batchesRoundTripThroughTheLogFormat() throws {
        var batch = WriteBatch()
        batch.revision = 9
        batch.records = [
            Record(
                rev: Revision(main: 9, sub: 0), key: b("k"),
                kv: KeyValue(key: b("k"), createRevision: 3, modRevision: 9, version: 4, value: b("v"), lease: 5)),
            Record(rev: Revision(main: 9, sub: 1), key: b("gone"), kv: nil),
        ]
        batch.removed = [Revision(main: 2, sub: 0)]
        batch.meta = ["lease/5": 60, MetaKey.currentRevision: 9]
        batch.removedMeta = ["alarm/NOSPACE"]
        let blobs: [String: Bytes?] = ["auth/user/a": b("x"), "auth/role/r": nil]
        batch.blobs = blobs
        let encoded = BatchCodec.encode(batch)
        let decoded = try #require(encoded.withUnsafeBytes { BatchCodec.decode($0) })
        #expect(decoded.revision == 9 && decoded.records == batch.records && decoded.removed == batch.removed)
        #expect(decoded.meta == batch.meta && decoded.removedMeta == batch.removedMeta)
        #expect(decoded.blobs.count == 2 && decoded.blobs["auth/role/r"]! == nil)
        #expect(decoded.blobs["auth/user/a"]! == b("x"))
        // Truncated or extended bytes are not a batch.
        #expect(encoded.dropLast().withUnsafeBytes { BatchCodec.decode($0) } == nil)
        #expect((encoded + [0]).withUnsafeBytes { BatchCodec.decode($0) } == nil)
    }

    @Test func loggedCommitsComeBackWithoutACheckpoint() throws {
        let dir = TempDir()
        do {
            let (backend, store) = try open(dir)
            try write(store, backend) { $0.put(b("a"), value: b("1"), lease: 0) }
            try write(store, backend) { $0.put(b("a"), value: b("2"), lease: 0) }
            try write(store, backend) { $0.put(b("b"), value: b("3"), lease: 0) }
            store.setBlob("auth/user/u", b("blob"))
            if let batch = store.takeBatch() { try backend.commit(batch) }
            #expect(backend.unflushedBytes > 0)
            // No checkpoint: LMDB has nothing yet, the log has it all (as after kill -9).
        }
        let (backend, store) = try open(dir)
        #expect(store.currentRevision == 4)
        #expect(try store.range(b("a"), []).kvs.first?.value == b("2"))
        #expect(try store.range(b("a"), [], revision: 2).kvs.first?.value == b("1"))
        #expect(try backend.loadBlobs() == ["auth/user/u": b("blob")])
        #expect(backend.unflushedBytes == 0, "replayed into LMDB at open")
        #expect(try backend.loadMeta()[LMDBBackend.walAppliedName] == nil, "the log's own entry stays hidden")
    }

    @Test func checkpointsMoveValuesOutOfMemoryAndReadsFindThemInLMDB() throws {
        let dir = TempDir()
        let (backend, store) = try open(dir)
        let big = Bytes(repeating: 7, count: 4096)
        for i in 0..<50 { try write(store, backend) { $0.put(b("k\(i % 5)"), value: big + b("\(i)"), lease: 0) } }
        #expect(store.recentCount == 50)
        try backend.checkpoint()
        #expect(backend.checkpointedRevision == store.currentRevision)
        store.releaseValues(through: backend.checkpointedRevision)
        store.releaseStep()
        #expect(store.recentCount == 0 && store.recentBytes == 0)
        #expect(backend.unflushedBytes == 0)
        // Latest, historic and keys-only reads.
        let latest = try store.range(b("k"), b("l")).kvs
        #expect(latest.map(\.value) == (45..<50).map { big + b("\($0)") })
        #expect(try store.range(b("k0"), [], revision: 2).kvs.first?.value == big + b("0"))
        #expect(try store.range(b("k"), b("l"), keysOnly: true).kvs.allSatisfy { $0.value.isEmpty })
        // Catch-up events carry values and previous values read from LMDB.
        let events = store.events(b("k0"), [], from: 7, to: 12)
        #expect(events.map(\.1.kv.value) == [big + b("5"), big + b("10")])
        #expect(events.map { $0.1.prevKV?.value } == [big + b("0"), big + b("5")])
        #expect(events.allSatisfy { !$0.1.prevValuePending })
        // The hash over LMDB equals the hash over memory of the same history.
        let memory = KVStore()
        for i in 0..<50 {
            let t = memory.beginWrite()
            t.put(b("k\(i % 5)"), value: big + b("\(i)"), lease: 0)
            t.end()
        }
        #expect(try backend.hashKV(upTo: 30) == memory.hashKV(revision: 30))
        #expect(try backend.hashKV(upTo: 0) != memory.hashKV(revision: 30))
        #expect(try backend.hashKV(upTo: store.currentRevision) == memory.hashKV(revision: 0))
    }

    @Test func aPutLeavesItsPreviousValueForTheWatcherThatWantsIt() throws {
        let dir = TempDir()
        let (backend, store) = try open(dir)
        try write(store, backend) { $0.put(b("a"), value: b("old"), lease: 0) }
        try backend.checkpoint()
        store.releaseValues(through: backend.checkpointedRevision)
        store.releaseStep()
        let t = store.beginWrite()
        let prev = t.put(b("a"), value: b("new"), lease: 0)
        var events = t.end()
        #expect(prev?.value == [] && prev?.version == 1, "not read: nobody asked")
        #expect(events[0].prevValuePending)
        store.loadPrevValue(&events[0])
        #expect(events[0].prevKV?.value == b("old") && !events[0].prevValuePending)
        // Asked for (a put with prev_kv): read at once.
        let t2 = store.beginWrite()
        #expect(t2.put(b("a"), value: b("newer"), lease: 0, prevValue: true)?.value == b("new"))
        t2.end()
        // A deletion's previous values, read later.
        let t3 = store.beginWrite()
        t3.deleteRange(b("a"), [])
        var deleted = t3.end()
        store.loadPrevValue(&deleted[0])
        #expect(deleted[0].prevKV?.value == b("newer"))
    }

    @Test func aTornTailIsDroppedAndEarlierRecordsKept() throws {
        let dir = TempDir()
        do {
            let (backend, store) = try open(dir)
            for i in 0..<3 { try write(store, backend) { $0.put(b("k"), value: b("\(i)"), lease: 0) } }
        }
        // Tear the last record: flip a byte of its payload.
        let file = dir.path + "/wal/" + segments(dir)[0]
        let fd = Foundation.open(file, O_RDWR)
        defer { close(fd) }
        var header = [UInt8](repeating: 0, count: 16)
        var at = 0
        var last = 0
        while pread(fd, &header, 16, off_t(at)) == 16 {
            let length = Int(header[0]) | Int(header[1]) << 8 | Int(header[2]) << 16 | Int(header[3]) << 24
            if length == 0 { break }
            last = at
            at += 16 + length
        }
        var byte: UInt8 = 0
        _ = pread(fd, &byte, 1, off_t(last + 20))
        byte ^= 0xFF
        _ = pwrite(fd, &byte, 1, off_t(last + 20))
        let (_, store) = try open(dir)
        #expect(store.currentRevision == 3, "the torn record (revision 4) was never acknowledged")
        #expect(try store.range(b("k"), []).kvs.first?.value == b("1"))
    }

    @Test func checkpointedSegmentsAreRetiredAndOneIsKeptAsASpare() throws {
        let dir = TempDir()
        let (backend, store) = try open(dir, mapSize: 1 << 28)
        let value = Bytes(repeating: 1, count: 1 << 20)
        for i in 0..<70 { try write(store, backend) { $0.put(b("k\(i % 3)"), value: value, lease: 0) } }
        #expect(segments(dir).count == 2, "64 MiB segments: 70 MiB of records span two")
        try backend.checkpoint()
        #expect(segments(dir).count == 1, "the full one is retired")
        let spares = try FileManager.default.contentsOfDirectory(atPath: dir.path + "/wal").filter {
            $0.hasSuffix(".tmp")
        }
        #expect(spares.count == 1)
        #expect(backend.logSpaceFailure == nil)
        store.releaseValues(through: backend.checkpointedRevision)
        store.releaseStep()
        #expect(try store.range(b("k1"), []).kvs.first?.value == value)
    }

    @Test func aCheckpointThatFindsNoRoomLosesNothing() throws {
        let dir = TempDir()
        let value = Bytes(repeating: 2, count: 1 << 20)
        do {
            let (backend, store) = try open(dir, mapSize: 1 << 24)
            for i in 0..<20 { try write(store, backend) { $0.put(b("k\(i)"), value: value, lease: 0) } }
            // 20 MiB into a 16 MiB map: LMDB refuses the checkpoint; the batches stay logged.
            #expect(throws: LMDBError.self) { try backend.checkpoint() }
            #expect(backend.unflushedBytes > 20 << 20)
            store.releaseValues(through: backend.checkpointedRevision)
            store.releaseStep()
            #expect(try store.range(b("k19"), []).kvs.first?.value == value, "still read from memory")
        }
        // Reopened with room: everything acknowledged is there.
        let (_, store) = try open(dir, mapSize: 1 << 28)
        #expect(try store.range(b("k"), b("l"), countOnly: true).count == 20)
        #expect(try store.range(b("k7"), []).kvs.first?.value == value)
    }

    /// With sync on, records go down as whole 4 KiB blocks (`O_DIRECT`): records of every size
    /// across block boundaries, and a segment change, read back in order.
    @Test func directWritesOfEverySizeReadBackInOrder() throws {
        let dir = TempDir()
        var expected: [String: Bytes] = [:]
        do {
            let (backend, store) = try open(dir, mapSize: 1 << 28, sync: true)
            #expect(backend.logWritesDirect == takesDirectIO(dir.path + "/wal"))
            var generator = SystemRandomNumberGenerator()
            for i in 0..<400 {
                let size = [0, 1, 100, 4000, 4096, 5000, 70_000][Int.random(in: 0..<7, using: &generator)]
                let value = Bytes(repeating: UInt8(i % 251), count: size) + b("\(i)")
                let key = "k\(i % 37)"
                expected[key] = value
                try write(store, backend) { $0.put(b(key), value: value, lease: 0) }
            }
            // Large records: over the 64 MiB of the first segment.
            for i in 0..<70 {
                let value = Bytes(repeating: 3, count: 1 << 20) + b("big\(i)")
                expected["big\(i % 5)"] = value
                try write(store, backend) { $0.put(b("big\(i % 5)"), value: value, lease: 0) }
            }
            #expect(segments(dir).count == 2)
        }
        let (_, store) = try open(dir, mapSize: 1 << 28, sync: true)
        #expect(store.currentRevision == 471)
        for (key, value) in expected { #expect(try store.range(b(key), []).kvs.first?.value == value, "\(key)") }
    }
}
