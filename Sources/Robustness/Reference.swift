/// The run's order of writes: every revision's events as the collector's watch (all keys, from
/// revision 2) received them, with revisions it did not get filled in from the other watches.
/// Replayed, it gives any key's state at any revision.
public struct Reference: Sendable {
    /// Events by revision, in the order they came.
    public private(set) var events: [Int64: [EventRecord]] = [:]
    /// The highest revision known.
    public private(set) var last: Int64 = 1
    /// Revisions in 2...last the collector did not deliver (filled from other watches if they
    /// had them).
    public private(set) var missedByCollector: [Int64] = []
    /// Revisions no watch delivered.
    public private(set) var unknown: [Int64] = []
    /// Each key's states in revision order (nil: deleted).
    private var changes: [String: [(revision: Int64, kv: KV?)]] = [:]

    init(_ history: History) {
        for w in history.watches where w.isCollector {
            for r in w.responses {
                for e in r.events where events[e.revision] == nil || !events[e.revision]!.contains(e) {
                    events[e.revision, default: []].append(e)
                }
            }
        }
        // Through the final revision (progress notifications past it are the watch validator's
        // to report, not revisions to expect).
        var through: Int64 = max(history.finalRevision, events.keys.max() ?? 1)
        for w in history.watches where w.isCollector {
            for r in w.responses where r.isProgress && r.headerRevision <= history.finalRevision {
                through = max(through, r.headerRevision)
            }
        }
        through = min(through, max(history.finalRevision, 1) + 1_000_000)
        last = through
        // Revisions the collector lacks: other watches may have them (events of a revision
        // there are the ones in their range only, so they complete nothing else).
        var filled: [Int64: [EventRecord]] = [:]
        for w in history.watches where !w.isCollector {
            for r in w.responses {
                for e in r.events where events[e.revision] == nil {
                    if !filled[e.revision, default: []].contains(e) { filled[e.revision, default: []].append(e) }
                }
            }
        }
        if through >= 2 {
            for rev in 2...through where events[rev] == nil {
                missedByCollector.append(rev)
                if let f = filled[rev] { events[rev] = f } else { unknown.append(rev) }
            }
        }
        for rev in events.keys.sorted() {
            for e in events[rev]! { changes[e.kv.key, default: []].append((rev, e.isPut ? e.kv : nil)) }
        }
        keys = changes.keys.sorted()
    }

    /// `key`'s state at `revision` (nil: absent).
    public func state(_ key: String, at revision: Int64) -> KV? {
        guard let list = changes[key] else { return nil }
        var lo = 0, hi = list.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if list[mid].revision <= revision { lo = mid + 1 } else { hi = mid }
        }
        return lo == 0 ? nil : list[lo - 1].kv
    }

    /// Every key ever written, in order.
    public private(set) var keys: [String] = []

    /// The keys ever written in `[key, end)`, in order.
    public func keys(_ key: String, _ end: String) -> ArraySlice<String> {
        if end.isEmpty { return keys.contains(key) ? [key] : [] }
        let lo = lowerBound(key)
        let hi = end == "\0" ? keys.count : lowerBound(end)
        return lo < hi ? keys[lo..<hi] : []
    }

    private func lowerBound(_ k: String) -> Int {
        var lo = 0, hi = keys.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if keys[mid] < k { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The live keys in `[key, end)` at `revision`, in key order.
    public func range(_ key: String, _ end: String, at revision: Int64) -> [KV] {
        keys(key, end).compactMap { state($0, at: revision) }
    }

    /// `key`'s states in revision order.
    public func history(of key: String) -> [(revision: Int64, kv: KV?)] { changes[key] ?? [] }

    /// The events at `revision` a watch of `[key, end)` with these filters gets.
    public func events(at revision: Int64, for w: WatchRecord) -> [EventRecord] {
        (events[revision] ?? []).filter {
            w.covers($0.kv.key) && !(w.noPut && $0.isPut) && !(w.noDelete && !$0.isPut)
        }
    }
}

/// Which requests took effect, and at which revision: acknowledged writes from their answers,
/// writes with an unknown outcome from the reference (every put writes a value no other put
/// writes), deletes nobody asked for from the leases whose keys they were.
struct Attribution {
    /// Operation index → the revision it wrote at (writes that took effect only).
    var applied: [Int: Int64] = [:]
    /// Operation index → whether the success branch ran (txns that took effect or answered).
    var branch: [Int: Bool] = [:]
    /// Deletes at a revision no client delete explains: lease expiries and revokes, unlocks.
    var unattributedDeletes: [(revision: Int64, key: String)] = []
    /// Puts no client made (a server that writes what nobody asked for).
    var unattributedPuts: [EventRecord] = []
    /// Acknowledged writes the reference does not have at their revision (lost or changed).
    var lost: [(op: Int, why: String)] = []
    /// Revisions two answered writes both claim.
    var shared: [(revision: Int64, ops: [Int])] = []

    init(_ history: History, _ reference: Reference) {
        var putAt: [String: Int64] = [:]  // key + "\u{1}" + value → revision
        for (rev, evs) in reference.events {
            for e in evs where e.isPut { putAt[e.kv.key + "\u{1}" + e.kv.value] = rev }
        }
        var explained = Set<String>()  // "rev key" of events some operation explains
        func mark(_ rev: Int64, _ key: String) { explained.insert("\(rev) \(key)") }
        var pendingDeletes: [(op: Int, key: String, call: Int64, compares: [Compare])] = []

        for (i, op) in history.operations.enumerated() {
            switch op.request {
            case .txn(let compares, let success, let failure):
                if op.succeeded, case .txn(let ok, let results)? = op.response {
                    branch[i] = ok
                    let ops = ok ? success : failure
                    let writes = zip(ops, results).contains { o, r in
                        if case .put = o { return true }
                        if case .deleted(let n) = r { return n > 0 }
                        return false
                    }
                    guard writes else { continue }
                    applied[i] = op.revision
                    // A revision no watch delivered cannot be checked here (the durability
                    // validator reports those revisions).
                    if reference.events[op.revision] == nil { continue }
                    for (o, r) in zip(ops, results) {
                        switch o {
                        case .put(let k, let v, _):
                            if putAt[k + "\u{1}" + v] != op.revision {
                                lost.append((i, "put \(k)=\(v) is not at revision \(op.revision) in the history"))
                            }
                            mark(op.revision, k)
                        case .delete(let k):
                            if case .deleted(let n) = r, n > 0 {
                                let there = reference.events[op.revision]?.contains { !$0.isPut && $0.kv.key == k }
                                if there != true {
                                    lost.append((i, "delete of \(k) is not at revision \(op.revision) in the history"))
                                }
                                mark(op.revision, k)
                            }
                        case .get: break
                        }
                    }
                } else if op.unknown {
                    // Did it happen? A put of it in the history says so, and which branch ran.
                    var found: (rev: Int64, success: Bool)?
                    for (o, isSuccess) in success.map({ ($0, true) }) + failure.map({ ($0, false) }) {
                        if case .put(let k, let v, _) = o, let rev = putAt[k + "\u{1}" + v] {
                            found = (rev, isSuccess)
                            break
                        }
                    }
                    if let found {
                        applied[i] = found.rev
                        branch[i] = found.success
                        for o in found.success ? success : failure {
                            if case .get = o { continue }
                            mark(found.rev, o.key)
                        }
                    } else if success.allSatisfy({ if case .delete = $0 { true } else { false } }), !success.isEmpty {
                        for o in success { pendingDeletes.append((i, o.key, op.call, compares)) }
                    }
                }
            case .leaseRevoke:
                if op.succeeded { applied[i] = op.revision }
            default: break
            }
        }
        var byRevision: [Int64: [Int]] = [:]
        for (i, rev) in applied {
            if case .txn = history.operations[i].request { byRevision[rev, default: []].append(i) }
        }
        shared = byRevision.filter { $0.value.count > 1 }.map { ($0.key, $0.value.sorted()) }.sorted { $0.0 < $1.0 }
        // Client deletes with an unknown outcome take the first unexplained delete of their key
        // after they were sent (a key with a lease may have gone with its lease: left to it).
        var deletes: [(rev: Int64, key: String)] = []
        for (rev, evs) in reference.events {
            for e in evs where !e.isPut && !explained.contains("\(rev) \(e.kv.key)") { deletes.append((rev, e.kv.key)) }
        }
        deletes.sort { $0.rev < $1.rev }
        let answered = history.operations.filter(\.succeeded).sorted { $0.returned! < $1.returned! }
        var maxRevision: [Int64] = []
        for o in answered { maxRevision.append(max(maxRevision.last ?? 0, o.revision)) }
        func revision(before t: Int64) -> Int64 {
            var lo = 0, hi = answered.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if answered[mid].returned! < t { lo = mid + 1 } else { hi = mid }
            }
            return lo == 0 ? 0 : maxRevision[lo - 1]
        }
        var taken = Set<Int>()
        for d in pendingDeletes {
            let after = revision(before: d.call)
            if let j = deletes.indices.first(where: {
                guard !taken.contains($0) && deletes[$0].key == d.key && deletes[$0].rev > after else { return false }
                // Its compares held just before, and no lease could have taken the key instead.
                let before = deletes[$0].rev - 1
                return (reference.state(d.key, at: before)?.lease ?? 0) == 0
                    && d.compares.allSatisfy { $0.holds(on: reference.state($0.key, at: before)) }
            }) {
                taken.insert(j)
                applied[d.op] = deletes[j].rev
                branch[d.op] = true
            }
        }
        unattributedDeletes = deletes.indices.filter { !taken.contains($0) }.map { (deletes[$0].rev, deletes[$0].key) }
        for (rev, evs) in reference.events {
            for e in evs where e.isPut && !explained.contains("\(rev) \(e.kv.key)") { unattributedPuts.append(e) }
        }
    }
}
