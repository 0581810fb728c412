/// SHA-1 (FIPS 180-4 §6.1), used only to derive member and cluster IDs the way etcd does.
/// Not for security.
enum SHA1 {
    static func hash(_ message: [UInt8]) -> [UInt8] {
        var h: [UInt32] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0]
        var msg = message
        let bitLength = UInt64(message.count) * 8
        msg.append(0x80)
        while msg.count % 64 != 56 { msg.append(0) }
        for i in (0..<8).reversed() { msg.append(UInt8((bitLength >> (8 * UInt64(i))) & 0xFF)) }
        var w = [UInt32](repeating: 0, count: 80)
        for chunk in stride(from: 0, to: msg.count, by: 64) {
            for t in 0..<16 {
                let j = chunk + 4 * t
                w[t] = UInt32(msg[j]) << 24 | UInt32(msg[j + 1]) << 16 | UInt32(msg[j + 2]) << 8 | UInt32(msg[j + 3])
            }
            for t in 16..<80 {
                let x = w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16]
                w[t] = x << 1 | x >> 31
            }
            var a = h[0], b = h[1], c = h[2], d = h[3], e = h[4]
            for t in 0..<80 {
                let f: UInt32, k: UInt32
                switch t {
                case 0..<20:
                    f = (b & c) | (~b & d)
                    k = 0x5A827999
                case 20..<40:
                    f = b ^ c ^ d
                    k = 0x6ED9EBA1
                case 40..<60:
                    f = (b & c) | (b & d) | (c & d)
                    k = 0x8F1BBCDC
                default:
                    f = b ^ c ^ d
                    k = 0xCA62C1D6
                }
                let temp = (a << 5 | a >> 27) &+ f &+ e &+ k &+ w[t]
                e = d
                d = c
                c = b << 30 | b >> 2
                b = a
                a = temp
            }
            h[0] &+= a
            h[1] &+= b
            h[2] &+= c
            h[3] &+= d
            h[4] &+= e
        }
        return h.flatMap { v in (0..<4).map { UInt8((v >> (24 - 8 * UInt32($0))) & 0xFF) } }
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
