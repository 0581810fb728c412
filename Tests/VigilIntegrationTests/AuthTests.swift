import EtcdProto
import Foundation
import GRPC
import SwiftProtobuf
import Testing
import VigilCore
import VigilTesting

/// Authentication and role-based access through the real etcdctl, and the gateway with curl.
@Suite(.serialized) struct AuthTests {
    let server: LiveServer
    let ctl: Etcdctl

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync", "--auth-token-ttl", "3"])
        ctl = try Etcdctl(endpoint: server.endpoint)
    }

    func asUser(_ user: String, _ args: String...) throws -> CommandResult { try ctl.run(["--user", user] + args) }

    /// root (with the root role, created by `auth enable` as etcdctl does it), and alice, who may
    /// read `app/` and write `app/alice/`.
    func setUp() throws {
        #expect(try ctl.ok("user", "add", "root:rootpw") == "User root created\n")
        #expect(try ctl.ok("user", "add", "alice:apw") == "User alice created\n")
        _ = try ctl.ok("role", "add", "app-reader")
        _ = try ctl.ok("role", "grant-permission", "app-reader", "read", "app/", "--prefix")
        _ = try ctl.ok("role", "add", "alice-writer")
        _ = try ctl.ok("role", "grant-permission", "alice-writer", "readwrite", "app/alice/", "--prefix")
        _ = try ctl.ok("user", "grant-role", "alice", "app-reader")
        _ = try ctl.ok("user", "grant-role", "alice", "alice-writer")
        #expect(try ctl.ok("auth", "enable") == "Authentication Enabled\n")
    }

    @Test func usersRolesAndPermissions() throws {
        #expect(try ctl.fails("auth", "enable").contains("etcdserver: root user does not exist"))
        try setUp()
        #expect(try ctl.fails("put", "x", "1").contains("etcdserver: user name is empty"))
        #expect(try asUser("root:rootpw", "put", "app/config", "v1").stdout == "OK\n")
        #expect(try asUser("root:rootpw", "put", "secret", "s").stdout == "OK\n")

        // alice reads app/, writes only app/alice/, sees nothing else.
        #expect(try asUser("alice:apw", "get", "app/config").stdout == "app/config\nv1\n")
        #expect(try asUser("alice:apw", "get", "app/", "--prefix", "--keys-only").stdout.contains("app/config"))
        #expect(try asUser("alice:apw", "put", "app/alice/x", "1").stdout == "OK\n")
        #expect(try asUser("alice:apw", "put", "app/config", "v2").output.contains("etcdserver: permission denied"))
        #expect(try asUser("alice:apw", "get", "secret").output.contains("etcdserver: permission denied"))
        #expect(try asUser("alice:apw", "get", "", "--from-key").output.contains("etcdserver: permission denied"))
        #expect(try asUser("alice:apw", "del", "app/config").output.contains("etcdserver: permission denied"))
        // A txn is checked on both branches: a forbidden write in the failure branch is refused.
        let txn = "value(\"app/config\") = \"v1\"\n\nput app/alice/y 1\n\nput secret 2\n\n"
        let t = try ctl.run(["--user", "alice:apw", "txn"], stdin: txn)
        #expect(t.output.contains("etcdserver: permission denied"))
        #expect(try asUser("root:rootpw", "get", "secret").stdout == "secret\ns\n")
        #expect(try asUser("alice:apw", "compaction", "1").output.contains("etcdserver: permission denied"))
        #expect(try asUser("alice:apw", "user", "list").output.contains("etcdserver: permission denied"))
        #expect(try asUser("alice:apw", "user", "get", "alice").stdout.contains("Roles: alice-writer app-reader"))
        #expect(try asUser("alice:apw", "role", "get", "app-reader").stdout.contains("[app/, app0) (prefix app/)"))
        #expect(try asUser("alice:apw", "role", "get", "root").output.contains("etcdserver: permission denied"))

        // Wrong or unknown credentials.
        #expect(
            try asUser("alice:nope", "get", "app/config").output
                .contains("etcdserver: authentication failed, invalid user ID or password"))
        #expect(
            try asUser("mallory:x", "get", "app/config").output
                .contains("etcdserver: authentication failed, invalid user ID or password"))

        // Listings are sorted.
        #expect(try asUser("root:rootpw", "user", "list").stdout == "alice\nroot\n")
        #expect(try asUser("root:rootpw", "role", "list").stdout == "alice-writer\napp-reader\nroot\n")

        // Revoking takes effect on the next request.
        _ = try asUser("root:rootpw", "role", "revoke-permission", "app-reader", "app/", "--prefix")
        #expect(try asUser("alice:apw", "get", "app/config").output.contains("etcdserver: permission denied"))
        #expect(try asUser("alice:apw", "get", "app/alice/x").stdout == "app/alice/x\n1\n")

        // Guard rails while enabled.
        #expect(
            try asUser("root:rootpw", "user", "delete", "root").output.contains("etcdserver: invalid auth management"))
        #expect(
            try asUser("root:rootpw", "role", "delete", "root").output.contains("etcdserver: invalid auth management"))
        #expect(
            try asUser("root:rootpw", "user", "revoke-role", "alice", "root").output
                .contains("etcdserver: role is not granted to the user"))
        #expect(
            try asUser("root:rootpw", "user", "grant-role", "alice", "nope").output.contains(
                "etcdserver: role name not found"))
        #expect(
            try asUser("root:rootpw", "user", "add", "alice:x").output.contains("etcdserver: user name already exists"))

        // A changed password ends the old one; a deleted user cannot sign in.
        let pw = try ctl.run(
            ["--user", "root:rootpw", "user", "passwd", "alice", "--interactive=false"], stdin: "apw2\n")
        #expect(pw.stdout == "Password updated\n")
        #expect(try asUser("alice:apw", "get", "app/alice/x").output.contains("authentication failed"))
        #expect(try asUser("alice:apw2", "get", "app/alice/x").stdout == "app/alice/x\n1\n")
        _ = try asUser("root:rootpw", "user", "delete", "alice")
        #expect(try asUser("alice:apw2", "get", "app/alice/x").output.contains("authentication failed"))

        #expect(try asUser("root:rootpw", "auth", "disable").stdout == "Authentication Disabled\n")
        #expect(try ctl.ok("get", "secret") == "secret\ns\n")
    }

    @Test func watchersAreCheckedAtCreate() throws {
        try setUp()
        let denied = try ctl.background(["--user", "alice:apw", "watch", "secret"])
        #expect(denied.wait { $0.contains("permission denied") })
        denied.stop()
        _ = try asUser("root:rootpw", "put", "app/k", "v")
        let allowed = try ctl.background(["--user", "alice:apw", "watch", "app/", "--prefix", "--rev", "1"])
        #expect(allowed.wait { $0.contains("PUT\napp/k\nv") })
        allowed.stop()
    }

    /// Beyond etcd: a watcher whose user loses the permission, or is deleted, is cancelled at
    /// once with etcd's permission-denied reason (etcd keeps delivering to it).
    @Test func revokingAccessEndsWatches() throws {
        try setUp()
        let reason = "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        let c = try BlockingClient(port: server.port)
        c.connection.metadata = [("token", try token(server, "alice", "apw"))]
        let w = WatchStreamClient(c.connection)
        w.create("app/", rangeEnd: "app0", watchID: 7)
        w.create("app/alice/", rangeEnd: "app/alice0", watchID: 8)
        w.create("secret", watchID: 9)
        c.runUntil(seconds: 10) { w.responses.count >= 3 }
        // Refused at create with etcd's words, as watch -1 (etcd 3.4.23 names no id).
        #expect(!w.responses.contains { $0.watchID == 9 })
        let denied = w.responses.first { $0.watchID == -1 }
        #expect(denied?.created == true && denied?.canceled == true && denied?.cancelReason == reason)
        _ = try asUser("root:rootpw", "put", "app/x", "1")
        c.runUntil(seconds: 10) { w.eventCount >= 1 }
        #expect(w.eventCount == 1)

        // Losing the role that grants app/ ends watch 7, not watch 8 (alice still writes app/alice/).
        _ = try asUser("root:rootpw", "user", "revoke-role", "alice", "app-reader")
        c.runUntil(seconds: 10) { w.responses.contains { $0.watchID == 7 && $0.canceled } }
        #expect(w.responses.first { $0.watchID == 7 && $0.canceled }?.cancelReason == reason)
        _ = try asUser("root:rootpw", "put", "app/y", "2")
        _ = try asUser("root:rootpw", "put", "app/alice/z", "3")
        c.runUntil(seconds: 10) { w.eventCount >= 2 }
        #expect(w.events.map { String(decoding: $0.kv.key, as: UTF8.self) } == ["app/x", "app/alice/z"])

        // Deleting the user ends the rest.
        _ = try asUser("root:rootpw", "user", "delete", "alice")
        c.runUntil(seconds: 10) { w.responses.contains { $0.watchID == 8 && $0.canceled } }
        #expect(w.responses.first { $0.watchID == 8 && $0.canceled }?.cancelReason == reason)
    }

    /// A token sent empty, or one that expired, names no one: etcd's `invalid auth token`, on a
    /// unary call (Unauthenticated) and on a watch create (watch -1, canceled with that reason).
    @Test func emptyAndExpiredTokens() throws {
        try setUp()
        let c = try BlockingClient(port: server.port)
        var get = Etcdserverpb_RangeRequest()
        get.key = Data("app/x".utf8)
        // No token at all is a missing user; an empty one is a bad token.
        guard case .failure(let none) = c.call(EtcdMethod.range.path, get, as: Etcdserverpb_RangeResponse.self) else {
            Issue.record("a read without a token was accepted")
            return
        }
        #expect(none.code == .invalidArgument && none.message == "etcdserver: user name is empty")
        c.connection.metadata = [("token", "")]
        guard case .failure(let e) = c.call(EtcdMethod.range.path, get, as: Etcdserverpb_RangeResponse.self) else {
            Issue.record("an empty token was accepted")
            return
        }
        #expect(e.code == .unauthenticated && e.message == "etcdserver: invalid auth token")

        // A token left unused past --auth-token-ttl (3 s) has expired.
        let stale = try token(server, "alice", "apw")
        usleep(4_500_000)
        c.connection.metadata = [("token", stale)]
        let w = WatchStreamClient(c.connection)
        w.create("app/", rangeEnd: "app0", watchID: 3)
        c.runUntil(seconds: 10) { !w.responses.isEmpty }
        let refused = w.responses.first
        #expect(refused?.watchID == -1 && refused?.created == true && refused?.canceled == true)
        #expect(refused?.cancelReason == "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token")
    }

    /// etcd takes user and role names as bytes: names that are not UTF-8 work, and come back as
    /// the same bytes.
    @Test func namesThatAreNotUTF8() throws {
        let c = try BlockingClient(port: server.port)
        func field(_ n: UInt8, _ bytes: [UInt8]) -> [UInt8] { [n << 3 | 2, UInt8(bytes.count)] + bytes }
        let user: [UInt8] = [0xFF, 0x61, 0xC3]  // not UTF-8
        let role: [UInt8] = [0x72, 0xFE]
        #expect(throws: Never.self) {
            try c.unary(EtcdMethod.userAdd.path, field(1, user) + field(2, Array("pw".utf8))).get()
        }
        #expect(throws: Never.self) { try c.unary(EtcdMethod.roleAdd.path, field(1, role)).get() }
        #expect(throws: Never.self) {
            try c.unary(EtcdMethod.userGrantRole.path, field(1, user) + field(2, role)).get()
        }
        // The list and the user's roles come back as the bytes sent (SwiftProtobuf would refuse
        // to decode them: look at the raw answer).
        let list = try c.unary(EtcdMethod.userList.path, []).get()
        #expect(list.contains(subsequence: field(2, user)))
        let got = try c.unary(EtcdMethod.userGet.path, field(1, user)).get()
        #expect(got.contains(subsequence: field(2, role)))
        let roles = try c.unary(EtcdMethod.roleList.path, []).get()
        #expect(roles.contains(subsequence: field(2, role)))
        // etcdctl, which sends Go strings as they are, sees the same user.
        let bash = try runCommand(
            "/bin/bash", ["-c", "ETCDCTL_API=3 \(ctl.binary) --endpoints=\(server.endpoint) user get $'\\xffa\\xc3'"])
        #expect(bash.status == 0, "\(bash.output)")
        #expect(try c.unary(EtcdMethod.userDelete.path, field(1, user)).get().count > 0)
        if case .success = c.unary(EtcdMethod.userGet.path, field(1, user)) { Issue.record("the user is still there") }
    }

    @Test func leasesNeedWriteOnTheirKeys() throws {
        try setUp()
        _ = try ctl.ok("--user", "root:rootpw", "user", "add", "bob:bpw")
        let grant = try asUser("alice:apw", "lease", "grant", "60").stdout
        #expect(grant.contains("granted with TTL(60s)"))
        let id = String(grant.split(separator: " ")[1])
        #expect(try asUser("alice:apw", "put", "--lease=\(id)", "app/alice/session", "1").stdout == "OK\n")
        #expect(try asUser("bob:bpw", "lease", "revoke", id).output.contains("etcdserver: permission denied"))
        #expect(
            try asUser("bob:bpw", "lease", "timetolive", "--keys", id).output.contains("etcdserver: permission denied"))
        #expect(
            try asUser("alice:apw", "lease", "timetolive", "--keys", id).stdout.contains(
                "attached keys([app/alice/session])"))
        #expect(try asUser("alice:apw", "lease", "revoke", id).stdout == "lease \(id) revoked\n")
    }

    @Test func enableCreatesTheRootRoleAndStateSurvivesRestart() throws {
        _ = try ctl.ok("user", "add", "root:rootpw")
        // etcdctl adds the root role and grants it when the server says it is missing.
        #expect(try ctl.ok("auth", "enable") == "Authentication Enabled\n")
        #expect(try asUser("root:rootpw", "user", "get", "root").stdout.contains("Roles: root"))
        _ = try asUser("root:rootpw", "user", "add", "carol", "--no-password")
        try server.restart()
        #expect(try ctl.fails("get", "k").contains("etcdserver: user name is empty"))
        #expect(try asUser("root:rootpw", "put", "k", "v").stdout == "OK\n")
        #expect(try asUser("root:rootpw", "user", "list").stdout == "carol\nroot\n")
        // A user without a password cannot sign in with one.
        #expect(try asUser("carol:any", "get", "k").output.contains("authentication failed"))
    }

    func post(_ server: LiveServer, _ path: String, _ body: String, token: String? = nil) throws -> (Int, String) {
        let curl = try #require(which("curl"))
        let h = token.map { ["-H", "Authorization: \($0)"] } ?? []
        // The body goes through stdin: hostile bodies are larger than one argument may be.
        let r = try runCommand(
            curl, ["-s", "-X", "POST", "-w", "\n%{http_code}"] + h + ["\(server.url)\(path)", "--data-binary", "@-"],
            stdin: body)
        let lines = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
    }

    func token(_ server: LiveServer, _ name: String, _ password: String) throws -> String {
        let (status, body) = try post(
            server, "/v3/auth/authenticate", #"{"name":"\#(name)","password":"\#(password)"}"#)
        #expect(status == 200)
        let json = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any]
        return try #require(json?["token"] as? String)
    }

    /// Tokens over the gateway: the Authorization header, and expiry after the TTL without use.
    @Test func gatewayTokens() throws {
        try setUp()
        let token = try token(server, "alice", "apw")
        #expect(token.range(of: #"^[A-Za-z]{16}\.[0-9]+$"#, options: .regularExpression) != nil)
        let key = Data("app/alice/k".utf8).base64EncodedString()
        #expect(try post(server, "/v3/kv/put", #"{"key":"\#(key)","value":"dg=="}"#, token: token).0 == 200)
        #expect(
            try post(server, "/v3/kv/put", #"{"key":"c2VjcmV0","value":"dg=="}"#, token: token) == (
                403, #"{"error":"etcdserver: permission denied","message":"etcdserver: permission denied","code":7}"#
            ))
        #expect(try post(server, "/v3/kv/range", #"{"key":"\#(key)"}"#).1.contains("etcdserver: user name is empty"))
        // Used within the TTL (3 s here) it stays valid past it; unused for longer it expires.
        usleep(1_000_000)
        #expect(try post(server, "/v3/kv/range", #"{"key":"\#(key)"}"#, token: token).0 == 200)
        usleep(1_000_000)
        #expect(try post(server, "/v3/kv/range", #"{"key":"\#(key)"}"#, token: token).0 == 200)
        usleep(1_500_000)
        #expect(try post(server, "/v3/kv/range", #"{"key":"\#(key)"}"#, token: token).0 == 200)
        usleep(4_000_000)
        #expect(
            try post(server, "/v3/kv/range", #"{"key":"\#(key)"}"#, token: token) == (
                401, #"{"error":"etcdserver: invalid auth token","message":"etcdserver: invalid auth token","code":16}"#
            ))
        #expect(try post(server, "/v3/kv/range", #"{"key":"\#(key)"}"#, token: "forged.1").0 == 401)
        // grpc-gateway clients may send the token as `Grpc-Metadata-Token`.
        let fresh = try self.token(server, "alice", "apw")
        let viaMetadata = try runCommand(
            try #require(which("curl")),
            [
                "-s", "-H", "Grpc-Metadata-Token: \(fresh)", "\(server.url)/v3/kv/range", "-d", #"{"key":"\#(key)"}"#,
            ])
        #expect(viaMetadata.stdout.contains(#""kvs""#), "\(viaMetadata.output)")
    }

    /// Hostile input to the Auth service: each gets a clear error, never a crash, and the server
    /// keeps serving. (Found this way: a 100 KB user name once overflowed the backend's key size
    /// and stopped the server at commit.)
    @Test func hostileInputGetsErrors() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        _ = try ctl.ok("user", "add", "root:rootpw")
        _ = try ctl.ok("role", "add", "r")
        _ = try ctl.ok("auth", "enable")
        let root = try token(server, "root", "rootpw")
        #expect(
            try post(server, "/v3/auth/user/add", #"{"name":"","password":"x"}"#, token: root).1.contains(
                "etcdserver: user name is empty"))
        #expect(
            try post(server, "/v3/auth/role/add", #"{"name":""}"#, token: root).1.contains(
                "etcdserver: role name is empty"))
        #expect(
            try post(server, "/v3/auth/authenticate", #"{"name":"","password":""}"#).1.contains("authentication failed")
        )
        let long = String(repeating: "n", count: 100_000)
        #expect(
            try post(server, "/v3/auth/authenticate", #"{"name":"\#(long)","password":"x"}"#).1.contains(
                "authentication failed"))
        #expect(try post(server, "/v3/auth/user/add", #"{"name":"\#(long)","password":"x"}"#, token: root).0 == 200)
        #expect(try post(server, "/v3/auth/role/add", #"{"name":"\#(long)"}"#, token: root).0 == 200)
        #expect(
            try post(server, "/v3/auth/user/grant", #"{"user":"\#(long)","role":"\#(long)"}"#, token: root).0 == 200)
        #expect(try post(server, "/v3/auth/user/get", #"{"name":"\#(long)"}"#, token: root).1.contains(long))
        let tooLong = String(repeating: "p", count: 73)
        #expect(
            try post(server, "/v3/auth/user/add", #"{"name":"dave","password":"\#(tooLong)"}"#, token: root).1
                .contains("at most 72 bytes"))
        #expect(
            try post(server, "/v3/auth/role/grant", #"{"name":"r"}"#, token: root).1.contains(
                "etcdserver: permission not given"))
        #expect(
            try post(
                server, "/v3/auth/role/grant", #"{"name":"r","perm":{"key":"Yg==","range_end":"YQ=="}}"#, token: root
            ).1
                .contains("etcdserver: invalid auth management"))
        #expect(
            try post(server, "/v3/auth/role/revoke", #"{"role":"r","key":"Yg=="}"#, token: root).1
                .contains("etcdserver: permission is not granted to the role"))
        #expect(
            try post(server, "/v3/auth/user/get", #"{"name":"nobody"}"#, token: root).1.contains(
                "etcdserver: user name not found"))
        #expect(
            try post(server, "/v3/auth/role/get", #"{"role":"nobody"}"#, token: root).1.contains(
                "etcdserver: role name not found"))
        #expect(try post(server, "/v3/auth/status", "{}", token: root).1.contains(#""enabled":true"#))
        // etcd checks a request's shape before its sender.
        #expect(
            try post(server, "/v3/kv/put", #"{"key":"","value":"dg=="}"#).1.contains("etcdserver: key is not provided"))
        // A lease's time-to-live without its keys needs no token.
        #expect(try post(server, "/v3/lease/timetolive", #"{"ID":"12345"}"#).1.contains(#""TTL":"-1""#))
        #expect(
            try post(server, "/v3/lease/timetolive", #"{"ID":"12345","keys":true}"#).1.contains(
                "etcdserver: user name is empty"))
        // A hash sent by the client is ignored (its cost would be paid by every login attempt).
        let slow = "$2b$31$" + String(repeating: "a", count: 53)
        #expect(
            try post(
                server, "/v3/auth/user/add", #"{"name":"erin","password":"epw","hashedPassword":"\#(slow)"}"#,
                token: root
            ).0 == 200)
        #expect(try post(server, "/v3/auth/authenticate", #"{"name":"erin","password":"epw"}"#).0 == 200)
        // A user created without a password keeps signing in without one after a password change.
        #expect(
            try post(server, "/v3/auth/user/add", #"{"name":"frank","options":{"no_password":true}}"#, token: root).0
                == 200)
        #expect(try post(server, "/v3/auth/user/changepw", #"{"name":"frank","password":"fpw"}"#, token: root).0 == 200)
        #expect(
            try post(server, "/v3/auth/authenticate", #"{"name":"frank","password":"fpw"}"#).1.contains(
                "authentication failed"))
        // The long names survive a restart (they are stored under a digest of the name).
        try server.restart()
        #expect(
            try post(server, "/v3/auth/user/list", "{}", token: try token(server, "root", "rootpw")).1.contains(long))
    }

    /// A flood of wrong passwords (2,000 at once on one connection) is answered with errors while
    /// reads and writes from another connection go on: hashing runs off the loop, two at a time,
    /// and what does not fit the queue is refused.
    @Test func bruteForceFloodDoesNotStallOthers() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync", "--bcrypt-cost", "4"])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        _ = try ctl.ok("user", "add", "root:rootpw")
        _ = try ctl.ok("auth", "enable")
        let client = try BlockingClient(port: server.port)
        var auth = Etcdserverpb_AuthenticateRequest()
        auth.name = "root"
        auth.password = "rootpw"
        let token = try client.call(EtcdMethod.authenticate.path, auth, as: Etcdserverpb_AuthenticateResponse.self)
            .get().token

        let attacker = try client.newConnection()
        var codes: [GRPCCode: Int] = [:]
        var answered = 0
        for i in 0..<2000 {
            var bad = Etcdserverpb_AuthenticateRequest()
            bad.name = i % 2 == 0 ? "root" : "nobody\(i)"
            bad.password = "guess\(i)"
            attacker.unary(EtcdMethod.authenticate.path, bad) {
                (r: Result<Etcdserverpb_AuthenticateResponse, GRPCStatus>) in
                answered += 1
                if case .failure(let s) = r { codes[s.code, default: 0] += 1 }
            }
        }
        // While the flood is being worked through, a writer with a valid token is served promptly.
        var put = Etcdserverpb_PutRequest()
        put.key = Data("k".utf8)
        put.value = Data("v".utf8)
        var worst = 0.0
        for _ in 0..<10 {
            let t0 = Date()
            let r = client.unary(EtcdMethod.put.path, try put.serializedBytes(), metadata: [("token", token)])
            worst = max(worst, Date().timeIntervalSince(t0))
            #expect((try? r.get()) != nil)
        }
        client.runUntil(seconds: 60) { answered == 2000 }
        #expect(answered == 2000)
        #expect(codes[.ok] == nil, "no guess succeeded")
        #expect((codes[.invalidArgument] ?? 0) + (codes[.resourceExhausted] ?? 0) == 2000, "\(codes)")
        #expect(worst < 1.0 * sanitizerFactor, "a put waited \(worst) s behind the flood")
        #expect(try ctl.ok("--user", "root:rootpw", "get", "k") == "k\nv\n")
    }
}

extension Array where Element == UInt8 {
    func contains(subsequence: [UInt8]) -> Bool {
        guard subsequence.count <= count else { return false }
        return (0...(count - subsequence.count)).contains {
            self[$0..<($0 + subsequence.count)].elementsEqual(subsequence)
        }
    }
}
