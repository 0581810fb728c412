/// Told about every change a store makes, in revision order: the store is *watchable*, as etcd's
/// `watchableStore` wraps its `store`. The end of a write transaction is the one place changes
/// leave the store — whoever wrote them (a client's put, a lease revocation, a txn) — so a new
/// kind of writer cannot forget to tell the watchers.
///
/// Observers run on the store's thread, inside the call that made the change; they must not
/// write to the store themselves.
public protocol StoreObserver: AnyObject {
    /// A write transaction ended with changes: `events` make revision `revision` (not durable yet).
    func store(_ store: KVStore, wrote events: [Event], at revision: Int64)
    /// Every revision up to `revision` is durable now (the commit coordinator said so).
    func store(_ store: KVStore, committedThrough revision: Int64)
    /// Reads below `revision` fail from now on; the history below it is removed in later steps.
    func store(_ store: KVStore, compactedAt revision: Int64)
}

extension StoreObserver {
    public func store(_ store: KVStore, committedThrough revision: Int64) {}
    public func store(_ store: KVStore, compactedAt revision: Int64) {}
}

/// A store's observers, held weakly (an observer such as the watch hub holds its store).
struct Observers {
    private struct Entry {
        weak var observer: (any StoreObserver)?
    }
    private var entries: [Entry] = []

    mutating func add(_ o: any StoreObserver) {
        entries.removeAll { $0.observer == nil }
        entries.append(Entry(observer: o))
    }

    mutating func remove(_ o: any StoreObserver) { entries.removeAll { $0.observer == nil || $0.observer === o } }

    func forEach(_ body: (any StoreObserver) -> Void) {
        for e in entries { if let o = e.observer { body(o) } }
    }
}
