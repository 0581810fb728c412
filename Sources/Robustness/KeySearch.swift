/// One operation as it concerns one key: its reads and writes of that key, at the revision it
/// ran at. (A class: the search passes them around by reference.)
final class KeyOp: @unchecked Sendable {
    enum Step: Hashable, Sendable {
        /// A compare on the key that held (or not).
        case cond(Compare, holds: Bool)
        /// A read of the key: what it returned (`.some(nil)`: absent), or nil if unknown.
        case get(KV??)
        case put(value: String, lease: Int64)
        /// A delete: whether it deleted something, if known.
        case delete(Bool?)
    }
    enum Kind: Sendable {
        /// Reads only, at the header revision.
        case read(header: Int64, [Step])
        /// Writes (and reads) of a txn that made `revision`.
        case write(revision: Int64, [Step])
    }
    let operation: Int
    let call: Int64
    /// `Int64.max`: unknown (it may linearize any time after its call).
    let returned: Int64
    let kind: Kind
    /// Whether it must take effect (answered, or seen in the history); the others may not have.
    let required: Bool

    init(operation: Int, call: Int64, returned: Int64, kind: Kind, required: Bool = true) {
        self.operation = operation
        self.call = call
        self.returned = returned
        self.kind = kind
        self.required = required
    }

    /// The same operation as it looked at time `t`: one still running then may not have happened.
    func cut(at t: Int64) -> KeyOp {
        returned > t ? KeyOp(operation: operation, call: call, returned: .max, kind: kind, required: false) : self
    }
}

/// A key's state in the search: its value, the last revision written to it, and the highest
/// header revision of a read of it (a later write must be above it).
struct KeyState: Hashable {
    var kv: KV?
    var lastWrite: Int64 = 0
    var readFloor: Int64 = 0
}

/// Wing & Gong's linearizability search with Lowe's just-in-time linearization and a cache of
/// (linearized set, state) pairs, as Porcupine runs it, for the history of one key.
struct KeySearch {
    let key: String
    let ops: [KeyOp]

    /// The model: `op` applied to `s`, or nil if it cannot happen there.
    func apply(_ op: KeyOp, _ s: KeyState) -> KeyState? {
        var kv = s.kv
        func run(_ steps: [KeyOp.Step], at revision: Int64) -> Bool {
            for step in steps {
                switch step {
                case .cond(let c, let holds): if c.holds(on: kv) != holds { return false }
                case .get(let expected): if let e = expected, !Self.same(kv, e) { return false }
                case .put(let value, let lease):
                    kv = KV(
                        key: key, value: value, createRevision: kv?.createRevision ?? revision, modRevision: revision,
                        version: (kv?.version ?? 0) + 1, lease: lease)
                case .delete(let deleted):
                    if let d = deleted, d != (kv != nil) { return false }
                    kv = nil
                }
            }
            return true
        }
        switch op.kind {
        case .read(let header, let steps):
            guard s.lastWrite <= header, run(steps, at: 0) else { return nil }
            return KeyState(kv: kv, lastWrite: s.lastWrite, readFloor: max(s.readFloor, header))
        case .write(let revision, let steps):
            guard revision > s.lastWrite, revision > s.readFloor, run(steps, at: revision) else { return nil }
            return KeyState(kv: kv, lastWrite: revision, readFloor: s.readFloor)
        }
    }

    static func same(_ a: KV?, _ b: KV?) -> Bool {
        switch (a, b) {
        case (nil, nil): true
        case (let x?, let y?):
            x.value == y.value && x.modRevision == y.modRevision && x.createRevision == y.createRevision
                && x.version == y.version && x.lease == y.lease
        default: false
        }
    }

    private struct Entry {
        var op: Int
        var isCall: Bool
        var time: Int64
        var prev = -1
        var next = -1
        var match = -1
    }

    private struct CacheKey: Hashable {
        var linearized: [UInt64]
        var state: KeyState
    }

    /// Whether the ops linearize; if not, the index of an op that could not be placed.
    func check(maxSteps: Int = 5_000_000) -> (ok: Bool, stuckAt: Int?) {
        guard !ops.isEmpty else { return (true, nil) }
        var entries: [Entry] = []
        for (i, o) in ops.enumerated() {
            entries.append(Entry(op: i, isCall: true, time: o.call))
            entries.append(Entry(op: i, isCall: false, time: o.returned))
        }
        // Calls before returns at the same time: only a return strictly before a call orders them.
        entries.sort { a, b in a.time != b.time ? a.time < b.time : (a.isCall && !b.isCall) }
        var callOf = [Int](repeating: -1, count: ops.count)
        var returnOf = [Int](repeating: -1, count: ops.count)
        for (i, e) in entries.enumerated() {
            if e.isCall { callOf[e.op] = i } else { returnOf[e.op] = i }
        }
        for i in entries.indices {
            entries[i].prev = i - 1
            entries[i].next = i + 1 < entries.count ? i + 1 : -1
            entries[i].match = entries[i].isCall ? returnOf[entries[i].op] : callOf[entries[i].op]
        }
        var head = 0
        func lift(_ c: Int) {
            for i in [c, entries[c].match] {
                let p = entries[i].prev, n = entries[i].next
                if p >= 0 { entries[p].next = n } else { head = n }
                if n >= 0 { entries[n].prev = p }
            }
        }
        func unlift(_ c: Int) {
            for i in [entries[c].match, c] {
                let p = entries[i].prev, n = entries[i].next
                if p >= 0 { entries[p].next = i } else { head = i }
                if n >= 0 { entries[n].prev = i }
            }
        }
        var linearized = [UInt64](repeating: 0, count: (ops.count + 63) / 64)
        var state = KeyState()
        var stack: [(entry: Int, state: KeyState)] = []
        var cache = Set<CacheKey>()
        var entry = head
        var steps = 0
        var stuck: Int?
        while head >= 0 {
            steps += 1
            if steps > maxSteps { return (true, -1) }  // too big to decide: said as such
            if entry < 0 { return (true, nil) }  // only ops that need not happen are left
            let e = entries[entry]
            if e.isCall {
                if let next = apply(ops[e.op], state) {
                    var key = CacheKey(linearized: linearized, state: next)
                    key.linearized[e.op / 64] |= 1 << UInt64(e.op % 64)
                    if cache.insert(key).inserted {
                        stack.append((entry, state))
                        state = next
                        linearized = key.linearized
                        lift(entry)
                        entry = head
                        continue
                    }
                }
                entry = e.next
            } else if !ops[e.op].required {
                entry = e.next
            } else {
                stuck = stuck ?? e.op
                guard let (top, saved) = stack.popLast() else { return (false, stuck) }
                state = saved
                linearized[entries[top].op / 64] &= ~(1 << UInt64(entries[top].op % 64))
                unlift(top)
                entry = entries[top].next
            }
        }
        return (true, nil)
    }
}
