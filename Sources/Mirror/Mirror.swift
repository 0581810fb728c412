import EtcdAPI
import EtcdProto
import EventLoop
import Foundation
import GRPC
import HTTP2
import MVCC
import SwiftProtobuf
import TLS
import VigilClient
import VigilCore
import WatchHub

/// What a mirror copies and from where.
public struct MirrorOptions: Sendable {
    /// The upstream cluster's members.
    public var endpoints: [UpstreamEndpoint]
    /// Only keys under this prefix are copied (empty: every key). In the clients' key space (under
    /// `namespace`).
    public var prefix: [UInt8] = []
    /// etcd's `--namespace`: clients see upstream's keys under it as the whole key space.
    public var namespace: [UInt8] = []
    /// Keys per page of the loading Range.
    public var pageSize = 1_000
    /// How often the upstream watch is asked for progress (the liveness probe).
    public var probeIntervalMs: UInt64 = 1_000
    /// Silence from the upstream member for this long, with a probe outstanding, drops the
    /// connection: a paused or partitioned member is left for another.
    public var deadAfterMs: UInt64 = 3_000
    /// How long a forwarded write waits for the mirror to apply its revision before failing.
    public var applyTimeoutMs: UInt64 = 10_000

    public init(endpoints: [UpstreamEndpoint]) { self.endpoints = endpoints }
}

/// A copy of an etcd cluster's key space (or of one prefix) kept in a Vigil store at the
/// cluster's own revisions, so that reads and watches are served here, by the watch hub, as a
/// standalone Vigil serves them; writes and the other calls go upstream (`MirrorRouting`).
///
/// How it follows upstream: a paginated Range, every page at one revision R, loads the state;
/// a watch from R+1 (progress notifications on, fragments on) brings every later change, each
/// revision applied as one write transaction at that revision (`KVStore.beginWrite(at:)`), and
/// progress responses move the revision over changes to keys not copied. On reconnection the
/// watch resumes at the revision after the last applied; if upstream compacted past it, the
/// state is loaded again, the difference applied, and the watchers, which cannot be given the
/// changes between, are canceled with the compact revision, as etcd cancels a watcher whose
/// history is gone.
///
/// Everything runs on the loop.
public final class Mirror {
    public let options: MirrorOptions
    let loop: EventLoop
    let store: KVStore
    let services: EtcdServices
    public let upstream: Upstream
    /// The copied range upstream: `[key, end)`.
    let key: [UInt8]
    let end: [UInt8]
    /// The end of the copied prefix in the clients' key space.
    private let localEnd: [UInt8]
    public let namespace: Namespace
    private var watchCall: UpstreamWatch?
    private var loaded = false
    private var loading = false
    /// Writes waiting for the mirror to apply a revision.
    private var waiters: [(revision: Int64, deadline: UInt64, body: (Bool) -> Void)] = []
    private var progressAsked = false
    /// A progress revision not taken yet (see `received`).
    private var heardProgress: Int64?
    private var barrierQueue: [(Result<Int64, EtcdError>) -> Void] = []
    private var barrierInFlight = false
    private var probeTimer: LoopTimer?
    private var onReady: (() -> Void)?

    // Figures for `/metrics` and `/health`.
    /// The highest revision upstream has reported.
    public private(set) var upstreamRevision: Int64 = 0
    /// When the mirror last had applied everything upstream had reported (loop ms).
    private var currentSinceMs: UInt64 = 0
    public private(set) var reloads = 0
    /// Upstream has auth enabled: the copy, read without a user, must not be served (reads go
    /// upstream with the caller's token, watches are refused). Found from anonymous calls refused
    /// for want of a user, from a forwarded AuthEnable, and by an anonymous read every 10 probes.
    public internal(set) var upstreamAuth = false
    /// Full loads and reloads, and the revision of the last one.
    public private(set) var loadedRevision: Int64 = 0
    /// Whether the mirror follows upstream now (loaded, and its watch open).
    public var isFollowing: Bool { loaded && watchCall != nil && upstream.isConnected }
    public var log: (String) -> Void = { _ in } {
        didSet { upstream.log = log }
    }

    public init(
        loop: EventLoop, store: KVStore, services: EtcdServices, options: MirrorOptions, tls: TLSContext? = nil
    ) {
        self.options = options
        self.loop = loop
        self.store = store
        self.services = services
        upstream = Upstream(loop: loop, endpoints: options.endpoints, tls: tls)
        namespace = Namespace(options.namespace)
        localEnd = options.prefix.isEmpty ? [] : MVCC.KeyRange.prefixEnd(options.prefix)
        let copied = namespace.key(options.prefix)
        if copied.isEmpty {
            key = [0]
            end = [0]
        } else {
            key = copied
            end = MVCC.KeyRange.prefixEnd(copied)
        }
    }

    /// Connects, loads, and follows upstream from now on; `ready` runs once the first load is
    /// applied and the watch is open.
    public func start(ready: @escaping () -> Void) {
        onReady = ready
        upstream.onConnect = { [weak self] c in self?.connected(c) }
        upstream.withConnection { _ in }
        probeTimer = LoopTimer(loop: loop, timeoutMs: options.probeIntervalMs, repeatMs: options.probeIntervalMs) {
            [weak self] in self?.probe()
        }
        probeTimer?.unref()
    }

    public func stop() {
        probeTimer?.cancel()
        probeTimer = nil
        stopWatch()
        compactionProbe?.cancel()
        compactionProbe = nil
        upstream.stop()
        for w in waiters { w.body(false) }
        waiters = []
    }

    /// Lag behind upstream in revisions (0 when current).
    public var lagRevisions: Int64 { max(0, upstreamRevision - store.currentRevision) }
    /// Seconds since the mirror last had everything upstream reported (0 when current).
    public var lagSeconds: Double {
        lagRevisions == 0 ? 0 : Double(loop.nowMilliseconds - currentSinceMs) / 1000
    }

    // MARK: Following upstream

    private func connected(_ c: GRPCClientConnection) {
        stopWatch()
        progressAsked = false
        heardProgress = nil
        if loaded {
            watch(on: c, from: store.currentRevision + 1)
        } else {
            load(on: c)
        }
    }

    /// Reads the copied range page by page at one revision, then applies it: the first load, or a
    /// reload after upstream compacted past the mirror.
    private func load(on c: GRPCClientConnection) {
        guard !loading else { return }
        loading = true
        var kvs: [MVCC.KeyValue] = []
        var revision: Int64 = 0
        func page(from start: [UInt8]) {
            var r = Etcdserverpb_RangeRequest()
            r.key = Data(start)
            r.rangeEnd = Data(end)
            r.limit = Int64(options.pageSize)
            r.revision = revision
            c.unary(EtcdMethod.range.path, r) { [weak self] (result: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                guard let self else { return }
                switch result {
                case .failure(let status):
                    loading = false
                    if Self.refusedForAuth(status) {
                        upstreamAuth = true
                        log("upstream has auth enabled: a mirror cannot copy it (\(status.message)); retrying")
                    }
                    // A compacted page: start again at a newer revision; anything else: another member.
                    upstream.drop("loading failed: \(status.message)")
                case .success(let resp):
                    heard(resp.header)
                    if revision == 0 { revision = resp.header.revision }
                    for p in resp.kvs { kvs.append(local(p)) }
                    if resp.more, let last = resp.kvs.last {
                        page(from: [UInt8](last.key) + [0])
                    } else {
                        loading = false
                        applyLoad(kvs, at: revision)
                        guard !c.isClosed else { return }
                        watch(on: c, from: revision + 1)
                    }
                }
            }
        }
        page(from: key)
    }

    private func applyLoad(_ kvs: [MVCC.KeyValue], at revision: Int64) {
        loadedRevision = revision
        if !loaded {
            store.loadMirrored(kvs, deleted: [], at: revision)
            if revision > store.compactRevision { try? store.compact(revision) }
            loaded = true
            log("loaded \(kvs.count) keys at upstream revision \(revision)")
            return
        }
        // A reload: apply what differs, then cancel the watchers if anything did.
        reloads += 1
        var have: [[UInt8]: Int64] = [:]
        for e in store.liveModRevisions() { have[e.key] = e.modRevision }
        var changed: [MVCC.KeyValue] = []
        for kv in kvs {
            let mine = have.removeValue(forKey: kv.key)
            guard kv.modRevision != mine else { continue }
            // A change the mirror missed is newer than all it applied.
            if kv.modRevision > store.currentRevision {
                changed.append(kv)
            } else {
                log("reload: \(kv.key.count)-byte key at revision \(kv.modRevision) is older than the mirror's")
            }
        }
        let gone = Array(have.keys)
        let at = max(revision, store.currentRevision)
        // Whatever the difference, the revisions between are gone: a key made and deleted there
        // shows in neither state, so every watcher is told.
        store.loadMirrored(changed, deleted: gone, at: at)
        services.watch.hub.cancelAll(compactRevision: at)
        if at > store.compactRevision { try? store.compact(at) }
        log("reloaded at upstream revision \(revision): \(changed.count) keys changed, \(gone.count) deleted")
    }

    /// Opens the upstream watch from `revision`.
    private func watch(on c: GRPCClientConnection, from revision: Int64) {
        stopWatch()
        watchCall = UpstreamWatch(
            on: c, UpstreamWatch.create(key, end, from: revision, progressNotify: true),
            onResponse: { [weak self] resp in self?.received(resp) },
            onEnd: { [weak self] status in
                guard let self else { return }
                watchCall = nil
                if !c.isClosed { upstream.drop("upstream watch ended: \(status.message)") }
            })
        if watchCall == nil { upstream.drop("cannot open the upstream watch") }
    }

    private func stopWatch() {
        watchCall?.cancel()
        watchCall = nil
    }

    private func received(_ resp: Etcdserverpb_WatchResponse) {
        heard(resp.header)
        // A refused create comes as created and canceled at once: canceled is looked at first.
        if resp.canceled {
            stopWatch()
            if resp.compactRevision > 0, let c = upstream.connection {
                // Compacted past the mirror: load again at the current revision.
                log(
                    "upstream compacted at \(resp.compactRevision), past revision \(store.currentRevision + 1): reloading"
                )
                return load(on: c)
            }
            if resp.cancelReason.contains("PermissionDenied") || resp.cancelReason.contains("permission denied") {
                upstreamAuth = true
            }
            return upstream.drop("upstream watch canceled: \(resp.cancelReason)")
        }
        if resp.created {
            if let ready = onReady {
                onReady = nil
                ready()
            }
            return
        }
        let events = resp.events
        if events.isEmpty {
            progressAsked = false
            // A copy of the whole key space needs no progress: every upstream revision is a change
            // to some key, so its event comes. A partial copy (a prefix, a namespace) needs it to
            // move over the others' revisions. etcd 3.4 answers a progress request from outside
            // the watcher's queue: events up to its revision may still come after it. A revision
            // is taken once a later progress answer, asked after it arrived, comes back; an event
            // that arrives behind the copy anyway makes it reload (`apply`).
            if key != [0] {
                if let earlier = heardProgress { store.advance(to: earlier) }
                heardProgress = resp.header.revision > store.currentRevision ? resp.header.revision : nil
                if heardProgress != nil && !waiters.isEmpty { askProgress() }
            }
        } else {
            apply(events)
        }
        settle()
    }

    /// Applies upstream's events, one write transaction per revision.
    private func apply(_ events: [Mvccpb_Event]) {
        var i = 0
        while i < events.count {
            let rev = events[i].kv.modRevision
            guard rev > store.currentRevision else {
                // The copy moved past a revision whose events had not come yet: it cannot take
                // them in order any more. Load again (its watchers are told, as compacted).
                log("an upstream event at revision \(rev) came behind the copy (\(store.currentRevision)): reloading")
                stopWatch()
                if let c = upstream.connection { load(on: c) }
                return
            }
            let txn = store.beginWrite(at: rev)
            while i < events.count && events[i].kv.modRevision == rev {
                let e = events[i]
                if e.type == .delete {
                    txn.deleteRange(namespace.strip(e.kv.key.bytes), [])
                } else {
                    txn.put(mirrored: local(e.kv))
                }
                i += 1
            }
            txn.end()
        }
    }

    /// Notes a header from upstream: its revision, and the ids the mirror answers with.
    private func heard(_ h: Etcdserverpb_ResponseHeader) {
        if h.revision > upstreamRevision { upstreamRevision = h.revision }
    }

    /// Upstream's cluster id, and the member id and raft term of the first member that answers,
    /// asked before the services are built (every response header carries them). Runs the loop
    /// until a member answers.
    public static func identify(
        loop: EventLoop, options: MirrorOptions, tls: TLSContext?, log: @escaping (String) -> Void
    ) -> (clusterID: UInt64, memberID: UInt64, raftTerm: UInt64) {
        let upstream = Upstream(loop: loop, endpoints: options.endpoints, tls: tls)
        upstream.log = log
        var found: Etcdserverpb_ResponseHeader?
        var asking = false
        var r = Etcdserverpb_RangeRequest()
        let copied = options.namespace + options.prefix
        r.key = Data(copied.isEmpty ? [0] : copied)
        r.limit = 1
        r.keysOnly = true
        let bytes: [UInt8] = (try? r.serializedBytes()) ?? []
        var failed = false
        var askedAt = DispatchTime.now().uptimeNanoseconds
        while found == nil {
            if failed {
                failed = false
                loop.run(forAtMost: 0.5) { false }
            }
            if asking && DispatchTime.now().uptimeNanoseconds - askedAt > options.deadAfterMs * 1_000_000 {
                // A member that takes the connection but answers nothing (paused): the next one.
                upstream.drop("no answer for \(options.deadAfterMs) ms")
            }
            if !asking {
                asking = true
                askedAt = DispatchTime.now().uptimeNanoseconds
                upstream.unary(EtcdMethod.range.path, bytes) { result in
                    asking = false
                    switch result {
                    case .success(let answer):
                        found = try? Etcdserverpb_RangeResponse(serializedBytes: answer).header
                    case .failure(let status):
                        log("upstream did not answer: \(status.message)")
                        failed = true
                        upstream.drop(status.message)
                    }
                }
            }
            loop.run(forAtMost: 0.5) { found != nil || !asking }
        }
        upstream.stop()
        return (found!.clusterID, found!.memberID, found!.raftTerm)
    }

    /// Runs the writes waiting for revisions now applied; asks for progress if some still wait.
    private func settle() {
        if store.currentRevision >= upstreamRevision { currentSinceMs = loop.nowMilliseconds }
        guard !waiters.isEmpty else { return }
        let applied = store.currentRevision
        var still: [(revision: Int64, deadline: UInt64, body: (Bool) -> Void)] = []
        var ready: [(Bool) -> Void] = []
        for w in waiters {
            if w.revision <= applied { ready.append(w.body) } else { still.append(w) }
        }
        waiters = still
        for body in ready { services.context.commits.whenDurable(applied) { body(true) } }
        if !waiters.isEmpty { askProgress() }
    }

    private func askProgress() {
        guard !progressAsked, let watch = watchCall else { return }
        progressAsked = true
        watch.requestProgress()
    }

    /// Each interval: ask for progress (the answer keeps the revision current), drop a member
    /// that has said nothing for too long, and fail writes that waited too long.
    private func probe() {
        let now = loop.nowMilliseconds
        if let c = upstream.connection, !c.isClosed, watchCall != nil || loading {
            if (progressAsked || loading) && now - c.lastReceivedMs > options.deadAfterMs {
                upstream.drop("no answer for \(now - c.lastReceivedMs) ms")
            } else if watchCall != nil {
                progressAsked = false
                askProgress()
            }
        }
        probes += 1
        if probes % Self.compactionCheckProbes == 0 { followCompaction() }
        if probes % 10 == 0 { checkAuth() }
        if waiters.contains(where: { $0.deadline <= now }) {
            let late = waiters.filter { $0.deadline <= now }
            waiters.removeAll { $0.deadline <= now }
            for w in late { w.body(false) }
        }
    }

    private var probes = 0
    /// Upstream's compaction is looked for every this many probes (a minute by default).
    static let compactionCheckProbes = 60

    /// Compacts the copy where upstream compacted (its history is gone there: the copy need not
    /// keep it). etcd 3.4 reports its compact revision to a watch that starts before it: one such
    /// watch on an empty range, canceled at once.
    private func followCompaction() {
        guard loaded, compactionProbe == nil, let c = upstream.connection, !c.isClosed else { return }
        let ended = { [weak self] in
            self?.compactionProbe?.cancel()
            self?.compactionProbe = nil
        }
        compactionProbe = UpstreamWatch(
            on: c, UpstreamWatch.create([0], [0, 0], from: 1),
            onResponse: { [weak self] resp in
                guard let self, !resp.created || resp.canceled else { return }
                ended()
                let c = resp.compactRevision
                if c > store.compactRevision && c <= store.currentRevision {
                    log("following upstream's compaction at revision \(c)")
                    try? store.compact(c)
                }
            }, onEnd: { _ in ended() })
        // Not compacted: created, then history from 1 (none on this range): ended after a moment.
        _ = LoopTimer(loop: loop, timeoutMs: 2_000) { ended() }
    }

    /// The watch that finds upstream's compact revision, while it runs.
    private var compactionProbe: UpstreamWatch?

    // MARK: For the routing

    /// Runs `body(true)` once the mirror has applied `revision` and it is readable here; false if
    /// it did not within `applyTimeoutMs`.
    public func whenApplied(_ revision: Int64, _ body: @escaping (Bool) -> Void) {
        if revision <= store.currentRevision {
            return services.context.commits.whenDurable(revision) { body(true) }
        }
        waiters.append((revision, loop.nowMilliseconds + options.applyTimeoutMs, body))
        askProgress()
    }

    /// A linearizable point: learns upstream's current revision with one linearizable read and
    /// waits until the mirror has applied it. Reads that arrive while one is in flight share the
    /// next one.
    public func barrier(_ body: @escaping (Result<Int64, EtcdError>) -> Void) {
        barrierQueue.append(body)
        if !barrierInFlight { runBarrier() }
    }

    private func runBarrier() {
        let batch = barrierQueue
        barrierQueue = []
        barrierInFlight = true
        var r = Etcdserverpb_RangeRequest()
        r.key = Data(key == [0] ? [0] : key)
        r.limit = 1
        r.keysOnly = true
        let bytes: [UInt8] = (try? r.serializedBytes()) ?? []
        upstream.unary(EtcdMethod.range.path, bytes) { [weak self] result in
            guard let self else { return }
            barrierInFlight = false
            if !barrierQueue.isEmpty { runBarrier() }
            switch result {
            case .failure(let status):
                if Self.refusedForAuth(status) { upstreamAuth = true }
                for b in batch { b(.failure(.relayed(status.code, status.message))) }
            case .success(let resp):
                let rev = Self.headerRevision(resp)
                if rev > upstreamRevision { upstreamRevision = rev }
                whenApplied(rev) { ok in
                    for b in batch { b(ok ? .success(rev) : .failure(Self.notApplied(rev))) }
                }
            }
        }
    }

    /// An anonymous call refused because upstream wants a user.
    static func refusedForAuth(_ s: GRPCStatus) -> Bool {
        [EtcdError.userEmpty, .invalidAuthToken, .permissionDenied].contains {
            $0.message == s.message && $0.grpcCode == s.code
        }
    }

    /// An anonymous one-key read: refused for want of a user if upstream's auth is on.
    private func checkAuth() {
        guard loaded, upstream.isConnected else { return }
        var r = Etcdserverpb_RangeRequest()
        r.key = Data(key)
        r.limit = 1
        r.keysOnly = true
        r.serializable = true
        let bytes: [UInt8] = (try? r.serializedBytes()) ?? []
        upstream.unary(EtcdMethod.range.path, bytes) { [weak self] result in
            guard let self else { return }
            switch result {
            case .success:
                if upstreamAuth { log("upstream auth is off again: serving the copy") }
                upstreamAuth = false
            case .failure(let s) where Self.refusedForAuth(s):
                if !upstreamAuth { log("upstream has auth enabled: reads go upstream, watches are refused") }
                upstreamAuth = true
            case .failure: break
            }
        }
    }

    static func notApplied(_ rev: Int64) -> EtcdError {
        .relayed(.unavailable, "vigil mirror: revision \(rev) not applied yet (upstream unreachable?)")
    }

    /// Whether the mirror holds `[key, end)` (etcd's range forms: `end` empty for one key, "\0"
    /// for every key from `key`).
    public func covers(key k: [UInt8], end e: [UInt8]) -> Bool {
        if options.prefix.isEmpty { return true }
        let p = options.prefix
        guard k.count >= p.count, Array(k[0..<p.count]) == p else { return false }
        if e.isEmpty { return true }
        if e == [0] { return false }
        return compareBytes(e, localEnd) <= 0
    }

    // MARK: Helpers

    /// An upstream key-value as the clients see it (out of the namespace).
    func local(_ p: Mvccpb_KeyValue) -> MVCC.KeyValue {
        MVCC.KeyValue(
            key: namespace.strip(p.key.bytes), createRevision: p.createRevision, modRevision: p.modRevision,
            version: p.version,
            value: p.value.bytes, lease: p.lease)
    }

    /// The `header.revision` of any etcd response, whatever its type: every one has its header at
    /// field 1, so it decodes as LeaseRevokeResponse, which has nothing else (the rest is kept as
    /// unknown fields, not parsed); 0 if absent.
    static func headerRevision(_ bytes: [UInt8]) -> Int64 {
        (try? Etcdserverpb_LeaseRevokeResponse(serializedBytes: bytes))?.header.revision ?? 0
    }
}
