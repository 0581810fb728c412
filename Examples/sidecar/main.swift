// A notification sidecar: this program keeps a copy of one prefix of an etcd cluster inside itself
// (Vigil's mirror mode, embedded), reacts to each change as it lands, and serves the etcd API on a
// loopback port for its neighbours. etcd stays the source of truth; nothing here is Raft.
//
//   swift run SidecarExample --endpoints 127.0.0.1:2379 --prefix config/ [--seconds 30]
import Foundation
import VigilServer

/// One line on standard output, unbuffered (the changes show as they come).
@Sendable func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

var endpoints = "127.0.0.1:2379"
var prefix = "config/"
var seconds: Double = .infinity
var args = CommandLine.arguments.dropFirst()
while let flag = args.popFirst() {
    guard let value = args.popFirst() else { break }
    switch flag {
    case "--endpoints": endpoints = value
    case "--prefix": prefix = value
    case "--seconds": seconds = Double(value) ?? seconds
    default:
        FileHandle.standardError.write(Data("unknown flag \(flag)\n".utf8))
        exit(64)
    }
}

var config = Configuration()
config.dataDir = NSTemporaryDirectory() + "vigil-sidecar-\(getpid())"
config.listenClientURLs = ["http://127.0.0.1:0"]
var mirror = MirrorSettings(endpoints: endpoints.split(separator: ",").map(String.init))
mirror.prefix = prefix
config.mirror = mirror
defer { try? FileManager.default.removeItem(atPath: config.dataDir) }

let server = VigilServer(configuration: config)
let ports = try server.start()  // returns once the prefix is loaded
say("mirroring \(prefix) from \(endpoints); serving it on 127.0.0.1:\(ports[0])")

// React to every change under the prefix, in revision order, once the mirror has applied it.
let watch = try await server.watch(.prefix(prefix))
let follower = Task {
    for try await batch in watch {
        for e in batch.events {
            switch e.kind {
            case .put: say("PUT \(e.kv.keyString) = \(e.kv.valueString) (revision \(e.revision))")
            case .delete: say("DELETE \(e.kv.keyString) (revision \(e.revision))")
            }
        }
    }
}

// Reads are local (after one linearizable round trip); writes go to the cluster.
if let kv = try await server.get(prefix + "greeting") {
    say("\(prefix)greeting is \(kv.valueString)")
}

let deadline = Date().addingTimeInterval(seconds)
while Date() < deadline {
    try await Task.sleep(for: .milliseconds(min(100, max(0, deadline.timeIntervalSinceNow * 1000))))
}
follower.cancel()
server.stop()
say("stopped")
