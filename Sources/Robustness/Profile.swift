/// A run's plan: what it drives, for how long, with which traffic and faults.
public struct Profile: Codable, Sendable {
    public var name: String
    public var target: TargetKind
    public var seconds: Double
    public var mix = TrafficMix()
    public var faults: [FaultPlan] = []
    /// Failpoints on from the start (a deliberately broken server).
    public var serverFailpoints: String?
    /// The validators this run must find broken (for a broken server); empty: none may be.
    public var expect: [String] = []

    public init(name: String, target: TargetKind, seconds: Double, faults: [FaultPlan] = []) {
        self.name = name
        self.target = target
        self.seconds = seconds
        self.faults = faults
    }
}

extension Profile {
    /// CI's short profiles: every validator, a kill, a failpoint crash, a pause past the leases'
    /// TTL, against Vigil and against etcd 3.4; and two broken servers the validators must catch.
    public static let ci: [Profile] = [
        Profile(
            name: "vigil-faults", target: .vigil, seconds: 24,
            faults: [
                FaultPlan(at: 5, .kill),
                FaultPlan(
                    at: 10, .failpoint(name: "walAfterWrite", spec: "20%panic", holdMilliseconds: 3000, trigger: "")),
                FaultPlan(at: 15, .pause(milliseconds: 4000)),
            ]),
        Profile(
            name: "etcd-faults", target: .etcd, seconds: 16,
            faults: [FaultPlan(at: 5, .kill), FaultPlan(at: 9, .pause(milliseconds: 4000))]),
        brokenHub, brokenLock, brokenLease, brokenLog,
    ]

    /// The hub drops one delivery in 200: the watch validators must say so.
    public static var brokenHub: Profile {
        var p = Profile(name: "broken-hub", target: .vigil, seconds: 6)
        p.serverFailpoints = "hubSkipEvent=0.5%return"
        p.expect = ["watch.reliable"]
        return p
    }

    /// Lock and Campaign answered without waiting their turn now and then: the lock validator
    /// must say so.
    public static var brokenLock: Profile {
        var p = Profile(name: "broken-lock", target: .vigil, seconds: 6)
        p.serverFailpoints = "lockIgnoreQueue=30%return"
        p.expect = ["lock.safety", "election.safety"]
        return p
    }

    /// Expired leases are never revoked: the lease validator must say so.
    public static var brokenLease: Profile {
        var p = Profile(name: "broken-lease", target: .vigil, seconds: 8)
        p.serverFailpoints = "leaseBeforeRevoke=return"
        p.expect = ["lease"]
        return p
    }

    /// Some log records are acknowledged but never written, then the server is killed: the lost
    /// writes must show.
    public static var brokenLog: Profile {
        var p = Profile(name: "broken-log", target: .vigil, seconds: 8, faults: [FaultPlan(at: 4, .kill)])
        p.serverFailpoints = "walWrite=2%return"
        p.expect = ["durability"]
        return p
    }

    /// `make robustness`: every failpoint in turn, kills, pauses, longer runs, the mirror over a
    /// 3-member cluster, and etcd.
    public static var all: [Profile] {
        func fp(_ name: String, _ spec: String, trigger: String = "", hold: Int = 4000) -> FaultPlan.Kind {
            .failpoint(name: name, spec: spec, holdMilliseconds: hold, trigger: trigger)
        }
        let crashes: [(String, FaultPlan.Kind)] = [
            ("wal-before-write", fp("walBeforeWrite", "10%panic")),
            ("wal-after-write", fp("walAfterWrite", "10%panic")),
            ("wal-enospc", fp("walWrite", "1*error(ENOSPC)")),
            ("checkpoint-midway", fp("checkpointMidway", "panic")),
            ("checkpoint-before-commit", fp("checkpointBeforeCommit", "panic")),
            ("compaction-midway", fp("compactionMidway", "30%panic")),
            ("defrag-before-swap", fp("defragBeforeSwap", "panic", trigger: "defrag")),
            ("snapshot-mid-send", fp("snapshotMidSend", "panic", trigger: "snapshot")),
            ("lease-before-revoke", fp("leaseBeforeRevoke", "panic", hold: 8000)),
            ("watch-slow-send", fp("watchBeforeSend", "2%sleep(100)", hold: 5000)),
        ]
        var out = crashes.map { name, kind in
            Profile(
                name: "failpoint-" + name, target: .vigil, seconds: 30,
                faults: [FaultPlan(at: 5, kind), FaultPlan(at: 15, kind), FaultPlan(at: 24, .kill)])
        }
        out.append(
            Profile(
                name: "vigil-kills", target: .vigil, seconds: 60,
                faults: stride(from: 6.0, to: 56, by: 8).map { FaultPlan(at: $0, .kill) }))
        out.append(
            Profile(
                name: "vigil-pauses", target: .vigil, seconds: 40,
                faults: [
                    FaultPlan(at: 5, .pause(milliseconds: 4500)), FaultPlan(at: 18, .pause(milliseconds: 1000)),
                    FaultPlan(at: 28, .pause(milliseconds: 6000)),
                ]))
        out.append(
            Profile(
                name: "etcd-kills-pauses", target: .etcd, seconds: 40,
                faults: [
                    FaultPlan(at: 6, .kill), FaultPlan(at: 14, .pause(milliseconds: 4500)), FaultPlan(at: 24, .kill),
                    FaultPlan(at: 32, .pause(milliseconds: 1500)),
                ]))
        out.append(
            Profile(
                name: "mirror-members", target: .mirror, seconds: 40,
                faults: [
                    FaultPlan(at: 6, .kill), FaultPlan(at: 14, .pause(milliseconds: 4500)), FaultPlan(at: 24, .kill),
                ]))
        return out + [brokenHub, brokenLock, brokenLease, brokenLog]
    }
}
