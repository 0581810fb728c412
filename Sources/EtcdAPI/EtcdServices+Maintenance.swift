import EtcdProto
import Foundation
import GRPC
import MVCC
import VigilCore

extension EtcdServices {
    /// The Maintenance service: status, alarms, and the backend copies (defragment, hash,
    /// snapshot), which run off the loop between group commits.
    func registerMaintenance() {
        let ctx = context
        let auth = self.auth
        unary(.status, access: .authenticated) {
            (_: Etcdserverpb_StatusRequest, _, reply: Reply<Etcdserverpb_StatusResponse>) in
            var resp = Etcdserverpb_StatusResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            resp.version = EtcdServices.serverVersion
            resp.leader = ctx.identity.memberID
            resp.raftTerm = ctx.identity.raftTerm
            resp.raftIndex = UInt64(max(ctx.store.committedRevision, 0))
            resp.raftAppliedIndex = resp.raftIndex
            resp.dbSize = ctx.backend.dbSize
            resp.dbSizeInUse = ctx.backend.dbSizeInUse
            resp.errors = ctx.alarms.statusErrors
            reply.ok(resp)
        }
        unary(
            .alarm,
            access: .keys { c, r throws(EtcdError) in
                if r.action != .get { try auth.requireAdmin(c) }
            }
        ) { (r: Etcdserverpb_AlarmRequest, _, reply: Reply<Etcdserverpb_AlarmResponse>) in
            // etcd 3.4 answers Alarm without a header.
            var resp = Etcdserverpb_AlarmResponse()
            switch r.action {
            case .get:
                resp.alarms = ctx.alarms.active.filter { r.alarm == .none || $0.alarm == r.alarm }
            case .activate:
                if r.alarm != .none { resp.alarms = [ctx.alarms.activate(r.alarm, member: r.memberID)] }
            case .deactivate:
                if let a = ctx.alarms.deactivate(r.alarm) { resp.alarms = [a] }
            default:
                break
            }
            ctx.commits.whenFlushed { reply.ok(resp) }
        }
        unary(.defragment, access: .admin) {
            (_: Etcdserverpb_DefragmentRequest, _, reply: Reply<Etcdserverpb_DefragmentResponse>) in
            ctx.backend.defragment { error in
                if let error {
                    reply.fail(.internal("etcdserver: defragment failed: \(error)"))
                } else {
                    reply.ok(Etcdserverpb_DefragmentResponse())
                }
            }
        }
        unary(.hash, access: .admin) { (_: Etcdserverpb_HashRequest, _, reply: Reply<Etcdserverpb_HashResponse>) in
            let rev = ctx.store.currentRevision
            ctx.backend.hash { result in
                switch result {
                case .success(let h):
                    var resp = Etcdserverpb_HashResponse()
                    resp.header = ctx.header(rev)
                    resp.hash = h
                    reply.ok(resp)
                case .failure(let e): reply.fail(.internal("etcdserver: hash failed: \(e)"))
                }
            }
        }
        unary(.hashKV, access: .admin) {
            (r: Etcdserverpb_HashKVRequest, _, reply: Reply<Etcdserverpb_HashKVResponse>) throws(EtcdError) in
            let upTo: Int64
            do throws(MVCCError) { upTo = try ctx.store.checkHashRevision(r.revision) } catch {
                throw EtcdError.from(error)
            }
            // Off the loop, once compaction's removals and the commits up to `upTo` are done.
            ctx.whenCompacted {
                ctx.backend.hashKV(upTo: upTo) { result in
                    if ctx.store.compactRevision > 0 && upTo < ctx.store.compactRevision {
                        return reply.fail(.compacted)
                    }
                    switch result {
                    case .success(let h):
                        var resp = Etcdserverpb_HashKVResponse()
                        resp.hash = h
                        resp.compactRevision = max(ctx.store.compactRevision, 0)
                        resp.header = ctx.header(ctx.store.currentRevision)
                        reply.ok(resp)
                    case .failure(let e): reply.fail(.internal("etcdserver: hash failed: \(e)"))
                    }
                }
            }
        }
        unary(.moveLeader, access: .admin) {
            (r: Etcdserverpb_MoveLeaderRequest, _, reply: Reply<Etcdserverpb_MoveLeaderResponse>) throws(EtcdError) in
            // One member: it is the leader already; any other target is not a member.
            guard r.targetID == ctx.identity.memberID else { throw .badLeaderTransferee }
            var resp = Etcdserverpb_MoveLeaderResponse()
            resp.header = ctx.header(ctx.store.committedRevision)
            reply.ok(resp)
        }
        stream(.snapshot) { [unowned self] call in SnapshotCall(services: self, credentials: call.credentials) }
    }

    /// The Cluster service of a one-member cluster: the member list; membership cannot change.
    func registerCluster() {
        let ctx = context
        unary(.memberList, access: .open) {
            (_: Etcdserverpb_MemberListRequest, _, reply: Reply<Etcdserverpb_MemberListResponse>) in
            var resp = Etcdserverpb_MemberListResponse()
            resp.header = ctx.header(0)
            resp.members = [ctx.member]
            reply.ok(resp)
        }
        unary(.memberAdd, access: .admin) {
            (_: Etcdserverpb_MemberAddRequest, _, _: Reply<Etcdserverpb_MemberAddResponse>) throws(EtcdError) in
            throw .membershipFixed
        }
        unary(.memberRemove, access: .admin) {
            (r: Etcdserverpb_MemberRemoveRequest, _, _: Reply<Etcdserverpb_MemberRemoveResponse>) throws(EtcdError) in
            throw r.id == ctx.identity.memberID ? EtcdError.memberNotEnoughStarted : EtcdError.memberNotFound
        }
        unary(.memberUpdate, access: .admin) {
            (
                r: Etcdserverpb_MemberUpdateRequest, _, reply: Reply<Etcdserverpb_MemberUpdateResponse>
            )
                throws(EtcdError) in
            guard r.id == ctx.identity.memberID else { throw .memberNotFound }
            guard r.peerUrls.allSatisfy(Self.isPeerURL) else { throw .invalidPeerURL }
            ctx.updatePeerURLs(r.peerUrls)
            var resp = Etcdserverpb_MemberUpdateResponse()
            resp.header = ctx.header(0)
            resp.members = [ctx.member]
            ctx.commits.whenFlushed { reply.ok(resp) }
        }
        unary(.memberPromote, access: .admin) {
            (r: Etcdserverpb_MemberPromoteRequest, _, _: Reply<Etcdserverpb_MemberPromoteResponse>) throws(EtcdError) in
            throw r.id == ctx.identity.memberID ? EtcdError.memberNotLearner : EtcdError.memberNotFound
        }
    }
}

/// A Snapshot call: on its request (admin only), a consistent copy of the backend is made off the
/// loop, then streamed as etcd does — 32 KiB blobs with the bytes remaining after each, then a
/// last message holding the SHA-256 of everything sent. It waits for the client's window between
/// chunks, so a large store never sits in memory; the copy is deleted when the call ends, however
/// it ends.
final class SnapshotCall: CallHandler {
    private unowned let services: EtcdServices
    private let credentials: Credentials
    private var requested = false
    private var path: String?
    private var file: FileHandle?
    private var remaining: UInt64 = 0
    private var sha = SHA256()
    private var ended = false
    private static let chunk = 32 * 1024

    init(services: EtcdServices, credentials: Credentials) {
        self.services = services
        self.credentials = credentials
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        guard !requested else { return }
        requested = true
        do throws(EtcdError) {
            try services.authorize(
                Access<Etcdserverpb_SnapshotRequest>.admin, Etcdserverpb_SnapshotRequest(), credentials: credentials)
        } catch { return call.finish(error.status) }
        services.context.backend.snapshot { [self] result in
            switch result {
            case .success(let path): start(call, path)
            case .failure(let e): call.finish(EtcdError.internal("etcdserver: snapshot failed: \(e)").status)
            }
        }
    }

    private func start(_ call: ServerCall, _ path: String) {
        self.path = path
        guard !ended else { return cleanup() }
        guard let f = FileHandle(forReadingAtPath: path),
            let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value
        else {
            return call.finish(EtcdError.internal("etcdserver: snapshot file missing").status)
        }
        file = f
        remaining = size
        pump(call)
    }

    func callDrained(_ call: ServerCall) { pump(call) }

    func callEnded(_ call: ServerCall) {
        ended = true
        cleanup()
    }

    private func pump(_ call: ServerCall) {
        guard let file, !call.isFinished else { return }
        // Keep about 1 MiB in flight; continue when the client has taken it.
        while call.queuedBytes < 1 << 20 {
            let data = file.readData(ofLength: Self.chunk)
            if data.isEmpty {
                var last = Etcdserverpb_SnapshotResponse()
                last.blob = Data(sha.finish())
                try? call.send(last)
                call.finish(.ok)
                return
            }
            sha.update(data)
            Failpoint.trigger("snapshotMidSend")
            remaining -= UInt64(data.count)
            var r = Etcdserverpb_SnapshotResponse()
            r.remainingBytes = remaining
            r.blob = data
            try? call.send(r)
        }
        call.notifyWhenDrained()
    }

    private func cleanup() {
        try? file?.close()
        file = nil
        if let path { unlink(path) }
        path = nil
    }
}

extension EtcdServices {
    /// `scheme://host:port` with scheme http or https (etcd's URL check for peers).
    static func isPeerURL(_ s: String) -> Bool {
        guard let u = URL(string: s), let scheme = u.scheme, ["http", "https", "unix", "unixs"].contains(scheme),
            u.host != nil
        else { return false }
        return scheme.hasPrefix("unix") || u.port != nil
    }
}

extension ServerContext {
    /// This member as MemberList and MemberUpdate answer it.
    var member: Etcdserverpb_Member {
        var m = Etcdserverpb_Member()
        m.id = identity.memberID
        m.name = identity.name
        m.peerUrls = identity.peerURLs
        m.clientUrls = identity.clientURLs
        return m
    }
}
