import EventLoop
import GRPC
import HTTP1
import HTTP2
import HTTPCore
import TLS

/// One client connection, plain or TLS (then the bytes here are the plaintext). The first bytes
/// decide its protocol: the HTTP/2 client preface goes to an nghttp2 session serving gRPC (and
/// plain h2c requests); anything else is HTTP/1.1. Both hand plain requests to the server's
/// `PlainEndpoints`. ALPN needs nothing more: a client that agreed on h2 sends the preface.
final class ClientConnection: ByteStreamDelegate {
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

    private let tcp: any ByteStream
    /// The TLS layer under `tcp`, on an `https://` listener.
    private let tls: TLSStream?
    private unowned let server: VigilServerCore
    private var mode: Mode = .sniffing([])
    private var flushScheduled = false

    /// A `--listen-metrics-urls` connection: only the health and metrics endpoints.
    private let metricsOnly: Bool

    init(stream: any ByteStream, tls: TLSStream?, server: VigilServerCore, metricsOnly: Bool = false) {
        self.tcp = stream
        self.tls = tls
        self.server = server
        self.metricsOnly = metricsOnly
    }

    /// Plain HTTP requests go to the server's endpoints, through etcd's Common Name guard when
    /// the client presented a certificate with one.
    private var plainHandler: any HTTPHandler {
        if metricsOnly { return server.metricsEndpoints }
        guard let cn = tls?.peerCommonName, !cn.isEmpty else { return server.plain }
        if let g = commonNameGuard { return g }
        let g = CommonNameGuard(core: server)
        commonNameGuard = g
        return g
    }
    /// Held here: the HTTP layers keep their handler weakly.
    private var commonNameGuard: CommonNameGuard?

    func start() { tcp.start(delegate: self) }

    func close() { tcp.close() }

    func connection(_ c: any ByteStream, received bytes: UnsafeRawBufferPointer) {
        server.loop.assertInLoop()
        switch mode {
        case .sniffing(var seen):
            if seen.isEmpty && tls == nil && bytes.first == 0x16 {
                // A TLS ClientHello on a plaintext listener.
                server.refused(
                    .tlsOnPlainPort, "a TLS handshake on a plaintext listener (use http://, or serve https://)")
                tcp.close()
                return
            }
            seen.append(contentsOf: bytes)
            let n = min(seen.count, Self.preface.count)
            if seen[0..<n].elementsEqual(Self.preface[0..<n]) {
                if seen.count < Self.preface.count {
                    mode = .sniffing(seen)
                    return
                }
                startHTTP2(with: seen)
            } else {
                let h1 = HTTP1Connection(handler: plainHandler, transport: self, maxBodyBytes: server.plainBodyLimit)
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
            session: session, handler: plainHandler, maxBodyBytes: server.plainBodyLimit, needsFlush: flush)
        let grpc = GRPCConnection(
            session: session, maxMessageBytes: server.limits.maxReceiveMessageBytes,
            route: { [unowned server, metricsOnly] path in metricsOnly ? nil : server.route(path) }, others: plain,
            needsFlush: flush)
        // etcd's CN auth, for gRPC calls without a token (set only with --client-cert-auth).
        grpc.peerCommonName = tls?.peerCommonName
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

    func connectionWritable(_ c: any ByteStream) {
        if case .http1(let h1) = mode { h1.writable() } else { flush() }
    }

    func connectionClosed(_ c: any ByteStream) {
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

/// etcd refuses a gateway request whose verified client certificate carries a Common Name while
/// client-certificate auth and auth are both on: the gateway cannot act as that user, and
/// silently serving it as someone else would be worse.
final class CommonNameGuard: HTTPHandler {
    private unowned let core: VigilServerCore
    private static let refusal = HTTPResponse(
        status: 400, contentType: "text/plain; charset=utf-8",
        body: Array(
            "CommonName of client sending a request against gateway will be ignored and not used as expected\n".utf8))

    init(core: VigilServerCore) { self.core = core }

    func handle(_ request: HTTPRequest, _ out: any HTTPResponder) {
        let path = request.path
        if core.config.clientTLS.clientCertAuth && core.services.auth.enabled
            && (path.hasPrefix("/v3/") || path.hasPrefix("/v3beta/"))
        {
            return out.respond(Self.refusal)
        }
        core.plain.handle(request, out)
    }

    func response(for refusal: HTTPRefusal) -> HTTPResponse { core.plain.response(for: refusal) }
}
