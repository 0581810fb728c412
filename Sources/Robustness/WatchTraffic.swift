import EtcdProto
import Foundation
import GRPC
import VigilClient
import VigilCore

/// One watch on a stream of its own, recorded response by response (fragments joined).
final class RecordedWatch {
    private unowned let traffic: Traffic
    let index: Int
    private(set) var call: ClientCall?
    private var pending: [EventRecord] = []
    private var pendingFragments = 0
    private(set) var watchID: Int64?
    private(set) var ended = false
    /// The revision through which everything was delivered (events or progress).
    private(set) var through: Int64 = 0
    var onEnd: (() -> Void)?
    var onResponse: ((WatchResponseRecord) -> Void)?

    init(traffic: Traffic, record: WatchRecord, on c: GRPCClientConnection) {
        self.traffic = traffic
        index = traffic.history.watches.count
        traffic.history.watches.append(record)
        through = record.startRevision - 1
        call = c.open(
            EtcdMethod.watch.path,
            onMessage: { [weak self] bytes in
                guard let self, let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
                received(r)
            }, onClose: { [weak self] _ in self?.finish("closed") })
        var c = Etcdserverpb_WatchCreateRequest()
        c.key = Data(record.key.utf8)
        c.rangeEnd = Data(record.end.utf8)
        c.startRevision = record.startRevision
        c.prevKv = record.prevKV
        c.progressNotify = record.progressNotify
        if record.noPut { c.filters.append(.noput) }
        if record.noDelete { c.filters.append(.nodelete) }
        c.fragment = record.fragment
        var req = Etcdserverpb_WatchRequest()
        req.createRequest = c
        call?.send(req)
    }

    private func received(_ r: Etcdserverpb_WatchResponse) {
        guard !ended else { return }
        if r.created { watchID = r.watchID }
        pending += r.events.map(EventRecord.init)
        pendingFragments += 1
        if r.fragment { return }
        var rec = WatchResponseRecord(time: monotonicNanos(), headerRevision: r.header.revision, events: pending)
        rec.created = r.created
        rec.canceled = r.canceled
        rec.compactRevision = r.compactRevision
        rec.cancelReason = r.cancelReason
        rec.fragments = pendingFragments
        pending = []
        pendingFragments = 0
        traffic.history.watches[index].responses.append(rec)
        if let last = rec.events.last { through = max(through, last.revision) }
        if rec.isProgress { through = max(through, rec.headerRevision) }
        onResponse?(rec)
        if rec.canceled || rec.compactRevision != 0 {
            finish(rec.compactRevision != 0 ? "compacted" : "canceled")
            call?.cancel()
        }
    }

    func requestProgress() {
        guard !ended else { return }
        var req = Etcdserverpb_WatchRequest()
        req.progressRequest = Etcdserverpb_WatchProgressRequest()
        call?.send(req)
        traffic.history.watches[index].progressRequests.append(monotonicNanos())
    }

    /// Cancels the watch with a cancel request (the stream then ends), or by resetting the stream.
    func cancel(request: Bool) {
        guard !ended else { return }
        if request, let id = watchID {
            var c = Etcdserverpb_WatchCancelRequest()
            c.watchID = id
            var req = Etcdserverpb_WatchRequest()
            req.cancelRequest = c
            call?.send(req)
            // Its answer ends the record; the stream goes after a moment.
            Timers.after(traffic.loop, ms: 300) { [weak self] in self?.close("canceled") }
        } else {
            close("done")
        }
    }

    func close(_ why: String) {
        finish(why)
        call?.cancel()
        call = nil
    }

    private func finish(_ why: String) {
        guard !ended else { return }
        ended = true
        traffic.history.watches[index].ended = why
        let e = onEnd
        onEnd = nil
        e?()
    }
}

/// Watches opened continuously at ±100 revisions of the head: keys and prefixes, with prev_kv,
/// progress_notify, filters and fragment picked at random; RequestProgress now and then;
/// canceled after a while, or resumed from their last revision when a fault ended them.
final class WatchClient: TrafficClient {
    private static let ranges: [(key: String, end: String)] = [
        ("key/", "key0"), (KubernetesClient.prefix, KeySpace.prefixEnd(KubernetesClient.prefix)),
        ("\0", "\0"), ("lease/", "lease0"), ("locks/", "locks0"),
    ]
    private var current: RecordedWatch?

    override init(traffic: Traffic, id: Int) {
        super.init(traffic: traffic, id: id)
        traffic.whenStopping { [weak self] in self?.current?.close("done") }
        next(afterMs: 50, run)
    }

    private func run() {
        var (key, end) = Self.ranges.randomElement(using: &rng)!
        if Int.random(in: 0..<4, using: &rng) == 0 { (key, end) = ("key/\(Int.random(in: 0..<10, using: &rng))", "") }
        traffic.perform(conn, client: id, .range(key: key, end: end, revision: 0, limit: 1)) { [self] o in
            guard o.succeeded else { return next(afterMs: 50, run) }
            var start = o.revision + Int64.random(in: -100...100, using: &rng)
            if start < 1 { start = 1 }
            if Int.random(in: 0..<10, using: &rng) == 0 { start = 0 }
            var w = WatchRecord(id: 0, client: id, key: key, end: end, startRevision: start, opened: 0)
            w.prevKV = Bool.random(using: &rng)
            w.progressNotify = Bool.random(using: &rng)
            w.fragment = Int.random(in: 0..<5, using: &rng) == 0
            switch Int.random(in: 0..<10, using: &rng) {
            case 0: w.noPut = true
            case 1: w.noDelete = true
            default: break
            }
            open(w)
        }
    }

    private func open(_ record: WatchRecord) {
        guard !traffic.stopping else { return }
        conn.get { [self] c in
            guard let c, !traffic.stopping else { return next(afterMs: 50, run) }
            var r = record
            r.id = traffic.history.watches.count
            r.opened = monotonicNanos()
            let w = RecordedWatch(traffic: traffic, record: r, on: c)
            current = w
            var finished = false
            w.onEnd = { [self] in
                guard !finished else { return }
                finished = true
                current = nil
                // A fault ended it: resume after the last revision it had everything through.
                let why = traffic.history.watches[w.index].ended
                if why == "closed" && !traffic.stopping && w.through >= 1 {
                    var again = record
                    again.startRevision = w.through + 1
                    conn.after(ms: 50) { [self] in open(again) }
                } else {
                    next(afterMs: 10, run)
                }
            }
            conn.after(ms: UInt64.random(in: 300...800, using: &rng)) { [self] in
                guard !finished else { return }
                if Bool.random(using: &rng) { w.requestProgress() }
                conn.after(ms: 200) { [self] in
                    guard !finished else { return }
                    w.cancel(request: Bool.random(using: &rng))
                }
            }
        }
    }
}

/// The watch of every key from revision 2 to the end of the run: the reference history. It asks
/// for progress when idle and resumes after the last revision it has everything through.
final class CollectorClient: TrafficClient {
    private var watch: RecordedWatch?
    private var lastHeard: Int64 = 0
    private(set) var closed = false

    override init(traffic: Traffic, id: Int) {
        super.init(traffic: traffic, id: id)
        traffic.collector = self
        open(from: 2)
        tick()
    }

    private func open(from revision: Int64) {
        guard !closed else { return }
        conn.get { [self] c in
            guard let c, !closed else { return conn.after(ms: 50) { [self] in open(from: revision) } }
            var r = WatchRecord(
                id: traffic.history.watches.count, client: id, key: "\0", end: "\0", startRevision: revision,
                opened: monotonicNanos())
            r.progressNotify = true
            r.isCollector = true
            let w = RecordedWatch(traffic: traffic, record: r, on: c)
            watch = w
            w.onResponse = { [self] _ in
                lastHeard = monotonicNanos()
                traffic.collectorRevision = max(traffic.collectorRevision, w.through)
            }
            w.onEnd = { [self] in
                watch = nil
                let from = max(w.through + 1, traffic.collectorRevision + 1)
                conn.after(ms: 50) { [self] in open(from: from) }
            }
        }
    }

    /// RequestProgress when nothing came for 100 ms.
    private func tick() {
        guard !closed else { return }
        if let w = watch, monotonicNanos() - lastHeard > 100_000_000 { w.requestProgress() }
        conn.after(ms: 100, tick)
    }

    func close() {
        closed = true
        watch?.close("done")
        watch = nil
        conn.close()
    }
}
