/// etcd's RPC methods: one table of path, kind and gateway paths, which the gRPC router, the JSON
/// gateway and the metrics all read. Adding a method starts here.
public struct EtcdMethod: Hashable, Sendable, CustomStringConvertible {
    /// How messages flow (go-grpc-prometheus's `grpc_type` label names them).
    public enum Kind: String, Sendable {
        case unary
        case serverStream = "server_stream"
        case bidiStream = "bidi_stream"
    }

    /// The protobuf service, e.g. `etcdserverpb.KV`.
    public let service: String
    /// The method, e.g. `Range`.
    public let name: String
    public let kind: Kind
    /// The gateway's paths for it, after the `/v3` (or `/v3beta`) prefix; empty if it has none.
    public let gatewayPaths: [String]

    /// The gRPC `:path`, e.g. `/etcdserverpb.KV/Range`.
    public var path: String { "/\(service)/\(name)" }
    public var description: String { path }

    init(_ service: String, _ name: String, _ kind: Kind = .unary, gateway: [String] = []) {
        self.service = service
        self.name = name
        self.kind = kind
        gatewayPaths = gateway
    }
}

extension EtcdMethod {
    private static let kv = "etcdserverpb.KV"
    private static let watchService = "etcdserverpb.Watch"
    private static let lease = "etcdserverpb.Lease"
    private static let cluster = "etcdserverpb.Cluster"
    private static let maintenance = "etcdserverpb.Maintenance"
    private static let auth = "etcdserverpb.Auth"
    private static let lockService = "v3lockpb.Lock"
    private static let election = "v3electionpb.Election"

    public static let range = EtcdMethod(kv, "Range", gateway: ["/kv/range"])
    /// etcd 3.7: a range streamed in chunks; gRPC only (no gateway path).
    public static let rangeStream = EtcdMethod(kv, "RangeStream", .serverStream)
    public static let put = EtcdMethod(kv, "Put", gateway: ["/kv/put"])
    public static let deleteRange = EtcdMethod(kv, "DeleteRange", gateway: ["/kv/deleterange"])
    public static let txn = EtcdMethod(kv, "Txn", gateway: ["/kv/txn"])
    public static let compact = EtcdMethod(kv, "Compact", gateway: ["/kv/compaction"])

    public static let watch = EtcdMethod(watchService, "Watch", .bidiStream, gateway: ["/watch"])

    public static let leaseGrant = EtcdMethod(lease, "LeaseGrant", gateway: ["/lease/grant"])
    public static let leaseRevoke = EtcdMethod(lease, "LeaseRevoke", gateway: ["/lease/revoke", "/kv/lease/revoke"])
    public static let leaseKeepAlive = EtcdMethod(lease, "LeaseKeepAlive", .bidiStream, gateway: ["/lease/keepalive"])
    public static let leaseTimeToLive = EtcdMethod(
        lease, "LeaseTimeToLive", gateway: ["/lease/timetolive", "/kv/lease/timetolive"])
    public static let leaseLeases = EtcdMethod(lease, "LeaseLeases", gateway: ["/lease/leases", "/kv/lease/leases"])

    public static let memberAdd = EtcdMethod(cluster, "MemberAdd", gateway: ["/cluster/member/add"])
    public static let memberRemove = EtcdMethod(cluster, "MemberRemove", gateway: ["/cluster/member/remove"])
    public static let memberUpdate = EtcdMethod(cluster, "MemberUpdate", gateway: ["/cluster/member/update"])
    public static let memberList = EtcdMethod(cluster, "MemberList", gateway: ["/cluster/member/list"])
    public static let memberPromote = EtcdMethod(cluster, "MemberPromote", gateway: ["/cluster/member/promote"])

    public static let alarm = EtcdMethod(maintenance, "Alarm", gateway: ["/maintenance/alarm"])
    public static let status = EtcdMethod(maintenance, "Status", gateway: ["/maintenance/status"])
    public static let defragment = EtcdMethod(maintenance, "Defragment", gateway: ["/maintenance/defragment"])
    public static let hash = EtcdMethod(maintenance, "Hash", gateway: ["/maintenance/hash"])
    public static let hashKV = EtcdMethod(maintenance, "HashKV")
    public static let snapshot = EtcdMethod(maintenance, "Snapshot", .serverStream, gateway: ["/maintenance/snapshot"])
    public static let moveLeader = EtcdMethod(
        maintenance, "MoveLeader", gateway: ["/maintenance/transfer-leadership"])

    public static let authEnable = EtcdMethod(auth, "AuthEnable", gateway: ["/auth/enable"])
    public static let authDisable = EtcdMethod(auth, "AuthDisable", gateway: ["/auth/disable"])
    public static let authStatus = EtcdMethod(auth, "AuthStatus", gateway: ["/auth/status"])
    public static let authenticate = EtcdMethod(auth, "Authenticate", gateway: ["/auth/authenticate"])
    public static let userAdd = EtcdMethod(auth, "UserAdd", gateway: ["/auth/user/add"])
    public static let userGet = EtcdMethod(auth, "UserGet", gateway: ["/auth/user/get"])
    public static let userList = EtcdMethod(auth, "UserList", gateway: ["/auth/user/list"])
    public static let userDelete = EtcdMethod(auth, "UserDelete", gateway: ["/auth/user/delete"])
    public static let userChangePassword = EtcdMethod(auth, "UserChangePassword", gateway: ["/auth/user/changepw"])
    public static let userGrantRole = EtcdMethod(auth, "UserGrantRole", gateway: ["/auth/user/grant"])
    public static let userRevokeRole = EtcdMethod(auth, "UserRevokeRole", gateway: ["/auth/user/revoke"])
    public static let roleAdd = EtcdMethod(auth, "RoleAdd", gateway: ["/auth/role/add"])
    public static let roleGet = EtcdMethod(auth, "RoleGet", gateway: ["/auth/role/get"])
    public static let roleList = EtcdMethod(auth, "RoleList", gateway: ["/auth/role/list"])
    public static let roleDelete = EtcdMethod(auth, "RoleDelete", gateway: ["/auth/role/delete"])
    public static let roleGrantPermission = EtcdMethod(auth, "RoleGrantPermission", gateway: ["/auth/role/grant"])
    public static let roleRevokePermission = EtcdMethod(auth, "RoleRevokePermission", gateway: ["/auth/role/revoke"])

    public static let lock = EtcdMethod(lockService, "Lock", gateway: ["/lock/lock"])
    public static let unlock = EtcdMethod(lockService, "Unlock", gateway: ["/lock/unlock"])

    public static let campaign = EtcdMethod(election, "Campaign", gateway: ["/election/campaign"])
    public static let proclaim = EtcdMethod(election, "Proclaim", gateway: ["/election/proclaim"])
    public static let leader = EtcdMethod(election, "Leader", gateway: ["/election/leader"])
    public static let observe = EtcdMethod(election, "Observe", .serverStream, gateway: ["/election/observe"])
    public static let resign = EtcdMethod(election, "Resign", gateway: ["/election/resign"])

    /// Every method, in the order of etcd's `rpc.proto`, then `v3lock.proto` and `v3election.proto`.
    public static let all: [EtcdMethod] = [
        range, rangeStream, put, deleteRange, txn, compact,
        watch,
        leaseGrant, leaseRevoke, leaseKeepAlive, leaseTimeToLive, leaseLeases,
        memberAdd, memberRemove, memberUpdate, memberList, memberPromote,
        alarm, status, defragment, hash, hashKV, snapshot, moveLeader,
        authEnable, authDisable, authStatus, authenticate, userAdd, userGet, userList, userDelete,
        userChangePassword, userGrantRole, userRevokeRole, roleAdd, roleGet, roleList, roleDelete,
        roleGrantPermission, roleRevokePermission,
        lock, unlock,
        campaign, proclaim, leader, observe, resign,
    ]

    /// The method on a gRPC path.
    public static let byPath: [String: EtcdMethod] = Dictionary(uniqueKeysWithValues: all.map { ($0.path, $0) })

    /// The method behind a gateway path (after `/v3` or `/v3beta`).
    public static let byGatewayPath: [String: EtcdMethod] = Dictionary(
        uniqueKeysWithValues: all.flatMap { m in m.gatewayPaths.map { ($0, m) } })

    /// The gateway's path prefixes: etcd 3.4 serves `/v3/` and the older `/v3beta/`.
    public static let gatewayPrefixes = ["/v3/", "/v3beta/"]

    /// The method a gateway request path names (nil: not a gateway path, or an unknown one).
    public static func forGatewayPath(_ path: String) -> EtcdMethod? {
        for p in gatewayPrefixes where path.hasPrefix(p) {
            return byGatewayPath[String(path.dropFirst(p.count - 1))]
        }
        return nil
    }
}
