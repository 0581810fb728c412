import EtcdAPI
import EtcdProto
import EventLoop
import Logging

/// etcd's auto-compaction on the loop.
/// - periodic: keeps `retention` worth of history. Every tenth of the retention it notes the current
///   revision, and compacts to the revision it noted one retention ago.
/// - revision: every check interval (etcd: 5 minutes) compacts to current revision − retention.
final class AutoCompactor {
    enum Mode {
        case periodic(retentionMs: UInt64)
        case revision(keep: Int64, checkMs: UInt64)
    }

    private let loop: EventLoop
    private let services: EtcdServices
    private let mode: Mode
    private let logger: Logger
    private var timer: LoopTimer?
    private var samples: [(at: UInt64, revision: Int64)] = []

    init(loop: EventLoop, services: EtcdServices, mode: Mode, logger: Logger) {
        self.loop = loop
        self.services = services
        self.mode = mode
        self.logger = logger
    }

    /// Parses etcd's flags; nil when auto-compaction is off.
    static func mode(_ config: Configuration) throws -> Mode? {
        let retention = config.autoCompactionRetention
        let mode = config.autoCompactionMode
        if mode.isEmpty || (retention == "0" && (mode == "periodic" || mode == "revision")) { return nil }
        switch mode {
        case "periodic":
            // A bare number is hours, as in etcd.
            if let hours = Double(retention) { return .periodic(retentionMs: UInt64(hours * 3_600_000)) }
            guard let ms = Configuration.durationMs(retention), ms > 0 else {
                throw ConfigurationError("invalid --auto-compaction-retention \(retention)")
            }
            return .periodic(retentionMs: ms)
        case "revision":
            guard let keep = Int64(retention), keep > 0 else {
                throw ConfigurationError("invalid --auto-compaction-retention \(retention) for revision mode")
            }
            return .revision(keep: keep, checkMs: config.autoCompactionCheckMs)
        default:
            throw ConfigurationError(
                "unknown --auto-compaction-mode \(config.autoCompactionMode) (periodic or revision)")
        }
    }

    func start() {
        let every: UInt64
        switch mode {
        case .periodic(let retention): every = max(retention / 10, 100)
        case .revision(_, let check): every = max(check, 100)
        }
        timer = LoopTimer(loop: loop, timeoutMs: every, repeatMs: every) { [unowned self] in tick() }
        timer?.unref()
    }

    func stop() {
        timer?.cancel()
        timer = nil
    }

    private func tick() {
        let store = services.context.store
        let target: Int64
        switch mode {
        case .periodic(let retention):
            let now = loop.nowMilliseconds
            samples.append((now, store.currentRevision))
            // The newest revision noted at least one retention ago.
            guard let i = samples.lastIndex(where: { now - $0.at >= retention }) else { return }
            target = samples[i].revision
            samples.removeFirst(i)
        case .revision(let keep, _):
            target = store.currentRevision - keep
        }
        guard target > max(store.compactRevision, 1), !store.compactionPending else { return }
        var r = Etcdserverpb_CompactionRequest()
        r.revision = target
        do {
            _ = try services.kv.compact(r)
            logger.info("auto-compaction", metadata: ["revision": "\(target)"])
        } catch {
            logger.warning("auto-compaction failed", metadata: ["revision": "\(target)", "error": "\(error)"])
        }
    }
}
