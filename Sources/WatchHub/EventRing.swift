import MVCC

/// The events of one revision, with their wire encodings made once, on first use, and shared by
/// every watcher and stream that receives them. Encodings are kept per encoder slot (the hub
/// numbers the distinct encoders of its streams: slot 0 is the first, gRPC's in the server).
public final class RevisionEvents {
    public let revision: Int64
    public private(set) var events: [Event]
    /// Reads previous values the write left unread, when a watcher with `prev_kv` needs them.
    private let store: KVStore?
    /// Slot 0's encoded events, event `i` without its previous key-value at `2 * i` and with it
    /// at `2 * i + 1`; made at the first encoding (a revision nobody watches costs nothing here).
    private var encodings: [[UInt8]?] = []
    /// Other slots' encodings, by `slot * 2 + (prevKV ? 1 : 0)` (the gateway's JSON, rarely used).
    var otherEncodings: [Int: [[UInt8]?]] = [:]
    let approximateBytes: Int

    public init(revision: Int64, events: [Event], store: KVStore? = nil) {
        self.revision = revision
        self.events = events
        self.store = store
        var bytes = 64
        for e in events {
            bytes += 48 + e.kv.key.count + e.kv.value.count + (e.prevKV.map { 48 + $0.key.count + $0.value.count } ?? 0)
        }
        approximateBytes = bytes
    }

    @inline(__always)
    func encoding(_ i: Int, prevKV: Bool, _ encoder: any WatchEncoder, slot: Int) -> [UInt8] {
        guard slot == 0 else { return otherEncoding(i, prevKV: prevKV, encoder, slot: slot) }
        if encodings.isEmpty { encodings = Array(repeating: nil, count: events.count * 2) }
        let at = 2 * i + (prevKV ? 1 : 0)
        if let e = encodings[at] { return e }
        if prevKV { loadPrev(i) }
        let e = encoder.encode(events[i], prevKV: prevKV)
        encodings[at] = e
        return e
    }

    @inline(__always)
    private func loadPrev(_ i: Int) {
        if events[i].prevValuePending { store?.loadPrevValue(&events[i]) }
    }

    private func otherEncoding(_ i: Int, prevKV: Bool, _ encoder: any WatchEncoder, slot: Int) -> [UInt8] {
        let k = slot * 2 + (prevKV ? 1 : 0)
        if let e = otherEncodings[k]?[i] { return e }
        if prevKV { loadPrev(i) }
        let e = encoder.encode(events[i], prevKV: prevKV)
        otherEncodings[k, default: Array(repeating: nil, count: events.count)][i] = e
        return e
    }
}

/// A revision-ordered ring of recent events, bounded in events and bytes. Watchers whose next
/// revision is still here catch up from memory (with `prev_kv` at no store read); older ones
/// read history from the store.
public struct EventRing {
    private var entries: [RevisionEvents?]
    private var head = 0  // index of the oldest entry
    public private(set) var count = 0
    public private(set) var eventCount = 0
    public private(set) var bytes = 0
    public let maxEvents: Int
    public let maxBytes: Int

    public init(maxEvents: Int, maxBytes: Int) {
        self.maxEvents = max(1, maxEvents)
        self.maxBytes = max(1, maxBytes)
        entries = Array(repeating: nil, count: 64)
    }

    public var oldestRevision: Int64? { count == 0 ? nil : entries[head]!.revision }

    /// Appends the events of a new revision (revisions must increase). Old entries at or below
    /// `trimmableUpTo` are dropped while the ring is over its bounds.
    public mutating func append(_ r: RevisionEvents, trimmableUpTo: Int64) {
        if count == entries.count { grow() }
        entries[(head + count) % entries.count] = r
        count += 1
        eventCount += r.events.count
        bytes += r.approximateBytes
        trim(upTo: trimmableUpTo)
    }

    /// Drops the oldest entries at or below `upTo` while over the bounds.
    public mutating func trim(upTo: Int64) {
        while count > 1, eventCount > maxEvents || bytes > maxBytes, let old = entries[head], old.revision <= upTo {
            entries[head] = nil
            head = (head + 1) % entries.count
            count -= 1
            eventCount -= old.events.count
            bytes -= old.approximateBytes
        }
    }

    private mutating func grow() {
        var n: [RevisionEvents?] = Array(repeating: nil, count: entries.count * 2)
        for i in 0..<count { n[i] = entries[(head + i) % entries.count] }
        entries = n
        head = 0
    }

    /// The entry for `revision`, if it is in the ring.
    public func entry(_ revision: Int64) -> RevisionEvents? {
        guard let first = oldestRevision, revision >= first else { return nil }
        // Revisions are increasing but may have gaps (a restart starts a new run): binary search.
        var lo = 0, hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[(head + mid) % entries.count]!.revision < revision { lo = mid + 1 } else { hi = mid }
        }
        guard lo < count, let e = entries[(head + lo) % entries.count], e.revision == revision else { return nil }
        return e
    }

    /// Entries with revision ≥ `from` in order, until `body` returns false.
    public func forEach(from: Int64, _ body: (RevisionEvents) -> Bool) {
        guard let first = oldestRevision else { return }
        var lo = 0, hi = count
        if from > first {
            while lo < hi {
                let mid = (lo + hi) / 2
                if entries[(head + mid) % entries.count]!.revision < from { lo = mid + 1 } else { hi = mid }
            }
        }
        var i = lo
        while i < count {
            if !body(entries[(head + i) % entries.count]!) { return }
            i += 1
        }
    }
}
