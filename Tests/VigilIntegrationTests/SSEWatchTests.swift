import Foundation
import Testing
import VigilClient
import VigilTesting

/// Watch over plain HTTP: `GET /v3/watch` as Server-Sent Events, with curl.
@Suite(.serialized) struct SSEWatchTests {
    let server: LiveServer
    let ctl: Etcdctl
    let curl: String

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync", "--experimental-watch-progress-notify-interval", "200ms"])
        ctl = try Etcdctl(endpoint: server.endpoint)
        curl = try #require(which("curl"))
    }

    /// GET with curl for `seconds` (or until the server ends the stream): headers and body.
    func get(_ query: String, headers: [String] = [], seconds: String = "1") throws -> CommandResult {
        try runCommand(
            curl,
            ["-si", "-N", "--max-time", seconds] + headers.flatMap { ["-H", $0] } + ["\(server.url)/v3/watch?\(query)"])
    }

    /// The (id, event) pairs of an SSE body.
    func events(_ body: String) -> [(id: String, event: String)] {
        body.components(separatedBy: "\n\n").compactMap { block in
            let lines = block.split(separator: "\n")
            guard let e = lines.first(where: { $0.hasPrefix("event: ") }) else { return nil }
            let id = lines.first(where: { $0.hasPrefix("id: ") }).map { String($0.dropFirst(4)) } ?? ""
            return (id, String(e.dropFirst(7)))
        }
    }

    @Test func eventsWithRevisionIdsAndResume() throws {
        _ = try ctl.ok("put", "a", "1")  // 2
        _ = try ctl.ok("put", "a/x", "2")  // 3
        _ = try ctl.ok("del", "a/x")  // 4
        _ = try ctl.ok("put", "b", "3")  // 5: not watched
        let r = try get("key=a&prefix=true&start_revision=1&prev_kv=true")
        #expect(r.stdout.contains("Content-Type: text/event-stream"))
        #expect(r.stdout.contains("Access-Control-Allow-Origin: *"))
        let seen = events(r.stdout)
        #expect(seen.map(\.id) == ["2", "3", "4"], "\(r.stdout)")
        #expect(seen.map(\.event) == ["put", "put", "delete"])
        #expect(
            r.stdout.contains(
                #"data: {"kv":{"key":"YS94","create_revision":"3","mod_revision":"3","version":"1","value":"Mg=="}}"#))
        #expect(r.stdout.contains(#""prev_kv":{"key":"YS94""#), "the delete carries the previous value")

        // A reconnect with Last-Event-ID resumes right after it: no gap, no duplicate.
        let resumed = try get("key=a&prefix=true", headers: ["Last-Event-ID: 3"])
        #expect(events(resumed.stdout).map(\.id) == ["4"])
        // A range given as text, percent-encoded where needed.
        _ = try ctl.ok("put", "k y", "v")  // 6
        let spaced = try get("key=k%20y&start_revision=1")
        #expect(events(spaced.stdout).map(\.id) == ["6"])
    }

    @Test func progressCompactionAndBadRequests() throws {
        _ = try ctl.ok("put", "p", "1")
        let progress = try get("key=p&progress_notify=true", seconds: "1.5")
        #expect(events(progress.stdout).contains { $0.event == "progress" }, "\(progress.stdout)")

        _ = try ctl.ok("put", "p", "2")
        _ = try ctl.ok("put", "p", "3")
        _ = try ctl.ok("compaction", "3")
        // A start below the compaction: event compacted, then the stream ends (well before the timeout).
        let started = Date()
        let compacted = try get("key=p&start_revision=2", seconds: "5")
        #expect(
            compacted.stdout.contains(#"event: compacted"#) && compacted.stdout.contains(#""compact_revision":"3""#))
        #expect(Date().timeIntervalSince(started) < 4)

        for (query, headers, words) in [
            ("", [String](), "key is required"),
            ("key=p&colour=red", [], "unknown parameter colour"),
            ("key=%zz", [], "malformed query string"),
            ("key=p&prefix=maybe", [], "take true or false"),
            ("key=p&start_revision=-1", [], "start_revision must be a revision"),
            ("key=p", ["Last-Event-ID: abc"], "Last-Event-ID must be a revision"),
            ("key=p", ["Last-Event-ID: 999999"], "is a future revision"),
        ] {
            let r = try get(query, headers: headers)
            #expect(r.stdout.hasPrefix("HTTP/1.1 400") && r.stdout.contains(words), "\(query): \(r.stdout)")
        }
    }

    /// An idle stream gets keep-alive comments (every 300 ms here) and its events as usual; a busy
    /// one gets none between its events.
    @Test func idleStreamsGetKeepAliveComments() throws {
        let quick = try LiveServer(args: ["--unsafe-no-fsync", "--sse-keepalive-interval", "300ms"])
        let r = try runCommand(curl, ["-s", "-N", "--max-time", "1.5", "\(quick.url)/v3/watch?key=idle"])
        let comments = r.stdout.components(separatedBy: ": keep-alive\n\n").count - 1
        #expect(comments >= 2 && comments <= 6, "\(r.stdout)")
    }

    /// An SSE client that stops reading is parked like a gRPC stream: a bounded queue, the server's
    /// memory flat, another SSE stream served in full; once it reads again it gets every event,
    /// once, in order.
    @Test func aReaderThatStopsIsParkedAndCatchesUp() throws {
        let slowServer = try LiveServer(args: ["--unsafe-no-fsync", "--watch-stream-queue-bytes", "262144"])
        let fd = loopbackSocket(port: slowServer.port)
        #expect(fd >= 0)
        defer { close(fd) }
        let request = Array("GET /v3/watch?key=big/&prefix=true HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        /// Reads until `done` holds for what arrived; `done` sees each new piece with a little of
        /// what came before (the test must not rescan megabytes per read: it would fall behind the
        /// server and look like a stall, as it once did).
        func readSome(until done: (ArraySlice<UInt8>) -> Bool, seconds: Double) {
            let deadline = Date().addingTimeInterval(seconds)
            var tv = timeval(tv_sec: 0, tv_usec: 200_000)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var seen = received.count
            while !done(received[max(0, seen - 16)...]) && Date() < deadline {
                seen = received.count
                let n = recv(fd, &buffer, buffer.count, 0)
                if n > 0 { received += buffer[0..<n] }
            }
        }
        readSome(until: { String(decoding: $0, as: UTF8.self).contains(": watching") }, seconds: 10)
        // Another SSE stream on the same prefix, read all along.
        let fast = try BackgroundCommand(
            curl, ["-s", "-N", "--max-time", "120", "\(slowServer.url)/v3/watch?key=big/&prefix=true"])
        defer { fast.stop() }
        #expect(fast.wait { $0.contains(": watching") })
        let rssBefore = residentKiB(pid: slowServer.pid!)
        // 12 MiB of events while the first stream reads nothing.
        let c = try BlockingClient(port: slowServer.port)
        let revs = putValues(c, c.connection, prefix: "big/", count: 1500, valueSize: 8192)
        #expect(revs.count == 1500)
        func puts(_ text: String) -> Int { text.components(separatedBy: "event: put").count - 1 }
        #expect(fast.wait(timeout: 60) { puts($0) >= 1500 }, "the other stream got everything")
        let metrics = try rawExchange(
            port: slowServer.port, Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        func metric(_ name: String) -> Int {
            metrics.split(separator: "\n").first { $0.hasPrefix(name + " ") }
                .flatMap { Int($0.split(separator: " ")[1]) } ?? -1
        }
        #expect(metric("vigil_watch_parked_total") >= 1, "the reader that stopped was parked")
        let queued = metric("vigil_watch_stream_queued_bytes_max")
        #expect(queued >= 0 && queued <= 262_144 + 64 * 1024, "queued \(queued)")
        let growth = residentKiB(pid: slowServer.pid!) - rssBefore
        #expect(Double(growth) < 160 * 1024 * sanitizerFactor, "server RSS grew \(growth) KiB")
        // Reading again: every event, once, in order (ids are the revisions).
        let last = try #require(revs.last)
        readSome(until: { String(decoding: $0, as: UTF8.self).contains("id: \(last)\n") }, seconds: 30)
        // Lines of the chunked body ("\r\n" is one Character: split the bytes).
        let ids = received.split(separator: UInt8(ascii: "\n")).map { String(decoding: $0, as: UTF8.self) }
            .filter { $0.hasPrefix("id: ") }.compactMap { Int64($0.dropFirst(4)) }
        #expect(ids == Array(revs.prefix(ids.count)), "what arrived is in order, without duplicates")
        #expect(ids == revs, "\(received.count) bytes")
    }
}
