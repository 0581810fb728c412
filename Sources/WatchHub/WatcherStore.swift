import IntervalTree
import MVCC

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A watcher's options and state, one byte.
struct WatcherFlags: OptionSet {
    let rawValue: UInt8
    static let noPut = WatcherFlags(rawValue: 1)
    static let noDelete = WatcherFlags(rawValue: 2)
    static let prevKV = WatcherFlags(rawValue: 4)
    static let progressNotify = WatcherFlags(rawValue: 8)
    static let fragment = WatcherFlags(rawValue: 16)
    /// Has everything up to the delivered revision and gets each new one as it is delivered.
    static let synced = WatcherFlags(rawValue: 32)
    /// Was sent something since the last progress tick.
    static let sent = WatcherFlags(rawValue: 64)
    /// Synced, but created with a start revision past the delivered one (kept in `futureStart`).
    static let future = WatcherFlags(rawValue: 128)

    init(rawValue: UInt8) { self.rawValue = rawValue }

    init(_ c: WatchCreate) {
        var f: WatcherFlags = []
        if c.noPut { f.insert(.noPut) }
        if c.noDelete { f.insert(.noDelete) }
        if c.prevKV { f.insert(.prevKV) }
        if c.progressNotify { f.insert(.progressNotify) }
        if c.fragment { f.insert(.fragment) }
        self = f
    }

    func wants(_ e: Event) -> Bool { !contains(e.kind == .put ? .noPut : .noDelete) }
}

/// Every watcher of the hub as parallel arrays indexed by a watcher number (struct of arrays): a
/// million watchers are a handful of flat arrays, not a million objects. A watcher is its id, its
/// stream, its group and its place in the group's member list, and one byte of flags — 21 bytes.
/// A synced watcher needs no revision of its own (it is at the delivered one); unsynced and
/// future ones keep theirs in the hub's small maps.
struct Watchers {
    /// The watch id when it fits in 32 bits, else `UInt32.max` and the id is in `bigIDs`.
    private var idLow: [UInt32] = []
    private var bigIDs: [Int32: Int64] = [:]
    /// Index of the watcher's stream in the hub's stream table.
    private(set) var stream: [Int32] = []
    /// The watcher's group; for a free number, `-2 - next free number`.
    private(set) var group: [Int32] = []
    /// Members of a group form a doubly linked list through `next` and `prev`; the head's `prev`
    /// is the tail (so appending keeps creation order).
    var next: [Int32] = []
    var prev: [Int32] = []
    var flags: [WatcherFlags] = []
    private var freeHead: Int32 = -1
    private(set) var count = 0

    mutating func add(id: Int64, stream s: Int32, group g: Int32, flags f: WatcherFlags) -> Int32 {
        let low = id >= 0 && id < Int64(UInt32.max) ? UInt32(id) : UInt32.max
        let w: Int32
        if freeHead >= 0 {
            w = freeHead
            freeHead = -2 - group[Int(w)]
            idLow[Int(w)] = low
            stream[Int(w)] = s
            group[Int(w)] = g
            next[Int(w)] = -1
            prev[Int(w)] = -1
            flags[Int(w)] = f
        } else {
            w = Int32(idLow.count)
            idLow.append(low)
            stream.append(s)
            group.append(g)
            next.append(-1)
            prev.append(-1)
            flags.append(f)
        }
        if low == UInt32.max { bigIDs[w] = id }
        count += 1
        return w
    }

    /// Frees the number (the caller has unlinked it). `next` and `prev` are left as they were,
    /// so a walk of a member list that was at this watcher can still go on.
    mutating func free(_ w: Int32) {
        if idLow[Int(w)] == UInt32.max { bigIDs[w] = nil }
        flags[Int(w)] = []
        group[Int(w)] = -2 - freeHead
        freeHead = w
        count -= 1
    }

    func id(_ w: Int32) -> Int64 {
        let low = idLow[Int(w)]
        return low == UInt32.max ? bigIDs[w]! : Int64(low)
    }
}

/// The distinct watched ranges ("groups"): every watcher on the same [key, end) shares one, so
/// thousands of subscribers to one prefix cost one entry. Keys live in one byte arena; single keys
/// are found through an open-addressing hash table of group numbers, ranges through an interval
/// tree. A group costs 8 bytes, its key's bytes (with a length prefix) and its table slot.
struct WatchGroups {
    /// Each key as a LEB128 length followed by its bytes.
    private var arena: [UInt8] = []
    private var deadBytes = 0
    /// Offset of the group's key in the arena.
    private var keyOffset: [UInt32] = []
    /// First member (a watcher number), or -1 for a free group.
    var head: [Int32] = []
    private var freeGroups: [Int32] = []
    private var table = [Int32](repeating: -1, count: 16)
    private var tableCount = 0
    private struct RangeKey: Hashable {
        var key: Bytes
        var end: Bytes
    }
    private struct RangeGroup {
        var end: Bytes
        var handle: IntervalTree<Int32>.Handle
    }
    private var rangeInfo: [Int32: RangeGroup] = [:]
    private var rangeIndex: [RangeKey: Int32] = [:]
    private var tree = IntervalTree<Int32>()

    /// The arena's offsets have 32 bits.
    static let maxArenaBytes = Int(UInt32.max)

    /// Live groups.
    private(set) var count = 0
    /// Times the arena was rewritten without its dead keys.
    private(set) var arenaCompactions = 0

    // MARK: Keys

    private func withKey<R>(_ g: Int32, _ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
        arena.withUnsafeBufferPointer { a in
            let (start, length) = Self.entry(a, Int(keyOffset[Int(g)]))
            return body(UnsafeBufferPointer(rebasing: a[start..<start + length]))
        }
    }

    /// Where the key at `offset` starts and its length.
    @inline(__always)
    private static func entry(_ a: UnsafeBufferPointer<UInt8>, _ offset: Int) -> (start: Int, length: Int) {
        var i = offset, length = 0, shift = 0
        while true {
            let byte = a[i]
            length |= Int(byte & 0x7F) << shift
            i += 1
            if byte < 0x80 { return (i, length) }
            shift += 7
        }
    }

    private static func lengthPrefix(_ n: Int) -> Int {
        var bytes = 1, rest = n >> 7
        while rest > 0 {
            bytes += 1
            rest >>= 7
        }
        return bytes
    }

    /// Whether a key of `n` bytes still fits in the arena (dead keys are dropped first if need be).
    mutating func hasRoom(_ n: Int) -> Bool {
        let need = n + Self.lengthPrefix(n)
        if arena.count + need <= Self.maxArenaBytes { return true }
        compactArena()
        arenaCompactions += 1
        return arena.count + need <= Self.maxArenaBytes
    }

    /// The group's key.
    func key(_ g: Int32) -> Bytes { withKey(g) { Bytes($0) } }

    /// The group's range end (empty for a single key).
    func end(_ g: Int32) -> Bytes { rangeInfo[g]?.end ?? [] }

    private func keyEquals(_ g: Int32, _ key: UnsafeBufferPointer<UInt8>) -> Bool {
        withKey(g) { k in
            k.count == key.count && (k.count == 0 || memcmp(k.baseAddress!, key.baseAddress!, k.count) == 0)
        }
    }

    /// A hash's home slot in a table of `n` (any size: the high half of hash × n).
    @inline(__always)
    private static func slot(_ hash: Int, _ n: Int) -> Int {
        Int(truncatingIfNeeded: UInt64(UInt(bitPattern: hash)).multipliedFullWidth(by: UInt64(n)).high)
    }

    @inline(__always)
    private static func hash(_ key: UnsafeBufferPointer<UInt8>) -> Int {
        // The standard library's seeded hash: clients choose the keys, so the table must not be
        // floodable with colliding ones.
        var h = Hasher()
        h.combine(bytes: UnsafeRawBufferPointer(key))
        return h.finalize()
    }

    // MARK: Lookup

    /// The group of the single key `key`, if anyone watches it.
    func single(_ key: Bytes) -> Int32? {
        key.withUnsafeBufferPointer { k in
            let n = table.count
            var i = Self.slot(Self.hash(k), n)
            while true {
                let g = table[i]
                if g < 0 { return nil }
                if keyEquals(g, k) { return g }
                i = i + 1 == n ? 0 : i + 1
            }
        }
    }

    /// Calls `body` with each range group containing `key`.
    func stab(_ key: Bytes, _ body: (Int32) -> Void) {
        if rangeInfo.isEmpty { return }
        tree.stab(key, body)
    }

    // MARK: Adding and removing

    /// The group of [key, end) (`end` empty: the single key), made on first use with no members.
    mutating func group(_ key: Bytes, _ end: Bytes) -> Int32 {
        if end.isEmpty {
            if let g = single(key) { return g }
            let g = allocate(key)
            insertInTable(g)
            return g
        }
        let rk = RangeKey(key: key, end: end)
        if let g = rangeIndex[rk] { return g }
        let g = allocate(key)
        rangeInfo[g] = RangeGroup(end: end, handle: tree.insert(low: key, high: end == [0] ? nil : end, g))
        rangeIndex[rk] = g
        return g
    }

    private mutating func allocate(_ key: Bytes) -> Int32 {
        let offset = UInt32(arena.count)
        var n = key.count
        while n >= 0x80 {
            arena.append(UInt8(n & 0x7F) | 0x80)
            n >>= 7
        }
        arena.append(UInt8(n))
        arena.append(contentsOf: key)
        count += 1
        if let g = freeGroups.popLast() {
            keyOffset[Int(g)] = offset
            head[Int(g)] = -1
            return g
        }
        keyOffset.append(offset)
        head.append(-1)
        return Int32(keyOffset.count - 1)
    }

    /// Drops a group whose last member left.
    mutating func release(_ g: Int32) {
        if let r = rangeInfo.removeValue(forKey: g) {
            tree.remove(r.handle)
            rangeIndex[RangeKey(key: key(g), end: r.end)] = nil
        } else {
            removeFromTable(g)
        }
        let length = withKey(g) { $0.count }
        deadBytes += length + Self.lengthPrefix(length)
        keyOffset[Int(g)] = 0
        head[Int(g)] = -1
        freeGroups.append(g)
        count -= 1
        if deadBytes > 1 << 16 && deadBytes * 2 > arena.count {
            compactArena()
            arenaCompactions += 1
        }
    }

    /// Copies the live keys into a new arena.
    private mutating func compactArena() {
        var fresh: [UInt8] = []
        fresh.reserveCapacity(arena.count - deadBytes)
        arena.withUnsafeBufferPointer { a in
            for g in 0..<keyOffset.count where head[g] >= 0 {
                let offset = Int(keyOffset[g])
                let (start, length) = Self.entry(a, offset)
                keyOffset[g] = UInt32(fresh.count)
                fresh.append(contentsOf: a[offset..<start + length])
            }
        }
        arena = fresh
        deadBytes = 0
    }

    /// Checks the tables agree (for tests, after mutations): every live single-key group is in
    /// the hash table once and is found from its home slot before an empty one (linear probing's
    /// invariant, which backward-shift deletion must keep); the table holds nothing else and is
    /// at most three quarters full; every range group is in the range index and the tree; live
    /// keys lie inside the arena; the counts match.
    func verifyInvariants() -> Bool {
        var live = 0
        var singles = 0
        for g in 0..<head.count where head[g] >= 0 {
            live += 1
            let g = Int32(g)
            guard Int(keyOffset[Int(g)]) < max(arena.count, 1) else { return false }
            if let r = rangeInfo[g] {
                guard rangeIndex[RangeKey(key: key(g), end: r.end)] == g else { return false }
                continue
            }
            singles += 1
            let n = table.count
            var i = homeSlot(g, n)
            var probes = 0
            while table[i] != g {
                guard table[i] >= 0, probes < n else { return false }
                i = i + 1 == n ? 0 : i + 1
                probes += 1
            }
        }
        let inTable = table.filter { $0 >= 0 }
        guard inTable.count == tableCount, tableCount == singles, Set(inTable).count == inTable.count else {
            return false
        }
        guard inTable.allSatisfy({ head[Int($0)] >= 0 && rangeInfo[$0] == nil }) else { return false }
        guard tableCount * 4 <= table.count * 3 else { return false }
        return live == count && rangeInfo.count == rangeIndex.count && tree.count == rangeInfo.count
            && tree.verifyInvariants()
    }

    // MARK: The hash table (linear probing, backward-shift deletion)
    //
    // It grows by half (not doubling) at three quarters full, so that slots cost 5 to 8 bytes
    // a key rather than 5 to 11.

    private func homeSlot(_ g: Int32, _ n: Int) -> Int { Self.slot(withKey(g) { Self.hash($0) }, n) }

    private mutating func insertInTable(_ g: Int32) {
        if (tableCount + 1) * 4 > table.count * 3 { resizeTable(table.count + table.count / 2) }
        let n = table.count
        var i = homeSlot(g, n)
        while table[i] >= 0 { i = i + 1 == n ? 0 : i + 1 }
        table[i] = g
        tableCount += 1
    }

    private mutating func removeFromTable(_ g: Int32) {
        let n = table.count
        var i = homeSlot(g, n)
        while table[i] != g { i = i + 1 == n ? 0 : i + 1 }
        table[i] = -1
        tableCount -= 1
        // Shift back the entries after the hole that would no longer be found past it.
        var j = i
        while true {
            j = j + 1 == n ? 0 : j + 1
            let h = table[j]
            if h < 0 { break }
            let k = homeSlot(h, n)
            let stays = i <= j ? (i < k && k <= j) : (i < k || k <= j)
            if !stays {
                table[i] = h
                table[j] = -1
                i = j
            }
        }
        if n > 1024 && tableCount * 8 < n { resizeTable(n / 2) }
    }

    private mutating func resizeTable(_ capacity: Int) {
        let old = table
        table = [Int32](repeating: -1, count: capacity)
        for g in old where g >= 0 {
            var i = homeSlot(g, capacity)
            while table[i] >= 0 { i = i + 1 == capacity ? 0 : i + 1 }
            table[i] = g
        }
    }
}

/// A stream's watchers by id: ids the hub assigns are small and dense (0, 1, 2, …) and live in an
/// array; ids a client picks far from that go to a dictionary.
struct WatcherTable {
    private var dense: [Int32] = []  // watcher numbers, -1 for none
    private var sparse: [Int64: Int32] = [:]
    private(set) var count = 0

    subscript(id: Int64) -> Int32? {
        if id >= 0 && id < Int64(dense.count) {
            let w = dense[Int(id)]
            return w >= 0 ? w : nil
        }
        return sparse[id]
    }

    mutating func insert(id: Int64, _ w: Int32) {
        count += 1
        if id >= 0 && id <= Int64(dense.count) && id < 1 << 24 {
            if id == Int64(dense.count) { dense.append(w) } else { dense[Int(id)] = w }
        } else {
            sparse[id] = w
        }
    }

    @discardableResult mutating func remove(_ id: Int64) -> Int32? {
        var w: Int32?
        if id >= 0 && id < Int64(dense.count) {
            w = dense[Int(id)] >= 0 ? dense[Int(id)] : nil
            dense[Int(id)] = -1
        } else {
            w = sparse.removeValue(forKey: id)
        }
        if w != nil { count -= 1 }
        return w
    }

    var isEmpty: Bool { count == 0 }

    var all: [Int32] { dense.filter { $0 >= 0 } + sparse.values }

    /// Whether every watcher satisfies `p` (without building `all`).
    func allSatisfy(_ p: (Int32) -> Bool) -> Bool {
        for w in dense where w >= 0 && !p(w) { return false }
        return sparse.values.allSatisfy(p)
    }

    mutating func removeAll() {
        dense = []
        sparse = [:]
        count = 0
    }
}
