/// A key interval [start, end), `end == nil` meaning no upper bound.
public struct KeyInterval: Sendable, Equatable {
    public var start: [UInt8]
    public var end: [UInt8]?

    /// etcd's range conventions: empty end = the key alone; "\0" = every key from `key`.
    public init(key: [UInt8], rangeEnd: [UInt8]) {
        start = key.isEmpty ? [0] : key
        if rangeEnd.isEmpty { end = start + [0] } else if rangeEnd == [0] { end = nil } else { end = rangeEnd }
    }

    public init(start: [UInt8], end: [UInt8]?) {
        self.start = start
        self.end = end
    }
}

@inline(__always)
func less(_ a: [UInt8], _ b: [UInt8]) -> Bool { a.lexicographicallyPrecedes(b) }

/// The union of a user's permission intervals as sorted, disjoint intervals: a range is permitted
/// when one of them contains it whole (binary search, no walk over the permissions).
public struct IntervalUnion: Sendable {
    public private(set) var spans: [KeyInterval] = []

    public init(_ intervals: [KeyInterval]) {
        let sorted = intervals.filter { $0.end == nil || less($0.start, $0.end!) }
            .sorted { less($0.start, $1.start) }
        for iv in sorted {
            if var last = spans.last, let lastEnd = last.end, !less(lastEnd, iv.start) {
                // Overlapping or touching: extend.
                if let e = iv.end { if less(lastEnd, e) { last.end = e } } else { last.end = nil }
                spans[spans.count - 1] = last
            } else if let last = spans.last, last.end == nil {
                continue  // already open-ended from an earlier start
            } else {
                spans.append(iv)
            }
        }
    }

    public func contains(_ iv: KeyInterval) -> Bool {
        // The last span starting at or before iv.start.
        var lo = 0, hi = spans.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if !less(iv.start, spans[mid].start) { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0 else { return false }
        let s = spans[lo - 1]
        guard let end = s.end else { return true }
        guard let want = iv.end else { return false }
        return less(iv.start, end) && !less(end, want)
    }

    /// Spans are sorted, non-empty, and neither overlap nor touch (for tests).
    public func verifyInvariants() -> Bool {
        for (i, s) in spans.enumerated() {
            if let e = s.end, !less(s.start, e) { return false }
            if i > 0 {
                guard let prevEnd = spans[i - 1].end, less(prevEnd, s.start) else { return false }
            }
        }
        return true
    }
}

struct Permissions {
    let read: IntervalUnion
    let write: IntervalUnion
}
