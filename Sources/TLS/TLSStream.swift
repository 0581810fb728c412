import COpenSSL
import EventLoop

#if canImport(Glibc)
import Glibc
#endif

/// TLS over one TCP connection, driven by the loop: OpenSSL never touches the socket. Bytes
/// received are handed to OpenSSL through an in-memory BIO that reads straight from libuv's read
/// buffer (no copy); what OpenSSL writes lands in the context's shared output buffer and goes to
/// the socket at once. Reads and the handshake are never blocking: OpenSSL answers "want read"
/// and the next bytes resume it. Above it, protocol code sees a `ByteStream` of plaintext.
///
/// An idle stream holds only OpenSSL's `SSL` state (`SSL_MODE_RELEASE_BUFFERS`).
public final class TLSStream: ByteStream, ByteStreamDelegate {
    /// Why a stream was refused (each counted by the server with a reason).
    public enum Failure: Sendable, Equatable {
        /// The handshake failed; OpenSSL's reason.
        case handshake(String)
        /// The peer's certificate did not verify; OpenSSL's reason ("certificate has expired").
        case badCertificate(String)
        /// Plaintext HTTP (or h2c) sent to a TLS listener.
        case plaintext
        case timeout
        case renegotiation
    }

    private let tcp: TCPConnection
    private let context: TLSContext
    private let ssl: OpaquePointer
    private let io: UnsafeMutablePointer<vigil_tls_io>
    private weak var delegate: (any ByteStreamDelegate)?
    /// Keeps the delegate alive until the stream closes.
    private var owner: AnyObject?
    /// Plaintext written before the handshake finished (a client's first frames).
    private var early: [UInt8] = []
    private var timer: LoopTimer?
    private var sawBytes = false
    public private(set) var handshakeDone = false
    /// The verified client certificate's Common Name (servers with `--client-cert-auth`).
    public private(set) var peerCommonName: String?
    /// Called once if the stream is refused (then it closes).
    public var onFailure: ((Failure) -> Void)?
    /// Called once when the handshake completes.
    public var onHandshake: (() -> Void)?

    /// - Parameters:
    ///   - serverName: for a client, the name sent in SNI and checked against the server's
    ///     certificate (an IP address is checked as one).
    ///   - handshakeTimeoutMs: a handshake must finish within this time (0 = no limit).
    public init(
        tcp: TCPConnection, context: TLSContext, loop: EventLoop, serverName: String? = nil,
        handshakeTimeoutMs: UInt64 = 10_000
    ) throws(TLSError) {
        guard let ssl = SSL_new(context.raw) else { throw .openssl("cannot create a TLS connection") }
        self.tcp = tcp
        self.context = context
        self.ssl = ssl
        io = .allocate(capacity: 1)
        io.initialize(to: vigil_tls_io(in: nil, in_len: 0, out: context.output, handshake_done: 0, renegotiation: 0))
        vigil_ssl_attach_io(ssl, io)
        if context.isServer {
            SSL_set_accept_state(ssl)
        } else {
            SSL_set_connect_state(ssl)
            if let name = serverName {
                var probe = in6_addr()
                let isIP =
                    name.contains(":") ? inet_pton(AF_INET6, name, &probe) == 1 : inet_pton(AF_INET, name, &probe) == 1
                if isIP {
                    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name)
                } else {
                    _ = vigil_ssl_set_sni(ssl, name)
                    SSL_set1_host(ssl, name)
                }
            }
        }
        if handshakeTimeoutMs > 0 {
            timer = LoopTimer(loop: loop, timeoutMs: handshakeTimeoutMs) { [weak self] in
                self?.timer = nil
                self?.fail(.timeout)
            }
        }
    }

    deinit {
        SSL_free(ssl)
        io.deallocate()
    }

    // MARK: ByteStream

    public var isClosed: Bool { tcp.isClosed }
    public var queuedWriteBytes: Int { tcp.queuedWriteBytes + early.count }

    public func start(delegate: any ByteStreamDelegate) {
        self.delegate = delegate
        owner = delegate
        tcp.start(delegate: self)
        if !context.isServer { advance() }
    }

    public func write(copying bytes: UnsafeRawBufferPointer) {
        guard !isClosed, let base = bytes.baseAddress, bytes.count > 0 else { return }
        guard handshakeDone else {
            early.append(contentsOf: bytes)
            return
        }
        let n = SSL_write(ssl, base, Int32(bytes.count))
        drain()
        if n <= 0 { fail(.handshake(reason(n))) }
    }

    public func write(_ bytes: [UInt8]) { bytes.withUnsafeBytes { write(copying: $0) } }
    public func pauseReading() { tcp.pauseReading() }
    public func resumeReading() { tcp.resumeReading() }

    /// Sends close_notify (after a handshake) and closes the connection.
    public func close() {
        guard !isClosed else { return }
        if handshakeDone {
            SSL_shutdown(ssl)
            drain()
        }
        tcp.close()
    }

    // MARK: From the socket

    public func connection(_ c: any ByteStream, received bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        if !sawBytes && context.isServer {
            sawBytes = true
            // A TLS record starts with 0x16 (handshake). Letters are an HTTP request: answer
            // as Go's servers (and so etcd) do, then close.
            let first = bytes[0]
            if first != 0x16 {
                if (0x41...0x5A).contains(first) {
                    tcp.write(
                        Array("HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n".utf8))
                    fail(.plaintext)
                } else {
                    fail(.handshake("not a TLS handshake (first byte 0x\(String(first, radix: 16)))"))
                }
                return
            }
        }
        io.pointee.in = base.assumingMemoryBound(to: UInt8.self)
        io.pointee.in_len = bytes.count
        advance()
        io.pointee.in = nil
        io.pointee.in_len = 0
    }

    public func connectionWritable(_ c: any ByteStream) { delegate?.connectionWritable(self) }

    public func connectionClosed(_ c: any ByteStream) {
        timer?.cancel()
        timer = nil
        early = []
        let d = delegate
        owner = nil
        d?.connectionClosed(self)
    }

    // MARK: The state machine

    /// Runs the handshake as far as the bytes at hand allow, then reads records.
    private func advance() {
        if !handshakeDone {
            let r = SSL_do_handshake(ssl)
            drain()
            if r == 1 {
                finishHandshake()
            } else {
                let e = SSL_get_error(ssl, r)
                if e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE { return }
                let verify = SSL_get_verify_result(ssl)
                if verify != X509_V_OK {
                    fail(.badCertificate(String(cString: X509_verify_cert_error_string(verify))))
                } else {
                    fail(.handshake(reason(r)))
                }
                return
            }
        }
        readRecords()
    }

    private func finishHandshake() {
        handshakeDone = true
        io.pointee.handshake_done = 1
        timer?.cancel()
        timer = nil
        if context.isServer, !context.revokedSerials.isEmpty, peerRevoked() {
            return fail(.badCertificate("certificate revoked"))
        }
        if context.verifiesClients, SSL_get_verify_result(ssl) == X509_V_OK, let cert = SSL_get1_peer_certificate(ssl) {
            peerCommonName = Self.commonName(cert)
            X509_free(cert)
        }
        onHandshake?()
        onHandshake = nil
        if !early.isEmpty {
            let pending = early
            early = []
            write(pending)
        }
    }

    /// Whether the client's certificate or one it sent with it is in the CRL (etcd checks them all,
    /// once the handshake is done, and closes the connection).
    private func peerRevoked() -> Bool {
        if let leaf = SSL_get1_peer_certificate(ssl) {
            defer { X509_free(leaf) }
            if context.isRevoked(leaf) { return true }
        }
        for i in 0..<vigil_peer_chain_count(ssl) {
            if let c = vigil_peer_chain_cert(ssl, i), context.isRevoked(c) { return true }
        }
        return false
    }

    /// Plaintext goes up in pieces of at most one record. OpenSSL is asked only while bytes are
    /// at hand (received, or buffered inside it): asked with none, it would set up a 16 KB read
    /// buffer and keep it while the connection idles.
    private func readRecords() {
        withUnsafeTemporaryAllocation(byteCount: 16 * 1024, alignment: 16) { buf in
            while !isClosed && (io.pointee.in_len > 0 || SSL_has_pending(ssl) == 1) {
                let n = SSL_read(ssl, buf.baseAddress, Int32(buf.count))
                if io.pointee.renegotiation != 0 {
                    drain()
                    fail(.renegotiation)
                    return
                }
                if n > 0 {
                    drain()
                    delegate?.connection(self, received: UnsafeRawBufferPointer(start: buf.baseAddress, count: Int(n)))
                    continue
                }
                drain()
                let e = SSL_get_error(ssl, n)
                if e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE { return }
                if e == SSL_ERROR_ZERO_RETURN {
                    close()  // the peer's close_notify
                } else {
                    ERR_clear_error()
                    tcp.close()
                }
                return
            }
        }
    }

    /// Writes what OpenSSL produced to the socket.
    private func drain() {
        let out = io.pointee.out!
        guard out.pointee.len > 0 else { return }
        tcp.write(copying: UnsafeRawBufferPointer(start: out.pointee.data, count: out.pointee.len))
        out.pointee.len = 0
        // A big burst does not keep its buffer.
        if out.pointee.cap > 1 << 20 {
            free(out.pointee.data)
            out.pointee.data = nil
            out.pointee.cap = 0
        }
    }

    private func fail(_ f: Failure) {
        guard !isClosed else { return }
        ERR_clear_error()
        let cb = onFailure
        onFailure = nil
        cb?(f)
        tcp.close()
    }

    private func reason(_ r: Int32) -> String {
        let e = SSL_get_error(ssl, r)
        let queued = drainErrors()
        if !queued.isEmpty { return queued }
        return e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN
            ? "connection closed during the handshake" : "error \(e)"
    }

    static func commonName(_ cert: OpaquePointer) -> String? {
        guard let name = X509_get_subject_name(cert) else { return nil }
        var buf = [CChar](repeating: 0, count: 256)
        let n = X509_NAME_get_text_by_NID(name, NID_commonName, &buf, Int32(buf.count))
        guard n > 0 else { return nil }
        return String(decoding: buf.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

extension TLSStream {
    /// Connects to `host:port` over TLS; `completion` runs on the loop once the TCP connection is
    /// up (the handshake runs as the stream starts; a failed one closes it).
    public static func connect(
        loop: EventLoop, host: String, port: Int, context: TLSContext, serverName: String? = nil,
        _ completion: @escaping (Result<TLSStream, any Error>) -> Void
    ) {
        TCPConnection.connect(loop: loop, host: host, port: port) { r in
            switch r {
            case .failure(let e): completion(.failure(e))
            case .success(let tcp):
                do {
                    completion(
                        .success(try TLSStream(tcp: tcp, context: context, loop: loop, serverName: serverName ?? host)))
                } catch {
                    tcp.close()
                    completion(.failure(error))
                }
            }
        }
    }
}
