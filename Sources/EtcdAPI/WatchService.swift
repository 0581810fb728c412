import EtcdProto
import Foundation
import GRPC
import MVCC
import SwiftProtobuf
import WatchHub

/// Encodes watch responses. Events go through SwiftProtobuf once each; the response around them is
/// written by hand (field numbers from rpc.proto) so that encoded events are reused as they are.
public final class ProtoWatchEncoder: WatchEncoder {
    private let headerPrefix: [UInt8]  // cluster_id, member_id (fields 1, 2)
    private let raftTerm: UInt64

    public init(identity: MemberIdentity) {
        var h: [UInt8] = []
        Self.tag(&h, 1, 0); Self.varint(&h, identity.clusterID)
        Self.tag(&h, 2, 0); Self.varint(&h, identity.memberID)
        headerPrefix = h
        raftTerm = identity.raftTerm
    }

    public func encode(_ event: Event, prevKV: Bool) -> [UInt8] {
        var e = Mvccpb_Event()
        e.type = event.kind == .put ? .put : .delete
        e.kv = event.kv.proto
        if prevKV, let p = event.prevKV { e.prevKv = p.proto }
        return (try? e.serializedBytes()) ?? []
    }

    public func response(_ f: ResponseFields, events: [[UInt8]]) -> [UInt8] {
        var header = headerPrefix
        if f.headerRevision != 0 { Self.tag(&header, 3, 0); Self.varint(&header, UInt64(bitPattern: f.headerRevision)) }
        if raftTerm != 0 { Self.tag(&header, 4, 0); Self.varint(&header, raftTerm) }
        var size = header.count + 12
        for e in events { size += e.count + 6 }
        var out: [UInt8] = [0, 0, 0, 0, 0]  // the gRPC message prefix, filled in below
        out.reserveCapacity(size + f.cancelReason.utf8.count + 45)
        Self.tag(&out, 1, 2); Self.varint(&out, UInt64(header.count)); out += header
        if f.watchID != 0 { Self.tag(&out, 2, 0); Self.varint(&out, UInt64(bitPattern: f.watchID)) }
        if f.created { Self.tag(&out, 3, 0); out.append(1) }
        if f.canceled { Self.tag(&out, 4, 0); out.append(1) }
        if f.compactRevision != 0 { Self.tag(&out, 5, 0); Self.varint(&out, UInt64(bitPattern: f.compactRevision)) }
        if !f.cancelReason.isEmpty {
            Self.tag(&out, 6, 2); Self.varint(&out, UInt64(f.cancelReason.utf8.count)); out += Array(f.cancelReason.utf8)
        }
        if f.fragment { Self.tag(&out, 7, 0); out.append(1) }
        for e in events {
            Self.tag(&out, 11, 2); Self.varint(&out, UInt64(e.count)); out += e
        }
        let n = UInt32(out.count - 5)
        out[1] = UInt8(n >> 24); out[2] = UInt8((n >> 16) & 0xFF); out[3] = UInt8((n >> 8) & 0xFF); out[4] = UInt8(n & 0xFF)
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

/// A gRPC call as a watch sink.
final class CallSink: WatchSink {
    let call: ServerCall
    init(_ call: ServerCall) { self.call = call }
    func send(_ message: [UInt8]) { call.sendFramed(message) }
    var queuedBytes: Int { call.queuedBytes }
    func notifyWhenDrained() { call.notifyWhenDrained() }
}

/// The Watch service: one bidirectional stream per call, carrying many watchers.
public final class WatchService {
    public let hub: WatchHub
    private var streams: [ObjectIdentifier: WatchStream] = [:]
    let auth: AuthStore

    init(context: ServerContext, config: WatchHubConfig, auth: AuthStore) {
        self.auth = auth
        hub = WatchHub(store: context.store, encoder: ProtoWatchEncoder(identity: context.identity), config: config)
    }

    /// All open streams (for periodic progress notifications).
    public var openStreams: [WatchStream] { Array(streams.values) }

    /// Opens a watch stream answering through `sink` (a gRPC call, or the JSON gateway).
    /// Opens a watch stream answering through `sink` (a gRPC call, or the JSON gateway); `token`
    /// is the stream's auth token, checked at each create.
    func open(_ sink: any WatchSink, token: String?) -> WatchSession {
        let stream = hub.openStream(sink)
        streams[ObjectIdentifier(stream)] = stream
        return WatchSession(service: self, stream: stream, token: token)
    }

    fileprivate func close(_ stream: WatchStream) {
        hub.closeStream(stream)
        streams[ObjectIdentifier(stream)] = nil
    }

    func handle(_ call: ServerCall) {
        let session = open(CallSink(call), token: EtcdServices.token(call))
        call.onMessage = { bytes in
            guard let req = try? Etcdserverpb_WatchRequest(serializedBytes: bytes) else {
                call.finish(GRPCStatus(.internal, "grpc: error unmarshalling request"))
                return
            }
            session.receive(req)
        }
        call.onDrained = { [unowned self] in hub.streamDrained(session.stream) }
        let previous = call.onEnded
        call.onEnded = {
            previous?()
            session.close()
        }
    }
}

/// One open watch stream: requests in, responses out through its sink.
final class WatchSession {
    unowned let service: WatchService
    let stream: WatchStream
    private var closed = false
    let token: String?

    init(service: WatchService, stream: WatchStream, token: String?) {
        self.service = service
        self.stream = stream
        self.token = token
    }

    func receive(_ req: Etcdserverpb_WatchRequest) {
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
            // a refusal is a failed create on the stream, not an error of the call.
            if c.startRevision >= 0 {
                do throws(EtcdError) {
                    let auth = service.auth
                    try auth.check(try auth.caller(token: token), .read, key: w.key, rangeEnd: w.rangeEnd)
                } catch {
                    return hub.reject(stream, reason: error.message)
                }
            }
            hub.create(stream, w)
        case .cancelRequest(let c):
            hub.cancel(stream, watchID: c.watchID)
        case .progressRequest:
            hub.requestProgress(stream)
        case .none:
            break
        }
    }

    func close() {
        guard !closed else { return }
        closed = true
        service.close(stream)
    }
}
