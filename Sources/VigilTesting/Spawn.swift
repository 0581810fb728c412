import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A child process started with `posix_spawn`, for the tests' servers and tools.
///
/// Foundation's `Process` is not used: its `run()` walks `/proc/self/fd` in the parent and was
/// seen to crash (a `memcpy` past its buffer) while other tests started processes at the same
/// time. `posix_spawn` asks nothing of the parent's state, and the child gets exactly the file
/// descriptors given to it: stdin, stdout and stderr, with every other descriptor closed
/// (`posix_spawn_file_actions_addclosefrom_np`), default signal handlers and an empty signal mask
/// (test runners block some signals).
public final class ChildProcess: @unchecked Sendable {
    public let pid: pid_t
    private let lock = NSLock()
    private var status: Int32?

    /// Starts `executable` with `arguments` and the given standard descriptors (which the child
    /// gets as 0, 1 and 2; the caller keeps and closes its own copies).
    public init(
        _ executable: String, _ arguments: [String], environment: [String: String], stdin: Int32, stdout: Int32,
        stderr: Int32
    ) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (fd, target) in [(stdin, Int32(0)), (stdout, 1), (stderr, 2)] {
            posix_spawn_file_actions_adddup2(&actions, fd, target)
        }
        guard let closeFrom = Self.addCloseFrom else {
            throw ProcessFailure(
                description: "posix_spawn_file_actions_addclosefrom_np is missing (glibc 2.34+ needed)")
        }
        _ = closeFrom(&actions, 3)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
        }
        var child = pid_t()
        let rc = posix_spawn(&child, executable, &actions, &attributes, argv, envp)
        guard rc == 0 else {
            throw ProcessFailure(description: "cannot start \(executable): \(String(cString: strerror(rc)))")
        }
        pid = child
    }

    private typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32

    /// glibc declares it only for _GNU_SOURCE, which Swift's Glibc module does not define.
    private static let addCloseFrom: AddCloseFrom? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else {
            return nil
        }
        return unsafeBitCast(sym, to: AddCloseFrom.self)
    }()

    /// Reaps the child if it has exited; returns its wait status then. Call with `lock` held.
    private func reap() -> Int32? {
        if let status { return status }
        var s: Int32 = 0
        let r = waitpid(pid, &s, WNOHANG)
        if r == pid {
            status = s
        } else if r < 0 && errno == ECHILD {
            status = 0x7F  // reaped elsewhere: gone, cause unknown (read as signal 127)
        }
        return status
    }

    private func poll() -> Int32? { lock.withLock { reap() } }

    public var isRunning: Bool { poll() == nil }

    /// The exit code (128 + the signal for a child killed by one), once it has exited.
    public var exitCode: Int32? {
        guard let s = poll() else { return nil }
        let signal = s & 0x7F
        return signal == 0 ? (s >> 8) & 0xFF : 128 + signal
    }

    /// Waits up to `timeout` seconds for the child to exit; returns whether it did.
    @discardableResult
    public func wait(timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while isRunning {
            if Date() >= deadline { return false }
            usleep(5000)
        }
        return true
    }

    /// Sends `signal` to the child, if it still runs (never to a reaped pid, which may be reused).
    public func signal(_ signal: Int32) {
        lock.withLock { if reap() == nil { _ = kill(pid, signal) } }
    }

    /// SIGTERM, then SIGKILL after `grace` seconds; waits until it is gone.
    public func terminate(grace: Double = 2) {
        signal(SIGTERM)
        if !wait(timeout: grace) {
            signal(SIGKILL)
            wait(timeout: 30)
        }
    }
}

/// A pipe whose two ends are closed on exec (the child gets one end through dup2 only; children
/// close every other descriptor anyway, so the moment before FD_CLOEXEC is set does not matter).
struct Pipe2 {
    let read: Int32
    let write: Int32

    init() throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else {
            throw ProcessFailure(description: "pipe2: \(String(cString: strerror(errno)))")
        }
        read = fds[0]
        write = fds[1]
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    }
}

/// Opens /dev/null (for a child's stdin), closed on exec.
func devNull() -> Int32 { open("/dev/null", O_RDWR | O_CLOEXEC) }

/// The environment of this process with `changes` applied.
func environment(with changes: [String: String]) -> [String: String] {
    var env = ProcessInfo.processInfo.environment
    for (k, v) in changes { env[k] = v }
    return env
}

/// Writes `input` to `inputFD` (then closes it) while reading `fds` until each reaches end of
/// file, or `deadline`; returns what each gave. Nothing blocks: a child that stops reading its
/// input or never ends its output only runs into the deadline.
func exchange(
    input: [UInt8], to inputFD: Int32, readFrom fds: [Int32], until deadline: Date
) -> (
    data: [[UInt8]], complete: Bool
) {
    ignoreSIGPIPE
    var out = [[UInt8]](repeating: [], count: fds.count)
    var open = Set(fds.indices)
    var buf = [UInt8](repeating: 0, count: 65536)
    var sent = 0
    var writer: Int32 = inputFD
    _ = fcntl(writer, F_SETFL, fcntl(writer, F_GETFL) | O_NONBLOCK)
    func closeWriter() {
        if writer >= 0 { close(writer) }
        writer = -1
    }
    if input.isEmpty { closeWriter() }
    defer { closeWriter() }
    while !open.isEmpty {
        let left = deadline.timeIntervalSinceNow
        if left <= 0 { return (out, false) }
        var polls = open.sorted().map { pollfd(fd: fds[$0], events: Int16(POLLIN), revents: 0) }
        if writer >= 0 { polls.append(pollfd(fd: writer, events: Int16(POLLOUT), revents: 0)) }
        let n = Glibc.poll(&polls, nfds_t(polls.count), Int32(min(left, 1) * 1000))
        if n < 0 && errno != EINTR { return (out, false) }
        for p in polls where p.revents != 0 {
            if p.fd == writer {
                let w = input.withUnsafeBytes { write(writer, $0.baseAddress! + sent, $0.count - sent) }
                if w > 0 { sent += w }
                // Done, or the child closed its input (EPIPE): either way no more to give.
                if sent == input.count || (w < 0 && errno != EAGAIN && errno != EINTR) { closeWriter() }
                continue
            }
            let i = fds.firstIndex(of: p.fd)!
            let got = read(p.fd, &buf, buf.count)
            if got > 0 {
                out[i] += buf[0..<got]
            } else if got == 0 || (errno != EINTR && errno != EAGAIN) {
                open.remove(i)
            }
        }
    }
    return (out, true)
}

/// Writes to a pipe whose reader has gone fail with EPIPE instead of killing the test process.
let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()
