import Foundation
import Testing
import VigilTesting

/// etcd's command line: `--version`, the command line kubeadm writes, `--config-file`, zap JSON
/// logs, `--listen-metrics-urls`, and flags accepted for compatibility.
@Suite(.serialized) struct CommandLineTests {
    let vigil: String
    let curl: String

    init() throws {
        vigil = try vigilBinary()
        curl = try #require(which("curl"))
    }

    /// Starts `vigil args` and waits for its readiness line.
    func start(_ args: [String], environment: [String: String] = [:]) throws -> BackgroundCommand {
        let p = try BackgroundCommand(vigil, args, environment: environment)
        let ready = p.wait(timeout: 30, until: { $0.contains("ready to serve client requests") })
        if !ready { _ = p.stop() }
        try #require(ready, "vigil did not start: \(p.output)")
        return p
    }

    @Test func versionAsEtcdPrintsIt() throws {
        let r = try runCommand(vigil, ["--version"])
        #expect(r.status == 0)
        let lines = r.stdout.split(separator: "\n")
        #expect(lines.first == "etcd Version: 3.4.31")
        #expect(lines.contains { $0.hasPrefix("Git SHA: ") } && lines.contains { $0.hasPrefix("Go OS/Arch: linux/") })
        #expect(lines.last?.hasPrefix("Vigil Version: ") == true)
    }

    /// The etcd command line of kubeadm's static pod manifest (loopback addresses here), unchanged.
    @Test func kubeadmsCommandLineWithZapLogsAndAMetricsListener() throws {
        let certs = try TestCertificates.directory()
        let dir = NSTemporaryDirectory() + "vigil-kubeadm-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let client = freePort(), metrics = freePort(), peer = freePort()
        let p = try start([
            "--advertise-client-urls=https://127.0.0.1:\(client)",
            "--cert-file=\(certs)/server.pem",
            "--client-cert-auth=true",
            "--data-dir=\(dir)",
            "--experimental-initial-corrupt-check=true",
            "--experimental-watch-progress-notify-interval=5s",
            "--initial-advertise-peer-urls=https://127.0.0.1:\(peer)",
            "--initial-cluster=node1=https://127.0.0.1:\(peer)",
            "--key-file=\(certs)/server-key.pem",
            "--listen-client-urls=https://127.0.0.1:\(client)",
            "--listen-metrics-urls=http://127.0.0.1:\(metrics)",
            "--listen-peer-urls=https://127.0.0.1:\(peer)",
            "--name=node1",
            "--peer-cert-file=\(certs)/server.pem",
            "--peer-client-cert-auth=true",
            "--peer-key-file=\(certs)/server-key.pem",
            "--peer-trusted-ca-file=\(certs)/ca.pem",
            "--snapshot-count=10000",
            "--trusted-ca-file=\(certs)/ca.pem",
            "--logger=zap", "--log-level=info",
        ])
        defer { _ = p.stop() }
        let ctl = try Etcdctl(endpoint: "https://127.0.0.1:\(client)", flags: TestCertificates.clientFlags(certs))
        #expect(try ctl.ok("put", "k8s", "v") == "OK\n")
        #expect(try ctl.ok("member", "list").contains("node1, https://127.0.0.1:\(peer)"))

        // The metrics listener: metrics and health, nothing else.
        let m = try runCommand(curl, ["-s", "http://127.0.0.1:\(metrics)/metrics"]).stdout
        #expect(m.contains("etcd_server_has_leader 1"))
        #expect(try runCommand(curl, ["-s", "http://127.0.0.1:\(metrics)/health"]).stdout == #"{"health":"true"}"#)
        #expect(try runCommand(curl, ["-s", "http://127.0.0.1:\(metrics)/readyz"]).stdout == "ok\n")
        let gw = try runCommand(
            curl, ["-s", "-w", "%{http_code}", "http://127.0.0.1:\(metrics)/v3/kv/range", "-d", "{}"])
        #expect(gw.stdout.hasSuffix("404"))

        // Every log line is one JSON object with zap's fields; ignored flags are said once.
        let lines = p.output.split(separator: "\n").filter { !$0.isEmpty }
        #expect(lines.count > 3)
        for line in lines {
            let o = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            #expect(
                o?["level"] is String && o?["ts"] is String && o?["caller"] is String && o?["msg"] is String, "\(line)")
        }
        #expect(p.output.contains(#""flag":"--snapshot-count","value":"10000""#))
        #expect(p.output.contains(#""msg":"ready to serve client requests""#))
    }

    @Test func configFileAsEtcdReadsIt() throws {
        let certs = try TestCertificates.directory()
        let dir = NSTemporaryDirectory() + "vigil-config-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = freePort()
        let yaml = """
            # etcd's configuration file keys
            name: 'from-file'
            data-dir: \(dir)/data
            listen-client-urls: https://127.0.0.1:\(port)
            advertise-client-urls: https://127.0.0.1:\(port)
            quota-backend-bytes: 104857600
            max-txn-ops: 3
            snapshot-count: 10000
            experimental-watch-progress-notify-interval: 5000000000
            log-outputs: [stderr]
            logger: zap
            client-transport-security:
              cert-file: \(certs)/server.pem
              key-file: \(certs)/server-key.pem
              client-cert-auth: true
              trusted-ca-file: \(certs)/ca.pem
            """
        try yaml.write(toFile: dir + "/etcd.yaml", atomically: true, encoding: .utf8)
        // Flags and variables beside a configuration file are ignored, as etcd does.
        let p = try start(
            ["--config-file", dir + "/etcd.yaml", "--name", "from-flag"], environment: ["ETCD_MAX_TXN_OPS": "100"])
        defer { _ = p.stop() }
        #expect(p.output.contains("Loading server configuration from"))
        let ctl = try Etcdctl(endpoint: "https://127.0.0.1:\(port)", flags: TestCertificates.clientFlags(certs))
        #expect(try ctl.ok("member", "list").contains(", from-file, "))
        let txn = try ctl.run(["txn"], stdin: "\n\nput a 1\nput b 2\nput c 3\nput d 4\n\n\n")
        #expect(txn.output.contains("etcdserver: too many operations in txn request"))

        // Bad files get clear errors.
        try "name: [unclosed".write(toFile: dir + "/bad.yaml", atomically: true, encoding: .utf8)
        let bad = try runCommand(vigil, ["--config-file", dir + "/bad.yaml"])
        #expect(bad.status != 0 && bad.output.contains("is not valid YAML"))
        try "max-request-bytes: lots".write(toFile: dir + "/typed.yaml", atomically: true, encoding: .utf8)
        let typed = try runCommand(vigil, ["--config-file", dir + "/typed.yaml"])
        #expect(typed.status != 0 && typed.output.contains(#"invalid value "lots" for --max-request-bytes"#))
        let missing = try runCommand(vigil, ["--config-file", dir + "/none.yaml"])
        #expect(missing.status != 0 && missing.output.contains("cannot read --config-file"))
    }

    @Test func compatibilityFlagsAreTypeChecked() throws {
        let bad = try runCommand(vigil, ["--snapshot-count=many"])
        #expect(bad.status != 0 && bad.output.contains(#"invalid value "many" for flag --snapshot-count"#))
        let dur = try runCommand(vigil, ["--experimental-corrupt-check-time", "soon"])
        #expect(dur.status != 0 && dur.output.contains("--experimental-corrupt-check-time"))
        let logger = try runCommand(vigil, ["--logger", "json", "--data-dir", "/nonexistent/x"])
        #expect(logger.status != 0 && logger.output.contains("unknown --logger json"))
    }
}
