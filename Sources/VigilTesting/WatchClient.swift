import EtcdProto
import Foundation
import GRPC
import SwiftProtobuf
import VigilClient
import VigilCore

/// One Watch stream through our own client, recording every response (for tests and benchmarks).
public final class WatchStreamClient {
    public let call: ClientCall
    public private(set) var responses: [Etcdserverpb_WatchResponse] = []
    public private(set) var closedStatus: GRPCStatus?
    /// How many events have arrived so far (kept as they come, cheap to poll).
    public private(set) var eventCount = 0
    /// Called for each response as it arrives.
    public var onResponse: ((Etcdserverpb_WatchResponse) -> Void)?

    public init(_ connection: GRPCClientConnection) {
        var me: WatchStreamClient?
        call = connection.open(
            EtcdMethod.watch.path,
            onMessage: { bytes in
                guard let me, let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
                me.responses.append(r)
                me.eventCount += r.events.count
                me.onResponse?(r)
            }, onClose: { status in me?.closedStatus = status })
        me = self
    }

    public func create(
        _ key: String, rangeEnd: String = "", start: Int64 = 0, prevKV: Bool = false,
        progressNotify: Bool = false, watchID: Int64 = 0
    ) {
        var c = Etcdserverpb_WatchCreateRequest()
        c.key = Data(key.utf8)
        c.rangeEnd = Data(rangeEnd.utf8)
        c.startRevision = start
        c.prevKv = prevKV
        c.progressNotify = progressNotify
        c.watchID = watchID
        var r = Etcdserverpb_WatchRequest()
        r.createRequest = c
        call.send(r)
    }

    public func cancel(_ id: Int64) {
        var r = Etcdserverpb_WatchRequest()
        var c = Etcdserverpb_WatchCancelRequest()
        c.watchID = id
        r.cancelRequest = c
        call.send(r)
    }

    public func requestProgress() {
        var r = Etcdserverpb_WatchRequest()
        r.progressRequest = Etcdserverpb_WatchProgressRequest()
        call.send(r)
    }

    /// Every event received, in order.
    public var events: [Mvccpb_Event] { responses.flatMap(\.events) }

    /// The mod revisions of the events received.
    public var revisions: [Int64] { events.map(\.kv.modRevision) }
}

/// Reads a process's resident memory in KiB (VmRSS) from /proc.
public func residentKiB(pid: Int32) -> Int {
    guard let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
    for line in s.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0
    }
    return 0
}
