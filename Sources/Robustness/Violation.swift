/// A guarantee a run broke: which validator found it, what, and the smallest part of the history
/// that shows it.
public struct Violation: Codable, Sendable, CustomStringConvertible {
    public var validator: String
    public var message: String
    public var window: [String]
    /// A known bug of the server under test that explains it (etcd's, on the etcd target).
    public var known: String?
    public init(validator: String, message: String, window: [String]) {
        self.validator = validator
        self.message = message
        self.window = window
    }
    public var description: String {
        let head = " [\(validator)] \(message)" + (known.map { "\n    known: \($0)" } ?? "")
        return ([head] + window.map { "    " + $0 }).joined(separator: "\n")
    }
}

/// etcd bugs the validators find in Debian's etcd 3.4.23, named so that a run against it says
/// which known bug it met (the validators stay as strict as for Vigil).
enum KnownEtcdIssues {
    static func annotate(_ v: inout [Violation]) {
        for i in v.indices {
            let m = v[i].message
            let bookmark = v[i].validator == "watch.bookmarkable"
            let ahead =
                (bookmark && m.contains("progress notification at") && m.contains(" after "))
                || (v[i].validator == "watch.reliable" && m.contains("at or below its progress notification"))
            if ahead {
                v[i].known =
                    "etcd issue 15220: a requested progress notification is sent while the stream still has events below it to send (fixed in etcd 3.4.25 and 3.5.8)"
            } else if bookmark && m.contains("more like these") {
                v[i].known = "as above"
            }
        }
    }
}
