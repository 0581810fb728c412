import Foundation
import VigilTesting

#if canImport(Glibc)
import Glibc
#endif

/// What a run drives.
public enum TargetKind: String, Codable, Sendable, CaseIterable {
    /// The `vigil` binary (debug builds have the failpoints).
    case vigil
    /// Debian's etcd 3.4, one member: the validators must pass there too.
    case etcd
    /// `vigil grpc-proxy start` in front of a 3-member etcd cluster; faults hit the members.
    case mirror
}

/// A fault, at a time into the run.
public struct FaultPlan: Codable, Sendable {
    public enum Kind: Codable, Sendable {
        /// SIGKILL, then a restart on the same data directory.
        case kill
        /// SIGSTOP for this long, then SIGCONT.
        case pause(milliseconds: Int)
        /// A restart with `VIGIL_FAILPOINTS=<name>=<spec>`; a panic there crashes it (then it
        /// restarts without), a sleep runs for `holdMilliseconds`. `trigger` makes it fire:
        /// "defrag" or "snapshot" calls those, "" waits for traffic to reach it.
        case failpoint(name: String, spec: String, holdMilliseconds: Int, trigger: String)
    }
    public var at: Double
    public var kind: Kind
    public init(at: Double, _ kind: Kind) {
        self.at = at
        self.kind = kind
    }
}

/// The server under test and its faults. Faults run on their own thread while the traffic's loop
/// runs; what they did is recorded with the times.
final class ServerUnderTest: @unchecked Sendable {
    let kind: TargetKind
    private var vigil: LiveServer?
    private var cluster: EtcdCluster?
    private var mirror: LiveMirror?
    private let lock = NSLock()
    private var faults: [FaultRecord] = []
    private var restarts: [Int64] = []
    private var random: SeededRandom
    /// Server flags of every target: periodic progress notifications every second.
    static let progressInterval = ["--experimental-watch-progress-notify-interval", "1s"]

    init(kind: TargetKind, failpoints: String?, seed: UInt64) throws {
        self.kind = kind
        random = SeededRandom(seed: seed ^ 0x5eed)
        switch kind {
        case .vigil:
            let s = try LiveServer(args: Self.progressInterval, startNow: false)
            try s.start(environment: failpoints.map { ["VIGIL_FAILPOINTS": $0] } ?? [:])
            vigil = s
        case .etcd:
            cluster = try EtcdCluster(size: 1, args: Self.progressInterval)
        case .mirror:
            let c = try EtcdCluster(size: 3, args: Self.progressInterval)
            cluster = c
            mirror = try LiveMirror(upstream: c.endpoints)
        }
    }

    var endpoints: [(host: String, port: Int)] {
        if let vigil { return [("127.0.0.1", vigil.port)] }
        if let mirror { return [("127.0.0.1", mirror.port)] }
        return cluster!.members.map { ("127.0.0.1", $0.clientPort) }
    }

    /// The etcdctl endpoint of the server clients talk to.
    var endpoint: String { "\(endpoints[0].host):\(endpoints[0].port)" }

    var log: String { vigil?.log ?? mirror?.log ?? "" }

    func recorded() -> (faults: [FaultRecord], restarts: [Int64]) { lock.withLock { (faults, restarts) } }

    private func record(_ kind: String, _ detail: String, from start: Int64) {
        let end = monotonicNanos()
        lock.withLock { faults.append(FaultRecord(kind: kind, detail: detail, start: start, end: end)) }
    }

    private func restarted() { lock.withLock { restarts.append(monotonicNanos()) } }

    /// Runs one fault (on the fault thread).
    func inject(_ plan: FaultPlan.Kind) {
        let start = monotonicNanos()
        switch plan {
        case .kill:
            if let vigil {
                vigil.stop(kill: true)
                startVigil(vigil, [:])
                record("kill", "vigil", from: start)
            } else if let cluster {
                let i = Int.random(in: 0..<cluster.members.count, using: &random)
                cluster.kill(i)
                try? cluster.start(i)
                // Leases restart their TTL once a leader serves again (etcd's promotion).
                try? cluster.waitHealthy()
                restarted()
                record("kill", "etcd member \(i)", from: start)
            }
        case .pause(let ms):
            if let vigil {
                vigil.signal(SIGSTOP)
                usleep(UInt32(ms) * 1000)
                vigil.signal(SIGCONT)
                record("pause", "vigil \(ms) ms", from: start)
            } else if let cluster {
                let i = Int.random(in: 0..<cluster.members.count, using: &random)
                cluster.pause(i)
                usleep(UInt32(ms) * 1000)
                cluster.resume(i)
                // A paused leader is replaced: the new one gives every lease its TTL again.
                try? cluster.waitHealthy()
                restarted()
                record("pause", "etcd member \(i) \(ms) ms", from: start)
            }
        case .failpoint(let name, let spec, let hold, let trigger):
            guard let vigil else { return }
            vigil.stop(kill: true)
            let crashedStarting = startVigil(vigil, ["VIGIL_FAILPOINTS": "\(name)=\(spec)"])
            switch trigger {
            case "defrag": _ = try? etcdctl(["--command-timeout=3s", "defrag"])
            case "snapshot":
                _ = try? etcdctl(["--command-timeout=3s", "snapshot", "save", vigil.dataDir + ".snapshot.db"])
            default: break
            }
            let deadline = monotonicNanos() + Int64(hold) * 1_000_000
            while vigil.isRunning && monotonicNanos() < deadline { usleep(20_000) }
            let crashed = crashedStarting || !vigil.isRunning
            vigil.stop(kill: true)
            try? FileManager.default.removeItem(atPath: vigil.dataDir + ".snapshot.db")
            startVigil(vigil, [:])
            record("failpoint", "\(name)=\(spec)" + (crashed ? " (crashed there)" : ""), from: start)
        }
    }

    /// Starts vigil; one that dies while starting (a failpoint on the way) is started again
    /// without failpoints. Returns whether it died while starting.
    @discardableResult
    private func startVigil(_ v: LiveServer, _ environment: [String: String]) -> Bool {
        var env = environment
        env["VIGIL_FAILPOINT_SEED"] = String(random.next())
        do {
            try v.start(environment: env, truncate: false)
            restarted()
            return false
        } catch {
            v.stop(kill: true)
            try? v.start(truncate: false)
            restarted()
            return true
        }
    }

    func etcdctl(_ args: [String]) throws -> CommandResult {
        try Etcdctl(endpoint: endpoint).run(args)
    }

    func shutdown() {
        vigil?.stop(kill: false)
        mirror?.stop()
        cluster?.stopAll()
    }
}
