import EtcdProto
import Foundation
import GRPC
import Testing
import VigilCore
import VigilTesting

/// Mirror mode (`vigil grpc-proxy start`) in front of a real 3-member etcd 3.4 cluster on
/// loopback, driven by the real etcdctl: answers as etcd's, reads of writes made directly to a
/// member, a watch that loses nothing while members die, pause and restart, upstream compaction
/// past the mirror, and a client moving between two mirrors.
@Suite(.serialized) struct MirrorTests {
    let cluster: EtcdCluster
    let direct: Etcdctl

    init() throws {
        cluster = try EtcdCluster()
        direct = try Etcdctl(endpoint: cluster.endpoints)
    }

    /// The JSON etcdctl prints, without the header (its member id names the member asked).
    static func body(_ json: String) -> String {
        guard let r = json.range(of: #""raft_term":\d+\}"#, options: .regularExpression) else { return json }
        return String(json[r.upperBound...])
    }

    @Test func answersAsEtcdDoes() throws {
        let mirror = try LiveMirror(upstream: cluster.endpoints)
        let via = try Etcdctl(endpoint: mirror.endpoint)
        _ = try direct.ok("put", "a", "1")
        // Writes through the mirror are read back at once, through it and directly.
        let put = try via.ok("put", "b", "2", "-w", "json")
        #expect(put.contains("\"revision\""))
        #expect(try via.ok("get", "b") == "b\n2\n")
        #expect(try direct.ok("get", "b") == "b\n2\n")
        // The same answers, byte for byte past the header, for reads of every shape.
        for args in [
            ["get", "a", "-w", "json"], ["get", "", "--from-key", "-w", "json"],
            ["get", "a", "c", "--limit", "1", "-w", "json"], ["get", "a", "--prefix", "--keys-only", "-w", "json"],
            ["get", "", "--from-key", "--sort-by", "MODIFY", "--order", "DESCEND", "-w", "json"],
            ["get", "a", "--consistency", "s", "-w", "json"], ["get", "b", "--rev", "2", "-w", "json"],
        ] {
            let mine = try via.run(args)
            let theirs = try direct.run(args)
            #expect(mine.status == theirs.status, "\(args)")
            #expect(Self.body(mine.stdout) == Self.body(theirs.stdout), "\(args)")
        }
        // A txn, with its answer.
        let txn = "value(\"a\") = \"1\"\n\nput a 11\nget a\n\ndel b\n\n"
        #expect(try via.run(["txn"], stdin: txn).stdout == "SUCCESS\n\nOK\n\na\n11\n")
        #expect(try direct.ok("get", "a") == "a\n11\n")
        // Errors keep etcd's code and words (etcd's own grpc-proxy turns some into Unknown).
        for args in [
            ["put", "", "x"], ["put", "k", "v", "--lease", "1234"], ["get", "a", "--rev", "999999"],
            ["del", ""], ["lease", "revoke", "77"], ["compaction", "999999"],
        ] {
            let mine = try via.run(args)
            let theirs = try direct.run(args)
            #expect(mine.status != 0, "\(args)")
            let last = { (s: String) in s.split(separator: "\n").last.map(String.init) ?? "" }
            #expect(last(mine.stderr) == last(theirs.stderr), "\(args): \(mine.stderr) vs \(theirs.stderr)")
        }
        // Leases: granted, kept alive, their keys gone with them, all through the mirror.
        let grant = try via.ok("lease", "grant", "60")
        let id = try #require(grant.split(separator: " ").dropFirst().first.map(String.init))
        _ = try via.ok("put", "leased", "x", "--lease", id)
        #expect(try via.ok("lease", "keep-alive", "--once", id).contains("keepalived with TTL"))
        #expect(try direct.ok("lease", "timetolive", id, "--keys").contains("leased"))
        _ = try via.ok("lease", "revoke", id)
        #expect(try via.ok("get", "leased") == "")
        // A nested txn (it makes etcd's own grpc-proxy panic) answers as etcd answers it.
        var inner = Etcdserverpb_TxnRequest()
        var nestedPut = Etcdserverpb_PutRequest()
        nestedPut.key = Data("nested".utf8)
        nestedPut.value = Data("1".utf8)
        var op = Etcdserverpb_RequestOp()
        op.requestPut = nestedPut
        inner.success = [op]
        var outer = Etcdserverpb_TxnRequest()
        var nested = Etcdserverpb_RequestOp()
        nested.requestTxn = inner
        outer.success = [nested]
        let viaClient = try BlockingClient(port: mirror.port)
        let answer = try viaClient.call(EtcdMethod.txn.path, outer, as: Etcdserverpb_TxnResponse.self).get()
        #expect(answer.succeeded && answer.responses.count == 1)
        #expect(try direct.ok("get", "nested") == "nested\n1\n")
        // Too many ops: etcd's InvalidArgument, not grpc-proxy's Unknown.
        var big = Etcdserverpb_TxnRequest()
        big.success = Array(repeating: op, count: 129)
        let refused = viaClient.call(EtcdMethod.txn.path, big, as: Etcdserverpb_TxnResponse.self)
        #expect(throws: GRPCStatus(.invalidArgument, "etcdserver: too many operations in txn request")) {
            try refused.get()
        }
        // Other services go upstream: the members are listed as etcd lists them.
        #expect(try via.ok("member", "list").split(separator: "\n").count == 3)
    }

    @Test func readsSeeWritesMadeDirectlyToAMember() throws {
        let mirror = try LiveMirror(upstream: cluster.endpoints)
        let via = try Etcdctl(endpoint: mirror.endpoint)
        for i in 0..<20 {
            // Written to one member, read at once (linearizable) through the mirror.
            let member = try Etcdctl(endpoint: cluster.members[i % 3].endpoint)
            _ = try member.ok("put", "direct", "\(i)")
            #expect(try via.ok("get", "direct") == "direct\n\(i)\n")
        }
        // Serializable reads are local and catch up without being asked.
        _ = try direct.ok("put", "s", "1")
        var seen = ""
        for _ in 0..<50 where seen != "s\n1\n" {
            seen = try via.ok("get", "s", "--consistency", "s")
            usleep(20_000)
        }
        #expect(seen == "s\n1\n")
    }

    /// Puts `count` keys `prefix0…` through the cluster (etcdctl picks a live member), retrying each
    /// until it lands.
    func putMany(_ prefix: String, _ range: Range<Int>, during: ((Int) -> Void)? = nil) throws {
        for i in range {
            during?(i)
            var done = false
            for _ in 0..<100 where !done {
                done = try direct.run(["put", "\(prefix)\(i)", "\(i)"]).status == 0
                if !done { usleep(100_000) }
            }
            #expect(done, "put \(prefix)\(i)")
        }
    }

    @Test func watchLosesNothingWhileMembersDiePauseAndRestart() throws {
        let mirror = try LiveMirror(upstream: cluster.endpoints)
        let via = try Etcdctl(endpoint: mirror.endpoint)
        let start = try direct.ok("get", "f/", "-w", "json")
        let startRevision = try #require(Self.headerRevision(start))
        let watch = try via.background(["watch", "f/", "--prefix", "-w", "json"])
        usleep(400_000)
        try putMany("f/", 0..<60) { i in
            switch i {
            case 10:
                // The member the mirror follows (the first it reached) dies.
                cluster.kill(0)
            case 20:
                try? cluster.start(0)
            case 30:
                // A member stops answering without closing anything.
                cluster.pause(1)
            case 40:
                cluster.resume(1)
            case 45:
                // The whole cluster goes down and comes back.
                for m in 0..<3 { cluster.kill(m) }
                for m in 0..<3 { try? cluster.start(m) }
                try? cluster.waitHealthy()
            default: break
            }
        }
        // etcd's own history of the prefix is the truth: a put that timed out against the paused
        // member may still land when it resumes, so the keys alone are not.
        let truth = try direct.background(["watch", "f/", "--prefix", "--rev", "\(startRevision + 1)", "-w", "json"])
        #expect(truth.wait(timeout: 30) { Self.jsonRevisions($0).count >= 60 })
        usleep(500_000)
        let expected = Self.jsonRevisions(truth.stop())
        #expect(watch.wait(timeout: 30) { Self.jsonRevisions($0).count >= expected.count })
        let got = Self.jsonRevisions(watch.stop())
        #expect(got == expected, "lost, duplicated or reordered")
        #expect(Set(got).count == got.count && got == got.sorted())
        #expect(mirror.log.contains("connected to upstream member"))
        // And the copy holds them all.
        #expect(try via.ok("get", "f/", "--prefix", "-w", "json").contains("\"count\":60"))
    }

    @Test func upstreamCompactionPastTheMirrorReloadsIt() throws {
        // A mirror that can reach only the first member.
        let mirror = try LiveMirror(upstream: cluster.members[0].endpoint)
        let via = try Etcdctl(endpoint: mirror.endpoint)
        _ = try direct.ok("put", "r/kept", "1")
        _ = try direct.ok("put", "r/gone", "1")
        let watch = try via.background(["watch", "r/", "--prefix"])
        usleep(400_000)
        cluster.kill(0)
        let others = try Etcdctl(endpoint: "\(cluster.members[1].endpoint),\(cluster.members[2].endpoint)")
        // The first writes may meet an election (the killed member may have led).
        func retried(_ args: String...) throws -> String {
            for _ in 0..<50 {
                let r = try others.run(args)
                if r.status == 0 { return r.stdout }
                usleep(100_000)
            }
            return try others.ok(args[0])
        }
        _ = try retried("put", "r/new", "2")
        _ = try retried("del", "r/gone")
        let rev = try retried("put", "r/kept", "3", "-w", "json")
        let revision = try #require(Self.headerRevision(rev))
        _ = try retried("compaction", "\(revision)")
        try cluster.start(0)
        // The mirror resumes past its last revision, finds it compacted, loads again.
        var state = ""
        for _ in 0..<100 where state != "r/kept\n3\nr/new\n2\n" {
            state = try via.ok("get", "r/", "--prefix", "--consistency", "s")
            usleep(100_000)
        }
        #expect(state == "r/kept\n3\nr/new\n2\n")
        #expect(mirror.log.contains("reloaded at upstream revision"))
        // Its watchers could not be given what happened meanwhile: canceled as etcd cancels them.
        #expect(watch.wait(timeout: 10) { $0.contains("compacted") })
        _ = watch.stop()
    }

    @Test func aClientMovesBetweenTwoMirrors() throws {
        let first = try LiveMirror(upstream: cluster.endpoints)
        let viaFirst = try Etcdctl(endpoint: first.endpoint)
        let w1 = try viaFirst.background(["watch", "m/", "--prefix", "-w", "json"])
        usleep(400_000)
        try putMany("m/", 0..<10)
        #expect(w1.wait { Self.jsonRevisions($0).count >= 10 })
        let seen = Self.jsonRevisions(w1.stop())
        let last = try #require(seen.last)
        try putMany("m/", 10..<20)
        // A second mirror, started after all that: it holds no history before its load, so the
        // client's resume from its last revision is replayed from upstream, then joins the live stream.
        let second = try LiveMirror(upstream: cluster.endpoints)
        let viaSecond = try Etcdctl(endpoint: second.endpoint)
        let w2 = try viaSecond.background(["watch", "m/", "--prefix", "--rev", "\(last + 1)", "-w", "json"])
        #expect(w2.wait { Self.jsonRevisions($0).count >= 10 })
        try putMany("m/", 20..<25)
        #expect(w2.wait { Self.jsonRevisions($0).count >= 15 })
        let resumed = Self.jsonRevisions(w2.stop())
        let all = seen + resumed
        #expect(all.count == 25)
        #expect(all == all.sorted() && Set(all).count == all.count, "\(all)")
    }

    /// The header revision in etcdctl's JSON output.
    static func headerRevision(_ json: String) -> Int64? {
        guard let r = json.range(of: #""revision":\d+"#, options: .regularExpression) else { return nil }
        return Int64(json[r].dropFirst(11))
    }

    /// The mod revisions of the events in etcdctl's JSON watch output.
    static func jsonRevisions(_ out: String) -> [Int64] {
        var revs: [Int64] = []
        var rest = Substring(out)
        while let r = rest.range(of: #""mod_revision":"#) {
            rest = rest[r.upperBound...]
            if let n = Int64(rest.prefix { $0.isNumber }) { revs.append(n) }
        }
        return revs
    }

    @Test func gatewayHealthAndMetrics() throws {
        let mirror = try LiveMirror(upstream: cluster.endpoints)
        let put = try runCommand(
            "/usr/bin/curl",
            ["-s", "-X", "POST", "http://\(mirror.endpoint)/v3/kv/put", "-d", #"{"key":"Zw==","value":"MQ=="}"#])
        #expect(put.stdout.contains("\"revision\""), "\(put.output)")
        #expect(try direct.ok("get", "g") == "g\n1\n")
        let health = try runCommand("/usr/bin/curl", ["-s", "http://\(mirror.endpoint)/health"])
        #expect(health.stdout == #"{"health":"true"}"#)
        let metrics = try runCommand("/usr/bin/curl", ["-s", "http://\(mirror.endpoint)/metrics"]).stdout
        for name in ["vigil_mirror_lag_revisions", "vigil_mirror_reconnects_total", "vigil_mirror_reloads_total"] {
            #expect(metrics.contains(name), "\(name)")
        }
        // Upstream gone: /health says so.
        for m in 0..<3 { cluster.kill(m) }
        var unhealthy = false
        for _ in 0..<50 where !unhealthy {
            unhealthy = try runCommand("/usr/bin/curl", ["-s", "http://\(mirror.endpoint)/health"]).stdout
                .hasPrefix(#"{"health":"false"}"#)
            usleep(200_000)
        }
        #expect(unhealthy)
    }

    @Test func sidecarExampleReactsToChanges() throws {
        _ = try direct.ok("put", "config/greeting", "hello")
        _ = try direct.ok("put", "elsewhere", "not mirrored")
        let dir = URL(fileURLWithPath: try vigilBinary()).deletingLastPathComponent()
        let sidecar = try BackgroundCommand(
            dir.appendingPathComponent("SidecarExample").path,
            ["--endpoints", cluster.endpoints, "--prefix", "config/", "--seconds", "20"])
        #expect(sidecar.wait(timeout: 30) { $0.contains("config/greeting is hello") })
        _ = try direct.ok("put", "config/a", "1")
        _ = try direct.ok("put", "other/b", "2")
        _ = try direct.ok("del", "config/greeting")
        #expect(sidecar.wait(timeout: 10) { $0.contains("DELETE config/greeting") })
        let out = sidecar.stop()
        #expect(out.contains("PUT config/a = 1"))
        #expect(!out.contains("other/b") && !out.contains("elsewhere"))
    }

    @Test func mirrorsShareOneAddressWithReusePort() throws {
        let port = freePort()
        let one = try LiveMirror(upstream: cluster.endpoints, port: port, args: ["--reuse-port"])
        let two = try LiveMirror(upstream: cluster.endpoints, port: port, args: ["--reuse-port"])
        let via = try Etcdctl(endpoint: "127.0.0.1:\(port)")
        _ = try direct.ok("put", "shared", "1")
        for _ in 0..<10 { #expect(try via.ok("get", "shared") == "shared\n1\n") }
        // Either can go: the other still serves the address.
        one.stop()
        #expect(try via.ok("get", "shared") == "shared\n1\n")
        _ = two
    }

    @Test func followsAClusterOverTLS() throws {
        let secure = try EtcdCluster(tls: true)
        let dir = try #require(secure.tlsDir)
        let member = try Etcdctl(endpoint: secure.endpoints, flags: secure.clientFlags)
        _ = try member.ok("put", "tls/a", "1")
        // The mirror dials the members over TLS with a client certificate; its own clients use
        // plaintext on loopback.
        let mirror = try LiveMirror(
            upstream: secure.endpoints,
            args: [
                "--cacert", dir + "/ca.pem", "--cert", dir + "/client-nocn.pem", "--key", dir + "/client-nocn-key.pem",
            ])
        let via = try Etcdctl(endpoint: mirror.endpoint)
        #expect(try via.ok("get", "tls/a") == "tls/a\n1\n")
        let watch = try via.background(["watch", "tls/", "--prefix"])
        usleep(400_000)
        _ = try via.ok("put", "tls/b", "2")
        _ = try member.ok("put", "tls/c", "3")
        #expect(watch.wait { $0.contains("tls/c\n3") })
        #expect(watch.stop() == "PUT\ntls/b\n2\nPUT\ntls/c\n3\n")
    }

    @Test func namespaceAnswersAsEtcdsOwnProxyDoes() throws {
        _ = try direct.ok("put", "ns/a", "1")
        _ = try direct.ok("put", "ns/b", "2")
        _ = try direct.ok("put", "outside", "x")
        let mirror = try LiveMirror(upstream: cluster.endpoints, args: ["--namespace", "ns/"])
        // etcd's own grpc-proxy with the same namespace is the reference.
        let port = freePort()
        let etcd = try #require(which("etcd"))
        let theirs = try BackgroundCommand(
            etcd,
            [
                "grpc-proxy", "start", "--endpoints", cluster.endpoints, "--listen-addr", "127.0.0.1:\(port)",
                "--namespace", "ns/", "--data-dir", NSTemporaryDirectory() + "etcd-proxy-\(UUID().uuidString)",
            ])
        defer { _ = theirs.stop() }
        let reference = try Etcdctl(endpoint: "127.0.0.1:\(port)")
        var ready = false
        for _ in 0..<50 where !ready {
            ready = try reference.run(["get", "a"]).status == 0
            if !ready { usleep(100_000) }
        }
        #expect(ready)
        let via = try Etcdctl(endpoint: mirror.endpoint)
        for args in [
            ["get", "a", "-w", "json"], ["get", "", "--from-key", "-w", "json"], ["get", "a", "c", "-w", "json"],
            ["get", "outside", "-w", "json"], ["get", "", "--prefix", "--keys-only", "-w", "json"],
            ["put", "", "x"],
        ] {
            let mine = try via.run(args)
            let reference = try reference.run(args)
            #expect(mine.status == reference.status, "\(args)")
            #expect(Self.body(mine.stdout) == Self.body(reference.stdout), "\(args)")
        }
        // Writes land under the namespace; their answers and watches show the clients' keys.
        let watch = try via.background(["watch", "c"])
        usleep(400_000)
        #expect(try via.ok("put", "c", "3", "--prev-kv") == "OK\n")
        #expect(try direct.ok("get", "ns/c") == "ns/c\n3\n")
        #expect(
            try via.run(["txn"], stdin: "value(\"a\") = \"1\"\n\nput c 4\nget c\n\n\n").stdout
                == "SUCCESS\n\nOK\n\nc\n4\n")
        #expect(try via.ok("del", "a", "--prev-kv") == "1\na\n1\n")
        #expect(try direct.ok("get", "ns/a") == "")
        #expect(watch.wait { $0.contains("c\n4") })
        #expect(watch.stop() == "PUT\nc\n3\nPUT\nc\n4\n")
        #expect(try direct.ok("get", "outside") == "outside\nx\n")
    }

    @Test func aPrefixMirrorForwardsWhatItDoesNotHold() throws {
        _ = try direct.ok("put", "cfg/a", "1")
        _ = try direct.ok("put", "other/x", "1")
        let mirror = try LiveMirror(upstream: cluster.endpoints, args: ["--mirror-prefix", "cfg/"])
        let via = try Etcdctl(endpoint: mirror.endpoint)
        // Reads outside the prefix go upstream; inside they are local.
        #expect(try via.ok("get", "other/x") == "other/x\n1\n")
        #expect(try via.ok("get", "cfg/a") == "cfg/a\n1\n")
        // A watch outside the prefix is relayed from upstream, one inside is the hub's, on one stream.
        let outside = try via.background(["watch", "other/", "--prefix"])
        let inside = try via.background(["watch", "cfg/", "--prefix"])
        usleep(400_000)
        _ = try direct.ok("put", "other/y", "2")
        _ = try direct.ok("put", "cfg/b", "2")
        _ = try direct.ok("del", "other/x")
        #expect(outside.wait { $0.contains("DELETE") })
        #expect(inside.wait { $0.contains("cfg/b") })
        #expect(outside.stop() == "PUT\nother/y\n2\nDELETE\nother/x\n\n")
        #expect(inside.stop() == "PUT\ncfg/b\n2\n")
        // The mirror holds only the prefix.
        #expect(try via.ok("get", "cfg/", "--prefix", "--consistency", "s", "--keys-only") == "cfg/a\n\ncfg/b\n\n")
    }

    /// RangeStream (etcd 3.7) is served from the copy, equal to the Range answer; a range the
    /// mirror does not hold goes upstream as it came (etcd 3.4 answers Unimplemented).
    @Test func rangeStreamIsServedFromTheCopy() throws {
        for i in 0..<300 { _ = try direct.ok("put", "rs/\(i)", String(repeating: "v", count: 300)) }
        let mirror = try LiveMirror(upstream: cluster.endpoints, args: ["--mirror-prefix", "rs/"])
        let client = try BlockingClient(port: mirror.port)
        func stream(_ key: String, _ end: String) -> (chunks: [Etcdserverpb_RangeResponse], status: GRPCStatus?) {
            var chunks: [Etcdserverpb_RangeResponse] = []
            var status: GRPCStatus?
            var r = Etcdserverpb_RangeRequest()
            r.key = Data(key.utf8)
            r.rangeEnd = Data(end.utf8)
            let call = client.connection.open(
                EtcdMethod.rangeStream.path,
                onMessage: { bytes in
                    if let m = try? Etcdserverpb_RangeStreamResponse(serializedBytes: bytes) {
                        chunks.append(m.rangeResponse)
                    }
                }, onClose: { status = $0 })
            call.send(try! r.serializedBytes())
            call.closeSend()
            client.runUntil(seconds: 20) { status != nil }
            return (chunks, status)
        }
        let held = stream("rs/", "rs0")
        #expect(held.status?.code == .ok && held.chunks.count > 1)
        var r = Etcdserverpb_RangeRequest()
        r.key = Data("rs/".utf8)
        r.rangeEnd = Data("rs0".utf8)
        let unary = try client.call(EtcdMethod.range.path, r, as: Etcdserverpb_RangeResponse.self).get()
        #expect(held.chunks.flatMap(\.kvs) == unary.kvs && held.chunks.last?.count == 300)
        #expect(held.chunks.last?.header.revision == unary.header.revision)
        let outside = stream("other/", "other0")
        #expect(outside.status?.code == .unimplemented, "\(String(describing: outside.status))")
    }

    /// kube-apiserver's consistent reads from its cache: a linearizable read learns the cluster's
    /// revision, then RequestProgress on its watch stream must come back at that revision or
    /// later (etcd's own grpc-proxy cannot answer it: etcd issue 19710).
    @Test func requestProgressWorksThroughTheMirror() throws {
        let mirror = try LiveMirror(upstream: cluster.endpoints)
        let client = try BlockingClient(port: mirror.port)
        let w = WatchStreamClient(try client.newConnection())
        w.create("/registry/", rangeEnd: "/registry0", progressNotify: true)
        client.runUntil(seconds: 10) { !w.responses.isEmpty }
        // Writes outside the watched range: the watch gets no event of them.
        for i in 0..<5 { _ = try direct.ok("put", "elsewhere/\(i)", "x") }
        var r = Etcdserverpb_RangeRequest()
        r.key = Data("/registry/".utf8)
        r.rangeEnd = Data("/registry0".utf8)
        let revision = try client.call(EtcdMethod.range.path, r, as: Etcdserverpb_RangeResponse.self).get().header
            .revision
        w.requestProgress()
        client.runUntil(seconds: 10) { w.responses.contains { $0.watchID == -1 } }
        let progress = try #require(w.responses.first { $0.watchID == -1 })
        #expect(progress.header.revision >= revision, "\(progress.header.revision) < \(revision)")
    }

    @Test func withAuthOnUpstreamTheCopyIsNotServed() throws {
        _ = try direct.ok("put", "secret", "s")
        let mirror = try LiveMirror(upstream: cluster.endpoints)
        let via = try Etcdctl(endpoint: mirror.endpoint)
        #expect(try via.ok("get", "secret", "--consistency", "s") == "secret\ns\n")
        _ = try via.ok("user", "add", "root:pw")
        _ = try via.ok("auth", "enable")
        // Reads go upstream with the caller's token: refused without a user, served with one.
        for consistency in ["l", "s"] {
            let anonymous = try via.run(["get", "secret", "--consistency", consistency])
            #expect(anonymous.status != 0)
            #expect(anonymous.stderr.contains("etcdserver: user name is empty"), "\(anonymous.stderr)")
        }
        #expect(try via.ok("get", "secret", "--user", "root:pw") == "secret\ns\n")
        // Watches of the copy would skip the permission checks: refused with a reason.
        let watch = try via.run(["watch", "secret", "--user", "root:pw"])
        #expect(watch.output.contains("upstream has auth enabled"), "\(watch.output)")
        // Auth off again: the copy is served again.
        _ = try via.ok("auth", "disable", "--user", "root:pw")
        #expect(try via.ok("get", "secret", "--consistency", "s") == "secret\ns\n")
    }
}
