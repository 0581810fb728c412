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
        func randKey() -> Bytes {
            (0..<Int.random(in: 1...2, using: &rng)).map { _ in UInt8.random(in: 0...6, using: &rng) }
        }
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
    let encoder: any WatchEncoder = TestEncoder.shared
    var messages: [[UInt8]] = []
    var queuedBytes = 0
    func send(_ message: [UInt8]) { messages.append(message) }
}

/// A readable encoding: "rev|id|flags|events" with events as "P:key=value@mod" / "D:key@mod".
final class TestEncoder: WatchEncoder {
    nonisolated(unsafe) static let shared = TestEncoder()

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
        hub = WatchHub(store: store, config: config)
    }

    /// One write, made durable: the hub hears both from the store it observes.
    func write(_ body: (WriteTxn) -> Void) {
        let t = store.beginWrite()
        body(t)
        if !t.end().isEmpty {
            _ = store.takeBatch()
            store.markCommitted(t.revision)
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
        #expect(
            texts(sink) == [
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
        let events = all.dropFirst().flatMap {
            $0.split(separator: "|", omittingEmptySubsequences: false)[3].split(separator: ",")
        }
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
        let fresh = WatchHub(store: h.store)
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
        let events = texts(slow).dropFirst().flatMap {
            $0.split(separator: "|", omittingEmptySubsequences: false)[3].split(separator: ",")
        }
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
        h.hub.progressTick()
        #expect(texts(sink).last == "2|-1||", "watcher 0 got an event since the last tick")
        h.hub.progressTick()
        #expect(texts(sink).last == "2|0||")
        // A watcher on a future revision is not synced yet: no progress answer.
        var future = WatchCreate(key: b("c"))
        future.startRevision = 100
        h.hub.create(s, future)
        let before = sink.messages.count
        h.hub.requestProgress(s)
        #expect(sink.messages.count == before)
    }

    /// A RequestProgress while a watcher catches up is answered once it is synced, after its
    /// catch-up events and at the revision they reach, also when the catch-up had no event for it;
    /// one waiting on a future start revision is answered once that revision is reached.
    @Test func progressRequestedWhileCatchingUpIsAnsweredOnceSynced() {
        var config = WatchHubConfig()
        config.streamQueueLimit = 10
        let h = Harness(config: config)
        for i in 0..<5 { h.put("a", "\(i)") }  // revisions 2...6
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        var old = WatchCreate(key: b("a"))
        old.startRevision = 2
        sink.queuedBytes = 1000  // a slow reader: the catch-up waits for it
        h.hub.create(s, old)
        h.hub.requestProgress(s)
        #expect(!texts(sink).contains { $0.hasPrefix("6|-1|") }, "not while the watcher is behind")
        sink.queuedBytes = 0
        h.hub.streamDrained(s)
        while h.hub.catchUpPending { h.hub.catchUp() }
        let t = texts(sink)
        #expect(t.last == "6|-1||", "\(t)")
        #expect(t.filter { $0.hasPrefix("6|-1|") }.count == 1)
        let lastEvent = t.lastIndex { $0.contains("P:a=4@6") }
        #expect(lastEvent != nil && lastEvent! < t.count - 1, "after the events it covers")

        // A watcher that catches up through revisions none of which is its own: still answered.
        let quiet = TestSink()
        let q = h.hub.openStream(quiet)
        var none = WatchCreate(key: b("zzz"))
        none.startRevision = 2
        quiet.queuedBytes = 1000
        h.hub.create(q, none)
        h.hub.requestProgress(q)
        quiet.queuedBytes = 0
        h.hub.streamDrained(q)
        while h.hub.catchUpPending { h.hub.catchUp() }
        #expect(texts(quiet).last == "6|-1||", "\(texts(quiet))")

        // A future start revision: answered once the store reaches the revision before it.
        let later = TestSink()
        let l = h.hub.openStream(later)
        var future = WatchCreate(key: b("a"))
        future.startRevision = 9
        h.hub.create(l, future)
        h.hub.requestProgress(l)
        h.put("b", "x")  // revision 7: two before the start
        #expect(!texts(later).contains { $0.contains("|-1|") })
        h.put("b", "y")  // revision 8: the watcher's next revision is its start
        #expect(texts(later).last == "8|-1||", "\(texts(later))")
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

    @Test func aStreamClosedFromInsideASendIsFreedAfterTheWalk() {
        // A sink whose send closes its own stream (as a failed write closes the connection).
        final class ClosingSink: WatchSink {
            let encoder: any WatchEncoder = TestEncoder.shared
            var messages = 0
            var onSend: (() -> Void)?
            var queuedBytes = 0
            func send(_ message: [UInt8]) {
                messages += 1
                onSend?()
            }
        }
        let h = Harness()
        let closing = ClosingSink()
        let s = h.hub.openStream(closing)
        let other = TestSink()
        let o = h.hub.openStream(other)
        for i in 0..<50 {
            h.hub.create(s, WatchCreate(key: b("k\(i)")))
            h.hub.create(s, WatchCreate(key: b("k"), rangeEnd: b("l")))
            h.hub.create(o, WatchCreate(key: b("k"), rangeEnd: b("l")))
        }
        closing.onSend = { [unowned hub = h.hub] in hub.closeStream(s) }
        let before = closing.messages
        h.put("k1", "x")  // dispatch: the first send closes the stream; nothing more goes to it
        #expect(closing.messages == before + 1)
        #expect(h.hub.watcherCount == 50 && h.hub.streamCount == 1)
        #expect(texts(other).filter { $0.contains("P:k1=x") }.count == 50)
        h.put("k2", "y")
        #expect(closing.messages == before + 1)
        #expect(texts(other).filter { $0.contains("P:k2=y") }.count == 50)

        // The same during catch-up: watchers replaying history on a stream that closes.
        let late = ClosingSink()
        let l = h.hub.openStream(late)
        for _ in 0..<20 {
            var c = WatchCreate(key: b("k"), rangeEnd: b("l"))
            c.startRevision = 1
            h.hub.create(l, c)
        }
        late.onSend = { [unowned hub = h.hub] in hub.closeStream(l) }
        h.hub.catchUp()
        #expect(h.hub.watcherCount == 50 && h.hub.unsyncedCount == 0)
        h.hub.closeStream(o)
        #expect(h.hub.watcherCount == 0 && h.hub.groupCount == 0)
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

/// The watcher store (struct of arrays, key arena, hash table) against a plain model: watchers
/// come and go on shared and distinct keys and ranges while writes run; each watcher must get
/// exactly the events it matches, and everything must be freed at the end.
@Suite struct WatcherStoreTests {
    private struct Model {
        var key: Bytes
        var end: Bytes
        var noPut = false
        var expected: [String] = []
    }

    @Test func randomWatchersAgainstAModel() {
        var seed: UInt64 = 0x5EED
        func rand(_ n: Int) -> Int {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            return Int((seed >> 33) % UInt64(n))
        }
        // Long keys so the arena passes its compaction threshold as watchers leave.
        func key(_ i: Int) -> Bytes { b("key/\(i)/" + String(repeating: "x", count: 300)) }
        let h = Harness()
        var sinks: [TestSink] = []
        var streams: [WatchStream] = []
        var models: [[Int64: Model]] = []
        for _ in 0..<8 {
            let sink = TestSink()
            sinks.append(sink)
            streams.append(h.hub.openStream(sink))
            models.append([:])
        }
        var nextBig: Int64 = 1 << 40
        func received(_ si: Int) -> [Int64: [String]] {
            var out: [Int64: [String]] = [:]
            for m in texts(sinks[si]) {
                let parts = m.split(separator: "|", omittingEmptySubsequences: false)
                guard parts[2].isEmpty, let id = Int64(parts[1]) else { continue }  // events only
                out[id, default: []].append(String(parts[3]))
            }
            return out
        }
        for step in 0..<6000 {
            let si = rand(streams.count)
            switch rand(10) {
            case 0..<4:
                var c = WatchCreate(key: key(rand(400)))
                if rand(5) == 0 { c.rangeEnd = key(rand(400)) + [0xFF] }
                if compareBytes(c.key, c.rangeEnd) >= 0 && !c.rangeEnd.isEmpty { swap(&c.key, &c.rangeEnd) }
                c.noPut = rand(6) == 0
                if rand(4) == 0 {
                    c.watchID = nextBig
                    nextBig += 1
                }
                let before = sinks[si].messages.count
                h.hub.create(streams[si], c)
                let created = String(decoding: sinks[si].messages[before], as: UTF8.self).split(separator: "|")
                let id = Int64(created[1])!
                #expect(id >= 0 && models[si][id] == nil)
                models[si][id] = Model(key: c.key, end: c.rangeEnd, noPut: c.noPut)
            case 4..<6:
                guard let id = models[si].keys.randomElement() else { continue }
                h.hub.cancel(streams[si], watchID: id)
                models[si][id] = nil
            case 6:
                if rand(20) == 0 {
                    h.hub.closeStream(streams[si])
                    let got = received(si)
                    for (id, m) in models[si] { #expect(got[id] ?? [] == m.expected) }
                    sinks[si] = TestSink()
                    streams[si] = h.hub.openStream(sinks[si])
                    models[si] = [:]
                }
            default:
                let k = key(rand(400))
                let rev = h.store.committedRevision + 1
                let isDelete = rand(4) == 0
                if isDelete {
                    h.del(String(decoding: k, as: UTF8.self))
                } else {
                    h.put(String(decoding: k, as: UTF8.self), "v\(step)")
                }
                guard h.store.committedRevision == rev else { continue }  // deleting a missing key writes nothing
                let text = String(decoding: k, as: UTF8.self)
                let event = isDelete ? "D:\(text)@\(rev)" : "P:\(text)=v\(step)@\(rev)"
                for si in models.indices {
                    for (id, m) in models[si]
                    where KeyRange.contains(k, key: m.key, end: m.end) && !(m.noPut && !isDelete) {
                        models[si][id]!.expected.append(event)
                    }
                }
            }
            if step % 50 == 0 { #expect(h.hub.verifyInvariants()) }
            if step % 500 == 0 {
                #expect(h.hub.watcherCount == models.reduce(0) { $0 + $1.count })
            }
        }
        for si in streams.indices {
            let got = received(si)
            for (id, m) in models[si] { #expect(got[id] ?? [] == m.expected, "stream \(si) watcher \(id)") }
            h.hub.closeStream(streams[si])
        }
        #expect(h.hub.watcherCount == 0)
        #expect(h.hub.groupCount == 0)
    }

    @Test func hashTableKeepsEveryKeyThroughGrowthAndRemoval() {
        var groups = WatchGroups()
        var live: [Bytes: Int32] = [:]
        // Keys long enough that the removals pass the arena's compaction threshold.
        func key(_ i: Int) -> Bytes { b("k\(i)/" + String(repeating: "y", count: 40)) }
        for i in 0..<5000 {
            let k = key(i)
            let g = groups.group(k, [])
            groups.head[Int(g)] = 0  // a member, so the group counts as live
            live[k] = g
        }
        // Remove most of them (the table shrinks and entries shift back), then check the rest.
        #expect(groups.verifyInvariants())
        for i in 0..<5000 where i % 7 != 0 {
            let k = key(i)
            groups.head[Int(live[k]!)] = -1
            groups.release(live.removeValue(forKey: k)!)
            if i % 97 == 0 { #expect(groups.verifyInvariants()) }
        }
        #expect(groups.verifyInvariants())
        for (k, g) in live {
            #expect(groups.single(k) == g)
            #expect(groups.key(g) == k)
        }
        #expect(groups.single(key(1)) == nil)
        #expect(groups.count == live.count)
        #expect(groups.arenaCompactions > 0)
    }
}

/// Watchers a mirror holds while older history comes from upstream, and revision gaps.
@Suite struct HeldWatcherTests {
    @Test func heldWatcherGetsOlderHistoryThenTheStoresWithoutGapOrRepeat() {
        let h = Harness()
        h.put("k", "1")  // 2
        h.put("k", "2")  // 3
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        var w = WatchCreate(key: b("k"))
        w.startRevision = 3  // the store's part starts at 3; older history comes from elsewhere
        let id = h.hub.create(s, w, held: true)!
        h.hub.catchUp()
        h.put("k", "3")  // 4: not delivered while held
        #expect(texts(sink) == ["3|0|C|"])
        let older = Event(
            kind: .put,
            kv: KeyValue(key: b("k"), createRevision: 1, modRevision: 1, version: 1, value: b("0"), lease: 0),
            prevKV: nil)
        h.hub.sendHistory(s, watchID: id, [older], headerRevision: 2)
        h.hub.release(s, watchID: id)
        h.hub.catchUp()
        h.put("k", "4")  // 5: live
        #expect(texts(sink) == ["3|0|C|", "2|0||P:k=0@1", "4|0||P:k=2@3,P:k=3@4", "5|0||P:k=4@5"])
    }

    @Test func revisionGapsAndCancelAll() {
        let h = Harness()
        let sink = TestSink()
        let s = h.hub.openStream(sink)
        h.hub.create(s, WatchCreate(key: b("k")))
        // A mirror's revisions skip what it does not copy.
        let t = h.store.beginWrite(at: 1_000_000)
        t.put(b("k"), value: b("v"), lease: 0)
        t.end()
        h.store.markCommitted(1_000_000)
        h.store.advance(to: 2_000_000)
        h.store.markCommitted(2_000_000)
        h.hub.cancelAll(compactRevision: 2_000_000)
        h.put("k", "after")
        #expect(texts(sink) == ["1|0|C|", "1000000|0||P:k=v@1000000", "0|0|XK2000000|"])
        #expect(h.hub.watcherCount == 0)
    }
}
