import MVCC
import VigilCore

/// Tells the Lock and Election recipes of the writes under their prefixes, once those writes are
/// durable: a waiting Lock or Campaign looks again at the revision that may have freed it, an
/// Observe gets every change in revision order.
///
/// Each watched prefix (`name/`) is one group holding the events written under it that are not
/// yet durable. A group made while writes are in flight first takes those from the store's
/// history, so a listener hears of every revision after the committed one it started from,
/// however many group commits are in flight and in whatever order it joined.
final class Recipes: StoreObserver {
    /// etcd's `defaultSessionTTL`: a Lock or Campaign with lease 0 runs in a session of its own,
    /// a lease of this many seconds that nothing renews.
    static let sessionTTL: Int64 = 60

    private unowned let services: EtcdServices
    var store: KVStore { services.context.store }
    private var groups: [[UInt8]: Group] = [:]
    /// Groups holding events not yet durable.
    private var dirty: [Group] = []

    init(services: EtcdServices) {
        self.services = services
        services.context.store.addObserver(self)
    }

    /// Someone who hears of the durable writes under a prefix.
    final class Listener {
        let prefix: [UInt8]
        /// Gets the revision now durable and the events under the prefix up to it that it had
        /// not heard of, in revision order (possibly none: a look again is then still due).
        let heard: (_ committed: Int64, _ events: [(revision: Int64, event: Event)]) -> Void
        init(prefix: [UInt8], heard: @escaping (Int64, [(revision: Int64, event: Event)]) -> Void) {
            self.prefix = prefix
            self.heard = heard
        }
    }

    private final class Group {
        let prefix: [UInt8]
        var pending: [(revision: Int64, event: Event)] = []
        var listeners: [ObjectIdentifier: Listener] = [:]
        var queued = false
        init(prefix: [UInt8]) { self.prefix = prefix }
    }

    func add(_ l: Listener) {
        if let g = groups[l.prefix] {
            g.listeners[ObjectIdentifier(l)] = l
            return
        }
        let g = Group(prefix: l.prefix)
        g.listeners[ObjectIdentifier(l)] = l
        groups[l.prefix] = g
        // Writes made before the group existed and not durable yet: from the store's history.
        if store.currentRevision > store.committedRevision {
            g.pending = store.events(
                l.prefix, KeyRange.prefixEnd(l.prefix), from: store.committedRevision + 1, to: store.currentRevision,
                prevValues: false
            ).map { ($0.0.main, $0.1) }
            if !g.pending.isEmpty { queue(g) }
        }
    }

    func remove(_ l: Listener) {
        guard let g = groups[l.prefix] else { return }
        g.listeners[ObjectIdentifier(l)] = nil
        if g.listeners.isEmpty { groups[l.prefix] = nil }
    }

    private func queue(_ g: Group) {
        guard !g.queued else { return }
        g.queued = true
        dirty.append(g)
    }

    func store(_ store: KVStore, wrote events: [Event], at revision: Int64) {
        guard !groups.isEmpty else { return }
        for e in events {
            // The groups a key belongs to end in "/": look each such beginning of the key up.
            let key = e.kv.key
            for i in key.indices where key[i] == UInt8(ascii: "/") {
                guard let g = groups[Array(key[...i])] else { continue }
                g.pending.append((revision, e))
                queue(g)
            }
        }
    }

    func store(_ store: KVStore, committedThrough revision: Int64) {
        guard !dirty.isEmpty else { return }
        let due = dirty
        dirty = []
        for g in due {
            g.queued = false
            let n = g.pending.firstIndex { $0.revision > revision } ?? g.pending.count
            let heard = Array(g.pending[..<n])
            g.pending.removeFirst(n)
            if !g.pending.isEmpty { queue(g) }
            guard !heard.isEmpty else { continue }
            for l in Array(g.listeners.values) where groups[g.prefix] === g && g.listeners[ObjectIdentifier(l)] != nil {
                l.heard(revision, heard)
            }
        }
    }

    /// The keys under `prefix` at `revision` (0: the committed one), values left unread.
    func keys(under prefix: [UInt8], at revision: Int64 = 0) -> [KeyValue] {
        (try? store.range(prefix, KeyRange.prefixEnd(prefix), revision: revision, keysOnly: true))?.kvs ?? []
    }

    /// The key under `prefix` with the lowest create revision at `revision`, with its value: the
    /// lock's holder, the election's leader.
    func oldest(under prefix: [UInt8], at revision: Int64) -> KeyValue? {
        guard let first = keys(under: prefix, at: revision).min(by: { $0.createRevision < $1.createRevision }) else {
            return nil
        }
        return (try? store.range(first.key, [], revision: revision))?.kvs.first
    }

    /// etcd's queue key: `<name>/<lease in hex>`.
    static func queueKey(_ prefix: [UInt8], _ lease: Int64) -> [UInt8] {
        prefix + Array(String(UInt64(bitPattern: lease), radix: 16).utf8)
    }
}
