import Foundation

/// The certificates of `scripts/make-test-certs.sh` (a CA, a server certificate for 127.0.0.1 and
/// localhost, client certificates by Common Name, revoked, expired, other-CA and self-signed ones,
/// a CRL, and JWT key pairs), made once per build folder.
public enum TestCertificates {
    private static let lock = NSLock()

    /// The directory holding them (made on first use).
    public static func directory() throws -> String {
        try lock.withLock {
            let root = FileManager.default.currentDirectoryPath
            let dir = root + "/.build/test-certs"
            if FileManager.default.fileExists(atPath: dir + "/.complete-2") { return dir }
            let r = try runCommand("/bin/bash", [root + "/scripts/make-test-certs.sh", dir], timeout: 120)
            guard r.status == 0 else { throw ProcessFailure(description: "make-test-certs.sh failed: \(r.output)") }
            return dir
        }
    }

    /// The server flags of a TLS listener with these certificates (client certificates required,
    /// checked against the CRL, their Common Name the user).
    public static func serverFlags(_ dir: String, clientCertAuth: Bool = true, crl: String = "crl.pem") -> [String] {
        var f = ["--cert-file", dir + "/server.pem", "--key-file", dir + "/server-key.pem"]
        if clientCertAuth {
            f += [
                "--trusted-ca-file", dir + "/ca.pem", "--client-cert-auth=true", "--client-crl-file", dir + "/" + crl,
            ]
        }
        return f
    }

    /// etcdctl's (and curl's) flags for the client certificate of `cn`.
    public static func clientFlags(_ dir: String, cn: String = "root") -> [String] {
        ["--cacert", dir + "/ca.pem", "--cert", dir + "/client-\(cn).pem", "--key", dir + "/client-\(cn)-key.pem"]
    }
}
