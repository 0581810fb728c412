/// Leases: no key outlives its lease by more than a bound. A lease ends at the latest at its last
/// renewal (or grant, or a restart of the server, which gives every lease its TTL again, as
/// etcd's leader change does) plus its TTL; pauses of the server push that out by their length.
/// A read sent after that plus the bound must not see the key.
enum LeaseValidator {
    /// How late an expiry may be: etcd checks every 500 ms and adds its election timeout (1 s)
    /// after a restart.
    static let boundNanos: Int64 = 2_000_000_000

    /// - Parameter bound: how late an expiry may be (etcd: its leader's promotion after a restart
    ///   or election adds up to a second more than Vigil's).
    static func validate(
        _ h: History, _ ref: Reference, bound boundNanos: Int64 = boundNanos, into report: inout [Violation]
    ) {
        var leaseOfKey: [String: LeaseRecord] = [:]
        for l in h.leases { for k in l.keys { leaseOfKey[k] = l } }
        let pauses = h.faults.filter { $0.kind == "pause" }
        func deadline(_ l: LeaseRecord, before t: Int64) -> Int64 {
            var start = l.granted
            for r in l.renewals where r.time < t && r.ttl > 0 { start = max(start, r.time) }
            // A restart is recorded once its readiness is seen, up to a few hundred ms after the
            // server started answering.
            for r in h.restarts where r < t + 500_000_000 { start = max(start, r) }
            var end = start + min(max(l.ttl, 0), 1_000_000) * 1_000_000_000
            for p in pauses where p.end > start && p.start < end + boundNanos { end += p.end - max(p.start, start) }
            return end + boundNanos
        }
        var found = 0
        for op in h.operations where op.succeeded {
            guard case .range(_, _, 0, _) = op.request, case .range(let kvs, _, _)? = op.response else { continue }
            for kv in kvs where kv.lease != 0 {
                guard let l = leaseOfKey[kv.key], l.id == kv.lease else { continue }
                // A restart before its answer gave the lease its TTL again (the server was down: nothing
                // expired meanwhile).
                let due = deadline(l, before: op.returned!)
                if op.call > due {
                    found += 1
                    if found <= 3 {
                        report.append(
                            Violation(
                                validator: "lease",
                                message:
                                    "\(kv.key) outlived lease \(l.id) (TTL \(l.ttl) s) by \((op.call - due + boundNanos) / 1_000_000) ms",
                                window: [
                                    "granted at 0 ms, renewed at \(l.renewals.map { ($0.time - l.granted) / 1_000_000 }) ms",
                                    "read at \((op.call - l.granted) / 1_000_000) ms: \(kv)",
                                ]))
                    }
                }
            }
        }
        // At the end, no key of a lease long over is left.
        for kv in h.finalState where kv.lease != 0 {
            guard let l = leaseOfKey[kv.key], l.id == kv.lease, h.finalTime > deadline(l, before: h.finalTime)
            else { continue }
            report.append(
                Violation(
                    validator: "lease",
                    message: "\(kv.key) of lease \(l.id) (TTL \(l.ttl) s) is still there at the end",
                    window: [
                        "renewed \(l.renewals.count) times, last at \(((l.renewals.last?.time ?? l.granted) - l.granted) / 1_000_000) ms"
                    ]))
        }
    }
}
