import EtcdProto
import Foundation
import GRPC
import Lease
import VigilCore

extension EtcdServices {
    /// The Lease service: grants and revocations answer once durable (a revocation deletes the
    /// lease's keys in one revision, through the store); keep-alives renew in memory.
    func registerLease() {
        let ctx = context
        let lessor = self.lessor
        let auth = self.auth
        unary(.leaseGrant, access: .authenticated) {
            (r: Etcdserverpb_LeaseGrantRequest, _, reply: Reply<Etcdserverpb_LeaseGrantResponse>) throws(EtcdError) in
            if r.ttl <= Lessor.maxTTL { try ctx.checkQuota(64) }
            let (id, ttl) = try lessor.grant(id: r.id, ttl: r.ttl)
            var resp = Etcdserverpb_LeaseGrantResponse()
            resp.id = id
            resp.ttl = ttl
            resp.header = ctx.header(ctx.store.currentRevision)
            ctx.commits.whenFlushed { reply.ok(resp) }
        }
        unary(.leaseRevoke, access: .keys { c, r throws(EtcdError) in try auth.checkLeaseKeys(c, r.id, .write) }) {
            (r: Etcdserverpb_LeaseRevokeRequest, _, reply: Reply<Etcdserverpb_LeaseRevokeResponse>) throws(EtcdError) in
            try lessor.revoke(r.id)
            var resp = Etcdserverpb_LeaseRevokeResponse()
            resp.header = ctx.header(ctx.store.currentRevision)
            ctx.commits.whenFlushed { reply.ok(resp) }
        }
        // Without keys, no check at all (etcd 3.4).
        unary(
            .leaseTimeToLive,
            access: .when({ $0.keys }) { c, r throws(EtcdError) in try auth.checkLeaseKeys(c, r.id, .read) }
        ) { (r: Etcdserverpb_LeaseTimeToLiveRequest, _, reply: Reply<Etcdserverpb_LeaseTimeToLiveResponse>) in
            var resp = Etcdserverpb_LeaseTimeToLiveResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            resp.id = r.id
            if let t = lessor.timeToLive(r.id) {
                resp.ttl = t.remaining
                resp.grantedTtl = t.granted
                if r.keys { resp.keys = t.keys.map { Data($0) } }
            } else {
                resp.ttl = -1
            }
            reply.ok(resp)
        }
        unary(
            .leaseLeases,
            access: .keys { c, _ throws(EtcdError) in
                for id in lessor.all() { try auth.checkLeaseKeys(c, id, .read) }
            }
        ) { (_: Etcdserverpb_LeaseLeasesRequest, _, reply: Reply<Etcdserverpb_LeaseLeasesResponse>) in
            var resp = Etcdserverpb_LeaseLeasesResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            resp.leases = lessor.all().map { id in
                var s = Etcdserverpb_LeaseStatus()
                s.id = id
                return s
            }
            reply.ok(resp)
        }
        stream(.leaseKeepAlive) { [unowned self] call in KeepAliveCall(services: self, credentials: call.credentials) }
    }

    /// Renews a lease for a keep-alive request and answers through `done` (at once, unless
    /// `keepAliveOverride` sends it elsewhere).
    public func keepAlive(
        _ r: Etcdserverpb_LeaseKeepAliveRequest, credentials: Credentials,
        _ done: @escaping (Result<Etcdserverpb_LeaseKeepAliveResponse, EtcdError>) -> Void
    ) {
        if let other = keepAliveOverride { return other(r, credentials, done) }
        done(Result { () throws(EtcdError) in try keepAlive(r, credentials: credentials) })
    }

    /// Renews a lease for a keep-alive request (TTL 0: unknown or expired, not an error) once the
    /// sender may write the lease's keys.
    public func keepAlive(
        _ r: Etcdserverpb_LeaseKeepAliveRequest, credentials: Credentials
    ) throws(EtcdError) -> Etcdserverpb_LeaseKeepAliveResponse {
        let auth = self.auth
        try authorize(
            Access<Etcdserverpb_LeaseKeepAliveRequest>.keys { c, r throws(EtcdError) in
                try auth.checkLeaseKeys(c, r.id, .write)
            }, r, credentials: credentials)
        var resp = Etcdserverpb_LeaseKeepAliveResponse()
        resp.id = r.id
        resp.ttl = lessor.renew(r.id)
        resp.header = context.header(context.store.committedRevision)
        return resp
    }
}

/// A LeaseKeepAlive stream: each request renews one lease and is answered with its TTL (0 when the
/// lease is unknown or expired, which is not an error); the client's half-close ends the call.
final class KeepAliveCall: CallHandler {
    private unowned let services: EtcdServices
    private let credentials: Credentials

    init(services: EtcdServices, credentials: Credentials) {
        self.services = services
        self.credentials = credentials
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        guard let r = try? Etcdserverpb_LeaseKeepAliveRequest(serializedBytes: message) else {
            return call.finish(EtcdError.malformedRequest.status)
        }
        services.keepAlive(r, credentials: credentials) { result in
            guard !call.isFinished else { return }
            switch result {
            case .success(let resp): try? call.send(resp)
            case .failure(let error): call.finish(error.status)
            }
        }
    }

    func callHalfClosed(_ call: ServerCall) { call.finish(.ok) }
}
