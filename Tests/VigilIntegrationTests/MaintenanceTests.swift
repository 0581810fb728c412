import EtcdProto
import Foundation
import Testing
import VigilCore
import VigilTesting

/// An operator's daily etcdctl commands against the real binary: compaction, defrag, endpoint
/// status/health/hashkv, snapshot save (and starting from it), alarms and quota, membership.
@Suite(.serialized) struct MaintenanceTests {
    func status(_ ctl: Etcdctl) throws -> [String: Any] {
        let out = try ctl.ok("endpoint", "status", "-w", "json")
        let arr = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]]
        return arr?.first?["Status"] as? [String: Any] ?? [:]
    }

    func int(_ v: Any?) -> Int64 { (v as? NSNumber)?.int64Value ?? -1 }

    func fill(_ ctl: Etcdctl, count: Int, size: Int, prefix: String = "big") throws {
        let value = String(repeating: "v", count: size)
        for i in 0..<count { _ = try ctl.ok("put", "\(prefix)\(i % 5)", value) }
    }

    @Test func compactionAndDefragReclaimSpace() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        try fill(ctl, count: 30, size: 100_000)
        let before = try status(ctl)
        let rev = int((before["header"] as? [String: Any])?["revision"])
        #expect(try ctl.ok("compaction", String(rev), "--physical") == "compacted revision \(rev)\n")
        let compacted = try status(ctl)
        #expect(int(compacted["dbSizeInUse"]) < int(before["dbSizeInUse"]) / 2, "freed pages are not in use")
        #expect(try ctl.ok("defrag").contains("Finished defragmenting etcd member[\(server.endpoint)]"))
        let after = try status(ctl)
        #expect(int(after["dbSize"]) < int(before["dbSize"]) / 2, "defrag shrinks the file: \(after) vs \(before)")
        #expect(try ctl.ok("get", "big1", "--print-value-only").count == 100_001)
        // The history below the compaction is gone, as etcd says.
        #expect(try ctl.fails("get", "big1", "--rev", "2").contains("required revision has been compacted"))
        // It all survives a restart.
        try server.restart()
        #expect(try ctl.ok("get", "big1", "--print-value-only").count == 100_001)
    }

    /// grpc-go sends the endpoint as given (`http://…`) in `:authority` for etcdctl's maintenance
    /// calls; etcd accepts it, and so must we (nghttp2 alone would reset the stream).
    @Test func endpointsWithASchemeOnEveryMaintenanceCall() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: server.url)
        #expect(try ctl.ok("put", "k", "v") == "OK\n")
        #expect(try ctl.ok("endpoint", "status").contains("\(server.url), 8e9e05c52164694d"))
        #expect(try ctl.ok("endpoint", "hashkv").contains(server.url))
        #expect(try ctl.run(["endpoint", "health"]).output.contains("is healthy"))
        #expect(try ctl.ok("defrag").contains("Finished defragmenting etcd member[\(server.url)]"))
        #expect(try ctl.ok("alarm", "list") == "")
        #expect(try ctl.ok("move-leader", "8e9e05c52164694d").contains("Leadership transferred"))
        let snap = server.dataDir + ".snap"
        defer { try? FileManager.default.removeItem(atPath: snap) }
        #expect(try ctl.ok("snapshot", "save", snap).contains("Snapshot saved at \(snap)"))
        #expect(try ctl.ok("member", "list").contains("8e9e05c52164694d"))
        #expect(try ctl.ok("compaction", "2") == "compacted revision 2\n")
        // etcd 3.4 answers Alarm without a header.
        let c = try BlockingClient(port: server.port)
        let alarms = c.call(EtcdMethod.alarm.path, Etcdserverpb_AlarmRequest(), as: Etcdserverpb_AlarmResponse.self)
        #expect(try !alarms.get().hasHeader)
    }

    @Test func statusHealthHashKVAndMembership() throws {
        let a = try LiveServer(args: ["--unsafe-no-fsync"])
        let b = try LiveServer(args: ["--unsafe-no-fsync"])
        let ca = try Etcdctl(endpoint: a.endpoint), cb = try Etcdctl(endpoint: b.endpoint)
        for ctl in [ca, cb] {
            for i in 0..<20 { _ = try ctl.ok("put", "k\(i % 7)", "v\(i)") }
            _ = try ctl.ok("del", "k3")
        }
        // Equal histories, equal hashes; a different history, a different hash.
        let ha = try ca.ok("endpoint", "hashkv"), hb = try cb.ok("endpoint", "hashkv")
        #expect(ha.split(separator: ",").last == hb.split(separator: ",").last)
        _ = try cb.ok("put", "extra", "x")
        #expect(try cb.ok("endpoint", "hashkv").split(separator: ",").last != ha.split(separator: ",").last)

        let table = try ca.ok("endpoint", "status")
        #expect(table.contains("8e9e05c52164694d, 3.4.31") && table.contains("true, false"))
        #expect(try ca.run(["endpoint", "health"]).output.contains("is healthy"))
        #expect(try ca.ok("member", "list").contains("8e9e05c52164694d, started, default"))
        #expect(try ca.fails("member", "add", "other", "--peer-urls=http://10.0.0.2:2380").contains("cannot change"))
        #expect(try ca.fails("member", "remove", "1234").contains("etcdserver: member not found"))
        #expect(try ca.fails("move-leader", "1234").contains("etcdserver: bad leader transferee"))
        // The one member's peer URLs can be updated, as etcd allows; the change survives a restart.
        #expect(
            try ca.ok("member", "update", "8e9e05c52164694d", "--peer-urls=http://127.0.0.1:12380")
                .contains("Member 8e9e05c52164694d updated in cluster cdf818194e3a8c32"))
        try a.restart()
        #expect(try ca.ok("member", "list").contains("8e9e05c52164694d, started, default, http://127.0.0.1:12380"))
        #expect(try ca.fails("member", "update", "1234", "--peer-urls=http://127.0.0.1:2").contains("member not found"))
    }

    @Test func snapshotSaveAndStartFromIt() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        for i in 0..<50 { _ = try ctl.ok("put", "s\(i)", "value-\(i)") }
        let dir = NSTemporaryDirectory() + "vigil-snap-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/snap.db"
        #expect(try ctl.ok("snapshot", "save", file).contains("Snapshot saved at \(file)"))
        let size = (try FileManager.default.attributesOfItem(atPath: file)[.size] as? NSNumber)?.intValue ?? 0
        #expect(size > 32)
        // A finished Snapshot call is counted as handled like any other (it once was not: the
        // snapshot sender replaced the callback the metrics were hooked on).
        let metrics = try rawExchange(
            port: server.port, Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        let labels = #"grpc_method="Snapshot",grpc_service="etcdserverpb.Maintenance",grpc_type="server_stream""#
        #expect(metrics.contains("grpc_server_started_total{\(labels)} 1"))
        #expect(metrics.contains(#"grpc_server_handled_total{grpc_code="OK","# + labels + "} 1"))
        #expect(metrics.contains("grpc_server_handling_seconds_count{\(labels)} 1"))
        // No snapshot copy is left behind in the data directory.
        let left = try FileManager.default.contentsOfDirectory(atPath: server.dataDir + "/member")
        #expect(!left.contains { $0.hasPrefix("snapshot-") })
        let restored = try LiveServer(args: ["--unsafe-no-fsync", "--restore-snapshot", file])
        let rctl = try Etcdctl(endpoint: restored.endpoint)
        #expect(try rctl.ok("get", "s49") == "s49\nvalue-49\n")
        #expect(try rctl.ok("get", "s", "--prefix", "--keys-only").split(separator: "\n").count == 50)
        let rev = try rctl.ok("get", "s0", "-w", "json")
        #expect(rev.contains("\"revision\":51"))
    }

    @Test func quotaRaisesNoSpaceUntilSpaceIsBackAndDisarmed() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync", "--quota-backend-bytes", "400000"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        let value = String(repeating: "q", count: 50_000)
        var refused = ""
        for i in 0..<20 {
            let r = try ctl.run(["put", "q\(i % 3)", value])
            if r.status != 0 {
                refused = r.output
                break
            }
        }
        #expect(refused.contains("etcdserver: mvcc: database space exceeded"))
        #expect(try ctl.ok("alarm", "list").contains("alarm:NOSPACE"))
        #expect(try ctl.fails("put", "small", "x").contains("database space exceeded"))
        #expect(try ctl.fails("lease", "grant", "10").contains("database space exceeded"))
        // Reads and deletes still work; /health says why it is unhealthy; the alarm survives restart.
        #expect(try ctl.ok("get", "q1", "--keys-only") == "q1\n\n")
        _ = try ctl.ok("del", "q0")
        let health = try rawExchange(
            port: server.port, Array("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        // etcd 3.4's words: no reason (3.5 adds one), as Go's http.Error writes them.
        #expect(health.hasPrefix("HTTP/1.1 503") && health.hasSuffix("\r\n\r\n{\"health\":\"false\"}\n"))
        let excluded = try rawExchange(
            port: server.port,
            Array("GET /health?exclude=NOSPACE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        #expect(excluded.hasPrefix("HTTP/1.1 200") && excluded.hasSuffix(#"{"health":"true"}"#))
        try server.restart()
        #expect(try ctl.ok("alarm", "list").contains("alarm:NOSPACE"))
        // Recovery as etcd documents it: compact, defrag, disarm.
        let rev = try status(ctl)["header"].flatMap { ($0 as? [String: Any])?["revision"] }
        _ = try ctl.ok("compaction", String(int(rev)), "--physical")
        _ = try ctl.ok("defrag")
        #expect(try ctl.ok("alarm", "disarm").contains("alarm:NOSPACE"))
        #expect(try ctl.ok("alarm", "list") == "")
        #expect(try ctl.ok("put", "small", "x") == "OK\n")
    }

    func compactRevision(_ ctl: Etcdctl) throws -> Int64 {
        let out = try ctl.ok("endpoint", "hashkv", "-w", "json")
        let arr = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]]
        return int((arr?.first?["HashKV"] as? [String: Any])?["compact_revision"])
    }

    @Test func autoCompactionByRevisionAndByPeriod() throws {
        let byRev = try LiveServer(args: [
            "--unsafe-no-fsync", "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "10", "--auto-compaction-check-interval", "200ms",
        ])
        let c1 = try Etcdctl(endpoint: byRev.endpoint)
        for i in 0..<30 { _ = try c1.ok("put", "k", "v\(i)") }  // revisions 2...31
        var deadline = Date().addingTimeInterval(5)
        while Date() < deadline, try compactRevision(c1) != 21 { usleep(100_000) }
        #expect(try compactRevision(c1) == 21, "current 31 minus the 10 revisions kept")
        #expect(try c1.fails("get", "k", "--rev", "20").contains("required revision has been compacted"))
        #expect(try c1.ok("get", "k", "--rev", "21", "--print-value-only") == "v19\n")

        let byTime = try LiveServer(args: [
            "--unsafe-no-fsync", "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1s",
        ])
        let c2 = try Etcdctl(endpoint: byTime.endpoint)
        for i in 0..<5 { _ = try c2.ok("put", "p", "v\(i)") }  // revisions 2...6
        // A second later the history older than a second goes: compacted at a revision ≥ 6.
        deadline = Date().addingTimeInterval(5)
        while Date() < deadline, try compactRevision(c2) < 6 { usleep(100_000) }
        #expect(try compactRevision(c2) >= 6)
        #expect(try c2.ok("get", "p", "--print-value-only") == "v4\n")
    }
}
