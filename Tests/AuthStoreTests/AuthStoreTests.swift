import Auth
import Testing
import VigilCore
import VigilTesting

/// What the auth store asked to record.
final class Records: AuthRecords {
    var users: [String: AuthUser] = [:]
    var roles: [String: AuthRole] = [:]
    var enabled = false
    var revision: UInt64 = 0
    func save(user: AuthUser) { users[user.name] = user }
    func deleteUser(named name: String) { users[name] = nil }
    func save(role: AuthRole) { roles[role.name] = role }
    func deleteRole(named name: String) { roles[name] = nil }
    func save(enabled: Bool, revision: UInt64) {
        self.enabled = enabled
        self.revision = revision
    }
    var state: AuthState {
        AuthState(enabled: enabled, revision: revision, users: Array(users.values), roles: Array(roles.values))
    }
}

/// An auth store whose hashing runs at once (or, with `deferred`, when the test says).
final class Harness {
    let clock = ManualClock()
    let records = Records()
    var pending: [() -> Void] = []
    var deferred = false
    var auth: AuthStore!

    init(config: AuthConfig = AuthConfig(), state: AuthState = AuthState()) {
        auth = AuthStore(
            state: state, config: config, clock: clock, records: records, hasher: CheapHasher(),
            offload: { [unowned self] work, done in
                let job = {
                    work()
                    done()
                }
                if deferred { pending.append(job) } else { job() }
            })
    }

    func runPending() {
        while !pending.isEmpty { pending.removeFirst()() }
    }

    func addUser(_ name: String, _ password: String) throws {
        var outcome: EtcdError?? = .none
        try auth.addUser(name: name, password: password, noPassword: false) { outcome = .some($0) }
        runPending()
        if case .some(let e?) = outcome { throw e }
    }

    func login(_ name: String, _ password: String) throws -> String {
        var result: Result<String, EtcdError>?
        try auth.authenticate(name: name, password: password) { result = $0 }
        runPending()
        return try result!.get()
    }

    /// root with the root role, alice with role r granting read on [a, c) and write on b.
    func standard() throws {
        try addUser("root", "rpw")
        try auth.grantRole(user: "root", role: "root")
        try addUser("alice", "apw")
        try auth.addRole("r")
        try auth.grantPermission(role: "r", Permission(kind: .read, key: Array("a".utf8), rangeEnd: Array("c".utf8)))
        try auth.grantPermission(role: "r", Permission(kind: .write, key: Array("b".utf8)))
        try auth.grantRole(user: "alice", role: "r")
        try auth.enable()
    }
}

private func b(_ s: String) -> [UInt8] { Array(s.utf8) }

@Suite struct AuthStoreTests {
    @Test func enablingNeedsARootUserWithTheRootRole() throws {
        let h = Harness()
        #expect(throws: EtcdError.rootUserNotExist) { try h.auth.enable() }
        try h.addUser("root", "pw")
        #expect(throws: EtcdError.rootRoleNotExist) { try h.auth.enable() }
        try h.auth.grantRole(user: "root", role: "root")
        try h.auth.enable()
        #expect(h.auth.enabled && h.records.enabled)
        #expect(throws: EtcdError.invalidAuthMgmt) { try h.auth.deleteUser("root") }
        #expect(throws: EtcdError.invalidAuthMgmt) { try h.auth.revokeRole(user: "root", role: "root") }
    }

    @Test func permissionsCoverWholeRanges() throws {
        let h = Harness()
        try h.standard()
        let alice = try #require(try h.auth.caller(token: try h.login("alice", "apw")))
        #expect(!alice.isRoot)
        try h.auth.check(alice, .read, key: b("a"), rangeEnd: b("c"))
        try h.auth.check(alice, .read, key: b("bz"), rangeEnd: [])
        try h.auth.check(alice, .write, key: b("b"), rangeEnd: [])
        #expect(throws: EtcdError.permissionDenied) { try h.auth.check(alice, .read, key: b("a"), rangeEnd: b("d")) }
        #expect(throws: EtcdError.permissionDenied) { try h.auth.check(alice, .write, key: b("bb"), rangeEnd: []) }
        #expect(throws: EtcdError.permissionDenied) { try h.auth.check(alice, .read, key: b("a"), rangeEnd: [0]) }
        // A revoked permission is gone for the next check.
        try h.auth.revokePermission(role: "r", key: b("b"), rangeEnd: [])
        #expect(throws: EtcdError.permissionDenied) { try h.auth.check(alice, .write, key: b("b"), rangeEnd: []) }
        // Root may do anything.
        let root = try h.auth.caller(token: try h.login("root", "rpw"))
        try h.auth.check(root, .write, key: b("zzz"), rangeEnd: [0])
        try h.auth.requireAdmin(root)
        #expect(throws: EtcdError.permissionDenied) { try h.auth.requireAdmin(alice) }
    }

    @Test func tokensExpireWhenUnusedForTheirTTL() throws {
        var config = AuthConfig()
        config.tokenTTLSeconds = 10
        let h = Harness(config: config)
        try h.standard()
        let token = try h.login("alice", "apw")
        #expect(token.range(of: #"^[A-Za-z]{16}\.[0-9]+$"#, options: .regularExpression) != nil)
        h.clock.advance(seconds: 9)
        _ = try h.auth.caller(token: token)  // used: ten more seconds
        h.clock.advance(seconds: 9)
        _ = try h.auth.caller(token: "Bearer " + token)
        h.clock.advance(seconds: 10)
        #expect(throws: EtcdError.invalidAuthToken) { try h.auth.caller(token: token) }
        #expect(throws: EtcdError.userEmpty) { try h.auth.caller(token: nil) }
        #expect(throws: EtcdError.invalidAuthToken) { try h.auth.caller(token: "forged.1") }
    }

    @Test func passwordChangesAndDeletionsEndTheUsersTokens() throws {
        let h = Harness()
        try h.standard()
        let t1 = try h.login("alice", "apw")
        var done: EtcdError?? = .none
        try h.auth.changePassword(name: "alice", password: "new") { done = .some($0) }
        #expect(done == .some(nil))
        #expect(throws: EtcdError.invalidAuthToken) { try h.auth.caller(token: t1) }
        #expect(throws: EtcdError.authFailed) { try h.login("alice", "apw") }
        let t2 = try h.login("alice", "new")
        try h.auth.deleteUser("alice")
        #expect(throws: EtcdError.invalidAuthToken) { try h.auth.caller(token: t2) }
        #expect(throws: EtcdError.authFailed) { try h.login("nobody", "x") }
    }

    @Test func changesAreRecordedAndComeBack() throws {
        let h = Harness()
        try h.standard()
        try h.auth.deleteRole("r")
        #expect(h.records.users["alice"]?.roles == [], "deleting a role takes it from its users")
        #expect(h.records.roles["r"] == nil && h.records.revision == h.auth.revision)
        let again = AuthStore(
            state: h.records.state, config: AuthConfig(), clock: h.clock, records: Records(), hasher: CheapHasher(),
            offload: { work, done in
                work()
                done()
            })
        #expect(again.enabled && again.revision == h.auth.revision)
        #expect(again.userNames == ["alice", "root"] && again.roleNames == [])
    }

    @Test func aLoginFloodIsBoundedAndAdminChangesGoFirst() throws {
        var config = AuthConfig()
        config.concurrentHashes = 1
        config.maxQueuedHashes = 3
        let h = Harness(config: config)
        try h.standard()
        h.deferred = true
        var outcomes: [String] = []
        for _ in 0..<4 {
            try h.auth.authenticate(name: "alice", password: "wrong") {
                outcomes.append((try? $0.get()) == nil ? "fail" : "ok")
            }
        }
        #expect(h.auth.queuedHashes == 3, "one runs, three wait")
        #expect(throws: EtcdError.tooManyRequests) {
            try h.auth.authenticate(name: "alice", password: "apw") { _ in }
        }
        // An admin change is never refused and runs before the waiting logins.
        try h.auth.addUser(name: "bob", password: "bpw", noPassword: false) { _ in outcomes.append("bob") }
        h.runPending()
        #expect(outcomes == ["fail", "bob", "fail", "fail", "fail"])
    }

    @Test func badNamesAndPermissionsAreRefused() throws {
        let h = Harness()
        #expect(throws: EtcdError.userEmpty) { try h.addUser("", "x") }
        #expect(throws: EtcdError.roleEmpty) { try h.auth.addRole("") }
        #expect(throws: EtcdError.passwordUnusable) { try h.addUser("long", String(repeating: "p", count: 73)) }
        try h.auth.addRole("r")
        #expect(throws: EtcdError.roleAlreadyExist) { try h.auth.addRole("r") }
        #expect(throws: EtcdError.permissionNotGiven) { try h.auth.grantPermission(role: "r", nil) }
        #expect(throws: EtcdError.invalidAuthMgmt) {
            try h.auth.grantPermission(role: "r", Permission(kind: .read, key: b("b"), rangeEnd: b("a")))
        }
        #expect(throws: EtcdError.permissionNotGranted) {
            try h.auth.revokePermission(role: "r", key: b("x"), rangeEnd: [])
        }
        #expect(throws: EtcdError.roleNotFound) { try h.auth.getRole("nope") }
        #expect(throws: EtcdError.userNotFound) { try h.auth.getUser("nope") }
    }
}

@Suite struct IntervalUnionTests {
    @Test func agreesWithABruteForceModel() {
        var rng = SystemRandomNumberGenerator()
        func key() -> [UInt8] {
            (0..<Int.random(in: 1...2, using: &rng)).map { _ in UInt8.random(in: 1...5, using: &rng) }
        }
        for _ in 0..<300 {
            var ivs: [KeyInterval] = []
            for _ in 0..<Int.random(in: 0...6, using: &rng) {
                let start = key()
                let end: [UInt8]? = Int.random(in: 0..<5, using: &rng) == 0 ? nil : key()
                ivs.append(KeyInterval(start: start, end: end))
            }
            let u = IntervalUnion(ivs)
            #expect(u.verifyInvariants())
            // A single key is covered exactly when some interval holds it.
            for _ in 0..<20 {
                let p = key()
                let want = ivs.contains { iv in
                    !p.lexicographicallyPrecedes(iv.start) && (iv.end.map { p.lexicographicallyPrecedes($0) } ?? true)
                }
                #expect(u.contains(KeyInterval(key: p, rangeEnd: [])) == want)
            }
        }
    }
}

@Suite struct UnknownPermissionKinds {
    /// etcd stores a permission type it does not know and grants nothing for it.
    @Test func anUnknownKindGrantsNothing() throws {
        let h = Harness()
        try h.standard()
        try h.auth.grantPermission(role: "r", Permission(kind: .init(rawValue: 3), key: Array("x".utf8)))
        #expect(try h.auth.getRole("r").contains { $0.kind.rawValue == 3 })
        let alice = try h.auth.caller(token: try h.login("alice", "apw"))
        #expect(throws: EtcdError.permissionDenied) {
            try h.auth.check(alice, .read, key: Array("x".utf8), rangeEnd: [])
        }
        #expect(throws: EtcdError.permissionDenied) {
            try h.auth.check(alice, .write, key: Array("x".utf8), rangeEnd: [])
        }
    }
}
