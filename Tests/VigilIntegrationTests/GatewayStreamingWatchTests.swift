import Foundation
import Testing
import VigilTesting

/// `POST /v3/watch` whose body goes on: `scripts/gateway-watch.py` sends each line of its standard
/// input as the next piece of the body (a chunk of chunked HTTP/1.1, or a DATA frame on an h2c
/// stream; curl cannot, it reads no answer while it uploads), and every create, progress and
/// cancel request in it is answered as on gRPC.
@Suite(.serialized) struct GatewayStreamingWatchTests {
    let server: LiveServer
    let ctl: Etcdctl
    let curl: String
    let script: String

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync"])
        ctl = try Etcdctl(endpoint: server.endpoint)
        curl = try #require(which("curl"))
        script =
            URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/gateway-watch.py").path
    }

    func b64(_ s: String) -> String { Data(s.utf8).base64EncodedString() }

    func lines(_ out: String) -> [String] { out.split(separator: "\n").map(String.init) }

    func follow(http2: Bool) throws {
        // Debian's python3, which has python3-h2.
        let w = try BackgroundCommand(
            "/usr/bin/python3", [script] + (http2 ? ["--http2"] : []) + ["\(server.url)/v3/watch"])
        defer { w.stop() }
        let (a, b) = http2 ? ("h2/a", "h2/b") : ("h1/a", "h1/b")
        w.write(#"{"create_request":{"key":"\#(b64(a))"}}"# + "\n")
        #expect(w.wait { $0.contains(#""created":true"#) }, "\(w.output)")
        #expect(lines(w.output).first == (http2 ? "HTTP/2 200" : "HTTP/1.1 200 OK"))
        _ = try ctl.ok("put", a, "1")
        #expect(w.wait { $0.contains(b64("1")) })
        // A second watch on the same stream, after the first request.
        w.write(#"{"create_request":{"key":"\#(b64(b))","prev_kv":true}}"# + "\n")
        #expect(w.wait { $0.contains(#""watch_id":"1","created":true"#) })
        _ = try ctl.ok("put", b, "2")
        #expect(w.wait { $0.contains(#""watch_id":"1","events""#) && $0.contains(b64("2")) })
        // Progress, then the first watch cancelled: a put to its key is not seen.
        w.write(#"{"progress_request":{}}"# + "\n")
        #expect(w.wait { lines($0).count == 6 })
        #expect(lines(w.output).last?.contains(#""watch_id":"-1""#) == true, "a progress answer: \(w.output)")
        w.write(#"{"cancel_request":{"watch_id":"0"}}"# + "\n")
        #expect(w.wait { $0.contains(#""canceled":true"#) })
        _ = try ctl.ok("put", a, "3")
        _ = try ctl.ok("put", b, "4")
        #expect(w.wait { $0.contains(b64("4")) })
        #expect(!w.output.contains(b64("3")), "the cancelled watch is gone")
        // A bad request after the first ends the stream with grpc-gateway's error line.
        w.write("{\"create_request\":{\"key\":12}}\n")
        #expect(w.wait { $0.contains(#"{"error":{"grpc_code":3,"http_code":400"#) }, "\(w.output)")
    }

    @Test func chunkedHTTP1BodyCarriesMoreRequests() throws { try follow(http2: false) }

    @Test func h2cStreamCarriesMoreRequests() throws { try follow(http2: true) }

    @Test func aBadFirstRequestIsStillA400() throws {
        let r = try runCommand(curl, ["-s", "-i", "-X", "POST", "-d", "not json", "\(server.url)/v3/watch"])
        #expect(r.stdout.hasPrefix("HTTP/1.1 400"), "\(r.stdout)")
        #expect(r.stdout.contains("malformed JSON body"))
    }
}
