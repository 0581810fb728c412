import Testing
import VigilCore
import VigilTesting

@testable import Lease

/// A lessor with a manual clock, recording what it asks of the store.
final class Harness {
    let clock = ManualClock()
    var deleted: [[String]] = []
    var records: [Int64: Int64] = [:]
    var lessor: Lessor!

    init(restored: [(id: Int64, ttl: Int64)] = [], memberID: UInt64 = 0x8e9e_05c5_2164_694d) {
        lessor = Lessor(
            clock: clock, memberID: memberID, idEpochMilliseconds: 1_700_000_000_000, restored: restored,
            deleteKeys: { [unowned self] keys in deleted.append(keys.map { String(decoding: $0, as: UTF8.self) }) },
            record: { [unowned self] id, ttl in records[id] = ttl })
    }
}

private func k(_ s: String) -> LeaseKey { Array(s.utf8) }

@Suite struct LessorTests {
    @Test func grantPicksIDsAsEtcdDoesAndRecordsTheLease() throws {
        let h = Harness()
        let (id, ttl) = try h.lessor.grant(id: 0, ttl: 30)
        #expect(ttl == 30)
        // etcd's generator: the member ID's low 16 bits, then the timestamp, then a counter.
        #expect(UInt64(id) >> 48 == 0x694d)
        let (next, _) = try h.lessor.grant(id: 0, ttl: 30)
        #expect(next == id + 1)
        #expect(h.records[id] == 30 && h.records[next] == 30)
        #expect(try h.lessor.grant(id: 42, ttl: 1).ttl == Lessor.minTTL, "TTLs below the minimum are raised")
        #expect(throws: EtcdError.leaseExist) { try h.lessor.grant(id: 42, ttl: 10) }
        #expect(throws: EtcdError.leaseTTLTooLarge) { try h.lessor.grant(id: 7, ttl: Lessor.maxTTL + 1) }
        #expect(h.lessor.count == 3)
    }

    @Test func aLeaseExpiresAfterItsTTLUnlessRenewed() throws {
        let h = Harness()
        _ = try h.lessor.grant(id: 1, ttl: 10)
        _ = try h.lessor.grant(id: 2, ttl: 10)
        h.lessor.attach(k("b"), to: 1)
        h.lessor.attach(k("a"), to: 1)
        h.lessor.attach(k("c"), to: 2)
        h.clock.advance(seconds: 6)
        #expect(h.lessor.renew(2) == 10)
        #expect(h.lessor.timeToLive(1)?.remaining == 4)
        h.clock.advance(seconds: 3.999)
        #expect(!h.lessor.expireStep())
        #expect(h.lessor.count == 2, "not yet: 9.999 s of 10")
        h.clock.advance(milliseconds: 1)
        #expect(!h.lessor.expireStep())
        #expect(h.deleted == [["a", "b"]], "one revision deletes the expired lease's keys, in key order")
        #expect(h.records[1] == .some(nil) && h.lessor.exists(2) && !h.lessor.exists(1))
        #expect(h.lessor.renew(1) == 0, "an expired lease renews to 0, not an error")
        h.clock.advance(seconds: 7)
        h.lessor.expireStep()
        #expect(h.deleted == [["a", "b"], ["c"]])
        #expect(h.lessor.stats.revoked == 2 && h.lessor.stats.renewed == 1 && h.lessor.stats.granted == 2)
    }

    @Test func keysFollowAttachAndDetach() throws {
        let h = Harness()
        _ = try h.lessor.grant(id: 5, ttl: 100)
        h.lessor.attach(k("x"), to: 5)
        h.lessor.attach(k("y"), to: 5)
        h.lessor.attach(k("z"), to: 99)  // unknown lease: ignored
        h.lessor.detach(k("x"), from: 5)
        #expect(h.lessor.keys(5) == [k("y")])
        #expect(h.lessor.timeToLive(5)?.keys == [k("y")])
        #expect(h.lessor.timeToLive(99) == nil)
        try h.lessor.revoke(5)
        #expect(h.deleted == [["y"]])
        #expect(throws: EtcdError.leaseNotFound) { try h.lessor.revoke(5) }
        // A lease without keys deletes nothing (no empty revision).
        _ = try h.lessor.grant(id: 6, ttl: 100)
        try h.lessor.revoke(6)
        #expect(h.deleted == [["y"]])
    }

    @Test func restoredLeasesGetTheirFullTTLFromNow() {
        let h = Harness(restored: [(id: 3, ttl: 5), (id: 4, ttl: 60)])
        #expect(h.lessor.all() == [3, 4], "soonest expiry first")
        h.clock.advance(seconds: 5)
        h.lessor.expireStep()
        #expect(h.lessor.all() == [4])
        #expect(h.records[3] == .some(nil))
    }

    @Test func aMassExpiryGoesInBoundedSteps() throws {
        let h = Harness()
        h.lessor.revokeBatch = 500
        for i in 1...1200 {
            _ = try h.lessor.grant(id: Int64(i), ttl: 2)
            h.lessor.attach(k("key\(i)"), to: Int64(i))
        }
        h.clock.advance(seconds: 3)
        #expect(h.lessor.expireStep(), "more remain after the first 500")
        #expect(h.lessor.count == 700)
        #expect(h.lessor.expireStep())
        #expect(!h.lessor.expireStep())
        #expect(h.lessor.count == 0 && h.deleted.count == 1200)
    }

    @Test func renewalsLeaveStaleHeapEntriesThatAreSkipped() throws {
        let h = Harness()
        var rng = SystemRandomNumberGenerator()
        for i in 1...200 { _ = try h.lessor.grant(id: Int64(i), ttl: Int64.random(in: 2...20, using: &rng)) }
        for _ in 0..<2000 {
            _ = h.lessor.renew(Int64.random(in: 1...200, using: &rng))
            h.clock.advance(milliseconds: UInt64.random(in: 0...20, using: &rng))
            #expect(h.lessor.verifyInvariants())
            h.lessor.expireStep()
        }
        // Whatever is left has not expired; whatever expired is gone.
        for id in h.lessor.all() { #expect(h.lessor.timeToLive(id)!.remaining >= 0) }
        h.clock.advance(seconds: 21)
        while h.lessor.expireStep() {}
        #expect(h.lessor.count == 0)
    }
}

@Suite struct ExpiryHeapTests {
    @Test func popsInExpiryOrder() {
        var heap = ExpiryHeap()
        var rng = SystemRandomNumberGenerator()
        var model: [UInt64] = []
        for i in 0..<1000 {
            let e = UInt64.random(in: 0...10_000, using: &rng)
            heap.push(e, Int64(i))
            model.append(e)
            #expect(heap.verifyInvariants())
        }
        var out: [UInt64] = []
        while let top = heap.pop() { out.append(top.expiry) }
        #expect(out == model.sorted())
    }
}
