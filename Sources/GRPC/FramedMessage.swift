import SwiftProtobuf

/// A protobuf message serialized behind room for its gRPC prefix, the prefix then filled in: a
/// framed message in one allocation, with no copy of the payload (the encoder writes into the
/// buffer past the prefix).
public struct FramedMessage: SwiftProtobufContiguousBytes {
    /// The prefix and the payload.
    public private(set) var framed: [UInt8]

    public init(repeating: UInt8, count: Int) {
        let total = MessageFramer.prefixLength + count
        framed = [UInt8](unsafeUninitializedCapacity: total) { b, n in
            b.initialize(repeating: repeating)
            MessageFramer.writePrefix(count, into: b)
            n = total
        }
    }

    public init<S: Sequence>(_ sequence: S) where S.Element == UInt8 {
        framed = MessageFramer.frame(Array(sequence))
    }

    public var count: Int { framed.count - MessageFramer.prefixLength }

    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try framed.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[MessageFramer.prefixLength...])) }
    }

    public mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try framed.withUnsafeMutableBytes {
            try body(UnsafeMutableRawBufferPointer(rebasing: $0[MessageFramer.prefixLength...]))
        }
    }
}

extension SwiftProtobuf.Message {
    /// The message serialized as one gRPC message: prefix and payload in one buffer.
    public func framedBytes() throws -> [UInt8] { (try serializedBytes() as FramedMessage).framed }
}
