// Configuration pushed by watches: many subscribers keep a copy of everything under `config/`,
// loading it once with a Range and then applying each change a Watch delivers. Midway some of them
// lose their connection; when they come back they resume the watch from the revision after the
// last one they applied, so they miss nothing and apply nothing twice. At the end every copy is
// compared with the server's.
//
//   swift run ConfigPushExample                       # starts an embedded Vigil on a free port
//   swift run ConfigPushExample --endpoint 127.0.0.1:2379 --subscribers 500 --changes 2000
import ArgumentParser
import EtcdProto
import EventLoop
import Foundation
import GRPC
import VigilClient
import VigilCore
import VigilServer

let prefix = Data("config/".utf8)
let prefixEnd = Data("config0".utf8)  // "/" + 1: the end of the prefix range

/// One subscriber: a local copy of the configuration and the revision it reflects.
final class Subscriber {
    let name: String
    let loop: EventLoop
    let port: Int
    var config: [String: String] = [:]
    /// Every change up to this revision has been applied.
    var revision: Int64 = 0
    var applied = 0
    /// Events at or below the revision already applied (would mean a duplicate or reordering).
    var stale = 0
    var reconnects = 0
    private var connection: GRPCClientConnection?
    private var watch: ClientCall?

    init(name: String, loop: EventLoop, port: Int) {
        self.name = name
        self.loop = loop
        self.port = port
    }

    var isConnected: Bool { watch != nil }

    /// Connects and, the first time (or after a compaction), loads the whole prefix; then watches
    /// from the revision after the last one applied.
    func connect(reload: Bool) {
        GRPCClientConnection.connect(loop: loop, host: "127.0.0.1", port: port) { [self] result in
            guard case .success(let c) = result else { return }
            connection = c
            if reload { load(c) } else { startWatch(c) }
        }
    }

    private func load(_ c: GRPCClientConnection) {
        var r = Etcdserverpb_RangeRequest()
        r.key = prefix
        r.rangeEnd = prefixEnd
        c.unary(EtcdMethod.range.path, r) { [self] (result: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
            guard case .success(let resp) = result else { return }
            config = [:]
            for kv in resp.kvs {
                config[String(decoding: kv.key, as: UTF8.self)] = String(decoding: kv.value, as: UTF8.self)
            }
            revision = resp.header.revision
            startWatch(c)
        }
    }

    private func startWatch(_ c: GRPCClientConnection) {
        watch = c.open(
            EtcdMethod.watch.path,
            onMessage: { [self] bytes in
                guard let r = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { return }
                if r.compactRevision > 0 {
                    // History we needed is gone: start over from a fresh copy.
                    disconnect()
                    connect(reload: true)
                    return
                }
                for e in r.events { apply(e) }
            }, onClose: { _ in })
        var create = Etcdserverpb_WatchCreateRequest()
        create.key = prefix
        create.rangeEnd = prefixEnd
        create.startRevision = revision + 1
        var req = Etcdserverpb_WatchRequest()
        req.createRequest = create
        watch?.send(req)
    }

    private func apply(_ e: Mvccpb_Event) {
        let key = String(decoding: e.kv.key, as: UTF8.self)
        if e.kv.modRevision <= revision { stale += 1 }
        switch e.type {
        case .put: config[key] = String(decoding: e.kv.value, as: UTF8.self)
        case .delete: config[key] = nil
        default: break
        }
        revision = e.kv.modRevision
        applied += 1
    }

    /// Drops the connection (as a network failure would).
    func disconnect() {
        watch = nil
        connection?.close()
        connection = nil
    }

    /// Comes back and resumes from `revision + 1`.
    func reconnect() {
        reconnects += 1
        connect(reload: false)
    }
}

struct ConfigPush: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config-push", abstract: "Many subscribers keep a configuration prefix in sync through watches.")

    @Option(help: "host:port of an etcd v3 server (default: start an embedded Vigil).") var endpoint: String?
    @Option(help: "Subscribers, each with its own connection.") var subscribers = 200
    @Option(help: "Configuration changes to publish (puts and some deletes).") var changes = 1000
    @Option(help: "Configuration keys the changes are spread over.") var keys = 50

    func run() throws {
        var embedded: VigilServer?
        var dataDir: String?
        let port: Int
        if let endpoint {
            guard let p = endpoint.split(separator: ":").last.flatMap({ Int($0) }) else {
                throw ValidationError("endpoint must be host:port")
            }
            port = p
        } else {
            var config = Configuration()
            config.dataDir = NSTemporaryDirectory() + "vigil-config-push-\(getpid())"
            config.listenClientURLs = ["http://127.0.0.1:0"]
            dataDir = config.dataDir
            let server = VigilServer(configuration: config)
            port = try server.start()[0]
            embedded = server
            print("embedded vigil on 127.0.0.1:\(port)")
        }
        defer {
            embedded?.stop()
            if let dataDir { try? FileManager.default.removeItem(atPath: dataDir) }
        }

        let loop = try EventLoop()
        func runUntil(_ seconds: Double, _ done: () -> Bool) -> Bool { loop.run(forAtMost: seconds, until: done) }

        // The publisher: its own connection, one change at a time.
        var publisherConn: GRPCClientConnection?
        GRPCClientConnection.connect(loop: loop, host: "127.0.0.1", port: port) { publisherConn = try? $0.get() }
        guard runUntil(10, { publisherConn != nil }), let publisher = publisherConn else {
            throw ValidationError("cannot connect to 127.0.0.1:\(port)")
        }
        var published = 0
        var lastRevision: Int64 = 0
        func publish(_ n: Int, then: @escaping () -> Void) {
            guard n > 0 else { return then() }
            let key = Data("config/service-\(published % keys)".utf8)
            let done: (Int64) -> Void = { rev in
                published += 1
                lastRevision = rev
                publish(n - 1, then: then)
            }
            if published % 7 == 6 {
                var d = Etcdserverpb_DeleteRangeRequest()
                d.key = key
                publisher.unary(EtcdMethod.deleteRange.path, d) {
                    (r: Result<Etcdserverpb_DeleteRangeResponse, GRPCStatus>) in
                    done((try? r.get().header.revision) ?? lastRevision)
                }
            } else {
                var p = Etcdserverpb_PutRequest()
                p.key = key
                p.value = Data("{\"version\": \(published), \"replicas\": \(published % 9 + 1)}".utf8)
                publisher.unary(EtcdMethod.put.path, p) { (r: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                    done((try? r.get().header.revision) ?? lastRevision)
                }
            }
        }

        // Some configuration exists before anyone subscribes.
        var seeded = false
        publish(keys) { seeded = true }
        _ = runUntil(60) { seeded }

        let subs = (0..<subscribers).map { Subscriber(name: "sub-\($0)", loop: loop, port: port) }
        for s in subs { s.connect(reload: true) }
        _ = runUntil(60) { subs.allSatisfy { $0.isConnected && $0.revision > 0 } }
        print("\(subs.count) subscribers loaded the configuration at revision \(lastRevision)")

        // Half the changes, then a third of the subscribers lose their connection while the other
        // half is published, then they come back.
        var firstHalf = false, secondHalf = false
        publish(changes / 2) { firstHalf = true }
        _ = runUntil(120) { firstHalf }
        let dropped = subs.enumerated().filter { $0.offset % 3 == 0 }.map(\.element)
        for s in dropped { s.disconnect() }
        publish(changes - changes / 2) { secondHalf = true }
        _ = runUntil(120) { secondHalf }
        print(
            "published \(published) changes; \(dropped.count) subscribers were away for the last \(changes - changes / 2)"
        )
        for s in dropped { s.reconnect() }
        let caughtUp = runUntil(120) { subs.allSatisfy { $0.revision == lastRevision } }

        // Compare every copy with the server's.
        var truth: [String: String]?
        var r = Etcdserverpb_RangeRequest()
        r.key = prefix
        r.rangeEnd = prefixEnd
        publisher.unary(EtcdMethod.range.path, r) { (res: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
            guard case .success(let resp) = res else { return }
            var m: [String: String] = [:]
            for kv in resp.kvs {
                m[String(decoding: kv.key, as: UTF8.self)] = String(decoding: kv.value, as: UTF8.self)
            }
            truth = m
        }
        _ = runUntil(30) { truth != nil }
        let inSync = subs.filter { $0.config == truth && $0.revision == lastRevision && $0.stale == 0 }.count
        print(
            "\(inSync)/\(subs.count) subscribers match the server at revision \(lastRevision) "
                + "(\(truth?.count ?? 0) keys); resumed after reconnect: \(dropped.filter { $0.revision == lastRevision }.count)/\(dropped.count)"
        )
        for s in subs { s.disconnect() }
        publisher.close()
        _ = runUntil(1) { false }
        loop.shutdown()
        loop.drain()
        guard caughtUp, inSync == subs.count else { throw ExitCode.failure }
        print("every subscriber has every change, in order, exactly once")
    }
}

ConfigPush.main()
