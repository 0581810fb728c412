// An embedded Vigil: a program that serves etcd's API on a loopback port and, in the same process,
// works with its own keys through the in-process API (no socket): it follows `config/` with a
// watch, writes with put and txn, holds a lease, reads back, and stops cleanly. Any etcd client
// (etcdctl, clientv3, EtcdClient) could talk to the same port meanwhile.
import Foundation
import VigilServer

var config = Configuration()
config.dataDir = NSTemporaryDirectory() + "vigil-embedded-\(getpid())"
config.listenClientURLs = ["http://127.0.0.1:0"]  // port 0: let the kernel pick a free one
defer { try? FileManager.default.removeItem(atPath: config.dataDir) }

let server = VigilServer(configuration: config)
let ports = try server.start()
print("vigil serving on 127.0.0.1:\(ports[0])")

// React to our own keys: the watch is fed by the same hub as the gRPC watchers.
let watch = try await server.watch(.prefix("config/"))
let follower = Task {
    var seen = 0
    for try await batch in watch {
        for e in batch.events {
            print("watch: \(e.kind) \(e.kv.keyString) = \(e.kv.valueString) at revision \(e.revision)")
            seen += 1
        }
        if seen == 3 { return seen }
    }
    return seen
}

let put = try await server.put("greeting", "hello from an embedded vigil")
print("put greeting at revision \(put.header.revision)")
if let kv = try await server.get("greeting") { print("get greeting = \(kv.valueString)") }

try await server.put("config/mode", "fast")
// Compare-and-swap: change the mode only if it is still "fast".
let swapped = try await server.txn(
    Txn().when(.value("config/mode", .equal, "fast")).then(.put("config/mode", "safe")).else(.get("config/mode")))
print("txn succeeded: \(swapped.succeeded)")

let lease = try await server.grantLease(ttl: 10)
try await server.put("config/owner", "me", PutOptions(lease: lease.id))
print("lease \(lease.id) holds \(try await server.timeToLive(lease.id, keys: true).keys.count) key")

print("watch saw \(try await follower.value) changes")
server.stop()
print("stopped cleanly")
