import Foundation

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
