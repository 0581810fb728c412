import CCrypt

/// Password hashes with bcrypt (`$2b$`), through libxcrypt: salted, slow on purpose (cost 2^cost
/// rounds), so call these off the event loop.
public enum Passwords {
    /// bcrypt reads at most 72 bytes of a password.
    public static let maxBytes = 72

    public enum Failure: Error, Equatable {
        /// Longer than `maxBytes` or holding a NUL byte: bcrypt would silently ignore part of it.
        case unusable
        /// libxcrypt refused (a cost outside 4...31, or the system has no random bytes).
        case hashingFailed
    }

    /// A new salted hash of `password` at `cost` (etcd's `--bcrypt-cost`, default 10).
    public static func hash(_ password: String, cost: Int) throws(Failure) -> String {
        let bytes = Array(password.utf8)
        guard bytes.count <= maxBytes, !bytes.contains(0) else { throw .unusable }
        var random = SystemRandomNumberGenerator()
        let salt = (0..<16).map { _ in UInt8.random(in: 0...255, using: &random) }
        var setting = [CChar](repeating: 0, count: Int(CRYPT_GENSALT_OUTPUT_SIZE))
        let made = salt.withUnsafeBufferPointer { sp in
            crypt_gensalt_rn(
                "$2b$", UInt(cost), sp.baseAddress.map { UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self) },
                Int32(sp.count), &setting, Int32(setting.count))
        }
        guard made != nil else { throw .hashingFailed }
        return try crypt(password, setting: setting)
    }

    /// Whether `password` matches `hash`, comparing in time independent of where they differ.
    public static func verify(_ password: String, hash: String) -> Bool {
        let bytes = Array(password.utf8)
        guard bytes.count <= maxBytes, !bytes.contains(0) else { return false }
        guard let computed = try? crypt(password, setting: Array(hash.utf8CString)) else { return false }
        return constantTimeEqual(Array(computed.utf8), Array(hash.utf8))
    }

    /// Equal bytes, in time that depends only on the lengths.
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var diff = UInt8(truncatingIfNeeded: a.count ^ b.count)
        for i in 0..<max(a.count, b.count) {
            diff |= (i < a.count ? a[i] : 0) ^ (i < b.count ? b[i] : 0)
        }
        return diff == 0
    }

    private static func crypt(_ password: String, setting: [CChar]) throws(Failure) -> String {
        let data = UnsafeMutablePointer<crypt_data>.allocate(capacity: 1)
        defer {
            // The work area held the password: clear it before giving it back.
            UnsafeMutableRawPointer(data).initializeMemory(
                as: UInt8.self, repeating: 0, count: MemoryLayout<crypt_data>.size)
            data.deallocate()
        }
        UnsafeMutableRawPointer(data).initializeMemory(
            as: UInt8.self, repeating: 0, count: MemoryLayout<crypt_data>.size)
        guard let out = crypt_rn(password, setting, data, Int32(MemoryLayout<crypt_data>.size)) else {
            throw .hashingFailed
        }
        let s = String(cString: out)
        // Failures are marked by a leading '*' in some libxcrypt builds.
        guard !s.hasPrefix("*") else { throw .hashingFailed }
        return s
    }
}
