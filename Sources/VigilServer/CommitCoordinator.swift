import Dispatch
import EtcdAPI
import EventLoop
import LMDBBackend
import Logging
import MVCC

/// Group commit: writes made during a loop turn are handed to the backend as one batch at the end
/// of the turn, on libuv's thread pool; their responses go out only after the batch is fsynced,
/// and the store hears which revisions are durable (its observers — the watch hub — deliver them).
/// One commit is in flight at a time; batches formed meanwhile wait and go next, together.
///
/// Group commits go to the backend's write-ahead log; its checkpoints (logged batches moved into
/// LMDB, one transaction for many) run beside them on the pool, when the log holds
/// `checkpointBytes` or has held anything for a second, and after each one the store drops the
/// values LMDB now holds. Commits wait while a checkpoint is behind by `checkpointBytes * 8`.
///
/// Durability is all it does: nothing here knows about watchers.
final class CommitCoordinator: CommitGate {
    private let loop: EventLoop
    private let store: KVStore
    private let backend: LMDBBackend
    private let logger: Logger
    private var inFlight = false
    private var checkpointInFlight = false
    private var backgroundReads = 0
    static let checkpointBytes = 16 << 20
    /// Records (written or removed) that start a checkpoint: small values make many records per
    /// byte of log, each with its own memory, and a checkpoint's release of their values is one
    /// loop step.
    static let checkpointRecords = 32_768
    /// Checkpoints done and the bytes of log they moved (metrics).
    private(set) var checkpoints = 0
    private(set) var checkpointSeconds = Histogram(bounds: Histogram.diskBounds)
    /// Called when the backend's disk space verdict changes (the NOSPACE alarm): the reason, or nil
    /// when space is back.
    var onSpaceFailure: ((String?) -> Void)?
    private var lastSpaceFailure: String?
    /// Callbacks waiting for a revision, in non-decreasing revision order.
    private var waiters: [(rev: Int64, body: () -> Void)] = []
    private var waiterHead = 0
    /// Number of group commits done (for metrics and tests).
    private(set) var commits = 0
    /// How long each group commit took on the thread pool (LMDB's write and its fsync): etcd's
    /// `etcd_disk_backend_commit_duration_seconds` and, having no WAL apart from it,
    /// `etcd_disk_wal_fsync_duration_seconds`.
    private(set) var commitSeconds = Histogram(bounds: Histogram.diskBounds)

    init(loop: EventLoop, store: KVStore, backend: LMDBBackend, logger: Logger) {
        self.loop = loop
        self.store = store
        self.backend = backend
        self.logger = logger
        loop.addBeforeSleep { [unowned self] in self.startCommitIfNeeded() }
    }

    /// Starts a checkpoint if the log holds enough (or `force` and it holds anything), none is in
    /// flight and no exclusive work waits. The background timer forces one each second.
    func checkpointIfNeeded(force: Bool = false) {
        guard !checkpointInFlight, exclusiveWork.isEmpty else { return }
        let pending = backend.unflushedBytes
        let full = pending >= Self.checkpointBytes || backend.unflushedRecords >= Self.checkpointRecords
        guard full || (force && (pending > 0 || backend.logSpaceFailure != nil)) else { return }
        checkpointInFlight = true
        let backend = self.backend
        let failure = Handoff<(any Error)?>(nil)
        let seconds = Handoff<Double>(0)
        ThreadPool.submit(
            on: loop,
            work: {
                let t0 = DispatchTime.now().uptimeNanoseconds
                do { try backend.checkpoint() } catch { failure.value = error }
                seconds.value = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            },
            done: { [unowned self] in
                checkpointInFlight = false
                checkpointSeconds.observe(seconds.value)
                if let error = failure.value {
                    // The batches stay in the log and in memory; nothing acknowledged is lost.
                    logger.error("checkpoint to LMDB failed; retrying", metadata: ["error": "\(error)"])
                } else {
                    checkpoints += 1
                }
                afterBackendWork(spaceError: failure.value.map { "\($0)" })
                startCommitIfNeeded()
            })
    }

    /// Waiters for a log sequence number to be in LMDB.
    private var checkpointWaiters: [(sequence: UInt64, body: () -> Void)] = []

    func whenCheckpointed(_ body: @escaping () -> Void) {
        whenFlushed { [unowned self] in
            checkpointWaiters.append((backend.logSequences.logged, body))
            releaseCheckpointWaiters()
        }
    }

    private func releaseCheckpointWaiters() {
        guard !checkpointWaiters.isEmpty else { return }
        let done = backend.logSequences.checkpointed
        let ready = checkpointWaiters.filter { $0.sequence <= done }
        checkpointWaiters.removeAll { $0.sequence <= done }
        for w in ready { w.body() }
        if !checkpointWaiters.isEmpty { checkpointIfNeeded(force: true) }
    }

    /// After pool work that may have moved batches into LMDB: the store drops those values, and
    /// the disk-space verdict goes to the alarm.
    private func afterBackendWork(spaceError: String? = nil) {
        store.releaseValues(through: backend.checkpointedRevision)
        let verdict = spaceError ?? backend.logSpaceFailure
        if verdict != lastSpaceFailure {
            lastSpaceFailure = verdict
            onSpaceFailure?(verdict)
        }
        if spaceError == nil { releaseCheckpointWaiters() }
    }

    /// Runs `work` (a read of LMDB that may checkpoint first, such as HashKV) on the pool beside
    /// commits; exclusive work waits for it.
    func backgroundRead(_ work: @escaping @Sendable () -> Void, done: @escaping () -> Void) {
        backgroundReads += 1
        ThreadPool.submit(
            on: loop, work: work,
            done: { [unowned self] in
                backgroundReads -= 1
                afterBackendWork()
                done()
                startCommitIfNeeded()
            })
    }

    func whenDurable(_ revision: Int64, _ body: @escaping () -> Void) {
        loop.assertInLoop()
        // Earlier waiters go first, so replies leave in the order their writes were made.
        if revision <= store.committedRevision && waiterHead == waiters.count {
            body()
        } else {
            waiters.append((revision, body))
        }
    }

    /// Group commits handed to the backend, and finished.
    private var batchesTaken = 0
    private var batchesDone = 0
    private var flushWaiters: [(batch: Int, body: () -> Void)] = []

    func whenFlushed(_ body: @escaping () -> Void) {
        loop.assertInLoop()
        let target = store.hasPending ? batchesTaken + 1 : batchesTaken
        if target <= batchesDone && flushWaiters.isEmpty {
            body()
        } else {
            flushWaiters.append((target, body))
        }
    }

    private var exclusiveWork: [(work: @Sendable () -> Void, done: () -> Void)] = []

    /// Runs `work` on the thread pool when no group commit is in flight (and none starts until it
    /// is done), then `done` on the loop: defragment and snapshot copies see a quiet backend.
    func exclusive(_ work: @escaping @Sendable () -> Void, done: @escaping () -> Void) {
        exclusiveWork.append((work, done))
        startCommitIfNeeded()
    }

    /// Starts a group commit of what is pending now, if none is in flight (at shutdown: the loop's
    /// end-of-turn hooks no longer run, and unanswered writes such as lease expiries still go to
    /// disk while the loop drains).
    func flushPending() { startCommitIfNeeded() }

    private func startCommitIfNeeded() {
        guard !inFlight else { return }
        if !exclusiveWork.isEmpty {
            guard !checkpointInFlight && backgroundReads == 0 else { return }
            let job = exclusiveWork.removeFirst()
            inFlight = true
            ThreadPool.submit(
                on: loop, work: job.work,
                done: { [unowned self] in
                    inFlight = false
                    job.done()
                    afterBackendWork()
                    startCommitIfNeeded()
                })
            return
        }
        // Back-pressure: the log may run ahead of LMDB by a bounded amount only.
        if checkpointInFlight
            && (backend.unflushedBytes >= Self.checkpointBytes * 8
                || backend.unflushedRecords >= Self.checkpointRecords * 8)
        {
            return
        }
        guard let batch = store.takeBatch() else { return }
        inFlight = true
        batchesTaken += 1
        let backend = self.backend
        let failure = Handoff<(any Error)?>(nil)
        let seconds = Handoff<Double>(0)
        let started = loop.nowMilliseconds
        ThreadPool.submit(
            on: loop,
            work: {
                let t0 = DispatchTime.now().uptimeNanoseconds
                do { try backend.commit(batch) } catch { failure.value = error }
                seconds.value = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            },
            done: { [unowned self] in
                inFlight = false
                if let failure = failure.value {
                    // Acknowledged data must never be lost: stop rather than answer from memory.
                    logger.critical("backend commit failed, stopping: \(failure)")
                    fatalError("backend commit failed: \(failure)")
                }
                commits += 1
                commitSeconds.observe(seconds.value)
                let took = loop.nowMilliseconds - started
                if took > 1000 { logger.warning("slow fsync", metadata: ["took_ms": "\(took)"]) }
                batchesDone += 1
                // The next batch (what was written while this one was on disk) goes first, so
                // that the disk writes it while the loop answers this one's writers.
                startCommitIfNeeded()
                store.markCommitted(batch.revision)  // the store's observers deliver these revisions
                releaseWaiters()
                let ready = flushWaiters.prefix { $0.batch <= batchesDone }
                if !ready.isEmpty {
                    flushWaiters.removeFirst(ready.count)
                    for w in ready { w.body() }
                }
                checkpointIfNeeded()
                startCommitIfNeeded()
            })
    }

    private func releaseWaiters() {
        let committed = store.committedRevision
        while waiterHead < waiters.count, waiters[waiterHead].rev <= committed {
            let body = waiters[waiterHead].body
            waiterHead += 1
            body()
        }
        if waiterHead == waiters.count {
            waiters.removeAll(keepingCapacity: true)
            waiterHead = 0
        } else if waiterHead > 4096 {
            waiters.removeFirst(waiterHead)
            waiterHead = 0
        }
    }
}

/// A value handed from a worker thread back to the loop: written by the work, read by its
/// completion, which the thread pool runs after the work has returned (libuv orders the two).
final class Handoff<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}
