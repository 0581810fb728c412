/// etcd's watch guarantees (its robustness `validate/watch.go`), each watch against the reference
/// history: ordered, unique, atomic, filtered, reliable (no gap), resumable, bookmarkable (no
/// event at or below a progress notification), prev_kv and is-create.
enum WatchValidator {
    static func validate(_ h: History, _ ref: Reference, into report: inout [Violation]) {
        // The collector must have delivered every revision (its watch covers every key).
        if !ref.missedByCollector.isEmpty {
            report.append(
                Violation(
                    validator: "watch.reliable",
                    message: "the watch of every key missed \(ref.missedByCollector.count) revision(s)",
                    window: ["revisions: \(ref.missedByCollector.prefix(20))"]
                        + ref.missedByCollector.prefix(3).map {
                            "\($0): \(ref.events[$0].map { "\($0)" } ?? "seen by no watch")"
                        }))
        }
        var counts: [String: Int] = [:]
        for w in h.watches {
            for v in check(w, ref) {
                counts[v.validator, default: 0] += 1
                if counts[v.validator]! <= 3 { report.append(v) }
            }
        }
        for (validator, n) in counts.sorted(by: { $0.key < $1.key }) where n > 3 {
            report.append(Violation(validator: validator, message: "\(n - 3) more like these", window: []))
        }
    }

    static func check(_ w: WatchRecord, _ ref: Reference) -> [Violation] {
        var out: [Violation] = []
        func fail(_ validator: String, _ message: String, _ lines: [String] = []) {
            out.append(
                Violation(
                    validator: "watch." + validator, message: "watch \(w.id) (\(describe(w))): " + message,
                    window: lines))
        }
        guard let first = w.responses.first else { return [] }
        if !first.created { fail("created", "the first response is not `created`") }
        if first.canceled || first.compactRevision != 0 {
            // Refused or compacted at once: nothing more to check than that it got no events.
            if w.responses.contains(where: { !$0.events.isEmpty }) { fail("reliable", "events after a refused create") }
            if first.compactRevision != 0 && w.startRevision >= first.compactRevision {
                fail(
                    "compacted",
                    "canceled as compacted at \(first.compactRevision) though it starts at \(w.startRevision)")
            }
            return out
        }
        let events = w.responses.flatMap(\.events)
        // Where it starts: its start revision, or for "now" the revision after its creation.
        let from = w.startRevision > 0 ? w.startRevision : first.headerRevision + 1

        // filter
        if let e = events.first(where: { !w.covers($0.kv.key) || (w.noPut && $0.isPut) || (w.noDelete && !$0.isPut) }) {
            fail("filter", "an event it did not ask for: \(e)")
        }
        // ordered, and nothing before its start
        var last: Int64 = 0
        for e in events {
            if e.revision < last { fail("ordered", "revision \(e.revision) after \(last)", ["\(e)"]) }
            last = max(last, e.revision)
        }
        if let e = events.first(where: { $0.revision < from }) {
            fail("reliable", "an event before the watch's start \(from): \(e)")
        }
        // unique
        var seen = Set<String>()
        for e in events where !seen.insert("\(e.revision) \(e.kv.key)").inserted {
            fail("unique", "\(e) delivered twice")
            break
        }
        // atomic: a revision's events in one response
        var revisionsSeen = Set<Int64>()
        for r in w.responses {
            let revs = Set(r.events.map(\.revision))
            if let split = revs.first(where: { revisionsSeen.contains($0) }) {
                fail("atomic", "revision \(split) split over two responses")
                break
            }
            revisionsSeen.formUnion(revs)
        }
        // bookmarkable: no event at or below a progress notification's revision; notifications
        // never go back, nor below an event already sent.
        var lastProgress: Int64 = 0, lastEvent: Int64 = 0
        for r in w.responses {
            for e in r.events where e.revision <= lastProgress {
                fail("bookmarkable", "\(e) after a progress notification at \(lastProgress)")
            }
            if let l = r.events.last { lastEvent = max(lastEvent, l.revision) }
            if r.isProgress {
                if r.headerRevision < lastProgress || r.headerRevision < lastEvent {
                    fail(
                        "bookmarkable",
                        "progress notification at \(r.headerRevision) after \(max(lastProgress, lastEvent))")
                }
                if r.headerRevision > ref.last {
                    fail("bookmarkable", "progress notification at \(r.headerRevision), past the history's \(ref.last)")
                }
                lastProgress = max(lastProgress, r.headerRevision)
            }
        }
        // reliable: between its start and the last revision it reported, exactly the history's
        // events in its range (values, order and is-create included).
        let through = min(max(lastEvent, lastProgress), ref.last)
        if through >= from {
            var want: [EventRecord] = []
            for rev in from...through { want += ref.events(at: rev, for: w) }
            let got = events.filter { $0.revision >= from }
            let upToLastEvent = want.filter { $0.revision <= lastEvent }
            if !same(want, got) && same(upToLastEvent, got) {
                // Everything up to its last event came; what is missing lies between that and a
                // progress notification, which should have followed it.
                let missing = want.filter { $0.revision > lastEvent }
                fail(
                    "reliable",
                    "\(missing.count) event(s) at or below its progress notification at \(lastProgress) never came",
                    missing.prefix(3).map(\.description))
            } else if !same(want, got) {
                let n = min(want.count, got.count)
                let firstDiff = (0..<n).first { !same([want[$0]], [got[$0]]) } ?? n
                let wanted: [String] = want[firstDiff...].prefix(3).map(\.description)
                let delivered: [String] = got[firstDiff...].prefix(3).map(\.description)
                let counts = "(\(want.count) events in the history, \(got.count) delivered)"
                fail(
                    "reliable", "its events from \(from) through \(through) differ from the history's",
                    [
                        "history: " + wanted.joined(separator: "; "), "watch:   " + delivered.joined(separator: "; "),
                        counts,
                    ])
            }
        }
        // resumable: a watch from a revision starts with the history's first event there.
        if w.startRevision > 0, let e = events.first {
            var firstWanted: EventRecord?
            var rev = w.startRevision
            while firstWanted == nil && rev <= min(e.revision, ref.last) {
                firstWanted = ref.events(at: rev, for: w).first
                rev += 1
            }
            if let f = firstWanted, !same([f], [e]) {
                fail("resumable", "first event \(e), the history's first from \(w.startRevision) is \(f)")
            }
        }
        // prev_kv and is-create against the history just before each event.
        for e in events {
            let before = ref.state(e.kv.key, at: e.revision - 1)
            if !e.isPut && before == nil {
                fail("isCreate", "\(e) deletes a key that did not exist")
            }
            if e.isPut && (e.kv.createRevision == e.kv.modRevision) != (before == nil) {
                fail(
                    "isCreate",
                    "\(e) is\(before == nil ? " not" : "") a create; before it: \(before.map(\.description) ?? "absent")"
                )
            }
            if w.prevKV, let p = e.prevKV, !KeySearch.same(p, before) {
                fail("prevKV", "\(e) has prev_kv \(p); the history has \(before.map(\.description) ?? "absent")")
            }
            if !w.prevKV && e.prevKV != nil { fail("prevKV", "\(e) has a prev_kv it did not ask for") }
        }
        return out
    }

    /// Events equal as etcd's validator compares them: type, key, value, revisions, version.
    static func same(_ a: [EventRecord], _ b: [EventRecord]) -> Bool {
        a.count == b.count
            && zip(a, b).allSatisfy { x, y in
                x.isPut == y.isPut && x.kv.key == y.kv.key && x.revision == y.revision
                    && (!x.isPut || KeySearch.same(x.kv, y.kv))
            }
    }

    static func describe(_ w: WatchRecord) -> String {
        var s = w.end.isEmpty ? "key \(w.key)" : "[\(w.key.debugDescription), \(w.end.debugDescription))"
        s += " from \(w.startRevision)"
        if w.prevKV { s += " prev_kv" }
        if w.progressNotify { s += " progress_notify" }
        if w.noPut { s += " noput" }
        if w.noDelete { s += " nodelete" }
        if w.fragment { s += " fragment" }
        return s
    }
}
