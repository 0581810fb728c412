import VigilCore

/// gRPC's status codes (defined with etcd's error table in VigilCore, which is written in them).
public typealias GRPCCode = VigilCore.GRPCCode

/// A call's final status: a code, a human-readable message and, for our own records, what caused
/// it (an `EtcdError`, a `GRPCCallError`; never sent).
public struct GRPCStatus: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: GRPCCode
    public var message: String
    /// The typed error behind the status, for metrics and logs (not part of equality).
    public var cause: (any Error & Sendable)?

    public init(_ code: GRPCCode, _ message: String = "", cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public static func == (a: GRPCStatus, b: GRPCStatus) -> Bool { a.code == b.code && a.message == b.message }

    public static let ok = GRPCStatus(.ok)
    public var description: String { "\(code) \(message)" }

    /// The `grpc-message` header value: percent-encoded as the gRPC HTTP/2 spec asks
    /// (bytes outside printable ASCII, and '%', are encoded).
    public var encodedMessage: String {
        var out = ""
        for b in message.utf8 {
            if b >= 0x20 && b <= 0x7E && b != UInt8(ascii: "%") {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                out += "%" + String(b >> 4, radix: 16, uppercase: true) + String(b & 0xF, radix: 16, uppercase: true)
            }
        }
        return out
    }

    /// Decodes a percent-encoded `grpc-message` value.
    public static func decodeMessage(_ s: String) -> String {
        var bytes: [UInt8] = []
        var it = Array(s.utf8)[...]
        while let b = it.popFirst() {
            if b == UInt8(ascii: "%"), it.count >= 2,
                let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16)
            {
                bytes.append(v)
                it = it.dropFirst(2)
            } else {
                bytes.append(b)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Parses a `grpc-timeout` header ("<1-8 digits><H|M|S|m|u|n>") into milliseconds (rounded up).
public func parseGRPCTimeout(_ s: String) -> UInt64? {
    guard let unit = s.last, s.count >= 2, s.count <= 9, let n = UInt64(s.dropLast()) else { return nil }
    switch unit {
    case "H": return n * 3_600_000
    case "M": return n * 60_000
    case "S": return n * 1000
    case "m": return n
    case "u": return (n + 999) / 1000
    case "n": return (n + 999_999) / 1_000_000
    default: return nil
    }
}
