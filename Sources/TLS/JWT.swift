import COpenSSL
import Foundation
import VigilCore

/// etcd's JWT tokens (`--auth-token jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…`): a JWS in
/// compact form with etcd's claims `username`, `revision` and `exp`, signed and checked with
/// OpenSSL. RS*, PS* (salt as long as the hash) and ES* (r‖s, as RFC 7518 says) are supported.
///
/// Immutable once made; OpenSSL's keys may be used from several threads for signing and checking.
public final class JWTSigner: @unchecked Sendable {
    public enum Method: String, Sendable, CaseIterable {
        case rs256 = "RS256"
        case rs384 = "RS384"
        case rs512 = "RS512"
        case ps256 = "PS256"
        case ps384 = "PS384"
        case ps512 = "PS512"
        case es256 = "ES256"
        case es384 = "ES384"
        case es512 = "ES512"

        var digest: OpaquePointer {
            switch self {
            case .rs256, .ps256, .es256: EVP_sha256()
            case .rs384, .ps384, .es384: EVP_sha384()
            case .rs512, .ps512, .es512: EVP_sha512()
            }
        }
        var isPSS: Bool { [.ps256, .ps384, .ps512].contains(self) }
        /// The byte length of each of r and s (ES*).
        var ecPartLength: Int? {
            switch self {
            case .es256: 32
            case .es384: 48
            case .es512: 66
            default: nil
            }
        }
    }

    public let method: Method
    /// Seconds a token is valid (etcd's default: 5 minutes).
    public let ttlSeconds: Int
    private let publicKey: OpaquePointer
    private let privateKey: OpaquePointer?
    private let encodedHeader: String

    /// Reads the PEM keys now; a key that does not fit `method` is refused.
    public init(method: Method, publicKeyFile: String, privateKeyFile: String?, ttlSeconds: Int = 300) throws(TLSError)
    {
        self.method = method
        self.ttlSeconds = ttlSeconds
        guard let pub = Self.readKey(publicKeyFile, isPrivate: false) else {
            throw .openssl("cannot read JWT public key \(publicKeyFile)")
        }
        publicKey = pub
        if let file = privateKeyFile {
            guard let priv = Self.readKey(file, isPrivate: true) else {
                EVP_PKEY_free(pub)
                throw .openssl("cannot read JWT private key \(file)")
            }
            privateKey = priv
        } else {
            privateKey = nil
        }
        encodedHeader = Self.base64URL(Array("{\"alg\":\"\(method.rawValue)\",\"typ\":\"JWT\"}".utf8))
        let wanted = method.ecPartLength != nil ? EVP_PKEY_EC : EVP_PKEY_RSA
        for key in [publicKey, privateKey].compactMap({ $0 }) where EVP_PKEY_get_base_id(key) != wanted {
            throw TLSError("JWT key does not fit sign-method \(method.rawValue)")
        }
    }

    deinit {
        EVP_PKEY_free(publicKey)
        if let privateKey { EVP_PKEY_free(privateKey) }
    }

    /// Whether tokens can be issued (a public key alone only checks them).
    public var canSign: Bool { privateKey != nil }

    /// A token for `username` at auth revision `revision`, valid `ttlSeconds` from `now`.
    public func sign(username: String, revision: UInt64, now: Date = Date()) -> String? {
        guard let privateKey else { return nil }
        let exp = Int64(now.timeIntervalSince1970) + Int64(ttlSeconds)
        let claims = "{\"exp\":\(exp),\"revision\":\(revision),\"username\":\(JSONText.quote(username))}"
        let input = encodedHeader + "." + Self.base64URL(Array(claims.utf8))
        guard let sig = signature(Array(input.utf8), key: privateKey) else { return nil }
        return input + "." + Self.base64URL(sig)
    }

    /// The username and revision of a token signed by this key with this method and not
    /// expired; nil otherwise.
    public func verify(_ token: String, now: Date = Date()) -> (username: String, revision: UInt64)? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerBytes = Self.fromBase64URL(parts[0]),
            let header = try? JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any],
            header["alg"] as? String == method.rawValue,
            let sig = Self.fromBase64URL(parts[2]),
            checkSignature(sig, of: Array(token.utf8.prefix(parts[0].utf8.count + 1 + parts[1].utf8.count)))
        else { return nil }
        guard let claimBytes = Self.fromBase64URL(parts[1]),
            let claims = try? JSONSerialization.jsonObject(with: Data(claimBytes)) as? [String: Any],
            let user = claims["username"] as? String, let rev = (claims["revision"] as? NSNumber)?.doubleValue,
            rev >= 0
        else { return nil }
        if let exp = (claims["exp"] as? NSNumber)?.doubleValue, exp <= now.timeIntervalSince1970 { return nil }
        return (user, UInt64(rev))
    }

    // MARK: Signatures

    /// PS*: RSA-PSS with a salt as long as the hash (when signing; any length when checking).
    private func pss(_ pctx: OpaquePointer?, salt: Int32) {
        guard method.isPSS, let pctx else { return }
        EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING)
        EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, salt)
    }

    private func signature(_ data: [UInt8], key: OpaquePointer) -> [UInt8]? {
        guard let md = EVP_MD_CTX_new() else { return nil }
        defer { EVP_MD_CTX_free(md) }
        var pctx: OpaquePointer?
        guard EVP_DigestSignInit(md, &pctx, method.digest, nil, key) == 1 else { return nil }
        pss(pctx, salt: RSA_PSS_SALTLEN_DIGEST)
        var len = 0
        guard EVP_DigestSign(md, nil, &len, data, data.count) == 1 else { return nil }
        var out = [UInt8](repeating: 0, count: len)
        guard EVP_DigestSign(md, &out, &len, data, data.count) == 1 else { return nil }
        out.removeSubrange(len...)
        if let n = method.ecPartLength { return Self.derToRaw(out, partLength: n) }
        return out
    }

    private func checkSignature(_ sig: [UInt8], of data: [UInt8]) -> Bool {
        var sig = sig
        if let n = method.ecPartLength {
            guard sig.count == 2 * n, let der = Self.rawToDER(sig) else { return false }
            sig = der
        }
        guard let md = EVP_MD_CTX_new() else { return false }
        defer { EVP_MD_CTX_free(md) }
        var pctx: OpaquePointer?
        guard EVP_DigestVerifyInit(md, &pctx, method.digest, nil, publicKey) == 1 else { return false }
        pss(pctx, salt: RSA_PSS_SALTLEN_AUTO)
        let ok = EVP_DigestVerify(md, sig, sig.count, data, data.count) == 1
        ERR_clear_error()
        return ok
    }

    private static func derToRaw(_ der: [UInt8], partLength n: Int) -> [UInt8]? {
        var p: UnsafePointer<UInt8>? = nil
        return der.withUnsafeBufferPointer { buf -> [UInt8]? in
            p = buf.baseAddress
            guard let sig = d2i_ECDSA_SIG(nil, &p, buf.count) else { return nil }
            defer { ECDSA_SIG_free(sig) }
            var r: OpaquePointer?
            var s: OpaquePointer?
            ECDSA_SIG_get0(sig, &r, &s)
            var out = [UInt8](repeating: 0, count: 2 * n)
            guard BN_bn2binpad(r, &out, Int32(n)) == n,
                out.withUnsafeMutableBufferPointer({ BN_bn2binpad(s, $0.baseAddress! + n, Int32(n)) }) == n
            else { return nil }
            return out
        }
    }

    private static func rawToDER(_ raw: [UInt8]) -> [UInt8]? {
        let n = raw.count / 2
        guard let sig = ECDSA_SIG_new() else { return nil }
        defer { ECDSA_SIG_free(sig) }
        let r = BN_bin2bn(raw, Int32(n), nil)
        let s = raw.withUnsafeBufferPointer { BN_bin2bn($0.baseAddress! + n, Int32(n), nil) }
        guard ECDSA_SIG_set0(sig, r, s) == 1 else { return nil }
        var out: UnsafeMutablePointer<UInt8>?
        let len = i2d_ECDSA_SIG(sig, &out)
        guard len > 0, let out else { return nil }
        defer { vigil_openssl_free(out) }
        return Array(UnsafeBufferPointer(start: out, count: Int(len)))
    }

    private static func readKey(_ path: String, isPrivate: Bool) -> OpaquePointer? {
        guard let bio = BIO_new_file(path, "r") else { return nil }
        defer { BIO_free(bio) }
        if isPrivate { return PEM_read_bio_PrivateKey(bio, nil, nil, nil) }
        if let k = PEM_read_bio_PUBKEY(bio, nil, nil, nil) { return k }
        // A certificate or a private key file also carries the public key.
        ERR_clear_error()
        _ = BIO_ctrl(bio, BIO_CTRL_RESET, 0, nil)
        if let cert = PEM_read_bio_X509(bio, nil, nil, nil) {
            defer { X509_free(cert) }
            return X509_get_pubkey(cert)
        }
        ERR_clear_error()
        _ = BIO_ctrl(bio, BIO_CTRL_RESET, 0, nil)
        return PEM_read_bio_PrivateKey(bio, nil, nil, nil)
    }

    // MARK: Encoding

    static func base64URL(_ bytes: [UInt8]) -> String {
        var s = Data(bytes).base64EncodedString()
        s = s.replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        while s.hasSuffix("=") { s.removeLast() }
        return s
    }

    static func fromBase64URL(_ s: Substring) -> [UInt8]? {
        var t = s.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while t.count % 4 != 0 { t += "=" }
        return Data(base64Encoded: t).map { Array($0) }
    }

    /// etcd's option string after `jwt,`: `pub-key=…,priv-key=…,sign-method=…,ttl=…`.
    public static func parse(options: String) throws(TLSError) -> JWTSigner {
        var opts: [String: String] = [:]
        for part in options.split(separator: ",") where !part.isEmpty {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { throw TLSError("invalid --auth-token option \"\(part)\"") }
            guard ["pub-key", "priv-key", "sign-method", "ttl"].contains(kv[0]) else {
                throw TLSError("unknown --auth-token option \"\(kv[0])\"")
            }
            opts[kv[0]] = kv[1]
        }
        guard let m = opts["sign-method"] else { throw TLSError("--auth-token jwt needs sign-method") }
        guard let method = Method(rawValue: m) else {
            throw TLSError(
                "unsupported JWT sign-method \(m) (one of \(Method.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard let pub = opts["pub-key"] else { throw TLSError("--auth-token jwt needs pub-key") }
        var ttl = 300
        if let t = opts["ttl"] {
            guard let secs = goDurationSeconds(t), secs > 0 else { throw TLSError("invalid JWT ttl \"\(t)\"") }
            ttl = secs
        }
        return try JWTSigner(method: method, publicKeyFile: pub, privateKeyFile: opts["priv-key"], ttlSeconds: ttl)
    }

    /// "5m", "300s", "1h30m", "90s" → seconds.
    static func goDurationSeconds(_ s: String) -> Int? {
        var total = 0.0
        var num = ""
        let chars = Array(s)
        if chars.isEmpty { return nil }
        var i = 0
        while i < chars.count {
            let c = chars[i]
            if c.isNumber || c == "." {
                num.append(c)
                i += 1
                continue
            }
            guard let n = Double(num) else { return nil }
            num = ""
            if c == "m" && i + 1 < chars.count && chars[i + 1] == "s" {
                total += n / 1000
                i += 2
                continue
            }
            switch c {
            case "h": total += n * 3600
            case "m": total += n * 60
            case "s": total += n
            default: return nil
            }
            i += 1
        }
        if !num.isEmpty { return nil }
        return Int(total)
    }
}
