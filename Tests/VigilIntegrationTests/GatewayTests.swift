import EtcdProto
import Foundation
import GRPC
import SwiftProtobuf
import Testing
import VigilClient
import VigilCore
import VigilTesting

/// The HTTP/JSON gateway with real HTTP requests (curl, as etcd's gateway docs use it), checked
/// against the same request's gRPC answer.
@Suite(.serialized) struct GatewayTests {
    let server: LiveServer
    let curlPath: String

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync", "--http-read-timeout", "0.5"])
        curlPath = try #require(which("curl"), "curl is installed by scripts/install-deps.sh --test")
    }

    /// POSTs `body` to `path`; returns (HTTP status, body).
    func post(_ path: String, _ body: String) throws -> (Int, String) {
        let r = try runCommand(
            curlPath, ["-s", "-X", "POST", "-w", "\n%{http_code}", "\(server.url)\(path)", "-d", body])
        let lines = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
    }

    func json(_ s: String) -> NSDictionary? {
        (try? JSONSerialization.jsonObject(with: Data(s.utf8))) as? NSDictionary
    }

    /// The gRPC answer to the same request, in the gateway's JSON mapping.
    func grpcJSON<Req: SwiftProtobuf.Message, Resp: SwiftProtobuf.Message>(
        _ path: String, _ req: Req, _: Resp.Type
    ) throws -> NSDictionary? {
        let c = try BlockingClient(port: server.port)
        let r: Result<Resp, GRPCStatus> = c.call(path, req)
        var o = JSONEncodingOptions()
        o.preserveProtoFieldNames = true
        return json(try r.get().jsonString(options: o))
    }

    @Test func unaryPathsAnswerAsGRPCDoes() throws {
        let (ps, put) = try post("/v3/kv/put", #"{"key":"Zm9v","value":"YmFy"}"#)
        #expect(ps == 200)
        #expect(
            put
                == #"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"2","raft_term":"2"}}"#
        )

        var range = Etcdserverpb_RangeRequest()
        range.key = Data("foo".utf8)
        let (rs, got) = try post("/v3/kv/range", #"{"key":"Zm9v"}"#)
        #expect(rs == 200)
        #expect(
            got.contains(
                #""kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1""#
            ))
        #expect(json(got) == (try grpcJSON(EtcdMethod.range.path, range, Etcdserverpb_RangeResponse.self)))
        // camelCase names and numbers as numbers are accepted too; /v3beta is an alias.
        let (_, camel) = try post("/v3beta/kv/range", #"{"key":"Zm9v","rangeEnd":"Zm9w","revision":2}"#)
        #expect(json(camel)?["count"] as? String == "1")

        let (ts, txn) = try post(
            "/v3/kv/txn",
            #"{"compare":[{"target":"CREATE","key":"Zm9v","create_revision":"2"}],"success":[{"request_put":{"key":"Zm9v","value":"YmF6"}}]}"#
        )
        #expect(ts == 200)
        #expect(txn.contains(#""succeeded":true,"responses":[{"response_put":{"header":{"revision":"3"}}}]"#))

        let (ls, lease) = try post("/v3/lease/grant", #"{"TTL":"60","ID":"77"}"#)
        #expect(ls == 200)
        #expect(json(lease)?["ID"] as? String == "77" && json(lease)?["TTL"] as? String == "60")
        _ = try post("/v3/kv/put", #"{"key":"bGVhc2Vk","value":"eA==","lease":"77"}"#)
        var ttl = Etcdserverpb_LeaseTimeToLiveRequest()
        ttl.id = 77
        ttl.keys = true
        let (_, ttlJSON) = try post("/v3/lease/timetolive", #"{"ID":"77","keys":true}"#)
        #expect(json(ttlJSON)?["keys"] as? [String] == ["bGVhc2Vk"])
        #expect(json(ttlJSON)?["grantedTTL"] as? String == "60")
        let (_, leases) = try post("/v3/lease/leases", "{}")
        #expect(
            json(leases)
                == (try grpcJSON(
                    EtcdMethod.leaseLeases.path, Etcdserverpb_LeaseLeasesRequest(),
                    Etcdserverpb_LeaseLeasesResponse.self)))
        let (_, members) = try post("/v3/cluster/member/list", "{}")
        #expect(
            json(members)
                == (try grpcJSON(
                    EtcdMethod.memberList.path, Etcdserverpb_MemberListRequest(), Etcdserverpb_MemberListResponse.self))
        )
        let (ss, status) = try post("/v3/maintenance/status", "{}")
        #expect(ss == 200 && json(status)?["version"] as? String == "3.4.31")
        #expect(try post("/v3/lease/revoke", #"{"ID":"77"}"#).0 == 200)
        #expect(try post("/v3/kv/range", #"{"key":"bGVhc2Vk"}"#).1.contains("kvs") == false)

        let (ds, del) = try post("/v3/kv/deleterange", #"{"key":"Zm9v","prev_kv":true}"#)
        #expect(ds == 200 && json(del)?["deleted"] as? String == "1")
        let (cs, _) = try post("/v3/kv/compaction", #"{"revision":"3"}"#)
        #expect(cs == 200)
        let (es, err) = try post("/v3/kv/range", #"{"key":"Zm9v","revision":"2"}"#)
        #expect(es == 400)
        #expect(
            err
                == #"{"error":"etcdserver: mvcc: required revision has been compacted","message":"etcdserver: mvcc: required revision has been compacted","code":11}"#
        )
        let (ns, notFound) = try post("/v3/lease/revoke", #"{"ID":"12345"}"#)
        #expect(ns == 404 && notFound.contains(#""code":5"#))
    }

    @Test func watchStreamReceivesPutsMadeOverGRPC() throws {
        let w = try BackgroundCommand(
            curlPath,
            [
                "-s", "-N", "-X", "POST", "\(server.url)/v3/watch",
                "-d", #"{"create_request":{"key":"d2F0Y2hlZA==","prev_kv":true}}"#,
            ])
        #expect(w.wait { $0.contains(#""created":true"#) })
        let c = try BlockingClient(port: server.port)
        for v in ["1", "2"] {
            var p = Etcdserverpb_PutRequest()
            p.key = Data("watched".utf8)
            p.value = Data(v.utf8)
            _ = c.call(EtcdMethod.put.path, p, as: Etcdserverpb_PutResponse.self)
        }
        #expect(w.wait { $0.contains(#""prev_kv":{"key":"d2F0Y2hlZA==""#) })
        let out = w.stop()
        let lines = out.split(separator: "\n")
        #expect(lines.count == 3)
        #expect(lines.allSatisfy { $0.hasPrefix(#"{"result":{"header":"#) })
        #expect(lines[1].contains(#""value":"MQ==""#) && lines[2].contains(#""value":"Mg==""#))
    }

    func metric(_ name: String) throws -> String? {
        let m = try runCommand(curlPath, ["-s", "\(server.url)/metrics"]).stdout
        return m.split(separator: "\n").first { $0.hasPrefix(name + " ") }.map { String($0.split(separator: " ")[1]) }
    }

    @Test func sameGatewayOverH2CAndStreamsEndWithTheirClients() throws {
        let put = try runCommand(
            curlPath,
            [
                "-s", "--http2-prior-knowledge", "-X", "POST", "\(server.url)/v3/kv/put",
                "-d", #"{"key":"aDI=","value":"eQ=="}"#,
            ])
        #expect(put.stdout.hasPrefix(#"{"header":{"cluster_id":"14841639068965178418""#))
        let health = try runCommand(curlPath, ["-s", "--http2-prior-knowledge", "\(server.url)/health"])
        #expect(health.stdout == #"{"health":"true"}"#)
        for h2 in [true, false] {
            let w = try BackgroundCommand(
                curlPath,
                ["-s", "-N"] + (h2 ? ["--http2-prior-knowledge"] : []) + [
                    "-X", "POST", "\(server.url)/v3/watch", "-d", #"{"create_request":{"key":"aDI="}}"#,
                ])
            #expect(w.wait { $0.contains(#""created":true"#) })
            #expect(try metric("etcd_debugging_mvcc_watcher_total") == "1")
            _ = w.stop()
            // The client left: its watch stream and watcher are gone.
            let deadline = Date().addingTimeInterval(5)
            while Date() < deadline, try metric("etcd_debugging_mvcc_watcher_total") != "0" { usleep(50_000) }
            #expect(try metric("etcd_debugging_mvcc_watcher_total") == "0")
            #expect(try metric("etcd_debugging_mvcc_watch_stream_total") == "0")
        }
    }

    @Test func aGatewayWatchThatStopsReadingResumesComplete() throws {
        let slow = try LiveServer(args: ["--unsafe-no-fsync", "--watch-stream-queue-bytes", "262144"])
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(slow.port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        #expect(rc == 0)
        let body = #"{"create_request":{"key":"Zy8=","range_end":"ZzA="}}"#  // prefix "g/"
        let request = "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        _ = Array(request.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        usleep(300_000)
        // 1,000 events of 16 KiB while this client reads nothing.
        let c = try BlockingClient(port: slow.port)
        var done = 0, next = 0, last: Int64 = 0
        func issue() {
            guard next < 1000 else { return }
            var p = Etcdserverpb_PutRequest()
            p.key = Data("g/\(next)".utf8)
            p.value = Data(repeating: 0x61, count: 16 * 1024)
            next += 1
            c.connection.unary(EtcdMethod.put.path, p) { (r: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                last = max(last, (try? r.get().header.revision) ?? 0)
                done += 1
                issue()
            }
        }
        for _ in 0..<16 { issue() }
        c.runUntil(seconds: 60) { done == 1000 }
        let metrics = try rawExchange(
            port: slow.port, Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        #expect(!metrics.contains("vigil_watch_parked_total 0\n"), "the stalled gateway watch was parked")
        // Now read: every event arrives, once, even though the stream was parked meanwhile.
        var tv = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var received: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        let deadline = Date().addingTimeInterval(30)
        func events() -> Int {
            String(decoding: received, as: UTF8.self).components(separatedBy: #""mod_revision""#).count - 1
        }
        while Date() < deadline {
            let n = read(fd, &buf, buf.count)
            if n > 0 { received += buf[0..<n] } else if events() >= 1000 { break }
        }
        #expect(events() == 1000)
        #expect(String(decoding: received, as: UTF8.self).contains(#""mod_revision":"\#(last)""#))
    }

    @Test func keepAliveOverHTTP() throws {
        _ = try post("/v3/lease/grant", #"{"TTL":"30","ID":"5"}"#)
        let (s, body) = try post("/v3/lease/keepalive", #"{"ID":"5"}{"ID":"6"}"#)
        #expect(s == 200)
        let lines = body.split(separator: "\n")
        #expect(lines.count == 2)
        #expect(lines[0].contains(#""ID":"5","TTL":"30""#))
        #expect(lines[1].contains(#""ID":"6""#) && !lines[1].contains("TTL"))
    }

    @Test func badInputGetsClearErrors() throws {
        #expect(try post("/v3/kv/range", #"{"key": "#).0 == 400)
        let (ws, wrongType) = try post("/v3/kv/range", #"{"key": {"a": 1}}"#)
        #expect(ws == 400 && wrongType.contains(#""code":3"#))
        #expect(try post("/v3/kv/range", #"{"no_such_field": 1}"#).0 == 400)
        #expect(try post("/v3/kv/range", #"{"key": ""}"#).1.contains("etcdserver: key is not provided"))
        #expect(try post("/v3/kv/nothing", "{}").0 == 404)
        let get = try runCommand(
            curlPath, ["-s", "-o", "/dev/null", "-w", "%{http_code}", "\(server.url)/v3/kv/range"])
        #expect(get.stdout == "405")
        // Oversized: past the request limit (encoded as JSON).
        let big = String(repeating: "A", count: 3 << 20)
        let tooBig = try runCommand(
            curlPath,
            [
                "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                "\(server.url)/v3/kv/put", "--data-binary", "@-",
            ],
            stdin: #"{"key":"YQ==","value":""# + big + #""}"#)
        #expect(tooBig.stdout == "413")
        // A value just over 1.5 MiB fits the body limit but not the request limit.
        let over = Data(repeating: 1, count: 1_572_864 + 10).base64EncodedString()
        let tooLarge = try runCommand(
            curlPath, ["-s", "-X", "POST", "\(server.url)/v3/kv/put", "--data-binary", "@-"],
            stdin: #"{"key":"YQ==","value":""# + over + #""}"#)
        #expect(tooLarge.stdout.contains("etcdserver: request is too large"))
        // Half-sent: the body never completes; the read timeout answers 408.
        let half = try rawExchange(
            port: server.port, Array("POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"k".utf8),
            timeout: 5)
        #expect(half.hasPrefix("HTTP/1.1 408"))
        // The server is still fine.
        #expect(try post("/v3/kv/range", #"{"key":"YQ=="}"#).0 == 200)
    }

    @Test func manyKeepAliveRequestsOnOneConnection() throws {
        var raw = ""
        let body = #"{"key":"YQ=="}"#
        for i in 0..<100 {
            raw += "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: \(body.utf8.count)\r\n"
            raw += i == 99 ? "Connection: close\r\n\r\n" : "\r\n"
            raw += body
        }
        let out = try rawExchange(port: server.port, Array(raw.utf8), timeout: 10)
        #expect(out.components(separatedBy: "HTTP/1.1 200 OK").count - 1 == 100)
    }

    /// etcd's CORS: every origin by default (`--cors` = `*`), the listed ones otherwise; OPTIONS
    /// answered 200; streamed answers carry the headers too.
    @Test func corsAsEtcd() throws {
        let h = try runCommand(curlPath, ["-si", "\(server.url)/health"]).stdout
        #expect(h.contains("Access-Control-Allow-Origin: *\r\n"))
        #expect(h.contains("Access-Control-Allow-Headers: accept, content-type, authorization\r\n"))
        let options = try runCommand(curlPath, ["-si", "-X", "OPTIONS", "\(server.url)/v3/kv/range"]).stdout
        #expect(
            options.hasPrefix("HTTP/1.1 200")
                && options.contains("Access-Control-Allow-Methods: POST, GET, OPTIONS, PUT, DELETE"))
        let h2 = try runCommand(curlPath, ["-si", "--http2-prior-knowledge", "\(server.url)/v3/kv/range", "-d", "{}"])
        #expect(h2.stdout.contains("access-control-allow-origin: *"))
        let watch = try runCommand(
            curlPath,
            ["-si", "-N", "--max-time", "1", "\(server.url)/v3/watch", "-d", #"{"create_request":{"key":"YQ=="}}"#])
        #expect(
            watch.stdout.contains("Access-Control-Allow-Origin: *\r\n") && watch.stdout.contains(#""created":true"#))

        let listed = try LiveServer(args: ["--unsafe-no-fsync", "--cors", "http://a.example,http://c.example"])
        let a = try runCommand(curlPath, ["-si", "-H", "Origin: http://a.example", "\(listed.url)/health"]).stdout
        #expect(a.contains("Access-Control-Allow-Origin: http://a.example\r\n"))
        let b = try runCommand(curlPath, ["-si", "-H", "Origin: http://b.example", "\(listed.url)/health"]).stdout
        #expect(!b.contains("Access-Control-Allow-Origin") && b.contains(#"{"health":"true"}"#))
    }

    @Test func healthVersionMetrics() throws {
        let health = try runCommand(curlPath, ["-s", "\(server.url)/health"])
        #expect(health.stdout == #"{"health":"true"}"#)
        let serializable = try runCommand(curlPath, ["-s", "\(server.url)/health?serializable=true&exclude=NOSPACE"])
        #expect(serializable.stdout == #"{"health":"true"}"#)
        let post = try runCommand(curlPath, ["-s", "-w", "%{http_code}", "-X", "POST", "\(server.url)/health"])
        #expect(post.stdout == "Method Not Allowed\n405")
        // etcd 3.5/3.6's probes.
        func get(_ path: String) throws -> String {
            try runCommand(curlPath, ["-s", "-w", "%{http_code}", "\(server.url)\(path)"]).stdout
        }
        #expect(try get("/livez") == "ok\n200")
        #expect(try get("/readyz") == "ok\n200")
        #expect(try get("/livez?verbose") == "[+]serializable_read ok\nlivez check passed\n200")
        #expect(
            try get("/readyz?verbose&exclude=linearizable_read")
                == "[+]data_corruption ok\n[+]serializable_read ok\nreadyz check passed\n200")
        #expect(try get("/readyz/data_corruption?verbose") == "[+]data_corruption ok\nreadyz check passed\n200")
        #expect(try get("/readyz?exclude=nope").hasSuffix("no matches for \"nope\"\n400"))
        #expect(try get("/livez/nope").hasSuffix("404"))
        let version = try runCommand(curlPath, ["-s", "\(server.url)/version"])
        #expect(json(version.stdout)?["etcdserver"] as? String == "3.4.31")
        #expect(json(version.stdout)?["etcdcluster"] as? String == "3.4.0")
        let c = try BlockingClient(port: server.port)
        var r = Etcdserverpb_RangeRequest()
        r.key = Data("m".utf8)
        _ = c.call(EtcdMethod.range.path, r, as: Etcdserverpb_RangeResponse.self)
        r.key = Data()
        _ = c.call(EtcdMethod.range.path, r, as: Etcdserverpb_RangeResponse.self)
        let metrics = try runCommand(curlPath, ["-s", "\(server.url)/metrics"])
        #expect(
            metrics.stdout.contains(
                #"grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#
            ))
        #expect(
            metrics.stdout.contains(
                #"grpc_server_handled_total{grpc_code="InvalidArgument",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#
            ))
        #expect(
            metrics.stdout.contains(
                #"grpc_server_handling_seconds_count{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 2"#
            ))
        #expect(metrics.stdout.contains("vigil_loop_turn_seconds_count "))
        #expect(metrics.stdout.contains("vigil_lease_total 0"))
        #expect(metrics.stdout.contains("etcd_debugging_mvcc_current_revision "))
        #expect(metrics.stdout.contains("etcd_debugging_mvcc_watcher_total "))
        #expect(metrics.stdout.contains("etcd_server_health_success 2\n"))
        #expect(metrics.stdout.contains("etcd_server_health_failures 0\n"))
    }

    /// etcd's e2e v3_curl_maxstream tests: etcd's gateway calls its server over one gRPC
    /// connection, so with `--max-concurrent-streams 3` three gateway watches take every stream
    /// and a range waits (curl times out) until one of them ends.
    @Test func maxConcurrentStreamsBoundsTheGatewaysCalls() throws {
        let limited = try LiveServer(args: ["--unsafe-no-fsync", "--max-concurrent-streams", "3"])
        let create = #"{"create_request":{"key":"Zm9v"}}"#
        let range = ["-s", "\(limited.url)/v3/kv/range", "-d", #"{"key":"Zm9v"}"#]
        var watches: [BackgroundCommand] = []
        defer { for w in watches { w.stop() } }
        func watch() throws {
            let w = try BackgroundCommand(curlPath, ["-s", "-N", "\(limited.url)/v3/watch", "-d", create])
            #expect(w.wait { $0.contains(#""created":true"#) })
            watches.append(w)
        }
        for _ in 0..<2 { try watch() }
        // Below the limit: the range is answered.
        #expect(try runCommand(curlPath, ["--max-time", "5"] + range).stdout.contains(#""revision":"#))
        // At the limit: it waits past curl's deadline (exit 28: operation timed out).
        try watch()
        let blocked = try runCommand(curlPath, ["--max-time", "2"] + range)
        #expect(blocked.status == 28 && blocked.stdout.isEmpty, "\(blocked.output)")
        // A waiting call runs as soon as a watch ends.
        let waiting = try BackgroundCommand(curlPath, ["--max-time", "10"] + range)
        usleep(300_000)
        #expect(!waiting.output.contains("revision"))
        watches.removeFirst().stop()
        #expect(waiting.wait { $0.contains(#""revision":"#) })

        // gRPC: the limit is in the connection's SETTINGS, so a client (nghttp2's, as Go's) opens a
        // 4th stream only once one of its 3 ends.
        let c = try BlockingClient(port: limited.port)
        var streams = (0..<3).map { _ in WatchStreamClient(c.connection) }
        for w in streams { w.create("foo") }
        c.runUntil(seconds: 10) { streams.allSatisfy { !$0.responses.isEmpty } }
        var get = Etcdserverpb_RangeRequest()
        get.key = Data("foo".utf8)
        var answered = false
        c.connection.unary(EtcdMethod.range.path, get) { (_: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
            answered = true
        }
        c.runUntil(seconds: 1) { answered }
        #expect(!answered)
        streams.removeFirst().call.cancel()
        c.runUntil(seconds: 10) { answered }
        #expect(answered)
    }
}
