import IntervalTree
import MVCC

/// Turns events and responses into wire bytes (the API layer implements it with protobuf).
public protocol WatchEncoder: AnyObject {
    /// One `mvccpb.Event`.
    func encode(_ event: Event, prevKV: Bool) -> [UInt8]
    /// One `WatchResponse` whose `events` are the given encoded events, as the bytes to write on the
    /// stream unchanged (with the transport's framing, e.g. the gRPC length prefix), so that one
    /// encoding is shared by every stream that receives it.
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
    /// Asks for one `WatchHub.streamDrained` call once the queue has gone out.
    func notifyWhenDrained()
}

extension WatchSink {
    public func notifyWhenDrained() {}
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

/// All watchers on one [key, end): a single entry in the index however many watchers share it
/// (thousands of subscribers on one configuration prefix cost one tree node).
final class WatcherGroup {
    let key: Bytes
    let end: Bytes
    var members: [Watcher] = []
    var handle: IntervalTree<WatcherGroup>.Handle = -1
    init(key: Bytes, end: Bytes) {
        self.key = key
        self.end = end
    }
}

/// One watcher, kept small (56 bytes with its header) because a million of them must fit: options
/// and state are bits, the range lives in the group.
final class Watcher {
    let id: Int64
    /// The stream outlives its watchers: the hub holds every open stream, and closing one removes
    /// its watchers from the hub first.
    unowned(unsafe) let stream: WatchStream
    let group: WatcherGroup
    /// The next revision this watcher must receive.
    var nextRev: Int64
    /// Index in `group.members`.
    var slot: Int32 = -1
    private var bits: UInt16

    private static let noPutBit: UInt16 = 1, noDeleteBit: UInt16 = 2, prevKVBit: UInt16 = 4
    private static let progressBit: UInt16 = 8, fragmentBit: UInt16 = 16, syncedBit: UInt16 = 32
    private static let removedBit: UInt16 = 64, sentBit: UInt16 = 128

    init(id: Int64, stream: WatchStream, group: WatcherGroup, c: WatchCreate, nextRev: Int64) {
        self.id = id
        self.stream = stream
        self.group = group
        self.nextRev = nextRev
        var b: UInt16 = 0
        if c.noPut { b |= Self.noPutBit }
        if c.noDelete { b |= Self.noDeleteBit }
        if c.prevKV { b |= Self.prevKVBit }
        if c.progressNotify { b |= Self.progressBit }
        if c.fragment { b |= Self.fragmentBit }
        bits = b
    }

    private func flag(_ bit: UInt16) -> Bool { bits & bit != 0 }
    private func set(_ bit: UInt16, _ on: Bool) { if on { bits |= bit } else { bits &= ~bit } }

    var prevKV: Bool { flag(Self.prevKVBit) }
    var progressNotify: Bool { flag(Self.progressBit) }
    var fragment: Bool { flag(Self.fragmentBit) }
    /// Has everything up to the delivered revision and gets each new one as it is delivered.
    var synced: Bool { get { flag(Self.syncedBit) } set { set(Self.syncedBit, newValue) } }
    /// Left the hub (canceled, compacted or its stream closed).
    var removed: Bool { get { flag(Self.removedBit) } set { set(Self.removedBit, newValue) } }
    var sentSinceProgress: Bool { get { flag(Self.sentBit) } set { set(Self.sentBit, newValue) } }

    func wants(_ e: Event) -> Bool { e.kind == .put ? !flag(Self.noPutBit) : !flag(Self.noDeleteBit) }
}

/// A stream's watchers by id: ids the hub assigns are small and dense (0, 1, 2, …) and live in an
/// array; ids a client picks far from that go to a dictionary.
struct WatcherTable {
    private var dense: [Watcher?] = []
    private var sparse: [Int64: Watcher] = [:]
    private(set) var count = 0

    subscript(id: Int64) -> Watcher? {
        if id >= 0 && id < Int64(dense.count) { return dense[Int(id)] }
        return sparse[id]
    }

    mutating func insert(_ w: Watcher) {
        count += 1
        if w.id >= 0 && w.id <= Int64(dense.count) && w.id < 1 << 24 {
            if w.id == Int64(dense.count) { dense.append(w) } else { dense[Int(w.id)] = w }
        } else {
            sparse[w.id] = w
        }
    }

    @discardableResult mutating func remove(_ id: Int64) -> Watcher? {
        let w: Watcher?
        if id >= 0 && id < Int64(dense.count) {
            w = dense[Int(id)]
            dense[Int(id)] = nil
        } else {
            w = sparse.removeValue(forKey: id)
        }
        if w != nil { count -= 1 }
        return w
    }

    var isEmpty: Bool { count == 0 }

    var all: [Watcher] { dense.compactMap { $0 } + sparse.values }

    /// Whether every watcher satisfies `p` (without building `all`).
    func allSatisfy(_ p: (Watcher) -> Bool) -> Bool {
        for w in dense { if let w, !p(w) { return false } }
        return sparse.values.allSatisfy(p)
    }

    mutating func removeAll() {
        dense = []
        sparse = [:]
        count = 0
    }
}

/// One watch stream: many watchers sharing one sink.
public final class WatchStream {
    let sink: any WatchSink
    var watchers = WatcherTable()
    var nextID: Int64 = 0
    var closed = false
    /// How many of this stream's watchers are unsynced.
    var unsyncedCount = 0
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
    private var singles: [Bytes: WatcherGroup] = [:]
    private var rangeGroups: [RangeKey: WatcherGroup] = [:]
    private var ranges = IntervalTree<WatcherGroup>()
    private var unsynced: [ObjectIdentifier: Watcher] = [:]
    public private(set) var stats = WatchHubStats()
    public private(set) var watcherCount = 0
    public private(set) var streamCount = 0
    private var openStreams: [ObjectIdentifier: WatchStream] = [:]

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
        if s.unsyncedCount > 0 { catchUpPending = true }
    }

    // MARK: Streams

    /// Opens a stream; the hub keeps it until `closeStream` (its watchers point at it).
    public func openStream(_ sink: any WatchSink) -> WatchStream {
        streamCount += 1
        let s = WatchStream(sink: sink)
        openStreams[ObjectIdentifier(s)] = s
        return s
    }

    /// Frees everything the stream's watchers held.
    public func closeStream(_ s: WatchStream) {
        guard !s.closed else { return }
        s.closed = true
        streamCount -= 1
        openStreams[ObjectIdentifier(s)] = nil
        for w in s.watchers.all { unindex(w) }
        s.watchers.removeAll()
    }

    private func send(_ s: WatchStream, _ f: ResponseFields, _ events: [[UInt8]] = []) {
        s.sink.send(encoder.response(f, events: events))
        stats.responsesSent += 1
        stats.eventsSent += events.count
    }

    /// Answers a create request with a failure (`watch_id -1`, created and canceled) without
    /// creating a watcher; the API layer uses it for permission refusals.
    public func reject(_ s: WatchStream, reason: String) { fail(s, reason) }

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
        var f = ResponseFields(headerRevision: delivered, watchID: id)
        f.created = true
        send(s, f)
        if c.startRevision > 0 && c.startRevision < store.compactRevision {
            // Created, then canceled with the compact revision, as etcd answers.
            sendCompacted(s, id)
            return
        }
        let w = Watcher(id: id, stream: s, group: group(c.key, c.rangeEnd), c: c, nextRev: start)
        s.watchers.insert(w)
        watcherCount += 1
        w.slot = Int32(w.group.members.count)
        w.group.members.append(w)
        if start <= delivered {
            unsynced[ObjectIdentifier(w)] = w
            s.unsyncedCount += 1
            catchUpPending = true
        } else {
            w.synced = true  // possibly in the future: revisions below nextRev are skipped
        }
    }

    private struct RangeKey: Hashable {
        var key: Bytes
        var end: Bytes
    }

    /// The group of [key, end), made and indexed on first use.
    private func group(_ key: Bytes, _ end: Bytes) -> WatcherGroup {
        if end.isEmpty {
            if let g = singles[key] { return g }
            let g = WatcherGroup(key: key, end: end)
            singles[key] = g
            return g
        }
        let rk = RangeKey(key: key, end: end)
        if let g = rangeGroups[rk] { return g }
        let g = WatcherGroup(key: key, end: end)
        g.handle = ranges.insert(low: key, high: end == [0] ? nil : end, g)
        rangeGroups[rk] = g
        return g
    }

    /// Cancels a watcher; unknown ids get no answer.
    public func cancel(_ s: WatchStream, watchID: Int64) {
        guard let w = s.watchers.remove(watchID) else { return }
        unindex(w)
        var f = ResponseFields(headerRevision: delivered, watchID: watchID)
        f.canceled = true
        send(s, f)
    }

    /// Answers a progress request with `watch_id -1` at the delivered revision, ordered after the
    /// events already queued, if every watcher of the stream is synced.
    public func requestProgress(_ s: WatchStream) {
        guard !s.watchers.isEmpty, s.unsyncedCount == 0,
              s.watchers.allSatisfy({ $0.nextRev <= delivered + 1 }) else { return }
        send(s, ResponseFields(headerRevision: delivered, watchID: -1))
    }

    /// The periodic progress notification: each synced watcher that asked for it and received
    /// nothing since the last tick gets an empty response at the delivered revision.
    public func progressTick(streams: [WatchStream]) {
        for s in streams where !s.closed {
            for w in s.watchers.all where w.progressNotify {
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
        if unsynced.removeValue(forKey: ObjectIdentifier(w)) != nil { w.stream.unsyncedCount -= 1 }
        let g = w.group
        let slot = Int(w.slot)
        let last = g.members.removeLast()
        if last !== w {
            g.members[slot] = last
            last.slot = Int32(slot)
        }
        if g.members.isEmpty {
            if g.end.isEmpty {
                singles[g.key] = nil
            } else {
                ranges.remove(g.handle)
                rangeGroups[RangeKey(key: g.key, end: g.end)] = nil
            }
        }
    }

    private func markSynced(_ w: Watcher) {
        w.synced = true
        if unsynced.removeValue(forKey: ObjectIdentifier(w)) != nil { w.stream.unsyncedCount -= 1 }
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

    /// Remembers the last response built during one dispatch, so that watchers with the same id,
    /// options and matches (typical of many subscribers to one prefix) share the very same bytes.
    private struct ResponseMemo {
        var cache: [ResponseKey: [UInt8]] = [:]
        var lastKey: ResponseKey?
        var lastBytes: [UInt8] = []
    }

    private static let firstEvent: [Int32] = [0]

    private func dispatch(_ entry: RevisionEvents) {
        var memo = ResponseMemo()
        if entry.events.count == 1 {
            // One event (a put or a delete): each matching group once, each member once.
            let key = entry.events[0].kv.key
            if let g = singles[key] { for w in g.members { deliver(w, entry, Self.firstEvent, &memo) } }
            ranges.stab(key) { g in for w in g.members { deliver(w, entry, Self.firstEvent, &memo) } }
            return
        }
        // Several events (a txn, a lease revoke, a range delete): gather each watcher's matches.
        var order: [Watcher] = []
        var matches: [ObjectIdentifier: [Int32]] = [:]
        for (i, e) in entry.events.enumerated() {
            func match(_ g: WatcherGroup) {
                for w in g.members {
                    let id = ObjectIdentifier(w)
                    if matches[id] == nil { order.append(w) }
                    matches[id, default: []].append(Int32(i))
                }
            }
            if let g = singles[e.kv.key] { match(g) }
            ranges.stab(e.kv.key, match)
        }
        for w in order { deliver(w, entry, matches[ObjectIdentifier(w)]!, &memo) }
    }

    /// Sends `w` the events of `entry` at `matched` that it wants, or parks it if its stream is full.
    private func deliver(_ w: Watcher, _ entry: RevisionEvents, _ matched: [Int32], _ memo: inout ResponseMemo) {
        guard w.synced, !w.removed, entry.revision >= w.nextRev else { return }
        let wanted: [Int32]
        if matched.count == 1 {
            guard w.wants(entry.events[Int(matched[0])]) else { return }
            wanted = matched
        } else {
            wanted = matched.filter { w.wants(entry.events[Int($0)]) }
            if wanted.isEmpty { return }
        }
        if w.stream.sink.queuedBytes > config.streamQueueLimit {
            park(w, at: entry.revision)
            return
        }
        if w.fragment {
            let events = wanted.map { entry.encoding(Int($0), prevKV: w.prevKV, encoder) }
            sendFragmented(w.stream, ResponseFields(headerRevision: entry.revision, watchID: w.id), events)
        } else {
            let key = ResponseKey(watchID: w.id, prevKV: w.prevKV, fragment: false, matched: wanted)
            if key != memo.lastKey {
                if let bytes = memo.cache[key] {
                    memo.lastBytes = bytes
                } else {
                    let events = wanted.map { entry.encoding(Int($0), prevKV: w.prevKV, encoder) }
                    memo.lastBytes = encoder.response(ResponseFields(headerRevision: entry.revision, watchID: w.id),
                                                      events: events)
                    memo.cache[key] = memo.lastBytes
                }
                memo.lastKey = key
            }
            w.stream.sink.send(memo.lastBytes)
            stats.responsesSent += 1
            stats.eventsSent += wanted.count
        }
        w.sentSinceProgress = true
        w.nextRev = entry.revision + 1
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
        w.stream.unsyncedCount += 1
        w.stream.sink.notifyWhenDrained()
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
            if !w.synced, !w.removed {
                if w.stream.sink.queuedBytes <= config.streamQueueLimit {
                    catchUpPending = true
                } else {
                    w.stream.sink.notifyWhenDrained()
                }
            }
        }
    }

    private func step(_ w: Watcher) {
        if w.nextRev > delivered {
            markSynced(w)
            return
        }
        var events: [[UInt8]] = []
        var bytes = 0
        var last = w.nextRev - 1
        if let oldest = ring.oldestRevision, w.nextRev >= oldest {
            ring.forEach(from: w.nextRev) { entry in
                guard entry.revision <= delivered else { return false }
                for (i, e) in entry.events.enumerated() where KeyRange.contains(e.kv.key, key: w.group.key, end: w.group.end) && w.wants(e) {
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
                w.stream.watchers.remove(w.id)
                unindex(w)
                return
            }
            stats.storeCatchUps += 1
            let to = min(delivered, w.nextRev + Int64(config.catchUpRevisions) - 1, (ring.oldestRevision ?? Int64.max) - 1)
            for (_, e) in store.events(w.group.key, w.group.end, from: w.nextRev, to: to) where w.wants(e) {
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
        if w.nextRev > delivered { markSynced(w) }
    }
}
