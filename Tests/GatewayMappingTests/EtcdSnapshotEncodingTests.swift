import EtcdProto
import Foundation
import MVCC
import Testing

@testable import EtcdAPI

/// The snapshot's hand-written `mvccpb.KeyValue` encoding is byte for byte what SwiftProtobuf
/// writes, and decodes back.
@Suite struct EtcdSnapshotEncodingTests {
    @Test(arguments: [
        Record(
            rev: Revision(main: 2), key: Array("k".utf8),
            kv: KeyValue(key: Array("k".utf8), createRevision: 2, modRevision: 2, version: 1, value: Array("v".utf8))),
        Record(
            rev: Revision(main: 300, sub: 2), key: Array("key/with/a/longer/name".utf8),
            kv: KeyValue(
                key: Array("key/with/a/longer/name".utf8), createRevision: 7, modRevision: 300, version: 99,
                value: [UInt8](repeating: 9, count: 300), lease: 7_587_899_260_548_127_745)),
        Record(rev: Revision(main: 5), key: Array("gone".utf8), kv: nil),
        Record(
            rev: Revision(main: 6), key: Array("empty".utf8),
            kv: KeyValue(key: Array("empty".utf8), createRevision: 6, modRevision: 6, version: 1, value: [], lease: -1)),
    ])
    func matchesSwiftProtobuf(_ r: Record) throws {
        let (key, value) = try EtcdSnapshot.keyEntry(r)
        var kv = Mvccpb_KeyValue()
        kv.key = Data(r.key)
        if let v = r.kv {
            kv.createRevision = v.createRevision
            kv.modRevision = v.modRevision
            kv.version = v.version
            kv.value = Data(v.value)
            kv.lease = v.lease
        }
        #expect(value == (try kv.serializedBytes() as [UInt8]))
        #expect(key.count == (r.kv == nil ? 18 : 17))
        #expect(try Mvccpb_KeyValue(serializedBytes: value) == kv)
    }

    @Test func sha256KnownAnswers() {
        func hex(_ s: String, split: Bool = false) -> String {
            var h = SHA256()
            let b = Array(s.utf8)
            if split {
                h.update(b.prefix(3))
                h.update(b.dropFirst(3))
            } else {
                h.update(b)
            }
            return h.finish().map { String(format: "%02x", $0) }.joined()
        }
        #expect(hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        let long = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
        #expect(hex(long, split: true) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
    }
}
