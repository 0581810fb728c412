import EtcdProto
import Foundation
import GRPC
import HTTP2
import SwiftProtobuf
import Testing
import VigilClient
import VigilCore
import VigilTesting

/// etcd's Lock and Election services (v3lockpb, v3electionpb) against the real binary: over gRPC
/// with our client, and over the gateway with curl.
@Suite(.serialized) struct ConcurrencyTests {
    let server: LiveServer
    let client: BlockingClient

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync"])
        client = try BlockingClient(port: server.port)
    }

    func grant(_ ttl: Int64 = 30) throws -> Int64 {
        var r = Etcdserverpb_LeaseGrantRequest()
        r.ttl = ttl
        return try client.call(EtcdMethod.leaseGrant.path, r, as: Etcdserverpb_LeaseGrantResponse.self).get().id
    }

    func revoke(_ id: Int64) throws {
        var r = Etcdserverpb_LeaseRevokeRequest()
        r.id = id
        _ = try client.call(EtcdMethod.leaseRevoke.path, r, as: Etcdserverpb_LeaseRevokeResponse.self).get()
    }

    func keys(_ prefix: String) throws -> [String] {
        var r = Etcdserverpb_RangeRequest()
        r.key = Data(prefix.utf8)
        r.rangeEnd = Data((prefix.dropLast() + String(UnicodeScalar(prefix.utf8.last! + 1))).utf8)
        r.keysOnly = true
        let resp = try client.call(EtcdMethod.range.path, r, as: Etcdserverpb_RangeResponse.self).get()
        return resp.kvs.map { String(decoding: $0.key, as: UTF8.self) }
    }

    /// Starts a call on its own connection; its result lands in the box when it comes.
    final class Pending<Resp: SwiftProtobuf.Message> {
        var result: Result<Resp, GRPCStatus>?
    }

    func start<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ req: Req, timeout: String? = nil, as: Resp.Type
    ) throws -> Pending<Resp> {
        let c = try client.newConnection()
        if let timeout { c.metadata = [("grpc-timeout", timeout)] }
        let p = Pending<Resp>()
        c.unary(method.path, req) { (r: Result<Resp, GRPCStatus>) in p.result = r }
        return p
    }

    func lock(_ name: String, _ lease: Int64) -> V3lockpb_LockRequest {
        var r = V3lockpb_LockRequest()
        r.name = Data(name.utf8)
        r.lease = lease
        return r
    }

    @Test func lockQueuesUntilTheHolderGoes() throws {
        let a = try grant(), b = try grant(), c = try grant()
        let held = try client.call(EtcdMethod.lock.path, lock("jobs", a), as: V3lockpb_LockResponse.self).get()
        #expect(String(decoding: held.key, as: UTF8.self) == "jobs/" + String(a, radix: 16))
        #expect(held.header.revision > 1)

        // b and c queue behind a, in order.
        let second = try start(.lock, lock("jobs", b), as: V3lockpb_LockResponse.self)
        client.runUntil(seconds: 0.3) { false }
        let third = try start(.lock, lock("jobs", c), as: V3lockpb_LockResponse.self)
        client.runUntil(seconds: 0.3) { false }
        #expect(second.result == nil && third.result == nil)
        #expect(try keys("jobs/").count == 3)

        // Unlock hands it to b; revoking b's lease (its lock goes with it) hands it to c.
        var unlock = V3lockpb_UnlockRequest()
        unlock.key = held.key
        _ = try client.call(EtcdMethod.unlock.path, unlock, as: V3lockpb_UnlockResponse.self).get()
        client.runUntil(seconds: 10) { second.result != nil }
        #expect(try second.result?.get().key == Data(("jobs/" + String(b, radix: 16)).utf8))
        #expect(third.result == nil)
        try revoke(b)
        client.runUntil(seconds: 10) { third.result != nil }
        #expect(try third.result?.get().key == Data(("jobs/" + String(c, radix: 16)).utf8))
    }

    @Test func aWaiterThatLeavesOrLosesItsLeaseGivesUpItsPlace() throws {
        let a = try grant(), b = try grant(), c = try grant()
        _ = try client.call(EtcdMethod.lock.path, lock("q", a), as: V3lockpb_LockResponse.self).get()
        // A waiter whose deadline passes: its key is deleted.
        let impatient = try start(.lock, lock("q", b), timeout: "300m", as: V3lockpb_LockResponse.self)
        client.runUntil(seconds: 10) { impatient.result != nil }
        guard case .failure(let s)? = impatient.result else {
            Issue.record("expected a deadline")
            return
        }
        #expect(s.code == .deadlineExceeded)
        client.runUntil(seconds: 0.2) { false }
        #expect(try keys("q/") == ["q/" + String(a, radix: 16)])
        // A waiter whose own lease ends: "session expired" (etcd's client error, gRPC Unknown).
        let orphan = try start(.lock, lock("q", c), as: V3lockpb_LockResponse.self)
        client.runUntil(seconds: 0.3) { false }
        try revoke(c)
        try revoke(a)
        client.runUntil(seconds: 10) { orphan.result != nil }
        guard case .failure(let e)? = orphan.result else {
            Issue.record("expected session expired")
            return
        }
        #expect(e.code == .unknown && e.message == "session expired")
        // A lease that does not exist is refused as a put with it would be.
        let bad = client.call(EtcdMethod.lock.path, lock("q", 12345), as: V3lockpb_LockResponse.self)
        guard case .failure(let nf) = bad else {
            Issue.record("expected lease not found")
            return
        }
        #expect(nf.message == "etcdserver: requested lease not found")
    }

    /// The values an Observe of `name` reports, as they come (on a connection of its own).
    final class Observed {
        var values: [String] = []
        var call: ClientCall?
    }

    func observe(_ name: String) throws -> Observed {
        var r = V3electionpb_LeaderRequest()
        r.name = Data(name.utf8)
        let seen = Observed()
        seen.call = try client.newConnection().open(
            EtcdMethod.observe.path,
            onMessage: { bytes in
                if let m = try? V3electionpb_LeaderResponse(serializedBytes: bytes) {
                    seen.values.append(String(decoding: m.kv.value, as: UTF8.self))
                }
            }, onClose: { _ in })
        seen.call?.send(try r.serializedBytes())
        seen.call?.closeSend()
        return seen
    }

    func campaign(_ name: String, _ lease: Int64, _ value: String) -> V3electionpb_CampaignRequest {
        var r = V3electionpb_CampaignRequest()
        r.name = Data(name.utf8)
        r.lease = lease
        r.value = Data(value.utf8)
        return r
    }

    @Test func electionCampaignObserveProclaimResign() throws {
        var leaderReq = V3electionpb_LeaderRequest()
        leaderReq.name = Data("db".utf8)
        let none = client.call(EtcdMethod.leader.path, leaderReq, as: V3electionpb_LeaderResponse.self)
        guard case .failure(let noLeader) = none else {
            Issue.record("expected no leader")
            return
        }
        #expect(noLeader.code == .unknown && noLeader.message == "election: no leader")

        // An observer from the start sees every leader and value, in order.
        let seen = try observe("db")

        let a = try grant(), b = try grant()
        let won = try client.call(
            EtcdMethod.campaign.path, campaign("db", a, "alpha"), as: V3electionpb_CampaignResponse.self
        )
        .get()
        #expect(won.leader.name == Data("db".utf8) && won.leader.lease == a && won.leader.rev == won.header.revision)
        let leader = try client.call(EtcdMethod.leader.path, leaderReq, as: V3electionpb_LeaderResponse.self).get()
        #expect(leader.kv.value == Data("alpha".utf8) && leader.kv.key == won.leader.key)

        let challenger = try start(.campaign, campaign("db", b, "beta"), as: V3electionpb_CampaignResponse.self)
        client.runUntil(seconds: 0.3) { false }
        #expect(challenger.result == nil)

        var proclaim = V3electionpb_ProclaimRequest()
        proclaim.leader = won.leader
        proclaim.value = Data("alpha-2".utf8)
        _ = try client.call(EtcdMethod.proclaim.path, proclaim, as: V3electionpb_ProclaimResponse.self).get()

        var resign = V3electionpb_ResignRequest()
        resign.leader = won.leader
        _ = try client.call(EtcdMethod.resign.path, resign, as: V3electionpb_ResignResponse.self).get()
        client.runUntil(seconds: 10) { challenger.result != nil }
        #expect(try challenger.result?.get().leader.lease == b)
        client.runUntil(seconds: 10) { seen.values.count >= 3 }
        #expect(seen.values == ["alpha", "alpha-2", "beta"])

        // The old leader may no longer proclaim; a request without a leader key is refused.
        let stale = client.call(EtcdMethod.proclaim.path, proclaim, as: V3electionpb_ProclaimResponse.self)
        guard case .failure(let notLeader) = stale else {
            Issue.record("expected not leader")
            return
        }
        #expect(notLeader.code == .unknown && notLeader.message == "election: not leader")
        let missing = client.call(
            EtcdMethod.proclaim.path, V3electionpb_ProclaimRequest(), as: V3electionpb_ProclaimResponse.self)
        guard case .failure(let m) = missing else {
            Issue.record("expected a missing leader")
            return
        }
        #expect(m.code == .unknown && m.message == #""leader" field must be provided"#)
        // The leader's lease ending ends its leadership.
        try revoke(b)
        let gone = client.call(EtcdMethod.leader.path, leaderReq, as: V3electionpb_LeaderResponse.self)
        guard case .failure(let g) = gone else {
            Issue.record("expected no leader")
            return
        }
        #expect(g.message == "election: no leader")
    }

    @Test func theGatewayPaths() throws {
        let curl = try #require(which("curl"))
        let lease = try grant()
        func post(_ path: String, _ body: String, maxTime: String = "10") throws -> String {
            try runCommand(curl, ["-s", "--max-time", maxTime, "\(server.url)\(path)", "-d", body]).stdout
        }
        let name = Data("gw".utf8).base64EncodedString()
        let locked = try post("/v3/lock/lock", #"{"name":"\#(name)","lease":"\#(lease)"}"#)
        let key = Data(("gw/" + String(lease, radix: 16)).utf8).base64EncodedString()
        #expect(locked.contains(#""key":"\#(key)""#), "\(locked)")
        #expect(try post("/v3beta/lock/unlock", #"{"key":"\#(key)"}"#).contains(#""header""#))
        #expect(try keys("gw/").isEmpty)

        let won = try post("/v3/election/campaign", #"{"name":"\#(name)","lease":"\#(lease)","value":"dg=="}"#)
        #expect(won.contains(#""leader":{"name":"\#(name)","key":"\#(key)""#), "\(won)")
        #expect(try post("/v3/election/leader", #"{"name":"\#(name)"}"#).contains(#""value":"dg==""#))
        // Observe streams {"result":…} lines until the client leaves.
        let observed = try post("/v3/election/observe", #"{"name":"\#(name)"}"#, maxTime: "1")
        #expect(observed.hasPrefix(#"{"result":{"header":"#) && observed.contains(#""value":"dg==""#), "\(observed)")
        let noLeader = try runCommand(
            curl, ["-s", "-w", "\n%{http_code}", "\(server.url)/v3/election/leader", "-d", #"{"name":"bm9uZQ=="}"#])
        #expect(
            noLeader.stdout == #"{"error":"election: no leader","message":"election: no leader","code":2}"# + "\n500")
    }

    /// The outside check's curl: two Locks with lease 0 (as the Rust etcd-client sends) each get
    /// a session lease of their own; the second waits until the first unlocks.
    @Test func leaseZeroLocksOverTheGatewayNeverShareAKey() throws {
        let curl = try #require(which("curl"))
        let name = Data("mylock".utf8).base64EncodedString()
        let first = try runCommand(
            curl, ["-s", "--max-time", "5", "\(server.url)/v3/lock/lock", "-d", #"{"name":"\#(name)"}"#])
        let json = try #require(try JSONSerialization.jsonObject(with: Data(first.stdout.utf8)) as? [String: Any])
        let encoded = try #require(json["key"] as? String)
        let key = try #require(Data(base64Encoded: encoded))
        let text = String(decoding: key, as: UTF8.self)
        #expect(text.hasPrefix("mylock/") && text != "mylock/0")
        let second = try BackgroundCommand(
            curl, ["-s", "--max-time", "10", "\(server.url)/v3/lock/lock", "-d", #"{"name":"\#(name)"}"#])
        usleep(500_000)
        #expect(!second.output.contains("key"))
        // The first session's lease: 60 s, and nothing renews it.
        let hex = try #require(UInt64(text.dropFirst("mylock/".count), radix: 16))
        let lease = Int64(bitPattern: hex)
        var ttl = Etcdserverpb_LeaseTimeToLiveRequest()
        ttl.id = lease
        let t = try client.call(EtcdMethod.leaseTimeToLive.path, ttl, as: Etcdserverpb_LeaseTimeToLiveResponse.self)
            .get()
        #expect(t.grantedTtl == 60 && t.ttl > 50 && t.ttl <= 60)
        var unlock = V3lockpb_UnlockRequest()
        unlock.key = key
        _ = try client.call(EtcdMethod.unlock.path, unlock, as: V3lockpb_UnlockResponse.self).get()
        #expect(second.wait { $0.contains(#""key":"#) })
        #expect(!second.output.contains(encoded))
    }

    /// While other clients keep writing, a freed lock reaches its waiter at once (within 100 ms;
    /// it used to wait for the waiter's deadline when an older group commit completed first), and
    /// an observer of an election misses none of the values proclaimed meanwhile.
    @Test func handOversAndObserveWhileOthersWrite() throws {
        // Four writers, each with a put always in flight on a connection of its own.
        var writing = true
        var writes = 0
        func write(_ conn: GRPCClientConnection, _ i: Int) {
            guard writing else { return }
            var p = Etcdserverpb_PutRequest()
            p.key = Data("load/\(i)".utf8)
            p.value = Data(repeating: 0x61, count: 100)
            conn.unary(EtcdMethod.put.path, p) { (_: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                writes += 1
                write(conn, i)
            }
        }
        for i in 0..<4 { write(try client.newConnection(), i) }
        defer { writing = false }

        var handOvers: [Double] = []
        for _ in 0..<10 {
            let a = try grant(), b = try grant()
            let held = try client.call(EtcdMethod.lock.path, lock("handover", a), as: V3lockpb_LockResponse.self).get()
            let waiter = try start(.lock, lock("handover", b), timeout: "5S", as: V3lockpb_LockResponse.self)
            client.runUntil(seconds: 0.1) { false }
            #expect(waiter.result == nil)
            var unlock = V3lockpb_UnlockRequest()
            unlock.key = held.key
            let t0 = Date()
            _ = try client.call(EtcdMethod.unlock.path, unlock, as: V3lockpb_UnlockResponse.self).get()
            client.runUntil(seconds: 5) { waiter.result != nil }
            handOvers.append(Date().timeIntervalSince(t0))
            unlock.key = try #require(try waiter.result?.get()).key
            _ = try client.call(EtcdMethod.unlock.path, unlock, as: V3lockpb_UnlockResponse.self).get()
        }
        #expect(writes > 100)
        let fast = handOvers.filter { $0 < 0.1 * sanitizerFactor }.count
        #expect(fast >= 9 && handOvers.max()! < 1, "hand-overs: \(handOvers)")

        // 21 values proclaimed one after the other while the writers go on: the observer sees all.
        let lease = try grant()
        let won = try client.call(
            EtcdMethod.campaign.path, campaign("watched", lease, "v0"), as: V3electionpb_CampaignResponse.self
        ).get()
        let seen = try observe("watched")
        client.runUntil(seconds: 10) { !seen.values.isEmpty }
        var proclaim = V3electionpb_ProclaimRequest()
        proclaim.leader = won.leader
        for i in 1...20 {
            proclaim.value = Data("v\(i)".utf8)
            _ = try client.call(EtcdMethod.proclaim.path, proclaim, as: V3electionpb_ProclaimResponse.self).get()
        }
        client.runUntil(seconds: 10) { seen.values.count >= 21 }
        #expect(seen.values == (0...20).map { "v\($0)" })
    }
}
