import EtcdProto
import EventLoop
import Foundation
import GRPC
import HTTP2
import SwiftProtobuf
import VigilClient
import VigilCore

/// A client's connection to the server under test: made again after the server died or the
/// connection was lost, at most every 100 ms.
final class Connection {
    let loop: EventLoop
    private let endpoints: () -> [(host: String, port: Int)]
    private var current: GRPCClientConnection?
    private var connecting: [(GRPCClientConnection?) -> Void] = []
    private var lastAttempt: Int64 = 0
    private var next = 0

    init(loop: EventLoop, endpoints: @escaping () -> [(host: String, port: Int)]) {
        self.loop = loop
        self.endpoints = endpoints
    }

    /// A connection that is up, or nil when none could be made now.
    func get(_ done: @escaping (GRPCClientConnection?) -> Void) {
        if let c = current, !c.isClosed { return done(c) }
        current = nil
        connecting.append(done)
        guard connecting.count == 1 else { return }
        let wait = max(0, 100_000_000 - (monotonicNanos() - lastAttempt))
        let attempt = { [self] in
            lastAttempt = monotonicNanos()
            let all = endpoints()
            let ep = all[next % all.count]
            next += 1
            GRPCClientConnection.connect(loop: loop, host: ep.host, port: ep.port) { [self] result in
                let c = try? result.get()
                current = c
                let waiting = connecting
                connecting = []
                for w in waiting { w(c) }
            }
        }
        if wait > 0 {
            after(ms: UInt64(wait / 1_000_000), attempt)
        } else {
            attempt()
        }
    }

    func close() {
        current?.close()
        current = nil
    }

    /// Runs `body` on the loop after `ms` milliseconds.
    func after(ms: UInt64, _ body: @escaping () -> Void) { Timers.after(loop, ms: ms, body) }
}

/// One-shot timers that keep themselves alive until they fire.
enum Timers {
    private final class Box { var timer: LoopTimer? }
    static func after(_ loop: EventLoop, ms: UInt64, _ body: @escaping () -> Void) {
        let box = Box()
        box.timer = LoopTimer(loop: loop, timeoutMs: max(ms, 1)) {
            box.timer = nil
            body()
        }
    }
}

/// Why a call got no answer: a definite refusal (nothing happened), or no answer at all.
enum CallFailure: Error {
    case refused(GRPCStatus)
    case unknown(String)
}

extension Connection {
    /// A unary call with a client-side deadline: a call the server does not answer in time (it is
    /// paused, or gone) is reset and reported as unknown.
    func call<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ method: EtcdMethod, _ request: Req, timeoutMs: UInt64, metadata: [HeaderField] = [],
        _ done: @escaping (Result<Resp, CallFailure>) -> Void
    ) {
        get { [loop] c in
            guard let c else { return done(.failure(.unknown("no connection"))) }
            var finished = false
            let framed = (try? request.framedBytes()) ?? []
            var call: ClientCall?
            call = c.unary(
                method.path, framed: framed, metadata: [("grpc-timeout", "\(timeoutMs)m")] + metadata
            ) { result in
                guard !finished else { return }
                finished = true
                switch result {
                case .success(let bytes):
                    if let r = try? Resp(serializedBytes: bytes) {
                        done(.success(r))
                    } else {
                        done(.failure(.unknown("undecodable response")))
                    }
                case .failure(let status):
                    done(.failure(Self.classify(status)))
                }
            }
            Timers.after(loop, ms: timeoutMs + 200) {
                guard !finished else { return }
                finished = true
                call?.cancel()
                done(.failure(.unknown("client deadline")))
            }
        }
    }

    /// Unavailable, deadlines, cancellations and internal errors leave the outcome unknown;
    /// the other codes are the server's refusal.
    static func classify(_ s: GRPCStatus) -> CallFailure {
        switch s.code {
        case .unavailable, .deadlineExceeded, .cancelled, .internal, .unknown, .aborted, .dataLoss:
            .unknown("\(s.code.name): \(s.message)")
        default: .refused(s)
        }
    }
}

extension KV {
    init(_ kv: Mvccpb_KeyValue) {
        self.init(
            key: String(decoding: kv.key, as: UTF8.self), value: String(decoding: kv.value, as: UTF8.self),
            createRevision: kv.createRevision, modRevision: kv.modRevision, version: kv.version, lease: kv.lease)
    }
}

extension EventRecord {
    init(_ e: Mvccpb_Event) {
        self.init(isPut: e.type == .put, kv: KV(e.kv), prevKV: e.hasPrevKv ? KV(e.prevKv) : nil)
    }
}

/// A seeded random source (SplitMix64): the same seed gives the same traffic choices.
struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// An index picked by weight.
    mutating func weighted(_ weights: [Int]) -> Int {
        var r = Int.random(in: 0..<weights.reduce(0, +), using: &self)
        for (i, w) in weights.enumerated() {
            if r < w { return i }
            r -= w
        }
        return weights.count - 1
    }
}
