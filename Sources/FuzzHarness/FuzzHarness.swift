import COpenSSL
import Foundation
import GRPC
import Logging
import VigilServer
import VigilTesting

/// What the fuzz targets run on one input (`Fuzz/main.swift` calls these from libFuzzer; the
/// corpus tests call them too). Each must survive any bytes: a trap here is a bug found.
public enum FuzzHarness {
    public static let targets = ["connection", "framing", "tls"]

    /// Runs target `name` on `input`; false for an unknown target.
    @discardableResult
    public static func run(_ name: String, _ input: [UInt8]) -> Bool {
        switch name {
        case "connection": connection(input)
        case "framing": framing(input)
        case "tls": tls(input)
        default: return false
        }
        return true
    }

    /// The files named, directories expanded (sorted).
    public static func files(_ paths: [String]) -> [String] {
        var files: [String] = []
        for path in paths {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
                files += ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted().map {
                    path + "/" + $0
                }
            } else {
                files.append(path)
            }
        }
        return files
    }

    // MARK: connection

    /// One server for the whole run: state (keys, leases, users) builds up across inputs, as it
    /// would with many clients.
    nonisolated(unsafe) private static var server: (VigilServer, Int, tls: Int)?

    private static func port() -> Int { ports().plain }

    /// The in-process server's plaintext and TLS (self-signed, `--auto-tls`) ports.
    private static func ports() -> (plain: Int, tls: Int) {
        if let (_, p, t) = server { return (p, t) }
        var c = Configuration()
        c.dataDir = NSTemporaryDirectory() + "vigil-fuzz-\(getpid())"
        c.listenClientURLs = ["http://127.0.0.1:0", "https://127.0.0.1:0"]
        c.clientTLS.autoTLS = true
        c.tlsHandshakeTimeoutMs = 1000
        c.unsafeNoFsync = true
        c.httpReadTimeoutMs = 200
        var logger = Logger(label: "vigil-fuzz")
        logger.logLevel = .critical
        let s = VigilServer(configuration: c, logger: logger)
        guard let started = try? s.start(), started.count == 2 else { fatalError("fuzz server did not start") }
        atexit { try? FileManager.default.removeItem(atPath: NSTemporaryDirectory() + "vigil-fuzz-\(getpid())") }
        server = (s, started[0], started[1])
        return (started[0], started[1])
    }

    /// `input` as everything a client sends on one connection (HTTP/1.1 or HTTP/2 with gRPC), then
    /// the client's end of stream; reads what comes back until the server closes or goes quiet.
    @discardableResult
    public static func connection(_ input: [UInt8]) -> [UInt8] {
        exchange(port: port(), input, quietMs: 100)
    }

    /// Sends `input`, half-closes, and collects the answer (until close, or `quietMs` of silence).
    public static func exchange(port: Int, _ input: [UInt8], quietMs: Int32) -> [UInt8] {
        let fd = loopbackSocket(port: port)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        var sent = 0
        var halfClosed = false
        while true {
            // Write while reading, so that a server answering early never deadlocks us.
            var p = pollfd(fd: fd, events: Int16(POLLIN) | (halfClosed ? 0 : Int16(POLLOUT)), revents: 0)
            guard poll(&p, 1, quietMs) > 0 else { break }
            if p.revents & Int16(POLLIN) != 0 {
                let n = recv(fd, &buf, buf.count, 0)
                if n <= 0 { break }
                out += buf[0..<n]
            }
            if !halfClosed && p.revents & Int16(POLLOUT) != 0 {
                let n = input.withUnsafeBytes {
                    send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
                }
                if n > 0 { sent += n }
                if n < 0 && errno != EAGAIN { break }
                if sent == input.count {
                    shutdown(fd, Int32(SHUT_WR))
                    halfClosed = true
                }
            }
            if p.revents & Int16(POLLHUP | POLLERR) != 0 { break }
        }
        return out
    }

    // MARK: tls

    /// The TLS listener: with the first byte even, the rest is sent raw (handshake records, or
    /// anything); odd, a real TLS session is made first and the rest goes through it as a
    /// client's plaintext (the connection target's inputs, over TLS).
    @discardableResult
    public static func tls(_ input: [UInt8]) -> [UInt8] {
        guard let mode = input.first else { return [] }
        let rest = Array(input.dropFirst())
        if mode & 1 == 0 { return exchange(port: ports().tls, rest, quietMs: 100) }
        return tlsExchange(port: ports().tls, rest, quietMs: 100)
    }

    nonisolated(unsafe) private static let clientContext: OpaquePointer = {
        let c = SSL_CTX_new(TLS_client_method())!
        SSL_CTX_set_verify(c, SSL_VERIFY_NONE, nil)
        let alpn: [UInt8] = [2] + Array("h2".utf8) + [8] + Array("http/1.1".utf8)
        _ = SSL_CTX_set_alpn_protos(c, alpn, UInt32(alpn.count))
        return c
    }()

    /// A blocking OpenSSL client: handshake, send `input`, read until the server closes or goes
    /// quiet for `quietMs`.
    public static func tlsExchange(port: Int, _ input: [UInt8], quietMs: Int32) -> [UInt8] {
        let fd = loopbackSocket(port: port)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard let ssl = SSL_new(clientContext) else { return [] }
        defer { SSL_free(ssl) }
        SSL_set_fd(ssl, fd)
        guard SSL_connect(ssl) == 1 else {
            ERR_clear_error()
            return []
        }
        var sent = 0
        while sent < input.count {
            let n = input.withUnsafeBytes { SSL_write(ssl, $0.baseAddress! + sent, Int32(min(16384, $0.count - sent))) }
            if n <= 0 { break }
            sent += Int(n)
        }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 16384)
        while true {
            if SSL_pending(ssl) == 0 {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, quietMs) > 0 else { break }
            }
            let n = SSL_read(ssl, &buf, Int32(buf.count))
            if n <= 0 { break }
            out += buf[0..<Int(n)]
        }
        ERR_clear_error()
        return out
    }

    // MARK: framing

    /// gRPC message framing fed in chunks whose sizes come from the input itself: every message
    /// taken out must be whole and within the limit, and a refusal must stay a refusal.
    public static func framing(_ input: [UInt8]) {
        guard let first = input.first else { return }
        let max = 1 << 16
        var framer = MessageFramer(maxMessageBytes: max)
        let chunk = Int(first) + 1
        var i = 1
        while i < input.count {
            let end = Swift.min(input.count, i + chunk)
            input[i..<end].withUnsafeBytes { framer.append($0) }
            i = end
            do {
                while let m = try framer.next() {
                    precondition(m.count <= max, "framer gave a message over the limit")
                }
            } catch {
                return
            }
        }
    }
}
