import EtcdProto
import SwiftProtobuf

/// Responses of the Auth service: each carries a header and nothing else that a change fills.
protocol HeaderedResponse: SwiftProtobuf.Message {
    var header: Etcdserverpb_ResponseHeader { get set }
}

extension Etcdserverpb_AuthEnableResponse: HeaderedResponse {}
extension Etcdserverpb_AuthDisableResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserAddResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserDeleteResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserChangePasswordResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserGrantRoleResponse: HeaderedResponse {}
extension Etcdserverpb_AuthUserRevokeRoleResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleAddResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleDeleteResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleGrantPermissionResponse: HeaderedResponse {}
extension Etcdserverpb_AuthRoleRevokePermissionResponse: HeaderedResponse {}

extension EtcdServices {
    /// The Auth service (`/etcdserverpb.Auth/*`). Changes answer once they are durable; password
    /// hashes are computed off the loop.
    func registerAuth() {
        let ctx = context
        let auth = self.auth

        /// A response with the current header, sent once everything written so far is durable.
        func answer<Resp: HeaderedResponse>(_ reply: Reply<Resp>, _ error: EtcdError? = nil) {
            if let error { return reply.fail(error) }
            var resp = Resp()
            resp.header = ctx.header(ctx.store.currentRevision)
            ctx.gate.whenFlushed { reply.ok(resp) }
        }

        /// A change applied at once on the loop.
        func change<Req: SwiftProtobuf.Message, Resp: HeaderedResponse>(
            _ method: String, _ access: Access<Req>, _: Resp.Type, _ apply: @escaping (Req) throws(EtcdError) -> Void
        ) {
            unary("/etcdserverpb.Auth/" + method, access: access) { [unowned self] (r: Req, n, reply: Reply<Resp>) throws(EtcdError) in
                try checkSize(n)
                try apply(r)
                answer(reply)
            }
        }

        change("AuthEnable", Access<Etcdserverpb_AuthEnableRequest>.admin, Etcdserverpb_AuthEnableResponse.self) { _ throws(EtcdError) in
            try auth.enable()
        }
        change("AuthDisable", Access<Etcdserverpb_AuthDisableRequest>.admin, Etcdserverpb_AuthDisableResponse.self) { _ in
            auth.disable()
        }
        unary("/etcdserverpb.Auth/AuthStatus", access: .admin) { (_: Etcdserverpb_AuthStatusRequest, _, reply: Reply<Etcdserverpb_AuthStatusResponse>) in
            var resp = Etcdserverpb_AuthStatusResponse()
            resp.header = ctx.header(ctx.store.currentRevision)
            resp.enabled = auth.enabled
            resp.authRevision = auth.revision
            reply.ok(resp)
        }
        unary("/etcdserverpb.Auth/Authenticate", access: .open) { (r: Etcdserverpb_AuthenticateRequest, _, reply: Reply<Etcdserverpb_AuthenticateResponse>) throws(EtcdError) in
            try auth.authenticate(name: r.name, password: r.password) { result in
                switch result {
                case .success(let token):
                    var resp = Etcdserverpb_AuthenticateResponse()
                    resp.header = ctx.header(ctx.store.currentRevision)
                    resp.token = token
                    reply.ok(resp)
                case .failure(let e): reply.fail(e)
                }
            }
        }

        unary("/etcdserverpb.Auth/UserAdd", access: .admin) { [unowned self] (r: Etcdserverpb_AuthUserAddRequest, n, reply: Reply<Etcdserverpb_AuthUserAddResponse>) throws(EtcdError) in
            try checkSize(n)
            try auth.addUser(r) { answer(reply, $0) }
        }
        unary("/etcdserverpb.Auth/UserChangePassword", access: .admin) { [unowned self] (r: Etcdserverpb_AuthUserChangePasswordRequest, n, reply: Reply<Etcdserverpb_AuthUserChangePasswordResponse>) throws(EtcdError) in
            try checkSize(n)
            try auth.changePassword(r) { answer(reply, $0) }
        }
        // A user may read their own roles.
        unary("/etcdserverpb.Auth/UserGet", access: .keys { c, r throws(EtcdError) in if c.name != r.name { throw .permissionDenied } }) {
            (r: Etcdserverpb_AuthUserGetRequest, _, reply: Reply<Etcdserverpb_AuthUserGetResponse>) throws(EtcdError) in
            var resp = Etcdserverpb_AuthUserGetResponse()
            resp.roles = try auth.getUser(r.name)
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        unary("/etcdserverpb.Auth/UserList", access: .admin) { (_: Etcdserverpb_AuthUserListRequest, _, reply: Reply<Etcdserverpb_AuthUserListResponse>) in
            var resp = Etcdserverpb_AuthUserListResponse()
            resp.users = auth.userNames
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        change("UserDelete", Access<Etcdserverpb_AuthUserDeleteRequest>.admin, Etcdserverpb_AuthUserDeleteResponse.self) { r throws(EtcdError) in
            try auth.deleteUser(r.name)
        }
        change("UserGrantRole", Access<Etcdserverpb_AuthUserGrantRoleRequest>.admin, Etcdserverpb_AuthUserGrantRoleResponse.self) { r throws(EtcdError) in
            try auth.grantRole(user: r.user, role: r.role)
        }
        change("UserRevokeRole", Access<Etcdserverpb_AuthUserRevokeRoleRequest>.admin, Etcdserverpb_AuthUserRevokeRoleResponse.self) { r throws(EtcdError) in
            try auth.revokeRole(user: r.name, role: r.role)
        }

        change("RoleAdd", Access<Etcdserverpb_AuthRoleAddRequest>.admin, Etcdserverpb_AuthRoleAddResponse.self) { r throws(EtcdError) in
            try auth.addRole(r.name)
        }
        // A user may read the roles they hold.
        unary("/etcdserverpb.Auth/RoleGet", access: .keys { c, r throws(EtcdError) in
            if !auth.holds(c, role: r.role) { throw .permissionDenied }
        }) { (r: Etcdserverpb_AuthRoleGetRequest, _, reply: Reply<Etcdserverpb_AuthRoleGetResponse>) throws(EtcdError) in
            var resp = Etcdserverpb_AuthRoleGetResponse()
            resp.perm = try auth.getRole(r.role)
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        unary("/etcdserverpb.Auth/RoleList", access: .admin) { (_: Etcdserverpb_AuthRoleListRequest, _, reply: Reply<Etcdserverpb_AuthRoleListResponse>) in
            var resp = Etcdserverpb_AuthRoleListResponse()
            resp.roles = auth.roleNames
            resp.header = ctx.header(ctx.store.currentRevision)
            reply.ok(resp)
        }
        change("RoleDelete", Access<Etcdserverpb_AuthRoleDeleteRequest>.admin, Etcdserverpb_AuthRoleDeleteResponse.self) { r throws(EtcdError) in
            try auth.deleteRole(r.role)
        }
        change("RoleGrantPermission", Access<Etcdserverpb_AuthRoleGrantPermissionRequest>.admin,
               Etcdserverpb_AuthRoleGrantPermissionResponse.self) { r throws(EtcdError) in
            try auth.grantPermission(role: r.name, r)
        }
        change("RoleRevokePermission", Access<Etcdserverpb_AuthRoleRevokePermissionRequest>.admin,
               Etcdserverpb_AuthRoleRevokePermissionResponse.self) { r throws(EtcdError) in
            try auth.revokePermission(r)
        }
    }
}
