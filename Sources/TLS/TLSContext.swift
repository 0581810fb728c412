import COpenSSL
import Foundation

/// A TLS configuration that cannot be used: the text says which file or setting and why.
public struct TLSError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }

    /// `what`, followed by OpenSSL's reasons (its error queue, emptied).
    static func openssl(_ what: String) -> TLSError {
        let reasons = drainErrors()
        return TLSError(reasons.isEmpty ? what : "\(what): \(reasons)")
    }
}

/// OpenSSL's queued error reasons, oldest first, joined; the queue is emptied.
func drainErrors() -> String {
    var parts: [String] = []
    while true {
        let e = ERR_get_error()
        if e == 0 { break }
        if let r = ERR_reason_error_string(e) { parts.append(String(cString: r)) } else { parts.append("error \(e)") }
    }
    return parts.joined(separator: "; ")
}

/// An OpenSSL `SSL_CTX` for one listener (server) or one kind of outgoing connection (client),
/// with the output buffer its streams share. Built at start; used on one loop only.
public final class TLSContext {
    let raw: OpaquePointer
    public let isServer: Bool
    /// Whether server streams ask for and verify client certificates (`--client-cert-auth`).
    public let verifiesClients: Bool
    /// Ciphertext of the last TLS call of any stream, written out before the next (loop-confined).
    let output: UnsafeMutablePointer<vigil_buf>
    /// `--client-crl-file`'s revoked serial numbers (`ASN1_INTEGER`s owned here).
    private(set) var revokedSerials: [UnsafeMutablePointer<ASN1_INTEGER>] = []

    private init(raw: OpaquePointer, isServer: Bool, verifiesClients: Bool) {
        self.raw = raw
        self.isServer = isServer
        self.verifiesClients = verifiesClients
        output = .allocate(capacity: 1)
        output.initialize(to: vigil_buf(data: nil, len: 0, cap: 0))
    }

    deinit {
        for s in revokedSerials { ASN1_INTEGER_free(s) }
        SSL_CTX_free(raw)
        free(output.pointee.data)
        output.deallocate()
    }

    /// etcd's client (and peer) TLS settings for a server.
    public struct ServerConfig: Sendable {
        public var certFile: String
        public var keyFile: String
        /// `--trusted-ca-file`: the CAs client certificates must chain to.
        public var trustedCAFile: String?
        /// `--client-cert-auth`: every client must present a certificate that verifies.
        public var clientCertAuth = false
        /// `--client-crl-file`: revoked client certificates (PEM or DER).
        public var crlFile: String?
        /// `--cipher-suites`: Go's names (TLS 1.2; TLS 1.3's suites are fixed, as in Go).
        public var cipherSuites: [String] = []

        public init(certFile: String, keyFile: String) {
            self.certFile = certFile
            self.keyFile = keyFile
        }
    }

    /// A server context; every file is read and checked now.
    public static func server(_ c: ServerConfig) throws(TLSError) -> TLSContext {
        guard let raw = SSL_CTX_new(TLS_server_method()) else { throw .openssl("cannot create a TLS context") }
        let ctx = TLSContext(raw: raw, isServer: true, verifiesClients: c.clientCertAuth)
        try ctx.common()
        try ctx.useCertificate(c.certFile, key: c.keyFile)
        // As etcd: a trusted CA file alone already requires every client to present a certificate
        // that chains to it; `--client-cert-auth` also makes its Common Name the user.
        if let ca = c.trustedCAFile {
            try ctx.trust(ca)
            if let names = SSL_load_client_CA_file(ca) { SSL_CTX_set_client_CA_list(raw, names) }
            SSL_CTX_set_verify(raw, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
        } else if c.clientCertAuth {
            throw TLSError("--client-cert-auth needs --trusted-ca-file")
        }
        if let crl = c.crlFile { try ctx.revocations(crl) }
        if !c.cipherSuites.isEmpty { try ctx.ciphers(c.cipherSuites) }
        vigil_ssl_ctx_server_alpn(raw)
        // No session tickets or cache: every connection is a full handshake, and an idle one
        // holds no session state.
        SSL_CTX_set_options(raw, vigil_ssl_op_no_ticket())
        SSL_CTX_set_num_tickets(raw, 0)
        _ = vigil_ssl_ctx_session_cache_off(raw)
        return ctx
    }

    /// Settings of an outgoing connection (our client, the mirror's upstream).
    public struct ClientConfig: Sendable {
        /// CAs the server's certificate must chain to (nil: the system's).
        public var caFile: String?
        public var certFile: String?
        public var keyFile: String?
        /// Skips checking the server's certificate (etcdctl's `--insecure-skip-tls-verify`).
        public var insecureSkipVerify = false
        /// ALPN protocols offered, in order of preference.
        public var alpn: [String] = ["h2"]
        /// Refuses a client certificate that has a Common Name, as etcd's grpc-proxy does for its
        /// `--cert` (with auth on upstream, that name would be taken as the proxy's user).
        public var requireEmptyCommonName = false
        public init() {}
    }

    public static func client(_ c: ClientConfig) throws(TLSError) -> TLSContext {
        guard let raw = SSL_CTX_new(TLS_client_method()) else { throw .openssl("cannot create a TLS context") }
        let ctx = TLSContext(raw: raw, isServer: false, verifiesClients: false)
        try ctx.common()
        if let ca = c.caFile {
            try ctx.trust(ca)
        } else {
            SSL_CTX_set_default_verify_paths(raw)
        }
        if let cert = c.certFile {
            guard let key = c.keyFile else { throw TLSError("a client certificate needs its key file") }
            try ctx.useCertificate(cert, key: key)
            if c.requireEmptyCommonName, let x509 = SSL_CTX_get0_certificate(raw),
                let cn = TLSStream.commonName(x509), !cn.isEmpty
            {
                throw TLSError("cert has non empty Common Name (\(cn))")
            }
        }
        SSL_CTX_set_verify(raw, c.insecureSkipVerify ? SSL_VERIFY_NONE : SSL_VERIFY_PEER, nil)
        if !c.alpn.isEmpty {
            var wire: [UInt8] = []
            for p in c.alpn {
                wire.append(UInt8(p.utf8.count))
                wire.append(contentsOf: p.utf8)
            }
            _ = SSL_CTX_set_alpn_protos(raw, wire, UInt32(wire.count))
        }
        return ctx
    }

    // MARK: Parts

    private func common() throws(TLSError) {
        guard vigil_ssl_ctx_set_min_tls12(raw) == 1 else { throw .openssl("cannot require TLS 1.2") }
        // Buffers only while a record is in flight: an idle connection holds none.
        _ = vigil_ssl_ctx_set_mode(raw, Int(SSL_MODE_RELEASE_BUFFERS))
        // A peer's certificate chain is bounded as Go bounds any handshake message (so etcd
        // refuses the same chains): 64 KiB.
        _ = vigil_ssl_ctx_set_max_cert_list(raw, 64 * 1024)
    }

    private func useCertificate(_ cert: String, key: String) throws(TLSError) {
        try readable(cert, "certificate")
        try readable(key, "key")
        guard SSL_CTX_use_certificate_chain_file(raw, cert) == 1 else {
            throw .openssl("cannot load certificate \(cert)")
        }
        guard SSL_CTX_use_PrivateKey_file(raw, key, SSL_FILETYPE_PEM) == 1 else {
            throw .openssl("cannot load key \(key)")
        }
        guard SSL_CTX_check_private_key(raw) == 1 else {
            throw .openssl("key \(key) does not match certificate \(cert)")
        }
    }

    private func trust(_ ca: String) throws(TLSError) {
        try readable(ca, "trusted CA file")
        guard SSL_CTX_load_verify_locations(raw, ca, nil) == 1 else {
            throw .openssl("cannot load trusted CA file \(ca)")
        }
    }

    private func revocations(_ path: String) throws(TLSError) {
        try readable(path, "CRL file")
        guard let bio = BIO_new_file(path, "r") else { throw .openssl("cannot open CRL file \(path)") }
        defer { BIO_free(bio) }
        var crls: [OpaquePointer] = []
        while let crl = PEM_read_bio_X509_CRL(bio, nil, nil, nil) { crls.append(crl) }
        if crls.isEmpty {
            ERR_clear_error()
            _ = BIO_ctrl(bio, BIO_CTRL_RESET, 0, nil)
            if let crl = d2i_X509_CRL_bio(bio, nil) { crls.append(crl) }
        }
        guard !crls.isEmpty else { throw .openssl("CRL file \(path) holds no certificate revocation list") }
        // As etcd (Go's crypto/x509 parses the list, etcd compares serial numbers): a client
        // certificate is refused if its serial number, or one of its chain's, is listed. The
        // list's dates and signer are not checked: a CRL whose nextUpdate has passed still
        // revokes what it lists, and lets every other certificate through.
        for crl in crls {
            for i in 0..<vigil_crl_revoked_count(crl) {
                if let s = vigil_crl_revoked_serial(crl, i), let copy = ASN1_INTEGER_dup(s) {
                    revokedSerials.append(copy)
                }
            }
            X509_CRL_free(crl)
        }
    }

    /// Whether a certificate's serial number is listed in `--client-crl-file`.
    func isRevoked(_ cert: OpaquePointer) -> Bool {
        guard !revokedSerials.isEmpty, let serial = X509_get0_serialNumber(cert) else { return false }
        return revokedSerials.contains { ASN1_INTEGER_cmp($0, serial) == 0 }
    }

    private func ciphers(_ names: [String]) throws(TLSError) {
        var list: [String] = []
        for n in names {
            guard let o = Self.goCipherSuites[n] else { throw TLSError("unexpected TLS cipher suite \"\(n)\"") }
            list.append(o)
        }
        guard SSL_CTX_set_cipher_list(raw, list.joined(separator: ":")) == 1 else {
            throw .openssl("none of the cipher suites \(names.joined(separator: ",")) is available")
        }
    }

    private func readable(_ path: String, _ what: String) throws(TLSError) {
        guard FileManager.default.isReadableFile(atPath: path) else {
            throw TLSError("cannot read \(what) \(path): no such file or not readable")
        }
    }

    /// The TLS 1.2 suites etcd's `--cipher-suites` names (Go's names), as OpenSSL calls them.
    public static let goCipherSuites: [String: String] = [
        "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
        "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
        "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
        "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
        "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
        "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
        "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    ]

    /// etcd's `--auto-tls`: a self-signed certificate for `hosts` (IP addresses or names) in
    /// `directory` (made if missing; reused if both files are there), valid for a year.
    public static func selfSigned(
        in directory: String, hosts: [String]
    ) throws(TLSError) -> (
        cert: String, key: String
    ) {
        let cert = directory + "/cert.pem"
        let key = directory + "/key.pem"
        let fm = FileManager.default
        if fm.fileExists(atPath: cert) && fm.fileExists(atPath: key) { return (cert, key) }
        do {
            try fm.createDirectory(
                atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw TLSError("cannot create \(directory): \(error)")
        }
        var names: [String] = []
        for h in Set(hosts).sorted() {
            var probe = in6_addr()
            let isIP = h.contains(":") ? inet_pton(AF_INET6, h, &probe) == 1 : inet_pton(AF_INET, h, &probe) == 1
            names.append((isIP ? "IP:" : "DNS:") + h)
        }
        if names.isEmpty { names = ["IP:127.0.0.1", "DNS:localhost"] }
        let old = umask(0o077)
        defer { umask(old) }
        guard vigil_make_self_signed(cert, key, "etcd", names.joined(separator: ","), 365) == 1 else {
            throw .openssl("cannot make a self-signed certificate in \(directory)")
        }
        return (cert, key)
    }
}
