import Auth
import EtcdAPI
import MVCC
import VigilCore
import WatchHub

/// etcd's services over an in-memory store, without a loop, a backend or a socket: every write is
/// "durable" at once (or, with `manualCommits`, when the test says), time is a `ManualClock`,
/// password hashes are cheap. For testing what sits above the store (handlers, the gateway's
/// mapping) on its own.
public final class InMemoryServices {
    public let store = KVStore()
    public let clock = ManualClock()
    public let services: EtcdServices
    private let commits: any CommitGate
    private let backend: NoBackend

    /// - Parameter manualCommits: writes become durable only through `commit(through:)`, as group
    ///   commits in flight would make them, one after the other (answers wait until then).
    public init(
        watch: WatchHubConfig = WatchHubConfig(), auth: AuthConfig = AuthConfig(), manualCommits: Bool = false
    ) {
        commits = manualCommits ? ManualCommits(store: store) : ImmediateCommits(store: store)
        backend = NoBackend(store: store)
        services = EtcdServices(
            ServerDependencies(
                store: store,
                identity: MemberIdentity(
                    clusterID: 0xcdf8_1819_4e3a_8c32, memberID: 0x8e9e_05c5_2164_694d, name: "default",
                    peerURLs: ["http://localhost:2380"], clientURLs: ["http://localhost:2379"]),
                commits: commits, backend: backend, clock: clock, wallClockMilliseconds: 1_700_000_000_000,
                offload: { work, done in
                    work()
                    done()
                }, hasher: CheapHasher(), watch: watch, auth: auth))
    }

    /// Makes everything written so far durable (the store's observers then deliver it).
    public func commit() { commit(through: store.currentRevision) }

    /// Makes the revisions up to `revision` durable: the store's observers hear of them, then the
    /// answers waiting for them go out (the server's order).
    public func commit(through revision: Int64) {
        switch commits {
        case let m as ManualCommits: m.commit(through: revision)
        case let i as ImmediateCommits: i.flush()
        default: break
        }
    }
}

/// A commit gate whose writes become durable only when the test says so.
final class ManualCommits: CommitGate {
    private let store: KVStore
    private var waiting: [(revision: Int64, body: () -> Void)] = []
    init(store: KVStore) { self.store = store }

    func commit(through revision: Int64) {
        if revision >= store.currentRevision { _ = store.takeBatch() }
        store.markCommitted(min(revision, store.currentRevision))
        let committed = store.committedRevision
        let due = waiting.filter { $0.revision <= committed }
        waiting.removeAll { $0.revision <= committed }
        for w in due { w.body() }
    }

    func whenDurable(_ revision: Int64, _ body: @escaping () -> Void) {
        if revision <= store.committedRevision { body() } else { waiting.append((revision, body)) }
    }

    func whenFlushed(_ body: @escaping () -> Void) { whenDurable(store.currentRevision, body) }
}

/// A commit gate that makes writes durable when asked, or at once when an answer waits for them.
final class ImmediateCommits: CommitGate {
    private let store: KVStore
    init(store: KVStore) { self.store = store }

    func flush() {
        _ = store.takeBatch()
        store.markCommitted(store.currentRevision)
    }

    func whenDurable(_ revision: Int64, _ body: @escaping () -> Void) {
        flush()
        body()
    }

    func whenFlushed(_ body: @escaping () -> Void) {
        flush()
        body()
    }
}

/// No backend: sizes are zero and the copies are not capable; HashKV hashes the store's memory.
final class NoBackend: MaintenanceBackend {
    private let store: KVStore
    init(store: KVStore) { self.store = store }
    func hashKV(upTo revision: Int64, _ done: @escaping (Result<UInt32, any Error>) -> Void) {
        do { done(.success(try store.hashKV(revision: revision))) } catch { done(.failure(error)) }
    }
    var dbSize: Int64 { 0 }
    var dbSizeInUse: Int64 { 0 }
    func defragment(_ done: @escaping ((any Error)?) -> Void) { done(EtcdError.notCapable) }
    func hash(_ done: @escaping (Result<UInt32, any Error>) -> Void) { done(.failure(EtcdError.notCapable)) }
    func snapshot(_ done: @escaping (Result<String, any Error>) -> Void) { done(.failure(EtcdError.notCapable)) }
}

/// A cheap, deterministic stand-in for bcrypt (tests only).
public struct CheapHasher: PasswordHasher {
    public init() {}
    public func hash(_ password: String, cost: Int) throws -> String {
        if password.utf8.count > 72 { throw EtcdError.passwordUnusable }
        return "cheap:" + password
    }
    public func verify(_ password: String, hash: String) -> Bool { hash == "cheap:" + password }
}
