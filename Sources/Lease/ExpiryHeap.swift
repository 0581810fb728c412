/// A binary min-heap of (expiry, lease id) — CLRS ch. 6: `push` is MIN-HEAP-INSERT (sift up from
/// the new leaf), `pop` is HEAP-EXTRACT-MIN (the last leaf to the root, then MIN-HEAPIFY down).
///
/// Renewals push a new entry and leave the old one to be skipped when it surfaces (the lessor
/// compares it with the lease's current expiry), so each operation is O(log n) and an expiry step
/// costs in proportion to the leases that expire, not to all leases.
struct ExpiryHeap {
    private(set) var items: [(expiry: UInt64, id: Int64)] = []
    var count: Int { items.count }
    var min: (expiry: UInt64, id: Int64)? { items.first }

    mutating func push(_ expiry: UInt64, _ id: Int64) {
        items.append((expiry, id))
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2  // PARENT(i) in CLRS, 0-based
            if items[parent].expiry <= items[i].expiry { break }
            items.swapAt(parent, i)
            i = parent
        }
    }

    mutating func pop() -> (expiry: UInt64, id: Int64)? {
        guard !items.isEmpty else { return nil }
        let top = items[0]
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1  // LEFT(i), RIGHT(i)
                var m = i
                if l < items.count && items[l].expiry < items[m].expiry { m = l }
                if r < items.count && items[r].expiry < items[m].expiry { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
        }
        return top
    }

    /// The heap property holds: no entry expires before its parent (for tests).
    func verifyInvariants() -> Bool {
        for i in 1..<Swift.max(items.count, 1) where items[(i - 1) / 2].expiry > items[i].expiry { return false }
        return true
    }
}
