import Auth
import EtcdProto
import Foundation
import MVCC
import SwiftProtobuf
import VigilCore

/// Responses of the Auth service: each carries a header and nothing else that a change fills.
protocol HeaderedResponse: SwiftProtobuf.Message {
    var header: Etcdserverpb_ResponseHeader { get set }
}

extension Etcdserverpb_AuthUserAddResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserChangePasswordResponse: HeaderedResponse {}

/// An admin request that changes the auth store at once, answered by an empty response.
protocol AuthChange: SwiftProtobuf.Message {
    associatedtype Response: HeaderedResponse
}

extension Etcdserverpb_AuthEnableResponse: HeaderedResponse {}
extension Etcdserverpb_AuthEnableRequest: AuthChange { typealias Response = Etcdserverpb_AuthEnableResponse }
extension Etcdserverpb_AuthDisableResponse: HeaderedResponse {}
extension Etcdserverpb_AuthDisableRequest: AuthChange { typealias Response = Etcdserverpb_AuthDisableResponse }
extension Etcdserverpb_AuthUserDeleteResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserDeleteRequest: AuthChange { typealias Response = Etcdserverpb_AuthUserDeleteResponse }
extension Etcdserverpb_AuthUserGrantRoleResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserGrantRoleRequest: AuthChange {
    typealias Response = Etcdserverpb_AuthUserGrantRoleResponse
}
extension Etcdserverpb_AuthUserRevokeRoleResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserRevokeRoleRequest: AuthChange {
    typealias Response = Etcdserverpb_AuthUserRevokeRoleResponse
}
extension Etcdserverpb_AuthRoleAddResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleAddRequest: AuthChange { typealias Response = Etcdserverpb_AuthRoleAddResponse }
extension Etcdserverpb_AuthRoleDeleteResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleDeleteRequest: AuthChange { typealias Response = Etcdserverpb_AuthRoleDeleteResponse }
extension Etcdserverpb_AuthRoleGrantPermissionResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleGrantPermissionRequest: AuthChange {
    typealias Response = Etcdserverpb_AuthRoleGrantPermissionResponse
}
extension Etcdserverpb_AuthRoleRevokePermissionResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleRevokePermissionRequest: AuthChange {
    typealias Response = Etcdserverpb_AuthRoleRevokePermissionResponse
}

extension EtcdServices {
    /// The Auth service. Changes answer once they are durable; password hashes are computed off
    /// the loop.
    func registerAuth() {
        let ctx = context
        let auth = self.auth

        /// A response with the current header, sent once everything written so far is durable.
        func answer<Resp: HeaderedResponse>(_ reply: Reply<Resp>, _ error: EtcdError? = nil) {
            if let error { return reply.fail(error) }
            var resp = Resp()
            resp.header = ctx.header(ctx.store.currentRevision)
            ctx.commits.whenFlushed { reply.ok(resp) }
        }

        /// An admin change applied at once on the loop.
        func change<Req: AuthChange>(_ method: EtcdMethod, _ apply: @escaping (Req) throws(EtcdError) -> Void) {
            unary(method, access: .admin) { (r: Req, n, reply: Reply<Req.Response>) throws(EtcdError) in
                try ctx.checkSize(n)
                try apply(r)
                answer(reply)
            }
        }

        change(.authEnable) { (_: Etcdserverpb_AuthEnableRequest) throws(EtcdError) in try auth.enable() }
        change(.authDisable) { (_: Etcdserverpb_AuthDisableRequest) in auth.disable() }
        unary(.authStatus, access: .admin) {
            (_: Etcdserverpb_AuthStatusRequest, _, reply: Reply<Etcdserverpb_AuthStatusResponse>) in
            var resp = Etcdserverpb_AuthStatusResponse()
            resp.header = ctx.header(ctx.store.currentRevision)
            resp.enabled = auth.enabled
            resp.authRevision = auth.revision
            reply.ok(resp)
        }
        unary(.authenticate, access: .open) {
            (r: Etcdserverpb_AuthenticateRequest, _, out: Reply<Etcdserverpb_AuthenticateResponse>) throws(EtcdError) in
            try auth.authenticate(name: r.name, password: r.password) { result in
                switch result {
                case .success(let token):
                    var resp = Etcdserverpb_AuthenticateResponse()
                    resp.header = ctx.header(ctx.store.currentRevision)
                    resp.token = token
                    out.ok(resp)
                case .failure(let e): out.fail(e)
                }
            }
        }
        unary(.userAdd, access: .admin) {
            (r: Etcdserverpb_AuthUserAddRequest, n, reply: Reply<Etcdserverpb_AuthUserAddResponse>) throws(EtcdError) in
            try ctx.checkSize(n)
            try auth.addUser(name: r.name, password: r.password, noPassword: r.options.noPassword) { answer(reply, $0) }
        }
        unary(.userChangePassword, access: .admin) {
            (
                r: Etcdserverpb_AuthUserChangePasswordRequest, n,
                reply: Reply<Etcdserverpb_AuthUserChangePasswordResponse>
            )
                throws(EtcdError) in
            try ctx.checkSize(n)
            try auth.changePassword(name: r.name, password: r.password) { answer(reply, $0) }
        }
        // A user may read their own roles.
        unary(.userGet, access: .keys { c, r throws(EtcdError) in if c.name != r.name { throw .permissionDenied } }) {
            (r: Etcdserverpb_AuthUserGetRequest, _, reply: Reply<Etcdserverpb_AuthUserGetResponse>) throws(EtcdError) in
            var resp = Etcdserverpb_AuthUserGetResponse()
            resp.roles = try auth.getUser(r.name)
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        unary(.userList, access: .admin) {
            (_: Etcdserverpb_AuthUserListRequest, _, reply: Reply<Etcdserverpb_AuthUserListResponse>) in
            var resp = Etcdserverpb_AuthUserListResponse()
            resp.users = auth.userNames
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        change(.userDelete) { (r: Etcdserverpb_AuthUserDeleteRequest) throws(EtcdError) in try auth.deleteUser(r.name) }
        change(.userGrantRole) { (r: Etcdserverpb_AuthUserGrantRoleRequest) throws(EtcdError) in
            try auth.grantRole(user: r.user, role: r.role)
        }
        change(.userRevokeRole) { (r: Etcdserverpb_AuthUserRevokeRoleRequest) throws(EtcdError) in
            try auth.revokeRole(user: r.name, role: r.role)
        }
        change(.roleAdd) { (r: Etcdserverpb_AuthRoleAddRequest) throws(EtcdError) in try auth.addRole(r.name) }
        // A user may read the roles they hold.
        unary(
            .roleGet,
            access: .keys { c, r throws(EtcdError) in
                if !auth.holds(c, role: r.role) { throw .permissionDenied }
            }
        ) { (r: Etcdserverpb_AuthRoleGetRequest, _, reply: Reply<Etcdserverpb_AuthRoleGetResponse>) throws(EtcdError) in
            var resp = Etcdserverpb_AuthRoleGetResponse()
            resp.perm = try auth.getRole(r.role).map(\.proto)
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        unary(.roleList, access: .admin) {
            (_: Etcdserverpb_AuthRoleListRequest, _, reply: Reply<Etcdserverpb_AuthRoleListResponse>) in
            var resp = Etcdserverpb_AuthRoleListResponse()
            resp.roles = auth.roleNames
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        change(.roleDelete) { (r: Etcdserverpb_AuthRoleDeleteRequest) throws(EtcdError) in try auth.deleteRole(r.role) }
        change(.roleGrantPermission) { (r: Etcdserverpb_AuthRoleGrantPermissionRequest) throws(EtcdError) in
            try auth.grantPermission(role: r.name, r.hasPerm ? Permission(r.perm) : nil)
        }
        change(.roleRevokePermission) { (r: Etcdserverpb_AuthRoleRevokePermissionRequest) throws(EtcdError) in
            try auth.revokePermission(role: r.role, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes)
        }
    }
}

// MARK: - Permission checks over etcd's requests

extension AuthStore {
    /// Put: write on the key, read too when the previous value is asked for, and write on every
    /// key already attached to the lease it names.
    func check(_ c: Caller?, put r: Etcdserverpb_PutRequest) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        try check(c, .write, key: r.key.bytes, rangeEnd: [])
        if r.prevKv { try check(c, .read, key: r.key.bytes, rangeEnd: []) }
        if r.lease != 0 { try checkLeaseKeys(c, r.lease, .write) }
    }

    func check(_ c: Caller?, deleteRange r: Etcdserverpb_DeleteRangeRequest) throws(EtcdError) {
        guard let c, !c.isRoot else { return }
        try check(c, .write, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes)
        if r.prevKv { try check(c, .read, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes) }
    }

    /// Txn: read on every compare's range, and every operation of both branches (a txn may take
    /// either), nested txns included.
    func check(_ c: Caller?, txn r: Etcdserverpb_TxnRequest) throws(EtcdError) {
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
}

// MARK: - Users and roles in the backend

extension Permission {
    init(_ p: Authpb_Permission) {
        self.init(kind: Kind(rawValue: p.permType.rawValue), key: p.key.bytes, rangeEnd: p.rangeEnd.bytes)
    }

    var proto: Authpb_Permission {
        var p = Authpb_Permission()
        p.permType = Authpb_Permission.TypeEnum(rawValue: kind.rawValue) ?? .UNRECOGNIZED(kind.rawValue)
        p.key = Data(key)
        p.rangeEnd = Data(rangeEnd)
        return p
    }
}

/// The auth store's state in the backend, in etcd's encoding: meta `auth/enabled` and
/// `auth/revision`; blobs `auth/user/<id>` (`authpb.User`, the password field holding the hash)
/// and `auth/role/<id>` (`authpb.Role`), where `<id>` is the SHA-256 of the name in hex (names may
/// be longer than a backend key). Written in the same group commits as the data.
final class AuthRecordsInStore: AuthRecords {
    static let metaEnabled = "auth/enabled"
    static let metaRevision = "auth/revision"
    static let userPrefix = "auth/user/"
    static let rolePrefix = "auth/role/"

    private let store: KVStore
    init(store: KVStore) { self.store = store }

    static func restore(meta: [String: Int64], blobs: [String: [UInt8]]) -> AuthState {
        var state = AuthState()
        state.enabled = (meta[metaEnabled] ?? 0) != 0
        state.revision = UInt64(max(meta[metaRevision] ?? 0, 0))
        for (name, bytes) in blobs {
            if name.hasPrefix(userPrefix), let u = try? Authpb_User(serializedBytes: bytes) {
                state.users.append(
                    AuthUser(
                        name: String(decoding: u.name, as: UTF8.self),
                        passwordHash: String(decoding: u.password, as: UTF8.self),
                        roles: u.roles, noPassword: u.options.noPassword))
            } else if name.hasPrefix(rolePrefix), let r = try? Authpb_Role(serializedBytes: bytes) {
                state.roles.append(
                    AuthRole(
                        name: String(decoding: r.name, as: UTF8.self), permissions: r.keyPermission.map(Permission.init)
                    ))
            }
        }
        return state
    }

    /// The backend name of a user's or role's record.
    static func blobName(_ prefix: String, _ name: String) -> String {
        var h = SHA256()
        h.update(Array(name.utf8))
        return prefix + h.finish().map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }

    func save(user: AuthUser) {
        var u = Authpb_User()
        u.name = Data(user.name.utf8)
        u.password = Data(user.passwordHash.utf8)
        u.roles = user.roles
        u.options.noPassword = user.noPassword  // etcdctl always sends the options; etcd stores them
        store.setBlob(Self.blobName(Self.userPrefix, user.name), try? u.serializedBytes())
    }

    func deleteUser(named name: String) { store.setBlob(Self.blobName(Self.userPrefix, name), nil) }

    func save(role: AuthRole) {
        var r = Authpb_Role()
        r.name = Data(role.name.utf8)
        r.keyPermission = role.permissions.map(\.proto)
        store.setBlob(Self.blobName(Self.rolePrefix, role.name), try? r.serializedBytes())
    }

    func deleteRole(named name: String) { store.setBlob(Self.blobName(Self.rolePrefix, name), nil) }

    func save(enabled: Bool, revision: UInt64) {
        store.setMeta(Self.metaEnabled, enabled ? 1 : 0)
        store.setMeta(Self.metaRevision, Int64(revision))
    }
}

extension String {
    fileprivate func leftPadded(to n: Int) -> String {
        count >= n ? self : String(repeating: "0", count: n - count) + self
    }
}
