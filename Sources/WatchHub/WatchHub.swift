import IntervalTree
import MVCC
import VigilCore

/// Turns events and responses into the bytes a kind of stream sends. Each sink brings its own
/// (protobuf in gRPC framing for gRPC calls, JSON lines for the gateway), so the framing belongs
/// to the sink's side; the hub encodes each event once per encoder and shares the bytes among all
/// the streams with that encoder.
public protocol WatchEncoder: AnyObject {
    /// One event (for gRPC, an `mvccpb.Event`).
    func encode(_ event: Event, prevKV: Bool) -> [UInt8]
    /// One `WatchResponse` whose `events` are the given encoded events, as the bytes to write on
    /// the stream unchanged (framing included), so that one encoding is shared by every stream
    /// that receives it.
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
    /// How this sink's responses are encoded (shared by the sinks of one kind).
    var encoder: any WatchEncoder { get }
    /// One response, as `encoder` made it.
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

/// One watch stream: many watchers sharing one sink.
public final class WatchStream {
    let sink: any WatchSink
    /// Place in the hub's stream table (watchers refer to their stream by it).
    let index: Int32
    /// The slot of the sink's encoder in the hub (see `RevisionEvents`).
    let encoderSlot: Int
    /// Watch id → watcher number.
    var watchers = WatcherTable()
    var nextID: Int64 = 0
    var closed = false
    /// How many of this stream's watchers are unsynced.
    var unsyncedCount = 0
    /// A RequestProgress came while some watcher was catching up (or waiting for a future start
    /// revision): it is answered once all are synced.
    var progressRequested = false
    init(sink: any WatchSink, index: Int32, encoderSlot: Int) {
        self.sink = sink
        self.index = index
        self.encoderSlot = encoderSlot
    }
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
/// The hub observes its store (`StoreObserver`): every write transaction's events enter the ring
/// as the transaction ends, and revisions are delivered once the store says they are durable.
/// Nobody calls the hub to publish.
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
    /// The distinct encoders of the streams opened so far, by slot.
    private var encoders: [any WatchEncoder] = []
    private var ring: EventRing
    /// Every revision up to this one has been delivered to synced watchers.
    public private(set) var delivered: Int64
    // The per-watcher tables are touched for every delivered event. Their accesses are not
    // checked for exclusivity at run time (a check costs more than the access): they are only
    // reached from the hub's own methods, on the loop. A sink may close its stream from inside a
    // send (a failed write closes the connection); that close is held back until the dispatch or
    // catch-up walking the tables has finished (`walking`).
    @exclusivity(unchecked) private var watchers = Watchers()
    @exclusivity(unchecked) private var groups = WatchGroups()
    /// Open streams by index (each retained until closed); closed ones leave a hole that the next
    /// stream takes.
    @exclusivity(unchecked) private var streams: [Unmanaged<WatchStream>?] = []
    private var freeStreams: [Int32] = []
    /// Unsynced watchers and the next revision each must receive.
    private var unsynced: [Int32: Int64] = [:]
    /// Unsynced watchers that wait for `release` (older history comes from elsewhere first).
    private var heldWatchers: Set<Int32> = []
    /// Synced watchers created with a start revision past the delivered one, and that revision.
    private var futureStart: [Int32: Int64] = [:]
    /// Streams whose RequestProgress waits for their watchers to be synced.
    private var progressWaiting: [WatchStream] = []
    public private(set) var stats = WatchHubStats()
    public private(set) var streamCount = 0
    /// Set while a dispatch or catch-up walks the tables; streams closed meanwhile wait here.
    private var walking = false
    private var closeLater: [WatchStream] = []

    /// A hub over `store`, which it observes from now on.
    /// - Parameter encoders: encoders to number first, most used first (slot 0 is the fast one;
    ///   other sinks' encoders are numbered as their streams open).
    public init(store: KVStore, config: WatchHubConfig = WatchHubConfig(), encoders: [any WatchEncoder] = []) {
        self.store = store
        self.config = config
        self.encoders = encoders
        ring = EventRing(maxEvents: config.ringMaxEvents, maxBytes: config.ringMaxBytes)
        delivered = store.committedRevision
        store.addObserver(self)
    }

    deinit {
        for ref in streams { ref?.release() }
    }

    /// Watchers in the hub.
    public var watcherCount: Int { watchers.count }

    /// The watcher tables agree with each other (for tests: see `WatchGroups.verifyInvariants`),
    /// and every watcher is linked into its group.
    func verifyInvariants() -> Bool {
        guard groups.verifyInvariants() else { return false }
        var linked = 0
        for g in 0..<groups.head.count where groups.head[g] >= 0 {
            forEachMember(Int32(g)) { w in if watchers.group[Int(w)] == Int32(g) { linked += 1 } }
        }
        return linked == watchers.count
    }

    /// Distinct watched keys and ranges.
    public var groupCount: Int { groups.count }

    /// Watchers currently unsynced (catching up or parked).
    public var unsyncedCount: Int { unsynced.count }

    /// The most unsent bytes queued on one open stream (a gauge for slow readers).
    public var maxQueuedBytes: Int {
        var m = 0
        for ref in streams { if let s = ref?.takeUnretainedValue(), !s.closed { m = max(m, s.sink.queuedBytes) } }
        return m
    }

    /// Events and bytes held by the ring.
    public var ringEvents: Int { ring.eventCount }
    public var ringBytes: Int { ring.bytes }

    /// Set when some watcher may be able to catch up (the caller should run `catchUp()` soon).
    public private(set) var catchUpPending = false

    /// A stream drained: its parked watchers may resume.
    public func streamDrained(_ s: WatchStream) {
        if s.unsyncedCount > 0 { catchUpPending = true }
    }

    @inline(__always)
    private func stream(of w: Int32) -> WatchStream {
        streams[Int(watchers.stream[Int(w)])].unsafelyUnwrapped.takeUnretainedValue()
    }

    // MARK: Streams

    /// Opens a stream; the hub keeps it until `closeStream` (its watchers point at it).
    public func openStream(_ sink: any WatchSink) -> WatchStream {
        streamCount += 1
        let index = freeStreams.popLast() ?? Int32(streams.count)
        let encoder = sink.encoder
        let slot: Int
        if let i = encoders.firstIndex(where: { $0 === encoder }) {
            slot = i
        } else {
            slot = encoders.count
            encoders.append(encoder)
        }
        let s = WatchStream(sink: sink, index: index, encoderSlot: slot)
        let ref = Unmanaged.passRetained(s)
        if Int(index) == streams.count { streams.append(ref) } else { streams[Int(index)] = ref }
        return s
    }

    /// Frees everything the stream's watchers held (at once, or when the walk in progress ends;
    /// a closed stream is sent nothing more either way).
    public func closeStream(_ s: WatchStream) {
        guard !s.closed else { return }
        s.closed = true
        if walking {
            closeLater.append(s)
            return
        }
        release(s)
    }

    private func release(_ s: WatchStream) {
        streamCount -= 1
        for w in s.watchers.all { remove(w, s) }
        s.watchers.removeAll()
        streams[Int(s.index)]?.release()
        streams[Int(s.index)] = nil
        freeStreams.append(s.index)
    }

    private func send(_ s: WatchStream, _ f: ResponseFields, _ events: [[UInt8]] = []) {
        s.sink.send(encoders[s.encoderSlot].response(f, events: events))
        stats.responsesSent += 1
        stats.eventsSent += events.count
    }

    /// Answers a create request with a failure (`watch_id -1`, created and canceled) without
    /// creating a watcher; the API layer uses it for permission refusals.
    public func reject(_ s: WatchStream, _ error: EtcdError) { fail(s, error) }

    /// Refuses a create with `reason` as the cancel reason, answered for `watchID` (etcd names
    /// the requested id when it refuses a watch for permission).
    public func reject(_ s: WatchStream, reason: String, watchID: Int64) {
        var f = ResponseFields(headerRevision: delivered, watchID: watchID)
        f.created = true
        f.canceled = true
        f.cancelReason = reason
        send(s, f)
    }

    private func fail(_ s: WatchStream, _ error: EtcdError) { reject(s, reason: error.message, watchID: -1) }

    // MARK: Requests

    /// Handles a create request (etcd's order of checks), answering `created` before any event;
    /// the new watcher's id, nil if refused.
    /// - Parameter held: the watcher starts unsynced at its start revision and stays there until
    ///   `release`: another source (a mirror's upstream) first sends it older history, through
    ///   `sendHistory`.
    @discardableResult
    public func create(_ s: WatchStream, _ c: WatchCreate, held: Bool = false) -> Int64? {
        var c = c
        if c.key.isEmpty { c.key = [0] }
        if c.startRevision < 0 { return refuse(s, .compacted) }
        if !c.rangeEnd.isEmpty && c.rangeEnd != [0] && compareBytes(c.key, c.rangeEnd) >= 0 {
            return refuse(s, .watcherRangeEmpty)
        }
        guard groups.hasRoom(c.key.count) else { return refuse(s, .watchedKeysFull) }
        let id: Int64
        if c.watchID != 0 {
            if s.watchers[c.watchID] != nil { return refuse(s, .duplicateWatchID) }
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
            return nil
        }
        var flags = WatcherFlags(c)
        if held {
            let g = groups.group(c.key, c.rangeEnd)
            let w = watchers.add(id: id, stream: s.index, group: g, flags: flags)
            link(w, g)
            s.watchers.insert(id: id, w)
            unsynced[w] = start
            s.unsyncedCount += 1
            heldWatchers.insert(w)
            return id
        }
        if start > delivered {
            flags.insert(.synced)
            if start > delivered + 1 { flags.insert(.future) }
        }
        let g = groups.group(c.key, c.rangeEnd)
        let w = watchers.add(id: id, stream: s.index, group: g, flags: flags)
        link(w, g)
        s.watchers.insert(id: id, w)
        if start <= delivered {
            unsynced[w] = start
            s.unsyncedCount += 1
            catchUpPending = true
        } else if start > delivered + 1 {
            futureStart[w] = start  // revisions below it are skipped
        }
        return id
    }

    private func refuse(_ s: WatchStream, _ error: EtcdError) -> Int64? {
        fail(s, error)
        return nil
    }

    /// Appends `w` to the member list of `g` (the head's `prev` is the tail).
    private func link(_ w: Int32, _ g: Int32) {
        let h = groups.head[Int(g)]
        if h < 0 {
            groups.head[Int(g)] = w
            watchers.prev[Int(w)] = w
            return
        }
        let tail = watchers.prev[Int(h)]
        watchers.next[Int(tail)] = w
        watchers.prev[Int(w)] = tail
        watchers.prev[Int(h)] = w
    }

    private func unlink(_ w: Int32, _ g: Int32) {
        let h = groups.head[Int(g)], n = watchers.next[Int(w)], p = watchers.prev[Int(w)]
        if w == h {
            groups.head[Int(g)] = n
            if n >= 0 { watchers.prev[Int(n)] = p }
        } else {
            watchers.next[Int(p)] = n
            if n >= 0 { watchers.prev[Int(n)] = p } else { watchers.prev[Int(h)] = p }
        }
    }

    /// Calls `body` with each member of `g`; the walk survives the removal of the member it is at.
    @inline(__always)
    private func forEachMember(_ g: Int32, _ body: (Int32) -> Void) {
        var w = groups.head[Int(g)]
        while w >= 0 {
            let n = watchers.next[Int(w)]
            body(w)
            w = n
        }
    }

    /// Cancels a watcher (`reason` says why, when the server ends it); unknown ids get no answer.
    public func cancel(_ s: WatchStream, watchID: Int64, reason: String = "") {
        guard let w = s.watchers.remove(watchID) else { return }
        remove(w, s)
        var f = ResponseFields(headerRevision: delivered, watchID: watchID)
        f.canceled = true
        f.cancelReason = reason
        send(s, f)
    }

    /// Whether `w` waits for a start revision past the delivered one (clearing the mark once not).
    private func isFuture(_ w: Int32) -> Bool {
        guard watchers.flags[Int(w)].contains(.future) else { return false }
        if let start = futureStart[w], start > delivered + 1 { return true }
        futureStart[w] = nil
        watchers.flags[Int(w)].remove(.future)
        return false
    }

    /// Answers a progress request with `watch_id -1` at the delivered revision, ordered after the
    /// events already queued. While a watcher of the stream is catching up (or waits for a start
    /// revision still in the future) the answer waits until all are synced, so that no event at or
    /// below its revision can follow it (etcd issues 15220 and 17507); it is sent then even if the
    /// catch-up delivered no event. A stream without watchers gets none (as etcd).
    public func requestProgress(_ s: WatchStream) {
        guard !s.watchers.isEmpty, !s.closed else { return }
        if progressReady(s) {
            s.progressRequested = false
            send(s, ResponseFields(headerRevision: delivered, watchID: -1))
        } else if !s.progressRequested {
            s.progressRequested = true
            progressWaiting.append(s)
        }
    }

    private func progressReady(_ s: WatchStream) -> Bool {
        s.unsyncedCount == 0 && (futureStart.isEmpty || s.watchers.all.allSatisfy { !isFuture($0) })
    }

    /// Sends the progress answers that were waiting and can go now (after watchers synced, or a
    /// revision reached a future watcher's start).
    private func answerWaitingProgress() {
        guard !progressWaiting.isEmpty else { return }
        progressWaiting.removeAll { s in
            guard !s.closed, s.progressRequested else { return true }
            if s.watchers.isEmpty {
                s.progressRequested = false
                return true
            }
            guard progressReady(s) else { return false }
            s.progressRequested = false
            send(s, ResponseFields(headerRevision: delivered, watchID: -1))
            return true
        }
    }

    /// The periodic progress notification: each synced watcher that asked for it and received
    /// nothing since the last tick gets an empty response at the delivered revision.
    public func progressTick() {
        walk {
            for ref in streams {
                guard let s = ref?.takeUnretainedValue(), !s.closed else { continue }
                for w in s.watchers.all where watchers.flags[Int(w)].contains(.progressNotify) {
                    let f = watchers.flags[Int(w)]
                    if f.contains(.synced) && !f.contains(.sent) && !isFuture(w) {
                        send(s, ResponseFields(headerRevision: delivered, watchID: watchers.id(w)))
                    }
                    watchers.flags[Int(w)].remove(.sent)
                }
            }
        }
    }

    /// Sends older history to a held watcher (its filters applied here).
    public func sendHistory(_ s: WatchStream, watchID: Int64, _ events: [Event], headerRevision: Int64) {
        guard let w = s.watchers[watchID], heldWatchers.contains(w), !s.closed else { return }
        let flags = watchers.flags[Int(w)]
        let prevKV = flags.contains(.prevKV)
        let encoder = encoders[s.encoderSlot]
        let encoded = events.filter { flags.wants($0) }.map { encoder.encode($0, prevKV: prevKV) }
        guard !encoded.isEmpty else { return }
        let f = ResponseFields(headerRevision: headerRevision, watchID: watchID)
        if flags.contains(.fragment) { sendFragmented(s, f, encoded) } else { send(s, f, encoded) }
    }

    /// Lets a held watcher go on from its start revision, as any unsynced watcher does.
    public func release(_ s: WatchStream, watchID: Int64) {
        guard let w = s.watchers[watchID], heldWatchers.remove(w) != nil else { return }
        catchUpPending = true
    }

    /// Cancels one watcher as compacted at `revision` (its older history is gone upstream).
    public func cancelCompacted(_ s: WatchStream, watchID: Int64, revision: Int64) {
        guard let w = s.watchers.remove(watchID) else { return }
        remove(w, s)
        var f = ResponseFields(headerRevision: 0, watchID: watchID)
        f.compactRevision = revision
        f.canceled = true
        send(s, f)
    }

    /// Cancels every watcher as compacted at `revision` (etcd's answer to a watcher whose next
    /// events are gone): a mirror that reloaded cannot give its watchers the changes it missed.
    public func cancelAll(compactRevision revision: Int64) {
        walk {
            for ref in streams {
                guard let s = ref?.takeUnretainedValue(), !s.closed else { continue }
                for w in s.watchers.all {
                    let id = watchers.id(w)
                    var f = ResponseFields(headerRevision: 0, watchID: id)
                    f.compactRevision = revision
                    f.canceled = true
                    send(s, f)
                    s.watchers.remove(id)
                    remove(w, s)
                }
            }
        }
    }

    /// Takes `w` (already out of its stream's table) out of the hub.
    private func remove(_ w: Int32, _ s: WatchStream) {
        heldWatchers.remove(w)
        if unsynced.removeValue(forKey: w) != nil { s.unsyncedCount -= 1 }
        if watchers.flags[Int(w)].contains(.future) { futureStart[w] = nil }
        defer { if s.progressRequested { answerWaitingProgress() } }
        let g = watchers.group[Int(w)]
        unlink(w, g)
        if groups.head[Int(g)] < 0 { groups.release(g) }
        watchers.free(w)
    }

    private func markSynced(_ w: Int32, _ s: WatchStream) {
        watchers.flags[Int(w)].insert(.synced)
        if unsynced.removeValue(forKey: w) != nil { s.unsyncedCount -= 1 }
        if s.progressRequested && s.unsyncedCount == 0 { answerWaitingProgress() }
    }

    // MARK: Events

    /// Takes the events of a new revision (not yet durable: delivered by `advance`).
    func publish(_ events: [Event], revision: Int64) {
        ring.append(RevisionEvents(revision: revision, events: events, store: store), trimmableUpTo: delivered)
    }

    /// Delivers every revision up to `committed` (now durable) to the synced watchers.
    func advance(to committed: Int64) {
        walk {
            while delivered < committed {
                let r = delivered + 1
                if let entry = ring.entry(r) {
                    dispatch(entry)
                    delivered = r
                    continue
                }
                // A gap (a mirror's revisions skip the keys it does not copy): on to the next
                // entry, without visiting each revision between.
                var next = committed
                ring.forEach(from: r) { e in
                    if e.revision <= committed { next = e.revision - 1 }
                    return false
                }
                delivered = next
            }
            answerWaitingProgress()
        }
        ring.trim(upTo: delivered)
    }

    /// Runs `body` with closes held back, then carries them out.
    private func walk(_ body: () -> Void) {
        walking = true
        body()
        walking = false
        while let s = closeLater.popLast() { release(s) }
    }

    private struct ResponseKey: Hashable {
        var watchID: Int64
        var prevKV: Bool
        var slot: Int
        var matched: [Int32]
    }

    /// Remembers the responses built during one dispatch, so that watchers with the same id,
    /// options and matches (typical of many subscribers to one prefix) share the very same bytes;
    /// the last one is checked first, without hashing. Also counts what the dispatch sent.
    private struct ResponseMemo {
        var cache: [ResponseKey: [UInt8]] = [:]
        /// The commonest case without hashing: the first event alone, no prev_kv, slot 0, by a
        /// small watch id (many streams with watchers 0…n on the same range).
        var byID: [[UInt8]?] = []
        static let byIDLimit: Int64 = 64
        var hasLast = false
        var lastID: Int64 = 0
        var lastPrevKV = false
        var lastSlot = 0
        var lastMatched: [Int32] = []
        var lastBytes: [UInt8] = []
        var responses = 0
        var events = 0
    }

    private static let firstEvent: [Int32] = [0]

    private func dispatch(_ entry: RevisionEvents) {
        var memo = ResponseMemo()
        defer {
            stats.responsesSent += memo.responses
            stats.eventsSent += memo.events
        }
        if entry.events.count == 1 {
            // One event (a put or a delete): each matching group once, each member once.
            let key = entry.events[0].kv.key
            if let g = groups.single(key) { forEachMember(g) { deliver($0, entry, Self.firstEvent, &memo) } }
            groups.stab(key) { g in forEachMember(g) { deliver($0, entry, Self.firstEvent, &memo) } }
            return
        }
        // Several events (a txn, a lease revoke, a range delete): gather each watcher's matches.
        var order: [Int32] = []
        var matches: [Int32: [Int32]] = [:]
        for (i, e) in entry.events.enumerated() {
            func match(_ g: Int32) {
                forEachMember(g) { w in
                    if matches[w] == nil { order.append(w) }
                    matches[w, default: []].append(Int32(i))
                }
            }
            if let g = groups.single(e.kv.key) { match(g) }
            groups.stab(e.kv.key, match)
        }
        for w in order { deliver(w, entry, matches[w]!, &memo) }
    }

    /// Sends `w` the events of `entry` at `matched` that it wants, or parks it if its stream is full.
    private func deliver(_ w: Int32, _ entry: RevisionEvents, _ matched: [Int32], _ memo: inout ResponseMemo) {
        let flags = watchers.flags[Int(w)]
        guard flags.contains(.synced) else { return }
        if Failpoint.enabled && Failpoint.hit("hubSkipEvent") != nil { return }
        if flags.contains(.future) {
            if let start = futureStart[w], entry.revision < start { return }
            futureStart[w] = nil
            watchers.flags[Int(w)].remove(.future)
        }
        let wanted: [Int32]
        if matched.count == 1 {
            guard flags.wants(entry.events[Int(matched[0])]) else { return }
            wanted = matched
        } else {
            wanted = matched.filter { flags.wants(entry.events[Int($0)]) }
            if wanted.isEmpty { return }
        }
        streams[Int(watchers.stream[Int(w)])].unsafelyUnwrapped._withUnsafeGuaranteedRef { s in
            if s.closed { return }
            if s.sink.queuedBytes > config.streamQueueLimit {
                park(w, s, at: entry.revision)
                return
            }
            let prevKV = flags.contains(.prevKV)
            let id = watchers.id(w)
            if Failpoint.enabled { Failpoint.trigger("watchBeforeSend") }
            if flags.contains(.fragment) {
                sendFragments(s, entry, wanted, prevKV: prevKV, id: id)
            } else {
                let slot = s.encoderSlot
                if !(memo.hasLast && memo.lastID == id && memo.lastPrevKV == prevKV && memo.lastSlot == slot
                    && memo.lastMatched == wanted)
                {
                    remember(s, entry, wanted, prevKV: prevKV, id: id, &memo)
                }
                s.sink.send(memo.lastBytes)
                memo.responses += 1
                memo.events += wanted.count
            }
            if flags.contains(.progressNotify) { watchers.flags[Int(w)].insert(.sent) }
        }
    }

    /// Makes `memo.lastBytes` the response for these matches, from the dispatch's caches or
    /// encoded now (out of `deliver`, whose per-watcher closure must stay small to be inlined).
    @inline(never)
    private func remember(
        _ s: WatchStream, _ entry: RevisionEvents, _ wanted: [Int32], prevKV: Bool, id: Int64,
        _ memo: inout ResponseMemo
    ) {
        let slot = s.encoderSlot
        if id >= 0 && id < ResponseMemo.byIDLimit && slot == 0 && !prevKV && wanted.count == 1
            && wanted[0] == 0
        {
            if memo.byID.isEmpty { memo.byID = Array(repeating: nil, count: Int(ResponseMemo.byIDLimit)) }
            if let bytes = memo.byID[Int(id)] {
                memo.lastBytes = bytes
            } else {
                memo.lastBytes = response(s, entry, wanted, prevKV: prevKV, id: id)
                memo.byID[Int(id)] = memo.lastBytes
            }
        } else {
            let key = ResponseKey(watchID: id, prevKV: prevKV, slot: slot, matched: wanted)
            if let bytes = memo.cache[key] {
                memo.lastBytes = bytes
            } else {
                memo.lastBytes = response(s, entry, wanted, prevKV: prevKV, id: id)
                memo.cache[key] = memo.lastBytes
            }
        }
        memo.hasLast = true
        memo.lastID = id
        memo.lastPrevKV = prevKV
        memo.lastSlot = slot
        memo.lastMatched = wanted
    }

    /// The response for these matches of `entry`, in `s`'s encoding. (Kept out of `deliver`,
    /// whose per-watcher closure must stay small enough to be inlined.)
    @inline(never)
    private func response(
        _ s: WatchStream, _ entry: RevisionEvents, _ wanted: [Int32], prevKV: Bool, id: Int64
    ) -> [UInt8] {
        let slot = s.encoderSlot, encoder = encoders[slot]
        let events = wanted.map { entry.encoding(Int($0), prevKV: prevKV, encoder, slot: slot) }
        return encoder.response(ResponseFields(headerRevision: entry.revision, watchID: id), events: events)
    }

    @inline(never)
    private func sendFragments(_ s: WatchStream, _ entry: RevisionEvents, _ wanted: [Int32], prevKV: Bool, id: Int64) {
        let slot = s.encoderSlot, encoder = encoders[slot]
        let events = wanted.map { entry.encoding(Int($0), prevKV: prevKV, encoder, slot: slot) }
        sendFragmented(s, ResponseFields(headerRevision: entry.revision, watchID: id), events)
    }

    /// `{watch_id, compact_revision, canceled}` with header revision 0, as etcd sends it.
    private func sendCompacted(_ s: WatchStream, _ id: Int64) {
        var f = ResponseFields(headerRevision: 0, watchID: id)
        f.compactRevision = store.compactRevision
        f.canceled = true
        send(s, f)
    }

    private func park(_ w: Int32, _ s: WatchStream, at revision: Int64) {
        watchers.flags[Int(w)].remove(.synced)
        unsynced[w] = revision
        s.unsyncedCount += 1
        s.sink.notifyWhenDrained()
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
        walk { catchUpWalk() }
    }

    private func catchUpWalk() {
        for w in Array(unsynced.keys) {
            guard unsynced[w] != nil, !heldWatchers.contains(w) else { continue }  // removed, or held
            let s = stream(of: w)
            guard !s.closed else { continue }
            var budget = 4
            while unsynced[w] != nil, !s.closed, budget > 0, s.sink.queuedBytes <= config.streamQueueLimit {
                budget -= 1
                step(w, s)
            }
            // More to do and room to send: come back next turn. A full stream waits for its drain.
            if unsynced[w] != nil, !s.closed {
                if s.sink.queuedBytes <= config.streamQueueLimit {
                    catchUpPending = true
                } else {
                    s.sink.notifyWhenDrained()
                }
            }
        }
    }

    private func step(_ w: Int32, _ s: WatchStream) {
        let nextRev = unsynced[w]!
        if nextRev > delivered {
            markSynced(w, s)
            return
        }
        let flags = watchers.flags[Int(w)]
        let prevKV = flags.contains(.prevKV)
        let encoder = encoders[s.encoderSlot]
        let g = watchers.group[Int(w)]
        let key = groups.key(g), end = groups.end(g)
        var events: [[UInt8]] = []
        var bytes = 0
        var last = nextRev - 1
        if let oldest = ring.oldestRevision, nextRev >= oldest {
            ring.forEach(from: nextRev) { entry in
                guard entry.revision <= delivered else { return false }
                for (i, e) in entry.events.enumerated()
                where KeyRange.contains(e.kv.key, key: key, end: end) && flags.wants(e) {
                    let enc = entry.encoding(i, prevKV: prevKV, encoder, slot: s.encoderSlot)
                    events.append(enc)
                    bytes += enc.count
                }
                last = entry.revision
                return bytes < config.streamQueueLimit / 2
            }
            if last < nextRev { last = delivered }  // nothing of this range left in the ring window
        } else {
            let id = watchers.id(w)
            if store.compactRevision > 0 && nextRev < store.compactRevision {
                sendCompacted(s, id)
                s.watchers.remove(id)
                remove(w, s)
                return
            }
            stats.storeCatchUps += 1
            let to = min(
                delivered, nextRev + Int64(config.catchUpRevisions) - 1, (ring.oldestRevision ?? Int64.max) - 1)
            for (_, e) in store.events(key, end, from: nextRev, to: to, prevValues: prevKV) where flags.wants(e) {
                events.append(encoder.encode(e, prevKV: prevKV))
            }
            last = to
        }
        if !events.isEmpty {
            let f = ResponseFields(headerRevision: delivered, watchID: watchers.id(w))
            if flags.contains(.fragment) { sendFragmented(s, f, events) } else { send(s, f, events) }
            if flags.contains(.progressNotify) { watchers.flags[Int(w)].insert(.sent) }
        }
        unsynced[w] = last + 1
        if last + 1 > delivered { markSynced(w, s) }
    }
}

// MARK: - The store's observer

extension WatchHub: StoreObserver {
    public func store(_ store: KVStore, wrote events: [Event], at revision: Int64) {
        publish(events, revision: revision)
    }

    public func store(_ store: KVStore, committedThrough revision: Int64) {
        advance(to: revision)
    }

    /// Watchers catching up from below the new compact revision are canceled at their next step.
    public func store(_ store: KVStore, compactedAt revision: Int64) {
        if !unsynced.isEmpty { catchUpPending = true }
    }
}
