import EventLoop
import Logging

/// The server's work that no request starts, each on the loop and never holding it for long:
/// - removal of compacted history, a slice per turn (`--compaction-batch-revisions`);
/// - watchers catching up from the ring or the store, a bounded step per turn;
/// - lease expiry: checked every 100 ms, revoked 500 leases per turn while a backlog lasts;
/// - a checkpoint of the write-ahead log into LMDB each second, when it holds anything, and the
///   release of the values it moved there, 20,000 per turn;
/// - periodic watch progress notifications, and keep-alive comments on idle SSE watch streams;
/// - auto-compaction, when configured.
final class BackgroundWork {
    private var steppers: [LoopStepper] = []
    private var leaseTick: LoopTimer?
    private var leaseBacklog = false
    private var progressTimer: LoopTimer?
    private var checkpointTick: LoopTimer?
    private var sseKeepAliveTick: LoopTimer?
    private var autoCompactor: AutoCompactor?
    private unowned let core: VigilServerCore

    init(core: VigilServerCore, autoCompaction: AutoCompactor.Mode?) {
        self.core = core
        let loop = core.loop
        let store = core.store
        let context = core.services.context
        let hub = core.services.watch.hub
        let lessor = core.services.lessor
        let batch = core.config.compactionBatchRevisions
        steppers.append(LoopStepper(loop: loop, pending: { hub.catchUpPending }, step: { hub.catchUp() }))
        steppers.append(
            LoopStepper(
                loop: loop, pending: { store.compactionPending }, step: { context.compactionStep(maxRevisions: batch) })
        )
        steppers.append(LoopStepper(loop: loop, pending: { store.releasePending }, step: { store.releaseStep() }))
        steppers.append(
            LoopStepper(
                loop: loop, pending: { [unowned self] in leaseBacklog },
                step: { [unowned self] in leaseBacklog = lessor.expireStep() }))
        leaseTick = LoopTimer(loop: loop, timeoutMs: 100, repeatMs: 100) { [unowned self] in leaseBacklog = true }
        leaseTick?.unref()
        let commits = core.commits
        checkpointTick = LoopTimer(loop: loop, timeoutMs: 1000, repeatMs: 1000) {
            commits.checkpointIfNeeded(force: true)
        }
        checkpointTick?.unref()
        let interval = core.config.sseKeepAliveIntervalMs
        sseKeepAliveTick = LoopTimer(loop: loop, timeoutMs: interval, repeatMs: interval) { [unowned core] in
            core.plain.sseKeepAliveTick()
        }
        sseKeepAliveTick?.unref()
        startProgressTimer()
        if let mode = autoCompaction {
            autoCompactor = AutoCompactor(loop: loop, services: core.services, mode: mode, logger: core.logger)
            autoCompactor?.start()
        }
    }

    /// Periodic progress notifications, every interval plus up to 10% jitter (as etcd).
    private func startProgressTimer() {
        let base = core.config.watchProgressNotifyIntervalMs
        let jitter = base / 10 > 0 ? UInt64.random(in: 0...(base / 10)) : 0
        progressTimer = LoopTimer(loop: core.loop, timeoutMs: base + jitter) { [unowned self] in
            progressTimer = nil
            core.services.watch.hub.progressTick()
            startProgressTimer()
        }
        progressTimer?.unref()
    }

    func stop() {
        for s in steppers { s.stop() }
        steppers.removeAll()
        leaseTick?.cancel()
        leaseTick = nil
        checkpointTick?.cancel()
        checkpointTick = nil
        sseKeepAliveTick?.cancel()
        sseKeepAliveTick = nil
        progressTimer?.cancel()
        progressTimer = nil
        autoCompactor?.stop()
        autoCompactor = nil
    }
}
