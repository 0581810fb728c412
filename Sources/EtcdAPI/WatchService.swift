import Auth
import EtcdProto
import Foundation
import GRPC
import MVCC
import SwiftProtobuf
import VigilCore
import WatchHub

/// Encodes watch responses for gRPC streams: a `WatchResponse` in gRPC's message framing. Events
/// go through SwiftProtobuf once each; the response around them is written by hand (field numbers
/// from rpc.proto) so that encoded events are reused as they are.
public final class GRPCWatchEncoder: WatchEncoder {
    private let headerPrefix: [UInt8]  // cluster_id, member_id (fields 1, 2)
    private let raftTerm: UInt64

    public init(identity: MemberIdentity) {
        var h: [UInt8] = []
        Self.tag(&h, 1, 0)
        Self.varint(&h, identity.clusterID)
        Self.tag(&h, 2, 0)
        Self.varint(&h, identity.memberID)
        headerPrefix = h
        raftTerm = identity.raftTerm
    }

    public func encode(_ event: Event, prevKV: Bool) -> [UInt8] {
        (try? event.proto(prevKV: prevKV).serializedBytes()) ?? []
    }

    public func response(_ f: ResponseFields, events: [[UInt8]]) -> [UInt8] {
        var header = headerPrefix
        if f.headerRevision != 0 {
            Self.tag(&header, 3, 0)
            Self.varint(&header, UInt64(bitPattern: f.headerRevision))
        }
        if raftTerm != 0 {
            Self.tag(&header, 4, 0)
            Self.varint(&header, raftTerm)
        }
        var size = header.count + 12
        for e in events { size += e.count + 6 }
        var out: [UInt8] = [0, 0, 0, 0, 0]  // the gRPC message prefix, filled in below
        out.reserveCapacity(size + f.cancelReason.utf8.count + 45)
        Self.tag(&out, 1, 2)
        Self.varint(&out, UInt64(header.count))
        out += header
        if f.watchID != 0 {
            Self.tag(&out, 2, 0)
            Self.varint(&out, UInt64(bitPattern: f.watchID))
        }
        if f.created {
            Self.tag(&out, 3, 0)
            out.append(1)
        }
        if f.canceled {
            Self.tag(&out, 4, 0)
            out.append(1)
        }
        if f.compactRevision != 0 {
            Self.tag(&out, 5, 0)
            Self.varint(&out, UInt64(bitPattern: f.compactRevision))
        }
        if !f.cancelReason.isEmpty {
            Self.tag(&out, 6, 2)
            Self.varint(&out, UInt64(f.cancelReason.utf8.count))
            out += Array(f.cancelReason.utf8)
        }
        if f.fragment {
            Self.tag(&out, 7, 0)
            out.append(1)
        }
        for e in events {
            Self.tag(&out, 11, 2)
            Self.varint(&out, UInt64(e.count))
            out += e
        }
        let n = UInt32(out.count - 5)
        out[1] = UInt8(n >> 24)
        out[2] = UInt8((n >> 16) & 0xFF)
        out[3] = UInt8((n >> 8) & 0xFF)
        out[4] = UInt8(n & 0xFF)
        return out
    }

    @inline(__always)
    static func tag(_ out: inout [UInt8], _ field: UInt64, _ wire: UInt64) { varint(&out, field << 3 | wire) }

    @inline(__always)
    static func varint(_ out: inout [UInt8], _ v: UInt64) {
        var v = v
        while v >= 0x80 {
            out.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }
}

/// A gRPC call as a watch sink: responses go out as they were encoded (already framed).
final class CallSink: WatchSink {
    let call: ServerCall
    let encoder: any WatchEncoder
    init(_ call: ServerCall, encoder: any WatchEncoder) {
        self.call = call
        self.encoder = encoder
    }
    func send(_ message: [UInt8]) { call.sendFramed(message) }
    var queuedBytes: Int { call.queuedBytes }
    func notifyWhenDrained() { call.notifyWhenDrained() }
}

/// The Watch service: one stream per call (or gateway request), carrying many watchers. The hub
/// does the work; this checks permissions and turns requests into hub calls.
public final class WatchService {
    public let hub: WatchHub
    let store: KVStore
    let auth: AuthStore
    /// Whether the store holds a new watcher's range (nil: every range). A mirror of one prefix
    /// does not hold the others: such a watcher is fed entirely by `olderHistory`, with `through`
    /// `Int64.max`.
    public var holds: ((WatchCreate) -> Bool)?
    /// A reason to refuse a new watcher, or nil (a mirror of a cluster with auth on refuses them).
    public var refusal: ((WatchCreate) -> String?)?
    /// Where history older than the store holds comes from (a mirror asks upstream), nil: none
    /// (such a watcher is canceled as compacted). See `OlderHistory`.
    public var olderHistory: OlderHistory?
    /// The gRPC calls' encoder, shared by all of them (so they share encoded responses).
    public let grpcEncoder: GRPCWatchEncoder

    /// Sessions with watchers that a user (not root) created while auth was on, by identity.
    private var guarded: [ObjectIdentifier: WatchSession] = [:]

    /// etcd's cancel reason for a watch its user may not read (the gRPC error's text).
    static let permissionDeniedReason = cancelReason(.permissionDenied)

    /// A gRPC error's text as Go prints it, which etcd puts in `cancel_reason`.
    static func cancelReason(_ e: EtcdError) -> String { "rpc error: code = \(e.grpcCode.name) desc = \(e.message)" }

    /// Why etcd refuses a create for auth: a bad or expired token, an old auth revision and a
    /// missing user are named; anything else is "permission denied".
    static func authRefusalReason(_ e: EtcdError) -> String {
        switch e.code {
        case EtcdError.invalidAuthToken.code, EtcdError.authOldRevision.code, EtcdError.userEmpty.code:
            cancelReason(e)
        default: permissionDeniedReason
        }
    }

    init(context: ServerContext, config: WatchHubConfig, auth: AuthStore) {
        self.auth = auth
        store = context.store
        grpcEncoder = GRPCWatchEncoder(identity: context.identity)
        hub = WatchHub(store: context.store, config: config, encoders: [grpcEncoder])
        auth.onChange = { [unowned self] in authChanged() }
    }

    func guarding(_ s: WatchSession, _ on: Bool) { guarded[ObjectIdentifier(s)] = on ? s : nil }

    /// After any change of users, roles or permissions, watchers whose user was deleted or may
    /// no longer read their range are cancelled with the permission-denied reason (etcd keeps
    /// delivering to them; revoking access here really revokes it).
    private func authChanged() {
        guard auth.enabled else { return }
        for s in Array(guarded.values) { s.recheck() }
    }

    /// Opens a watch stream answering through `sink` (a gRPC call, or the JSON gateway); `credentials`
    /// are the stream's (its token, or TLS client certificate), checked at each create. The session lives until `close()`.
    public func open(_ sink: any WatchSink, credentials: Credentials) -> WatchSession {
        WatchSession(service: self, stream: hub.openStream(sink), credentials: credentials)
    }
}

/// A source of the history before the store's first revision, for a new watcher: called with
/// the watcher's range and options and the last revision it must supply (`through`), it sends the
/// events from the watcher's start revision through that one, in order, with `send`, then calls
/// `done` once. It returns a function that stops it (the watcher was canceled).
public typealias OlderHistory = (
    _ watcher: WatchCreate, _ through: Int64, _ send: @escaping ([Event], Int64) -> Void,
    _ done: @escaping (OlderHistoryEnd) -> Void
) -> () -> Void

/// How an `OlderHistory` ended.
public enum OlderHistoryEnd: Sendable {
    /// Everything through `through` was sent: the store goes on.
    case complete
    /// That history is gone there too, compacted at this revision.
    case compacted(Int64)
    /// The source refused the watcher, for this reason.
    case canceled(String)
}

/// A Watch call over gRPC.
final class WatchCall: CallHandler {
    private let session: WatchSession

    init(service: WatchService, call: ServerCall) {
        session = service.open(CallSink(call, encoder: service.grpcEncoder), credentials: call.credentials)
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        guard let req = try? Etcdserverpb_WatchRequest(serializedBytes: message) else {
            return call.finish(EtcdError.malformedRequest.status)
        }
        session.receive(req)
    }

    func callDrained(_ call: ServerCall) { session.drained() }

    func callEnded(_ call: ServerCall) { session.close() }
}

extension EtcdServices {
    func registerWatch() {
        let watch = self.watch
        stream(.watch) { call in WatchCall(service: watch, call: call) }
    }
}

/// One open watch stream: requests in, responses out through its sink.
public final class WatchSession {
    unowned let service: WatchService
    let stream: WatchStream
    private var closed = false
    let credentials: Credentials
    /// Watchers created by a user other than root while auth was on: who, and the range.
    private var owned: [Int64: (user: String, key: [UInt8], rangeEnd: [UInt8])] = [:]

    init(service: WatchService, stream: WatchStream, credentials: Credentials) {
        self.service = service
        self.stream = stream
        self.credentials = credentials
    }

    /// Handles one request of the stream.
    public func receive(_ req: Etcdserverpb_WatchRequest) {
        guard !closed else { return }
        let hub = service.hub
        switch req.requestUnion {
        case .createRequest(let c):
            var w = WatchCreate(key: c.key.bytes, rangeEnd: c.rangeEnd.bytes)
            w.startRevision = c.startRevision
            w.progressNotify = c.progressNotify
            w.noPut = c.filters.contains(.noput)
            w.noDelete = c.filters.contains(.nodelete)
            w.prevKV = c.prevKv
            w.watchID = c.watchID
            w.fragment = c.fragment
            // Auth comes after the negative-revision check and before the range check, as in etcd;
            // a refusal is a failed create on the stream (watch id -1), not an error of the call,
            // with etcd's reason for the auth error.
            var caller: Caller?
            if c.startRevision >= 0 {
                do throws(EtcdError) {
                    let auth = service.auth
                    caller = try auth.caller(token: credentials.token, commonName: credentials.commonName)
                    try auth.check(caller, .read, key: w.key, rangeEnd: w.rangeEnd)
                } catch {
                    return hub.reject(stream, reason: WatchService.authRefusalReason(error), watchID: -1)
                }
            }
            if let refuse = service.refusal, let reason = refuse(w) {
                return hub.reject(stream, reason: reason, watchID: c.watchID)
            }
            let store = service.store
            if let older = service.olderHistory, let holds = service.holds, !holds(w) {
                return replay(w, older, through: .max, caller: caller)
            }
            if let older = service.olderHistory, w.startRevision > 0, w.startRevision < store.compactRevision {
                return replay(w, older, through: store.compactRevision, caller: caller)
            }
            if let id = hub.create(stream, w), let caller, !caller.isRoot {
                owned[id] = (caller.name, w.key, w.rangeEnd)
                service.guarding(self, true)
            }
        case .cancelRequest(let c):
            replays.removeValue(forKey: c.watchID)?()
            forget(c.watchID)
            hub.cancel(stream, watchID: c.watchID)
        case .progressRequest:
            hub.requestProgress(stream)
        case .none:
            break
        }
    }

    /// Replays in progress, by watch id: each stops its source.
    private var replays: [Int64: () -> Void] = [:]

    /// A watcher starting before the store's history: held in the hub from the first revision the
    /// store has, while `older` sends what comes before; then released.
    private func replay(_ w: WatchCreate, _ older: OlderHistory, through: Int64, caller: Caller?) {
        let hub = service.hub
        var held = w
        held.startRevision = through == .max ? service.store.currentRevision + 1 : through + 1
        guard let id = hub.create(stream, held, held: true) else { return }
        if let caller, !caller.isRoot {
            owned[id] = (caller.name, w.key, w.rangeEnd)
            service.guarding(self, true)
        }
        var ended = false
        let stop = older(
            w, through,
            { [weak self] events, header in
                guard let self, !ended, !closed else { return }
                hub.sendHistory(stream, watchID: id, events, headerRevision: header)
            },
            { [weak self] end in
                guard let self, !ended else { return }
                ended = true
                replays[id] = nil
                guard !closed else { return }
                switch end {
                case .complete:
                    hub.release(stream, watchID: id)
                case .compacted(let revision):
                    forget(id)
                    hub.cancelCompacted(stream, watchID: id, revision: revision)
                case .canceled(let reason):
                    forget(id)
                    hub.cancel(stream, watchID: id, reason: reason)
                }
            })
        if !ended { replays[id] = stop }
    }

    /// The stream's sink drained: parked watchers may resume.
    public func drained() {
        guard !closed else { return }
        service.hub.streamDrained(stream)
    }

    /// Ends the stream: its watchers go.
    public func close() {
        guard !closed else { return }
        closed = true
        let stopping = replays
        replays.removeAll()
        for (_, stop) in stopping { stop() }
        owned.removeAll()
        service.guarding(self, false)
        service.hub.closeStream(stream)
    }

    private func forget(_ id: Int64) {
        guard owned.removeValue(forKey: id) != nil, owned.isEmpty else { return }
        service.guarding(self, false)
    }

    /// Cancels the watchers whose user is gone or may no longer read their range.
    func recheck() {
        let auth = service.auth
        for (id, o) in owned.sorted(by: { $0.key < $1.key }) {
            guard let caller = auth.caller(named: o.user) else {
                revoke(id)
                continue
            }
            do throws(EtcdError) {
                try auth.check(caller, .read, key: o.key, rangeEnd: o.rangeEnd)
            } catch {
                revoke(id)
            }
        }
    }

    private func revoke(_ id: Int64) {
        forget(id)
        service.hub.cancel(stream, watchID: id, reason: WatchService.permissionDeniedReason)
    }
}
