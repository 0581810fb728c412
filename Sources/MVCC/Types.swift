/// Keys and values are raw bytes.
public typealias Bytes = [UInt8]

/// Lexicographic byte order (shorter wins on a common prefix), as etcd orders keys.
@inline(__always)
public func compareBytes(_ a: Bytes, _ b: Bytes) -> Int {
    a.withUnsafeBufferPointer { pa in
        b.withUnsafeBufferPointer { pb in
            let n = min(pa.count, pb.count)
            if n > 0 {
                let c = memcmpBytes(pa.baseAddress!, pb.baseAddress!, n)
                if c != 0 { return c }
            }
            return pa.count == pb.count ? 0 : (pa.count < pb.count ? -1 : 1)
        }
    }
}

@inline(__always)
private func memcmpBytes(_ a: UnsafePointer<UInt8>, _ b: UnsafePointer<UInt8>, _ n: Int) -> Int {
    var i = 0
    // Compare 8 bytes at a time while equal, then bytewise.
    while i + 8 <= n {
        let x = UnsafeRawPointer(a + i).loadUnaligned(as: UInt64.self)
        let y = UnsafeRawPointer(b + i).loadUnaligned(as: UInt64.self)
        if x != y { break }
        i += 8
    }
    while i < n {
        if a[i] != b[i] { return a[i] < b[i] ? -1 : 1 }
        i += 1
    }
    return 0
}

/// A revision: `main` is the store revision of a write; `sub` orders changes inside it.
public struct Revision: Comparable, Hashable, Sendable, CustomStringConvertible {
    public var main: Int64
    public var sub: Int64
    public init(main: Int64, sub: Int64 = 0) {
        self.main = main
        self.sub = sub
    }
    public static func < (a: Revision, b: Revision) -> Bool { a.main != b.main ? a.main < b.main : a.sub < b.sub }
    public var description: String { "\(main).\(sub)" }

    /// 16 bytes, big-endian main then sub: sorts like the revision.
    public var bytes: Bytes {
        var out = Bytes(repeating: 0, count: 16)
        let m = UInt64(bitPattern: main), s = UInt64(bitPattern: sub)
        for i in 0..<8 {
            out[i] = UInt8((m >> (56 - 8 * UInt64(i))) & 0xFF)
            out[8 + i] = UInt8((s >> (56 - 8 * UInt64(i))) & 0xFF)
        }
        return out
    }

    public init?(bytes: UnsafeRawBufferPointer) {
        guard bytes.count == 16 else { return nil }
        var m: UInt64 = 0, s: UInt64 = 0
        for i in 0..<8 {
            m = m << 8 | UInt64(bytes[i])
            s = s << 8 | UInt64(bytes[8 + i])
        }
        self.init(main: Int64(bitPattern: m), sub: Int64(bitPattern: s))
    }
}

/// A key's state at one revision, as etcd's `mvccpb.KeyValue`.
public struct KeyValue: Equatable, Sendable {
    public var key: Bytes
    public var createRevision: Int64
    public var modRevision: Int64
    public var version: Int64
    public var value: Bytes
    public var lease: Int64

    public init(
        key: Bytes, createRevision: Int64 = 0, modRevision: Int64 = 0, version: Int64 = 0, value: Bytes = [],
        lease: Int64 = 0
    ) {
        self.key = key
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.value = value
        self.lease = lease
    }
}

/// One change, as a watcher sees it.
public struct Event: Equatable, Sendable {
    public enum Kind: Sendable { case put, delete }
    public var kind: Kind
    /// For a PUT the new key-value; for a DELETE only `key` and `modRevision` (the deletion revision).
    public var kv: KeyValue
    /// The key-value before the change, if the key existed.
    public var prevKV: KeyValue?
    /// True while `prevKV`'s value has not been read (the store reads it when a watcher needs it:
    /// `KVStore.loadPrevValue`).
    public var prevValuePending = false
    public init(kind: Kind, kv: KeyValue, prevKV: KeyValue?) {
        self.kind = kind
        self.kv = kv
        self.prevKV = prevKV
    }
}

/// The store's errors, mapped to etcd's wire errors by the API layer.
public enum MVCCError: Error, Equatable, Sendable {
    case compacted
    case futureRevision
}

/// etcd's range conventions for `(key, rangeEnd)`.
public enum KeyRange {
    /// `rangeEnd` for "every key with this prefix": the prefix with its last byte below 0xff
    /// incremented and the rest dropped; `[0]` (open-ended) if every byte is 0xff or it is empty.
    public static func prefixEnd(_ key: Bytes) -> Bytes {
        var end = key
        while let last = end.last {
            if last < 0xFF {
                end[end.count - 1] = last + 1
                return end
            }
            end.removeLast()
        }
        return [0]
    }

    /// True when `k` lies in `[key, rangeEnd)` with etcd's conventions: empty end = just `key`;
    /// end `[0]` = every key ≥ `key`.
    @inline(__always)
    public static func contains(_ k: Bytes, key: Bytes, end: Bytes) -> Bool {
        if end.isEmpty { return compareBytes(k, key) == 0 }
        if compareBytes(k, key) < 0 { return false }
        if end == [0] { return true }
        return compareBytes(k, end) < 0
    }
}
