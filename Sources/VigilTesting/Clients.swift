import EventLoop
import Foundation
import GRPC
import HTTP2
import SwiftProtobuf
import TLS
import VigilClient

/// Runs gRPC calls against a server synchronously, each on a short-lived loop of its own
/// (for tests: the loop runs only inside these calls).
public final class BlockingClient {
    public let loop: EventLoop
    public let connection: GRPCClientConnection

    public let port: Int
    /// Connections opened with `newConnection()`, closed with this client.
    private var extra: [GRPCClientConnection] = []

    /// - Parameters:
    ///   - tls: connect over TLS with these settings (checked against `serverName`).
    public init(port: Int, tls: TLSContext.ClientConfig? = nil, serverName: String? = nil) throws {
        self.port = port
        loop = try EventLoop()
        let context = try tls.map { c throws(TLSError) in try TLSContext.client(c) }
        var result: Result<GRPCClientConnection, any Error>?
        GRPCClientConnection.connect(loop: loop, host: "127.0.0.1", port: port, tls: context, serverName: serverName) {
            result = $0
        }
        while result == nil { loop.runOnce() }
        connection = try result!.get()
    }

    /// Another connection on the same loop.
    public func newConnection() throws -> GRPCClientConnection {
        var result: Result<GRPCClientConnection, any Error>?
        GRPCClientConnection.connect(loop: loop, host: "127.0.0.1", port: port) { result = $0 }
        while result == nil { loop.runOnce() }
        let c = try result!.get()
        extra.append(c)
        return c
    }

    deinit {
        connection.close()
        for c in extra { c.close() }
        loop.shutdown()
        loop.drain()
    }

    /// A raw unary call: request bytes in, response bytes or status out.
    public func unary(_ path: String, _ request: [UInt8], metadata: [HeaderField] = []) -> Result<[UInt8], GRPCStatus> {
        var result: Result<[UInt8], GRPCStatus>?
        let saved = connection.metadata
        connection.metadata += metadata
        connection.unary(path, request) { result = $0 }
        connection.metadata = saved
        runUntil { result != nil }
        return result ?? .failure(GRPCStatus(.deadlineExceeded, "test timeout"))
    }

    /// A typed unary call.
    public func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ request: Req, as: Resp.Type = Resp.self
    ) -> Result<Resp, GRPCStatus> {
        let bytes: [UInt8] = (try? request.serializedBytes()) ?? []
        return unary(path, bytes).flatMap { data in
            Result { try Resp(serializedBytes: data) }.mapError { GRPCStatus(.internal, "decode: \($0)") }
        }
    }

    /// Runs the loop until `done()` or the time limit.
    public func runUntil(seconds: Double = 30, _ done: () -> Bool) {
        loop.run(forAtMost: seconds, until: done)
    }
}

/// A blocking TCP socket connected to 127.0.0.1:`port`, or -1.
public func loopbackSocket(port: Int) -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return -1 }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = UInt16(port).bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    if rc != 0 {
        close(fd)
        return -1
    }
    return fd
}

/// Sends raw bytes to 127.0.0.1:`port` and returns what comes back until the peer closes or
/// `timeout` passes (for HTTP/1.1 tests and hostile-input tests).
public func rawExchange(port: Int, _ bytes: [UInt8], timeout: Double = 5) throws -> String {
    let fd = loopbackSocket(port: port)
    guard fd >= 0 else { throw ProcessFailure(description: "connect to 127.0.0.1:\(port) failed") }
    defer { close(fd) }
    var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &buf, buf.count, 0)
        if n <= 0 { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}
