import Foundation
import Testing
import VigilTesting

/// Parses etcdctl's `-w json` output.
func json(_ s: String) throws -> [String: Any] {
    let obj = try JSONSerialization.jsonObject(with: Data(s.utf8))
    return try #require(obj as? [String: Any])
}

func int(_ v: Any?) -> Int64? { (v as? NSNumber)?.int64Value }

func b64(_ s: String) -> String { Data(s.utf8).base64EncodedString() }

/// etcdctl (the real v3.4 binary) against the real `vigil` binary: every KV flag and error.
@Suite(.serialized) struct EtcdctlKVTests {
    let server: LiveServer
    let ctl: Etcdctl

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync"])
        ctl = try Etcdctl(endpoint: server.endpoint)
    }

    @Test func putGetAndHeaderRevisions() throws {
        #expect(try ctl.ok("put", "foo", "bar") == "OK\n")
        #expect(try ctl.ok("get", "foo") == "foo\nbar\n")
        let r = try json(ctl.ok("get", "foo", "-w", "json"))
        let header = try #require(r["header"] as? [String: Any])
        #expect(int(header["revision"]) == 2)
        #expect(int(header["cluster_id"]) != nil)
        #expect(int(header["member_id"]) != nil)
        let kv = try #require((r["kvs"] as? [[String: Any]])?.first)
        #expect(kv["key"] as? String == b64("foo"))
        #expect(int(kv["create_revision"]) == 2)
        #expect(int(kv["mod_revision"]) == 2)
        #expect(int(kv["version"]) == 1)
        #expect(int(r["count"]) == 1)
        #expect(try ctl.ok("get", "missing") == "")
    }

    @Test func prefixFromKeyLimitSortAndCounts() throws {
        for (k, v) in [("k1", "c"), ("k2", "a"), ("k3", "b"), ("l1", "z")] { _ = try ctl.ok("put", k, v) }
        #expect(try ctl.ok("get", "k", "--prefix", "--keys-only") == "k1\n\nk2\n\nk3\n\n")
        #expect(try ctl.ok("get", "k2", "--from-key", "--keys-only") == "k2\n\nk3\n\nl1\n\n")
        #expect(try ctl.ok("get", "k1", "k3") == "k1\nc\nk2\na\n")
        let limited = try json(ctl.ok("get", "k", "--prefix", "--limit", "2", "-w", "json"))
        #expect((limited["kvs"] as? [Any])?.count == 2)
        #expect(limited["more"] as? Bool == true)
        #expect(int(limited["count"]) == 3)
        #expect(try ctl.ok("get", "k", "--prefix", "--order", "DESCEND", "--keys-only") == "k3\n\nk2\n\nk1\n\n")
        #expect(
            try ctl.ok("get", "k", "--prefix", "--sort-by", "VALUE", "--order", "ASCEND") == "k2\na\nk3\nb\nk1\nc\n")
        #expect(
            try ctl.ok("get", "k", "--prefix", "--sort-by", "MODIFY", "--order", "DESCEND", "--keys-only")
                == "k3\n\nk2\n\nk1\n\n")
        #expect(try ctl.ok("get", "--prefix", "", "--keys-only", "--consistency=s") == "k1\n\nk2\n\nk3\n\nl1\n\n")
        // Ties keep key order, descending too (as etcd's reversed sort leaves them).
        #expect(
            try ctl.ok("get", "", "--from-key", "--sort-by", "VERSION", "--order", "DESCEND", "--keys-only")
                == "k1\n\nk2\n\nk3\n\nl1\n\n")
    }

    @Test func historyReadsAndCompaction() throws {
        _ = try ctl.ok("put", "h", "v1")  // 2
        _ = try ctl.ok("put", "h", "v2")  // 3
        _ = try ctl.ok("put", "h", "v3")  // 4
        #expect(try ctl.ok("get", "h", "--rev", "2") == "h\nv1\n")
        #expect(try ctl.ok("get", "h", "--rev", "3") == "h\nv2\n")
        let future = try ctl.fails("get", "h", "--rev", "99")
        #expect(future.contains("etcdserver: mvcc: required revision is a future revision"))
        #expect(try ctl.ok("compaction", "3") == "compacted revision 3\n")
        let compacted = try ctl.fails("get", "h", "--rev", "2")
        #expect(compacted.contains("etcdserver: mvcc: required revision has been compacted"))
        #expect(try ctl.ok("get", "h", "--rev", "3") == "h\nv2\n")
        #expect(try ctl.fails("compaction", "3").contains("etcdserver: mvcc: required revision has been compacted"))
        #expect(try ctl.fails("compaction", "50").contains("etcdserver: mvcc: required revision is a future revision"))
        #expect(try ctl.ok("compaction", "--physical", "4") == "compacted revision 4\n")
    }

    @Test func putFlagsAndDelete() throws {
        _ = try ctl.ok("put", "p", "one")
        #expect(try ctl.ok("put", "p", "two", "--prev-kv") == "OK\np\none\n")
        #expect(try ctl.ok("put", "p", "--ignore-value") == "OK\n")
        #expect(try ctl.ok("get", "p") == "p\ntwo\n")
        #expect(try ctl.fails("put", "nokey", "--ignore-value").contains("etcdserver: key not found"))
        #expect(try ctl.fails("put", "p", "x", "--lease", "1234").contains("etcdserver: requested lease not found"))
        _ = try ctl.ok("put", "q1", "a")
        _ = try ctl.ok("put", "q2", "b")
        #expect(try ctl.ok("del", "q", "--prefix", "--prev-kv") == "2\nq1\na\nq2\nb\n")
        #expect(try ctl.ok("del", "q", "--prefix") == "0\n")
        let r = try json(ctl.ok("get", "p", "-w", "json"))
        #expect(int((r["header"] as? [String: Any])?["revision"]) == 7, "no-op delete made no revision")
        _ = try ctl.ok("put", "z1", "a")
        #expect(try ctl.ok("del", "z", "--from-key") == "1\n")
    }

    @Test func transactions() throws {
        _ = try ctl.ok("put", "t", "1")
        let succeeded = try txn("value(\"t\") = \"1\"\n\nput t 2\nget t\n\nput t nope\n\n")
        #expect(succeeded == "SUCCESS\n\nOK\n\nt\n2\n")
        let failed = try txn("value(\"t\") = \"1\"\n\nput t 3\n\nget t\n\n")
        #expect(failed == "FAILURE\n\nt\n2\n")
        // Compares on versions and revisions; a missing key compares as zero except for VALUE.
        #expect(try txn("create(\"new\") = \"0\"\nversion(\"t\") > \"1\"\n\nput new x\n\n\n").hasPrefix("SUCCESS"))
        #expect(try txn("value(\"nothere\") != \"x\"\n\nput m 1\n\n\n").hasPrefix("FAILURE"))
        #expect(try txn("mod(\"t\") < \"100\"\n\nput t 9\n\n\n").hasPrefix("SUCCESS"))
        #expect(try txn("version(\"t\") = \"1\"\n\nput t 10\n\n\n").hasPrefix("FAILURE"))
        // One revision for all the ops of a txn.
        let before = try json(ctl.ok("get", "t", "-w", "json"))
        let rev = try #require(int((before["header"] as? [String: Any])?["revision"]))
        _ = try ctl.run(["txn", "-i"], stdin: "\nput a1 x\nput a2 y\ndel t\n\n\n")
        let after = try json(ctl.ok("get", "a1", "-w", "json"))
        #expect(int((after["header"] as? [String: Any])?["revision"]) == rev + 1)
        let kv = try #require((after["kvs"] as? [[String: Any]])?.first)
        #expect(int(kv["mod_revision"]) == rev + 1)
        // Duplicate keys are refused.
        #expect(try txn("\nput d 1\nput d 2\n\n\n").contains("etcdserver: duplicate key given in txn request"))
    }

    /// Runs `etcdctl txn -i` and returns its answer without the interactive prompts.
    func txn(_ input: String) throws -> String {
        let r = try ctl.run(["txn", "-i"], stdin: input)
        var out = r.stdout
        for prompt in ["compares:\n", "success requests (get, put, del):\n", "failure requests (get, put, del):\n"] {
            if let range = out.range(of: prompt) { out.removeSubrange(range) }
        }
        return out + (r.status == 0 ? "" : r.stderr)
    }

    @Test func tooManyOpsAndTooLarge() throws {
        var ops = ""
        for i in 0..<129 { ops += "put k\(i) v\n" }
        let many = try ctl.run(["txn", "-i"], stdin: "\n" + ops + "\n\n")
        #expect(many.output.contains("etcdserver: too many operations in txn request"))
        // The value comes on stdin (too long for an argument).
        let large = try ctl.run(["put", "big"], stdin: String(repeating: "x", count: 1_600_000))
        #expect(large.status != 0)
        #expect(large.output.contains("etcdserver: request is too large"))
        // Just under the limit is fine.
        let fits = try ctl.run(["put", "fits"], stdin: String(repeating: "y", count: 1_500_000))
        #expect(fits.stdout == "OK\n")
    }

    @Test func emptyKeyIsRefused() throws {
        #expect(try ctl.fails("put", "", "v").contains("etcdserver: key is not provided"))
    }

    @Test func endpointAndMemberCommands() throws {
        let health = try ctl.run(["endpoint", "health"])
        #expect(health.status == 0)
        #expect(health.output.contains("is healthy"))
        let status = try ctl.ok("endpoint", "status")
        #expect(status.contains(server.endpoint))
        #expect(status.contains("true"), "this member is the leader")
        let members = try ctl.ok("member", "list")
        #expect(members.contains("default"))
        #expect(members.contains("started"))
    }
}

/// Durability across restarts, clean and killed.
@Suite(.serialized) struct RestartTests {
    @Test func cleanRestartKeepsDataAndRevision() throws {
        let server = try LiveServer(args: [])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        for i in 0..<20 { _ = try ctl.ok("put", "key\(i)", "value\(i)") }
        _ = try ctl.ok("del", "key0")
        _ = try ctl.ok("compaction", "5")
        try server.restart()
        let r = try json(ctl.ok("get", "key", "--prefix", "-w", "json"))
        #expect(int(r["count"]) == 19)
        #expect(int((r["header"] as? [String: Any])?["revision"]) == 22)
        #expect(try ctl.fails("get", "key1", "--rev", "4").contains("required revision has been compacted"))
        #expect(try ctl.ok("put", "after", "x") == "OK\n")
        let next = try json(ctl.ok("get", "after", "-w", "json"))
        #expect(int((next["header"] as? [String: Any])?["revision"]) == 23)
    }

    @Test func sigkillLosesNothingAcknowledged() throws {
        let server = try LiveServer(args: [])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        for i in 0..<30 { _ = try ctl.ok("put", "k\(i)", "v\(i)") }
        try server.restart(kill: true)
        let r = try json(ctl.ok("get", "k", "--prefix", "-w", "json"))
        #expect(int(r["count"]) == 30)
        #expect(int((r["header"] as? [String: Any])?["revision"]) == 31)
        #expect(try ctl.ok("get", "k29") == "k29\nv29\n")
    }
}

/// The embedding example runs as its README says.
@Suite struct ExampleTests {
    @Test func embeddedExampleWritesReadsAndStops() throws {
        let dir = URL(fileURLWithPath: try vigilBinary()).deletingLastPathComponent()
        let r = try runCommand(dir.appendingPathComponent("EmbeddedExample").path, [], timeout: 60)
        #expect(r.status == 0)
        #expect(r.stdout.contains("put greeting at revision 2"))
        #expect(r.stdout.contains("get greeting = hello from an embedded vigil"))
        #expect(r.stdout.contains("stopped cleanly"))
    }

    @Test func configPushSubscribersResumeAfterReconnect() throws {
        let dir = URL(fileURLWithPath: try vigilBinary()).deletingLastPathComponent()
        let r = try runCommand(
            dir.appendingPathComponent("ConfigPushExample").path,
            ["--subscribers", "60", "--changes", "300", "--keys", "20"], timeout: 120)
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("60/60 subscribers match the server"))
        #expect(r.stdout.contains("resumed after reconnect: 20/20"))
    }
}
