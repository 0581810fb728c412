import Foundation

/// bbolt's file format (the B+tree file etcd keeps its backend in, and sends as a snapshot),
/// written and read in Swift from the format's public description; no bbolt code.
///
/// A file is pages of `pageSize` bytes. Pages 0 and 1 are meta pages (the one with the higher
/// transaction id and a valid checksum is current); the meta names the root bucket's page and the
/// freelist page. A bucket is a B+tree of branch and leaf pages; a leaf element flagged as a
/// bucket holds a nested bucket's header (its root page and sequence). A node larger than a page
/// continues in the following (overflow) pages.
public enum Bolt {
    public static let magic: UInt32 = 0xED0C_DAED
    public static let version: UInt32 = 2
    static let pageHeaderSize = 16
    static let elementSize = 16
    static let branchFlag: UInt16 = 0x01
    static let leafFlag: UInt16 = 0x02
    static let metaFlag: UInt16 = 0x04
    static let freelistFlag: UInt16 = 0x10
    static let bucketLeafFlag: UInt32 = 0x01

    /// One bucket: its entries sorted by key (byte order), and the buckets nested in it.
    public struct Bucket: Sendable {
        public var name: [UInt8]
        public var entries: [(key: [UInt8], value: [UInt8])]
        public var buckets: [Bucket]
        public init(name: [UInt8], entries: [(key: [UInt8], value: [UInt8])] = [], buckets: [Bucket] = []) {
            self.name = name
            self.entries = entries
            self.buckets = buckets
        }
        public init(_ name: String, _ entries: [(key: [UInt8], value: [UInt8])] = []) {
            self.init(name: Array(name.utf8), entries: entries)
        }
    }

    public struct FormatError: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    static func lessThan(_ a: [UInt8], _ b: [UInt8]) -> Bool { a.lexicographicallyPrecedes(b) }

    /// FNV-1a, 64 bits: the meta page's checksum.
    static func fnv64a(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01B3
        }
        return h
    }
}

// MARK: - Writing

extension Bolt {
    /// Writes `buckets` (top-level; entries sorted here) as a bbolt file to `path`.
    public static func write(_ buckets: [Bucket], to path: String, pageSize: Int = 4096) throws {
        let w = try FileWriter(path: path, pageSize: pageSize)
        for b in buckets { try w.bucket(b) }
        try w.finish()
    }

    /// Writes a bbolt file as it goes: each bucket's leaves go to the file as they fill, so a bucket
    /// of any size takes memory only for its branch levels. Top-level buckets are written one after
    /// another; `finish` writes the root bucket and the metas.
    public final class FileWriter {
        let pageSize: Int
        private let handle: FileHandle
        private var pending: [UInt8] = []
        private var nextPage: UInt64 = 3
        /// Top-level buckets written: name → root page.
        private var roots: [(name: [UInt8], page: UInt64)] = []
        // The bucket being written.
        private var current: [UInt8]?
        private var level: [(firstKey: [UInt8], page: UInt64)] = []
        private var chunk: [(key: [UInt8], value: [UInt8], flags: UInt32)] = []
        private var chunkSize = Bolt.pageHeaderSize
        private var lastKey: [UInt8]?

        public init(path: String, pageSize: Int = 4096) throws {
            guard FileManager.default.createFile(atPath: path, contents: nil),
                let h = FileHandle(forWritingAtPath: path)
            else { throw FormatError("cannot create \(path)") }
            handle = h
            self.pageSize = pageSize
            pending = [UInt8](repeating: 0, count: 3 * pageSize)  // the metas and the freelist, written last
        }

        deinit { try? handle.close() }

        /// Writes a whole bucket (entries sorted here; nested buckets written first).
        public func bucket(_ b: Bucket) throws {
            precondition(current == nil, "a bucket is being written")
            roots.append((b.name, try tree(b)))
        }

        private func tree(_ b: Bucket) throws -> UInt64 {
            var elements = b.entries.map { ($0.key, $0.value, UInt32(0)) }
            for n in b.buckets {
                let saved = (current, level, chunk, chunkSize, lastKey)
                (current, level, chunk, chunkSize, lastKey) = (nil, [], [], Bolt.pageHeaderSize, nil)
                let root = try tree(n)
                (current, level, chunk, chunkSize, lastKey) = saved
                elements.append((n.name, Self.bucketHeader(root), Bolt.bucketLeafFlag))
            }
            elements.sort { Bolt.lessThan($0.0, $1.0) }
            (current, level, chunk, chunkSize, lastKey) = (b.name, [], [], Bolt.pageHeaderSize, nil)
            for e in elements { try add(e.0, e.1, flags: e.2) }
            return try endTree()
        }

        /// Starts a top-level bucket whose entries come one by one, in ascending key order.
        public func begin(_ name: String) {
            precondition(current == nil, "a bucket is being written")
            current = Array(name.utf8)
            level = []
            chunk = []
            chunkSize = Bolt.pageHeaderSize
            lastKey = nil
        }

        /// Adds the next entry of the bucket begun.
        public func add(_ key: [UInt8], _ value: [UInt8], flags: UInt32 = 0) throws {
            if let last = lastKey, !Bolt.lessThan(last, key) {
                throw FormatError(
                    "keys out of order (or repeated) in bucket \(String(decoding: current ?? [], as: UTF8.self))")
            }
            lastKey = key
            let n = Bolt.elementSize + key.count + value.count
            if !chunk.isEmpty && chunkSize + n > pageSize {
                level.append((chunk[0].key, try writeLeaf(chunk)))
                chunk = []
                chunkSize = Bolt.pageHeaderSize
            }
            chunk.append((key, value, flags))
            chunkSize += n
        }

        /// Ends the bucket begun.
        public func end() throws {
            let name = current ?? []
            roots.append((name, try endTree()))
        }

        private func endTree() throws -> UInt64 {
            if !chunk.isEmpty || level.isEmpty { level.append((chunk.first?.key ?? [], try writeLeaf(chunk))) }
            chunk = []
            while level.count > 1 {
                var next: [(firstKey: [UInt8], page: UInt64)] = []
                var group: [(firstKey: [UInt8], page: UInt64)] = []
                var size = Bolt.pageHeaderSize
                for c in level {
                    let n = Bolt.elementSize + c.firstKey.count
                    if group.count >= 2 && size + n > pageSize {
                        next.append((group[0].firstKey, try writeBranch(group)))
                        group = []
                        size = Bolt.pageHeaderSize
                    }
                    group.append(c)
                    size += n
                }
                next.append((group[0].firstKey, try writeBranch(group)))
                level = next
            }
            let root = level[0].page
            (current, level, chunkSize, lastKey) = (nil, [], Bolt.pageHeaderSize, nil)
            return root
        }

        /// Writes the root bucket and the metas; the file is complete.
        public func finish() throws {
            precondition(current == nil, "a bucket is still being written")
            var names = roots.map { (key: $0.name, value: Self.bucketHeader($0.page), flags: Bolt.bucketLeafFlag) }
            names.sort { Bolt.lessThan($0.key, $1.key) }
            for i in names.indices.dropFirst() where names[i - 1].key == names[i].key {
                throw FormatError("bucket \(String(decoding: names[i].key, as: UTF8.self)) written twice")
            }
            (level, chunk, chunkSize, lastKey) = ([], [], Bolt.pageHeaderSize, nil)
            current = []
            for n in names { try add(n.key, n.value, flags: n.flags) }
            let root = try endTree()
            try flush(force: true)
            var head = [UInt8](repeating: 0, count: 3 * pageSize)
            for (i, txid) in [(0, UInt64(1)), (1, UInt64(2))] {
                let base = i * pageSize
                put64(&head, base, UInt64(i))
                put16(&head, base + 8, Bolt.metaFlag)
                let m = base + Bolt.pageHeaderSize
                put32(&head, m, Bolt.magic)
                put32(&head, m + 4, Bolt.version)
                put32(&head, m + 8, UInt32(pageSize))
                put64(&head, m + 16, root)  // root bucket: root page (sequence 0)
                put64(&head, m + 32, 2)  // freelist page
                put64(&head, m + 40, nextPage)  // high-water mark
                put64(&head, m + 48, txid)
                let sum = head.withUnsafeBytes { Bolt.fnv64a(UnsafeRawBufferPointer(rebasing: $0[m..<(m + 56)])) }
                put64(&head, m + 56, sum)
            }
            put64(&head, 2 * pageSize, 2)  // an empty freelist
            put16(&head, 2 * pageSize + 8, Bolt.freelistFlag)
            try handle.seek(toOffset: 0)
            try handle.write(contentsOf: head)
            try handle.synchronize()
            try handle.close()
        }

        static func bucketHeader(_ root: UInt64) -> [UInt8] {
            var h = [UInt8](repeating: 0, count: 16)
            put64(&h, 0, root)
            return h
        }

        private func flush(force: Bool = false) throws {
            guard force || pending.count >= 1 << 20 else { return }
            try handle.write(contentsOf: pending)
            pending.removeAll(keepingCapacity: true)
        }

        /// Appends one node (with overflow pages as needed) and returns its page id.
        private func appendNode(flags: UInt16, count: Int, content: [UInt8]) throws -> UInt64 {
            let total = Bolt.pageHeaderSize + content.count
            let pages = max(1, (total + pageSize - 1) / pageSize)
            let id = nextPage
            nextPage += UInt64(pages)
            let at = pending.count
            pending += [UInt8](repeating: 0, count: pages * pageSize)
            put64(&pending, at, id)
            put16(&pending, at + 8, flags)
            put16(&pending, at + 10, UInt16(count))
            put32(&pending, at + 12, UInt32(pages - 1))
            pending.replaceSubrange((at + Bolt.pageHeaderSize)..<(at + total), with: content)
            try flush()
            return id
        }

        private func writeLeaf(_ elements: [(key: [UInt8], value: [UInt8], flags: UInt32)]) throws -> UInt64 {
            var content = [UInt8](repeating: 0, count: elements.count * Bolt.elementSize)
            for (i, e) in elements.enumerated() {
                let at = i * Bolt.elementSize
                put32(&content, at, e.flags)
                put32(&content, at + 4, UInt32(content.count - at))
                put32(&content, at + 8, UInt32(e.key.count))
                put32(&content, at + 12, UInt32(e.value.count))
                content += e.key
                content += e.value
            }
            return try appendNode(flags: Bolt.leafFlag, count: elements.count, content: content)
        }

        private func writeBranch(_ children: [(firstKey: [UInt8], page: UInt64)]) throws -> UInt64 {
            var content = [UInt8](repeating: 0, count: children.count * Bolt.elementSize)
            for (i, c) in children.enumerated() {
                let at = i * Bolt.elementSize
                put32(&content, at, UInt32(content.count - at))
                put32(&content, at + 4, UInt32(c.firstKey.count))
                put64(&content, at + 8, c.page)
                content += c.firstKey
            }
            return try appendNode(flags: Bolt.branchFlag, count: children.count, content: content)
        }
    }
}

// MARK: - Reading

extension Bolt {
    /// A bbolt file mapped for reading: its buckets, read page by page, checked as they are read.
    public final class Reader {
        private let data: Data
        public let pageSize: Int
        private let pageCount: UInt64
        private let rootPage: UInt64

        /// Whether `data` starts as a bbolt file does (its first meta's magic).
        public static func isBolt(_ data: Data) -> Bool {
            data.count >= 24 && u32(data, Bolt.pageHeaderSize) == Bolt.magic
        }

        /// Opens `path`; a file that is not bbolt, or is truncated or damaged in its metas, is refused.
        public init(path: String) throws {
            do { data = try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped) } catch {
                throw FormatError("cannot read \(path): \(error.localizedDescription)")
            }
            guard data.count >= 2 * 4096 else { throw FormatError("not a bbolt file: too short (\(data.count) bytes)") }
            var best: (txid: UInt64, pageSize: Int, root: UInt64, pages: UInt64)?
            var problems: [String] = []
            for guess in [0, 4096] {
                let m = guess + Bolt.pageHeaderSize
                guard Self.u32(data, m) == Bolt.magic else {
                    problems.append("meta page \(guess == 0 ? 0 : 1): bad magic")
                    continue
                }
                guard Self.u32(data, m + 4) == Bolt.version else {
                    problems.append("unsupported bbolt version \(Self.u32(data, m + 4))")
                    continue
                }
                let sum = data.withUnsafeBytes { Bolt.fnv64a(UnsafeRawBufferPointer(rebasing: $0[m..<(m + 56)])) }
                guard sum == Self.u64(data, m + 56) else {
                    problems.append("meta page \(guess == 0 ? 0 : 1): checksum mismatch")
                    continue
                }
                let ps = Int(Self.u32(data, m + 8))
                let txid = Self.u64(data, m + 48)
                if best == nil || txid > best!.txid {
                    best = (txid, ps, Self.u64(data, m + 16), Self.u64(data, m + 40))
                }
            }
            // The second meta sits at one page size, which the first meta names.
            if let b = best, b.pageSize != 4096, data.count >= 2 * b.pageSize {
                let m = b.pageSize + Bolt.pageHeaderSize
                if Self.u32(data, m) == Bolt.magic,
                    data.withUnsafeBytes({ Bolt.fnv64a(UnsafeRawBufferPointer(rebasing: $0[m..<(m + 56)])) })
                        == Self.u64(data, m + 56), Self.u64(data, m + 48) > b.txid
                {
                    best = (Self.u64(data, m + 48), b.pageSize, Self.u64(data, m + 16), Self.u64(data, m + 40))
                }
            }
            guard let b = best else { throw FormatError("not a bbolt file (\(problems.joined(separator: "; ")))") }
            guard [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536].contains(b.pageSize) else {
                throw FormatError("bbolt file with an unusable page size \(b.pageSize)")
            }
            guard UInt64(data.count) >= b.pages * UInt64(b.pageSize) else {
                throw FormatError(
                    "truncated bbolt file: \(data.count) bytes for \(b.pages) pages of \(b.pageSize)")
            }
            pageSize = b.pageSize
            pageCount = b.pages
            rootPage = b.root
        }

        /// The names of the top-level buckets.
        public func bucketNames() throws -> [[UInt8]] {
            var out: [[UInt8]] = []
            try walk(rootPage, inline: nil, depth: 0) { k, _, flags in
                if flags & Bolt.bucketLeafFlag != 0 { out.append(k) }
            }
            return out
        }

        /// Calls `body` with each key and value of the top-level bucket `name`, in key order
        /// (nested buckets are skipped). Nil if there is no such bucket.
        @discardableResult
        public func forEach(in name: String, _ body: ([UInt8], [UInt8]) throws -> Void) throws -> Bool {
            var header: [UInt8]?
            try walk(rootPage, inline: nil, depth: 0) { k, v, flags in
                if flags & Bolt.bucketLeafFlag != 0 && k == Array(name.utf8) { header = v }
            }
            guard let header, header.count >= 16 else { return false }
            let root = header.withUnsafeBytes { Self.u64(Data($0), 0) }
            let inline: [UInt8]? = root == 0 ? Array(header[16...]) : nil
            try walk(root, inline: inline, depth: 0) { k, v, flags in
                if flags & Bolt.bucketLeafFlag == 0 { try body(k, v) }
            }
            return true
        }

        /// Visits a tree's leaf elements in order.
        private func walk(
            _ page: UInt64, inline: [UInt8]?, depth: Int, _ visit: ([UInt8], [UInt8], UInt32) throws -> Void
        ) throws {
            guard depth < 64 else { throw FormatError("bbolt tree deeper than 64 levels: damaged file") }
            let bytes: Data
            let base: Int
            if let inline {
                bytes = Data(inline)
                base = 0
            } else {
                guard page >= 2, page < pageCount else {
                    throw FormatError("page \(page) out of range (\(pageCount) pages)")
                }
                bytes = data
                base = Int(page) * pageSize
                guard Self.u64(bytes, base) == page else {
                    throw FormatError("page \(page) has the id of another page")
                }
            }
            guard base + Bolt.pageHeaderSize <= bytes.count else { throw FormatError("page \(page) is truncated") }
            let flags = Self.u16(bytes, base + 8)
            let count = Int(Self.u16(bytes, base + 10))
            let overflow = Int(Self.u32(bytes, base + 12))
            let end = inline == nil ? base + (overflow + 1) * pageSize : bytes.count
            guard end <= bytes.count else { throw FormatError("page \(page) runs past the end of the file") }
            func slice(_ from: Int, _ n: Int) throws -> [UInt8] {
                guard from >= base, n >= 0, from + n <= end else {
                    throw FormatError("page \(page): element out of bounds")
                }
                return Array(bytes[(bytes.startIndex + from)..<(bytes.startIndex + from + n)])
            }
            for i in 0..<count {
                let at = base + Bolt.pageHeaderSize + i * Bolt.elementSize
                guard at + Bolt.elementSize <= end else { throw FormatError("page \(page): too many elements") }
                if flags & Bolt.leafFlag != 0 {
                    let eflags = Self.u32(bytes, at)
                    let pos = Int(Self.u32(bytes, at + 4))
                    let ks = Int(Self.u32(bytes, at + 8))
                    let vs = Int(Self.u32(bytes, at + 12))
                    try visit(try slice(at + pos, ks), try slice(at + pos + ks, vs), eflags)
                } else if flags & Bolt.branchFlag != 0 {
                    try walk(Self.u64(bytes, at + 8), inline: nil, depth: depth + 1, visit)
                } else {
                    throw FormatError("page \(page) is neither a branch nor a leaf (flags \(flags))")
                }
            }
        }

        static func u16(_ d: Data, _ at: Int) -> UInt16 {
            d.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: at, as: UInt16.self).littleEndian }
        }
        static func u32(_ d: Data, _ at: Int) -> UInt32 {
            d.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: at, as: UInt32.self).littleEndian }
        }
        static func u64(_ d: Data, _ at: Int) -> UInt64 {
            d.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: at, as: UInt64.self).littleEndian }
        }
    }
}

// bbolt writes its integers in the machine's order: little-endian on every platform etcd ships for.
private func put16(_ a: inout [UInt8], _ at: Int, _ v: UInt16) {
    a[at] = UInt8(v & 0xFF)
    a[at + 1] = UInt8(v >> 8)
}
private func put32(_ a: inout [UInt8], _ at: Int, _ v: UInt32) {
    for i in 0..<4 { a[at + i] = UInt8((v >> (8 * UInt32(i))) & 0xFF) }
}
private func put64(_ a: inout [UInt8], _ at: Int, _ v: UInt64) {
    for i in 0..<8 { a[at + i] = UInt8((v >> (8 * UInt64(i))) & 0xFF) }
}
