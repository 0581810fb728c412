import Foundation

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

/// The linearizability validator: every key's operations must linearize with the model (reads
/// see the writes before them, writes at their revisions in order, operations that overlap in
/// time in any order), and revisions must never go back in real time across keys.
enum LinearizabilityValidator {
    /// The keys of the KV traffic (locks and elections are checked by their own validator).
    static func inScope(_ key: String) -> Bool {
        key.hasPrefix("key/") || key.hasPrefix("/registry/") || key == "compact_rev_key" || key.hasPrefix("lease/")
    }

    static func validate(_ h: History, _ ref: Reference, _ attr: Attribution, into report: inout [Violation]) {
        var byKey: [String: [KeyOp]] = [:]
        for (i, op) in h.operations.enumerated() { project(i, op, h, ref, attr, into: &byKey) }
        // Deletes no client made: a lease's keys going (expiry or revoke).
        var revoked = Set<String>()
        let deletesAt = Dictionary(grouping: attr.unattributedDeletes, by: \.revision)
        for (i, op) in h.operations.enumerated() {
            guard case .leaseRevoke(let lease) = op.request, let rev = attr.applied[i] else { continue }
            for d in deletesAt[rev] ?? []
            where d.revision == rev && inScope(d.key) && ref.state(d.key, at: rev - 1)?.lease == lease {
                revoked.insert("\(rev) \(d.key)")
                byKey[d.key, default: []].append(
                    KeyOp(
                        operation: i, call: op.call, returned: op.returned ?? .max,
                        kind: .write(revision: rev, [.delete(true)])))
            }
        }
        for d in attr.unattributedDeletes where inScope(d.key) && !revoked.contains("\(d.revision) \(d.key)") {
            let before = ref.state(d.key, at: d.revision - 1)
            if before?.lease ?? 0 == 0 {
                report.append(
                    Violation(
                        validator: "linearizability",
                        message: "\(d.key) was deleted at revision \(d.revision) by no request",
                        window: ["before: \(before.map(\.description) ?? "absent")"]))
            }
            byKey[d.key, default: []].append(
                KeyOp(operation: -1, call: 0, returned: .max, kind: .write(revision: d.revision, [.delete(true)])))
        }
        for e in attr.unattributedPuts where inScope(e.kv.key) {
            report.append(
                Violation(validator: "linearizability", message: "a put nobody made: \(e)", window: []))
        }
        for (rev, ops) in attr.shared {
            report.append(
                Violation(
                    validator: "linearizability", message: "two requests made revision \(rev)",
                    window: ops.map { describe(h.operations[$0]) }))
        }
        for (op, why) in attr.lost {
            report.append(
                Violation(
                    validator: "durability", message: "acknowledged write lost: \(why)",
                    window: [describe(h.operations[op])]))
        }
        for key in byKey.keys.sorted() {
            let ops = byKey[key]!
            let (ok, stuck) = KeySearch(key: key, ops: ops).check()
            if ok && stuck == -1 {
                report.append(
                    Violation(
                        validator: "linearizability.undecided",
                        message: "the history of \(key) (\(ops.count) operations) was too big to search", window: []))
            }
            guard !ok else { continue }
            report.append(
                Violation(
                    validator: "linearizability", message: "the history of \(key) does not linearize",
                    window: smallestWindow(key, ops, stuck, h, ref)))
        }
        revisionOrder(h, attr, into: &report)
        historicalReads(h, ref, into: &report)
    }

    /// Adds what operation `i` did to each key it touched.
    static func project(
        _ i: Int, _ op: Operation, _ h: History, _ ref: Reference, _ attr: Attribution,
        into byKey: inout [String: [KeyOp]]
    ) {
        let returned = op.returned ?? .max
        switch op.request {
        case .range(let key, let end, let revision, let limit):
            guard op.succeeded, revision == 0, case .range(let kvs, _, let more)? = op.response else { return }
            if end.isEmpty {
                guard inScope(key) else { return }
                byKey[key, default: []].append(
                    KeyOp(
                        operation: i, call: op.call, returned: returned,
                        kind: .read(header: op.revision, [.get(.some(kvs.first))])))
                return
            }
            // The keys live at its revision in the history, and the ones it returned: a key
            // missing from the answer, or one that should not be there, is among them.
            var keys = Set(ref.range(key, end, at: op.revision).map(\.key))
            keys.formUnion(kvs.map(\.key))
            if limit > 0 && more, let last = kvs.last?.key { keys = keys.filter { $0 <= last } }
            let found = Dictionary(kvs.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a })
            for k in keys where inScope(k) {
                let got = found[k]
                byKey[k, default: []].append(
                    KeyOp(
                        operation: i, call: op.call, returned: returned,
                        kind: .read(header: op.revision, [.get(.some(got))])))
            }
        case .txn(let compares, let success, let failure):
            guard let ran = attr.branch[i] else { return }
            let applied = attr.applied[i]
            let ops = ran ? success : failure
            var results: [TxnResult]?
            if case .txn(_, let r)? = op.response { results = r }
            let keys = Set(compares.map(\.key) + ops.map(\.key))
            let singleKeyCompares = Set(compares.map(\.key)).count <= 1
            for k in keys where inScope(k) {
                var steps: [KeyOp.Step] = []
                if singleKeyCompares {
                    for c in compares where c.key == k { steps.append(.cond(c, holds: ran)) }
                }
                var writes = false
                for (j, o) in ops.enumerated() where o.key == k {
                    let r = results.flatMap { j < $0.count ? $0[j] : nil }
                    switch o {
                    case .get:
                        if case .got(let kv)? = r { steps.append(.get(.some(kv))) } else { steps.append(.get(nil)) }
                    case .put(_, let v, let lease):
                        steps.append(.put(value: v, lease: lease))
                        writes = true
                    case .delete:
                        if case .deleted(let n)? = r {
                            steps.append(.delete(n > 0))
                            writes = writes || n > 0
                        } else {
                            // Unknown: it took effect (it is attributed) if it deleted this key.
                            let there = applied.map { rev in
                                ref.events[rev]?.contains { !$0.isPut && $0.kv.key == k } ?? false
                            }
                            steps.append(.delete(there))
                            writes = writes || there == true
                        }
                    }
                }
                let kind: KeyOp.Kind
                if writes, let rev = applied {
                    kind = .write(revision: rev, steps)
                } else if op.succeeded {
                    kind = .read(header: op.revision, steps)
                } else {
                    continue
                }
                byKey[k, default: []].append(KeyOp(operation: i, call: op.call, returned: returned, kind: kind))
            }
        default: return
        }
    }

    /// Revisions never go back in real time: a request sent after another was answered has a
    /// header revision at least as high (above it, if it wrote).
    static func revisionOrder(_ h: History, _ attr: Attribution, into report: inout [Violation]) {
        let answered = h.operations.indices.filter { h.operations[$0].succeeded }
        let byReturn = answered.sorted { h.operations[$0].returned! < h.operations[$1].returned! }
        var prefixMax: [(rev: Int64, op: Int)] = []
        for i in byReturn {
            let r = h.operations[i].revision
            prefixMax.append(prefixMax.last.map { $0.rev >= r ? $0 : (r, i) } ?? (r, i))
        }
        var found = 0
        for i in answered {
            let b = h.operations[i]
            var lo = 0, hi = byReturn.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if h.operations[byReturn[mid]].returned! < b.call { lo = mid + 1 } else { hi = mid }
            }
            guard lo > 0 else { continue }
            let (bound, a) = prefixMax[lo - 1]
            var wrote = false
            if case .txn = b.request { wrote = attr.applied[i] != nil }
            if b.revision < bound || (wrote && b.revision == bound) {
                found += 1
                if found <= 3 {
                    report.append(
                        Violation(
                            validator: "linearizability",
                            message:
                                "revision went back: a request sent after another was answered at revision \(bound) has revision \(b.revision)",
                            window: [describe(h.operations[a]), describe(b)]))
                }
            }
        }
    }

    /// Reads at an older revision equal the history replayed to that revision.
    static func historicalReads(_ h: History, _ ref: Reference, into report: inout [Violation]) {
        var found = 0
        for op in h.operations {
            guard case .range(let key, let end, let revision, let limit) = op.request, revision > 0, op.succeeded,
                case .range(let kvs, let count, let more)? = op.response, revision <= ref.last
            else { continue }
            var want =
                end.isEmpty ? [ref.state(key, at: revision)].compactMap { $0 } : ref.range(key, end, at: revision)
            let total = Int64(want.count)
            let wantMore = limit > 0 && want.count > Int(limit)
            if limit > 0 { want = Array(want.prefix(Int(limit))) }
            let same = want.count == kvs.count && zip(want, kvs).allSatisfy { KeySearch.same($0, $1) }
            if !same || count != total || more != wantMore {
                found += 1
                if found <= 3 {
                    report.append(
                        Violation(
                            validator: "linearizability",
                            message: "a read at revision \(revision) does not match the history there",
                            window: [describe(op), "history: \(want) count \(total) more \(wantMore)"]))
                }
            }
        }
    }

    /// The shortest prefix of the key's history that already fails, and its last operations.
    static func smallestWindow(_ key: String, _ ops: [KeyOp], _ stuck: Int?, _ h: History, _ ref: Reference) -> [String]
    {
        let times = Array(Set(ops.map(\.returned).filter { $0 != .max })).sorted()
        func fails(_ t: Int64) -> Bool {
            let prefix = ops.filter { $0.call <= t }.map { $0.cut(at: t) }
            return !KeySearch(key: key, ops: prefix).check().ok
        }
        var lo = 0, hi = times.count - 1
        guard hi >= 0, fails(times[hi]) else { return [] }
        while lo < hi {
            let mid = (lo + hi) / 2
            if fails(times[mid]) { hi = mid } else { lo = mid + 1 }
        }
        let end = times[lo]
        if let dump = ProcessInfo.processInfo.environment["VIGIL_ROBUSTNESS_DUMP"], dump == key {
            for o in ops.filter({ $0.call <= end }).sorted(by: { $0.call < $1.call }).suffix(40) {
                FileHandle.standardError.write(
                    Data(
                        "\(o.operation) [\((o.call - end) / 1000), \(o.returned == .max ? "inf" : "\((o.returned - end) / 1000)")] req \(o.required) \(o.kind)\n"
                            .utf8))
            }
        }
        let window = ops.filter { $0.call <= end }.sorted { $0.call < $1.call }.suffix(12)
        var lines = ["\(key), first failing at \(end): the last operations (time in ms from the first shown)"]
        let t0 = window.first?.call ?? 0
        for o in window {
            let what = o.operation >= 0 ? describe(h.operations[o.operation]) : "a lease deletes \(key)"
            let span =
                "[\((o.call - t0) / 1_000_000), \(o.returned == .max ? "?" : "\((o.returned - t0) / 1_000_000)")]"
            lines.append("  \(span) \(what)")
        }
        if let s = stuck, s < ops.count, ops[s].operation >= 0 {
            lines.append("  cannot place: \(describe(h.operations[ops[s].operation]))")
        }
        let revs = ops.compactMap { o -> Int64? in if case .write(let r, _) = o.kind { r } else { nil } }
        if let lastRev = revs.max() {
            let states = ref.history(of: key).filter { $0.revision <= lastRev }.suffix(6)
            lines.append(
                "  history of \(key): "
                    + states.map { "\($0.revision): \($0.kv.map(\.description) ?? "deleted")" }.joined(separator: ", "))
        }
        return lines
    }

    static func describe(_ op: Operation) -> String {
        let outcome: String
        if op.unknown {
            outcome = "unknown (\(op.error ?? ""))"
        } else if let e = op.error {
            outcome = "error \(e)"
        } else if case .range(let kvs, let count, let more)? = op.response {
            let shown = kvs.prefix(3).map(\.description).joined(separator: ", ")
            outcome = "rev \(op.revision) [\(shown)\(kvs.count > 3 ? ", …" : "")] count \(count)\(more ? " more" : "")"
        } else {
            outcome = "rev \(op.revision) \(op.response.map { "\($0)" } ?? "")"
        }
        return "op \(op.id) client \(op.client): \(op.request) → \(outcome)"
    }
}
