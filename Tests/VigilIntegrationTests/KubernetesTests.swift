import EtcdProto
import Foundation
import GRPC
import Testing
import VigilClient
import VigilCore
import VigilTesting

/// What kube-apiserver relies on for its watch cache: the version its feature checker reads, and
/// progress requests answered only once the stream has everything below their revision.
@Suite(.serialized) struct KubernetesTests {
    let server: LiveServer
    let client: BlockingClient

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync"])
        client = try BlockingClient(port: server.port)
    }

    /// kube-apiserver turns RequestWatchProgress (and with it consistent reads from its cache and
    /// WatchList) on for etcd 3.4.31+ or 3.5.13+: Status must say so.
    @Test func theVersionTurnsOnRequestWatchProgress() throws {
        let status = try client.call(
            EtcdMethod.status.path, Etcdserverpb_StatusRequest(), as: Etcdserverpb_StatusResponse.self
        ).get()
        let parts = status.version.split(separator: ".").compactMap { Int($0) }
        #expect(parts.count == 3)
        let (major, minor, patch) = (parts[0], parts[1], parts[2])
        let accepted = major == 3 && ((minor == 4 && patch >= 31) || (minor == 5 && patch >= 13) || minor > 5)
        #expect(accepted, "version \(status.version)")
    }

    /// A progress request sent while a watcher is still catching up is answered once it is
    /// synced, after every event at or below its revision (the apiserver waits on this answer).
    @Test func aProgressRequestWaitsForTheCatchUp() throws {
        var put = Etcdserverpb_PutRequest()
        put.value = Data(repeating: 0x61, count: 512)
        for i in 0..<2000 {
            put.key = Data("/registry/pods/p\(i)".utf8)
            _ = try client.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self).get()
        }
        let head = try client.call(
            EtcdMethod.range.path,
            {
                var r = Etcdserverpb_RangeRequest()
                r.key = Data("x".utf8)
                return r
            }(),
            as: Etcdserverpb_RangeResponse.self
        ).get().header.revision
        let w = WatchStreamClient(try client.newConnection())
        w.create("/registry/pods/", rangeEnd: "/registry/pods0", start: 1, progressNotify: true)
        w.requestProgress()
        client.runUntil(seconds: 20) { w.responses.contains { $0.watchID == -1 } }
        let progress = try #require(w.responses.firstIndex { $0.watchID == -1 && $0.events.isEmpty })
        #expect(w.responses[progress].header.revision == head)
        // Every event came before it.
        #expect(w.responses[..<progress].reduce(0) { $0 + $1.events.count } == 2000)
        #expect(!w.responses[(progress + 1)...].contains { !$0.events.isEmpty })
    }
}

/// etcd 3.7's `KV/RangeStream` (kube-apiserver uses it for its cache's fills and for lists, and
/// falls back to paginated Range on Unimplemented).
@Suite(.serialized) struct RangeStreamTests {
    let server: LiveServer
    let client: BlockingClient

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync", "--max-request-bytes", "65536"])
        client = try BlockingClient(port: server.port)
    }

    func range(
        _ key: String, _ end: String, _ edit: (inout Etcdserverpb_RangeRequest) -> Void = { _ in }
    )
        -> Etcdserverpb_RangeRequest
    {
        var r = Etcdserverpb_RangeRequest()
        r.key = Data(key.utf8)
        r.rangeEnd = Data(end.utf8)
        edit(&r)
        return r
    }

    /// The chunks of one RangeStream, and how it ended.
    final class Streamed {
        var chunks: [Etcdserverpb_RangeResponse] = []
        var status: GRPCStatus?
        var call: ClientCall?
        var merged: Etcdserverpb_RangeResponse {
            var m = Etcdserverpb_RangeResponse()
            for c in chunks { m.kvs += c.kvs }
            if let last = chunks.last {
                m.header = last.header
                m.more = last.more
                m.count = last.count
            }
            return m
        }
    }

    func stream(_ r: Etcdserverpb_RangeRequest, on c: GRPCClientConnection? = nil) throws -> Streamed {
        let s = Streamed()
        s.call = (c ?? client.connection).open(
            EtcdMethod.rangeStream.path,
            onMessage: { bytes in
                if let m = try? Etcdserverpb_RangeStreamResponse(serializedBytes: bytes) {
                    s.chunks.append(m.rangeResponse)
                }
            }, onClose: { s.status = $0 })
        s.call?.send(try r.serializedBytes())
        s.call?.closeSend()
        return s
    }

    func unary(_ r: Etcdserverpb_RangeRequest) throws -> Etcdserverpb_RangeResponse {
        try client.call(EtcdMethod.range.path, r, as: Etcdserverpb_RangeResponse.self).get()
    }

    func fill(_ n: Int, valueBytes: Int = 200) throws {
        var put = Etcdserverpb_PutRequest()
        put.value = Data(repeating: 0x76, count: valueBytes)
        for i in 0..<n {
            put.key = Data(String(format: "/registry/pods/p%05d", i).utf8)
            _ = try client.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self).get()
        }
    }

    /// Merged, the chunks are the Range answer, whatever the options; only the last chunk has
    /// the header, `more` and `count`; chunks grow toward --max-request-bytes.
    @Test func mergedChunksEqualTheRangeAnswer() throws {
        try fill(3000)
        let end = "/registry/pods0"
        let cases: [Etcdserverpb_RangeRequest] = [
            range("/registry/pods/", end),
            range("/registry/pods/", end) { $0.limit = 1234 },
            range("/registry/pods/", end) { $0.keysOnly = true },
            range("/registry/pods/p00100", end) { $0.serializable = true },
            range("/registry/pods/", end) {
                $0.sortOrder = .ascend
                $0.sortTarget = .key
            },
            range("/registry/pods/p00007", ""),
            range("/registry/pods/", end) { $0.revision = 500 },
        ]
        for r in cases {
            let s = try stream(r)
            client.runUntil(seconds: 20) { s.status != nil }
            #expect(s.status?.code == .ok, "\(r)")
            let want = try unary(r)
            #expect(s.merged == want, "\(r): \(s.chunks.count) chunks")
            #expect(s.chunks.dropLast().allSatisfy { !$0.hasHeader && !$0.more && $0.count == 0 })
        }
        // 3000 values of 200 bytes in 64 KiB chunks: from 10 up, then about a chunk's worth.
        let all = try stream(range("/registry/pods/", end))
        client.runUntil(seconds: 20) { all.status != nil }
        let sizes = all.chunks.map(\.kvs.count)
        #expect(sizes.first == 10 && sizes.count > 5 && sizes.dropLast().max()! >= 160, "\(sizes)")
        // count_only: one message.
        let counted = try stream(range("/registry/pods/", end) { $0.countOnly = true })
        client.runUntil(seconds: 10) { counted.status != nil }
        #expect(counted.chunks.count == 1 && counted.chunks[0].count == 3000 && counted.chunks[0].kvs.isEmpty)
    }

    /// Sorting other than by key and revision filters are refused as etcd 3.7 refuses them.
    @Test func sortAndFiltersAreUnimplemented() throws {
        for (r, message) in [
            (
                range("a", "b") {
                    $0.sortOrder = .descend
                    $0.sortTarget = .key
                }, "RangeStream does not support custom sort orders"
            ),
            (range("a", "b") { $0.minModRevision = 3 }, "RangeStream does not support revision filters"),
        ] {
            let s = try stream(r)
            client.runUntil(seconds: 10) { s.status != nil }
            #expect(s.status?.code == .unimplemented && s.status?.message == message)
        }
        let empty = try stream(range("", ""))
        client.runUntil(seconds: 10) { empty.status != nil }
        #expect(empty.status?.message == "etcdserver: key is not provided")
    }

    /// Every chunk is read at the revision pinned at the start: later writes do not show, and a
    /// compaction past it ends the stream with etcd's compacted error. A reader that stops holds
    /// one chunk in the server, however large the range.
    @Test func chunksAreReadAtOnePinnedRevision() throws {
        try fill(10000, valueBytes: 4000)  // 40 MB
        let end = "/registry/pods0"
        let slow = try client.newConnection()
        // The baseline once the writes are checkpointed (out of the server's memory).
        client.runUntil(seconds: 1.5) { false }
        let rss = residentKiB(pid: try #require(server.pid))
        let s = try stream(range("/registry/pods/", end), on: slow)
        client.runUntil(seconds: 10) { !s.chunks.isEmpty }
        slow.pauseReading()
        client.runUntil(seconds: 1) { false }
        // Writes meanwhile: the stream does not see them.
        var put = Etcdserverpb_PutRequest()
        put.key = Data("/registry/pods/p00001".utf8)
        put.value = Data("changed".utf8)
        _ = try client.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self).get()
        let grown = residentKiB(pid: server.pid!) - rss
        #expect(grown < 12_000 * Int(sanitizerFactor), "the server held \(grown) KiB for a reader that stopped")
        slow.resumeReading()
        client.runUntil(seconds: 20) { s.status != nil }
        #expect(s.status?.code == .ok)
        let pinned = s.merged
        #expect(pinned.kvs.count == 10000 && pinned.kvs.allSatisfy { $0.value.count == 4000 })

        // A compaction past the pinned revision while the reader is stopped.
        let t = try stream(range("/registry/pods/", end), on: slow)
        client.runUntil(seconds: 10) { !t.chunks.isEmpty }
        slow.pauseReading()
        _ = try client.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self).get()
        var compact = Etcdserverpb_CompactionRequest()
        compact.revision = try unary(range("x", "")).header.revision
        _ = try client.call(EtcdMethod.compact.path, compact, as: Etcdserverpb_CompactionResponse.self).get()
        slow.resumeReading()
        client.runUntil(seconds: 20) { t.status != nil }
        #expect(t.status?.code == .outOfRange)
        #expect(t.status?.message == "etcdserver: mvcc: required revision has been compacted")
    }
}
