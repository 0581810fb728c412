import CLibUV

#if canImport(Glibc)
import Glibc
#endif

/// Accepts TCP connections on one address.
public final class TCPListener {
    private let box = HandleBox<uv_tcp_t>()
    private let loop: EventLoop
    private let onConnection: (TCPConnection) -> Void
    /// The port actually bound (useful with port 0).
    public private(set) var port: Int = 0

    /// - Parameter reusePort: sets `SO_REUSEPORT`, so that several processes share the address
    ///   (the kernel spreads connections over them).
    public init(
        loop: EventLoop, host: String, port: Int, backlog: Int32 = 1024, reusePort: Bool = false,
        onConnection: @escaping (TCPConnection) -> Void
    ) throws {
        self.loop = loop
        self.onConnection = onConnection
        var storage = sockaddr_storage()
        var family = AF_INET
        let ok = withUnsafeMutablePointer(to: &storage) { p -> Int32 in
            p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { uv_ip4_addr(host, Int32(port), $0) }
        }
        if ok != 0 {
            let ok6 = withUnsafeMutablePointer(to: &storage) { p -> Int32 in
                p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { uv_ip6_addr(host, Int32(port), $0) }
            }
            if ok6 != 0 { throw UVError(code: ok6) }
            family = AF_INET6
        }
        // With a family, libuv makes the socket now, so that options can be set before binding.
        try check(uv_tcp_init_ex(loop.raw, box.pointer, UInt32(family)))
        box.bind(self)
        if reusePort {
            var fd: uv_os_fd_t = -1
            var one: Int32 = 1
            if uv_fileno(asHandle(box.pointer), &fd) != 0
                || setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, socklen_t(MemoryLayout<Int32>.size)) != 0
            {
                box.close()
                throw UVError(code: -Glibc.errno)
            }
        }
        do {
            _ = try withUnsafePointer(to: &storage) { p in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { try check(uv_tcp_bind(box.pointer, $0, 0)) }
            }
            try check(
                uv_listen(asStream(box.pointer), backlog) { server, status in
                    guard status >= 0, let server else { return }
                    let me = Unmanaged<TCPListener>.fromOpaque(server.pointee.data).takeUnretainedValue()
                    me.accept()
                })
        } catch {
            box.close()
            throw error
        }
        var name = sockaddr_storage()
        var len = Int32(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &name) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = uv_tcp_getsockname(box.pointer, $0, &len) }
        }
        if Int32(name.ss_family) == AF_INET6 {
            self.port = withUnsafePointer(to: &name) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                    Int(UInt16(bigEndian: $0.pointee.sin6_port))
                }
            }
        } else {
            self.port = withUnsafePointer(to: &name) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
            }
        }
    }

    private func accept() {
        let conn = TCPConnection(loop: loop)
        if uv_accept(asStream(box.pointer), asStream(conn.box.pointer)) == 0 {
            uv_tcp_nodelay(conn.box.pointer, 1)
            onConnection(conn)
        } else {
            conn.close()
        }
    }

    public func close() { box.close() }
}

/// A connection's bytes, plain (`TCPConnection`) or through a layer such as TLS: what protocol
/// code reads from and writes to. Loop-confined.
public protocol ByteStream: AnyObject {
    var isClosed: Bool { get }
    /// Bytes written that the kernel has not taken yet.
    var queuedWriteBytes: Int { get }
    /// Sets the delegate, which the stream keeps alive until closed, and starts reading.
    func start(delegate: any ByteStreamDelegate)
    /// Writes `bytes` (which need not outlive the call), in order with earlier writes.
    func write(copying bytes: UnsafeRawBufferPointer)
    /// Writes `bytes`, in order with earlier writes.
    func write(_ bytes: [UInt8])
    func pauseReading()
    func resumeReading()
    /// Closes the stream; the delegate hears `connectionClosed` once.
    func close()
}

/// Receives bytes from a connection, on the loop.
public protocol ByteStreamDelegate: AnyObject {
    /// `bytes` are valid only during the call (the loop's read buffer): copy what is kept.
    func connection(_ c: any ByteStream, received bytes: UnsafeRawBufferPointer)
    func connectionClosed(_ c: any ByteStream)
    /// Called when the kernel accepted all queued writes (the write queue drained to zero).
    func connectionWritable(_ c: any ByteStream)
}

/// One accepted TCP connection. Reading starts when a delegate is set.
public final class TCPConnection: ByteStream {
    let box = HandleBox<uv_tcp_t>()
    public weak var delegate: (any ByteStreamDelegate)?
    /// Keeps the delegate alive for as long as the connection is open.
    private var owner: AnyObject?
    /// The loop's shared read buffer (bytes are valid only during the `received` callback).
    private let readBuffer: UnsafeMutableRawPointer
    public private(set) var isClosed = false
    /// Bytes handed to libuv that the kernel has not taken yet.
    public private(set) var queuedWriteBytes = 0

    init(loop: EventLoop) {
        readBuffer = loop.readBuffer
        uv_tcp_init(loop.raw, box.pointer)
        box.bind(self)
    }

    private final class ConnectRequest {
        let connection: TCPConnection
        let completion: (Result<TCPConnection, UVError>) -> Void
        init(_ c: TCPConnection, _ completion: @escaping (Result<TCPConnection, UVError>) -> Void) {
            connection = c
            self.completion = completion
        }
    }

    /// Connects to an IPv4 `host:port`; `completion` runs on the loop.
    public static func connect(
        loop: EventLoop, host: String, port: Int,
        _ completion: @escaping (Result<TCPConnection, UVError>) -> Void
    ) {
        let c = TCPConnection(loop: loop)
        var addr = sockaddr_in()
        let rc = uv_ip4_addr(host, Int32(port), &addr)
        guard rc == 0 else {
            c.close()
            completion(.failure(UVError(code: rc)))
            return
        }
        let req = UnsafeMutablePointer<uv_connect_t>.allocate(capacity: 1)
        req.initialize(to: uv_connect_t())
        req.pointee.data = Unmanaged.passRetained(ConnectRequest(c, completion)).toOpaque()
        let started = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                uv_tcp_connect(req, c.box.pointer, sa) { req, status in
                    let r = Unmanaged<ConnectRequest>.fromOpaque(req!.pointee.data).takeRetainedValue()
                    req!.deallocate()
                    if status < 0 {
                        r.connection.close()
                        r.completion(.failure(UVError(code: status)))
                    } else {
                        uv_tcp_nodelay(r.connection.box.pointer, 1)
                        r.completion(.success(r.connection))
                    }
                }
            }
        }
        if started != 0 {
            Unmanaged<ConnectRequest>.fromOpaque(req.pointee.data).release()
            req.deallocate()
            c.close()
            completion(.failure(UVError(code: started)))
        }
    }

    /// Sets the delegate, which this connection keeps alive until closed, and starts reading.
    public func start(delegate: any ByteStreamDelegate) {
        self.delegate = delegate
        self.owner = delegate
        resumeReading()
    }

    /// Stops reading from the socket (the peer's writes then back up in the kernel).
    public func pauseReading() {
        guard !isClosed else { return }
        uv_read_stop(asStream(box.pointer))
    }

    /// Starts or resumes reading.
    public func resumeReading() {
        guard !isClosed else { return }
        uv_read_start(
            asStream(box.pointer),
            { handle, _, buf in
                let me = Unmanaged<TCPConnection>.fromOpaque(handle!.pointee.data).takeUnretainedValue()
                buf!.pointee.base = me.readBuffer.assumingMemoryBound(to: CChar.self)
                buf!.pointee.len = EventLoop.readBufferSize
            },
            { stream, nread, _ in
                let me = Unmanaged<TCPConnection>.fromOpaque(stream!.pointee.data).takeUnretainedValue()
                if nread > 0 {
                    me.delegate?.connection(me, received: UnsafeRawBufferPointer(start: me.readBuffer, count: nread))
                } else if nread < 0 {
                    me.close()
                }
            })
    }

    private final class WriteRequest {
        let bytes: [UInt8]
        let connection: TCPConnection
        init(bytes: [UInt8], connection: TCPConnection) {
            self.bytes = bytes
            self.connection = connection
        }
    }

    /// Writes what the socket takes at once straight from `bytes` (which need not outlive the
    /// call), and queues a copy of the rest. Keeps order: with writes already queued, it queues.
    public func write(copying bytes: UnsafeRawBufferPointer) {
        guard !isClosed, let base = bytes.baseAddress, bytes.count > 0 else { return }
        var written = 0
        if queuedWriteBytes == 0 {
            var buf = uv_buf_init(
                UnsafeMutablePointer(mutating: base.assumingMemoryBound(to: CChar.self)), UInt32(bytes.count))
            let rc = uv_try_write(asStream(box.pointer), &buf, 1)
            if rc >= 0 {
                written = Int(rc)
            } else if rc != UV_EAGAIN.rawValue {
                close()
                return
            }
        }
        if written < bytes.count { write(Array(bytes[written...])) }
    }

    /// Queues `bytes` for writing. The array is kept alive until libuv is done with it.
    public func write(_ bytes: [UInt8]) {
        guard !isClosed, !bytes.isEmpty else { return }
        let req = UnsafeMutablePointer<uv_write_t>.allocate(capacity: 1)
        req.initialize(to: uv_write_t())
        let wr = WriteRequest(bytes: bytes, connection: self)
        req.pointee.data = Unmanaged.passRetained(wr).toOpaque()
        queuedWriteBytes += bytes.count
        let rc = wr.bytes.withUnsafeBufferPointer { bp -> Int32 in
            var buf = uv_buf_init(
                UnsafeMutablePointer(mutating: UnsafeRawPointer(bp.baseAddress!).assumingMemoryBound(to: CChar.self)),
                UInt32(bp.count))
            return uv_write(req, asStream(box.pointer), &buf, 1) { req, _ in
                let wr = Unmanaged<WriteRequest>.fromOpaque(req!.pointee.data).takeRetainedValue()
                req!.deallocate()
                let c = wr.connection
                c.queuedWriteBytes -= wr.bytes.count
                if c.queuedWriteBytes == 0, !c.isClosed { c.delegate?.connectionWritable(c) }
            }
        }
        if rc != 0 {
            Unmanaged<WriteRequest>.fromOpaque(req.pointee.data).release()
            req.deallocate()
            queuedWriteBytes -= bytes.count
            close()
        }
    }

    /// Closes the connection; the delegate hears `connectionClosed` once.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        uv_read_stop(asStream(box.pointer))
        let d = delegate
        box.close()
        d?.connectionClosed(self)
        owner = nil
    }
}
