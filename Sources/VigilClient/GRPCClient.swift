import EventLoop
import GRPC
import HTTP2
import SwiftProtobuf
import TLS

/// A gRPC client connection over HTTP/2 (h2c, or h2 over TLS) on the caller's event loop. It is our own client
/// for tests and benchmarks, so it runs on the same kind of loop as the server (no second event
/// loop library). All methods must be called on the loop.
public final class GRPCClientConnection: HTTP2SessionDelegate, ByteStreamDelegate {
    public let loop: EventLoop
    private let tcp: any ByteStream
    private let session = HTTP2Session(role: .client)
    private let authority: String
    private let scheme: String
    private var calls: [Int32: ClientCall] = [:]
    private var flushScheduled = false
    public private(set) var isClosed = false
    /// Metadata sent with every call (e.g. an auth token).
    public var metadata: [HeaderField] = []
    /// When bytes last came from the server (loop milliseconds): a peer that stopped answering
    /// shows here.
    public private(set) var lastReceivedMs: UInt64 = 0
    /// Called once when the connection closes.
    public var onClose: (() -> Void)?

    private init(loop: EventLoop, stream: any ByteStream, authority: String, scheme: String) {
        self.loop = loop
        self.tcp = stream
        self.authority = authority
        self.scheme = scheme
        lastReceivedMs = loop.nowMilliseconds
        session.delegate = self
    }

    /// Connects to `host:port` and completes on the loop. With `tls` (a client context made for
    /// this loop), the connection is TLS: the server's certificate is checked against
    /// `serverName` (default: `host`), and a failed handshake closes the connection (open calls
    /// end with UNAVAILABLE).
    public static func connect(
        loop: EventLoop, host: String, port: Int, tls: TLSContext? = nil, serverName: String? = nil,
        _ completion: @escaping (Result<GRPCClientConnection, any Error>) -> Void
    ) {
        let ready = { (stream: any ByteStream, scheme: String) in
            let c = GRPCClientConnection(loop: loop, stream: stream, authority: "\(host):\(port)", scheme: scheme)
            stream.start(delegate: c)
            // nghttp2 writes the client magic and our SETTINGS on the first send.
            c.flush()
            completion(.success(c))
        }
        if let tls {
            TLSStream.connect(loop: loop, host: host, port: port, context: tls, serverName: serverName) { result in
                switch result {
                case .failure(let e): completion(.failure(e))
                case .success(let stream): ready(stream, "https")
                }
            }
        } else {
            TCPConnection.connect(loop: loop, host: host, port: port) { result in
                switch result {
                case .failure(let e): completion(.failure(e))
                case .success(let tcp): ready(tcp, "http")
                }
            }
        }
    }

    /// Opens a call on `path` (with `metadata` besides the connection's). Messages come to
    /// `onMessage`; `onClose` gets the final status once.
    public func open(
        _ path: String, metadata callMetadata: [HeaderField] = [], onMessage: @escaping ([UInt8]) -> Void,
        onClose: @escaping (GRPCStatus) -> Void
    ) -> ClientCall {
        let call = ClientCall(connection: self, onMessage: onMessage, onClose: onClose)
        guard !isClosed else {
            call.close(GRPCStatus(.unavailable, "connection closed"))
            return call
        }
        let headers: [HeaderField] =
            [
                (":method", "POST"), (":scheme", scheme), (":path", path),
                (":authority", authority), ("content-type", "application/grpc"),
                ("te", "trailers"),
            ] + metadata + callMetadata
        let sid = session.request(headers: headers)
        guard sid > 0 else {
            call.close(GRPCStatus(.unavailable, "cannot open stream"))
            return call
        }
        call.stream = sid
        calls[sid] = call
        scheduleFlush()
        return call
    }

    /// A unary call with raw message bytes.
    @discardableResult
    public func unary(
        _ path: String, _ request: [UInt8], metadata: [HeaderField] = [],
        _ done: @escaping (Result<[UInt8], GRPCStatus>) -> Void
    ) -> ClientCall {
        unary(path, framed: MessageFramer.frame(request), metadata: metadata, done)
    }

    /// A unary call with a request already framed (`framedBytes()`).
    @discardableResult
    public func unary(
        _ path: String, framed request: [UInt8], metadata: [HeaderField] = [],
        _ done: @escaping (Result<[UInt8], GRPCStatus>) -> Void
    ) -> ClientCall {
        var response: [UInt8]?
        let call = open(
            path, metadata: metadata, onMessage: { response = $0 },
            onClose: { status in
                if status.code == .ok, let response {
                    done(.success(response))
                } else if status.code == .ok {
                    done(.failure(GRPCStatus(.internal, "no response message")))
                } else {
                    done(.failure(status))
                }
            })
        call.sendFramed(request)
        call.closeSend()
        return call
    }

    /// A unary call with protobuf messages.
    public func unary<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ request: Req, _ done: @escaping (Result<Resp, GRPCStatus>) -> Void
    ) {
        let framed: [UInt8]
        do { framed = try request.framedBytes() } catch {
            done(.failure(GRPCStatus(.internal, "encode: \(error)")))
            return
        }
        unary(path, framed: framed) { result in
            done(
                result.flatMap { data in
                    do { return .success(try Resp(serializedBytes: data)) } catch {
                        return .failure(GRPCStatus(.internal, "decode: \(error)"))
                    }
                })
        }
    }

    func send(_ bytes: [UInt8], on stream: Int32) {
        session.send(bytes, on: stream)
        scheduleFlush()
    }

    func finish(_ stream: Int32) {
        session.finish(stream, trailers: [])
        scheduleFlush()
    }

    func reset(_ stream: Int32) {
        session.reset(stream)
        scheduleFlush()
    }

    /// Stops reading from the socket, as a client that stops consuming would (for tests).
    public func pauseReading() { tcp.pauseReading() }
    public func resumeReading() { tcp.resumeReading() }

    /// Closes the connection; open calls end with UNAVAILABLE.
    public func close() { tcp.close() }

    private func scheduleFlush() {
        guard !flushScheduled else { return }
        flushScheduled = true
        loop.atEndOfTurn { [weak self] in
            guard let self else { return }
            flushScheduled = false
            flush()
        }
    }

    private func flush() {
        guard !tcp.isClosed else { return }
        let out = session.takeOutput()
        if !out.isEmpty { tcp.write(out) }
    }

    // MARK: ByteStreamDelegate

    public func connection(_ c: any ByteStream, received bytes: UnsafeRawBufferPointer) {
        lastReceivedMs = loop.nowMilliseconds
        if !session.receive(bytes) {
            flush()
            tcp.close()
            return
        }
        flush()
    }

    public func connectionWritable(_ c: any ByteStream) {}

    public func connectionClosed(_ c: any ByteStream) {
        isClosed = true
        let open = calls
        calls.removeAll()
        for (_, call) in open { call.close(GRPCStatus(.unavailable, "connection closed")) }
        let cb = onClose
        onClose = nil
        cb?()
    }

    // MARK: HTTP2SessionDelegate

    public func streamHeaders(_ stream: Int32, _ headers: [HeaderField], _ block: HeaderBlock) {
        guard let call = calls[stream] else { return }
        for h in headers {
            switch h.name {
            case ":status" where h.value != "200":
                call.status = GRPCStatus(.unavailable, "HTTP status \(h.value)")
            case "grpc-status":
                call.status = GRPCStatus(GRPCCode(rawValue: Int(h.value) ?? 2) ?? .unknown, call.status?.message ?? "")
            case "grpc-message":
                let code = call.status?.code ?? .unknown
                call.status = GRPCStatus(code, GRPCStatus.decodeMessage(h.value))
            default: break
            }
        }
    }

    public func streamData(_ stream: Int32, _ data: UnsafeRawBufferPointer) {
        guard let call = calls[stream] else { return }
        do {
            if let m = try call.framer.whole(data) { return call.onMessage?(m) ?? () }
            call.framer.append(data)
            while let m = try call.framer.next() { call.onMessage?(m) }
        } catch {
            call.status = GRPCStatus(.internal, "bad frame: \(error)")
            reset(stream)
        }
    }

    /// The server ended the stream (its trailers came): the call is over, whether or not we
    /// had finished sending (a server that fails a bidirectional call ends it while the client
    /// still has its side open; nghttp2 reports the stream closed only once both sides are).
    public func streamEnded(_ stream: Int32) {
        guard let call = calls.removeValue(forKey: stream) else { return }
        let halfClosed = call.sendClosed
        call.close(call.status ?? GRPCStatus(.internal, "stream ended without status"))
        if !halfClosed { reset(stream) }
    }

    public func streamClosed(_ stream: Int32) {
        guard let call = calls.removeValue(forKey: stream) else { return }
        call.close(call.status ?? GRPCStatus(.unavailable, "stream closed without status"))
    }

    public func streamDrained(_ stream: Int32) {}
}

/// One client call: send messages, half-close, or cancel.
public final class ClientCall {
    /// The connection the call runs on.
    public private(set) weak var connection: GRPCClientConnection?
    var stream: Int32 = 0
    var framer = MessageFramer(maxMessageBytes: Int(Int32.max))
    var status: GRPCStatus?
    var onMessage: (([UInt8]) -> Void)?
    private var onClose: ((GRPCStatus) -> Void)?
    public private(set) var isClosed = false
    /// Whether our side was half-closed (`closeSend`).
    var sendClosed = false

    init(
        connection: GRPCClientConnection, onMessage: @escaping ([UInt8]) -> Void,
        onClose: @escaping (GRPCStatus) -> Void
    ) {
        self.connection = connection
        self.onMessage = onMessage
        self.onClose = onClose
    }

    /// Sends one request message.
    public func send(_ message: [UInt8]) {
        guard !isClosed, stream > 0 else { return }
        connection?.send(MessageFramer.frame(message), on: stream)
    }

    /// Sends one message already framed (`framedBytes()`).
    public func sendFramed(_ framed: [UInt8]) {
        guard !isClosed, stream > 0 else { return }
        connection?.send(framed, on: stream)
    }

    /// Sends one protobuf request message.
    public func send(_ message: some SwiftProtobuf.Message) {
        if let framed = try? message.framedBytes() { sendFramed(framed) }
    }

    /// Half-closes: no more requests.
    public func closeSend() {
        guard !isClosed, stream > 0 else { return }
        sendClosed = true
        connection?.finish(stream)
    }

    /// Cancels the call (RST_STREAM).
    public func cancel() {
        guard !isClosed, stream > 0 else { return }
        connection?.reset(stream)
    }

    func close(_ s: GRPCStatus) {
        guard !isClosed else { return }
        isClosed = true
        let cb = onClose
        onClose = nil
        onMessage = nil
        cb?(s)
    }
}
