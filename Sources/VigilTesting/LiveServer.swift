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
public func runCommand(_ executable: String, _ args: [String], stdin: String? = nil, environment: [String: String] = [:],
                       timeout: TimeInterval = 30) throws -> CommandResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    p.environment = env
    let outPipe = Pipe(), errPipe = Pipe(), inPipe = Pipe()
    p.standardOutput = outPipe
    p.standardError = errPipe
    p.standardInput = inPipe
    try p.run()
    if let stdin { inPipe.fileHandleForWriting.write(Data(stdin.utf8)) }
    try inPipe.fileHandleForWriting.close()
    // Read both pipes while the process runs so that neither fills up.
    final class Box: @unchecked Sendable { var data = Data() }
    let out = Box(), err = Box()
    let group = DispatchGroup()
    group.enter()
    DispatchQueue.global().async { out.data = outPipe.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    group.enter()
    DispatchQueue.global().async { err.data = errPipe.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < deadline { usleep(5000) }
    if p.isRunning {
        p.terminate()
        while p.isRunning { usleep(10_000) }
        throw ProcessFailure(description: "\(executable) \(args.joined(separator: " ")) timed out after \(timeout)s")
    }
    group.wait()
    return CommandResult(status: p.terminationStatus, stdout: String(decoding: out.data, as: UTF8.self),
                         stderr: String(decoding: err.data, as: UTF8.self))
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
    public var url: String { "http://127.0.0.1:\(port)" }
    private var process: Process?
    private let extraArgs: [String]
    private let logPath: String

    /// Starts the server and waits for its readiness line.
    public init(dataDir: String? = nil, args: [String] = []) throws {
        port = freePort()
        self.dataDir = dataDir ?? NSTemporaryDirectory() + "vigil-test-\(UUID().uuidString)"
        extraArgs = args
        logPath = self.dataDir + ".log"
        try start()
    }

    /// (Re)starts the process on the same port and data directory.
    public func start() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try vigilBinary())
        p.arguments = ["--data-dir", dataDir, "--listen-client-urls", url, "--log-level", "info"] + extraArgs
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        p.standardOutput = log
        p.standardError = log
        try p.run()
        process = p
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if !p.isRunning { throw ProcessFailure(description: "vigil exited early:\n" + self.log) }
            if self.log.contains("ready to serve client requests") { return }
            usleep(20_000)
        }
        throw ProcessFailure(description: "vigil not ready after 30s:\n" + self.log)
    }

    /// Everything the server logged.
    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// The process id while running.
    public var pid: Int32? { process?.processIdentifier }

    /// Stops with SIGTERM (clean) or SIGKILL, and waits.
    public func stop(kill: Bool = false) {
        guard let p = process else { return }
        process = nil
        guard p.isRunning else { return }
        Foundation.kill(p.processIdentifier, kill ? SIGKILL : SIGTERM)
        // Poll rather than `waitUntilExit()`, which needs a run loop on this thread.
        let deadline = Date().addingTimeInterval(15)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning {
            Foundation.kill(p.processIdentifier, SIGKILL)
            while p.isRunning { usleep(10_000) }
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

/// Runs the real `etcdctl` (v3 API) against a server.
public struct Etcdctl: Sendable {
    public let endpoint: String
    public let binary: String

    public init(endpoint: String) throws {
        guard let b = which("etcdctl") else {
            throw ProcessFailure(description: "etcdctl not found: install the Debian package etcd-client")
        }
        self.endpoint = endpoint
        self.binary = b
    }

    /// Runs `etcdctl --endpoints=… args…`.
    @discardableResult
    public func run(_ args: [String], stdin: String? = nil) throws -> CommandResult {
        try runCommand(binary, ["--endpoints=\(endpoint)", "--dial-timeout=5s", "--command-timeout=10s"] + args,
                       stdin: stdin, environment: ["ETCDCTL_API": "3"])
    }

    /// Runs and returns stdout, failing if the command failed.
    public func ok(_ args: String...) throws -> String {
        let r = try run(args)
        guard r.status == 0 else {
            throw ProcessFailure(description: "etcdctl \(args.joined(separator: " ")) failed (\(r.status)): \(r.output)")
        }
        return r.stdout
    }

    /// Runs a command expected to fail and returns its output.
    public func fails(_ args: String...) throws -> String {
        let r = try run(args)
        guard r.status != 0 else {
            throw ProcessFailure(description: "etcdctl \(args.joined(separator: " ")) unexpectedly succeeded: \(r.output)")
        }
        return r.output
    }
}

/// A command running in the background whose output is collected as it comes
/// (e.g. `etcdctl watch`, which runs until stopped).
public final class BackgroundCommand: @unchecked Sendable {
    private let process = Process()
    private let lock = NSLock()
    private var buffer = Data()
    private let inPipe = Pipe()

    public init(_ executable: String, _ args: [String], environment: [String: String] = [:]) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = args
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        let out = Pipe()
        process.standardOutput = out
        process.standardError = out
        process.standardInput = inPipe
        let handle = out.fileHandleForReading
        try process.run()
        Thread.detachNewThread { [self] in
            while true {
                let d = handle.availableData
                if d.isEmpty { break }
                lock.withLock { buffer.append(d) }
            }
        }
    }

    /// Writes to the command's standard input.
    public func write(_ s: String) { inPipe.fileHandleForWriting.write(Data(s.utf8)) }

    /// Everything printed so far.
    public var output: String { lock.withLock { String(decoding: buffer, as: UTF8.self) } }

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

    public var isRunning: Bool { process.isRunning }

    /// Stops the command and returns its output.
    @discardableResult
    public func stop() -> String {
        if process.isRunning {
            process.terminate()
            let deadline = Date().addingTimeInterval(2)
            while process.isRunning && Date() < deadline { usleep(10_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        usleep(50_000)
        return output
    }

    deinit { stop() }
}

extension Etcdctl {
    /// Starts `etcdctl watch …` (or any long-running etcdctl command) in the background.
    public func background(_ args: [String]) throws -> BackgroundCommand {
        try BackgroundCommand(binary, ["--endpoints=\(endpoint)", "--dial-timeout=5s"] + args,
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
