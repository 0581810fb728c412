/// A user as the auth store keeps it.
public struct AuthUser: Sendable, Equatable {
    public var name: String
    /// The bcrypt hash of the password (empty for a user without one).
    public var passwordHash: String
    /// Role names, sorted.
    public var roles: [String]
    /// Created with `--no-password`: signs in through a client certificate only.
    public var noPassword: Bool

    public init(name: String, passwordHash: String = "", roles: [String] = [], noPassword: Bool = false) {
        self.name = name
        self.passwordHash = passwordHash
        self.roles = roles
        self.noPassword = noPassword
    }
}

/// A role: named key-range permissions.
public struct AuthRole: Sendable, Equatable {
    public var name: String
    /// Sorted by key.
    public var permissions: [Permission]

    public init(name: String, permissions: [Permission] = []) {
        self.name = name
        self.permissions = permissions
    }
}

/// Read, write or both on `[key, rangeEnd)` with etcd's conventions (empty end: the key alone;
/// "\0": every key from `key`).
public struct Permission: Sendable, Equatable {
    /// etcd's `authpb.Permission.Type` values. Others may be stored (etcd stores what it is
    /// given) but grant nothing, as in etcd.
    public struct Kind: RawRepresentable, Hashable, Sendable {
        public let rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        public static let read = Kind(rawValue: 0)
        public static let write = Kind(rawValue: 1)
        public static let readwrite = Kind(rawValue: 2)
    }
    public var kind: Kind
    public var key: [UInt8]
    public var rangeEnd: [UInt8]

    public init(kind: Kind, key: [UInt8], rangeEnd: [UInt8] = []) {
        self.kind = kind
        self.key = key
        self.rangeEnd = rangeEnd
    }

    var grantsRead: Bool { kind == .read || kind == .readwrite }
    var grantsWrite: Bool { kind == .write || kind == .readwrite }
}

/// Who sent a request, once its token checked out (auth enabled only).
public struct Caller: Sendable, Equatable {
    public let name: String
    /// Holds the `root` role: may do everything.
    public let isRoot: Bool
}

/// Everything an auth store holds durably, as a previous run left it.
public struct AuthState: Sendable {
    public var enabled = false
    /// Moves on every change of users, roles, permissions or the enabled flag.
    public var revision: UInt64 = 0
    public var users: [AuthUser] = []
    public var roles: [AuthRole] = []
    public init(enabled: Bool = false, revision: UInt64 = 0, users: [AuthUser] = [], roles: [AuthRole] = []) {
        self.enabled = enabled
        self.revision = revision
        self.users = users
        self.roles = roles
    }
}

/// Where the auth store's changes go to become durable (the server writes them in the same group
/// commits as the data, in etcd's `authpb` encoding); the auth store knows no storage.
public protocol AuthRecords: AnyObject {
    func save(user: AuthUser)
    func deleteUser(named name: String)
    func save(role: AuthRole)
    func deleteRole(named name: String)
    func save(enabled: Bool, revision: UInt64)
}

/// Password hashing (bcrypt in the server; something cheap in tests). Slow on purpose: the auth
/// store calls it off the loop, through its `offload`.
public protocol PasswordHasher: Sendable {
    /// A new salted hash, or `EtcdError.passwordUnusable` for a password the scheme would cut.
    func hash(_ password: String, cost: Int) throws -> String
    /// Whether `password` matches `hash`, in time independent of where they differ.
    func verify(_ password: String, hash: String) -> Bool
}
