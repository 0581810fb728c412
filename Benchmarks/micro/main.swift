// vigil-micro: micro-benchmarks of the hot paths, with the allocations each operation makes, so
// that regressions in time or allocations show. Run a release build:
//
//   swift run -c release vigil-micro            # every case
//   swift run -c release vigil-micro --quick    # fewer iterations (the smoke test uses this)
//   swift run -c release vigil-micro dispatch   # only the cases named (ring, tree, encode,
//                                               # index, dispatch, memory, commit)
import CAllocCount
import EtcdAPI
import Foundation
import IntervalTree
import LMDBBackend
import MVCC
import WatchHub

let quick = CommandLine.arguments.contains("--quick")
if alloc_count_enabled() == 0 {
    FileHandle.standardError.write(Data("allocation counts are off in sanitizer builds\n".utf8))
}
let scale = quick ? 20 : 1
let only = Set(CommandLine.arguments.dropFirst().filter { !$0.hasPrefix("--") })
func wants(_ name: String) -> Bool { only.isEmpty || only.contains(name) }

struct Result {
    var name: String
    var nsPerOp: Double
    var allocsPerOp: Double
}
var results: [Result] = []

/// Times `iterations` runs of `body` (after one warm-up) and counts allocations.
@MainActor
func measure(_ name: String, iterations: Int, _ body: (Int) -> Void) {
    let n = max(1, iterations / scale)
    body(0)
    let a0 = alloc_count()
    let t0 = DispatchTime.now().uptimeNanoseconds
    for i in 0..<n { body(i) }
    let t1 = DispatchTime.now().uptimeNanoseconds
    let a1 = alloc_count()
    results.append(Result(name: name, nsPerOp: Double(t1 - t0) / Double(n), allocsPerOp: Double(a1 - a0) / Double(n)))
}

func key(_ i: Int) -> Bytes { Array("key/\(String(format: "%08d", i))".utf8) }
let value = Bytes(repeating: 0x76, count: 256)

// Event ring: append one revision (one put) to a full ring, trimming the oldest.
if wants("ring") {
    var ring = EventRing(maxEvents: 10_000, maxBytes: 64 << 20)
    var events: [RevisionEvents] = []
    for i in 0..<1000 {
        events.append(
            RevisionEvents(
                revision: Int64(i + 2),
                events: [
                    Event(kind: .put, kv: KeyValue(key: key(i), modRevision: Int64(i + 2), value: value), prevKV: nil)
                ]))
    }
    var rev: Int64 = 1
    measure("event ring append (full ring)", iterations: 1_000_000) { i in
        rev += 1
        let e = events[i % events.count]
        ring.append(RevisionEvents(revision: rev, events: e.events), trimmableUpTo: rev - 1)
    }
}

// Interval tree: which of 10,000 ranges contain a key.
if wants("tree") {
    var tree = IntervalTree<Int>()
    for i in 0..<10_000 { _ = tree.insert(low: key(i * 10), high: key(i * 10 + 15), i) }
    var hits = 0
    measure("interval tree stab (10k ranges)", iterations: 1_000_000) { i in
        tree.stab(key((i * 7919) % 100_000)) { _ in hits += 1 }
    }
    precondition(hits > 0)
}

// Event encoding: one put event and the framed WatchResponse around it.
if wants("encode") {
    let encoder = GRPCWatchEncoder(
        identity: MemberIdentity(clusterID: 1, memberID: 2, name: "m", peerURLs: [], clientURLs: []))
    let event = Event(
        kind: .put, kv: KeyValue(key: key(1), createRevision: 2, modRevision: 9, version: 3, value: value),
        prevKV: KeyValue(key: key(1), createRevision: 2, modRevision: 8, version: 2, value: value))
    measure("event encode + response frame", iterations: 500_000) { _ in
        let e = encoder.encode(event, prevKV: true)
        _ = encoder.response(ResponseFields(headerRevision: 9, watchID: 0), events: [e])
    }
}

// Key index: single-key reads from a store of 100,000 keys.
if wants("index") {
    let store = KVStore()
    for i in 0..<100_000 {
        let t = store.beginWrite()
        t.put(key(i), value: value, lease: 0)
        _ = t.end()
    }
    store.markCommitted(store.currentRevision)
    measure("key index lookup (100k keys)", iterations: 1_000_000) { i in
        _ = try? store.range(key((i * 7919) % 100_000), [])
    }
    measure("put into the index (100k keys)", iterations: 300_000) { i in
        let t = store.beginWrite()
        t.put(key(i % 100_000), value: value, lease: 0)
        _ = t.end()
    }
}

// Watch dispatch: one put delivered to 1,000 watchers on one prefix (a sink that drops bytes).
if wants("dispatch") {
    final class NullSink: WatchSink {
        let encoder: any WatchEncoder
        var sent = 0
        init(_ encoder: any WatchEncoder) { self.encoder = encoder }
        func send(_ message: [UInt8]) { sent += 1 }
        var queuedBytes: Int { 0 }
    }
    let store = KVStore()
    let encoder = GRPCWatchEncoder(
        identity: MemberIdentity(clusterID: 1, memberID: 2, name: "m", peerURLs: [], clientURLs: []))
    let hub = WatchHub(store: store)
    let sinks = (0..<1000).map { _ in NullSink(encoder) }
    for s in sinks { hub.create(hub.openStream(s), WatchCreate(key: Array("key/".utf8), rangeEnd: Array("key0".utf8))) }
    // Through the store, as in the server: the write's end puts its events in the hub's ring,
    // and marking it durable delivers them.
    func putDurably(_ store: KVStore, _ i: Int) {
        let t = store.beginWrite()
        t.put(key(i % 1000), value: value, lease: 0)
        t.end()
        store.markCommitted(t.revision)
    }
    measure("watch dispatch, 1 put → 1,000 watchers", iterations: 20_000) { i in putDurably(store, i) }
    precondition(sinks[0].sent > 0)

    // The fan-out shape: 100 streams × 10 watchers each on the prefix (ids 0…9 in every stream, so
    // consecutive watchers never share the last response; the dispatch's cache serves them).
    let fanSinks = (0..<100).map { _ in NullSink(encoder) }
    let fanStore = KVStore()
    let fanHub = WatchHub(store: fanStore)
    for s in fanSinks {
        let stream = fanHub.openStream(s)
        for _ in 0..<10 { fanHub.create(stream, WatchCreate(key: Array("key/".utf8), rangeEnd: Array("key0".utf8))) }
    }
    measure("watch dispatch, 1 put → 100 streams × 10 watchers", iterations: 20_000) { i in putDurably(fanStore, i) }
    precondition(fanSinks[0].sent > 0)
}

// Watcher memory: heap bytes per watcher for 1,000,000 watchers on distinct keys over 10,000
// streams (the hub's own structures, without the transport), as malloc counts them.
var memoryLines: [String] = []
if wants("memory") {
    final class NullSink: WatchSink {
        let encoder: any WatchEncoder
        init(_ encoder: any WatchEncoder) { self.encoder = encoder }
        func send(_ message: [UInt8]) {}
        var queuedBytes: Int { 0 }
    }
    func heapInUse() -> Int { Int(heap_in_use()) }
    let store = KVStore()
    let hub = WatchHub(store: store)
    let encoder = GRPCWatchEncoder(
        identity: MemberIdentity(clusterID: 1, memberID: 2, name: "m", peerURLs: [], clientURLs: []))
    let streamCount = quick ? 100 : 10_000
    let streams = (0..<streamCount).map { _ in hub.openStream(NullSink(encoder)) }
    for (i, s) in streams.enumerated() { hub.create(s, WatchCreate(key: Array("k/\(i)/0".utf8))) }
    let before = heapInUse()
    for w in 1..<100 {
        for (i, s) in streams.enumerated() { hub.create(s, WatchCreate(key: Array("k/\(i)/\(w)".utf8))) }
    }
    let added = streamCount * 99
    precondition(hub.watcherCount == streamCount * 100)
    memoryLines.append(
        String(
            format: "hub heap bytes per watcher (%d watchers, distinct keys): %.1f",
            hub.watcherCount, Double(heapInUse() - before) / Double(added)))
}

// Group commit: one LMDB transaction of 64 puts (fsync off: the CPU side of the commit path).
if wants("commit") {
    let dir = NSTemporaryDirectory() + "vigil-micro-\(getpid())"
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let backend = try LMDBBackend(path: dir, mapSize: 1 << 30, noSync: true)
    let store = KVStore()
    measure("group commit of 64 puts (LMDB, no fsync)", iterations: 20_000) { i in
        for j in 0..<64 {
            let t = store.beginWrite()
            t.put(key((i * 64 + j) % 50_000), value: value, lease: 0)
            _ = t.end()
        }
        if let batch = store.takeBatch() { try! backend.commit(batch) }
    }
}

let width = results.map(\.name.count).max() ?? 10
print("case".padding(toLength: width, withPad: " ", startingAt: 0) + "   ns/op   allocs/op")
for r in results {
    print(
        r.name.padding(toLength: width, withPad: " ", startingAt: 0)
            + String(format: " %9.1f %10.2f", r.nsPerOp, r.allocsPerOp))
}
for line in memoryLines { print(line) }
