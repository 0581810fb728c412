import COpenSSL

/// SHA-256, for the checksum etcd appends to a snapshot stream: OpenSSL's (libcrypto), which TLS
/// brings in anyway and which is many times faster than a hand-written one on a large snapshot.
public typealias SHA256Digest = SHA256

public struct SHA256 {
    private final class Context: @unchecked Sendable {
        let ctx: OpaquePointer
        init() {
            ctx = EVP_MD_CTX_new()!
            EVP_DigestInit_ex(ctx, EVP_sha256(), nil)
        }
        deinit { EVP_MD_CTX_free(ctx) }
    }
    private let context = Context()

    public init() {}

    public mutating func update(_ bytes: some Collection<UInt8>) {
        let ctx = context.ctx
        let done = bytes.withContiguousStorageIfAvailable { EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        if done == nil { Array(bytes).withUnsafeBytes { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) } }
    }

    /// The digest (32 bytes); the hash is spent.
    public mutating func finish() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var n: UInt32 = 0
        EVP_DigestFinal_ex(context.ctx, &out, &n)
        return out
    }
}
