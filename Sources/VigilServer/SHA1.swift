import COpenSSL

/// SHA-1, used only to derive member and cluster IDs the way etcd does (not for security):
/// OpenSSL's (libcrypto), which TLS brings in anyway.
enum SHA1 {
    static func hash(_ message: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 20)
        var n: UInt32 = 0
        message.withUnsafeBytes { m in _ = EVP_Digest(m.baseAddress, m.count, &out, &n, EVP_sha1(), nil) }
        return out
    }
}
/// etcd's member and cluster IDs for a static bootstrap.
public enum MemberIDs {
    /// sha1(sorted peer URLs joined + cluster token), first 8 bytes big-endian.
    public static func memberID(peerURLs: [String], clusterToken: String) -> UInt64 {
        let input = Array((peerURLs.sorted().joined() + clusterToken).utf8)
        return firstUInt64(SHA1.hash(input))
    }

    /// sha1 of the sorted member IDs as 8-byte big-endian values, first 8 bytes.
    public static func clusterID(memberIDs: [UInt64]) -> UInt64 {
        var input: [UInt8] = []
        for id in memberIDs.sorted() {
            for i in 0..<8 { input.append(UInt8((id >> (56 - 8 * UInt64(i))) & 0xFF)) }
        }
        return firstUInt64(SHA1.hash(input))
    }

    private static func firstUInt64(_ d: [UInt8]) -> UInt64 {
        d[0..<8].reduce(0) { $0 << 8 | UInt64($1) }
    }
}
