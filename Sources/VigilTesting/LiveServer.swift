import Foundation

/// Errors from driving processes in tests.
public struct ProcessFailure: Error, CustomStringConvertible {
    public let description: String
}

/// The output of a finished command.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    /// stdout and stderr together, for error-text checks.
    public var output: String { stdout + stderr }
}

/// Runs a program to completion with optional standard input, with a time limit.
public func runCommand(
    _ executable: String, _ args: [String], stdin: String? = nil, environment changes: [String: String] = [:],
    timeout: TimeInterval = 30
) throws -> CommandResult {
    let input = try Pipe2(), out = try Pipe2(), err = try Pipe2()
    let child: ChildProcess
    do {
        child = try ChildProcess(
            executable, args, environment: environment(with: changes), stdin: input.read, stdout: out.write,
            stderr: err.write)
    } catch {
        for fd in [input.read, input.write, out.read, out.write, err.read, err.write] { close(fd) }
        throw error
    }
    close(input.read)
    close(out.write)
    close(err.write)
    // Feed stdin and read both pipes together, so that none of them fills up and blocks us.
    let (data, complete) = exchange(
        input: Array((stdin ?? "").utf8), to: input.write, readFrom: [out.read, err.read],
        until: Date().addingTimeInterval(timeout))
    close(out.read)
    close(err.read)
    if !complete || !child.wait(timeout: max(1, timeout / 10)) {
        child.terminate()
        throw ProcessFailure(description: "\(executable) \(args.joined(separator: " ")) timed out after \(timeout)s")
    }
    return CommandResult(
        status: child.exitCode ?? -1, stdout: String(decoding: data[0], as: UTF8.self),
        stderr: String(decoding: data[1], as: UTF8.self))
}

/// Finds an executable on PATH.
public func which(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let path = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
}

/// A free loopback TCP port (bound and released; good enough for tests).
public func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = 0
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            _ = bind(fd, $0, len)
            _ = getsockname(fd, $0, &len)
        }
    }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// The built `vigil` binary, next to the test bundle in the build folder.
public func vigilBinary() throws -> String {
    if let p = ProcessInfo.processInfo.environment["VIGIL_BINARY"] { return p }
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("vigil").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    for build in [".build/debug/vigil", ".build/release/vigil"] {
        let path = FileManager.default.currentDirectoryPath + "/" + build
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    throw ProcessFailure(description: "vigil binary not found: run `swift build` first or set VIGIL_BINARY")
}

/// A `vigil` process on a free loopback port with its own data directory.
public final class LiveServer: @unchecked Sendable {
    public let port: Int
    public let dataDir: String
    public var endpoint: String { "127.0.0.1:\(port)" }
    /// Whether the client URL is `https://` (the caller passes the TLS flags in `args`).
    public let secure: Bool
    public var url: String { (secure ? "https" : "http") + "://127.0.0.1:\(port)" }
    private var process: ChildProcess?
    private let extraArgs: [String]
    private let alsoListen: [String]
    private let logPath: String

    /// Starts the server and waits for its readiness line.
    /// - Parameter alsoListen: more client URLs, after the server's own.
    /// - Parameter startNow: false leaves the first `start` to the caller (to pass an environment).
    public init(
        dataDir: String? = nil, args: [String] = [], secure: Bool = false, alsoListen: [String] = [],
        startNow: Bool = true
    ) throws {
        port = freePort()
        self.secure = secure
        self.alsoListen = alsoListen
        self.dataDir = dataDir ?? NSTemporaryDirectory() + "vigil-test-\(UUID().uuidString)"
        extraArgs = args
        logPath = self.dataDir + ".log"
        if startNow { try start() }
    }

    /// (Re)starts the process on the same port and data directory; `environment` is added to the
    /// test's own (e.g. `VIGIL_FAILPOINTS`). Its log is kept across restarts unless `truncate`.
    public func start(environment: [String: String] = [:], truncate: Bool = true) throws {
        process = try startLogging(
            try vigilBinary(),
            [
                "--data-dir", dataDir, "--listen-client-urls", ([url] + alsoListen).joined(separator: ","),
                "--log-level", "info",
            ] + extraArgs, logPath: logPath, truncate: truncate, what: "vigil", environment: environment)
    }

    /// Sends a signal to the running process (SIGSTOP, SIGCONT…).
    public func signal(_ s: Int32) { process?.signal(s) }

    /// Whether the process is still running (a failpoint may have crashed it).
    public var isRunning: Bool { process?.isRunning ?? false }

    /// Everything the server logged.
    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// The process id while running.
    public var pid: Int32? { process?.pid }

    /// Stops with SIGTERM (clean) or SIGKILL, and waits.
    public func stop(kill: Bool = false) {
        guard let p = process else { return }
        process = nil
        if kill {
            p.signal(SIGKILL)
            p.wait(timeout: 30)
        } else {
            p.terminate(grace: 15)
        }
    }

    public func restart(kill: Bool = false) throws {
        stop(kill: kill)
        try start()
    }

    deinit {
        stop(kill: true)
        try? FileManager.default.removeItem(atPath: dataDir)
        try? FileManager.default.removeItem(atPath: logPath)
    }
}

/// Starts `executable` with its output in `logPath` (emptied first, or appended to) and waits (30 s
/// at most) until it logs that it is ready to serve.
func startLogging(
    _ executable: String, _ args: [String], logPath: String, truncate: Bool, what: String,
    environment changes: [String: String] = [:]
) throws -> ChildProcess {
    let log = open(logPath, O_WRONLY | O_CREAT | (truncate ? O_TRUNC : O_APPEND) | O_CLOEXEC, 0o644)
    let null = devNull()
    defer {
        close(log)
        close(null)
    }
    guard log >= 0 else { throw ProcessFailure(description: "cannot open \(logPath)") }
    // Only what this start logs counts (the file keeps earlier runs' lines).
    let skip = lseek(log, 0, SEEK_END)
    let p = try ChildProcess(
        executable, args, environment: environment(with: changes), stdin: null, stdout: log, stderr: log)
    let text = {
        let all = (try? Data(contentsOf: URL(fileURLWithPath: logPath))) ?? Data()
        return String(decoding: all.dropFirst(Int(max(0, skip))), as: UTF8.self)
    }
    let deadline = Date().addingTimeInterval(30)
    while Date() < deadline {
        if !p.isRunning { throw ProcessFailure(description: "\(what) exited early:\n" + text()) }
        if text().contains("ready to serve client requests") { return p }
        usleep(20_000)
    }
    throw ProcessFailure(description: "\(what) not ready after 30s:\n" + text())
}

/// Runs the real `etcdctl` (v3 API) against a server.
public struct Etcdctl: Sendable {
    public let endpoint: String
    public let binary: String
    /// Flags given to every command (e.g. `--cacert`, `--cert`, `--key`).
    public let flags: [String]

    public init(endpoint: String, flags: [String] = []) throws {
        guard let b = which("etcdctl") else {
            throw ProcessFailure(description: "etcdctl not found: install the Debian package etcd-client")
        }
        self.endpoint = endpoint
        self.binary = b
        self.flags = flags
    }

    /// Runs `etcdctl --endpoints=… args…`.
    @discardableResult
    public func run(_ args: [String], stdin: String? = nil) throws -> CommandResult {
        try runCommand(
            binary, ["--endpoints=\(endpoint)", "--dial-timeout=5s", "--command-timeout=10s"] + flags + args,
            stdin: stdin, environment: ["ETCDCTL_API": "3"])
    }

    /// Runs and returns stdout, failing if the command failed.
    public func ok(_ args: String...) throws -> String {
        let r = try run(args)
        guard r.status == 0 else {
            throw ProcessFailure(
                description: "etcdctl \(args.joined(separator: " ")) failed (\(r.status)): \(r.output)")
        }
        return r.stdout
    }

    /// Runs a command expected to fail and returns its output.
    public func fails(_ args: String...) throws -> String {
        let r = try run(args)
        guard r.status != 0 else {
            throw ProcessFailure(
                description: "etcdctl \(args.joined(separator: " ")) unexpectedly succeeded: \(r.output)")
        }
        return r.output
    }
}

/// A command running in the background whose output is collected as it comes
/// (e.g. `etcdctl watch`, which runs until stopped).
public final class BackgroundCommand: @unchecked Sendable {
    private let child: ChildProcess
    private let lock = NSLock()
    private var input: Int32
    private let reader: Thread

    public init(_ executable: String, _ args: [String], environment changes: [String: String] = [:]) throws {
        let inPipe = try Pipe2(), out = try Pipe2()
        do {
            child = try ChildProcess(
                executable, args, environment: environment(with: changes), stdin: inPipe.read, stdout: out.write,
                stderr: out.write)
        } catch {
            for fd in [inPipe.read, inPipe.write, out.read, out.write] { close(fd) }
            throw error
        }
        close(inPipe.read)
        close(out.write)
        input = inPipe.write
        let fd = out.read
        let collected = Collected()
        reader = Thread {
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = read(fd, &buf, buf.count)
                if n > 0 {
                    collected.append(buf[0..<n])
                } else if n == 0 || errno != EINTR {
                    break
                }
            }
            close(fd)
        }
        self.collected = collected
        reader.start()
    }

    /// Output gathered by the reader thread.
    private final class Collected: @unchecked Sendable {
        private let lock = NSLock()
        private var bytes: [UInt8] = []
        func append(_ b: ArraySlice<UInt8>) { lock.withLock { bytes += b } }
        var text: String { lock.withLock { String(decoding: bytes, as: UTF8.self) } }
    }
    private let collected: Collected

    /// Writes to the command's standard input.
    public func write(_ s: String) {
        ignoreSIGPIPE
        lock.withLock {
            guard input >= 0 else { return }
            let bytes = Array(s.utf8)
            _ = bytes.withUnsafeBytes { Glibc.write(input, $0.baseAddress, $0.count) }
        }
    }

    /// Everything printed so far.
    public var output: String { collected.text }

    /// Waits until the output satisfies `condition`; returns whether it did in time.
    @discardableResult
    public func wait(timeout: Double = 10, until condition: (String) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition(output) { return true }
            usleep(10_000)
        }
        return condition(output)
    }

    public var isRunning: Bool { child.isRunning }

    /// Stops the command and returns its output.
    @discardableResult
    public func stop() -> String {
        child.terminate()
        lock.withLock {
            if input >= 0 { close(input) }
            input = -1
        }
        // The reader ends at end of file, once the child (and any child of its own) is gone.
        let deadline = Date().addingTimeInterval(2)
        while !reader.isFinished && Date() < deadline { usleep(10_000) }
        return output
    }

    deinit { stop() }
}

extension Etcdctl {
    /// Starts `etcdctl watch …` (or any long-running etcdctl command) in the background.
    public func background(_ args: [String]) throws -> BackgroundCommand {
        try BackgroundCommand(
            binary, ["--endpoints=\(endpoint)", "--dial-timeout=5s"] + flags + args,
            environment: ["ETCDCTL_API": "3"])
    }
}

/// How much slower and larger a sanitized build runs: resource bounds in tests are multiplied by
/// it. `scripts/sanitize.sh` sets `VIGIL_SANITIZER` (address: ×3, thread: ×6 — the shadow memory
/// of each sanitizer, and its slowdown); 1 in ordinary runs.
public let sanitizerFactor: Double = {
    switch ProcessInfo.processInfo.environment["VIGIL_SANITIZER"] {
    case "address": 3
    case "thread": 6
    default: 1
    }
}()
