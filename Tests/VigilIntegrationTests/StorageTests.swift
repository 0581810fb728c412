import Foundation
import Testing
import VigilTesting

/// Values out of memory: once a checkpoint has moved them into LMDB (a defragment forces one) the
/// server holds none of them, and reads, history reads, watch history and `prev_kv` read them back
/// from LMDB — before and after a restart.
@Suite(.serialized) struct StorageTests {
    func metric(_ server: LiveServer, _ name: String) -> Double? {
        guard let text = try? runCommand("/usr/bin/curl", ["-s", server.url + "/metrics"]).stdout else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(name + " ") {
            return Double(line.split(separator: " ")[1])
        }
        return nil
    }

    @Test func valuesAreReadBackFromLMDB() throws {
        let server = try LiveServer(args: [])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        let big = String(repeating: "v", count: 10_000)
        _ = try ctl.ok("put", "a", "one-" + big)  // 2
        _ = try ctl.ok("put", "a", "two-" + big)  // 3
        _ = try ctl.ok("put", "b", "bee")  // 4
        #expect((metric(server, "vigil_mvcc_recent_value_bytes") ?? 0) > 20_000, "held until a checkpoint")
        _ = try ctl.ok("defrag")
        var released = false
        for _ in 0..<50 where !released {
            released = metric(server, "vigil_mvcc_recent_value_bytes") == 0
            if !released { usleep(20_000) }
        }
        #expect(released, "the checkpoint moved every value into LMDB and the store let go of them")
        #expect(metric(server, "vigil_mvcc_index_revisions") == 3)

        func check() throws {
            #expect(try ctl.ok("get", "a", "--print-value-only") == "two-\(big)\n")
            #expect(try ctl.ok("get", "a", "--rev", "2", "--print-value-only") == "one-\(big)\n")
            #expect(try ctl.ok("get", "", "--from-key", "--keys-only") == "a\n\nb\n\n")
            // Watch history from revision 2, with previous values.
            let w = try ctl.background(["watch", "a", "--rev", "2", "--prev-kv"])
            #expect(w.wait { $0.contains("two-") })
            let out = w.stop()
            #expect(out == "PUT\na\none-\(big)\nPUT\na\none-\(big)\na\ntwo-\(big)\n")
            // A live put whose previous value is in LMDB only, to a watcher with prev_kv.
            let live = try ctl.background(["watch", "b", "--prev-kv"])
            usleep(400_000)
            _ = try ctl.ok("put", "b", "bee2")
            #expect(live.wait { $0.hasSuffix("bee2\n") })
            #expect(live.stop() == "PUT\nb\nbee\nb\nbee2\n")
            _ = try ctl.ok("put", "b", "bee")
            _ = try ctl.ok("defrag")
        }
        try check()
        try server.restart()
        #expect(try ctl.ok("get", "b", "--print-value-only") == "bee\n")
        _ = try ctl.ok("put", "b", "bee")  // the same state as before check()
        try check()
        // A delete's previous value, asked for.
        #expect(try ctl.ok("del", "a", "--prev-kv") == "1\na\ntwo-\(big)\n")
    }
}
