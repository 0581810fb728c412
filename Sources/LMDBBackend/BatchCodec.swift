import MVCC

/// A group commit as one write-ahead log record: a format byte, the batch's revision, then its
/// records (16-byte revision, length, `RecordCodec` form), removed revisions, meta entries, removed
/// meta names and blobs (a present flag, then the bytes), each list preceded by its count.
/// Lengths and counts are varints; integers are 8 bytes big-endian.
enum BatchCodec {
    static let format: UInt8 = 1

    static func encode(_ b: WriteBatch) -> [UInt8] {
        var out: [UInt8] = []
        var size = 64
        for r in b.records { size += 48 + r.key.count + (r.kv?.value.count ?? 0) }
        out.reserveCapacity(size + b.removed.count * 16)
        out.append(format)
        int(b.revision, &out)
        varint(b.records.count, &out)
        var scratch: [UInt8] = []
        for r in b.records {
            out.append(contentsOf: r.rev.bytes)
            scratch.removeAll(keepingCapacity: true)
            RecordCodec.encode(r, into: &scratch)
            varint(scratch.count, &out)
            out.append(contentsOf: scratch)
        }
        varint(b.removed.count, &out)
        for rev in b.removed { out.append(contentsOf: rev.bytes) }
        varint(b.meta.count, &out)
        for (name, value) in b.meta {
            bytes(Array(name.utf8), &out)
            int(value, &out)
        }
        varint(b.removedMeta.count, &out)
        for name in b.removedMeta { bytes(Array(name.utf8), &out) }
        varint(b.blobs.count, &out)
        for (name, value) in b.blobs {
            bytes(Array(name.utf8), &out)
            if let value {
                out.append(1)
                bytes(value, &out)
            } else {
                out.append(0)
            }
        }
        return out
    }

    private static func varint(_ n: Int, _ out: inout [UInt8]) {
        var n = UInt64(n)
        while n >= 0x80 {
            out.append(UInt8(n & 0x7F) | 0x80)
            n >>= 7
        }
        out.append(UInt8(n))
    }

    private static func int(_ v: Int64, _ out: inout [UInt8]) {
        let u = UInt64(bitPattern: v)
        for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: u >> (56 - 8 * UInt64(i)))) }
    }

    private static func bytes(_ b: [UInt8], _ out: inout [UInt8]) {
        varint(b.count, &out)
        out.append(contentsOf: b)
    }

    /// Reads a batch back; nil if the bytes are not one.
    static func decode(_ b: UnsafeRawBufferPointer) -> WriteBatch? {
        var r = Reader(b: b)
        guard r.byte() == format, let revision = r.int() else { return nil }
        var batch = WriteBatch()
        batch.revision = revision
        guard let nRecords = r.varint() else { return nil }
        for _ in 0..<nRecords {
            guard let revBytes = r.take(16), let rev = Revision(bytes: revBytes), let n = r.varint(),
                let body = r.take(n), let record = RecordCodec.decode(rev: rev, body)
            else { return nil }
            batch.records.append(record)
        }
        guard let nRemoved = r.varint() else { return nil }
        for _ in 0..<nRemoved {
            guard let revBytes = r.take(16), let rev = Revision(bytes: revBytes) else { return nil }
            batch.removed.append(rev)
        }
        guard let nMeta = r.varint() else { return nil }
        for _ in 0..<nMeta {
            guard let name = r.string(), let value = r.int() else { return nil }
            batch.meta[name] = value
        }
        guard let nRemovedMeta = r.varint() else { return nil }
        for _ in 0..<nRemovedMeta {
            guard let name = r.string() else { return nil }
            batch.removedMeta.append(name)
        }
        guard let nBlobs = r.varint() else { return nil }
        for _ in 0..<nBlobs {
            guard let name = r.string(), let present = r.byte() else { return nil }
            if present == 1 {
                guard let n = r.varint(), let value = r.take(n) else { return nil }
                batch.blobs[name] = .some(Array(value))
            } else {
                batch.blobs[name] = .some(nil)
            }
        }
        return r.at == b.count ? batch : nil
    }

    private struct Reader {
        let b: UnsafeRawBufferPointer
        var at = 0

        mutating func byte() -> UInt8? {
            guard at < b.count else { return nil }
            at += 1
            return b[at - 1]
        }

        mutating func varint() -> Int? {
            var n: UInt64 = 0, shift: UInt64 = 0
            while let c = byte() {
                n |= UInt64(c & 0x7F) << shift
                if c & 0x80 == 0 { return n <= UInt64(Int.max) ? Int(n) : nil }
                shift += 7
                if shift > 63 { return nil }
            }
            return nil
        }

        mutating func int() -> Int64? {
            guard let s = take(8) else { return nil }
            return Int64(bitPattern: s.reduce(0) { $0 << 8 | UInt64($1) })
        }

        mutating func take(_ n: Int) -> UnsafeRawBufferPointer? {
            guard n >= 0, at + n <= b.count else { return nil }
            defer { at += n }
            return UnsafeRawBufferPointer(rebasing: b[at..<(at + n)])
        }

        mutating func string() -> String? {
            guard let n = varint(), let s = take(n) else { return nil }
            return String(decoding: s, as: UTF8.self)
        }
    }
}
