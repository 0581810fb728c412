import Bolt
import Foundation
import Testing

/// bbolt files written and read back: many keys (several branch levels), values past a page
/// (overflow pages), nested buckets, empty buckets; and damaged files refused.
@Suite struct BoltTests {
    func path() -> String { NSTemporaryDirectory() + "bolt-\(UUID().uuidString).db" }

    @Test func writesAndReadsBackEveryEntry() throws {
        let file = path()
        defer { try? FileManager.default.removeItem(atPath: file) }
        var many: [(key: [UInt8], value: [UInt8])] = []
        for i in 0..<20_000 { many.append((Array(String(format: "key-%08d", i).utf8), Array("value \(i)".utf8))) }
        let big = [UInt8](repeating: 0xAB, count: 100_000)
        try Bolt.write(
            [
                Bolt.Bucket("many", many.shuffled()), Bolt.Bucket("empty"),
                Bolt.Bucket("big", [(Array("a".utf8), big), (Array("b".utf8), [1])]),
            ], to: file)
        let r = try Bolt.Reader(path: file)
        #expect(Set(try r.bucketNames().map { String(decoding: $0, as: UTF8.self) }) == ["many", "empty", "big"])
        var seen: [(key: [UInt8], value: [UInt8])] = []
        #expect(try r.forEach(in: "many") { seen.append(($0, $1)) })
        #expect(seen.count == many.count)
        #expect(zip(seen, many).allSatisfy { $0.key == $1.key && $0.value == $1.value }, "in key order")
        var bigSeen: [[UInt8]] = []
        try r.forEach(in: "big") { _, v in bigSeen.append(v) }
        #expect(bigSeen == [big, [1]])
        var none = 0
        #expect(try r.forEach(in: "empty") { _, _ in none += 1 })
        #expect(none == 0)
        #expect(try !r.forEach(in: "absent") { _, _ in })
    }

    @Test func damagedFilesAreRefused() throws {
        let file = path()
        defer { try? FileManager.default.removeItem(atPath: file) }
        try Bolt.write([Bolt.Bucket("b", (0..<2000).map { (Array("k\($0)".utf8), Array("v".utf8)) })], to: file)
        var data = try Data(contentsOf: URL(fileURLWithPath: file))

        // Truncated: the metas name more pages than the file has.
        try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: file))
        #expect(throws: Bolt.FormatError.self) { try Bolt.Reader(path: file) }
        // Both metas damaged.
        data[16 + 20] ^= 0xFF
        data[4096 + 16 + 20] ^= 0xFF
        try data.write(to: URL(fileURLWithPath: file))
        #expect(throws: Bolt.FormatError.self) { try Bolt.Reader(path: file) }
        // Not bbolt at all.
        try Data(repeating: 7, count: 20_000).write(to: URL(fileURLWithPath: file))
        #expect(throws: Bolt.FormatError.self) { try Bolt.Reader(path: file) }
        #expect(!Bolt.Reader.isBolt(Data(repeating: 7, count: 100)))
    }

    @Test func aDamagedPageIsFoundWhenRead() throws {
        let file = path()
        defer { try? FileManager.default.removeItem(atPath: file) }
        try Bolt.write([Bolt.Bucket("b", (0..<2000).map { (Array("k\($0)".utf8), Array("v".utf8)) })], to: file)
        var data = try Data(contentsOf: URL(fileURLWithPath: file))
        // Page 3 (the first data page) gets another page's id.
        data[3 * 4096] = 99
        try data.write(to: URL(fileURLWithPath: file))
        let r = try Bolt.Reader(path: file)
        #expect(throws: Bolt.FormatError.self) { try r.forEach(in: "b") { _, _ in } }
    }
}
