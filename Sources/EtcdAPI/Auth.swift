import EtcdProto
import Foundation
import MVCC
import Passwords

/// `--auth-token`, `--auth-token-ttl`, `--bcrypt-cost`.
public struct AuthConfig: Sendable {
    /// Seconds a simple token stays valid after its last use (etcd's default 300).
    public var tokenTTLSeconds = 300
    /// bcrypt cost for new password hashes (etcd's default 10; 4...31).
    public var bcryptCost = 10
    /// Password hashes computed at once at most (each holds a worker thread of the loop's pool,
    /// which group commits need too); more wait in a queue of `maxQueuedHashes`.
    public var concurrentHashes = 2
    public var maxQueuedHashes = 1024
    public init() {}
}

/// Who sent a request, once its token checked out (auth enabled only).
public struct Caller: Sendable {
    public let name: String
    /// Holds the `root` role: may do everything.
    public let isRoot: Bool
}

/// etcd's auth store: the enabled flag, users with bcrypt password hashes, roles with key-range
/// permissions, simple tokens, and the permission checks every service asks before it acts.
/// Lives on the loop; password hashing goes to the thread pool through `offload`.
///
/// Persistence: meta `auth/enabled` and `auth/revision`, blobs `auth/user/<id>` (authpb.User, the
/// password field holding the hash) and `auth/role/<id>` (authpb.Role), where `<id>` is the
/// SHA-256 of the name in hex (names may be longer than a backend key), written in the same group
/// commits as the data; answers wait for them to be durable.
public final class AuthStore {
    public private(set) var enabled = false
    /// Moves on every change of users, roles, permissions or the enabled flag.
    public private(set) var revision: UInt64 = 0
    private var users: [String: Authpb_User] = [:]
    private var roles: [String: Authpb_Role] = [:]

    private struct Token {
        let user: String
        var expiresAt: UInt64
    }
    private var tokens: [String: Token] = [:]
    private var tokenIndex: UInt64
    private var sweepAt = 1024

    /// Each user's merged permission intervals, rebuilt after any change.
    private var permissionCache: [String: Permissions] = [:]

    private let store: KVStore
    private let config: AuthConfig
    private let now: () -> UInt64
    /// Runs `work` off the loop, then `done` on it (the server plugs in its thread pool).
    var offload: (_ work: @escaping () -> Void, _ done: @escaping () -> Void) -> Void = { work, done in
        work()
        done()
    }
    /// The keys attached to a lease (the lessor plugs in here).
    var leaseKeys: (Int64) -> Set<Bytes> = { _ in [] }
    private var hashesRunning = 0
    private var hashQueue: [() -> Void] = []
    /// A hash of nothing in particular: unknown users cost as much as known ones to try.
    private var decoyHash: String?

    static let metaEnabled = "auth/enabled"
    static let metaRevision = "auth/revision"
    static let userPrefix = "auth/user/"
    static let rolePrefix = "auth/role/"
    static let rootName = "root"

    init(store: KVStore, meta: [String: Int64], blobs: [String: [UInt8]], config: AuthConfig,
         now: @escaping () -> UInt64) {
        self.store = store
        self.config = config
        self.now = now
        enabled = (meta[Self.metaEnabled] ?? 0) != 0
        revision = UInt64(max(meta[Self.metaRevision] ?? 0, 0))
        for (name, bytes) in blobs {
            if name.hasPrefix(Self.userPrefix), let u = try? Authpb_User(serializedBytes: bytes) {
                users[String(decoding: u.name, as: UTF8.self)] = u
            } else if name.hasPrefix(Self.rolePrefix), let r = try? Authpb_Role(serializedBytes: bytes) {
                roles[String(decoding: r.name, as: UTF8.self)] = r
            }
        }
        tokenIndex = UInt64(max(store.currentRevision, 0))
    }

    // MARK: Callers and permissions

    /// The caller behind `token`, or nil when auth is disabled (everything is allowed then).
    public func caller(token: String?) throws(EtcdError) -> Caller? {
        guard enabled else { return nil }
        guard var token, !token.isEmpty else { throw .userEmpty }
        if token.hasPrefix("Bearer ") { token.removeFirst(7) }
        let t = now()
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

    /// etcd's admin check: the caller must hold the root role.
    public func requireAdmin(_ c: Caller?) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        throw .permissionDenied
    }

    public enum Need { case read, write }

    /// Checks that the caller may `need` the whole range [key, rangeEnd) (etcd's conventions:
    /// empty end = the key alone, "\0" = every key from `key`).
    public func check(_ c: Caller?, _ need: Need, key: Bytes, rangeEnd: Bytes) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        let perms = permissions(of: c.name)
        guard (need == .read ? perms.read : perms.write).contains(KeyInterval(key: key, rangeEnd: rangeEnd)) else {
            throw .permissionDenied
        }
    }

    /// Put: write on the key, read too when the previous value is asked for, and write on every
    /// key already attached to the lease it names.
    public func check(_ c: Caller?, put r: Etcdserverpb_PutRequest) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        try check(c, .write, key: r.key.bytes, rangeEnd: [])
        if r.prevKv { try check(c, .read, key: r.key.bytes, rangeEnd: []) }
        if r.lease != 0 { try checkLeaseKeys(c, r.lease, .write) }
    }

    public func check(_ c: Caller?, deleteRange r: Etcdserverpb_DeleteRangeRequest) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        try check(c, .write, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes)
        if r.prevKv { try check(c, .read, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes) }
    }

    /// Txn: read on every compare's range, and every operation of both branches (a txn may take
    /// either), nested txns included.
    public func check(_ c: Caller?, txn r: Etcdserverpb_TxnRequest) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        for cmp in r.compare { try check(c, .read, key: cmp.key.bytes, rangeEnd: cmp.rangeEnd.bytes) }
        for op in r.success + r.failure {
            switch op.request {
            case .requestRange(let q): try check(c, .read, key: q.key.bytes, rangeEnd: q.rangeEnd.bytes)
            case .requestPut(let p): try check(c, put: p)
            case .requestDeleteRange(let d): try check(c, deleteRange: d)
            case .requestTxn(let t): try check(c, txn: t)
            case .none: break
            }
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
            for p in roles[roleName]?.keyPermission ?? [] {
                let iv = KeyInterval(key: p.key.bytes, rangeEnd: p.rangeEnd.bytes)
                if p.permType == .read || p.permType == .readwrite { read.append(iv) }
                if p.permType == .write || p.permType == .readwrite { write.append(iv) }
            }
        }
        let p = Permissions(read: IntervalUnion(read), write: IntervalUnion(write))
        permissionCache[name] = p
        return p
    }

    /// Records a change: the revision moves and cached permissions are dropped.
    private func changed() {
        revision += 1
        store.setMeta(Self.metaRevision, Int64(revision))
        permissionCache.removeAll(keepingCapacity: true)
    }

    /// The backend name of a user's or role's record.
    private static func blobName(_ prefix: String, _ name: String) -> String {
        var h = SHA256()
        h.update(Array(name.utf8))
        return prefix + h.finish().map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }

    private func save(user u: Authpb_User) {
        let name = String(decoding: u.name, as: UTF8.self)
        users[name] = u
        store.setBlob(Self.blobName(Self.userPrefix, name), try? u.serializedBytes())
    }

    private func save(role r: Authpb_Role) {
        let name = String(decoding: r.name, as: UTF8.self)
        roles[name] = r
        store.setBlob(Self.blobName(Self.rolePrefix, name), try? r.serializedBytes())
    }

    private func user(_ name: String) throws(EtcdError) -> Authpb_User {
        guard let u = users[name] else { throw .userNotFound }
        return u
    }

    // MARK: Password hashing off the loop

    /// Runs `work` on the pool with at most `concurrentHashes` at once; refuses with "too many
    /// requests" when the queue is full (a flood of Authenticate calls must not starve commits).
    /// Admin changes (`priority`) go to the front and are never refused: a flood of anonymous
    /// login attempts cannot lock the administrator out.
    private func hashing<T>(priority: Bool = false, _ work: @escaping () -> T, _ done: @escaping (T) -> Void) throws(EtcdError) {
        guard priority || hashQueue.count < config.maxQueuedHashes else { throw .tooManyRequests }
        let box = ResultBox<T>()
        let job = { [unowned self] in
            offload({ box.value = work() }, { [unowned self] in
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

    private final class ResultBox<T>: @unchecked Sendable { var value: T? }

    /// A new hash of `password`, or etcd's request-level refusal of it.
    private func newHash(_ password: String, priority: Bool,
                         _ done: @escaping (Result<String, EtcdError>) -> Void) throws(EtcdError) {
        let cost = config.bcryptCost
        try hashing(priority: priority, { () -> Result<String, EtcdError> in
            do throws(Passwords.Failure) {
                return .success(try Passwords.hash(password, cost: cost))
            } catch {
                return .failure(error == .unusable ? .passwordUnusable : EtcdError(.internal, "etcdserver: password hashing failed"))
            }
        }, done)
    }

    // MARK: Operations (each answers through `done` once the change is applied)

    public func enable() throws(EtcdError) {
        if enabled { return }
        guard let root = users[Self.rootName] else { throw .rootUserNotExist }
        guard root.roles.contains(Self.rootName) else { throw .rootRoleNotExist }
        enabled = true
        store.setMeta(Self.metaEnabled, 1)
        tokens.removeAll()
        changed()
    }

    public func disable() {
        guard enabled else { return }
        enabled = false
        store.setMeta(Self.metaEnabled, 0)
        tokens.removeAll()
        changed()
    }

    /// Checks a password off the loop; gives a new simple token for the user.
    public func authenticate(name: String, password: String,
                             _ done: @escaping (Result<String, EtcdError>) -> Void) throws(EtcdError) {
        guard enabled else { throw .authNotEnabled }
        let stored = users[name].flatMap { $0.options.noPassword ? nil : String(decoding: $0.password, as: UTF8.self) }
        let decoy = decoyHash
        let cost = config.bcryptCost
        try hashing({ () -> (Bool, String?) in
            if let stored { return (Passwords.verify(password, hash: stored), nil) }
            // Unknown user or one without a password: spend the same time, then fail.
            let d = decoy ?? (try? Passwords.hash("vigil-decoy", cost: cost))
            if let d { _ = Passwords.verify(password, hash: d) }
            return (false, d)
        }, { [unowned self] (result: (Bool, String?)) in
            if decoyHash == nil, let d = result.1 { decoyHash = d }
            // The user may have changed while the hash ran.
            guard result.0, enabled, let u = users[name], String(decoding: u.password, as: UTF8.self) == stored else {
                return done(.failure(.authFailed))
            }
            done(.success(issueToken(for: name)))
        })
    }

    /// Computes the decoy hash off the loop ahead of the first login, so that an unknown user's
    /// attempt costs one check like a known user's from the start.
    func prepareDecoy() {
        let cost = config.bcryptCost
        let box = ResultBox<String>()
        offload({ box.value = try? Passwords.hash("vigil-decoy", cost: cost) }, { [weak self] in
            if let self, decoyHash == nil { decoyHash = box.value }
        })
    }

    private func issueToken(for name: String) -> String {
        let t = now()
        if tokens.count >= sweepAt {
            tokens = tokens.filter { $0.value.expiresAt > t }
            sweepAt = max(1024, tokens.count * 2)
        }
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ".utf8)
        var rng = SystemRandomNumberGenerator()
        var token: String
        repeat {
            tokenIndex += 1
            token = String(decoding: (0..<16).map { _ in letters.randomElement(using: &rng)! }, as: UTF8.self) + "." + String(tokenIndex)
        } while tokens[token] != nil
        tokens[token] = Token(user: name, expiresAt: t + UInt64(config.tokenTTLSeconds) * 1000)
        return token
    }

    private func dropTokens(of name: String) {
        tokens = tokens.filter { $0.value.user != name }
    }

    /// UserAdd: hashes the password off the loop (unless the user has none), then adds the user.
    public func addUser(_ r: Etcdserverpb_AuthUserAddRequest, _ done: @escaping (EtcdError?) -> Void) throws(EtcdError) {
        guard !r.name.isEmpty else { throw .userEmpty }
        guard users[r.name] == nil else { throw .userAlreadyExist }
        let add = { [unowned self] (hash: String) -> EtcdError? in
            guard users[r.name] == nil else { return .userAlreadyExist }
            var u = Authpb_User()
            u.name = Data(r.name.utf8)
            u.password = Data(hash.utf8)
            if r.hasOptions { u.options = r.options }
            save(user: u)
            changed()
            return nil
        }
        if r.options.noPassword { return done(add("")) }
        try withHash(r.password, add, done)
    }

    /// Runs `apply` with the hash of `password`, computed off the loop; `done` gets `apply`'s
    /// outcome. A `hashed_password` sent by the client is ignored, as etcd's API layer ignores it:
    /// a client must not choose the cost of a hash that others' login attempts will pay for.
    private func withHash(_ password: String, _ apply: @escaping (String) -> EtcdError?,
                          _ done: @escaping (EtcdError?) -> Void) throws(EtcdError) {
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
        store.setBlob(Self.blobName(Self.userPrefix, name), nil)
        dropTokens(of: name)
        changed()
    }

    public func changePassword(_ r: Etcdserverpb_AuthUserChangePasswordRequest,
                               _ done: @escaping (EtcdError?) -> Void) throws(EtcdError) {
        guard !r.name.isEmpty else { throw .userEmpty }
        _ = try user(r.name)
        let apply = { [unowned self] (hash: String) -> EtcdError? in
            guard var u = users[r.name] else { return .userNotFound }
            // The options stay: a user created without a password still signs in without one.
            u.password = Data(hash.utf8)
            save(user: u)
            dropTokens(of: r.name)
            changed()
            return nil
        }
        try withHash(r.password, apply, done)
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
        var r = Authpb_Role()
        r.name = Data(name.utf8)
        save(role: r)
        changed()
    }

    public func getRole(_ name: String) throws(EtcdError) -> [Authpb_Permission] {
        guard !name.isEmpty else { throw .roleEmpty }
        guard let r = roles[name] else { throw .roleNotFound }
        return r.keyPermission
    }

    /// Whether the caller holds `role` (RoleGet is allowed to its holders).
    public func holds(_ c: Caller, role: String) -> Bool { users[c.name]?.roles.contains(role) ?? false }

    public func deleteRole(_ name: String) throws(EtcdError) {
        guard !name.isEmpty else { throw .roleEmpty }
        if enabled && name == Self.rootName { throw .invalidAuthMgmt }
        guard roles[name] != nil else { throw .roleNotFound }
        roles[name] = nil
        store.setBlob(Self.blobName(Self.rolePrefix, name), nil)
        for (_, var u) in users where u.roles.contains(name) {
            u.roles.removeAll { $0 == name }
            save(user: u)
        }
        changed()
    }

    public func grantPermission(role name: String, _ r: Etcdserverpb_AuthRoleGrantPermissionRequest) throws(EtcdError) {
        guard !name.isEmpty else { throw .roleEmpty }
        guard var role = roles[name] else { throw .roleNotFound }
        guard r.hasPerm else { throw .permissionNotGiven }
        let p = r.perm
        guard !p.key.isEmpty, p.rangeEnd.isEmpty || p.rangeEnd == Data([0]) || compareBytes(p.key.bytes, p.rangeEnd.bytes) < 0 else {
            throw .invalidAuthMgmt
        }
        if let i = role.keyPermission.firstIndex(where: { $0.key == p.key && $0.rangeEnd == p.rangeEnd }) {
            role.keyPermission[i].permType = p.permType
        } else {
            role.keyPermission.append(p)
            role.keyPermission.sort { compareBytes($0.key.bytes, $1.key.bytes) < 0 }
        }
        save(role: role)
        changed()
    }

    public func revokePermission(_ r: Etcdserverpb_AuthRoleRevokePermissionRequest) throws(EtcdError) {
        guard !r.role.isEmpty else { throw .roleEmpty }
        guard var role = roles[r.role] else { throw .roleNotFound }
        guard let i = role.keyPermission.firstIndex(where: { $0.key == r.key && $0.rangeEnd == r.rangeEnd }) else {
            throw .permissionNotGranted
        }
        role.keyPermission.remove(at: i)
        save(role: role)
        changed()
    }
}

/// A key interval [start, end), `end == nil` meaning no upper bound.
struct KeyInterval {
    var start: Bytes
    var end: Bytes?

    /// etcd's range conventions: empty end = the key alone; "\0" = every key from `key`.
    init(key: Bytes, rangeEnd: Bytes) {
        start = key.isEmpty ? [0] : key
        if rangeEnd.isEmpty { end = start + [0] } else if rangeEnd == [0] { end = nil } else { end = rangeEnd }
    }

    init(start: Bytes, end: Bytes?) {
        self.start = start
        self.end = end
    }
}

/// The union of a user's permission intervals as sorted, disjoint intervals: a range is permitted
/// when one of them contains it whole (binary search, no walk over the permissions).
struct IntervalUnion {
    private var spans: [KeyInterval] = []

    init(_ intervals: [KeyInterval]) {
        let sorted = intervals.filter { $0.end == nil || compareBytes($0.start, $0.end!) < 0 }
            .sorted { compareBytes($0.start, $1.start) < 0 }
        for iv in sorted {
            if var last = spans.last, let lastEnd = last.end, compareBytes(iv.start, lastEnd) <= 0 {
                // Overlapping or touching: extend.
                if let e = iv.end { if compareBytes(e, lastEnd) > 0 { last.end = e } } else { last.end = nil }
                spans[spans.count - 1] = last
            } else if let last = spans.last, last.end == nil {
                continue  // already open-ended from an earlier start
            } else {
                spans.append(iv)
            }
        }
    }

    func contains(_ iv: KeyInterval) -> Bool {
        // The last span starting at or before iv.start.
        var lo = 0, hi = spans.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if compareBytes(spans[mid].start, iv.start) <= 0 { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0 else { return false }
        let s = spans[lo - 1]
        guard let end = s.end else { return true }
        guard let want = iv.end else { return false }
        return compareBytes(iv.start, end) < 0 && compareBytes(want, end) <= 0
    }
}

struct Permissions {
    let read: IntervalUnion
    let write: IntervalUnion
}

extension String {
    fileprivate func leftPadded(to n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
