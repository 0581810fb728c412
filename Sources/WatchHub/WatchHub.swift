import IntervalTree
import MVCC

/// Turns events and responses into wire bytes (the API layer implements it with protobuf).
public protocol WatchEncoder: AnyObject {
    /// One `mvccpb.Event`.
    func encode(_ event: Event, prevKV: Bool) -> [UInt8]
    /// One `WatchResponse` whose `events` are the given encoded events.
    func response(_ fields: ResponseFields, events: [[UInt8]]) -> [UInt8]
}

/// The scalar fields of a watch response.
public struct ResponseFields: Hashable, Sendable {
    public var headerRevision: Int64
    public var watchID: Int64
    public var created = false
    public var canceled = false
    public var compactRevision: Int64 = 0
    public var cancelReason = ""
    public var fragment = false

    public init(headerRevision: Int64, watchID: Int64) {
        self.headerRevision = headerRevision
        self.watchID = watchID
    }
}

/// Where a stream's responses go: the gRPC stream (or gateway response) behind it.
public protocol WatchSink: AnyObject {
    func send(_ message: [UInt8])
    /// Bytes sent but not yet taken by the peer (its flow-control window).
    var queuedBytes: Int { get }
}

/// A watch request, as etcd's WatchCreateRequest after the API layer's conversions.
public struct WatchCreate: Sendable {
    public var key: Bytes
    public var rangeEnd: Bytes
    public var startRevision: Int64 = 0
    public var progressNotify = false
    public var noPut = false
    public var noDelete = false
    public var prevKV = false
    public var watchID: Int64 = 0
    public var fragment = false

    public init(key: Bytes, rangeEnd: Bytes = []) {
        self.key = key
        self.rangeEnd = rangeEnd
    }
}

/// Settings of the hub.
public struct WatchHubConfig: Sendable {
    /// Ring bounds (events, bytes).
    public var ringMaxEvents = 200_000
    public var ringMaxBytes = 64 << 20
    /// A stream whose unsent bytes pass this is slow: its watchers are parked until it drains.
    public var streamQueueLimit = 1 << 20
    /// Revisions read from the store per catch-up step of one watcher.
    public var catchUpRevisions = 1000
    /// Responses over this many bytes are split when the watcher asked for fragments.
    public var fragmentBytes = 1_572_864 + 512 * 1024
    public init() {}
}

final class Watcher {
    let id: Int64
    unowned let stream: WatchStream
    let key: Bytes
    let end: Bytes
    let noPut: Bool
    let noDelete: Bool
    let prevKV: Bool
    let progressNotify: Bool
    let fragment: Bool
    /// The next revision this watcher must receive.
    var nextRev: Int64
    var synced = false
    /// Set once the watcher left the hub (canceled, compacted or its stream closed).
    var removed = false
    var handle: IntervalTree<Watcher>.Handle = -1
    var sentSinceProgress = false
    /// Indices of events matched in the revision being dispatched.
    var matched: [Int32] = []

    init(id: Int64, stream: WatchStream, c: WatchCreate, nextRev: Int64) {
        self.id = id
        self.stream = stream
        key = c.key
        end = c.rangeEnd
        noPut = c.noPut
        noDelete = c.noDelete
        prevKV = c.prevKV
        progressNotify = c.progressNotify
        fragment = c.fragment
        self.nextRev = nextRev
    }

    func wants(_ e: Event) -> Bool { e.kind == .put ? !noPut : !noDelete }
}

/// One watch stream: many watchers sharing one sink.
public final class WatchStream {
    let sink: any WatchSink
    var watchers: [Int64: Watcher] = [:]
    var nextID: Int64 = 0
    var closed = false
    init(sink: any WatchSink) { self.sink = sink }
    public var watcherCount: Int { watchers.count }
    /// Bytes sent to this stream's peer and not yet taken by it.
    public var queuedBytes: Int { sink.queuedBytes }
}

/// Counters for metrics.
public struct WatchHubStats: Sendable {
    public var eventsSent = 0
    public var responsesSent = 0
    public var parked = 0
    public var storeCatchUps = 0
}

/// The watch hub: a revision-ordered event ring feeding watchers found through an interval tree
/// (single-key watchers through a hash map), so that dispatching an event costs in proportion to
/// the watchers it matches.
///
/// Watchers are *synced* (they have everything up to the delivered revision and get each new
/// revision as it becomes durable) or *unsynced* (catching up from the ring or the store, or
/// parked because their stream is slow). A stream whose queue passes `streamQueueLimit` has its
/// watchers parked at the first revision they miss; when it drains they catch up from the ring or,
/// if that has moved on, from the store — nothing is lost or reordered and nothing is buffered
/// without bound. Only durable revisions are delivered.
public final class WatchHub {
    public let config: WatchHubConfig
    private let store: KVStore
    private let encoder: any WatchEncoder
    private var ring: EventRing
    /// Every revision up to this one has been delivered to synced watchers.
    public private(set) var delivered: Int64
    private var singles: [Bytes: [Watcher]] = [:]
    private var ranges = IntervalTree<Watcher>()
    private var unsynced: [ObjectIdentifier: Watcher] = [:]
    public private(set) var stats = WatchHubStats()
    public private(set) var watcherCount = 0
    public private(set) var streamCount = 0

    public init(store: KVStore, encoder: any WatchEncoder, config: WatchHubConfig = WatchHubConfig()) {
        self.store = store
        self.encoder = encoder
        self.config = config
        ring = EventRing(maxEvents: config.ringMaxEvents, maxBytes: config.ringMaxBytes)
        delivered = store.committedRevision
    }

    /// Watchers currently unsynced (catching up or parked).
    public var unsyncedCount: Int { unsynced.count }

    /// Events and bytes held by the ring.
    public var ringEvents: Int { ring.eventCount }
    public var ringBytes: Int { ring.bytes }

    /// Set when some watcher may be able to catch up (the caller should run `catchUp()` soon).
    public private(set) var catchUpPending = false

    /// A stream drained: its parked watchers may resume.
    public func streamDrained(_ s: WatchStream) {
        if s.watchers.values.contains(where: { !$0.synced }) { catchUpPending = true }
    }

    // MARK: Streams

    public func openStream(_ sink: any WatchSink) -> WatchStream {
        streamCount += 1
        return WatchStream(sink: sink)
    }

    /// Frees everything the stream's watchers held.
    public func closeStream(_ s: WatchStream) {
        guard !s.closed else { return }
        s.closed = true
        streamCount -= 1
        for w in s.watchers.values { unindex(w) }
        s.watchers.removeAll()
    }

    private func send(_ s: WatchStream, _ f: ResponseFields, _ events: [[UInt8]] = []) {
        s.sink.send(encoder.response(f, events: events))
        stats.responsesSent += 1
        stats.eventsSent += events.count
    }

    private func fail(_ s: WatchStream, _ reason: String) {
        var f = ResponseFields(headerRevision: delivered, watchID: -1)
        f.created = true
        f.canceled = true
        f.cancelReason = reason
        send(s, f)
    }

    // MARK: Requests

    /// Handles a create request (etcd's order of checks), answering `created` before any event.
    public func create(_ s: WatchStream, _ c: WatchCreate) {
        var c = c
        if c.key.isEmpty { c.key = [0] }
        if c.startRevision < 0 { return fail(s, "etcdserver: mvcc: required revision has been compacted") }
        if !c.rangeEnd.isEmpty && c.rangeEnd != [0] && compareBytes(c.key, c.rangeEnd) >= 0 {
            return fail(s, "mvcc: watcher range is empty")
        }
        let id: Int64
        if c.watchID != 0 {
            if s.watchers[c.watchID] != nil { return fail(s, "mvcc: duplicate watch ID provided on the WatchStream") }
            id = c.watchID
        } else {
            while s.watchers[s.nextID] != nil { s.nextID += 1 }
            id = s.nextID
            s.nextID += 1
        }
        let start = c.startRevision == 0 ? delivered + 1 : c.startRevision
        let w = Watcher(id: id, stream: s, c: c, nextRev: start)
        s.watchers[id] = w
        watcherCount += 1
        var f = ResponseFields(headerRevision: delivered, watchID: id)
        f.created = true
        send(s, f)
        if c.startRevision > 0 && c.startRevision < store.compactRevision {
            // Created, then canceled with the compact revision, as etcd answers.
            s.watchers[id] = nil
            watcherCount -= 1
            sendCompacted(s, id)
            return
        }
        if c.rangeEnd.isEmpty {
            singles[c.key, default: []].append(w)
        } else {
            w.handle = ranges.insert(low: c.key, high: c.rangeEnd == [0] ? nil : c.rangeEnd, w)
        }
        if start <= delivered {
            unsynced[ObjectIdentifier(w)] = w
            catchUpPending = true
        } else {
            w.synced = true  // possibly in the future: revisions below nextRev are skipped
        }
    }

    /// Cancels a watcher; unknown ids get no answer.
    public func cancel(_ s: WatchStream, watchID: Int64) {
        guard let w = s.watchers.removeValue(forKey: watchID) else { return }
        unindex(w)
        var f = ResponseFields(headerRevision: delivered, watchID: watchID)
        f.canceled = true
        send(s, f)
    }

    /// Answers a progress request with `watch_id -1` at the delivered revision, ordered after the
    /// events already queued, if every watcher of the stream is synced.
    public func requestProgress(_ s: WatchStream) {
        guard !s.watchers.isEmpty, s.watchers.values.allSatisfy({ $0.synced && $0.nextRev <= delivered + 1 }) else { return }
        send(s, ResponseFields(headerRevision: delivered, watchID: -1))
    }

    /// The periodic progress notification: each synced watcher that asked for it and received
    /// nothing since the last tick gets an empty response at the delivered revision.
    public func progressTick(streams: [WatchStream]) {
        for s in streams where !s.closed {
            for w in s.watchers.values where w.progressNotify {
                if w.synced && w.nextRev <= delivered + 1 && !w.sentSinceProgress {
                    send(s, ResponseFields(headerRevision: delivered, watchID: w.id))
                }
                w.sentSinceProgress = false
            }
        }
    }

    private func unindex(_ w: Watcher) {
        guard !w.removed else { return }
        w.removed = true
        watcherCount -= 1
        unsynced[ObjectIdentifier(w)] = nil
        if w.end.isEmpty {
            if var list = singles[w.key] {
                list.removeAll { $0 === w }
                singles[w.key] = list.isEmpty ? nil : list
            }
        } else {
            ranges.remove(w.handle)
        }
    }

    // MARK: Events

    /// Takes the events of a new revision (not yet durable: delivered by `advance`).
    public func publish(_ events: [Event], revision: Int64) {
        ring.append(RevisionEvents(revision: revision, events: events), trimmableUpTo: delivered)
    }

    /// Delivers every revision up to `committed` (now durable) to the synced watchers.
    public func advance(to committed: Int64) {
        while delivered < committed {
            let r = delivered + 1
            if let entry = ring.entry(r) { dispatch(entry) }
            delivered = r
        }
        ring.trim(upTo: delivered)
    }

    private struct ResponseKey: Hashable {
        var watchID: Int64
        var prevKV: Bool
        var fragment: Bool
        var matched: [Int32]
    }

    private func dispatch(_ entry: RevisionEvents) {
        var touched: [Watcher] = []
        for (i, e) in entry.events.enumerated() {
            let idx = Int32(i)
            if let list = singles[e.kv.key] {
                for w in list {
                    if w.matched.isEmpty { touched.append(w) }
                    w.matched.append(idx)
                }
            }
            ranges.stab(e.kv.key) { w in
                if w.matched.isEmpty { touched.append(w) }
                w.matched.append(idx)
            }
        }
        // Watchers on different streams with the same id, options and matches get the very same bytes.
        var cache: [ResponseKey: [UInt8]] = [:]
        for w in touched {
            let matched = w.matched
            w.matched.removeAll(keepingCapacity: true)
            guard w.synced, !w.removed, entry.revision >= w.nextRev else { continue }
            let wanted = matched.filter { w.wants(entry.events[Int($0)]) }
            if wanted.isEmpty { continue }
            if w.stream.sink.queuedBytes > config.streamQueueLimit {
                park(w, at: entry.revision)
                continue
            }
            let key = ResponseKey(watchID: w.id, prevKV: w.prevKV, fragment: w.fragment, matched: wanted)
            if let bytes = cache[key] {
                w.stream.sink.send(bytes)
                stats.responsesSent += 1
                stats.eventsSent += wanted.count
            } else {
                let events = wanted.map { entry.encoding(Int($0), prevKV: w.prevKV, encoder) }
                let fields = ResponseFields(headerRevision: entry.revision, watchID: w.id)
                if w.fragment {
                    sendFragmented(w.stream, fields, events)
                } else {
                    let bytes = encoder.response(fields, events: events)
                    cache[key] = bytes
                    w.stream.sink.send(bytes)
                    stats.responsesSent += 1
                    stats.eventsSent += events.count
                }
            }
            w.sentSinceProgress = true
            w.nextRev = entry.revision + 1
        }
    }

    /// `{watch_id, compact_revision, canceled}` with header revision 0, as etcd sends it.
    private func sendCompacted(_ s: WatchStream, _ id: Int64) {
        var f = ResponseFields(headerRevision: 0, watchID: id)
        f.compactRevision = store.compactRevision
        f.canceled = true
        send(s, f)
    }

    private func park(_ w: Watcher, at revision: Int64) {
        w.synced = false
        w.nextRev = revision
        unsynced[ObjectIdentifier(w)] = w
        stats.parked += 1
    }

    /// Sends `events` in as many responses as needed to stay under the fragment size (all but the
    /// last marked `fragment`).
    private func sendFragmented(_ s: WatchStream, _ fields: ResponseFields, _ events: [[UInt8]]) {
        var size = 0
        for e in events { size += e.count + 8 }
        if events.count <= 1 || size < config.fragmentBytes {
            send(s, fields, events)
            return
        }
        var group: [[UInt8]] = []
        var groupSize = 0
        var f = fields
        f.fragment = true
        for (i, e) in events.enumerated() {
            if !group.isEmpty && groupSize + e.count + 8 > config.fragmentBytes {
                send(s, f, group)
                group.removeAll()
                groupSize = 0
            }
            group.append(e)
            groupSize += e.count + 8
            if i == events.count - 1 {
                f.fragment = false
                send(s, f, group)
            }
        }
    }

    // MARK: Catch-up

    /// Moves unsynced watchers forward: from the ring when it still holds their next revision,
    /// else from the store in bounded steps. Slow streams are skipped until they drain.
    public func catchUp() {
        catchUpPending = false
        for w in Array(unsynced.values) {
            guard !w.stream.closed else { continue }
            var budget = 4
            while !w.synced, !w.removed, budget > 0, w.stream.sink.queuedBytes <= config.streamQueueLimit {
                budget -= 1
                step(w)
            }
            // More to do and room to send: come back next turn. A full stream waits for its drain.
            if !w.synced, !w.removed, w.stream.sink.queuedBytes <= config.streamQueueLimit { catchUpPending = true }
        }
    }

    private func step(_ w: Watcher) {
        if w.nextRev > delivered {
            w.synced = true
            unsynced[ObjectIdentifier(w)] = nil
            return
        }
        var events: [[UInt8]] = []
        var bytes = 0
        var last = w.nextRev - 1
        if let oldest = ring.oldestRevision, w.nextRev >= oldest {
            ring.forEach(from: w.nextRev) { entry in
                guard entry.revision <= delivered else { return false }
                for (i, e) in entry.events.enumerated() where KeyRange.contains(e.kv.key, key: w.key, end: w.end) && w.wants(e) {
                    let enc = entry.encoding(i, prevKV: w.prevKV, encoder)
                    events.append(enc)
                    bytes += enc.count
                }
                last = entry.revision
                return bytes < config.streamQueueLimit / 2
            }
            if last < w.nextRev { last = delivered }  // nothing of this range left in the ring window
        } else {
            if store.compactRevision > 0 && w.nextRev < store.compactRevision {
                sendCompacted(w.stream, w.id)
                w.stream.watchers[w.id] = nil
                unindex(w)
                return
            }
            stats.storeCatchUps += 1
            let to = min(delivered, w.nextRev + Int64(config.catchUpRevisions) - 1, (ring.oldestRevision ?? Int64.max) - 1)
            for (_, e) in store.events(w.key, w.end, from: w.nextRev, to: to) where w.wants(e) {
                events.append(encoder.encode(e, prevKV: w.prevKV))
            }
            last = to
        }
        if !events.isEmpty {
            let f = ResponseFields(headerRevision: delivered, watchID: w.id)
            if w.fragment { sendFragmented(w.stream, f, events) } else { send(w.stream, f, events) }
            w.sentSinceProgress = true
        }
        w.nextRev = last + 1
        if w.nextRev > delivered {
            w.synced = true
            unsynced[ObjectIdentifier(w)] = nil
        }
    }
}
