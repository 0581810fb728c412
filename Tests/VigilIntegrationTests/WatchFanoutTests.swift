import EtcdProto
import Foundation
import GRPC
import Testing
import VigilClient
import VigilCore
import VigilTesting

/// Puts `count` values under `prefix` with `inFlight` concurrent requests; returns the revisions.
func putValues(
    _ c: BlockingClient, _ conn: GRPCClientConnection, prefix: String, count: Int, valueSize: Int = 16,
    inFlight: Int = 16, whileRunning: (() -> Void)? = nil
) -> [Int64] {
    var revisions: [Int64] = []
    var next = 0, done = 0
    func issue() {
        guard next < count else { return }
        var p = Etcdserverpb_PutRequest()
        p.key = Data("\(prefix)\(next % 50)".utf8)
        p.value = Data(repeating: UInt8(ascii: "v"), count: valueSize)
        next += 1
        conn.unary(EtcdMethod.put.path, p) { (r: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
            if case .success(let resp) = r { revisions.append(resp.header.revision) }
            done += 1
            whileRunning?()
            issue()
        }
    }
    for _ in 0..<inFlight { issue() }
    c.runUntil(seconds: 120) { done == count }
    return revisions.sorted()
}

/// Watches through our own client against the real binary: fan-out, slow consumers, cancel and
/// resume, progress under load.
@Suite(.serialized) struct WatchFanoutTests {
    @Test func thousandStreamsGetEveryEventOnceInOrder() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let c = try BlockingClient(port: server.port)
        var conns: [GRPCClientConnection] = []
        for _ in 0..<10 { conns.append(try c.newConnection()) }
        var streams: [WatchStreamClient] = []
        for i in 0..<1000 {
            let s = WatchStreamClient(conns[i % 10])
            s.create("cfg/", rangeEnd: "cfg0")
            streams.append(s)
        }
        c.runUntil { streams.allSatisfy { !$0.responses.isEmpty } }
        #expect(streams.allSatisfy { $0.responses.first?.created == true })
        let start = try #require(streams.first?.responses.first?.header.revision)
        let revs = putValues(c, c.connection, prefix: "cfg/", count: 200)
        #expect(revs == Array((start + 1)...(start + 200)))
        c.runUntil { streams.allSatisfy { $0.eventCount >= 200 } }
        for s in streams {
            #expect(s.revisions == revs, "every event exactly once, in order")
        }
        let watchers = try rawExchange(
            port: server.port, Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        #expect(watchers.contains("etcd_debugging_mvcc_watcher_total 1000"))
    }

    @Test func aStreamThatStopsReadingNeitherSlowsOthersNorGrowsMemory() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync", "--watch-stream-queue-bytes", "262144"])
        let c = try BlockingClient(port: server.port)
        let slowConn = try c.newConnection()
        let slow = WatchStreamClient(slowConn)
        slow.create("big/", rangeEnd: "big0")
        var fast: [WatchStreamClient] = []
        let fastConn = try c.newConnection()
        for _ in 0..<20 {
            let s = WatchStreamClient(fastConn)
            s.create("big/", rangeEnd: "big0")
            fast.append(s)
        }
        c.runUntil { !slow.responses.isEmpty && fast.allSatisfy { !$0.responses.isEmpty } }
        slowConn.pauseReading()
        let rssBefore = residentKiB(pid: server.pid!)
        // 24 MiB of events while one stream reads nothing.
        let revs = putValues(c, c.connection, prefix: "big/", count: 3000, valueSize: 8192)
        c.runUntil { fast.allSatisfy { $0.eventCount >= 3000 } }
        for s in fast { #expect(s.revisions == revs, "the other streams got everything") }
        let metrics = try rawExchange(
            port: server.port, Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        let queued =
            metrics.split(separator: "\n").first { $0.hasPrefix("vigil_watch_stream_queued_bytes_max ") }
            .flatMap { Int($0.split(separator: " ")[1]) } ?? -1
        // One response past the bound at most; the rest waits in the store and ring, not in a queue.
        #expect(queued >= 0 && queued <= 262_144 + 64 * 1024, "queued \(queued)")
        // Parked at least once (it may resume while kernel buffers still take bytes, and park again).
        let parked =
            metrics.split(separator: "\n").first { $0.hasPrefix("vigil_watch_parked_total ") }
            .flatMap { Int($0.split(separator: " ")[1]) } ?? 0
        #expect(parked >= 1)
        let growth = residentKiB(pid: server.pid!) - rssBefore
        #expect(Double(growth) < 160 * 1024 * sanitizerFactor, "server RSS grew \(growth) KiB")
        // When the slow reader comes back it gets every event, exactly once, in order.
        slowConn.resumeReading()
        c.runUntil(seconds: 60) { slow.eventCount >= 3000 }
        #expect(slow.revisions == revs)
    }

    @Test func cancelThenResumeFromTheNextRevision() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let c = try BlockingClient(port: server.port)
        let s = WatchStreamClient(c.connection)
        s.create("r/", rangeEnd: "r0", prevKV: true)
        c.runUntil { !s.responses.isEmpty }
        let first = putValues(c, c.connection, prefix: "r/", count: 20)
        c.runUntil { s.eventCount >= 20 }
        s.cancel(0)
        c.runUntil { s.responses.contains { $0.canceled } }
        let canceled = try #require(s.responses.last)
        #expect(canceled.canceled && canceled.watchID == 0)
        let second = putValues(c, c.connection, prefix: "r/", count: 20)
        // Resume where we stopped: the events written after the cancel, none twice.
        let again = WatchStreamClient(c.connection)
        again.create("r/", rangeEnd: "r0", start: first.last! + 1)
        c.runUntil { again.eventCount >= 20 }
        #expect(again.revisions == second)
        #expect(s.revisions == first)
    }

    @Test func progressRequestsUnderLoadAreBookmarks() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync"])
        let c = try BlockingClient(port: server.port)
        let s = WatchStreamClient(c.connection)
        s.create("p/", rangeEnd: "p0")
        c.runUntil { !s.responses.isEmpty }
        var asked = 0
        let revs = putValues(c, c.connection, prefix: "p/", count: 300) {
            asked += 1
            if asked % 10 == 0 { s.requestProgress() }
        }
        c.runUntil { s.eventCount >= 300 }
        s.requestProgress()
        c.runUntil { s.responses.last?.watchID == -1 && s.responses.last?.events.isEmpty == true }
        // Bookmark rule: after a progress response at revision R, every event has revision > R,
        // and every event ≤ R came before it.
        var seen: Int64 = 0
        var progress = 0
        for r in s.responses.dropFirst() {
            if r.events.isEmpty && r.watchID == -1 {
                progress += 1
                #expect(r.header.revision >= seen)
                seen = r.header.revision
            } else {
                for e in r.events {
                    #expect(e.kv.modRevision > seen)
                    seen = e.kv.modRevision
                }
            }
        }
        #expect(progress >= 1)
        #expect(s.revisions == revs)
    }
}
