/// Nothing acknowledged is lost: every acknowledged write is in the history at its revision
/// (checked while attributing), and the state read at the end equals the history replayed.
enum DurabilityValidator {
    static func validate(_ h: History, _ ref: Reference, into report: inout [Violation]) {
        guard h.finalRevision > 0 else {
            report.append(Violation(validator: "durability", message: "the final read never succeeded", window: []))
            return
        }
        let want = ref.keys.compactMap { ref.state($0, at: h.finalRevision) }
        let got = h.finalState.sorted { $0.key < $1.key }
        let wantByKey = Dictionary(want.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a })
        let gotByKey = Dictionary(got.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a })
        var diffs: [String] = []
        if gotByKey.count != got.count { diffs.append("the final read returned a key twice") }
        for k in Set(wantByKey.keys).union(gotByKey.keys).sorted() where !KeySearch.same(wantByKey[k], gotByKey[k]) {
            diffs.append(
                "\(k): read \(gotByKey[k].map(\.description) ?? "absent"), history \(wantByKey[k].map(\.description) ?? "absent")"
            )
        }
        if !diffs.isEmpty {
            report.append(
                Violation(
                    validator: "durability",
                    message:
                        "the state at revision \(h.finalRevision) differs from the history in \(diffs.count) key(s)",
                    window: Array(diffs.prefix(5))))
        }
        if !ref.unknown.isEmpty {
            report.append(
                Violation(
                    validator: "durability", message: "\(ref.unknown.count) revision(s) that no watch delivered",
                    window: ["\(ref.unknown.prefix(10))"]))
        }
    }
}
