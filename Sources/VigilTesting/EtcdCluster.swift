import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A real etcd cluster of `size` members on loopback (Debian's `etcd`), for the mirror's tests
/// and benchmarks: each member can be killed, paused, resumed and restarted.
public final class EtcdCluster: @unchecked Sendable {
    public struct Member: Sendable {
        public let name: String
        public let clientPort: Int
        public let peerPort: Int
        public var endpoint: String { "127.0.0.1:\(clientPort)" }
    }

    public let members: [Member]
    public let dir: String
    /// The test certificates' directory when the members serve clients over TLS (client
    /// certificates required).
    public let tlsDir: String?
    /// etcdctl's flags for the members (the CA and a client certificate with TLS).
    public var clientFlags: [String] { tlsDir.map { TestCertificates.clientFlags($0) } ?? [] }
    private var processes: [ChildProcess?]
    private let binary: String
    private let extraArgs: [String]

    /// All members' client endpoints, comma-separated (etcd's `--endpoints`).
    public var endpoints: String { members.map(\.endpoint).joined(separator: ",") }

    /// Starts the members and waits until the cluster answers a linearizable read.
    /// - Parameter args: more flags for every member.
    public init(size: Int = 3, tls: Bool = false, args: [String] = []) throws {
        extraArgs = args
        guard let etcd = which("etcd") else {
            throw ProcessFailure(description: "etcd is installed by scripts/install-deps.sh --test")
        }
        binary = etcd
        tlsDir = tls ? try TestCertificates.directory() : nil
        dir = NSTemporaryDirectory() + "vigil-etcd-cluster-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        members = (1...size).map { Member(name: "m\($0)", clientPort: freePort(), peerPort: freePort()) }
        processes = Array(repeating: nil, count: size)
        for i in members.indices { try start(i, fresh: true) }
        try waitHealthy()
    }

    /// Starts member `i` (again, on its data directory, after a kill or stop).
    public func start(_ i: Int, fresh: Bool = false) throws {
        let m = members[i]
        let scheme = tlsDir == nil ? "http" : "https"
        let initial = members.map { "\($0.name)=http://127.0.0.1:\($0.peerPort)" }.joined(separator: ",")
        let log = open("\(dir)/\(m.name).log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        let null = devNull()
        defer {
            close(log)
            close(null)
        }
        processes[i] = try ChildProcess(
            binary,
            [
                "--name", m.name, "--data-dir", "\(dir)/\(m.name)",
                "--listen-client-urls", "\(scheme)://127.0.0.1:\(m.clientPort)",
                "--advertise-client-urls", "\(scheme)://127.0.0.1:\(m.clientPort)",
                "--listen-peer-urls", "http://127.0.0.1:\(m.peerPort)",
                "--initial-advertise-peer-urls", "http://127.0.0.1:\(m.peerPort)",
                "--initial-cluster", initial, "--initial-cluster-token", "vigil-test",
                "--initial-cluster-state", fresh ? "new" : "existing",
                "--heartbeat-interval", "50", "--election-timeout", "500", "--unsafe-no-fsync",
            ] + (tlsDir.map { TestCertificates.serverFlags($0) } ?? []) + extraArgs,
            environment: environment(with: ["ETCD_UNSUPPORTED_ARCH": ""]), stdin: null, stdout: log, stderr: log)
    }

    /// Kills member `i` (SIGKILL).
    public func kill(_ i: Int) {
        processes[i]?.signal(SIGKILL)
        _ = processes[i]?.wait(timeout: 10)
        processes[i] = nil
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) member `i`.
    public func pause(_ i: Int) { processes[i]?.signal(SIGSTOP) }
    public func resume(_ i: Int) { processes[i]?.signal(SIGCONT) }

    /// The index of the current leader, asked of the members.
    public func leader() throws -> Int? {
        let r = try runCommand(
            which("etcdctl") ?? "/usr/bin/etcdctl",
            ["--endpoints", endpoints, "endpoint", "status", "-w", "json", "--command-timeout", "2s"] + clientFlags,
            environment: ["ETCDCTL_API": "3"])
        for (i, m) in members.enumerated() {
            // Each status line names its endpoint, then the leader's id; the member whose own id is the leader's.
            guard let line = r.stdout.components(separatedBy: "},{").first(where: { $0.contains("\"\(m.endpoint)\"") })
            else { continue }
            if let id = Self.number("member_id", line), let leader = Self.number("leader", line), id == leader {
                return i
            }
        }
        return nil
    }

    private static func number(_ field: String, _ s: String) -> UInt64? {
        guard let r = s.range(of: "\"\(field)\":") else { return nil }
        return UInt64(s[r.upperBound...].prefix { $0.isNumber })
    }

    /// Waits until a linearizable read through any member succeeds.
    public func waitHealthy(timeout: Double = 30) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let r = try runCommand(
                which("etcdctl") ?? "/usr/bin/etcdctl",
                ["--endpoints", endpoints, "get", "health-probe", "--command-timeout", "1s"] + clientFlags,
                environment: ["ETCDCTL_API": "3"])
            if r.status == 0 { return }
            usleep(100_000)
        }
        throw ProcessFailure(description: "etcd cluster not healthy after \(timeout)s")
    }

    public func stopAll() {
        for i in processes.indices {
            processes[i]?.signal(SIGCONT)
            processes[i]?.terminate(grace: 5)
            processes[i] = nil
        }
    }

    deinit {
        stopAll()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// `vigil grpc-proxy start` in front of a cluster: a mirror process on a port of its own.
public final class LiveMirror: @unchecked Sendable {
    public let port: Int
    public let dataDir: String
    public var endpoint: String { "127.0.0.1:\(port)" }
    private var process: ChildProcess?
    private let args: [String]
    private let logPath: String

    public init(upstream: String, port: Int? = nil, args: [String] = []) throws {
        self.port = port ?? freePort()
        dataDir = NSTemporaryDirectory() + "vigil-mirror-\(UUID().uuidString)"
        logPath = dataDir + ".log"
        self.args =
            [
                "grpc-proxy", "start", "--endpoints", upstream, "--listen-addr", "127.0.0.1:\(self.port)",
                "--data-dir", dataDir,
            ] + args
        try start()
    }

    public func start() throws {
        process = try startLogging(try vigilBinary(), args, logPath: logPath, truncate: false, what: "vigil mirror")
    }

    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }
    public var pid: Int32? { process?.pid }

    public func stop() {
        process?.terminate(grace: 10)
        process = nil
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(atPath: dataDir)
        try? FileManager.default.removeItem(atPath: logPath)
    }
}
