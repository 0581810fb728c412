import Testing

@testable import Robustness

/// Each validator on small hand-made histories: a correct one passes, and each broken guarantee
/// is reported by the validator that owns it.
@Suite struct ValidatorTests {
    /// Builds a history: times in milliseconds, a collector watch that saw every write.
    struct Builder {
        var h = History()
        var revision: Int64 = 1
        var collector: [EventRecord] = []
        var state: [String: KV] = [:]

        static func ms(_ t: Int64) -> Int64 { t * 1_000_000 }

        /// An answered put of `key` at the next revision, from `call` to `returned` ms.
        @discardableResult
        mutating func put(_ key: String, _ value: String, at call: Int64, _ returned: Int64, lease: Int64 = 0) -> Int64
        {
            revision += 1
            let old = state[key]
            let kv = KV(
                key: key, value: value, createRevision: old?.createRevision ?? revision, modRevision: revision,
                version: (old?.version ?? 0) + 1, lease: lease)
            state[key] = kv
            collector.append(EventRecord(isPut: true, kv: kv, prevKV: nil))
            _ = old
            record(
                .txn(compares: [], success: [.put(key, value: value, lease: lease)], failure: []), call, returned,
                .txn(succeeded: true, results: [.put]))
            return revision
        }

        mutating func delete(_ key: String, at call: Int64, _ returned: Int64) {
            revision += 1
            let old = state.removeValue(forKey: key)
            collector.append(
                EventRecord(
                    isPut: false, kv: KV(key: key, value: "", createRevision: 0, modRevision: revision, version: 0),
                    prevKV: nil))
            _ = old
            record(
                .txn(compares: [], success: [.delete(key)], failure: []), call, returned,
                .txn(succeeded: true, results: [.deleted(1)]))
        }

        /// A read answered with `kv` at header `revision` (default: the current one).
        mutating func get(_ key: String, at call: Int64, _ returned: Int64, sees kv: KV?, revision header: Int64? = nil)
        {
            h.operations.append(
                Operation(
                    id: h.operations.count + 1, client: 9, request: .range(key: key, end: "", revision: 0, limit: 0),
                    call: Self.ms(call), returned: Self.ms(returned),
                    response: .range(kvs: kv.map { [$0] } ?? [], count: kv == nil ? 0 : 1, more: false),
                    revision: header ?? revision, error: nil))
        }

        mutating func record(_ r: Request, _ call: Int64, _ returned: Int64, _ response: Response) {
            h.operations.append(
                Operation(
                    id: h.operations.count + 1, client: h.operations.count % 3, request: r, call: Self.ms(call),
                    returned: Self.ms(returned), response: response, revision: revision, error: nil))
        }

        /// The history, with the collector's watch and the final state.
        func finish(watches extra: [WatchRecord] = []) -> History {
            var h = h
            var c = WatchRecord(id: 0, client: 0, key: "\0", end: "\0", startRevision: 2, opened: 0)
            c.isCollector = true
            c.responses = [WatchResponseRecord(time: 0, headerRevision: 1, events: [], created: true)]
            for e in collector {
                c.responses.append(WatchResponseRecord(time: 0, headerRevision: e.revision, events: [e]))
            }
            h.watches = [c] + extra
            h.finalRevision = revision
            h.finalState = state.values.sorted { $0.key < $1.key }
            return h
        }
    }

    func validators(_ h: History) -> Set<String> { Set(Validation.validate(h).map(\.validator)) }

    func sample() -> Builder {
        var b = Builder()
        b.put("key/a", "1", at: 0, 1)
        b.put("key/b", "2", at: 2, 3)
        b.get("key/a", at: 4, 5, sees: b.state["key/a"])
        b.put("key/a", "3", at: 6, 7)
        b.get("key/a", at: 8, 9, sees: b.state["key/a"])
        b.delete("key/b", at: 10, 11)
        b.get("key/b", at: 12, 13, sees: nil)
        return b
    }

    @Test func aCorrectHistoryPasses() {
        let b = sample()
        #expect(Validation.validate(b.finish()).isEmpty)
    }

    @Test func aStaleReadIsNotLinearizable() {
        var b = sample()
        let first = KV(key: "key/a", value: "1", createRevision: 2, modRevision: 2, version: 1)
        // Sent after the second put was answered, it sees the first value.
        b.get("key/a", at: 20, 21, sees: first, revision: b.revision)
        #expect(validators(b.finish()).contains("linearizability"))
    }

    @Test func revisionsGoingBackAreNotLinearizable() {
        var b = sample()
        b.get("key/c", at: 20, 21, sees: nil, revision: 2)
        #expect(validators(b.finish()).contains("linearizability"))
    }

    @Test func aLostAcknowledgedWriteIsReported() {
        var b = sample()
        b.put("key/c", "4", at: 20, 21)
        // The server forgot it: neither the watch nor the final state has it.
        b.collector.removeLast()
        b.state["key/c"] = nil
        let found = validators(b.finish())
        #expect(found.contains("durability"))
    }

    /// A watch of key/a from revision 2, delivering these responses (each a list of events).
    func watch(
        _ b: Builder, _ responses: [[EventRecord]], prevKV: Bool = false, progressAt: Int64? = nil
    ) -> WatchRecord {
        var w = WatchRecord(id: 1, client: 1, key: "key/a", end: "", startRevision: 2, opened: 0)
        w.prevKV = prevKV
        w.responses = [WatchResponseRecord(time: 0, headerRevision: 1, events: [], created: true)]
        for (i, evs) in responses.enumerated() {
            if let p = progressAt, i == 1 {
                w.responses.append(WatchResponseRecord(time: 0, headerRevision: p, events: []))
            }
            w.responses.append(WatchResponseRecord(time: 0, headerRevision: evs.last?.revision ?? 1, events: evs))
        }
        return w
    }

    func keyAEvents(_ b: Builder) -> [EventRecord] { b.collector.filter { $0.kv.key == "key/a" } }

    @Test func watchGuaranteesEachHaveAValidator() {
        let b = sample()
        let evs = keyAEvents(b)  // put at 2, put at 4
        #expect(validators(b.finish(watches: [watch(b, [[evs[0]], [evs[1]]])])).isEmpty)
        // A gap.
        #expect(validators(b.finish(watches: [watch(b, [[evs[1]]])])).contains("watch.reliable"))
        // The same event twice.
        #expect(validators(b.finish(watches: [watch(b, [[evs[0]], [evs[0]], [evs[1]]])])).contains("watch.unique"))
        // Out of order.
        #expect(validators(b.finish(watches: [watch(b, [[evs[1]], [evs[0]]])])).contains("watch.ordered"))
        // One revision split over two responses.
        let multi = b.finish(watches: [watch(b, [[evs[0]], [evs[1]], [evs[1]]])])
        #expect(validators(multi).contains("watch.atomic"))
        // An event at or below a progress notification already sent.
        #expect(
            validators(b.finish(watches: [watch(b, [[evs[0]], [evs[1]]], progressAt: 5)])).contains(
                "watch.bookmarkable"))
        // The previous value, right and wrong.
        var withPrev = evs[1]
        withPrev.prevKV = evs[0].kv
        #expect(validators(b.finish(watches: [watch(b, [[evs[0]], [withPrev]], prevKV: true)])).isEmpty)
        var wrongPrev = withPrev
        wrongPrev.prevKV?.value = "nope"
        #expect(
            validators(b.finish(watches: [watch(b, [[evs[0]], [wrongPrev]], prevKV: true)])).contains("watch.prevKV"))
        // A put that claims to create a key that existed.
        var notCreate = evs[1]
        notCreate.kv.createRevision = notCreate.kv.modRevision
        #expect(validators(b.finish(watches: [watch(b, [[evs[0]], [notCreate]])])).contains("watch.isCreate"))
        // An event of another key.
        let other = b.collector.first { $0.kv.key == "key/b" }!
        #expect(validators(b.finish(watches: [watch(b, [[evs[0]], [other]])])).contains("watch.filter"))
        // A watch from revision 3 whose first event is not the history's first from there.
        var late = watch(b, [[evs[0]], [evs[1]]])
        late.startRevision = 1
        late.responses[1].events = [evs[1]]
        late.responses.remove(at: 2)
        #expect(validators(b.finish(watches: [late])).contains("watch.resumable"))
    }

    /// Lock keys `locks/a/<n>` put and deleted as the server's recipe does.
    @Test func twoHoldersOfOneLockAreCaught() {
        var b = Builder()
        b.put("locks/a/1", "", at: 0, 1, lease: 11)
        let held = b.revision
        b.put("locks/a/2", "", at: 2, 3, lease: 12)
        let second = b.revision
        var first = LockRecord(kind: .lock, client: 1, name: "locks/a", lease: 11, call: 0)
        first.returned = Builder.ms(1)
        first.key = "locks/a/1"
        first.headerRevision = held
        // The second is answered while the first still holds: broken.
        var early = LockRecord(kind: .lock, client: 2, name: "locks/a", lease: 12, call: Builder.ms(2))
        early.returned = Builder.ms(3)
        early.key = "locks/a/2"
        early.headerRevision = second
        var h = b.finish()
        h.locks = [first]
        #expect(validators(h).isEmpty)
        h.locks = [first, early]
        #expect(validators(h).contains("lock.safety"))
        // Two sessions answered the same key (the lease-0 bug): broken too.
        var twice = first
        twice.client = 2
        twice.lease = 0
        h.locks = [first, twice]
        #expect(validators(h).contains("lock.safety"))
    }

    @Test func aLeaderThatIsNotTheOldestAndAMissedValueAreCaught() {
        var b = Builder()
        b.put("elections/e/1", "v0", at: 0, 1, lease: 11)
        b.put("elections/e/2", "w0", at: 2, 3, lease: 12)
        b.put("elections/e/1", "v1", at: 4, 5, lease: 11)
        b.put("elections/e/1", "v2", at: 6, 7, lease: 11)
        var h = b.finish()
        let v = (0...2).map { i in b.collector.filter { $0.kv.key == "elections/e/1" }[i].kv }
        let w0 = b.collector.first { $0.kv.key == "elections/e/2" }!.kv
        func report(_ kv: KV, _ stream: Int?) -> LeaderReport {
            LeaderReport(client: 1, time: 0, headerRevision: kv.modRevision, kv: kv, stream: stream)
        }
        h.leaders = v.map { report($0, 1) }
        #expect(validators(h).isEmpty)
        // The second key reported as leader while the first leads.
        h.leaders = [report(w0, nil)]
        #expect(validators(h).contains("election.leader"))
        // An Observe that skipped v1.
        h.leaders = [report(v[0], 1), report(v[2], 1)]
        #expect(validators(h).contains("election.observe"))
    }

    @Test func aKeyThatOutlivesItsLeaseIsCaught() {
        var b = Builder()
        b.put("lease/1", "x", at: 100, 101, lease: 77)
        var h = b.finish()
        h.leases = [LeaseRecord(id: 77, ttl: 3, granted: Builder.ms(100), keys: ["lease/1"])]
        let kv = b.state["lease/1"]!
        // Read 2 s after the grant: fine. Read 7 s after (TTL 3 s + the 2 s bound): not.
        var fine = b
        fine.get("lease/1", at: 2100, 2101, sees: kv)
        h.operations = fine.h.operations
        h.finalTime = Builder.ms(2200)
        var ok = h
        ok.watches = fine.finish().watches
        #expect(!validators(ok).contains("lease"))
        var late = b
        late.get("lease/1", at: 7100, 7101, sees: kv)
        h.operations = late.h.operations
        #expect(validators(h).contains("lease"))
    }
}
