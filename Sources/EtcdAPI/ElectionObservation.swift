import EtcdProto
import Foundation
import GRPC
import MVCC
import VigilCore

/// One Observe of an election, as etcd's `Election.Observe` runs it: the current leader (the key
/// under `name/` with the lowest create revision) if there is one, then every put to the leader's
/// key (each proclaimed value, in order, none skipped however close together they were written);
/// when the leader's key goes, the next oldest key at that revision, or else the first key put
/// under the name afterwards.
public final class ElectionObservation {
    private let recipes: Recipes
    private let context: ServerContext
    private let prefix: [UInt8]
    private let send: (V3electionpb_LeaderResponse) -> Void
    private var listener: Recipes.Listener?
    /// The key being followed; nil while the election has no leader.
    private var leader: [UInt8]?
    private var started = false

    init(
        recipes: Recipes, context: ServerContext, prefix: [UInt8],
        send: @escaping (V3electionpb_LeaderResponse) -> Void
    ) {
        self.recipes = recipes
        self.context = context
        self.prefix = prefix
        self.send = send
        let l = Recipes.Listener(prefix: prefix) { [weak self] _, events in self?.heard(events) }
        listener = l
        recipes.add(l)
    }

    /// Sends the current leader, if any; changes follow by themselves.
    public func start() {
        guard listener != nil, !started else { return }
        started = true
        let committed = context.store.committedRevision
        if let kv = recipes.oldest(under: prefix, at: committed) { follow(kv, header: committed) }
    }

    private func follow(_ kv: KeyValue, header revision: Int64) {
        leader = kv.key
        var resp = V3electionpb_LeaderResponse()
        resp.header = context.header(revision)
        resp.kv = kv.proto
        send(resp)
    }

    private func heard(_ events: [(revision: Int64, event: Event)]) {
        guard started else { return }
        for (revision, e) in events where listener != nil {
            if let key = leader {
                guard e.kv.key == key else { continue }
                if e.kind == .put {
                    follow(e.kv, header: revision)
                    continue
                }
                // The leader resigned or its lease ended: the next oldest key leads.
                leader = nil
                let at = max(revision, context.store.compactRevision)
                if let next = recipes.oldest(under: prefix, at: at) { follow(next, header: at) }
            } else if e.kind == .put {
                // etcd's observer reports the first key put while there is no leader, with the
                // header at that put's revision.
                follow(e.kv, header: revision)
            }
        }
    }

    /// Ends the observation.
    public func cancel() {
        guard let l = listener else { return }
        recipes.remove(l)
        listener = nil
    }
}

/// An Observe call over gRPC: one LeaderRequest, then LeaderResponses until the caller leaves.
final class ObserveCall: CallHandler {
    private unowned let services: EtcdServices
    private let credentials: Credentials
    private var observation: ElectionObservation?

    init(services: EtcdServices, credentials: Credentials) {
        self.services = services
        self.credentials = credentials
    }

    func call(_ call: ServerCall, received message: [UInt8]) {
        guard observation == nil else { return }
        guard let req = try? V3electionpb_LeaderRequest(serializedBytes: message) else {
            return call.finish(EtcdError.malformedRequest.status)
        }
        do throws(EtcdError) {
            observation = try services.observe(name: req.name.bytes, credentials: credentials) { [weak call] resp in
                try? call?.send(resp)
            }
            observation?.start()
        } catch {
            call.finish(error.status)
        }
    }

    func callEnded(_ call: ServerCall) {
        observation?.cancel()
        observation = nil
    }
}
