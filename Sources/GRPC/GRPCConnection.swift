import HTTP2
import SwiftProtobuf

/// Splits a byte stream into gRPC length-prefixed messages (1 byte compressed flag, 4 bytes
/// big-endian length, payload).
public struct MessageFramer {
    public enum Failure: Error, Equatable {
        case compressed
        case tooLarge(Int, max: Int)
    }

    private var buffer: [UInt8] = []
    private var start = 0
    public let maxMessageBytes: Int

    public init(maxMessageBytes: Int) { self.maxMessageBytes = maxMessageBytes }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        buffer.append(contentsOf: bytes)
    }

    /// The next complete message, nil if more bytes are needed.
    public mutating func next() throws(Failure) -> [UInt8]? {
        let available = buffer.count - start
        guard available >= 5 else { return compactIfDrained() }
        let len = try declaredLength(buffer[start..<(start + 5)])
        guard available >= 5 + len else { return nil }
        let msg = Array(buffer[(start + 5)..<(start + 5 + len)])
        start += 5 + len
        _ = compactIfDrained()
        return msg
    }

    /// The payload length a message's 5-byte prefix declares, checked: uncompressed, and within
    /// `maxMessageBytes`.
    private func declaredLength<P: RandomAccessCollection<UInt8>>(_ prefix: P) throws(Failure) -> Int
    where P.Index == Int {
        let at = prefix.startIndex
        if prefix[at] != 0 { throw .compressed }
        let len =
            Int(prefix[at + 1]) << 24 | Int(prefix[at + 2]) << 16 | Int(prefix[at + 3]) << 8 | Int(prefix[at + 4])
        if len > maxMessageBytes { throw .tooLarge(len, max: maxMessageBytes) }
        return len
    }

    private mutating func compactIfDrained() -> [UInt8]? {
        if start == buffer.count {
            // Keep a small buffer for the next message; give back what a burst grew (a
            // long-lived stream must not hold its largest burst for ever).
            buffer.removeAll(keepingCapacity: buffer.capacity <= 1024)
            start = 0
        } else if start > 1 << 16 {
            buffer.removeFirst(start)
            start = 0
        }
        return nil
    }

    /// The message `bytes` holds exactly, when nothing is buffered (the usual case: a small
    /// request in one DATA frame), taken without going through the buffer; nil otherwise (then
    /// `append` and `next`).
    public func whole(_ bytes: UnsafeRawBufferPointer) throws(Failure) -> [UInt8]? {
        guard start == buffer.count, bytes.count >= 5 else { return nil }
        guard try bytes.count == 5 + declaredLength(bytes[0..<5]) else { return nil }
        return Array(UnsafeRawBufferPointer(rebasing: bytes[5...]))
    }

    /// The length of a message's prefix (compressed flag and length).
    public static let prefixLength = 5

    /// Writes the prefix of an uncompressed message of `length` bytes into `p`'s first 5 bytes.
    @inline(__always)
    static func writePrefix(_ length: Int, into p: UnsafeMutableBufferPointer<UInt8>) {
        let n = UInt32(length)
        p[0] = 0
        p[1] = UInt8(n >> 24)
        p[2] = UInt8((n >> 16) & 0xFF)
        p[3] = UInt8((n >> 8) & 0xFF)
        p[4] = UInt8(n & 0xFF)
    }

    /// The 5-byte prefix of an uncompressed message of `length` bytes.
    public static func prefix(_ length: Int) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: prefixLength) { b, n in
            writePrefix(length, into: b)
            n = prefixLength
        }
    }

    /// Frames one message.
    public static func frame(_ payload: [UInt8]) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: prefixLength + payload.count) { b, n in
            writePrefix(payload.count, into: b)
            _ = UnsafeMutableBufferPointer(rebasing: b[prefixLength...]).initialize(from: payload)
            n = prefixLength + payload.count
        }
    }
}

/// What happens to a call, told to the handler that owns it. A call has exactly one handler, set
/// by the router when the call opens and kept until `callEnded`; cross-cutting concerns (metrics,
/// deadlines) wrap the handler rather than replace its callbacks.
///
/// Events arrive on the loop, in order: messages, then at most one half-close, and `callEnded`
/// last, exactly once (whether we finished the call or the peer cancelled it). Drains come only
/// after `notifyWhenDrained()`.
public protocol CallHandler: AnyObject {
    /// A request message arrived.
    func call(_ call: ServerCall, received message: [UInt8])
    /// The client half-closed: no more messages will come.
    func callHalfClosed(_ call: ServerCall)
    /// The responses queued so far have gone to the framing layer (after `notifyWhenDrained()`).
    func callDrained(_ call: ServerCall)
    /// The call is over: `call.finalStatus` says how (a status we sent, or cancelled).
    func callEnded(_ call: ServerCall)
}

extension CallHandler {
    public func callHalfClosed(_ call: ServerCall) {}
    public func callDrained(_ call: ServerCall) {}
    public func callEnded(_ call: ServerCall) {}
}

/// Makes the handler of a call on a method path, or nil for an unknown path (UNIMPLEMENTED).
public typealias CallRouter = (_ path: String) -> ((ServerCall) -> any CallHandler)?

/// Why the gRPC layer itself failed a call (the `cause` of its status).
public enum GRPCCallError: Error, Sendable, Equatable {
    case unknownMethod(String)
    case compressed
    case messageTooLarge(Int, max: Int)

    public var status: GRPCStatus {
        switch self {
        case .unknownMethod(let path): GRPCStatus(.unimplemented, "unknown method \(path)", cause: self)
        case .compressed: GRPCStatus(.unimplemented, "grpc: compressed messages are not supported", cause: self)
        case .messageTooLarge(let n, let max):
            GRPCStatus(.resourceExhausted, "grpc: received message larger than max (\(n) vs. \(max))", cause: self)
        }
    }
}

/// Messages and payload bytes one method's calls carried, counted as they go (etcd's
/// `grpc_server_msg_*_total` and `etcd_network_client_grpc_*_bytes_total`). One per method,
/// shared by its calls; loop-confined.
public final class MessageCounters {
    public var received = 0
    public var sent = 0
    public var receivedBytes = 0
    public var sentBytes = 0
    public init() {}
}

/// One gRPC call on the server: its inbound messages and outbound responses.
/// Everything here happens on the loop.
public final class ServerCall {
    public let path: String
    /// Request metadata (lowercase names), without HTTP/2 pseudo-headers.
    public let metadata: [HeaderField]
    /// Milliseconds from `grpc-timeout`, if the client set one.
    public let timeoutMs: UInt64?
    /// Where this call's messages are counted (set by the server when the call opens).
    public var counters: MessageCounters?
    /// The Common Name of the connection's verified TLS client certificate, if any.
    public var peerCommonName: String? { connection?.peerCommonName }
    let stream: Int32
    weak var connection: GRPCConnection?
    /// The response body's queue, once the headers went out.
    private var queue: HTTP2Session.StreamQueue?
    var framer: MessageFramer
    var headersSent = false
    public private(set) var isFinished = false
    /// The status the call ended with (cancelled if the peer ended it).
    public private(set) var finalStatus: GRPCStatus?
    /// The call's handler, from open to end.
    var handler: (any CallHandler)?

    init(
        path: String, metadata: [HeaderField], timeoutMs: UInt64?, stream: Int32, connection: GRPCConnection,
        maxMessageBytes: Int
    ) {
        self.path = path
        self.metadata = metadata
        self.timeoutMs = timeoutMs
        self.stream = stream
        self.connection = connection
        self.framer = MessageFramer(maxMessageBytes: maxMessageBytes)
    }

    /// The first value of a metadata key.
    public func metadata(_ name: String) -> String? { metadata.first { $0.name == name }?.value }

    /// Sends one response message.
    public func send(_ message: [UInt8]) {
        guard let q = responseQueue() else { return }
        if let c = counters {
            c.sent += 1
            c.sentBytes += message.count
        }
        // The prefix and the payload go as two chunks, so a payload shared by many calls is not copied here.
        q.send(MessageFramer.prefix(message.count))
        q.send(message)
    }

    /// Sends one protobuf response message, serialized behind its prefix (one buffer, no copy).
    public func send(_ message: some SwiftProtobuf.Message) throws {
        sendFramed(try message.framedBytes())
    }

    /// Sends bytes that are already one framed message (length prefix included), as they are:
    /// for a message shared by many calls.
    public func sendFramed(_ framed: [UInt8]) {
        guard let q = responseQueue() else { return }
        if let c = counters {
            c.sent += 1
            c.sentBytes += framed.count - MessageFramer.prefixLength
        }
        q.send(framed)
    }

    /// The body queue, sending the response headers first if they have not gone yet. Sends on it
    /// need no lookup, and the connection hears once per flush that output is waiting.
    @inline(__always)
    private func responseQueue() -> HTTP2Session.StreamQueue? {
        guard !isFinished else { return nil }
        if !headersSent {
            guard let c = connection else { return nil }
            headersSent = true
            queue = c.session.respond(stream, headers: GRPCConnection.responseHeaders, endStream: false)
        }
        return queue
    }

    /// Ends the call with a status (trailers-only if nothing was sent); the handler then hears
    /// `callEnded`.
    public func finish(_ status: GRPCStatus) {
        guard !isFinished, let c = connection else { return }
        isFinished = true
        finalStatus = status
        var trailers = status.code == .ok ? Self.okTrailers : [("grpc-status", String(status.code.rawValue))]
        if !status.message.isEmpty { trailers.append(("grpc-message", status.encodedMessage)) }
        if headersSent {
            c.session.finish(stream, trailers: trailers)
        } else {
            c.session.respond(stream, headers: GRPCConnection.responseHeaders + trailers, endStream: true)
        }
        c.needsFlush()
        ended()
    }

    private static let okTrailers: [HeaderField] = [("grpc-status", "0")]

    private func ended() {
        let h = handler
        handler = nil
        h?.callEnded(self)
    }

    /// Bytes of responses waiting for the peer's flow-control window.
    public var queuedBytes: Int { queue?.bytes ?? 0 }

    /// Asks for one `callDrained` once the queued responses have gone out.
    public func notifyWhenDrained() { connection?.session.notifyWhenDrained(stream) }

    /// The peer ended the call before we finished it.
    func markCancelled() {
        guard !isFinished else { return }
        isFinished = true
        finalStatus = GRPCStatus(.cancelled, "context canceled")
        ended()
    }
}

/// Routes the streams of one HTTP/2 connection: gRPC calls (content type `application/grpc`) to
/// handlers by `:path`; every other stream, whole, to `others` (the JSON gateway over h2c).
public final class GRPCConnection: HTTP2SessionDelegate {
    /// The Common Name of the peer's verified TLS client certificate (set by the transport).
    public var peerCommonName: String?
    public let session: HTTP2Session
    private var calls: [Int32: ServerCall] = [:]
    /// Streams that are not gRPC calls, forwarded to `others`.
    private var otherStreams: Set<Int32> = []
    private let route: CallRouter
    private let maxMessageBytes: Int
    let needsFlush: () -> Void
    private let others: (any HTTP2SessionDelegate)?

    static let responseHeaders: [HeaderField] = [(":status", "200"), ("content-type", "application/grpc")]

    /// - Parameters:
    ///   - route: the handler for a `:path`, or nil (answered UNIMPLEMENTED).
    ///   - maxMessageBytes: inbound messages longer than this fail with RESOURCE_EXHAUSTED.
    ///   - others: where streams that are not gRPC calls go (nil: they are answered 415).
    ///   - needsFlush: called when output is waiting (for messages on a call's stream queue, once
    ///     per `takeOutput`); the owner then writes `session.takeOutput()`.
    public init(
        session: HTTP2Session, maxMessageBytes: Int, route: @escaping CallRouter,
        others: (any HTTP2SessionDelegate)? = nil, needsFlush: @escaping () -> Void
    ) {
        self.session = session
        self.route = route
        self.maxMessageBytes = maxMessageBytes
        self.others = others
        self.needsFlush = needsFlush
        session.delegate = self
        session.onOutputPending = needsFlush
    }

    public func streamHeaders(_ stream: Int32, _ headers: [HeaderField], _ block: HeaderBlock) {
        if otherStreams.contains(stream) { return others?.streamHeaders(stream, headers, block) ?? () }
        guard block == .request else { return }  // client trailers carry nothing we use
        var path = ""
        var contentType = ""
        var timeout: UInt64?
        var metadata: [HeaderField] = []
        metadata.reserveCapacity(headers.count)
        for h in headers {
            switch h.name {
            case ":path": path = h.value
            case "content-type": contentType = h.value
            case "grpc-timeout": timeout = parseGRPCTimeout(h.value)
            default: if !h.name.hasPrefix(":") { metadata.append(h) }
            }
        }
        guard contentType.hasPrefix("application/grpc") else {
            guard let others else {
                session.respond(stream, headers: [(":status", "415")], endStream: true)
                needsFlush()
                return
            }
            otherStreams.insert(stream)
            others.streamHeaders(stream, headers, block)
            return
        }
        let call = ServerCall(
            path: path, metadata: metadata, timeoutMs: timeout, stream: stream, connection: self,
            maxMessageBytes: maxMessageBytes)
        calls[stream] = call
        guard let makeHandler = route(path) else {
            call.finish(GRPCCallError.unknownMethod(path).status)
            return
        }
        let handler = makeHandler(call)
        // A handler that finished its call while being made still hears the end, once.
        if call.isFinished { handler.callEnded(call) } else { call.handler = handler }
    }

    public func streamData(_ stream: Int32, _ data: UnsafeRawBufferPointer) {
        if otherStreams.contains(stream) { return others?.streamData(stream, data) ?? () }
        guard let call = calls[stream], !call.isFinished else { return }
        func deliver(_ msg: [UInt8]) {
            if let c = call.counters {
                c.received += 1
                c.receivedBytes += msg.count
            }
            call.handler?.call(call, received: msg)
        }
        do {
            if let msg = try call.framer.whole(data) { return deliver(msg) }
            call.framer.append(data)
            while let msg = try call.framer.next() {
                deliver(msg)
                if call.isFinished { return }
            }
        } catch {
            switch error {
            case .compressed: call.finish(GRPCCallError.compressed.status)
            case .tooLarge(let n, let max): call.finish(GRPCCallError.messageTooLarge(n, max: max).status)
            }
        }
    }

    public func streamEnded(_ stream: Int32) {
        if otherStreams.contains(stream) { return others?.streamEnded(stream) ?? () }
        guard let call = calls[stream], !call.isFinished else { return }
        call.handler?.callHalfClosed(call)
    }

    public func streamClosed(_ stream: Int32) {
        if otherStreams.remove(stream) != nil { return others?.streamClosed(stream) ?? () }
        guard let call = calls.removeValue(forKey: stream) else { return }
        call.markCancelled()
    }

    public func streamDrained(_ stream: Int32) {
        if otherStreams.contains(stream) { return others?.streamDrained(stream) ?? () }
        if let call = calls[stream], !call.isFinished { call.handler?.callDrained(call) }
    }

    /// Called when the connection is gone: every open call ends (cancelled).
    public func connectionClosed() {
        let open = calls
        calls.removeAll()
        otherStreams.removeAll()
        for (_, call) in open { call.markCancelled() }
    }
}
