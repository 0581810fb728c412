import VigilCore

/// `--auth-token-ttl`, `--bcrypt-cost`, and how much password hashing may queue.
public struct AuthConfig: Sendable {
    /// Seconds a simple token stays valid after its last use (etcd's default 300).
    public var tokenTTLSeconds = 300
    /// bcrypt cost for new password hashes (etcd's default 10; 4...31).
    public var bcryptCost = 10
    /// Password hashes computed at once at most (each holds a worker thread of the loop's pool,
    /// which group commits need too); more wait in a queue of `maxQueuedHashes`.
    public var concurrentHashes = 2
    public var maxQueuedHashes = 1024
    /// `--auth-token jwt,…`: signed tokens instead of simple ones (nil = simple).
    public var jwt: (any TokenIssuer)?
    public init() {}
}

/// Signed, self-contained tokens (etcd's JWT): the user and the auth revision they were issued at.
public protocol TokenIssuer: Sendable {
    /// A token for `username` issued at auth revision `revision`; nil if this issuer only checks.
    func issue(username: String, revision: UInt64) -> String?
    /// The user and revision of a valid, unexpired token; nil otherwise.
    func check(_ token: String) -> (username: String, revision: UInt64)?
}

/// Runs `work` off the loop, then `done` on it (the server's thread pool; at once in tests).
public typealias Offload = (_ work: @escaping @Sendable () -> Void, _ done: @escaping () -> Void) -> Void

/// etcd's auth store: the enabled flag, users with bcrypt password hashes, roles with key-range
/// permissions, simple tokens, and the permission checks every service asks before it acts.
///
/// It knows neither protobuf nor storage: its state comes in as an `AuthState`, its changes go out
/// through `AuthRecords`, time comes from a `MonotonicClock`, and password hashes are computed by
/// a `PasswordHasher` off the loop through `offload`. Single-threaded: call it from the loop.
public final class AuthStore {
    public private(set) var enabled = false
    /// Moves on every change of users, roles, permissions or the enabled flag.
    public private(set) var revision: UInt64 = 0
    private var users: [String: AuthUser] = [:]
    private var roles: [String: AuthRole] = [:]

    private struct Token {
        let user: String
        var expiresAt: UInt64
    }
    private var tokens: [String: Token] = [:]
    private var tokenIndex: UInt64
    private var sweepAt = 1024

    /// Each user's merged permission intervals, rebuilt after any change.
    private var permissionCache: [String: Permissions] = [:]

    private let config: AuthConfig
    private let clock: any MonotonicClock
    private let records: any AuthRecords
    private let hasher: any PasswordHasher
    private let offload: Offload
    /// The keys attached to a lease (the lessor's answer).
    private let leaseKeys: (Int64) -> Set<[UInt8]>
    private var hashesRunning = 0
    private var hashQueue: [() -> Void] = []
    /// A hash of nothing in particular: unknown users cost as much as known ones to try.
    private var decoyHash: String?

    public static let rootName = "root"

    /// - Parameters:
    ///   - leaseKeys: the keys attached to a lease (lease calls need write permission on them).
    ///   - tokenIndexStart: the first simple token's index (etcd starts from the store revision,
    ///     so tokens of a restarted server do not repeat earlier ones).
    public init(
        state: AuthState, config: AuthConfig, clock: any MonotonicClock, records: any AuthRecords,
        hasher: any PasswordHasher, offload: @escaping Offload,
        leaseKeys: @escaping (Int64) -> Set<[UInt8]> = { _ in [] }, tokenIndexStart: UInt64 = 0
    ) {
        self.leaseKeys = leaseKeys
        self.config = config
        self.clock = clock
        self.records = records
        self.hasher = hasher
        self.offload = offload
        enabled = state.enabled
        revision = state.revision
        for u in state.users { users[u.name] = u }
        for r in state.roles { roles[r.name] = r }
        tokenIndex = tokenIndexStart
    }

    // MARK: Callers and permissions

    /// The caller behind `token`, or nil when auth is disabled (everything is allowed then). A
    /// valid simple token lives `tokenTTLSeconds` more from now. Without a token, a verified TLS
    /// client certificate's Common Name is the user (etcd's CN auth, with `--client-cert-auth`).
    public func caller(token: String?, commonName: String? = nil) throws(EtcdError) -> Caller? {
        guard enabled else { return nil }
        guard var token else {
            if let cn = commonName, !cn.isEmpty {
                return Caller(name: cn, isRoot: users[cn]?.roles.contains(Self.rootName) ?? false)
            }
            throw .userEmpty
        }
        // A token sent empty is a token that names no one (etcd looks every sent token up).
        guard !token.isEmpty else { throw .invalidAuthToken }
        if token.hasPrefix("Bearer ") { token.removeFirst(7) }
        if let jwt = config.jwt { return try jwtCaller(token, jwt) }
        let t = clock.nowMilliseconds
        guard var entry = tokens[token] else { throw .invalidAuthToken }
        guard entry.expiresAt > t else {
            tokens[token] = nil
            throw .invalidAuthToken
        }
        entry.expiresAt = t + UInt64(config.tokenTTLSeconds) * 1000
        tokens[token] = entry
        guard let u = users[entry.user] else { throw .userNotFound }
        return Caller(name: entry.user, isRoot: u.roles.contains(Self.rootName))
    }

    /// Tokens already checked, so that a signature is verified once per token, not per request.
    private var checkedJWTs: [String: (user: String, revision: UInt64, until: UInt64)] = [:]

    private func jwtCaller(_ token: String, _ jwt: any TokenIssuer) throws(EtcdError) -> Caller {
        let now = clock.nowMilliseconds
        let user: String
        let rev: UInt64
        if let seen = checkedJWTs[token], seen.until > now {
            (user, rev) = (seen.user, seen.revision)
        } else {
            guard let claims = jwt.check(token) else { throw .invalidAuthToken }
            (user, rev) = claims
            if checkedJWTs.count >= 4096 { checkedJWTs.removeAll() }
            // Rechecked at least every 10 s, so expiry is noticed.
            checkedJWTs[token] = (user, rev, now + 10_000)
        }
        guard rev >= revision else { throw .authOldRevision }
        guard let u = users[user] else { throw .userNotFound }
        return Caller(name: user, isRoot: u.roles.contains(Self.rootName))
    }

    /// etcd's admin check: the caller must hold the root role.
    public func requireAdmin(_ c: Caller?) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        throw .permissionDenied
    }

    public enum Need: Sendable { case read, write }

    /// Checks that the caller may `need` the whole range [key, rangeEnd) (etcd's conventions:
    /// empty end = the key alone, "\0" = every key from `key`).
    public func check(_ c: Caller?, _ need: Need, key: [UInt8], rangeEnd: [UInt8]) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        let perms = permissions(of: c.name)
        guard (need == .read ? perms.read : perms.write).contains(KeyInterval(key: key, rangeEnd: rangeEnd)) else {
            throw .permissionDenied
        }
    }

    /// `need` on every key attached to a lease.
    public func checkLeaseKeys(_ c: Caller?, _ lease: Int64, _ need: Need) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        for k in leaseKeys(lease) { try check(c, need, key: k, rangeEnd: []) }
    }

    private func permissions(of name: String) -> Permissions {
        if let p = permissionCache[name] { return p }
        var read: [KeyInterval] = [], write: [KeyInterval] = []
        for roleName in users[name]?.roles ?? [] {
            for p in roles[roleName]?.permissions ?? [] {
                let iv = KeyInterval(key: p.key, rangeEnd: p.rangeEnd)
                if p.grantsRead { read.append(iv) }
                if p.grantsWrite { write.append(iv) }
            }
        }
        let p = Permissions(read: IntervalUnion(read), write: IntervalUnion(write))
        permissionCache[name] = p
        return p
    }

    /// Records a change: the revision moves and cached permissions are dropped.
    private func changed() {
        revision += 1
        records.save(enabled: enabled, revision: revision)
        permissionCache.removeAll(keepingCapacity: true)
        onChange?()
    }

    /// Called after every change of users, roles, permissions or the enabled flag (the watch
    /// service then ends watches their users may no longer read).
    public var onChange: (() -> Void)?

    /// The caller named `name` as it stands now, nil if there is no such user.
    public func caller(named name: String) -> Caller? {
        guard let u = users[name] else { return nil }
        return Caller(name: name, isRoot: u.roles.contains(Self.rootName))
    }

    private func save(user u: AuthUser) {
        users[u.name] = u
        records.save(user: u)
    }

    private func save(role r: AuthRole) {
        roles[r.name] = r
        records.save(role: r)
    }

    private func user(_ name: String) throws(EtcdError) -> AuthUser {
        guard let u = users[name] else { throw .userNotFound }
        return u
    }

    // MARK: Password hashing off the loop

    /// Runs `work` off the loop with at most `concurrentHashes` at once; refuses with "too many
    /// requests" when the queue is full (a flood of Authenticate calls must not starve commits).
    /// Admin changes (`priority`) go to the front and are never refused: a flood of anonymous
    /// login attempts cannot lock the administrator out.
    private func hashing<T: Sendable>(
        priority: Bool = false, _ work: @escaping @Sendable () -> T, _ done: @escaping (T) -> Void
    ) throws(EtcdError) {
        guard priority || hashQueue.count < config.maxQueuedHashes else { throw .tooManyRequests }
        let box = ResultBox<T>()
        let job = { [unowned self] in
            offload(
                { box.value = work() },
                { [unowned self] in
                    hashesRunning -= 1
                    done(box.value!)
                    startHashes()
                })
        }
        if priority { hashQueue.insert(job, at: 0) } else { hashQueue.append(job) }
        startHashes()
    }

    private func startHashes() {
        while hashesRunning < config.concurrentHashes, !hashQueue.isEmpty {
            hashesRunning += 1
            hashQueue.removeFirst()()
        }
    }

    /// Waiting password checks (for tests and metrics).
    public var queuedHashes: Int { hashQueue.count }

    /// A value handed from a worker thread back to the loop (the pool orders the two accesses).
    private final class ResultBox<T>: @unchecked Sendable { var value: T? }

    /// A new hash of `password`, or etcd's request-level refusal of it.
    private func newHash(
        _ password: String, priority: Bool, _ done: @escaping (Result<String, EtcdError>) -> Void
    ) throws(EtcdError) {
        let cost = config.bcryptCost
        let hasher = self.hasher
        try hashing(
            priority: priority,
            { () -> Result<String, EtcdError> in
                do {
                    return .success(try hasher.hash(password, cost: cost))
                } catch let e as EtcdError {
                    return .failure(e)
                } catch {
                    return .failure(.internal("etcdserver: password hashing failed"))
                }
            }, done)
    }

    // MARK: Operations

    public func enable() throws(EtcdError) {
        if enabled { return }
        guard let root = users[Self.rootName] else { throw .rootUserNotExist }
        guard root.roles.contains(Self.rootName) else { throw .rootRoleNotExist }
        enabled = true
        tokens.removeAll()
        changed()
    }

    public func disable() {
        guard enabled else { return }
        enabled = false
        tokens.removeAll()
        changed()
    }

    /// Checks a password off the loop; gives a new simple token for the user.
    public func authenticate(
        name: String, password: String, _ done: @escaping (Result<String, EtcdError>) -> Void
    ) throws(EtcdError) {
        guard enabled else { throw .authNotEnabled }
        let stored = users[name].flatMap { $0.noPassword ? nil : $0.passwordHash }
        let decoy = decoyHash
        let cost = config.bcryptCost
        let hasher = self.hasher
        try hashing(
            { () -> LoginCheck in
                if let stored { return LoginCheck(matched: hasher.verify(password, hash: stored), decoy: nil) }
                // Unknown user or one without a password: spend the same time, then fail.
                let d = decoy ?? (try? hasher.hash("vigil-decoy", cost: cost))
                if let d { _ = hasher.verify(password, hash: d) }
                return LoginCheck(matched: false, decoy: d)
            },
            { [unowned self] (result: LoginCheck) in
                if decoyHash == nil, let d = result.decoy { decoyHash = d }
                // The user may have changed while the hash ran.
                guard result.matched, enabled, let u = users[name], u.passwordHash == stored else {
                    return done(.failure(.authFailed))
                }
                if let jwt = config.jwt {
                    guard let token = jwt.issue(username: name, revision: revision) else {
                        return done(.failure(.authFailed))
                    }
                    return done(.success(token))
                }
                done(.success(issueToken(for: name)))
            })
    }

    private struct LoginCheck: Sendable {
        var matched: Bool
        var decoy: String?
    }

    /// Computes the decoy hash off the loop ahead of the first login, so that an unknown user's
    /// attempt costs one check like a known user's from the start.
    public func prepareDecoy() {
        let cost = config.bcryptCost
        let hasher = self.hasher
        let box = ResultBox<String>()
        offload(
            { box.value = try? hasher.hash("vigil-decoy", cost: cost) },
            { [weak self] in
                if let self, decoyHash == nil { decoyHash = box.value }
            })
    }

    private func issueToken(for name: String) -> String {
        let t = clock.nowMilliseconds
        if tokens.count >= sweepAt {
            tokens = tokens.filter { $0.value.expiresAt > t }
            sweepAt = max(1024, tokens.count * 2)
        }
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ".utf8)
        var rng = SystemRandomNumberGenerator()
        var token: String
        repeat {
            tokenIndex += 1
            token =
                String(decoding: (0..<16).map { _ in letters.randomElement(using: &rng)! }, as: UTF8.self) + "."
                + String(tokenIndex)
        } while tokens[token] != nil
        tokens[token] = Token(user: name, expiresAt: t + UInt64(config.tokenTTLSeconds) * 1000)
        return token
    }

    private func dropTokens(of name: String) {
        tokens = tokens.filter { $0.value.user != name }
    }

    /// UserAdd: hashes the password off the loop (unless the user has none), then adds the user;
    /// `done` gets the outcome.
    public func addUser(
        name: String, password: String, noPassword: Bool, _ done: @escaping (EtcdError?) -> Void
    ) throws(EtcdError) {
        guard !name.isEmpty else { throw .userEmpty }
        guard users[name] == nil else { throw .userAlreadyExist }
        let add = { [unowned self] (hash: String) -> EtcdError? in
            guard users[name] == nil else { return .userAlreadyExist }
            save(user: AuthUser(name: name, passwordHash: hash, noPassword: noPassword))
            changed()
            return nil
        }
        if noPassword { return done(add("")) }
        try withHash(password, add, done)
    }

    /// Runs `apply` with the hash of `password`, computed off the loop; `done` gets `apply`'s
    /// outcome. (A client-sent hash is never taken, as etcd's API layer ignores it: a client must
    /// not choose the cost of a hash that others' login attempts will pay for.)
    private func withHash(
        _ password: String, _ apply: @escaping (String) -> EtcdError?, _ done: @escaping (EtcdError?) -> Void
    ) throws(EtcdError) {
        try newHash(password, priority: true) { result in
            switch result {
            case .success(let h): done(apply(h))
            case .failure(let e): done(e)
            }
        }
    }

    public func getUser(_ name: String) throws(EtcdError) -> [String] {
        guard !name.isEmpty else { throw .userEmpty }
        return try user(name).roles
    }

    public var userNames: [String] { users.keys.sorted() }
    public var roleNames: [String] { roles.keys.sorted() }

    public func deleteUser(_ name: String) throws(EtcdError) {
        guard !name.isEmpty else { throw .userEmpty }
        if enabled && name == Self.rootName { throw .invalidAuthMgmt }
        _ = try user(name)
        users[name] = nil
        records.deleteUser(named: name)
        dropTokens(of: name)
        changed()
    }

    public func changePassword(
        name: String, password: String, _ done: @escaping (EtcdError?) -> Void
    ) throws(EtcdError) {
        guard !name.isEmpty else { throw .userEmpty }
        _ = try user(name)
        let apply = { [unowned self] (hash: String) -> EtcdError? in
            guard var u = users[name] else { return .userNotFound }
            // The options stay: a user created without a password still signs in without one.
            u.passwordHash = hash
            save(user: u)
            dropTokens(of: name)
            changed()
            return nil
        }
        try withHash(password, apply, done)
    }

    public func grantRole(user name: String, role: String) throws(EtcdError) {
        guard !name.isEmpty else { throw .userEmpty }
        var u = try user(name)
        // The root role needs no role object.
        guard role == Self.rootName || roles[role] != nil else { throw .roleNotFound }
        guard !u.roles.contains(role) else { return }
        u.roles.append(role)
        u.roles.sort()
        save(user: u)
        changed()
    }

    public func revokeRole(user name: String, role: String) throws(EtcdError) {
        guard !name.isEmpty else { throw .userEmpty }
        if enabled && name == Self.rootName && role == Self.rootName { throw .invalidAuthMgmt }
        var u = try user(name)
        guard let i = u.roles.firstIndex(of: role) else { throw .roleNotGranted }
        u.roles.remove(at: i)
        save(user: u)
        changed()
    }

    public func addRole(_ name: String) throws(EtcdError) {
        guard !name.isEmpty else { throw .roleEmpty }
        guard roles[name] == nil else { throw .roleAlreadyExist }
        save(role: AuthRole(name: name))
        changed()
    }

    public func getRole(_ name: String) throws(EtcdError) -> [Permission] {
        guard !name.isEmpty else { throw .roleEmpty }
        guard let r = roles[name] else { throw .roleNotFound }
        return r.permissions
    }

    /// Whether the caller holds `role` (RoleGet is allowed to its holders).
    public func holds(_ c: Caller, role: String) -> Bool { users[c.name]?.roles.contains(role) ?? false }

    public func deleteRole(_ name: String) throws(EtcdError) {
        guard !name.isEmpty else { throw .roleEmpty }
        if enabled && name == Self.rootName { throw .invalidAuthMgmt }
        guard roles[name] != nil else { throw .roleNotFound }
        roles[name] = nil
        records.deleteRole(named: name)
        for (_, var u) in users where u.roles.contains(name) {
            u.roles.removeAll { $0 == name }
            save(user: u)
        }
        changed()
    }

    /// Grants `permission` to a role (replacing the kind of an equal range). `nil`: the request
    /// carried none.
    public func grantPermission(role name: String, _ permission: Permission?) throws(EtcdError) {
        guard !name.isEmpty else { throw .roleEmpty }
        guard var role = roles[name] else { throw .roleNotFound }
        guard let p = permission else { throw .permissionNotGiven }
        guard !p.key.isEmpty, p.rangeEnd.isEmpty || p.rangeEnd == [0] || less(p.key, p.rangeEnd) else {
            throw .invalidAuthMgmt
        }
        if let i = role.permissions.firstIndex(where: { $0.key == p.key && $0.rangeEnd == p.rangeEnd }) {
            role.permissions[i].kind = p.kind
        } else {
            role.permissions.append(p)
            role.permissions.sort { less($0.key, $1.key) }
        }
        save(role: role)
        changed()
    }

    public func revokePermission(role name: String, key: [UInt8], rangeEnd: [UInt8]) throws(EtcdError) {
        guard !name.isEmpty else { throw .roleEmpty }
        guard var role = roles[name] else { throw .roleNotFound }
        guard let i = role.permissions.firstIndex(where: { $0.key == key && $0.rangeEnd == rangeEnd }) else {
            throw .permissionNotGranted
        }
        role.permissions.remove(at: i)
        save(role: role)
        changed()
    }
}
