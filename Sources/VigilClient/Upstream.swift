import EtcdProto
import EventLoop
import Foundation
import GRPC
import HTTP2
import TLS
import VigilCore

/// One member of the upstream cluster: where to dial it.
public struct UpstreamEndpoint: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// `host:port`, `http://host:port` or `https://host:port` (etcd's `--endpoints` forms).
    public static func parse(_ s: String) -> UpstreamEndpoint? {
        var rest = Substring(s)
        for scheme in ["http://", "https://"] where rest.hasPrefix(scheme) { rest = rest.dropFirst(scheme.count) }
        if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
        guard let colon = rest.lastIndex(of: ":"), let port = Int(rest[rest.index(after: colon)...]), port > 0,
            port < 65536
        else { return nil }
        var host = String(rest[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host == "localhost" { host = "127.0.0.1" }
        return host.isEmpty ? nil : UpstreamEndpoint(host: host, port: port)
    }

    public var description: String { "\(host):\(port)" }
}

/// The connection to an etcd cluster (the mirror's upstream, the EtcdClient's cluster): one member at a time. When it is lost, or stops
/// answering (`checkAlive`), the next member is dialled, with a growing pause once every member
/// has failed in a row. Calls made while no connection is up wait for the next one; they fail
/// with UNAVAILABLE if a whole round of members fails.
public final class Upstream {
    let loop: EventLoop
    let endpoints: [UpstreamEndpoint]
    let tls: TLSContext?
    public private(set) var connection: GRPCClientConnection?
    /// The member connected to (or last tried).
    public private(set) var endpoint: UpstreamEndpoint
    private var nextIndex = 0
    private var dialing = false
    private var failuresInRow = 0
    private var waiting: [(GRPCClientConnection?) -> Void] = []
    private var retryTimer: LoopTimer?
    private var stopped = false
    /// Called on the loop each time a connection is up (the mirror resumes its watch there).
    public var onConnect: ((GRPCClientConnection) -> Void)?
    /// Runs on each new connection before anything else uses it (the client authenticates there
    /// and sets the token); a failure drops the connection, and the calls waiting for one end
    /// with that status.
    public var prepare: ((GRPCClientConnection, @escaping (GRPCStatus?) -> Void) -> Void)?
    /// Why the calls that waited for a connection got none (a whole round of members failed).
    public private(set) var failure = Upstream.unreachable
    /// Connections made after the first.
    public private(set) var reconnects = 0
    private var connectedOnce = false
    /// Why the last attempt or connection failed, for logs and `/health`.
    public private(set) var lastError = ""
    public var log: (String) -> Void = { _ in }
    /// A connection attempt (TCP, TLS, `prepare`) that takes longer fails, and the next member
    /// is tried (a blackholed address would otherwise hold it for the system's SYN timeout).
    public var dialTimeoutMs: UInt64 = 5_000
    /// Bumped at each attempt: an attempt that timed out ignores its late outcome.
    private var attempt = 0
    private var dialTimer: LoopTimer?

    public init(loop: EventLoop, endpoints: [UpstreamEndpoint], tls: TLSContext?) {
        precondition(!endpoints.isEmpty)
        self.loop = loop
        self.endpoints = endpoints
        self.tls = tls
        endpoint = endpoints[0]
    }

    /// Runs `body` with the connection once one is up (nil: a whole round of members failed).
    public func withConnection(_ body: @escaping (GRPCClientConnection?) -> Void) {
        if let c = connection, !c.isClosed { return body(c) }
        if stopped { return body(nil) }
        waiting.append(body)
        dial()
    }

    /// A unary call upstream with raw messages.
    public func unary(
        _ path: String, _ request: [UInt8], metadata: [HeaderField] = [],
        _ done: @escaping (Result<[UInt8], GRPCStatus>) -> Void
    ) {
        withConnection { c in
            guard let c else { return done(.failure(self.failure)) }
            c.unary(path, request, metadata: metadata, done)
        }
    }

    public static let unreachable = GRPCStatus(.unavailable, "no etcd endpoint is reachable")

    /// Drops the connection (it failed, or answers nothing): calls on it end with UNAVAILABLE and
    /// the next member is dialled.
    public func drop(_ why: String) {
        lastError = why
        log("dropping upstream connection to \(endpoint): \(why)")
        connection?.close()
    }

    public func stop() {
        stopped = true
        retryTimer?.cancel()
        retryTimer = nil
        dialTimer?.cancel()
        dialTimer = nil
        connection?.close()
        let w = waiting
        waiting = []
        for body in w { body(nil) }
    }

    private func dial() {
        guard !dialing, !stopped, connection == nil || connection!.isClosed else { return }
        dialing = true
        attempt += 1
        let mine = attempt
        let ep = endpoints[nextIndex % endpoints.count]
        nextIndex += 1
        endpoint = ep
        dialTimer = LoopTimer(loop: loop, timeoutMs: dialTimeoutMs) { [weak self] in
            guard let self, attempt == mine, dialing else { return }
            attempt += 1  // the late outcome of this attempt is ignored (and closed)
            dialing = false
            failed("cannot connect to \(ep): no answer in \(dialTimeoutMs) ms")
        }
        // The attempt ends: `c` is handed on, or closed if the attempt is over or we stopped.
        func finish(_ c: GRPCClientConnection?, _ error: String?, refused: GRPCStatus? = nil) {
            guard attempt == mine else {
                c?.close()
                return
            }
            dialing = false
            dialTimer?.cancel()
            dialTimer = nil
            if stopped {
                c?.close()
                let w = waiting
                waiting = []
                for body in w { body(nil) }
                return
            }
            if let c, error == nil { return connected(c, ep) }
            c?.close()
            if let refused {
                // Refused by `prepare` (wrong password …): the calls waiting hear why.
                lastError = refused.message
                log("connection to \(ep) refused: \(refused.message)")
                failure = refused
                let w = waiting
                waiting = []
                for body in w { body(nil) }
                failure = Self.unreachable
                return
            }
            failed(error ?? "connection to \(ep) failed")
        }
        GRPCClientConnection.connect(loop: loop, host: ep.host, port: ep.port, tls: tls) { [weak self] result in
            guard let self else { return }
            switch result {
            case .failure(let e):
                finish(nil, "cannot connect to \(ep): \(e)")
            case .success(let c):
                guard attempt == mine, !stopped, let prepare else { return finish(c, nil) }
                prepare(c) { error in
                    guard let error else { return finish(c, nil) }
                    if error.code == .unavailable { return finish(c, "connection to \(ep) lost: \(error.message)") }
                    finish(c, error.message, refused: error)
                }
            }
        }
    }

    private func connected(_ c: GRPCClientConnection, _ ep: UpstreamEndpoint) {
        connection = c
        if connectedOnce { reconnects += 1 }
        connectedOnce = true
        log("connected to upstream member \(ep)")
        let since = loop.nowMilliseconds
        c.onClose = { [weak self, weak c] in
            guard let self, let c, connection === c else { return }
            connection = nil
            // A member that takes connections but drops them at once (no leader) counts
            // as failed: the pause between attempts grows until one lasts.
            if loop.nowMilliseconds - since < 2_000 { failuresInRow += 1 } else { failuresInRow = 0 }
            if lastError.isEmpty { lastError = "connection to \(ep) closed" }
            log("upstream connection to \(ep) closed")
            retry()
        }
        onConnect?(c)
        let w = waiting
        waiting = []
        for body in w { body(c) }
    }

    private func failed(_ why: String) {
        lastError = why
        failuresInRow += 1
        log(why)
        if failuresInRow % endpoints.count == 0 {
            // A whole round failed: calls waiting give up; the dialling goes on, slower.
            let w = waiting
            waiting = []
            for body in w { body(nil) }
        }
        retry()
    }

    private func retry() {
        guard !stopped, retryTimer == nil else { return }
        let rounds = failuresInRow / endpoints.count
        let pause: UInt64 = failuresInRow == 0 ? 0 : min(50 << min(rounds, 5), 1_000)
        retryTimer = LoopTimer(loop: loop, timeoutMs: pause) { [weak self] in
            guard let self else { return }
            retryTimer = nil
            dial()
        }
    }

    /// Whether a connection is up.
    public var isConnected: Bool { connection.map { !$0.isClosed } ?? false }
}

/// One watch on the upstream cluster, on a stream of its own: the create request sent, answers
/// decoded with their fragments joined, and nothing heard after `cancel()`. `hasleader` makes a
/// member without a leader end it, so that its owner moves to another.
public final class UpstreamWatch {
    private var call: ClientCall?
    private var fragments = WatchFragments()
    private var onResponse: ((Etcdserverpb_WatchResponse) -> Void)?
    private var onEnd: ((GRPCStatus) -> Void)?

    /// nil if the stream could not be opened (the connection is closing).
    public init?(
        on c: GRPCClientConnection, _ create: Etcdserverpb_WatchCreateRequest,
        onResponse: @escaping (Etcdserverpb_WatchResponse) -> Void, onEnd: @escaping (GRPCStatus) -> Void
    ) {
        self.onResponse = onResponse
        self.onEnd = onEnd
        let opened = c.open(
            EtcdMethod.watch.path, metadata: [("hasleader", "true")],
            onMessage: { [weak self] bytes in self?.received(bytes) },
            onClose: { [weak self] status in self?.ended(status) })
        guard !opened.isClosed else { return nil }
        call = opened
        var req = Etcdserverpb_WatchRequest()
        req.createRequest = create
        opened.send(req)
    }

    /// A create request for `[key, end)` from `start`.
    public static func create(
        _ key: [UInt8], _ end: [UInt8], from start: Int64, prevKV: Bool = false, progressNotify: Bool = false
    ) -> Etcdserverpb_WatchCreateRequest {
        var c = Etcdserverpb_WatchCreateRequest()
        c.key = Data(key)
        c.rangeEnd = Data(end)
        c.startRevision = start
        c.prevKv = prevKV
        c.progressNotify = progressNotify
        c.fragment = true
        return c
    }

    public func requestProgress() {
        var req = Etcdserverpb_WatchRequest()
        req.progressRequest = Etcdserverpb_WatchProgressRequest()
        call?.send(req)
    }

    public func cancel() {
        onResponse = nil
        onEnd = nil
        call?.cancel()
        call = nil
    }

    private func received(_ bytes: [UInt8]) {
        guard let onResponse else { return }
        guard let resp = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else {
            let end = onEnd
            cancel()
            end?(GRPCStatus(.internal, "undecodable watch response"))
            return
        }
        if let whole = fragments.join(resp) { onResponse(whole) }
    }

    private func ended(_ status: GRPCStatus) {
        guard call != nil, let end = onEnd else { return }  // nil call: failed while opening
        cancel()
        end(status)
    }
}

/// Joins a watch's fragmented responses: etcd splits a revision's events over several responses
/// marked `fragment` when they pass the request size limit.
struct WatchFragments {
    private var held: [Mvccpb_Event] = []

    /// The whole response once its last part came; nil while parts are held.
    mutating func join(_ part: Etcdserverpb_WatchResponse) -> Etcdserverpb_WatchResponse? {
        if part.fragment {
            held += part.events
            return nil
        }
        guard !held.isEmpty else { return part }
        var whole = part
        whole.events = held + part.events
        held = []
        return whole
    }
}
