import Foundation
import FuzzHarness
import Testing
import VigilTesting

/// The fuzzing corpus (scripts/fuzz.sh) and any crash-reproducing inputs, replayed as ordinary
/// tests: every input against the real binary, which must keep serving afterwards.
@Suite(.serialized) struct FuzzCorpusTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("FuzzCorpus").path

    func inputs(_ dir: String, prefix: String = "") -> [String] {
        FuzzHarness.files([Self.corpus + "/" + dir]).filter { ($0 as NSString).lastPathComponent.hasPrefix(prefix) }
    }

    @Test func connectionCorpusAgainstTheBinary() throws {
        let server = try LiveServer(args: ["--unsafe-no-fsync", "--http-read-timeout", "1"])
        let files = inputs("connection") + inputs("crashes", prefix: "connection-")
        #expect(files.count >= 40, "the corpus is in Tests/FuzzCorpus/connection")
        for f in files {
            let input = Array(try Data(contentsOf: URL(fileURLWithPath: f)))
            _ = FuzzHarness.exchange(port: server.port, input, quietMs: 2000)
            #expect(server.pid != nil && kill(server.pid!, 0) == 0, "server died on \(f)")
        }
        let ctl = try Etcdctl(endpoint: server.endpoint)
        #expect(try ctl.ok("put", "after-fuzz", "ok") == "OK\n")
        #expect(try ctl.ok("get", "after-fuzz") == "after-fuzz\nok\n")
        #expect(
            try rawExchange(
                port: server.port, Array("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8)
            )
            .contains("200 OK"))
    }

    /// The same inputs against a server inside the test process (so that a sanitized test build
    /// checks the server's own code, not only the client's).
    @Test func connectionCorpusInProcess() {
        let files = inputs("connection") + inputs("crashes", prefix: "connection-")
        for f in files {
            #expect(FuzzHarness.run("connection", Array((try? Data(contentsOf: URL(fileURLWithPath: f))) ?? Data())))
        }
        // The in-process server still answers.
        let health = FuzzHarness.connection(Array("GET /health HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(String(decoding: health, as: UTF8.self).contains(#"{"health":"true"}"#))
    }

    @Test func framingCorpusInProcess() {
        let files = inputs("framing") + inputs("crashes", prefix: "framing-")
        #expect(files.count >= 5)
        for f in files {
            #expect(FuzzHarness.run("framing", Array((try? Data(contentsOf: URL(fileURLWithPath: f))) ?? Data())))
        }
    }

    /// The TLS listener's inputs (raw handshakes, and connections carried over real sessions)
    /// against the in-process server, which must still answer over TLS afterwards.
    @Test func tlsCorpusInProcess() {
        let files = inputs("tls") + inputs("crashes", prefix: "tls-")
        #expect(files.count >= 30, "the corpus is in Tests/FuzzCorpus/tls")
        for f in files {
            #expect(FuzzHarness.run("tls", Array((try? Data(contentsOf: URL(fileURLWithPath: f))) ?? Data())))
        }
        let health = FuzzHarness.tls([1] + Array("GET /health HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(String(decoding: health, as: UTF8.self).contains(#"{"health":"true"}"#))
    }
}
