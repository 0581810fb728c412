import Foundation
import Testing
import VigilTesting

/// `--auth-token jwt,…`: etcd's signed tokens through etcdctl and the gateway, checked both ways
/// with PyJWT (a standard JWT library): Vigil's tokens verify there, and tokens it signs with the
/// same key are accepted here.
@Suite(.serialized) struct JWTTests {
    let certs: String
    let python = "/usr/bin/python3"
    let curl: String

    init() throws {
        certs = try TestCertificates.directory()
        curl = try #require(which("curl"))
        let probe = try runCommand(python, ["-c", "import jwt, cryptography"])
        try #require(probe.status == 0, "python3-jwt is installed by scripts/install-deps.sh --test: \(probe.output)")
    }

    func server(_ method: String, key: String, extra: String = ",ttl=10m") throws -> (LiveServer, Etcdctl) {
        let s = try LiveServer(args: [
            "--unsafe-no-fsync", "--auth-token",
            "jwt,pub-key=\(certs)/\(key).pub.pem,priv-key=\(certs)/\(key).pem,sign-method=\(method)\(extra)",
        ])
        let ctl = try Etcdctl(endpoint: s.endpoint)
        _ = try ctl.ok("user", "add", "root:rootpw")
        #expect(try ctl.ok("auth", "enable") == "Authentication Enabled\n")
        return (s, ctl)
    }

    /// `POST path` with an Authorization header; the body, then the status on the last line.
    func post(_ s: LiveServer, _ path: String, _ body: String, token: String? = nil) throws -> (String, Int) {
        var args = ["-s", "-w", "\n%{http_code}", "\(s.url)\(path)", "-d", body]
        if let token { args += ["-H", "Authorization: \(token)"] }
        let out = try runCommand(curl, args).stdout
        let parts = out.split(separator: "\n", omittingEmptySubsequences: false)
        return (parts.dropLast().joined(separator: "\n"), Int(parts.last ?? "") ?? 0)
    }

    func token(_ s: LiveServer) throws -> String {
        let (body, status) = try post(s, "/v3/auth/authenticate", #"{"name":"root","password":"rootpw"}"#)
        #expect(status == 200)
        let json = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
        return try #require(json?["token"] as? String)
    }

    /// PyJWT's view of a token: "username revision seconds-left", or its error.
    func pyDecode(_ token: String, key: String, method: String) throws -> String {
        try runCommand(
            python,
            [
                "-c",
                "import jwt, sys, time; c = jwt.decode(sys.argv[1], open(sys.argv[2]).read(), algorithms=[sys.argv[3]]); "
                    + "print(c['username'], c['revision'], int(c['exp'] - time.time()))",
                token, "\(certs)/\(key).pub.pem", method,
            ]
        ).output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A token PyJWT signs with `key`.
    func pyEncode(user: String, revision: Int, expiresIn: Int, key: String, method: String) throws -> String {
        try runCommand(
            python,
            [
                "-c",
                "import jwt, sys, time; print(jwt.encode({'username': sys.argv[1], 'revision': int(sys.argv[2]), "
                    + "'exp': int(time.time()) + int(sys.argv[3])}, open(sys.argv[4]).read(), algorithm=sys.argv[5]))",
                user, String(revision), String(expiresIn), "\(certs)/\(key).pem", method,
            ]
        ).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func rs256TokensBothWays() throws {
        let (s, ctl) = try server("RS256", key: "jwt-rs")
        #expect(try ctl.ok("--user", "root:rootpw", "put", "k", "v") == "OK\n")
        #expect(try ctl.ok("--user", "root:rootpw", "get", "k", "--print-value-only") == "v\n")

        let t = try token(s)
        let claims = try pyDecode(t, key: "jwt-rs", method: "RS256").split(separator: " ")
        try #require(claims.count == 3, "PyJWT refused the token: \(claims)")
        #expect(claims[0] == "root")
        let revision = try #require(Int(claims[1]))
        #expect((590...600).contains(Int(claims[2]) ?? 0))  // ttl=10m
        let range = #"{"key":"aw=="}"#
        #expect(try post(s, "/v3/kv/range", range, token: t).1 == 200)

        // Signed elsewhere with the same key: accepted. Tampered or expired: refused.
        let foreign = try pyEncode(user: "root", revision: revision, expiresIn: 60, key: "jwt-rs", method: "RS256")
        let (body, status) = try post(s, "/v3/kv/range", range, token: foreign)
        #expect(status == 200 && body.contains("dg=="))
        let tampered = String(t.dropLast(2)) + (t.hasSuffix("AA") ? "BB" : "AA")
        let bad = try post(s, "/v3/kv/range", range, token: tampered)
        #expect(bad.1 == 401 && bad.0.contains("etcdserver: invalid auth token"))
        let expired = try pyEncode(user: "root", revision: revision, expiresIn: -10, key: "jwt-rs", method: "RS256")
        #expect(try post(s, "/v3/kv/range", range, token: expired).0.contains("etcdserver: invalid auth token"))
        // A token of another key (the ES pair, claiming RS256 cannot even be made): refused.
        let other = try pyEncode(user: "root", revision: revision, expiresIn: 60, key: "jwt-es", method: "ES256")
        #expect(try post(s, "/v3/kv/range", range, token: other).1 == 401)

        // Any auth change makes earlier tokens old; etcdctl authenticates again by itself.
        _ = try ctl.ok("--user", "root:rootpw", "user", "add", "bob:bobpw")
        let old = try post(s, "/v3/kv/range", range, token: t)
        #expect(old.1 == 400 && old.0.contains("etcdserver: revision of auth store is old"))
        #expect(try ctl.ok("--user", "root:rootpw", "get", "k", "--print-value-only") == "v\n")
        #expect(try ctl.fails("--user", "bob:wrong", "get", "k").contains("authentication failed"))
    }

    @Test(arguments: [("ES256", "jwt-es"), ("PS256", "jwt-rs"), ("RS512", "jwt-rs")])
    func otherSignMethods(_ method: String, _ key: String) throws {
        let (s, ctl) = try server(method, key: key, extra: "")
        #expect(try ctl.ok("--user", "root:rootpw", "put", "k", method) == "OK\n")
        let claims = try pyDecode(try token(s), key: key, method: method)
        #expect(claims.hasPrefix("root "), "PyJWT: \(claims)")
        // etcd's default ttl: 5 minutes.
        #expect((290...300).contains(Int(claims.split(separator: " ").last ?? "") ?? 0))
    }

    @Test func badOptionsAreRefusedAtStart() throws {
        let vigil = try vigilBinary()
        func start(_ spec: String) throws -> String {
            let r = try runCommand(vigil, ["--data-dir", "/nonexistent/never", "--auth-token", spec], timeout: 20)
            #expect(r.status != 0)
            return r.output
        }
        let rs = "pub-key=\(certs)/jwt-rs.pub.pem,priv-key=\(certs)/jwt-rs.pem"
        #expect(try start("jwt,\(rs),sign-method=HS999").contains("unsupported JWT sign-method HS999"))
        #expect(try start("jwt,\(rs)").contains("needs sign-method"))
        #expect(try start("jwt,\(rs),sign-method=ES256").contains("does not fit sign-method ES256"))
        #expect(try start("jwt,\(rs),sign-method=RS256,color=blue").contains("unknown --auth-token option"))
        #expect(try start("jwt,pub-key=/no/such.pem,sign-method=RS256").contains("/no/such.pem"))
        #expect(try start("kerberos").contains("unknown token type"))
    }
}
