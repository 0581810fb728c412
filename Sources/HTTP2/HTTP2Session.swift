import CNghttp2

#if canImport(Glibc)
import Glibc
#endif

/// An HTTP/2 header field as text.
public typealias HeaderField = (name: String, value: String)

/// Which kind of header block arrived.
public enum HeaderBlock: Sendable {
    /// Request headers opening a stream (server side).
    case request
    /// Response headers (client side).
    case response
    /// Trailers (either side).
    case trailers
}

/// What a session reports about its streams, on the loop.
public protocol HTTP2SessionDelegate: AnyObject {
    /// A complete header block arrived: a request opening a stream, a response, or trailers.
    func streamHeaders(_ stream: Int32, _ headers: [HeaderField], _ block: HeaderBlock)
    /// A chunk of request body arrived (a DATA frame payload or part of it).
    func streamData(_ stream: Int32, _ data: UnsafeRawBufferPointer)
    /// The peer half-closed the stream (END_STREAM).
    func streamEnded(_ stream: Int32)
    /// The stream is gone (finished, reset or connection ending); nothing more comes for it.
    func streamClosed(_ stream: Int32)
    /// Everything queued for `stream` has been handed to the framing layer.
    func streamDrained(_ stream: Int32)
}

/// Limits announced to the peer in our SETTINGS frame.
public struct HTTP2Settings {
    /// etcd's `--max-concurrent-streams` (default: no limit, math.MaxUint32).
    public var maxConcurrentStreams: UInt32 = .max
    public var initialWindowSize: UInt32 = 1 << 20
    public var connectionWindowSize: Int32 = 16 << 20
    public var maxHeaderListSize: UInt32 = 64 << 10
    public init() {}
}

/// An HTTP/2 session over nghttp2 (server or client side): bytes in, stream events out; stream writes in,
/// bytes out (`takeOutput()`). It does no I/O of its own. Outbound data is queued per stream and
/// released to the wire only as the peer's flow-control windows allow, so a peer that does not
/// read makes `queuedBytes(stream)` grow, which callers use as their back-pressure signal.
public final class HTTP2Session {
    private var session: OpaquePointer?
    public weak var delegate: (any HTTP2SessionDelegate)?
    /// The peer opened a stream past `maxConcurrentStreams` and it was refused (REFUSED_STREAM).
    public var onStreamRefused: (() -> Void)?

    private struct Inbound {
        var headers: [HeaderField]
        var block: HeaderBlock
        init(block: HeaderBlock) {
            self.block = block
            headers = []
            headers.reserveCapacity(10)
        }
    }
    /// The strings of headers seen before, reused when they come again.
    private var names = HeaderStrings()
    /// A stream's queued body: a class, so that queuing and reading mutate it in place (a struct
    /// in a dictionary would be copied, chunks and all, on every change). `respond` hands it out
    /// so that a caller sending many messages on one stream (a watch) reaches it without a lookup;
    /// nghttp2's read callback finds it through the data source pointer. Its fields are touched
    /// for every frame and only from the loop, so they skip run-time exclusivity checks.
    public final class StreamQueue {
        /// Valid while the queue is open: the session closes its queues before it goes.
        unowned(unsafe) let session: HTTP2Session
        /// The stream's id (a client stream's is set once its request is submitted).
        var id: Int32
        @exclusivity(unchecked) var chunks: [[UInt8]] = []
        /// Index of the first chunk not fully sent (chunks before it are dropped in batches).
        @exclusivity(unchecked) var head = 0
        @exclusivity(unchecked) var offset = 0
        /// Bytes queued that the peer's window has not let out yet (0 once the stream closed).
        @exclusivity(unchecked) public internal(set) var bytes = 0
        @exclusivity(unchecked) var trailers: [HeaderField]? = nil
        @exclusivity(unchecked) var deferred = false
        /// Someone wants `streamDrained` when the queue empties.
        @exclusivity(unchecked) var notifyDrained = false
        /// The stream closed (or the session went away): nothing more is queued.
        @exclusivity(unchecked) public internal(set) var closed = false
        var isEmpty: Bool { head == chunks.count }
        init(session: HTTP2Session, stream: Int32) {
            self.session = session
            self.id = stream
        }

        /// Queues body bytes (dropped once the stream closed) and tells the session's owner, once
        /// per flush, that output is waiting.
        public func send(_ bytes: [UInt8]) {
            guard !closed else { return }
            session.send(bytes, to: self)
            session.outputPending()
        }

        func close() {
            closed = true
            chunks = []
            head = 0
            offset = 0
            bytes = 0
        }
    }
    private typealias Outbound = StreamQueue
    private var inbound: [Int32: Inbound] = [:]
    @exclusivity(unchecked) private var outbound: [Int32: Outbound] = [:]
    /// Set when a protocol error made the session unusable.
    public private(set) var failed = false

    public enum Role { case server, client }

    public init(role: Role = .server, settings: HTTP2Settings = HTTP2Settings()) {
        var cbs: OpaquePointer?
        nghttp2_session_callbacks_new(&cbs)
        defer { nghttp2_session_callbacks_del(cbs) }
        nghttp2_session_callbacks_set_on_begin_headers_callback(cbs) { _, frame, ud in
            let me = HTTP2Session.from(ud)
            let hd = frame!.pointee.hd
            guard hd.type == UInt8(NGHTTP2_HEADERS.rawValue) else { return 0 }
            switch frame!.pointee.headers.cat {
            case NGHTTP2_HCAT_REQUEST: me.inbound[hd.stream_id] = Inbound(block: .request)
            case NGHTTP2_HCAT_RESPONSE: me.inbound[hd.stream_id] = Inbound(block: .response)
            case NGHTTP2_HCAT_HEADERS: me.inbound[hd.stream_id] = Inbound(block: .trailers)
            default: break
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_header_callback(cbs) { _, frame, name, namelen, value, valuelen, _, ud in
            let me = HTTP2Session.from(ud)
            let sid = frame!.pointee.hd.stream_id
            guard me.inbound[sid] != nil else { return 0 }
            let field = me.names.field(
                name: UnsafeBufferPointer(start: name, count: namelen),
                value: UnsafeBufferPointer(start: value, count: valuelen))
            me.inbound[sid]!.headers.append(field)
            return 0
        }
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs) { _, frame, ud in
            let me = HTTP2Session.from(ud)
            let hd = frame!.pointee.hd
            let endStream = hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
            if hd.type == UInt8(NGHTTP2_HEADERS.rawValue), let inb = me.inbound[hd.stream_id] {
                me.inbound[hd.stream_id] = nil
                me.delegate?.streamHeaders(hd.stream_id, inb.headers, inb.block)
            }
            if endStream, hd.type == UInt8(NGHTTP2_HEADERS.rawValue) || hd.type == UInt8(NGHTTP2_DATA.rawValue) {
                me.delegate?.streamEnded(hd.stream_id)
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_frame_send_callback(cbs) { _, frame, ud in
            let f = frame!.pointee
            if f.hd.type == UInt8(NGHTTP2_RST_STREAM.rawValue),
                f.rst_stream.error_code == NGHTTP2_REFUSED_STREAM.rawValue
            {
                HTTP2Session.from(ud).onStreamRefused?()
            }
            return 0
        }
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs) { _, _, sid, data, len, ud in
            let me = HTTP2Session.from(ud)
            me.delegate?.streamData(sid, UnsafeRawBufferPointer(start: data, count: len))
            return 0
        }
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs) { _, sid, _, ud in
            let me = HTTP2Session.from(ud)
            me.inbound[sid] = nil
            me.outbound.removeValue(forKey: sid)?.close()
            me.delegate?.streamClosed(sid)
            return 0
        }
        var opt: OpaquePointer?
        nghttp2_option_new(&opt)
        nghttp2_option_set_max_send_header_block_length(opt, 64 << 10)
        if role == .server {
            // nghttp2's HTTP checks reset any stream whose pseudo-headers it finds invalid, with no
            // callback to overrule it; grpc-go sends `:authority` as the endpoint it was given
            // (`http://127.0.0.1:2379` for etcdctl's maintenance calls), which etcd accepts. The
            // layers above read only `:method`, `:path` and the content type, and answer a
            // request missing them themselves.
            nghttp2_option_set_no_http_messaging(opt, 1)
        }
        defer { nghttp2_option_del(opt) }
        let ud = Unmanaged.passUnretained(self).toOpaque()
        switch role {
        case .server: nghttp2_session_server_new2(&session, cbs, ud, opt)
        case .client: nghttp2_session_client_new2(&session, cbs, ud, opt)
        }

        var iv = [
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue),
                value: settings.maxConcurrentStreams),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue),
                value: settings.initialWindowSize),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue),
                value: settings.maxHeaderListSize),
        ]
        if role == .server {
            // RFC 9218 scheduling instead of RFC 7540's priority tree: nghttp2 then neither keeps
            // closed streams for the tree nor walks it when a stream's data is resumed (a watch
            // stream is resumed for every event). gRPC clients send no priorities; `respond`
            // makes every response incremental so that streams share the connection fairly.
            iv.append(
                nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_NO_RFC7540_PRIORITIES.rawValue), value: 1))
        }
        nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &iv, iv.count)
        nghttp2_session_set_local_window_size(
            session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, settings.connectionWindowSize)
    }

    deinit {
        for q in outbound.values { q.close() }
        nghttp2_session_del(session)
    }

    private static func from(_ ud: UnsafeMutableRawPointer?) -> HTTP2Session {
        Unmanaged<HTTP2Session>.fromOpaque(ud!).takeUnretainedValue()
    }

    /// Feeds bytes read from the peer. Returns false on a protocol error (the session then
    /// queues a GOAWAY; write out `takeOutput()` and close).
    @discardableResult
    public func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard !failed, let base = bytes.baseAddress else { return !failed }
        let rc = nghttp2_session_mem_recv(session, base.assumingMemoryBound(to: UInt8.self), bytes.count)
        if rc < 0 {
            failed = true
            nghttp2_session_terminate_session(session, UInt32(NGHTTP2_PROTOCOL_ERROR.rawValue))
            return false
        }
        return true
    }

    /// Serialises all frames that may be sent now. Empty when there is nothing to send.
    public func takeOutput() -> [UInt8] {
        var out: [UInt8] = []
        takeOutput(appendingTo: &out)
        return out
    }

    /// Called the first time output is queued through a `StreamQueue` after `takeOutput`: the
    /// owner should flush soon.
    public var onOutputPending: (() -> Void)?
    private var outputSignalled = false

    func outputPending() {
        if !outputSignalled {
            outputSignalled = true
            onOutputPending?()
        }
    }

    /// Serialises all frames that may be sent now onto the end of `out` (a buffer the caller
    /// reuses, so that a busy connection does not allocate its output on every flush).
    public func takeOutput(appendingTo out: inout [UInt8]) {
        outputSignalled = false
        while true {
            var p: UnsafePointer<UInt8>?
            let n = nghttp2_session_mem_send(session, &p)
            if n <= 0 { break }
            out.append(contentsOf: UnsafeBufferPointer(start: p, count: n))
        }
    }

    /// True while the session wants to keep the connection (not after GOAWAY was exchanged).
    public var isAlive: Bool {
        nghttp2_session_want_read(session) != 0 || nghttp2_session_want_write(session) != 0
    }

    /// Sends response headers. With `endStream` the stream ends with them (e.g. gRPC
    /// "trailers-only"); otherwise a body follows through `send(_:on:)` (or `send(_:to:)` with the
    /// queue returned here) and `finish(_:trailers:)`.
    @discardableResult
    public func respond(_ stream: Int32, headers: [HeaderField], endStream: Bool) -> StreamQueue? {
        Self.withNV(headers) { nva, n in
            if endStream {
                nghttp2_submit_response(session, stream, nva, n, nil)
                return nil
            }
            let q = Outbound(session: self, stream: stream)
            outbound[stream] = q
            // Response bodies take turns frame by frame (RFC 9218 "incremental"): without it a
            // long body, a Snapshot say, would keep the connection to itself until it ended.
            var turns = nghttp2_extpri(urgency: 3, inc: 1)
            nghttp2_session_change_extpri_stream_priority(session, stream, &turns, 1)
            var provider = Self.provider(q)
            nghttp2_submit_response(session, stream, nva, n, &provider)
            return q
        }
    }

    /// A data provider reading from `q` (kept alive by `outbound` while nghttp2 may call it).
    private static func provider(_ q: Outbound) -> nghttp2_data_provider {
        var provider = nghttp2_data_provider()
        provider.source.ptr = Unmanaged.passUnretained(q).toOpaque()
        provider.read_callback = { _, _, buf, length, flags, source, ud in
            Unmanaged<Outbound>.fromOpaque(source!.pointee.ptr)._withUnsafeGuaranteedRef { q in
                Unmanaged<HTTP2Session>.fromOpaque(ud!)._withUnsafeGuaranteedRef { me in
                    me.read(q, into: buf!, length: length, flags: flags!)
                }
            }
        }
        return provider
    }

    /// Opens a client stream with request headers; the body follows through `send(_:on:)` and
    /// `finish(_:trailers: [])`. Returns the stream id (negative on failure).
    public func request(headers: [HeaderField]) -> Int32 {
        // The stream id is known only after the submit; the queue learns it then.
        let q = Outbound(session: self, stream: 0)
        var provider = Self.provider(q)
        let sid = Self.withNV(headers) { nva, n in nghttp2_submit_request(session, nil, nva, n, &provider, nil) }
        if sid > 0 {
            q.id = sid
            outbound[sid] = q
        }
        return sid
    }

    /// Queues body bytes on a stream opened by `request` or answered with `respond(endStream: false)`.
    public func send(_ bytes: [UInt8], on stream: Int32) {
        guard let o = outbound[stream] else { return }
        send(bytes, to: o)
    }

    /// Queues body bytes on the stream whose queue `respond` returned (no lookup).
    public func send(_ bytes: [UInt8], to o: StreamQueue) {
        guard !bytes.isEmpty, !o.closed else { return }
        o.bytes += bytes.count
        o.chunks.append(bytes)
        resume(o)
    }

    @inline(__always)
    private func resume(_ o: Outbound) {
        if o.deferred {
            o.deferred = false
            nghttp2_session_resume_data(session, o.id)
        }
    }

    /// Ends the stream after the queued body, with trailers if any (empty: END_STREAM on DATA).
    public func finish(_ stream: Int32, trailers: [HeaderField]) {
        guard let o = outbound[stream] else { return }
        o.trailers = trailers
        resume(o)
    }

    /// Resets a stream (RST_STREAM) with an HTTP/2 error code.
    public func reset(_ stream: Int32, code: UInt32 = UInt32(NGHTTP2_CANCEL.rawValue)) {
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, code)
    }

    /// Asks for one `streamDrained` call once `stream`'s queue has gone out (at once if it is empty).
    public func notifyWhenDrained(_ stream: Int32) {
        guard let o = outbound[stream] else { return }
        if o.isEmpty {
            delegate?.streamDrained(stream)
        } else {
            o.notifyDrained = true
        }
    }

    /// Bytes queued on `stream` that the peer's window has not let out yet.
    public func queuedBytes(_ stream: Int32) -> Int { outbound[stream]?.bytes ?? 0 }

    private func read(
        _ o: Outbound, into buf: UnsafeMutablePointer<UInt8>, length: Int,
        flags: UnsafeMutablePointer<UInt32>
    ) -> Int {
        guard !o.closed else { return Int(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue) }
        let sid = o.id
        var written = 0
        while written < length, !o.isEmpty {
            let n = o.chunks[o.head].withUnsafeBufferPointer { src in
                let n = min(length - written, src.count - o.offset)
                (buf + written).update(from: src.baseAddress! + o.offset, count: n)
                return n
            }
            written += n
            o.offset += n
            if o.offset == o.chunks[o.head].count {
                o.head += 1
                o.offset = 0
            }
        }
        if o.isEmpty {
            o.chunks.removeAll(keepingCapacity: o.chunks.count <= 64)
            o.head = 0
        } else if o.head >= 256 {
            o.chunks.removeFirst(o.head)
            o.head = 0
        }
        o.bytes -= written
        let drained = o.isEmpty
        if drained, let trailers = o.trailers {
            // Empty trailers: end the stream with the last DATA frame.
            flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
            if !trailers.isEmpty {
                flags.pointee |= NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
                Self.withNV(trailers) { nva, n in _ = nghttp2_submit_trailer(session, sid, nva, n) }
            }
            return written
        }
        if written == 0 {
            o.deferred = true
            return Int(NGHTTP2_ERR_DEFERRED.rawValue)
        }
        if drained && o.notifyDrained {
            o.notifyDrained = false
            delegate?.streamDrained(sid)
        }
        return written
    }

    private static func withNV<R>(_ headers: [HeaderField], _ body: (UnsafePointer<nghttp2_nv>, Int) -> R) -> R {
        // nghttp2 copies names and values during submit, so they only need to live for the call:
        // on the stack (most header blocks are a few dozen bytes).
        var total = 0
        for h in headers { total += h.name.utf8.count + h.value.utf8.count }
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: max(total, 1)) { buf in
            withUnsafeTemporaryAllocation(of: nghttp2_nv.self, capacity: max(headers.count, 1)) { nvs in
                var off = 0
                for (i, h) in headers.enumerated() {
                    let name = buf.baseAddress! + off
                    off += copyUTF8(h.name, to: buf.baseAddress! + off)
                    let value = buf.baseAddress! + off
                    off += copyUTF8(h.value, to: buf.baseAddress! + off)
                    nvs[i] = nghttp2_nv(
                        name: name, value: value, namelen: value - name, valuelen: buf.baseAddress! + off - value,
                        flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue))
                }
                return body(UnsafePointer(nvs.baseAddress!), headers.count)
            }
        }
    }

    /// Copies `s`'s UTF-8 bytes to `to`; returns how many.
    @inline(__always)
    private static func copyUTF8(_ s: String, to: UnsafeMutablePointer<UInt8>) -> Int {
        var s = s
        return s.withUTF8 { u in
            if let b = u.baseAddress { to.update(from: b, count: u.count) }
            return u.count
        }
    }
}

/// Header names and values as Strings, reusing the String of a header seen before: a gRPC
/// connection sends the same few dozen bytes of headers on every call (path, content type, user
/// agent), and a String of more than 15 bytes is an allocation each time it is made.
struct HeaderStrings {
    private static let known: [String] = [
        ":method", ":scheme", ":path", ":authority", ":status", "content-type", "te", "user-agent",
        "grpc-timeout", "grpc-status", "grpc-message", "grpc-encoding", "grpc-accept-encoding", "token",
        "authorization",
    ]
    /// The last value seen for each known name.
    private var values = [String](repeating: "", count: known.count)

    mutating func field(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) -> HeaderField {
        for (i, k) in Self.known.enumerated() where Self.equal(k, name) {
            if !Self.equal(values[i], value) { values[i] = String(decoding: value, as: UTF8.self) }
            return (k, values[i])
        }
        return (String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
    }

    private static func equal(_ s: String, _ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        s.utf8.withContiguousStorageIfAvailable { u in
            u.count == bytes.count && (u.isEmpty || memcmp(u.baseAddress!, bytes.baseAddress!, u.count) == 0)
        } ?? s.utf8.elementsEqual(bytes)
    }
}
