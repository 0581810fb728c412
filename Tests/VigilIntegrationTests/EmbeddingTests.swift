import Foundation
import Logging
import Testing
import VigilCore
import VigilServer

/// The server as a library: a start that fails leaves nothing half-running, and calls made when
/// the server does not serve fail at once instead of waiting for a loop that will never turn.
@Suite struct EmbeddingTests {
    private func configuration(port: Int) -> Configuration {
        var c = Configuration()
        c.dataDir = NSTemporaryDirectory() + "vigil-embed-\(UUID().uuidString)"
        c.listenClientURLs = ["http://127.0.0.1:\(port)"]
        c.unsafeNoFsync = true
        return c
    }

    private var quiet: Logger {
        var l = Logger(label: "test")
        l.logLevel = .critical
        return l
    }

    @Test func aFailedStartLeavesNothingRunningAndCallsFailAtOnce() throws {
        let first = VigilServer(configuration: configuration(port: 0), logger: quiet)
        let port = try #require(try first.start().first)
        defer {
            first.stop()
            try? FileManager.default.removeItem(atPath: first.configuration.dataDir)
        }
        #expect(try first.put(Array("k".utf8), Array("v".utf8)) == 2)

        let second = VigilServer(configuration: configuration(port: port), logger: quiet)
        defer { try? FileManager.default.removeItem(atPath: second.configuration.dataDir) }
        #expect(throws: (any Error).self) { try second.start() }  // the port is taken
        let started = Date()
        #expect(throws: EtcdError.stopped) { try second.put(Array("k".utf8), Array("v".utf8)) }
        #expect(throws: EtcdError.stopped) { try second.get(Array("k".utf8)) }
        second.stop()
        #expect(Date().timeIntervalSince(started) < 5, "nothing waited for a loop that does not run")
        #expect(try first.get(Array("k".utf8)) == Array("v".utf8), "the first server is unaffected")
    }

    @Test func aBadAutoCompactionSettingFailsTheStart() {
        var c = configuration(port: 0)
        c.autoCompactionMode = "sometimes"
        c.autoCompactionRetention = "1h"
        let s = VigilServer(configuration: c, logger: quiet)
        defer { try? FileManager.default.removeItem(atPath: c.dataDir) }
        #expect(throws: ConfigurationError.self) { try s.start() }
        #expect(throws: EtcdError.stopped) { try s.put(Array("k".utf8), Array("v".utf8)) }
    }
}
