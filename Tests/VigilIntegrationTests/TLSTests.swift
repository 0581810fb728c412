import EtcdProto
import Foundation
import GRPC
import TLS
import Testing
import VigilTesting

/// TLS on the client listener (OpenSSL on the loop): the real etcdctl and curl with the
/// certificates of `scripts/make-test-certs.sh`, etcd's Common Name auth, our own client, and
/// every kind of bad client, each refused, counted and logged once while others are served.
@Suite(.serialized) struct TLSTests {
    let certs: String
    let curl: String

    init() throws {
        certs = try TestCertificates.directory()
        curl = try #require(which("curl"), "curl is installed by scripts/install-deps.sh --test")
    }

    /// A TLS server on one port and a plaintext one beside it (for /metrics and the wrong-port case).
    func startServer(_ extra: [String] = [], clientCertAuth: Bool = true) throws -> (LiveServer, plain: Int) {
        let plain = freePort()
        let flags = TestCertificates.serverFlags(certs, clientCertAuth: clientCertAuth)
        let server = try LiveServer(
            args: ["--unsafe-no-fsync"] + flags + extra, secure: true, alsoListen: ["http://127.0.0.1:\(plain)"])
        return (server, plain)
    }

    func curlTLS(_ args: [String], cn: String? = "root") throws -> CommandResult {
        var flags = ["-s", "--max-time", "10", "--cacert", certs + "/ca.pem"]
        if let cn { flags += ["--cert", certs + "/client-\(cn).pem", "--key", certs + "/client-\(cn)-key.pem"] }
        return try runCommand(curl, flags + args)
    }

    func metrics(_ plainPort: Int) throws -> String {
        try runCommand(curl, ["-s", "http://127.0.0.1:\(plainPort)/metrics"]).stdout
    }

    func refusedCount(_ metrics: String, _ reason: String) -> Int {
        let prefix = "vigil_requests_refused_total{reason=\"\(reason)\"} "
        guard let line = metrics.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) else { return -1 }
        return Int(line.dropFirst(prefix.count)) ?? -1
    }

    @Test func etcdctlCurlAndOurClientOverTLS() throws {
        let (server, _) = try startServer()
        // LiveServer's URL is the first listener's (https://…, its own port).
        let url = server.url
        let ctl = try Etcdctl(endpoint: url, flags: TestCertificates.clientFlags(certs))
        #expect(try ctl.ok("put", "tls/a", "1") == "OK\n")
        #expect(try ctl.ok("get", "tls/a", "--print-value-only") == "1\n")
        let watch = try ctl.background(["watch", "tls/", "--prefix"])
        defer { _ = watch.stop() }
        usleep(400_000)
        #expect(try ctl.ok("put", "tls/b", "2") == "OK\n")
        #expect(watch.wait { $0.contains("tls/b\n2") })
        let lease = try ctl.ok("lease", "grant", "30")
        #expect(lease.contains("granted with TTL(30s)"))
        // Maintenance calls (etcdctl dials these with the endpoint as given).
        #expect(try ctl.ok("endpoint", "status").contains(url))
        #expect(try ctl.ok("endpoint", "hashkv").contains(url))
        #expect(try ctl.run(["endpoint", "health"]).output.contains("is healthy"))
        let snap = server.dataDir + ".snap"
        defer { try? FileManager.default.removeItem(atPath: snap) }
        #expect(try ctl.ok("snapshot", "save", snap).contains("Snapshot saved"))

        // curl: the gateway over h2 (ALPN) and HTTP/1.1, and the plain endpoints.
        for version in ["--http2", "--http1.1"] {
            let r = try curlTLS([version, "\(url)/v3/kv/range", "-d", #"{"key":"dGxzL2E="}"#])
            #expect(r.stdout.contains(#""value":"MQ==""#), "\(version): \(r.output)")
            #expect(try curlTLS([version, "\(url)/health"]).stdout == #"{"health":"true"}"#)
        }
        #expect(try curlTLS(["\(url)/version"]).stdout.contains("etcdserver"))
        #expect(try curlTLS(["\(url)/metrics"]).stdout.contains("grpc_server_handled_total"))
        // The negotiated protocols.
        let h2 = try curlTLS(["-o", "/dev/null", "-w", "%{http_version}", "\(url)/health"])
        #expect(h2.stdout == "2")

        // Our own client: CA, client certificate, server name checked.
        var tls = TLSContext.ClientConfig()
        tls.caFile = certs + "/ca.pem"
        tls.certFile = certs + "/client-root.pem"
        tls.keyFile = certs + "/client-root-key.pem"
        let client = try BlockingClient(port: server.port, tls: tls)
        var req = Etcdserverpb_RangeRequest()
        req.key = Data("tls/a".utf8)
        let resp = try client.call("/etcdserverpb.KV/Range", req, as: Etcdserverpb_RangeResponse.self).get()
        #expect(resp.kvs.first?.value == Data("1".utf8))
        // A server name the certificate does not carry fails the handshake: the call never runs.
        let wrongName = try BlockingClient(port: server.port, tls: tls, serverName: "wrong.example")
        let r = wrongName.call("/etcdserverpb.KV/Range", req, as: Etcdserverpb_RangeResponse.self)
        #expect(throws: (any Error).self) { try r.get() }
    }

    @Test func badClientsAreRefusedAndCounted() throws {
        let (server, plain) = try startServer(["--tls-handshake-timeout", "1"])
        let url = server.url
        let port = UInt16(server.port)

        // Certificates that must not get in (curl's exit code is non-zero: the handshake failed).
        for cn in ["expired", "selfsigned", "otherca", "revoked"] {
            let r = try curlTLS(["\(url)/health"], cn: cn)
            #expect(r.status != 0 && !r.stdout.contains("health"), "\(cn) got in: \(r.output)")
        }
        #expect(try curlTLS(["\(url)/health"], cn: nil).status != 0)
        // A chain past the bound (64 KiB, as Go's handshake messages).
        let ca = try String(contentsOfFile: certs + "/ca.pem", encoding: .utf8)
        let huge = server.dataDir + "-huge.pem"
        try
            (try String(contentsOfFile: certs + "/client-root.pem", encoding: .utf8) + String(repeating: ca, count: 120))
            .write(toFile: huge, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: huge) }
        let big = try runCommand(
            curl, ["-s", "--cacert", certs + "/ca.pem", "--cert", huge, "--key", certs + "/client-root-key.pem", url])
        #expect(big.status != 0)

        // Plaintext HTTP to the TLS port gets Go's answer; TLS to the plaintext port is cut.
        let plainText = try runCommand(curl, ["-s", "http://127.0.0.1:\(port)/health"])
        #expect(plainText.stdout.contains("Client sent an HTTP request to an HTTPS server."))
        #expect(try curlTLS(["https://127.0.0.1:\(plain)/health"]).status != 0)

        // Garbage before a ClientHello, and a handshake that stalls (closed after the timeout).
        #expect(try rawExchange(port: port, send: Array("\u{0}\u{1}garbage".utf8), waitSeconds: 5).closed)
        let stalled = try rawExchange(port: port, send: [0x16, 0x03, 0x01, 0x00], waitSeconds: 5)
        #expect(stalled.closed && stalled.seconds >= 0.9 && stalled.seconds < 4)

        // Renegotiation (TLS 1.2, as `openssl s_client` asks for it with "R").
        if let openssl = which("openssl") {
            _ = try runCommand(
                "/bin/bash",
                [
                    "-c",
                    "(printf 'R\\n'; sleep 1) | \(openssl) s_client -connect 127.0.0.1:\(port) -tls1_2 -CAfile \(certs)/ca.pem -cert \(certs)/client-root.pem -key \(certs)/client-root-key.pem",
                ], timeout: 20)
        }

        // Each reason counted; the server still serves.
        let m = try metrics(plain)
        #expect(refusedCount(m, "tls_bad_certificate") >= 4)
        #expect(refusedCount(m, "tls_handshake") >= 3)
        #expect(refusedCount(m, "tls_plaintext") == 1)
        #expect(refusedCount(m, "tls_on_plain_port") == 1)
        #expect(refusedCount(m, "tls_handshake_timeout") == 1)
        #expect(refusedCount(m, "tls_renegotiation") == 1)
        let ctl = try Etcdctl(endpoint: url, flags: TestCertificates.clientFlags(certs))
        #expect(try ctl.ok("put", "still", "serving") == "OK\n")
        // Logged once per reason, however often it happens.
        let log = server.log
        #expect(log.components(separatedBy: "client certificate refused").count == 2)
        #expect(log.contains("certificate has expired"))
    }

    @Test func commonNameIsTheUserWithClientCertAuth() throws {
        let (server, _) = try startServer()
        let url = server.url
        let root = try Etcdctl(endpoint: url, flags: TestCertificates.clientFlags(certs, cn: "root"))
        let alice = try Etcdctl(endpoint: url, flags: TestCertificates.clientFlags(certs, cn: "alice"))
        let nobody = try Etcdctl(endpoint: url, flags: TestCertificates.clientFlags(certs, cn: "nobody"))
        _ = try root.ok("user", "add", "root:rootpw")
        _ = try root.ok("user", "add", "alice:alicepw")
        _ = try root.ok("role", "add", "app")
        _ = try root.ok("role", "grant-permission", "app", "readwrite", "app/", "--prefix")
        _ = try root.ok("user", "grant-role", "alice", "app")
        #expect(try root.ok("auth", "enable") == "Authentication Enabled\n")

        // No token: the certificate's CN is the user.
        #expect(try root.ok("put", "secret", "s") == "OK\n")
        #expect(try alice.ok("put", "app/x", "1") == "OK\n")
        #expect(try alice.fails("put", "secret", "2").contains("etcdserver: permission denied"))
        #expect(try alice.fails("user", "list").contains("etcdserver: permission denied"))
        #expect(try nobody.fails("get", "app/x").contains("etcdserver: permission denied"))
        // A token wins over the certificate.
        #expect(try nobody.ok("--user", "alice:alicepw", "get", "app/x", "--print-value-only") == "1\n")
        // A watch is checked the same way.
        let w = try alice.run(["watch", "secret", "--rev", "1"], stdin: nil)
        #expect(w.output.contains("permission denied"))

        // The gateway refuses a certificate with a CN while auth is on (etcd's words, HTTP 400).
        let g = try curlTLS(["-w", "\n%{http_code}", "\(url)/v3/kv/range", "-d", #"{"key":"YXBwL3g="}"#], cn: "alice")
        #expect(g.stdout.contains("CommonName of client sending a request against gateway will be ignored"))
        #expect(g.stdout.hasSuffix("400"))
        #expect(try curlTLS(["\(url)/health"], cn: "alice").stdout.contains("health"))
    }

    @Test func autoTLSMakesASelfSignedCertificate() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync", "--auto-tls"], secure: true)
        let cert = server.dataDir + "/fixtures/client/cert.pem"
        #expect(FileManager.default.fileExists(atPath: cert))
        let ctl = try Etcdctl(
            endpoint: server.url, flags: ["--insecure-transport=false", "--insecure-skip-tls-verify"])
        #expect(try ctl.ok("put", "k", "v") == "OK\n")
        #expect(try ctl.ok("get", "k", "--print-value-only") == "v\n")
        if let openssl = which("openssl") {
            let text = try runCommand(openssl, ["x509", "-in", cert, "-noout", "-text"]).stdout
            #expect(text.contains("IP Address:127.0.0.1"))
        }
        // Verified against the certificate it made.
        let strict = try Etcdctl(endpoint: server.url, flags: ["--cacert", cert])
        #expect(try strict.ok("get", "k", "--print-value-only") == "v\n")
    }

    /// As etcd's e2e TestCtlV3GetRevokedCRL, with a CRL whose nextUpdate passed long ago (etcd's
    /// fixture's did in 2021): the certificate it lists is refused, every other one gets in.
    @Test func anExpiredCRLStillRevokesOnlyWhatItLists() throws {
        let flags = TestCertificates.serverFlags(certs, crl: "crl-expired.pem")
        let server = try LiveServer(args: ["--unsafe-no-fsync"] + flags, secure: true)
        let ctl = try Etcdctl(endpoint: server.url, flags: TestCertificates.clientFlags(certs))
        #expect(try ctl.ok("put", "crl/a", "1") == "OK\n")
        #expect(try ctl.ok("get", "crl/a", "--print-value-only") == "1\n")
        let revoked = try Etcdctl(endpoint: server.url, flags: TestCertificates.clientFlags(certs, cn: "revoked"))
        let r = try revoked.run(["get", "crl/a", "--dial-timeout=2s", "--command-timeout=3s"])
        #expect(r.status != 0 && !r.stdout.contains("crl/a"))
        let c = try curlTLS(["\(server.url)/health"], cn: "revoked")
        #expect(c.status != 0 && !c.stdout.contains("health"))
        #expect(try curlTLS(["\(server.url)/health"], cn: "alice").stdout == #"{"health":"true"}"#)
    }

    /// etcd's e2e TestGrpcproxyAndCommonName: the proxy's upstream certificate must have no
    /// Common Name (with auth on, that name would be taken as the proxy's user).
    @Test func grpcProxyRefusesACertificateWithACommonName() throws {
        let vigil = try vigilBinary()
        let dir = NSTemporaryDirectory() + "vigil-proxy-cn-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try runCommand(
            vigil,
            [
                "grpc-proxy", "start", "--endpoints", "127.0.0.1:\(freePort())", "--data-dir", dir,
                "--listen-addr", "127.0.0.1:\(freePort())", "--cert", certs + "/client-root.pem", "--key",
                certs + "/client-root-key.pem", "--cacert", certs + "/ca.pem",
            ], timeout: 20)
        #expect(r.status != 0)
        #expect(r.output.contains("cert has non empty Common Name (root)"), "\(r.output)")
    }

    @Test func startupChecksAndCipherSuites() throws {
        let vigil = try vigilBinary()
        let dir = NSTemporaryDirectory() + "vigil-tls-start-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func start(_ args: [String]) throws -> String {
            let r = try runCommand(vigil, ["--data-dir", dir, "--unsafe-no-fsync"] + args, timeout: 20)
            #expect(r.status != 0)
            return r.output
        }
        let https = ["--listen-client-urls", "https://127.0.0.1:\(freePort())"]
        #expect(try start(https).contains("TLS key/cert (--cert-file, --key-file) must be provided"))
        #expect(
            try start(https + ["--cert-file", dir + "/missing.pem", "--key-file", certs + "/server-key.pem"])
                .contains("missing.pem"))
        #expect(
            try start(https + TestCertificates.serverFlags(certs) + ["--cipher-suites", "TLS_NO_SUCH_SUITE"])
                .contains("unexpected TLS cipher suite \"TLS_NO_SUCH_SUITE\""))
        let http = ["--listen-client-urls", "http://127.0.0.1:\(freePort())"]
        #expect(
            try start(http + ["--peer-cert-file", dir + "/nope.pem", "--peer-key-file", dir + "/nope-key.pem"])
                .contains("nope.pem"))
        #expect(
            try start(["--cert-file", certs + "/server.pem", "--key-file", certs + "/client-root-key.pem"] + https)
                .contains("key values mismatch"))

        // Peer files that load, and a TLS 1.2 suite list: only those suites are agreed on.
        let (server, _) = try startServer([
            "--peer-cert-file", certs + "/server.pem", "--peer-key-file", certs + "/server-key.pem",
            "--peer-trusted-ca-file", certs + "/ca.pem", "--peer-client-cert-auth=true",
            "--cipher-suites", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ])
        let openssl = try #require(which("openssl"))
        func handshake(_ cipher: String) throws -> Bool {
            let r = try runCommand(
                "/bin/bash",
                [
                    "-c",
                    "echo | \(openssl) s_client -connect 127.0.0.1:\(server.port) -tls1_2 -cipher \(cipher) -CAfile \(certs)/ca.pem -cert \(certs)/client-root.pem -key \(certs)/client-root-key.pem",
                ], timeout: 20)
            return r.stdout.contains("Cipher is \(cipher)")
        }
        #expect(try handshake("ECDHE-RSA-AES128-GCM-SHA256"))
        #expect(try !handshake("ECDHE-RSA-AES256-GCM-SHA384"))
    }

    // MARK: Helpers

    /// Sends `send` on a new connection and reads until the server closes (or `waitSeconds`).
    func rawExchange(port: UInt16, send: [UInt8], waitSeconds: Double) throws -> (closed: Bool, seconds: Double) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        try #require(rc == 0, "connect failed")
        _ = send.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let start = Date()
        var buf = [UInt8](repeating: 0, count: 4096)
        while Date().timeIntervalSince(start) < waitSeconds {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            let n = read(fd, &buf, buf.count)
            if n <= 0 { return (true, Date().timeIntervalSince(start)) }
        }
        return (false, waitSeconds)
    }
}
