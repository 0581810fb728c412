/// An ordered set of byte keys kept as a list of sorted chunks (the layout of Python's
/// `sortedcontainers`): lookups binary-search the chunk maxima and then one chunk; an insert
/// moves at most one chunk's elements, and a chunk splits in two when it passes `maxChunk`.
public struct SortedKeys {
    private var chunks: [[Bytes]] = []
    private var maxes: [Bytes] = []
    public private(set) var count = 0
    let maxChunk: Int

    public init(maxChunk: Int = 512) { self.maxChunk = maxChunk }

    /// Builds from keys already sorted and unique.
    public init(sorted keys: [Bytes], maxChunk: Int = 512) {
        self.maxChunk = maxChunk
        var i = 0
        let half = maxChunk / 2
        while i < keys.count {
            let chunk = Array(keys[i..<min(i + half, keys.count)])
            chunks.append(chunk)
            maxes.append(chunk.last!)
            i += half
        }
        count = keys.count
    }

    /// Index of the first chunk whose max is ≥ key (chunks.count if none).
    private func chunkIndex(_ key: Bytes) -> Int {
        var lo = 0, hi = maxes.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if compareBytes(maxes[mid], key) < 0 { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    private static func lowerBound(_ chunk: [Bytes], _ key: Bytes) -> Int {
        var lo = 0, hi = chunk.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if compareBytes(chunk[mid], key) < 0 { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// Inserts `key`; returns false if it was present.
    @discardableResult
    public mutating func insert(_ key: Bytes) -> Bool {
        if chunks.isEmpty {
            chunks = [[key]]
            maxes = [key]
            count = 1
            return true
        }
        var ci = chunkIndex(key)
        if ci == chunks.count { ci -= 1 }
        let pos = Self.lowerBound(chunks[ci], key)
        if pos < chunks[ci].count, compareBytes(chunks[ci][pos], key) == 0 { return false }
        chunks[ci].insert(key, at: pos)
        maxes[ci] = chunks[ci].last!
        count += 1
        if chunks[ci].count > maxChunk {
            let half = chunks[ci].count / 2
            let tail = Array(chunks[ci][half...])
            chunks[ci].removeSubrange(half...)
            maxes[ci] = chunks[ci].last!
            chunks.insert(tail, at: ci + 1)
            maxes.insert(tail.last!, at: ci + 1)
        }
        return true
    }

    /// Removes `key`; returns false if it was absent.
    @discardableResult
    public mutating func remove(_ key: Bytes) -> Bool {
        let ci = chunkIndex(key)
        guard ci < chunks.count else { return false }
        let pos = Self.lowerBound(chunks[ci], key)
        guard pos < chunks[ci].count, compareBytes(chunks[ci][pos], key) == 0 else { return false }
        chunks[ci].remove(at: pos)
        count -= 1
        if chunks[ci].isEmpty {
            chunks.remove(at: ci)
            maxes.remove(at: ci)
        } else {
            maxes[ci] = chunks[ci].last!
        }
        return true
    }

    /// Calls `body` for each key in `[from, to)` in order (`to` nil = no upper bound) until it
    /// returns false.
    public func forEach(from: Bytes, to: Bytes?, _ body: (Bytes) -> Bool) {
        var ci = chunkIndex(from)
        guard ci < chunks.count else { return }
        var pos = Self.lowerBound(chunks[ci], from)
        while ci < chunks.count {
            let chunk = chunks[ci]
            while pos < chunk.count {
                let k = chunk[pos]
                if let to, compareBytes(k, to) >= 0 { return }
                if !body(k) { return }
                pos += 1
            }
            ci += 1
            pos = 0
        }
    }

    /// Checks the ordering and bookkeeping invariants (for tests).
    public func verifyInvariants() -> Bool {
        var total = 0
        var prev: Bytes?
        for (i, c) in chunks.enumerated() {
            if c.isEmpty || compareBytes(maxes[i], c.last!) != 0 { return false }
            for k in c {
                if let p = prev, compareBytes(p, k) >= 0 { return false }
                prev = k
            }
            total += c.count
        }
        return total == count && maxes.count == chunks.count
    }
}
