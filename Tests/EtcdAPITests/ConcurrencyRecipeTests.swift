import EtcdAPI
import EtcdProto
import Foundation
import MVCC
import SwiftProtobuf
import Testing
import VigilCore
import VigilTesting

/// The Lock and Election recipes on in-memory services whose group commits complete only when
/// the test says: waiters and observers against commits in flight, in the server's order.
@Suite struct ConcurrencyRecipeTests {
    /// One unary call's answer, when it comes; `leave()` is the caller going away.
    final class Call<Resp: SwiftProtobuf.Message>: ReplySink {
        var result: Result<Resp, EtcdError>?
        private var abandoned: (() -> Void)?
        func ok(_ response: any SwiftProtobuf.Message) { result = .success(response as! Resp) }
        func fail(_ error: EtcdError) { result = .failure(error) }
        func whenAbandoned(_ body: @escaping () -> Void) { abandoned = body }
        func leave() { abandoned?() }
        var value: Resp? { try? result?.get() }
    }

    let memory = InMemoryServices(manualCommits: true)
    var services: EtcdServices { memory.services }

    func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ req: Req, as: Resp.Type = Resp.self
    ) -> Call<Resp> {
        let c = Call<Resp>()
        services.unary(method)!.serve(req, RequestInfo(token: nil, size: 0), c)
        return c
    }

    func lock(_ name: String, lease: Int64 = 0) -> Call<V3lockpb_LockResponse> {
        var r = V3lockpb_LockRequest()
        r.name = Data(name.utf8)
        r.lease = lease
        return call(.lock, r)
    }

    func put(_ key: String, _ value: String = "") {
        var p = Etcdserverpb_PutRequest()
        p.key = Data(key.utf8)
        p.value = Data(value.utf8)
        _ = call(.put, p, as: Etcdserverpb_PutResponse.self)
    }

    func unlock(_ key: Data) -> Call<V3lockpb_UnlockResponse> {
        var r = V3lockpb_UnlockRequest()
        r.key = key
        return call(.unlock, r)
    }

    func commitAll() { memory.commit() }

    func grant() throws -> Int64 {
        var g = Etcdserverpb_LeaseGrantRequest()
        g.ttl = 30
        let c = call(.leaseGrant, g, as: Etcdserverpb_LeaseGrantResponse.self)
        commitAll()
        return try #require(c.value).id
    }

    /// etcd's Lock with lease 0 opens a session of its own: a 60 s lease that nothing renews, and
    /// a key named after it. Two such callers never share a key: the second waits its turn.
    @Test func leaseZeroLocksQueueOnSessionsOfTheirOwn() throws {
        let first = lock("job")
        commitAll()
        let held = try #require(first.value)
        let heldKey = String(decoding: held.key, as: UTF8.self)
        #expect(heldKey.hasPrefix("job/") && heldKey != "job/0")
        let lease = Int64(bitPattern: UInt64(heldKey.dropFirst(4), radix: 16)!)
        let ttl = try #require(services.lessor.timeToLive(lease))
        #expect(ttl.granted == 60 && ttl.remaining == 60)
        memory.clock.advance(seconds: 20)
        let second = lock("job")
        commitAll()
        #expect(second.result == nil)
        #expect(memory.store.currentRevision == 3)

        // Nothing renews it: 60 s on, the lease ends, its key goes, and the waiter holds the lock.
        memory.clock.advance(seconds: 39.5)
        _ = services.lessor.expireStep()
        commitAll()
        #expect(second.result == nil)
        memory.clock.advance(seconds: 1)
        _ = services.lessor.expireStep()
        commitAll()
        let next = try #require(second.value)
        #expect(next.key != held.key && String(decoding: next.key, as: UTF8.self).hasPrefix("job/"))
    }

    /// The stall found from outside: the holder's key is deleted in a group commit still on disk
    /// when an older commit completes. The waiter must look again at the revision that freed it.
    @Test func aWaiterIsAnsweredAtTheCommitThatFreedIt() throws {
        let a = lock("q", lease: try grant())
        commitAll()
        let held = try #require(a.value)
        let b = lock("q", lease: try grant())
        commitAll()
        #expect(b.result == nil)
        // Batch 1 (another client's write) and batch 2 (the unlock) in flight; batch 1 completes
        // first, then batch 2.
        put("other", "x")
        let older = memory.store.currentRevision
        let u = unlock(held.key)
        memory.commit(through: older)
        #expect(b.result == nil)
        memory.commit(through: memory.store.currentRevision)
        #expect(u.value != nil)
        #expect(b.value?.header.revision == memory.store.currentRevision)
    }

    /// A waiter that starts waiting while the holder's unlock is still in flight (its own queue
    /// write was answered first) hears of that unlock too.
    @Test func aWaiterHearsOfWritesMadeBeforeItStartedWaiting() throws {
        let a = lock("r", lease: try grant())
        commitAll()
        let held = try #require(a.value)
        let b = lock("r", lease: try grant())
        // b's queue txn waits for its commit; the unlock is written after it, in a later batch.
        let queued = memory.store.currentRevision
        let u = unlock(held.key)
        memory.commit(through: queued)
        #expect(b.result == nil)
        memory.commit(through: memory.store.currentRevision)
        #expect(u.value != nil && b.value != nil)
    }

    /// A caller that leaves while waiting gives up its place; the next one gets the lock.
    @Test func aWaiterThatLeavesGivesUpItsPlace() throws {
        let a = lock("s", lease: try grant())
        commitAll()
        let held = try #require(a.value)
        let b = lock("s", lease: try grant())
        commitAll()
        let c = lock("s")
        commitAll()
        b.leave()
        commitAll()
        _ = unlock(held.key)
        commitAll()
        #expect(b.result == nil)
        #expect(c.value != nil)
    }

    func campaign(_ name: String, _ value: String, lease: Int64 = 0) -> Call<V3electionpb_CampaignResponse> {
        var r = V3electionpb_CampaignRequest()
        r.name = Data(name.utf8)
        r.value = Data(value.utf8)
        r.lease = lease
        return call(.campaign, r)
    }

    func proclaim(_ leader: V3electionpb_LeaderKey, _ value: String) -> Call<V3electionpb_ProclaimResponse> {
        var r = V3electionpb_ProclaimRequest()
        r.leader = leader
        r.value = Data(value.utf8)
        return call(.proclaim, r)
    }

    /// Campaign with lease 0 has a session of its own too: two callers are never both leaders.
    @Test func leaseZeroCampaignsQueue() throws {
        let one = campaign("db", "a")
        commitAll()
        let leader = try #require(one.value)
        #expect(leader.leader.lease != 0 && leader.leader.key.count > 3)
        let two = campaign("db", "b")
        commitAll()
        #expect(two.result == nil)
        var resign = V3electionpb_ResignRequest()
        resign.leader = leader.leader
        _ = call(.resign, resign, as: V3electionpb_ResignResponse.self)
        commitAll()
        let next = try #require(two.value)
        #expect(next.leader.key != leader.leader.key && next.leader.lease != leader.leader.lease)
    }

    /// Observe sends every proclaimed value, even several written in the commits of one turn.
    @Test func observeMissesNoProclaimedValue() throws {
        let one = campaign("svc", "v0")
        commitAll()
        let leader = try #require(one.value).leader
        var seen: [String] = []
        let observation = try services.observe(name: Array("svc".utf8), credentials: Credentials(token: nil)) {
            seen.append(String(decoding: $0.kv.value, as: UTF8.self))
        }
        observation.start()
        var answers: [Call<V3electionpb_ProclaimResponse>] = []
        for i in 1...5 { answers.append(proclaim(leader, "v\(i)")) }
        put("svc-unrelated", "x")
        memory.commit(through: memory.store.currentRevision - 3)
        commitAll()
        #expect(answers.allSatisfy { $0.value != nil })
        #expect(seen == ["v0", "v1", "v2", "v3", "v4", "v5"])
        // The leader resigns, the next campaigner leads: the observer follows it.
        let two = campaign("svc", "w0")
        commitAll()
        var resign = V3electionpb_ResignRequest()
        resign.leader = leader
        _ = call(.resign, resign, as: V3electionpb_ResignResponse.self)
        commitAll()
        #expect(two.value != nil)
        #expect(seen.last == "w0")
        observation.cancel()
    }

    /// A campaign again with a new value is answered once the value is there (etcd proclaims it
    /// before answering), and a lease that does not exist is etcd's error through its client:
    /// gRPC Unknown.
    @Test func campaignAgainProclaimsFirstAndErrorsComeAsEtcdsClientSeesThem() throws {
        let grant = call(
            .leaseGrant,
            {
                var g = Etcdserverpb_LeaseGrantRequest()
                g.ttl = 30
                return g
            }(),
            as: Etcdserverpb_LeaseGrantResponse.self)
        commitAll()
        let lease = try #require(grant.value).id
        let first = campaign("e", "one", lease: lease)
        commitAll()
        #expect(first.value != nil)
        let again = campaign("e", "two", lease: lease)
        #expect(again.result == nil)
        commitAll()
        #expect(try #require(again.value).leader.key == first.value?.leader.key)
        var leaderReq = V3electionpb_LeaderRequest()
        leaderReq.name = Data("e".utf8)
        let l = call(.leader, leaderReq, as: V3electionpb_LeaderResponse.self)
        #expect(l.value?.kv.value == Data("two".utf8))

        let bad = lock("x", lease: 12345)
        commitAll()
        guard case .failure(let e)? = bad.result else {
            Issue.record("a lock with an unknown lease was granted")
            return
        }
        #expect(e.grpcCode == .unknown && e.message == "etcdserver: requested lease not found")
    }
}
