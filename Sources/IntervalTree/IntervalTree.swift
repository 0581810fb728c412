/// An interval tree over byte-string intervals `[low, high)` (`high == nil`: unbounded above),
/// answering "which intervals contain this point" in O(log n + matches).
///
/// It is a treap (a binary search tree on `(low, id)` with random heap priorities, Seidel and
/// Aragon 1996) augmented with the maximum `high` of each subtree, as in CLRS §14.3 ("Interval
/// trees"): a subtree whose maximum end is ≤ the point cannot contain a match and is skipped, and
/// nodes right of the point by their low end are never visited.
///
/// Nodes live in an array and refer to each other by index, so the tree does few allocations.
public struct IntervalTree<Value> {
    public typealias Handle = Int32

    private struct Node {
        var low: [UInt8]
        var high: [UInt8]?  // nil = +infinity
        var maxHigh: [UInt8]?  // nil = +infinity
        var value: Value?
        var left: Int32 = -1
        var right: Int32 = -1
        var priority: UInt32
    }

    private var nodes: [Node] = []
    private var free: [Int32] = []
    private var root: Int32 = -1
    private var rng = SplitMix64(seed: 0x9E37_79B9_7F4A_7C15)
    public private(set) var count = 0

    public init() {}

    // MARK: Comparisons

    @inline(__always)
    private static func compare(_ a: [UInt8], _ b: [UInt8]) -> Int {
        let n = Swift.min(a.count, b.count)
        var i = 0
        while i < n {
            if a[i] != b[i] { return a[i] < b[i] ? -1 : 1 }
            i += 1
        }
        return a.count == b.count ? 0 : (a.count < b.count ? -1 : 1)
    }

    /// Max of two upper ends where nil is +infinity.
    @inline(__always)
    private static func maxHigh(_ a: [UInt8]?, _ b: [UInt8]?) -> [UInt8]? {
        guard let a, let b else { return nil }
        return compare(a, b) >= 0 ? a : b
    }

    /// Node order: by low end, then by handle (so equal lows are allowed).
    @inline(__always)
    private func less(_ low: [UInt8], _ id: Int32, than n: Int32) -> Bool {
        let c = Self.compare(low, nodes[Int(n)].low)
        return c < 0 || (c == 0 && id < n)
    }

    private mutating func update(_ n: Int32) {
        var m = nodes[Int(n)].high
        let l = nodes[Int(n)].left, r = nodes[Int(n)].right
        if l >= 0 { m = Self.maxHigh(m, nodes[Int(l)].maxHigh) }
        if r >= 0 { m = Self.maxHigh(m, nodes[Int(r)].maxHigh) }
        nodes[Int(n)].maxHigh = m
    }

    // MARK: Insert / remove

    /// Adds `[low, high)` with a value; returns a handle for `remove`.
    @discardableResult
    public mutating func insert(low: [UInt8], high: [UInt8]?, _ value: Value) -> Handle {
        let node = Node(
            low: low, high: high, maxHigh: high, value: value, priority: UInt32(truncatingIfNeeded: rng.next()))
        let id: Int32
        if let f = free.popLast() {
            id = f
            nodes[Int(id)] = node
        } else {
            id = Int32(nodes.count)
            nodes.append(node)
        }
        root = insert(id, into: root)
        count += 1
        return id
    }

    private mutating func insert(_ id: Int32, into t: Int32) -> Int32 {
        if t < 0 { return id }
        if less(nodes[Int(id)].low, id, than: t) {
            nodes[Int(t)].left = insert(id, into: nodes[Int(t)].left)
            if nodes[Int(nodes[Int(t)].left)].priority > nodes[Int(t)].priority { return rotateRight(t) }
        } else {
            nodes[Int(t)].right = insert(id, into: nodes[Int(t)].right)
            if nodes[Int(nodes[Int(t)].right)].priority > nodes[Int(t)].priority { return rotateLeft(t) }
        }
        update(t)
        return t
    }

    private mutating func rotateRight(_ t: Int32) -> Int32 {
        let l = nodes[Int(t)].left
        nodes[Int(t)].left = nodes[Int(l)].right
        nodes[Int(l)].right = t
        update(t)
        update(l)
        return l
    }

    private mutating func rotateLeft(_ t: Int32) -> Int32 {
        let r = nodes[Int(t)].right
        nodes[Int(t)].right = nodes[Int(r)].left
        nodes[Int(r)].left = t
        update(t)
        update(r)
        return r
    }

    /// Removes the interval with this handle; returns its value.
    @discardableResult
    public mutating func remove(_ handle: Handle) -> Value? {
        guard handle >= 0, Int(handle) < nodes.count, let v = nodes[Int(handle)].value else { return nil }
        let low = nodes[Int(handle)].low
        root = remove(handle, low, from: root)
        nodes[Int(handle)] = Node(low: [], high: [], maxHigh: [], value: nil, priority: 0)
        free.append(handle)
        count -= 1
        return v
    }

    private mutating func remove(_ id: Int32, _ low: [UInt8], from t: Int32) -> Int32 {
        if t < 0 { return t }
        if t == id {
            let l = nodes[Int(t)].left, r = nodes[Int(t)].right
            if l < 0 { return r }
            if r < 0 { return l }
            // Rotate the higher-priority child up, then keep removing below it.
            if nodes[Int(l)].priority > nodes[Int(r)].priority {
                let nt = rotateRight(t)
                nodes[Int(nt)].right = remove(id, low, from: nodes[Int(nt)].right)
                update(nt)
                return nt
            } else {
                let nt = rotateLeft(t)
                nodes[Int(nt)].left = remove(id, low, from: nodes[Int(nt)].left)
                update(nt)
                return nt
            }
        }
        if less(low, id, than: t) {
            nodes[Int(t)].left = remove(id, low, from: nodes[Int(t)].left)
        } else {
            nodes[Int(t)].right = remove(id, low, from: nodes[Int(t)].right)
        }
        update(t)
        return t
    }

    // MARK: Queries

    /// Calls `visit` with the value of every interval containing `point` (low ≤ point < high).
    public func stab(_ point: [UInt8], _ visit: (Value) -> Void) {
        var stack: [Int32] = []
        if root >= 0 { stack.append(root) }
        while let t = stack.popLast() {
            let n = nodes[Int(t)]
            // Nothing below ends after the point.
            if let m = n.maxHigh, Self.compare(m, point) <= 0 { continue }
            if n.left >= 0 { stack.append(n.left) }
            if Self.compare(n.low, point) <= 0 {
                if n.high == nil || Self.compare(point, n.high!) < 0 { visit(n.value!) }
                if n.right >= 0 { stack.append(n.right) }
            }
        }
    }

    /// Checks the search-tree, heap and max-end invariants (for tests).
    public func verifyInvariants() -> Bool {
        var seen = 0
        func check(_ t: Int32) -> (ok: Bool, max: [UInt8]??) {
            if t < 0 { return (true, .none) }
            seen += 1
            let n = nodes[Int(t)]
            var m: [UInt8]? = n.high
            for c in [n.left, n.right] where c >= 0 {
                if nodes[Int(c)].priority > n.priority { return (false, .none) }
                let sub = check(c)
                if !sub.ok { return (false, .none) }
                if case .some(let sm) = sub.max { m = Self.maxHigh(m, sm) }
            }
            if n.left >= 0 && less(n.low, t, than: n.left) { return (false, .none) }
            if n.right >= 0 && !less(n.low, t, than: n.right) { return (false, .none) }
            let same =
                (m == nil && n.maxHigh == nil) || (m != nil && n.maxHigh != nil && Self.compare(m!, n.maxHigh!) == 0)
            return (same, .some(m))
        }
        return check(root).ok && seen == count
    }
}

/// A small, fast PRNG for treap priorities (Steele, Lea and Flood's SplitMix64).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
