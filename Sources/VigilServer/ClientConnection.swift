import EventLoop
import GRPC
import HTTP1
import HTTP2

/// One client connection. The first bytes decide its protocol: the HTTP/2 client preface goes to
/// an nghttp2 session serving gRPC (and plain h2c requests); anything else is HTTP/1.1. Both hand
/// plain requests to the server's `PlainEndpoints`.
final class ClientConnection: TCPConnectionDelegate {
    private enum Mode {
        case sniffing([UInt8])
        case http2(HTTP2Session, GRPCConnection, HTTP2PlainRequests)
        case http1(HTTP1Connection)
    }

    private static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    /// Stop pulling frames from nghttp2 while this many bytes wait in the socket.
    private static let writeHighWater = 4 << 20
    /// The shared output buffer keeps up to this much capacity between flushes.
    private static let outputKeep = 8 << 20

    private let tcp: TCPConnection
    private unowned let server: VigilServerCore
    private var mode: Mode = .sniffing([])
    private var flushScheduled = false

    init(tcp: TCPConnection, server: VigilServerCore) {
        self.tcp = tcp
        self.server = server
    }

    func start() { tcp.start(delegate: self) }

    func close() { tcp.close() }

    func connection(_ c: TCPConnection, received bytes: UnsafeRawBufferPointer) {
        server.loop.assertInLoop()
        switch mode {
        case .sniffing(var seen):
            seen.append(contentsOf: bytes)
            let n = min(seen.count, Self.preface.count)
            if seen[0..<n].elementsEqual(Self.preface[0..<n]) {
                if seen.count < Self.preface.count {
                    mode = .sniffing(seen)
                    return
                }
                startHTTP2(with: seen)
            } else {
                let h1 = HTTP1Connection(handler: server.plain, transport: self, maxBodyBytes: server.plainBodyLimit)
                mode = .http1(h1)
                seen.withUnsafeBytes { h1.receive($0) }
                armReadTimer(h1)
            }
        case .http2(let session, _, _):
            session.receive(bytes)
            flush()
        case .http1(let h1):
            h1.receive(bytes)
            armReadTimer(h1)
        }
    }

    private var readTimer: LoopTimer?
    private var pipelineTimer: LoopTimer?

    /// A request that has begun must arrive in full within the read timeout (from its first bytes).
    private func armReadTimer(_ h1: HTTP1Connection) {
        if !h1.midRequest {
            readTimer?.cancel()
            readTimer = nil
        } else if readTimer == nil {
            readTimer = LoopTimer(loop: server.loop, timeoutMs: server.config.httpReadTimeoutMs) {
                [weak self, weak h1] in
                self?.readTimer = nil
                h1?.timeOut()
            }
        }
    }

    private func startHTTP2(with bytes: [UInt8]) {
        let session = HTTP2Session(settings: server.http2Settings)
        session.onStreamRefused = { [unowned server] in server.metrics.count(.tooManyStreams) }
        let flush = { [unowned self] in scheduleFlush() }
        let plain = HTTP2PlainRequests(
            session: session, handler: server.plain, maxBodyBytes: server.plainBodyLimit, needsFlush: flush)
        let grpc = GRPCConnection(
            session: session, maxMessageBytes: server.limits.maxReceiveMessageBytes,
            route: { [unowned server] path in server.route(path) }, others: plain, needsFlush: flush)
        mode = .http2(session, grpc, plain)
        _ = bytes.withUnsafeBytes { session.receive($0) }
        flush()
    }

    private func scheduleFlush() {
        guard !flushScheduled else { return }
        flushScheduled = true
        server.loop.atEndOfTurn { [weak self] in
            guard let self else { return }
            flushScheduled = false
            flush()
        }
    }

    /// Writes what nghttp2 has ready, unless the socket is already backed up.
    private func flush() {
        guard case .http2(let session, _, _) = mode, !tcp.isClosed else { return }
        if tcp.queuedWriteBytes < Self.writeHighWater {
            // One output buffer for every connection (all on the loop): what the socket takes at
            // once leaves from it, and only what it does not is copied for a queued write.
            server.output.removeAll(keepingCapacity: server.output.capacity <= Self.outputKeep)
            session.takeOutput(appendingTo: &server.output)
            server.output.withUnsafeBytes { tcp.write(copying: $0) }
        }
        if !session.isAlive || session.failed { tcp.close() }
    }

    func connectionWritable(_ c: TCPConnection) {
        if case .http1(let h1) = mode { h1.writable() } else { flush() }
    }

    func connectionClosed(_ c: TCPConnection) {
        switch mode {
        case .http2(_, let grpc, let plain):
            grpc.connectionClosed()
            plain.connectionClosed()
        case .http1(let h1): h1.connectionClosed()
        case .sniffing: break
        }
        readTimer?.cancel()
        readTimer = nil
        pipelineTimer?.cancel()
        pipelineTimer = nil
        mode = .sniffing([])
        server.connectionClosed(self)
    }
}

extension ClientConnection: HTTP1Transport {
    func write(_ bytes: [UInt8], close: Bool) {
        tcp.write(bytes)
        if close { tcp.close() }
    }

    var queuedBytes: Int { tcp.queuedWriteBytes }

    func nextTurn(_ work: @escaping () -> Void) {
        pipelineTimer = LoopTimer(loop: server.loop, timeoutMs: 0) { [weak self] in
            self?.pipelineTimer = nil
            work()
        }
    }
}
