import VigilCore

/// User and role names that are not UTF-8. etcd keeps names as bytes (its `string` fields are Go
/// strings); SwiftProtobuf refuses invalid UTF-8 in a `string` field. Such a name travels inside
/// Vigil escaped: U+10FFFF (a noncharacter no name starts with) and then its bytes in hex. A
/// request's fields are escaped before decoding when they would not decode, and a response's
/// name fields are turned back into the bytes the client sent.
enum RawNames {
    /// The UTF-8 of U+10FFFF.
    static let mark: [UInt8] = [0xF4, 0x8F, 0xBF, 0xBF]

    /// Each Auth method's top-level name fields: in its request, and in its response.
    static let fields: [EtcdMethod: (request: Set<Int>, response: Set<Int>)] = [
        .authenticate: ([1, 2], []),
        .userAdd: ([1, 2, 4], []),
        .userGet: ([1], [2]),
        .userList: ([], [2]),
        .userDelete: ([1], []),
        .userChangePassword: ([1, 2, 3], []),
        .userGrantRole: ([1, 2], []),
        .userRevokeRole: ([1, 2], []),
        .roleAdd: ([1], []),
        .roleGet: ([1], []),
        .roleList: ([], [2]),
        .roleDelete: ([1], []),
        .roleGrantPermission: ([1], []),
        .roleRevokePermission: ([1], []),
    ]

    static func escape(_ raw: ArraySlice<UInt8>) -> [UInt8] {
        let hex = Array("0123456789abcdef".utf8)
        var out = mark
        for b in raw {
            out.append(hex[Int(b >> 4)])
            out.append(hex[Int(b & 0xF)])
        }
        return out
    }

    static func unescape(_ s: ArraySlice<UInt8>) -> [UInt8]? {
        guard s.count >= 4, s.prefix(4).elementsEqual(mark), (s.count - 4) % 2 == 0 else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            default: nil
            }
        }
        var out: [UInt8] = []
        var i = s.startIndex + 4
        while i < s.endIndex {
            guard let hi = nibble(s[i]), let lo = nibble(s[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    /// `message` with its top-level length-delimited `fields` rewritten by `transform` (nil: kept);
    /// nil if the message is not well-formed protobuf.
    static func rewrite(
        _ message: [UInt8], _ fields: Set<Int>, _ transform: (ArraySlice<UInt8>) -> [UInt8]?
    ) -> [UInt8]? {
        var out: [UInt8] = []
        out.reserveCapacity(message.count + 16)
        var i = 0
        func varint() -> UInt64? { Varint.read(message, &i) }
        while i < message.count {
            let start = i
            guard let tag = varint() else { return nil }
            let field = Int(tag >> 3)
            switch tag & 7 {
            case 0:
                guard varint() != nil else { return nil }
                out += message[start..<i]
            case 1, 5:
                let n = tag & 7 == 1 ? 8 : 4
                guard i + n <= message.count else { return nil }
                i += n
                out += message[start..<i]
            case 2:
                guard let len = varint(), len <= UInt64(message.count - i) else { return nil }
                let payload = message[i..<(i + Int(len))]
                i += Int(len)
                if fields.contains(field), let replaced = transform(payload) {
                    out += message[start..<(start + Varint.length(tag))]
                    Varint.append(UInt64(replaced.count), &out)
                    out += replaced
                } else {
                    out += message[start..<i]
                }
            default:
                return nil
            }
        }
        return out
    }

    /// A request whose name fields are not UTF-8, with them escaped (nil if nothing to escape).
    static func escapeRequest(_ message: [UInt8], _ fields: Set<Int>) -> [UInt8]? {
        guard !fields.isEmpty else { return nil }
        return rewrite(message, fields) { String(validating: $0, as: UTF8.self) == nil ? escape($0) : nil }
    }

    /// A response with escaped names turned back into their bytes.
    static func unescapeResponse(_ message: [UInt8], _ fields: Set<Int>) -> [UInt8] {
        guard !fields.isEmpty else { return message }
        return rewrite(message, fields) { unescape($0) } ?? message
    }
}

/// Protobuf's base-128 varints, for the few messages written or rewritten by hand.
enum Varint {
    static func read(_ b: [UInt8], _ i: inout Int) -> UInt64? {
        var v: UInt64 = 0
        var shift: UInt64 = 0
        while i < b.count && shift < 64 {
            let byte = b[i]
            i += 1
            v |= UInt64(byte & 0x7F) << shift
            if byte < 0x80 { return v }
            shift += 7
        }
        return nil
    }

    static func append(_ v: UInt64, _ out: inout [UInt8]) {
        var v = v
        while v >= 0x80 {
            out.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    static func length(_ v: UInt64) -> Int {
        var n = 1
        var v = v
        while v >= 0x80 {
            v >>= 7
            n += 1
        }
        return n
    }
}
