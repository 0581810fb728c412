import Foundation
import Robustness
import Testing
import VigilTesting

/// CI's short robustness profiles, against the real binaries: seeded traffic with a kill, a
/// failpoint crash and a pause past the leases' TTL on Vigil; a kill and a pause on Debian's etcd
/// 3.4 (the validators must pass there, but for etcd's known bugs, which they name); and four
/// servers broken on purpose (failpoints), each caught by its validator. `make robustness` runs
/// every profile, longer.
@Suite(.serialized) struct RobustnessRunTests {
    /// A seed per run, printed: a failure can be run again with `vigil-robustness --seed`.
    static let seed =
        UInt64(ProcessInfo.processInfo.environment["VIGIL_ROBUSTNESS_SEED"] ?? "")
        ?? UInt64(Date().timeIntervalSince1970)

    func run(_ p: Profile) throws {
        var profile = p
        // Sanitized builds run slower: the same seconds carry fewer requests, so they run longer.
        profile.seconds *= min(sanitizerFactor, 2)
        for i in profile.faults.indices { profile.faults[i].at *= min(sanitizerFactor, 2) }
        let report = try Runner.run(
            profile, seed: Self.seed, output: FileManager.default.currentDirectoryPath + "/.build/robustness")
        print(report.summary)
        #expect(report.passed, "\(report.summary)")
        #expect(Int(report.stats["answered"] ?? "0")! > 1000, "too little traffic: \(report.stats)")
    }

    @Test func vigilUnderKillFailpointAndPause() throws { try run(Profile.ci.first { $0.name == "vigil-faults" }!) }
    @Test func etcdUnderKillAndPause() throws { try run(Profile.ci.first { $0.name == "etcd-faults" }!) }
    @Test func aHubThatDropsEventsIsCaught() throws { try run(.brokenHub) }
    @Test func aLockAnsweredOutOfTurnIsCaught() throws { try run(.brokenLock) }
    @Test func aLeaseThatNeverEndsIsCaught() throws { try run(.brokenLease) }
    @Test func anAcknowledgedWriteNeverLoggedIsCaught() throws { try run(.brokenLog) }
}
