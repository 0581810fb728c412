import IntervalTree
import MVCC
import Testing
@testable import WatchHub

private func b(_ s: String) -> Bytes { Array(s.utf8) }

@Suite struct IntervalTreeTests {
    @Test func stabbingMatchesABruteForceModel() {
        var tree = IntervalTree<Int>()
        var model: [Int32: (Bytes, Bytes?, Int)] = [:]
        var rng = SystemRandomNumberGenerator()
        func randKey() -> Bytes { (0..<Int.random(in: 1...2, using: &rng)).map { _ in UInt8.random(in: 0...6, using: &rng) } }
        for step in 0..<3000 {
            if model.isEmpty || Int.random(in: 0..<3, using: &rng) > 0 {
                let lo = randKey()
                var hi: Bytes? = Bool.random(using: &rng) ? nil : lo + [UInt8.random(in: 0...6, using: &rng)]
                if hi != nil && Bool.random(using: &rng) { hi = randKey() }
                let h = tree.insert(low: lo, high: hi, step)
                model[h] = (lo, hi, step)
            } else {
                let h = model.keys.randomElement(using: &rng)!
                #expect(tree.remove(h) == model.removeValue(forKey: h)!.2)
            }
            if step % 50 == 0 { #expect(tree.verifyInvariants()) }
            let p = randKey()
            var got: [Int] = []
            tree.stab(p) { got.append($0) }
            let want = model.values.filter { lo, hi, _ in
                compareBytes(lo, p) <= 0 && (hi == nil || compareBytes(p, hi!) < 0)
            }.map(\.2)
            #expect(got.sorted() == want.sorted())
        }
        #expect(tree.count == model.count)
    }
}

/// Collects what the hub sends, decoded by the test encoder.
final class TestSink: WatchSink {
    var messages: [[UInt8]] = []
    var queuedBytes = 0
    func send(_ message: [UInt8]) { messages.append(message) }
}

/// A readable encoding: "rev|id|flags|events" with events as "P:key=value@mod" / "D:key@mod".
final class TestEncoder: WatchEncoder {
    func encode(_ e: Event, prevKV: Bool) -> [UInt8] {
        var s = e.kind == .put ? "P:" : "D:"
        s += String(decoding: e.kv.key, as: UTF8.self)
        if e.kind == .put { s += "=" + String(decoding: e.kv.value, as: UTF8.self) }
        s += "@\(e.kv.modRevision)"
        if prevKV, let p = e.prevKV { s += "<" + String(decoding: p.value, as: UTF8.self) }
        return Array(s.utf8)
    }

    func response(_ f: ResponseFields, events: [[UInt8]]) -> [UInt8] {
        var flags = ""
        if f.created { flags += "C" }
        if f.canceled { flags += "X" }
        if f.compactRevision != 0 { flags += "K\(f.compactRevision)" }
        if f.fragment { flags += "F" }
        if !f.cancelReason.isEmpty { flags += "(\(f.cancelReason))" }
        let ev = events.map { String(decoding: $0, as: UTF8.self) }.joined(separator: ",")
        return Array("\(f.headerRevision)|\(f.watchID)|\(flags)|\(ev)".utf8)
    }
}

struct Harness {
    let store = KVStore()
    let hub: WatchHub

    init(config: WatchHubConfig = WatchHubConfig()) {
        hub = WatchHub(store: store, encoder: TestEncoder(), config: config)
    }

    /// One write, published and made durable.
    func write(_ body: (WriteTxn) -> Void) {
        let t = store.beginWrite()
        body(t)
        let events = t.end()
        if !events.isEmpty {
            hub.publish(events, revision: t.revision)
            _ = store.takeBatch()
            store.markCommitted(t.revision)
            hub.advance(to: t.revision)
        }
    }

    func put(_ k: String, _ v: String) { write { $0.put(b(k), value: b(v), lease: 0) } }
    func del(_ k: String, _ end: String = "") { write { $0.deleteRange(b(k), b(end)) } }
}

func texts(_ s: TestSink) -> [String] { s.messages.map { String(decoding: $0, as: UTF8.self) } }

@Suite struct WatchHubTests {
    @Test func createdComesFirstThenEventsPerRevision() {
        let h = Harness()
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        h.hub.create(s, WatchCreate(key: b("a"), rangeEnd: b("b")))
        h.put("a1", "x")
        h.write { t in
            t.put(b("a2"), value: b("y"), lease: 0)
            t.put(b("zz"), value: b("no"), lease: 0)
            t.put(b("a3"), value: b("z"), lease: 0)
        }
        #expect(texts(sink) == ["1|0|C|", "2|0||P:a1=x@2", "3|0||P:a2=y@3,P:a3=z@3"])
    }

    @Test func idsStartAtZeroPerStreamAndDuplicatesFail() {
        let h = Harness()
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        h.hub.create(s, WatchCreate(key: b("a")))
        h.hub.create(s, WatchCreate(key: b("b")))
        var explicit = WatchCreate(key: b("c"))
        explicit.watchID = 1
        h.hub.create(s, explicit)
        var bad = WatchCreate(key: b("z"), rangeEnd: b("a"))
        h.hub.create(s, bad)
        bad.startRevision = -1
        h.hub.create(s, bad)
        #expect(texts(sink) == [
            "1|0|C|", "1|1|C|",
            "1|-1|CX(mvcc: duplicate watch ID provided on the WatchStream)|",
            "1|-1|CX(mvcc: watcher range is empty)|",
            "1|-1|CX(etcdserver: mvcc: required revision has been compacted)|",
        ])
    }

    @Test func historyFromRingAndStoreWithPrevKV() {
        var config = WatchHubConfig()
        config.ringMaxEvents = 2  // the ring keeps only the newest revisions
        let h = Harness(config: config)
        h.put("k", "1")  // 2
        h.put("k", "2")  // 3
        h.put("k", "3")  // 4
        h.del("k")  // 5
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        var c = WatchCreate(key: b("k"))
        c.startRevision = 2
        c.prevKV = true
        h.hub.create(s, c)
        while h.hub.catchUpPending { h.hub.catchUp() }
        h.put("k", "4")  // 6, live
        let all = texts(sink)
        #expect(all.first == "5|0|C|")
        // Every revision from 2 on, exactly once and in order, some from the store, some from the ring.
        let events = all.dropFirst().flatMap { $0.split(separator: "|", omittingEmptySubsequences: false)[3].split(separator: ",") }
        #expect(events == ["P:k=1@2", "P:k=2@3<1", "P:k=3@4<2", "D:k@5<3", "P:k=4@6"])
        #expect(h.hub.stats.storeCatchUps >= 1)
    }

    @Test func filtersAndCancel() {
        let h = Harness()
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        var c = WatchCreate(key: b("k"))
        c.noPut = true
        h.hub.create(s, c)
        h.put("k", "1")
        h.del("k")
        h.hub.cancel(s, watchID: 0)
        h.hub.cancel(s, watchID: 7)  // unknown: no answer
        h.put("k", "2")
        #expect(texts(sink) == ["1|0|C|", "3|0||D:k@3", "3|0|X|"])
    }

    @Test func compactedStartIsCanceledAfterCreated() throws {
        let h = Harness()
        h.put("k", "1")
        h.put("k", "2")
        h.put("k", "3")
        try h.store.compact(3)
        h.store.finishCompaction()
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        var config = WatchCreate(key: b("k"))
        config.startRevision = 2
        // Force the store path: the ring holds revision 2, so drop it by using a fresh hub.
        let fresh = WatchHub(store: h.store, encoder: TestEncoder())
        let s2 = fresh.openStream(sink)
        fresh.create(s2, config)
        fresh.catchUp()
        #expect(texts(sink) == ["4|0|C|", "0|0|XK3|"])
        // Also when the ring still holds the revision: a start below the compaction is refused.
        let sink2 = TestSink()
        h.hub.create(h.hub.openStream(sink2), config)
        #expect(texts(sink2) == ["4|0|C|", "0|0|XK3|"])
        #expect(h.hub.watcherCount == 0)
        _ = s
    }

    @Test func slowStreamIsParkedThenResumesWithoutLossOrReorder() {
        var config = WatchHubConfig()
        config.streamQueueLimit = 10
        config.ringMaxEvents = 3
        let h = Harness(config: config)
        let slow = TestSink(), fast = TestSink()
        let ss = h.hub.openStream(slow), fs = h.hub.openStream(fast)
        h.hub.create(ss, WatchCreate(key: b("k")))
        h.hub.create(fs, WatchCreate(key: b("k")))
        slow.queuedBytes = 1000  // the peer stopped reading
        for i in 0..<10 { h.put("k", "\(i)") }
        #expect(fast.messages.count == 11, "the fast stream got every revision at once")
        #expect(slow.messages.count == 1, "only `created` went to the slow one")
        #expect(h.hub.stats.parked == 1)
        slow.queuedBytes = 0
        h.hub.streamDrained(ss)
        while h.hub.catchUpPending { h.hub.catchUp() }
        let events = texts(slow).dropFirst().flatMap { $0.split(separator: "|", omittingEmptySubsequences: false)[3].split(separator: ",") }
        #expect(events.map(String.init) == (0..<10).map { "P:k=\($0)@\($0 + 2)" })
        h.put("k", "live")
        #expect(texts(slow).last == "12|0||P:k=live@12", "back in the synced set")
    }

    @Test func progressRequestAndPeriodicProgress() {
        let h = Harness()
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        h.hub.requestProgress(s)
        #expect(sink.messages.isEmpty, "a stream without watchers gets nothing")
        var c = WatchCreate(key: b("a"))
        c.progressNotify = true
        h.hub.create(s, c)
        h.hub.create(s, WatchCreate(key: b("b")))
        h.put("a", "1")
        h.hub.requestProgress(s)
        #expect(texts(sink).last == "2|-1||")
        h.hub.progressTick(streams: [s])
        #expect(texts(sink).last == "2|-1||", "watcher 0 got an event since the last tick")
        h.hub.progressTick(streams: [s])
        #expect(texts(sink).last == "2|0||")
        // A watcher on a future revision is not synced yet: no progress answer.
        var future = WatchCreate(key: b("c"))
        future.startRevision = 100
        h.hub.create(s, future)
        let before = sink.messages.count
        h.hub.requestProgress(s)
        #expect(sink.messages.count == before)
    }

    @Test func fragmentsSplitLargeResponses() {
        var config = WatchHubConfig()
        config.fragmentBytes = 20
        let h = Harness(config: config)
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        var c = WatchCreate(key: b("k"), rangeEnd: b("l"))
        c.fragment = true
        h.hub.create(s, c)
        h.write { t in for i in 0..<4 { t.put(b("k\(i)"), value: b("vvvv"), lease: 0) } }
        let out = texts(sink).dropFirst()
        #expect(out.count > 1)
        #expect(out.dropLast().allSatisfy { $0.contains("|F|") })
        #expect(!out.last!.contains("F"))
    }

    @Test func closingAStreamFreesItsWatchers() {
        let h = Harness()
        let s = h.hub.openStream(TestSink())
        for i in 0..<100 {
            h.hub.create(s, WatchCreate(key: b("k\(i)")))
            h.hub.create(s, WatchCreate(key: b("r\(i)"), rangeEnd: [0]))
        }
        #expect(h.hub.watcherCount == 200)
        h.hub.closeStream(s)
        #expect(h.hub.watcherCount == 0)
        #expect(h.hub.streamCount == 0)
        h.put("k1", "x")  // nothing to deliver, nothing crashes
    }
}
