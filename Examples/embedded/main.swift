// An embedded Vigil: start a server inside this process on a loopback port, write a key through
// the in-process API, read it back, and stop cleanly. Any etcd client (etcdctl, clientv3, …) could
// talk to the same port while it runs.
import Foundation
import VigilServer

var config = Configuration()
config.dataDir = NSTemporaryDirectory() + "vigil-embedded-\(getpid())"
config.listenClientURLs = ["http://127.0.0.1:0"]  // port 0: let the kernel pick a free one
defer { try? FileManager.default.removeItem(atPath: config.dataDir) }

let server = VigilServer(configuration: config)
let ports = try server.start()
print("vigil serving on 127.0.0.1:\(ports[0])")

let revision = try server.put(Array("greeting".utf8), Array("hello from an embedded vigil".utf8))
print("put greeting at revision \(revision)")

if let value = try server.get(Array("greeting".utf8)) {
    print("get greeting = \(String(decoding: value, as: UTF8.self))")
}

server.stop()
print("stopped cleanly")
