import EtcdProto
import Foundation
import GRPC
import Testing
import VigilClient
import VigilCore
import VigilTesting

/// Leases through etcdctl and our own client against the real binary.
@Suite(.serialized) struct EtcdctlLeaseTests {
    let server: LiveServer
    let ctl: Etcdctl

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync"])
        ctl = try Etcdctl(endpoint: server.endpoint)
    }

    /// `lease grant` prints "lease <hex id> granted with TTL(<n>s)"; returns the hex id.
    func grant(_ ttl: Int) throws -> String {
        let out = try ctl.ok("lease", "grant", String(ttl))
        let parts = out.split(separator: " ")
        #expect(parts.count >= 2 && out.contains("granted with TTL("))
        return String(parts[1])
    }

    func revision() throws -> Int64 {
        let out = try ctl.ok("get", "no-such-key", "-w", "json")
        let json = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
        return ((json?["header"] as? [String: Any])?["revision"] as? NSNumber)?.int64Value ?? -1
    }

    @Test func grantAttachKeepAliveTimeToLiveListRevoke() throws {
        let id = try grant(60)
        #expect(id.hasPrefix("694d"), "IDs as etcd's default member makes them")
        #expect(try ctl.ok("put", "--lease=\(id)", "a", "1") == "OK\n")
        #expect(try ctl.ok("put", "--lease=\(id)", "b", "2") == "OK\n")
        let ttl = try ctl.ok("lease", "timetolive", "--keys", id)
        #expect(ttl.contains("granted with TTL(60s)"))
        #expect(ttl.contains("attached keys([a b])"))
        #expect(try ctl.ok("lease", "list").contains(id))
        #expect(try ctl.ok("lease", "keep-alive", "--once", id) == "lease \(id) keepalived with TTL(60)\n")
        // A put without the lease detaches the key.
        _ = try ctl.ok("put", "b", "3")
        #expect(try ctl.ok("lease", "timetolive", "--keys", id).contains("attached keys([a])"))
        let before = try revision()
        #expect(try ctl.ok("lease", "revoke", id) == "lease \(id) revoked\n")
        #expect(try revision() == before + 1)
        #expect(try ctl.ok("get", "a") == "")
        #expect(try ctl.ok("get", "b") == "b\n3\n")
        #expect(try ctl.ok("lease", "timetolive", id) == "lease \(id) already expired\n")
        #expect(try ctl.fails("lease", "revoke", id).contains("etcdserver: requested lease not found"))
        #expect(try ctl.fails("put", "--lease=1234", "c", "1").contains("etcdserver: requested lease not found"))
        // Below the minimum TTL is raised to it; a lease without keys revokes without a revision.
        let short = try ctl.ok("lease", "grant", "1")
        #expect(short.contains("granted with TTL(2s)"))
        let r = try revision()
        _ = try ctl.ok("lease", "revoke", String(short.split(separator: " ")[1]))
        #expect(try revision() == r)
    }

    @Test func explicitIDsAndLimits() throws {
        let c = try BlockingClient(port: server.port)
        var g = Etcdserverpb_LeaseGrantRequest()
        g.id = 42
        g.ttl = 30
        let first: Result<Etcdserverpb_LeaseGrantResponse, GRPCStatus> = c.call(EtcdMethod.leaseGrant.path, g)
        #expect((try? first.get().id) == 42)
        #expect((try? first.get().ttl) == 30)
        let again: Result<Etcdserverpb_LeaseGrantResponse, GRPCStatus> = c.call(EtcdMethod.leaseGrant.path, g)
        guard case .failure(let exists) = again else {
            Issue.record("duplicate grant succeeded")
            return
        }
        #expect(exists.code == .failedPrecondition && exists.message == "etcdserver: lease already exists")
        g.id = 43
        g.ttl = 9_000_000_001
        let big: Result<Etcdserverpb_LeaseGrantResponse, GRPCStatus> = c.call(EtcdMethod.leaseGrant.path, g)
        guard case .failure(let tooLarge) = big else {
            Issue.record("huge TTL granted")
            return
        }
        #expect(tooLarge.code == .outOfRange && tooLarge.message == "etcdserver: too large lease TTL")
        // Unknown lease: TimeToLive answers TTL -1, KeepAlive answers TTL 0 — neither is an error.
        var t = Etcdserverpb_LeaseTimeToLiveRequest()
        t.id = 999
        let ttl: Result<Etcdserverpb_LeaseTimeToLiveResponse, GRPCStatus> = c.call(EtcdMethod.leaseTimeToLive.path, t)
        #expect((try? ttl.get().ttl) == -1)
        var got: [Etcdserverpb_LeaseKeepAliveResponse] = []
        let call = c.connection.open(
            EtcdMethod.leaseKeepAlive.path,
            onMessage: { bytes in
                if let r = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes) { got.append(r) }
            }, onClose: { _ in })
        for id: Int64 in [42, 999] {
            var k = Etcdserverpb_LeaseKeepAliveRequest()
            k.id = id
            call.send(k)
        }
        c.runUntil { got.count == 2 }
        #expect(got.map(\.id) == [42, 999])
        #expect(got.map(\.ttl) == [30, 0])
    }

    @Test func expiryDeletesAttachedKeysInOneRevisionAndWatchersSeeIt() throws {
        let id = try grant(2)
        for k in ["exp/1", "exp/2", "exp/3"] { _ = try ctl.ok("put", "--lease=\(id)", k, "v") }
        let w = try ctl.background(["watch", "exp/", "--prefix", "-w", "json"])
        usleep(300_000)
        let before = try revision()
        // Expiry runs on the loop: within the TTL plus a tick or two.
        let deadline = Date().addingTimeInterval(6)
        while Date() < deadline, try ctl.ok("get", "exp/", "--prefix", "--keys-only") != "" {
            usleep(100_000)
        }
        #expect(try ctl.ok("get", "exp/", "--prefix") == "")
        #expect(try revision() == before + 1, "one revision for all the lease's keys")
        #expect(w.wait { $0.components(separatedBy: "\"type\":1").count - 1 == 3 })
        let out = w.stop()
        // All three DELETE events arrive in one response at the same revision.
        let lines = out.split(separator: "\n").filter { $0.contains("\"type\":1") }
        #expect(lines.count == 1)
        #expect(lines.first?.contains("\"mod_revision\":\(before + 1)") == true)
        #expect(try ctl.ok("lease", "timetolive", id) == "lease \(id) already expired\n")
    }

    @Test func keepAliveStreamKeepsALeaseAlive() throws {
        let id = try grant(2)
        _ = try ctl.ok("put", "--lease=\(id)", "alive", "yes")
        let ka = try ctl.background(["lease", "keep-alive", id])
        sleep(4)
        #expect(try ctl.ok("get", "alive") == "alive\nyes\n")
        #expect(ka.output.contains("lease \(id) keepalived with TTL(2)"))
        _ = ka.stop()
    }

    @Test func lockAndElectBetweenTwoClients() throws {
        let holder = try ctl.background([
            "lock", "mylock", "--", "sh", "-c", "echo first-holds; sleep 2; echo first-done",
        ])
        #expect(holder.wait { $0.contains("first-holds") })
        let start = Date()
        let second = try ctl.run(["lock", "mylock", "--", "sh", "-c", "echo second-holds"])
        let waited = Date().timeIntervalSince(start)
        #expect(second.stdout.contains("second-holds"))
        #expect(waited > 1.0, "the second lock waited for the first to release (\(waited) s)")
        #expect(holder.wait { $0.contains("first-done") })

        let candidate = try ctl.background(["elect", "myelection", "alpha"])
        #expect(candidate.wait { $0.contains("myelection/") })
        let observer = try ctl.background(["elect", "-l", "myelection"])
        #expect(observer.wait { $0.contains("alpha") })
        _ = observer.stop()
        _ = candidate.stop()
    }

    @Test func leasesAndTheirKeysSurviveRestart() throws {
        let id = try grant(100)
        _ = try ctl.ok("put", "--lease=\(id)", "kept", "v")
        try server.restart()
        let ttl = try ctl.ok("lease", "timetolive", "--keys", id)
        #expect(ttl.contains("granted with TTL(100s)"))
        #expect(ttl.contains("attached keys([kept])"))
        let short = try grant(2)
        _ = try ctl.ok("put", "--lease=\(short)", "gone", "v")
        try server.restart()
        // The short lease came back with its TTL refreshed, then expired and took its key.
        let deadline = Date().addingTimeInterval(6)
        while Date() < deadline, try ctl.ok("get", "gone") != "" { usleep(100_000) }
        #expect(try ctl.ok("get", "gone") == "")
        #expect(try ctl.ok("get", "kept") == "kept\nv\n")
    }

    @Test func massExpiryDoesNotStallTheLoop() throws {
        let c = try BlockingClient(port: server.port)
        let n = 20_000
        var granted = 0, attached = 0, next = 0
        func issue() {
            guard next < n else { return }
            let i = next
            next += 1
            var g = Etcdserverpb_LeaseGrantRequest()
            g.ttl = 2
            c.connection.unary(EtcdMethod.leaseGrant.path, g) {
                (r: Result<Etcdserverpb_LeaseGrantResponse, GRPCStatus>) in
                guard case .success(let resp) = r else { return }
                granted += 1
                var p = Etcdserverpb_PutRequest()
                p.key = Data("mass/\(i)".utf8)
                p.lease = resp.id
                c.connection.unary(EtcdMethod.put.path, p) { (_: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                    attached += 1
                    issue()
                }
            }
        }
        for _ in 0..<64 { issue() }
        c.runUntil(seconds: 120) { attached == n }
        #expect(granted == n && attached == n)
        // Probe with reads while the leases expire: the longest wait is the longest loop stall.
        var longest = 0.0
        var remaining = Int64(n)
        let deadline = Date().addingTimeInterval(30)
        while remaining > 0 && Date() < deadline {
            var r = Etcdserverpb_RangeRequest()
            r.key = Data("mass/".utf8)
            r.rangeEnd = Data("mass0".utf8)
            r.countOnly = true
            let t0 = Date()
            let resp: Result<Etcdserverpb_RangeResponse, GRPCStatus> = c.call(EtcdMethod.range.path, r)
            longest = max(longest, Date().timeIntervalSince(t0))
            remaining = (try? resp.get().count) ?? remaining
            usleep(2_000)
        }
        #expect(remaining == 0)
        // Debug build, 2 cores: batches of 500 revocations keep each turn far below this.
        #expect(longest < 0.5, "longest read during the mass expiry: \(longest) s")
    }
}
