import EtcdProto
import Foundation
import GRPC
import Testing
import VigilClient
import VigilCore
import VigilTesting

/// Abusive clients against the real binary: each time the server keeps serving others and its
/// memory stays bounded.
@Suite(.serialized) struct AbuseTests {
    let server: LiveServer
    let ctl: Etcdctl

    init() throws {
        signal(SIGPIPE, SIG_IGN)  // this test writes to sockets the server closes
        server = try LiveServer(args: ["--unsafe-no-fsync", "--http-read-timeout", "0.5"])
        ctl = try Etcdctl(endpoint: server.endpoint)
    }

    /// A TCP connection to the server, or -1.
    func connect() -> Int32 { loopbackSocket(port: server.port) }

    func stillServes() throws {
        // A sanitized server may still be finishing the abuser's work (10× slower): give it time.
        var attempts = Int(sanitizerFactor)
        while attempts > 1, try ctl.run(["put", "alive", "yes"]).status != 0 { attempts -= 1 }
        _ = try ctl.ok("put", "alive", "yes")
        #expect(try ctl.ok("get", "alive") == "alive\nyes\n")
    }

    @Test func aClientLeavingMidResponseDoesNotKillTheServer() throws {
        // Large responses, then the client resets the connection without reading them.
        var put = Etcdserverpb_PutRequest()
        put.key = Data("large".utf8)
        put.value = Data(repeating: 0x78, count: 300_000)
        _ = try BlockingClient(port: server.port).call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self)
            .get()
        for _ in 0..<5 {
            let fd = connect()
            var req = ""
            for _ in 0..<20 {
                let body = #"{"key":"bGFyZ2U="}"#
                req += "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
            }
            _ = Array(req.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            usleep(50_000)
            var l = linger(l_onoff: 1, l_linger: 0)  // close with RST
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
            close(fd)
        }
        usleep(200_000)
        #expect(server.pid.map { kill($0, 0) == 0 } == true, "the server is still running")
        try stillServes()
    }

    @Test func garbageInsteadOfAPreface() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            let junk = (0..<Int.random(in: 1...4096, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            _ = try rawExchange(port: server.port, junk, timeout: 1)
        }
        // Something that starts like the HTTP/2 preface and then is not.
        _ = try rawExchange(
            port: server.port, Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + [UInt8](repeating: 0xFF, count: 64),
            timeout: 1)
        try stillServes()
    }

    @Test func connectionsClosedMidMessage() throws {
        // Half a gRPC request: preface, SETTINGS, then a HEADERS frame cut short, then close.
        for cut in [10, 24, 30, 40] {
            let fd = connect()
            #expect(fd >= 0)
            var bytes = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
            bytes += [0, 0, 0, 4, 0, 0, 0, 0, 0]  // empty SETTINGS
            bytes += [0, 0, 40, 1, 4, 0, 0, 0, 1] + [UInt8](repeating: 0x82, count: 40)  // HEADERS, 40 bytes promised
            _ = bytes.prefix(cut + 24).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        // Half an HTTP/1.1 body, then close.
        let fd = connect()
        let half = Array("POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"key\":".utf8)
        _ = half.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        try stillServes()
    }

    @Test func slowlorisGetsTimedOut() throws {
        let fd = connect()
        #expect(fd >= 0)
        defer { close(fd) }
        // A header a byte at a time, slower than the read timeout allows.
        let request = Array("GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ".utf8)
        var closedEarly = false
        for b in request + Array(repeating: UInt8(ascii: "a"), count: 40) {
            var byte = b
            if write(fd, &byte, 1) != 1 {
                closedEarly = true
                break
            }
            usleep(30_000)
        }
        var buf = [UInt8](repeating: 0, count: 512)
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let n = read(fd, &buf, buf.count)
        let answer = n > 0 ? String(decoding: buf[0..<n], as: UTF8.self) : ""
        #expect(closedEarly || answer.hasPrefix("HTTP/1.1 408"), "got \(answer)")
        try stillServes()
    }

    @Test func oversizedHeadersAreRefused() throws {
        let huge = String(repeating: "h", count: 200_000)
        let out = try rawExchange(
            port: server.port, Array("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: \(huge)\r\n\r\n".utf8), timeout: 3)
        #expect(out.hasPrefix("HTTP/1.1 4"), "got \(out.prefix(40))")
        try stillServes()
    }

    @Test func thousandsOfIdleConnections() throws {
        let before = residentKiB(pid: server.pid!)
        var fds: [Int32] = []
        // Stay under the test process's own descriptor limit.
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        let n = min(2000, Int(limit.rlim_cur) - 100)
        for _ in 0..<n {
            let fd = connect()
            if fd >= 0 { fds.append(fd) }
        }
        defer { for fd in fds { close(fd) } }
        #expect(fds.count == n)
        // Checked with our own client: spawning etcdctl with thousands of descriptors open trips
        // a bug in Foundation's Process under the address sanitizer.
        var put = Etcdserverpb_PutRequest()
        put.key = Data("idle".utf8)
        put.value = Data("ok".utf8)
        #expect(
            (try? BlockingClient(port: server.port).call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self)
                .get()) != nil)
        let growth = residentKiB(pid: server.pid!) - before
        #expect(Double(growth) < 64 * 1024 * sanitizerFactor, "\(n) idle connections grew RSS by \(growth) KiB")
    }

    @Test func aFloodOfWatchCreatesOnOneStream() throws {
        let c = try BlockingClient(port: server.port)
        let s = WatchStreamClient(c.connection)
        for i in 0..<20_000 { s.create("flood/\(i)") }
        c.runUntil(seconds: 60) { s.responses.count >= 20_000 }
        #expect(s.responses.count == 20_000)
        #expect(s.responses.allSatisfy { $0.created })
        try stillServes()
        // The stream going away frees every watcher.
        s.call.cancel()
        c.runUntil(seconds: 0.5) { false }
        func watchers() throws -> Bool {
            try rawExchange(
                port: server.port, Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8)
            )
            .contains("etcd_debugging_mvcc_watcher_total 0")
        }
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, try !watchers() { usleep(100_000) }
        #expect(try watchers())
    }

    func metrics(_ port: Int) throws -> String {
        try rawExchange(port: port, Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
    }

    /// An HTTP/2 frame: 9-byte header, then the payload.
    static func frame(type: UInt8, flags: UInt8, stream: UInt32, _ payload: [UInt8]) -> [UInt8] {
        let n = payload.count
        var out: [UInt8] = [UInt8(n >> 16), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF), type, flags]
        out += withUnsafeBytes(of: stream.bigEndian) { Array($0) }
        return out + payload
    }

    /// HPACK literal header fields without indexing, new names (short strings only).
    static func hpack(_ headers: [(String, String)]) -> [UInt8] {
        var out: [UInt8] = []
        for (name, value) in headers {
            out += [0x00, UInt8(name.utf8.count)]
            out += Array(name.utf8)
            out.append(UInt8(value.utf8.count))
            out += Array(value.utf8)
        }
        return out
    }

    /// A client that ignores the advertised stream limit and opens 50 watch streams at once: the
    /// ones past `--max-concurrent-streams` are refused (RST_STREAM REFUSED_STREAM), counted in
    /// /metrics, and other clients are served.
    @Test func moreConcurrentStreamsThanTheLimit() throws {
        let limited = try LiveServer(args: ["--unsafe-no-fsync", "--max-concurrent-streams", "10"])
        var bytes = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + Self.frame(type: 4, flags: 0, stream: 0, [])
        let block = Self.hpack([
            (":method", "POST"), (":scheme", "http"), (":path", EtcdMethod.watch.path),
            (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        // END_HEADERS; each stream stays open.
        for i in 0..<50 { bytes += Self.frame(type: 1, flags: 0x4, stream: UInt32(2 * i + 1), block) }
        let fd = loopbackSocket(port: limited.port)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == bytes.count)
        // Read frames until 40 refusals came (or a timeout).
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var input: [UInt8] = []
        var refused = 0
        var buf = [UInt8](repeating: 0, count: 65536)
        while refused < 40 {
            let n = read(fd, &buf, buf.count)
            if n <= 0 { break }
            input += buf[0..<n]
            refused = 0
            var i = 0
            while i + 9 <= input.count {
                let len = Int(input[i]) << 16 | Int(input[i + 1]) << 8 | Int(input[i + 2])
                guard i + 9 + len <= input.count else { break }
                if input[i + 3] == 3, len == 4, input[i + 12] == 7 { refused += 1 }  // RST_STREAM, REFUSED_STREAM
                i += 9 + len
            }
        }
        #expect(refused == 40)
        #expect(try metrics(limited.port).contains(#"vigil_requests_refused_total{reason="too_many_streams"} 40"#))
        let other = try Etcdctl(endpoint: limited.endpoint)
        #expect(try other.ok("put", "k", "v") == "OK\n")
    }

    /// Requests just over the size limit and txns with too many operations get etcd's errors and
    /// are counted by reason in /metrics.
    @Test func limitRefusalsAreCountedInMetrics() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let c = try BlockingClient(port: server.port)
        var put = Etcdserverpb_PutRequest()
        put.key = Data("big".utf8)
        put.value = Data(repeating: 0x61, count: 1_572_864)  // just over, with the key and framing
        #expect(
            c.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self).failureMessage
                == "etcdserver: request is too large")
        var txn = Etcdserverpb_TxnRequest()
        for i in 0..<129 {
            var op = Etcdserverpb_RequestOp()
            var r = Etcdserverpb_RangeRequest()
            r.key = Data("k\(i)".utf8)
            op.requestRange = r
            txn.success.append(op)
        }
        #expect(
            c.call(EtcdMethod.txn.path, txn, as: Etcdserverpb_TxnResponse.self).failureMessage
                == "etcdserver: too many operations in txn request")
        // The gateway counts the same way.
        let body = #"{"key":"YmlnMg==","value":""# + String(repeating: "YWFh", count: 530_000) + #""}"#
        let gw = try rawExchange(
            port: server.port,
            Array(
                "POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
                    .utf8),
            timeout: 5 * sanitizerFactor)
        #expect(gw.contains("etcdserver: request is too large"))
        let m = try metrics(server.port)
        #expect(
            m.contains(#"vigil_requests_refused_total{reason="request_too_large"} 2"#),
            "\(m.split(separator: "\n").filter { $0.contains("refused") })")
        #expect(m.contains(#"vigil_requests_refused_total{reason="too_many_txn_ops"} 1"#))
        #expect(m.contains(#"vigil_requests_refused_total{reason="too_many_streams"} 0"#))
        _ = try Etcdctl(endpoint: server.endpoint).ok("put", "still", "serving")
    }
}

extension Result where Failure == GRPCStatus {
    var failureMessage: String? {
        if case .failure(let s) = self { return s.message }
        return nil
    }
}
