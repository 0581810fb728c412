import Bolt
import Foundation
import Testing
import VigilTesting

/// etcd's snapshot format both ways, with the real tools: a Vigil snapshot that `etcdctl snapshot
/// status` reads and `snapshot restore` turns into a data directory a real etcd starts from, and a
/// real etcd's snapshot that Vigil starts from, keeping revisions, keys, leases, users and roles.
@Suite(.serialized) struct EtcdSnapshotTests {
    let dir: String

    init() throws {
        dir = NSTemporaryDirectory() + "vigil-etcd-snap-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    func keys(_ ctl: Etcdctl) throws -> [String: (mod: Int, lease: Int)] {
        let out = try ctl.ok("get", "", "--from-key", "-w", "json")
        let json = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
        var result: [String: (mod: Int, lease: Int)] = [:]
        for kv in json?["kvs"] as? [[String: Any]] ?? [] {
            let key = String(decoding: Data(base64Encoded: kv["key"] as? String ?? "") ?? Data(), as: UTF8.self)
            result[key] = ((kv["mod_revision"] as? NSNumber)?.intValue ?? -1, (kv["lease"] as? NSNumber)?.intValue ?? 0)
        }
        return result
    }

    func revision(_ ctl: Etcdctl) throws -> Int {
        let out = try ctl.ok("get", "nothing-here", "-w", "json")
        let json = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
        return ((json?["header"] as? [String: Any])?["revision"] as? NSNumber)?.intValue ?? -1
    }

    @Test func vigilToEtcdAndBack() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let etcd = try #require(which("etcd"), "etcd is installed by scripts/install-deps.sh --test")
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        for i in 0..<30 { _ = try ctl.ok("put", "k\(i % 10)", "v\(i)") }
        _ = try ctl.ok("del", "k3")
        _ = try ctl.ok("compaction", "5")
        let lease = try ctl.ok("lease", "grant", "600").split(separator: " ")[1]
        _ = try ctl.ok("put", "leased", "x", "--lease=\(lease)")
        _ = try ctl.ok("user", "add", "root:rootpw")
        _ = try ctl.ok("user", "add", "alice:apw")
        _ = try ctl.ok("role", "add", "reader")
        _ = try ctl.ok("role", "grant-permission", "reader", "read", "k", "--prefix")
        _ = try ctl.ok("user", "grant-role", "alice", "reader")
        let before = try keys(ctl)
        let rev = try revision(ctl)

        // etcdctl reads Vigil's snapshot as etcd's.
        let snap = dir + "/vigil.db"
        #expect(try ctl.ok("snapshot", "save", snap).contains("Snapshot saved"))
        let status = try ctl.ok("snapshot", "status", snap, "-w", "json")
        let st = try JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any]
        #expect((st?["revision"] as? NSNumber)?.intValue == rev, "\(status)")

        // Restored by etcdctl, a real etcd starts from it with the same keys, revisions, lease and users.
        let client = freePort(), peer = freePort()
        let restored = dir + "/etcd"
        let r = try ctl.run([
            "snapshot", "restore", snap, "--data-dir", restored, "--name", "default",
            "--initial-cluster", "default=http://127.0.0.1:\(peer)", "--initial-advertise-peer-urls",
            "http://127.0.0.1:\(peer)",
        ])
        #expect(r.status == 0, "\(r.output)")
        let real = try BackgroundCommand(
            etcd,
            [
                "--data-dir", restored, "--name", "default", "--listen-client-urls", "http://127.0.0.1:\(client)",
                "--advertise-client-urls", "http://127.0.0.1:\(client)", "--listen-peer-urls",
                "http://127.0.0.1:\(peer)", "--initial-advertise-peer-urls", "http://127.0.0.1:\(peer)",
                "--initial-cluster", "default=http://127.0.0.1:\(peer)",
            ])
        defer { _ = real.stop() }
        #expect(real.wait(timeout: 30) { $0.contains("ready to serve client requests") }, "\(real.output)")
        let ectl = try Etcdctl(endpoint: "127.0.0.1:\(client)")
        let inEtcd = try keys(ectl)
        #expect(inEtcd.mapValues(\.mod) == before.mapValues(\.mod))
        #expect(inEtcd.mapValues(\.lease) == before.mapValues(\.lease))
        #expect(try ectl.ok("lease", "list").contains(String(lease)))
        #expect(try ectl.ok("user", "list") == "alice\nroot\n")
        #expect(try ectl.ok("role", "get", "reader").contains("[k, l) (prefix k)"))
        #expect(try ectl.fails("get", "k1", "--rev", "4").contains("required revision has been compacted"))

        // And back: etcd's own snapshot seeds a new Vigil.
        _ = try ectl.ok("put", "from-etcd", "yes")
        let esnap = dir + "/etcd.db"
        #expect(try ectl.ok("snapshot", "save", esnap).contains("Snapshot saved"))
        let again = try LiveServer(args: ["--unsafe-no-fsync", "--restore-snapshot", esnap])
        let actl = try Etcdctl(endpoint: again.endpoint)
        let inVigil = try keys(actl)
        #expect(inVigil["from-etcd"]?.mod == rev + 1)
        #expect(inVigil.filter { $0.key != "from-etcd" }.mapValues(\.mod) == before.mapValues(\.mod))
        #expect(try revision(actl) == rev + 1)
        #expect(try actl.ok("lease", "list").contains(String(lease)))
        #expect(try actl.ok("user", "list") == "alice\nroot\n")
        #expect(try actl.fails("get", "k1", "--rev", "4").contains("required revision has been compacted"))
        #expect(again.log.contains("restored an etcd snapshot"))
    }

    @Test func badSnapshotsAreRefusedAndTouchNothing() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let vigil = try vigilBinary()
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        for i in 0..<200 { _ = try ctl.ok("put", "k\(i)", String(repeating: "v", count: 200)) }
        let good = dir + "/good.db"
        _ = try ctl.ok("snapshot", "save", good)
        let bytes = try Data(contentsOf: URL(fileURLWithPath: good))

        func refused(_ name: String, _ data: Data, _ expected: String) throws {
            let file = dir + "/" + name
            try data.write(to: URL(fileURLWithPath: file))
            let data = dir + "/data-" + name
            let r = try runCommand(
                vigil,
                [
                    "--data-dir", data, "--listen-client-urls", "http://127.0.0.1:\(freePort())", "--restore-snapshot",
                    file,
                ],
                timeout: 20)
            #expect(r.status != 0 && r.output.contains(expected), "\(name): \(r.output)")
            let left = (try? FileManager.default.contentsOfDirectory(atPath: data)) ?? []
            #expect(!left.contains("member") && !left.contains("member.restoring"), "\(name) left \(left)")
        }
        // A flipped byte: the SHA-256 at the end no longer matches.
        var flipped = bytes
        flipped[5000] ^= 0x01
        try refused("flipped.db", flipped, "failed its integrity check")
        // Truncated to whole pages (no checksum left): the metas name more pages than there are.
        try refused("truncated.db", bytes.prefix(3 * 4096), "truncated bbolt file")
        // Garbage.
        try refused("garbage.db", Data(repeating: 0x42, count: 10_000), "cannot restore snapshot")
        // A bbolt file that is not etcd's.
        let foreign = dir + "/foreign.db"
        try Bolt.write([Bolt.Bucket("key"), Bolt.Bucket("meta"), Bolt.Bucket("photos")], to: foreign)
        try refused("foreign.db", try Data(contentsOf: URL(fileURLWithPath: foreign)), "unknown buckets photos")
    }
}
