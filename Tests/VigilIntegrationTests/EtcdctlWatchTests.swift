import Foundation
import Testing
import VigilTesting

/// `etcdctl watch` (the real v3.4 binary) against the real server.
@Suite(.serialized) struct EtcdctlWatchTests {
    let server: LiveServer
    let ctl: Etcdctl

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync"])
        ctl = try Etcdctl(endpoint: server.endpoint)
    }

    /// Starts a watch and waits until the server has created it (a put made after this is seen).
    func startWatch(_ args: String...) throws -> BackgroundCommand {
        let w = try ctl.background(["watch"] + args)
        // etcdctl prints nothing on create; give the stream a moment, then check it is alive.
        usleep(400_000)
        #expect(w.isRunning)
        return w
    }

    @Test func keyPrefixAndRangeWatches() throws {
        let key = try startWatch("k")
        let prefix = try startWatch("app/", "--prefix")
        let range = try startWatch("b", "d")
        _ = try ctl.ok("put", "k", "v1")
        _ = try ctl.ok("put", "app/x", "1")
        _ = try ctl.ok("put", "app/y", "2")
        _ = try ctl.ok("put", "c", "in-range")
        _ = try ctl.ok("put", "d", "out-of-range")
        _ = try ctl.ok("del", "app/", "--prefix")
        #expect(key.wait { $0.contains("v1") })
        #expect(prefix.wait { $0.contains("DELETE\napp/y") })
        #expect(range.wait { $0.contains("in-range") })
        #expect(key.stop() == "PUT\nk\nv1\n")
        #expect(prefix.stop() == "PUT\napp/x\n1\nPUT\napp/y\n2\nDELETE\napp/x\n\nDELETE\napp/y\n\n")
        #expect(range.stop() == "PUT\nc\nin-range\n")
    }

    @Test func historyFromRevisionAndPrevKV() throws {
        _ = try ctl.ok("put", "h", "1")  // 2
        _ = try ctl.ok("put", "h", "2")  // 3
        _ = try ctl.ok("del", "h")  // 4
        let w = try ctl.background(["watch", "h", "--rev", "2", "--prev-kv"])
        #expect(w.wait { $0.contains("DELETE") })
        _ = try ctl.ok("put", "h", "3")  // 5, live
        #expect(w.wait { $0.hasSuffix("PUT\nh\n3\n") })
        #expect(w.stop() == "PUT\nh\n1\nPUT\nh\n1\nh\n2\nDELETE\nh\n2\nh\n\nPUT\nh\n3\n")
    }

    @Test func watchFromCompactedRevisionIsCanceled() throws {
        for i in 0..<5 { _ = try ctl.ok("put", "c", "\(i)") }
        _ = try ctl.ok("compaction", "4")
        let w = try ctl.background(["watch", "c", "--rev", "2"])
        #expect(w.wait { !$0.isEmpty })
        let out = w.stop()
        #expect(out.contains("required revision has been compacted"), "\(out)")
        #expect(!out.contains("PUT"))
    }

    @Test func interactiveWatchWithProgress() throws {
        _ = try ctl.ok("put", "p", "1")
        let w = try ctl.background(["watch", "-i"])
        w.write("watch p\n")
        usleep(400_000)
        _ = try ctl.ok("put", "p", "2")
        #expect(w.wait { $0.contains("PUT\np\n2") })
        w.write("progress\n")
        #expect(w.wait { $0.contains("progress notify: 3") })
        w.stop()
    }
}
