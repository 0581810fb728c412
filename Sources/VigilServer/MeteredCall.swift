import Dispatch
import EventLoop
import GRPC
import VigilCore

/// Wraps a call's handler with what every call gets: its `grpc-timeout` deadline and its metrics
/// (started, handled by code, latency, refusals). It passes every event on to the handler, which
/// keeps owning its call; nothing here replaces a callback.
final class MeteredCall: CallHandler {
    private let inner: any CallHandler
    private unowned let server: VigilServerCore
    private let started = DispatchTime.now().uptimeNanoseconds
    private var deadline: LoopTimer?
    private let method: ServerMetrics.MethodStats

    init(_ inner: any CallHandler, call: ServerCall, server: VigilServerCore) {
        self.inner = inner
        self.server = server
        method = server.metrics.stats(call.path)
        server.metrics.callStarted(method)
        call.counters = method.counters
        if let ms = call.timeoutMs {
            deadline = LoopTimer(loop: server.loop, timeoutMs: ms) { [weak call] in
                call?.finish(EtcdError.deadlineExceeded.status)
            }
        }
    }

    func call(_ call: ServerCall, received message: [UInt8]) { inner.call(call, received: message) }

    func callHalfClosed(_ call: ServerCall) { inner.callHalfClosed(call) }

    func callDrained(_ call: ServerCall) { inner.callDrained(call) }

    func callEnded(_ call: ServerCall) {
        deadline?.cancel()
        deadline = nil
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
        server.metrics.callEnded(method, status: call.finalStatus ?? GRPCStatus(.cancelled), seconds: seconds)
        inner.callEnded(call)
    }
}
