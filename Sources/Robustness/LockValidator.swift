/// Locks and elections against the history of their keys: each acquisition is the only holder of
/// its key's lifetime (two callers never hold the same one), a Lock is answered while its key is
/// the oldest under the name, a campaign leads by the time it is answered, every leader reported
/// is the key with the lowest create revision, and an Observe misses no value its leader put.
enum LockValidator {
    /// One key's life under a lock or election name: created, and deleted (or still there).
    struct Lifetime {
        var key: String
        var created: Int64
        var deleted: Int64 = .max
        /// From when it holds the lock (leads): once every older key is gone.
        var since: Int64 = 0
    }

    static func lifetimes(under prefix: String, _ ref: Reference) -> [Lifetime] {
        var out: [Lifetime] = []
        for key in ref.keys where key.hasPrefix(prefix) {
            var open: Int?
            for (rev, kv) in ref.history(of: key) {
                if let kv {
                    if open == nil {
                        out.append(Lifetime(key: key, created: kv.createRevision))
                        open = out.count - 1
                    }
                } else if let o = open {
                    out[o].deleted = rev
                    open = nil
                }
            }
        }
        out.sort { $0.created < $1.created }
        // It leads once every older key is gone.
        var older: Int64 = 0
        for i in out.indices {
            out[i].since = max(out[i].created, older)
            older = max(older, out[i].deleted)
        }
        return out
    }

    static func validate(_ h: History, _ ref: Reference, into report: inout [Violation]) {
        // Bounds on the server's revision at a moment, from the requests around it: at least the
        // revision of any answered before, at most that of any sent after.
        let answered = h.operations.filter(\.succeeded)
        let byReturn = answered.sorted { $0.returned! < $1.returned! }
        var maxUpTo: [Int64] = []
        for o in byReturn { maxUpTo.append(max(maxUpTo.last ?? 0, o.revision)) }
        let byCall = answered.sorted { $0.call < $1.call }
        var minFrom = [Int64](repeating: .max, count: byCall.count + 1)
        for i in stride(from: byCall.count - 1, through: 0, by: -1) {
            minFrom[i] = min(minFrom[i + 1], byCall[i].revision)
        }
        func firstIndex(_ n: Int, _ after: (Int) -> Bool) -> Int {
            var lo = 0, hi = n
            while lo < hi {
                let mid = (lo + hi) / 2
                if after(mid) { hi = mid } else { lo = mid + 1 }
            }
            return lo
        }
        func lowerBound(_ t: Int64) -> Int64 {
            let n = firstIndex(byReturn.count) { byReturn[$0].returned! >= t }
            return n == 0 ? 0 : maxUpTo[n - 1]
        }
        func upperBound(_ t: Int64) -> Int64 { minFrom[firstIndex(byCall.count) { byCall[$0].call > t }] }

        func fail(_ validator: String, _ message: String, _ window: [String]) {
            report.append(Violation(validator: validator, message: message, window: window))
        }
        for kind in [LockRecord.Kind.lock, .campaign] {
            let records = h.locks.filter { $0.kind == kind && $0.acquired }
            guard let name = records.first?.name else { continue }
            let lives = lifetimes(under: name + "/", ref)
            var owner: [String: Int] = [:]  // lifetime → the record that holds it
            // The same lease asked for twice is one session (etcd answers its Campaign again
            // with the key it holds); two sessions holding one key's lifetime is what must not be.
            for (i, r) in records.enumerated() {
                let key = r.key!
                // The lifetime it holds: for a Lock the one alive at its header revision; for a
                // campaign the one created at its leader revision.
                let life =
                    kind == .lock
                    ? lives.first { $0.key == key && $0.created <= r.headerRevision && r.headerRevision < $0.deleted }
                    : lives.first { $0.key == key && $0.created == r.leaderRevision }
                guard let life else {
                    fail(
                        "lock.safety",
                        "\(kind) answered \(key) at revision \(r.headerRevision), a key that did not exist then",
                        [describe(r)])
                    continue
                }
                let id = "\(life.key)@\(life.created)"
                if let other = owner[id], r.lease == 0 || records[other].lease != r.lease {
                    fail(
                        "lock.safety", "two callers hold \(key) (created at \(life.created)) at once",
                        [describe(records[other]), describe(r)])
                }
                owner[id] = i
                let since = life.since
                if kind == .lock {
                    if since > r.headerRevision {
                        fail(
                            "lock.safety",
                            "Lock answered at revision \(r.headerRevision) while an older key held it until \(since)",
                            [describe(r)]
                                + lives.filter { $0.created < life.created && $0.deleted > r.headerRevision }.prefix(2)
                                .map {
                                    "older: \($0.key) created \($0.created), deleted \($0.deleted == .max ? "never" : "\($0.deleted)")"
                                })
                    }
                } else {
                    let latest = upperBound(r.returned!)
                    if since > latest {
                        fail(
                            "election.safety",
                            "Campaign answered by revision \(latest) but its key leads only from \(since == .max ? "never" : "\(since)")",
                            [describe(r)])
                    }
                    if life.deleted <= lowerBound(r.call) {
                        fail("election.safety", "Campaign answered with a key gone before it was asked", [describe(r)])
                    }
                }
            }
        }
        leaders(h, ref, fail)
        // Liveness: a waiter is answered when the lock is freed, not at its deadline. A hand-over
        // (an Unlock answered while the next holder waited) must take under a second, unless a
        // fault was under way.
        let locks = h.locks.filter { $0.kind == .lock && $0.acquired }.sorted { $0.returned! < $1.returned! }
        for (prev, next) in zip(locks, locks.dropFirst()) {
            guard let release = prev.releaseCall, let released = prev.releaseReturned, next.call < release else {
                continue
            }
            let took = next.returned! - released
            let faulty = h.faults.contains {
                $0.start - 1_000_000_000 < next.returned! && $0.end + 2_000_000_000 > released
            }
            if took > 1_000_000_000 && !faulty {
                fail(
                    "lock.liveness", "a waiter was answered \(took / 1_000_000) ms after the lock was freed",
                    [describe(prev), describe(next)])
            }
        }
    }

    /// Every leader reported is the oldest key at the report's revision, with its value there;
    /// an Observe stream reports every value its leader puts while it leads.
    static func leaders(_ h: History, _ ref: Reference, _ fail: (String, String, [String]) -> Void) {
        let lives = lifetimes(under: CampaignClient.name + "/", ref)
        for r in h.leaders {
            guard let kv = r.kv, r.headerRevision <= ref.last else { continue }
            let what = r.stream == nil ? "Leader" : "Observe"
            guard let life = lives.first(where: { $0.key == kv.key && $0.created == kv.createRevision }) else {
                fail("election.leader", "\(what) reported \(kv), a key the history never had", [])
                continue
            }
            // The value it reports holds from its put until the next put or the key's end; the key
            // leads from `since`: both at once, by the report's revision.
            let nextPut = ref.history(of: kv.key).first { $0.revision > kv.modRevision }?.revision ?? .max
            let from = max(life.since, kv.modRevision)
            // A Leader call reads at its header revision: the key leads there, with that value.
            let at = r.stream == nil ? r.headerRevision : from
            if from > r.headerRevision || at >= min(life.deleted, nextPut) || at < from {
                fail(
                    "election.leader",
                    "\(what) reported \(kv) at revision \(r.headerRevision); that key leads from \(life.since) to \(life.deleted == .max ? "the end" : "\(life.deleted)"), with that value until \(nextPut == .max ? "the end" : "\(nextPut)")",
                    [])
            }
        }
        // No value missed: within one stream, once it reported a leader key, every put to that
        // key until the key goes (or the stream ends) is reported, in order.
        let streams = Dictionary(grouping: h.leaders.filter { $0.stream != nil }, by: { $0.stream! })
        for (_, reports) in streams {
            var i = 0
            while i < reports.count {
                guard let kv = reports[i].kv else {
                    i += 1
                    continue
                }
                // This leader's tenure in the stream: the reports of its key that follow.
                var j = i
                while j + 1 < reports.count, reports[j + 1].kv?.key == kv.key,
                    reports[j + 1].kv?.createRevision == kv.createRevision
                {
                    j += 1
                }
                let end = j + 1 < reports.count ? reports[j + 1].headerRevision : reports[j].kv!.modRevision
                let wanted = ref.history(of: kv.key).filter { $0.revision > kv.modRevision && $0.revision <= end }
                    .prefix { $0.kv != nil }.compactMap(\.kv)
                let got = reports[(i + 1)..<(j + 1)].compactMap(\.kv)
                if !(wanted.count == got.count && zip(wanted, got).allSatisfy { KeySearch.same($0, $1) }) {
                    fail(
                        "election.observe",
                        "Observe of \(kv.key) reported \(got.map(\.value)), the leader put \(wanted.map(\.value))", [])
                }
                i = j + 1
            }
        }
    }

    static func describe(_ r: LockRecord) -> String {
        var s = "\(r.kind) client \(r.client) lease \(r.lease): key \(r.key ?? "-") at revision \(r.headerRevision)"
        if r.kind == .campaign { s += " (leader rev \(r.leaderRevision), lease \(r.leaderLease))" }
        if let rel = r.releaseRevision as Int64?, rel > 0 { s += ", released at \(rel)" }
        return s
    }
}
