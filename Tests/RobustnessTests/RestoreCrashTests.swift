import Foundation
import Testing
import VigilTesting

/// The one failpoint a run's traffic cannot reach: `--restore-snapshot` crashing while it writes
/// the new data directory. The next start restores again, whole.
@Suite struct RestoreCrashTests {
    @Test func aRestoreCrashedMidwayIsDoneAgainWhole() throws {
        let source = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: source.endpoint)
        for i in 0..<40 { _ = try ctl.ok("put", "k\(i)", "v\(i)") }
        let snapshot = source.dataDir + ".snapshot.db"
        defer { try? FileManager.default.removeItem(atPath: snapshot) }
        #expect(try ctl.ok("snapshot", "save", snapshot).contains("Snapshot saved"))

        let target = try LiveServer(args: ["--unsafe-no-fsync", "--restore-snapshot", snapshot], startNow: false)
        #expect(throws: (any Error).self) {
            try target.start(environment: ["VIGIL_FAILPOINTS": "snapshotMidRestore=panic"])
        }
        #expect(target.log.contains("failpoint snapshotMidRestore: panic"))
        try target.start()
        let restored = try Etcdctl(endpoint: target.endpoint)
        #expect(try restored.ok("get", "k", "--prefix", "--keys-only").split(separator: "\n").count == 40)
        #expect(try restored.ok("get", "k39", "--print-value-only") == "v39\n")
    }
}
