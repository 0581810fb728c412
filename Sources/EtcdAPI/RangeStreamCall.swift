import EtcdProto
import Foundation
import GRPC
import MVCC
import SwiftProtobuf
import VigilCore

/// etcd 3.7's `KV/RangeStream`: a range answered in chunks, all read at one pinned revision (the
/// requested one, or the latest when the call starts), so that a huge range never sits whole in
/// the server. Merging the chunks gives the Range answer: each chunk carries the next slice of
/// key-values; the last also carries the header (revision: the latest at the start), `more` and
/// `count`. Chunks grow or shrink toward `--max-request-bytes` (from 10 key-values); the next
/// chunk is read only once the last one has left, so a client that stops reading holds one chunk
/// here. A compaction past the pinned revision ends the stream with etcd's compacted error.
/// Sorting other than by key, and revision filters, are refused as etcd 3.7 refuses them.
final class RangeStreamCall: CallHandler {
    private unowned let services: EtcdServices
    private let credentials: Credentials
    /// Runs before the first chunk (a mirror waits for its linearizable point there).
    private let gate: ((Etcdserverpb_RangeRequest, @escaping (EtcdError?) -> Void) -> Void)?
    private var request: Etcdserverpb_RangeRequest?
    private var next: [UInt8] = []
    private var pinned: Int64 = 0
    private var headerRevision: Int64 = 0
    private var chunkLimit = RangeStreamCall.initialChunk
    private var sent: Int64 = 0
    private var ended = false
    private var store: KVStore { services.context.store }

    static let initialChunk = 10

    init(
        services: EtcdServices, credentials: Credentials,
        gate: ((Etcdserverpb_RangeRequest, @escaping (EtcdError?) -> Void) -> Void)? = nil
    ) {
        self.services = services
        self.credentials = credentials
        self.gate = gate
    }

    /// etcd's checks: the request's shape, then the stream's limits, then who asks.
    static func check(_ r: Etcdserverpb_RangeRequest) throws(EtcdError) {
        if r.key.isEmpty { throw .emptyKey }
        if !(r.sortOrder == .none || (r.sortTarget == .key && r.sortOrder == .ascend)) { throw .rangeStreamSort }
        if r.minModRevision != 0 || r.maxModRevision != 0 || r.minCreateRevision != 0 || r.maxCreateRevision != 0 {
            throw .rangeStreamFilters
        }
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        guard request == nil, !ended else { return }
        guard let r = try? Etcdserverpb_RangeRequest(serializedBytes: message) else {
            return call.finish(EtcdError.malformedRequest.status)
        }
        request = r
        do throws(EtcdError) {
            try Self.check(r)
            let auth = services.auth
            try services.authorize(
                Access<Etcdserverpb_RangeRequest>.keys { c, r throws(EtcdError) in
                    try auth.check(c, .read, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes)
                }, r, credentials: credentials)
        } catch { return call.finish(error.status) }
        guard let gate else { return start(call, r) }
        gate(r) { [weak self, weak call] error in
            guard let self, let call, !ended else { return }
            if let error { return call.finish(error.status) }
            start(call, r)
        }
    }

    private func start(_ call: ServerCall, _ r: Etcdserverpb_RangeRequest) {
        headerRevision = store.committedRevision
        pinned = r.revision > 0 ? r.revision : headerRevision
        next = r.key.bytes
        if r.countOnly {
            do throws(MVCCError) {
                let n = try store.range(r.key.bytes, r.rangeEnd.bytes, revision: pinned, countOnly: true).count
                var last = Etcdserverpb_RangeResponse()
                last.header = services.context.header(headerRevision)
                last.count = Int64(n)
                send(call, last)
                call.finish(.ok)
            } catch { call.finish(EtcdError.from(error).status) }
            return
        }
        pump(call)
    }

    func callDrained(_ call: ServerCall) { pump(call) }

    func callEnded(_ call: ServerCall) { ended = true }

    /// Sends one chunk; returns its size.
    @discardableResult
    private func send(_ call: ServerCall, _ chunk: Etcdserverpb_RangeResponse) -> Int {
        var m = Etcdserverpb_RangeStreamResponse()
        m.rangeResponse = chunk
        guard let bytes: [UInt8] = try? m.serializedBytes() else { return 0 }
        call.send(bytes)
        return bytes.count
    }

    /// Reads and sends the next chunk, once the last one has gone.
    private func pump(_ call: ServerCall) {
        guard let r = request, !ended, !call.isFinished, pinned > 0 else { return }
        guard call.queuedBytes == 0 else { return call.notifyWhenDrained() }
        let total = r.limit > 0 ? r.limit : Int64.max
        let limit = Int(min(Int64(chunkLimit), total - sent))
        let chunk: (kvs: [KeyValue], more: Bool)
        do throws(MVCCError) {
            chunk = try store.rangeChunk(next, r.rangeEnd.bytes, revision: pinned, limit: limit, keysOnly: r.keysOnly)
        } catch { return call.finish(EtcdError.from(error).status) }
        sent += Int64(chunk.kvs.count)
        var out = Etcdserverpb_RangeResponse()
        out.kvs = chunk.kvs.map(\.proto)
        let done = !chunk.more || sent == total
        if done {
            out.header = services.context.header(headerRevision)
            out.more = chunk.more
            out.count = sent
            if chunk.more, let last = chunk.kvs.last {
                let rest = try? store.range(last.key + [0], r.rangeEnd.bytes, revision: pinned, countOnly: true)
                out.count += Int64(rest?.count ?? 0)
            }
        } else if let last = chunk.kvs.last {
            next = last.key + [0]
        }
        let size = send(call, out)
        if done { return call.finish(.ok) }
        // Toward one --max-request-bytes a chunk: double below half of it, halve above twice it.
        let target = services.context.limits.maxRequestBytes
        if size < target / 2 { chunkLimit *= 2 } else if size > target * 2 { chunkLimit = max(1, chunkLimit / 2) }
        call.notifyWhenDrained()
    }
}

extension EtcdServices {
    func registerRangeStream() {
        stream(.rangeStream) { [unowned self] call in rangeStream(credentials: call.credentials) }
    }

    /// The handler of one RangeStream call served from this store; `gate` runs before its first
    /// chunk (a mirror's linearizable point).
    public func rangeStream(
        credentials: Credentials,
        gate: ((Etcdserverpb_RangeRequest, @escaping (EtcdError?) -> Void) -> Void)? = nil
    ) -> any CallHandler {
        RangeStreamCall(services: self, credentials: credentials, gate: gate)
    }
}
