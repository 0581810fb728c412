import EtcdProto
import Foundation
import GRPC
import Testing
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
