import Foundation
import Testing
import VigilClient
import VigilTesting

/// A server for the client to talk to: the real `vigil` binary, or a real one-member etcd 3.4.
final class ClientTestServer: @unchecked Sendable {
    enum Kind: String, CaseIterable, CustomTestStringConvertible, Sendable {
        case vigil, etcd
        var testDescription: String { rawValue }
    }
    let kind: Kind
    private var vigil: LiveServer?
    private var etcd: EtcdCluster?
    let endpoint: String
    let ctl: Etcdctl

    init(_ kind: Kind, vigilArgs: [String] = []) throws {
        self.kind = kind
        switch kind {
        case .vigil:
            let s = try LiveServer(args: ["--unsafe-no-fsync"] + vigilArgs)
            vigil = s
            endpoint = s.endpoint
        case .etcd:
            let c = try EtcdCluster(size: 1)
            etcd = c
            endpoint = c.endpoints
        }
        ctl = try Etcdctl(endpoint: endpoint)
    }

    /// Kills the server and starts it again on the same port and data.
    func restart() throws {
        if let vigil {
            vigil.stop(kill: true)
            try vigil.start()
        }
        if let etcd {
            etcd.kill(0)
            try etcd.start(0)
            try etcd.waitHealthy()
        }
        // Wait until it answers.
        for _ in 0..<100 where (try? ctl.ok("endpoint", "health")) == nil { usleep(100_000) }
    }

    deinit { etcd?.stopAll() }
}

/// The Swift client library (`VigilClient.EtcdClient`) against Vigil and against etcd: every test
/// runs on both, so the client is checked to be an etcd client, and Vigil to answer as etcd does.
@Suite(.serialized) struct EtcdClientTests {
    /// The events of a watch until `count` have come (or `seconds` pass).
    static func collect(_ watch: WatchSequence, _ count: Int, seconds: Double = 10) async throws -> [WatchEvent] {
        try await withThrowingTaskGroup(of: [WatchEvent].self) { group in
            group.addTask {
                var out: [WatchEvent] = []
                for try await batch in watch {
                    out += batch.events
                    if out.count >= count { break }
                }
                return out
            }
            group.addTask {
                try await Task.sleep(for: .seconds(seconds))
                return []
            }
            let first = try await group.next() ?? []
            group.cancelAll()
            return first
        }
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func kvAndTransactions(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        let client = try EtcdClient(endpoints: [server.endpoint])
        let first = try await client.put("a", "1")
        #expect(first.header.revision == 2)
        try await client.put("b", "2")
        try await client.put("c", "3")
        let prev = try await client.put("a", "one", PutOptions(prevKV: true))
        #expect(prev.prevKV?.valueString == "1")

        let a = try #require(try await client.get("a"))
        #expect(a.valueString == "one" && a.version == 2 && a.createRevision == 2 && a.modRevision == 5)
        #expect(try await client.get("missing") == nil)

        var opts = RangeOptions()
        opts.limit = 2
        opts.sortOrder = .descend
        let limited = try await client.get(.fromKey("a"), opts)
        #expect(limited.kvs.map(\.keyString) == ["c", "b"] && limited.more && limited.count == 3)
        var old = RangeOptions()
        old.revision = 2
        #expect(try await client.get("a", old)?.valueString == "1")
        var count = RangeOptions()
        count.countOnly = true
        #expect(try await client.get(.all, count).count == 3)
        // etcd's own error, through the client.
        old.revision = 100
        await #expect(
            throws: EtcdClientError.rpc(code: 11, message: "etcdserver: mvcc: required revision is a future revision")
        ) {
            try await client.get("a", old)
        }

        // Compare-and-swap, and the failure branch's reads.
        let swap = try await client.txn(
            Txn().when(.value("a", .equal, "one")).then(.put("a", "two"), .get("b")).else(.get("a")))
        #expect(swap.succeeded && swap.responses.count == 2)
        if case .range(let r) = swap.responses[1] { #expect(r.kvs.first?.valueString == "2") } else { Issue.record() }
        let lost = try await client.txn(Txn().when(.version("a", .less, 1)).then(.delete("a")).else(.get("a")))
        #expect(!lost.succeeded)
        if case .range(let r) = lost.responses[0] { #expect(r.kvs.first?.valueString == "two") } else { Issue.record() }
        // One revision for every write of a transaction.
        let both = try await client.txn(Txn().then(.put("x", "1"), .put("y", "1")))
        #expect(try await client.get("x")?.modRevision == both.header.revision)
        #expect(try await client.get("y")?.modRevision == both.header.revision)
        // More operations than etcd allows (128): InvalidArgument, etcd's text.
        let tooMany = Txn().then((0..<129).map { Op.put("k\($0)", "v") })
        await #expect(throws: EtcdClientError.rpc(code: 3, message: "etcdserver: too many operations in txn request")) {
            try await client.txn(tooMany)
        }

        let deleted = try await client.delete(.prefix("x"), prevKV: true)
        #expect(deleted.deleted == 1 && deleted.prevKVs.first?.keyString == "x")
        // What the client wrote, etcdctl reads.
        #expect(try server.ctl.ok("get", "a") == "a\ntwo\n")
        client.close()
        await #expect(throws: EtcdClientError.closed) { try await client.get("a") }
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func watchesDeliverEverythingInOrder(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        let client = try EtcdClient(endpoints: [server.endpoint])
        let watch = try await client.watch(.prefix("w/"), WatchOptions(prevKV: true))
        let writer = Task {
            for i in 0..<50 { try await client.put("w/\(i % 5)", "\(i)") }
            try await client.delete(.key("w/0"))
            try await client.put("other", "x")
        }
        let events = try await Self.collect(watch, 51)
        try await writer.value
        #expect(events.count == 51)
        #expect(events.map(\.revision) == Array(2...52))
        #expect(events.dropLast().allSatisfy { $0.kind == .put })
        #expect(events.last?.kind == .delete && events.last?.kv.keyString == "w/0")
        #expect(events[5].prevKV?.valueString == "0")

        // History from a start revision, with filters.
        var replay = WatchOptions(startRevision: 40)
        replay.noPut = true
        let deletes = try await Self.collect(try await client.watch(.prefix("w/"), replay), 1)
        #expect(deletes.map(\.revision) == [52])
        let history = try await Self.collect(try await client.watch(.key("w/1"), WatchOptions(startRevision: 1)), 10)
        #expect(history.map(\.kv.valueString) == (0..<10).map { "\($0 * 5 + 1)" })

        // A compacted start revision, and a watch that could never fire: typed errors.
        try await client.compact(30)
        await #expect(throws: EtcdClientError.compacted(revision: 30)) {
            for try await _ in try await client.watch(.key("w/1"), WatchOptions(startRevision: 10)) {}
        }
        await #expect(throws: EtcdClientError.invalidArgument("empty range: range end must come after the key")) {
            _ = try await client.watch(.range("b", "a"))
        }
        await #expect(throws: EtcdClientError.invalidArgument("empty key")) { _ = try await client.watch(.key("")) }
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func watchResumesAfterTheServerRestarts(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        let client = try EtcdClient(endpoints: [server.endpoint])
        let watch = try await client.watch(.prefix("r/"))
        let reader = Task { try await Self.collect(watch, 20, seconds: 30) }
        for i in 0..<10 { try await client.put("r/\(i)", "before") }
        try server.restart()
        // Written before the watch can have reconnected (it waits up to 2 s between attempts):
        // the resumed watch still gets them, after the first ten, once each.
        for i in 10..<20 { _ = try server.ctl.ok("put", "r/\(i)", "after") }
        let events = try await reader.value
        #expect(events.map(\.kv.keyString) == (0..<20).map { "r/\($0)" })
        #expect(events.map(\.revision) == Array(2...21))
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func leasesKeepAliveUntilCancelled(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        let client = try EtcdClient(endpoints: [server.endpoint])
        let lease = try await client.grantLease(ttl: 600)
        try await client.put("held", "1", PutOptions(lease: lease.id))
        let port = Int(server.endpoint.split(separator: ":").last ?? "") ?? 0
        let renewed = metric(port: port, "etcd_debugging_lease_renewed_total")
        let keeper = Task { try await client.keepAlive(lease.id) }
        // The server counts the keep-alive (polled: on a busy machine the keeper's task may start
        // late), and the keeper goes on until cancelled.
        #expect(try await eventually { metric(port: port, "etcd_debugging_lease_renewed_total") > renewed })
        #expect(try await client.timeToLive(lease.id, keys: true).keys == [Array("held".utf8)])
        #expect(try await client.leases().contains(lease.id))
        // Cancelling the task stops the keep-alives (a typed end, no leaked stream): the
        // remaining time falls again.
        keeper.cancel()
        await #expect(throws: CancellationError.self) { try await keeper.value }
        let before = try await client.timeToLive(lease.id).ttl
        try await Task.sleep(for: .seconds(2.2))
        #expect(try await client.timeToLive(lease.id).ttl < before)
        // A revoked lease takes its key; keeping it alive ends at once.
        try await client.revokeLease(lease.id)
        #expect(try await client.get("held") == nil)
        #expect(try await client.timeToLive(lease.id).ttl == -1)
        await #expect(throws: EtcdClientError.leaseExpired(lease.id)) { try await client.keepAlive(lease.id) }
        let other = try await client.grantLease(ttl: 60)
        #expect(try await client.keepAliveOnce(other.id) == 60)
        try await client.revokeLease(other.id)
        await #expect(throws: EtcdClientError.rpc(code: 5, message: "etcdserver: requested lease not found")) {
            try await client.revokeLease(other.id)
        }
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func locksAndElections(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        let client = try EtcdClient(endpoints: [server.endpoint])
        let one = try await client.grantLease(ttl: 30)
        let two = try await client.grantLease(ttl: 30)
        let key = try await client.lock("job", lease: one.id)
        #expect(String(decoding: key, as: UTF8.self).hasPrefix("job/"))
        // The second locker waits until the first unlocks.
        let second = Task { try await client.lock("job", lease: two.id) }
        try await Task.sleep(for: .milliseconds(500))
        try await client.unlock(key)
        let key2 = try await second.value
        #expect(key2 != key)
        try await client.unlock(key2)

        #expect(try await client.leader("office") == nil)
        let leader = try await client.campaign("office", lease: one.id, value: "alice")
        #expect(try await client.leader("office")?.valueString == "alice")
        try await client.proclaim(leader, value: "alice-2")
        #expect(try await client.leader("office")?.valueString == "alice-2")
        try await client.resign(leader)
        #expect(try await client.leader("office") == nil)
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func authAndFailover(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        _ = try server.ctl.ok("user", "add", "root:pw")
        _ = try server.ctl.ok("auth", "enable")
        // The first endpoint is dead: the client moves on to the live one.
        var config = EtcdClient.Configuration(endpoints: ["127.0.0.1:\(freePort())", server.endpoint])
        config.username = "root"
        config.password = "pw"
        let client = try EtcdClient(config)
        try await client.put("secret", "1")
        #expect(try await client.get("secret")?.valueString == "1")
        let watch = try await client.watch(.key("secret"))
        try await client.put("secret", "2")
        #expect(try await Self.collect(watch, 1).first?.kv.valueString == "2")

        config.password = "wrong"
        let refused = try EtcdClient(config)
        await #expect(
            throws: EtcdClientError.rpc(
                code: 3, message: "etcdserver: authentication failed, invalid user ID or password")
        ) {
            try await refused.get("secret")
        }
        let anonymous = try EtcdClient(endpoints: [server.endpoint])
        await #expect(throws: EtcdClientError.rpc(code: 3, message: "etcdserver: user name is empty")) {
            try await anonymous.get("secret")
        }
        let nowhere = try EtcdClient(endpoints: ["127.0.0.1:\(freePort())"])
        await #expect {
            try await nowhere.get("secret")
        } throws: { e in
            if case .unavailable = e as? EtcdClientError { return true }
            return false
        }
        #expect(throws: EtcdClientError.self) { try EtcdClient(endpoints: ["not an endpoint"]) }
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func aCancelledLockGivesUpItsPlace(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        let client = try EtcdClient(endpoints: [server.endpoint])
        // Each locker has a lease of its own (one lease holds one place in the queue).
        let (a, b, c) = (
            try await client.grantLease(ttl: 60), try await client.grantLease(ttl: 60),
            try await client.grantLease(ttl: 60)
        )
        let held = try await client.lock("door", lease: a.id)
        let waiter = Task { try await client.lock("door", lease: b.id) }
        try await Task.sleep(for: .milliseconds(300))
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        try await client.unlock(held)
        // The cancelled waiter's key is gone on the server: the next locker gets the lock now,
        // not when the waiter's lease ends (300 s).
        let next = Task { try await client.lock("door", lease: c.id) }
        let deadline = Task {
            try await Task.sleep(for: .seconds(60))
            next.cancel()
        }
        let key = try await next.value
        deadline.cancel()
        #expect(!key.isEmpty)
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func aWatchNobodyReadsHoldsUpNothingAndCatchesUp(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        var config = EtcdClient.Configuration(endpoints: [server.endpoint])
        config.watchBufferBytes = 64 * 1024
        let client = try EtcdClient(config)
        let idle = try await client.watch(.prefix("s/"))
        let busy = try await client.watch(.prefix("s/"))
        let reader = Task { try await Self.collect(busy, 600, seconds: 60) }
        let value = String(repeating: "x", count: 1024)
        for i in 0..<600 { try await client.put("s/\(i % 50)", value) }
        // The other watch got everything while this one was not read (600 KiB > 64 KiB) …
        #expect(try await reader.value.count == 600)
        // … and a new watch can still be made on the same connection.
        let third = try await client.watch(.key("s/0"))
        _ = third
        // Read now, the idle one gets every event, in order, once each (resumed from the
        // server's history past its buffer).
        let late = try await Self.collect(idle, 600, seconds: 60)
        #expect(late.map(\.revision) == Array(2...601))
    }

    @Test(arguments: ClientTestServer.Kind.allCases)
    func closingTheClientEndsItsKeepAlivesAndWatches(_ kind: ClientTestServer.Kind) async throws {
        let server = try ClientTestServer(kind)
        let client = try EtcdClient(endpoints: [server.endpoint])
        let lease = try await client.grantLease(ttl: 600)
        let keeper = Task { try await client.keepAlive(lease.id) }
        let watch = try await client.watch(.prefix("c/"))
        let reader = Task { for try await _ in watch {} }
        try await Task.sleep(for: .milliseconds(300))
        let started = Date()
        client.close()
        #expect(Date().timeIntervalSince(started) < 5, "close() does not wait for anything")
        await #expect(throws: EtcdClientError.closed) { try await keeper.value }
        await #expect(throws: EtcdClientError.closed) { try await reader.value }
    }

    @Test func anExpiredTokenIsRenewedForCallsWatchesAndKeepAlives() async throws {
        let server = try ClientTestServer(.vigil, vigilArgs: ["--auth-token-ttl", "1"])
        _ = try server.ctl.ok("user", "add", "root:pw")
        _ = try server.ctl.ok("auth", "enable")
        var config = EtcdClient.Configuration(endpoints: [server.endpoint])
        config.username = "root"
        config.password = "pw"
        let client = try EtcdClient(config)
        try await client.put("t", "1")
        try await Task.sleep(for: .seconds(2.5))  // the token has expired
        try await client.put("t", "2")
        let watch = try await client.watch(.key("t"))
        let lease = try await client.grantLease(ttl: 600)
        try await Task.sleep(for: .seconds(2.5))
        #expect(try await client.keepAliveOnce(lease.id) == 600)
        try await client.put("t", "3")
        #expect(try await Self.collect(watch, 1).first?.kv.valueString == "3")
    }

    @Test func talksTLSWithAClientCertificate() async throws {
        let certs = try TestCertificates.directory()
        let server = try LiveServer(
            args: ["--unsafe-no-fsync"] + TestCertificates.serverFlags(certs), secure: true)
        var tls = EtcdClient.TLSConfiguration()
        tls.caFile = certs + "/ca.pem"
        tls.certFile = certs + "/client-root.pem"
        tls.keyFile = certs + "/client-root-key.pem"
        var config = EtcdClient.Configuration(endpoints: ["https://" + server.endpoint])
        config.tls = tls
        let client = try EtcdClient(config)
        try await client.put("secure", "yes")
        #expect(try await client.get("secure")?.valueString == "yes")
        let watch = try await client.watch(.key("secure"))
        try await client.put("secure", "still")
        #expect(try await Self.collect(watch, 1).first?.kv.valueString == "still")
        // Without a client certificate the server refuses the handshake: the call says so.
        var bare = EtcdClient.Configuration(endpoints: ["https://" + server.endpoint])
        var caOnly = EtcdClient.TLSConfiguration()
        caOnly.caFile = certs + "/ca.pem"
        bare.tls = caOnly
        let refused = try EtcdClient(bare)
        await #expect {
            try await refused.get("secure")
        } throws: { e in
            if case .unavailable = e as? EtcdClientError { return true }
            return false
        }
    }
}

/// A value from a server's /metrics (its client port), or -1.
func metric(port: Int, _ name: String) -> Double {
    guard let text = try? rawExchange(port: port, Array("GET /metrics HTTP/1.0\r\n\r\n".utf8)) else { return -1 }
    let line = text.split(separator: "\n").first { $0.hasPrefix(name + " ") }
    return Double(line?.split(separator: " ").last ?? "") ?? -1
}

/// Polls `condition` every 100 ms until it holds or `seconds` pass (long: under the parallel
/// suite, synchronous tests can hold both of the pool's threads for tens of seconds).
func eventually(seconds: Double = 120, _ condition: () async throws -> Bool) async throws -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try await condition() { return true }
        try await Task.sleep(for: .milliseconds(100))
    }
    return try await condition()
}
