import Bolt
import EtcdProto
import Foundation
import MVCC
import SwiftProtobuf
import VigilCore

/// etcd's snapshot format: the backend as etcd's bbolt file, with etcd's buckets and values, so
/// that `etcdctl snapshot status` and `snapshot restore` read Vigil's snapshots and a real etcd
/// starts from them, and an etcd snapshot seeds Vigil.
///
/// - `key`: revision (8 bytes big-endian main, `_`, 8 bytes sub; a deletion adds `t`) →
///   `mvccpb.KeyValue` (a deletion's holds the key alone);
/// - `meta`: `consistent_index`, `finishedCompactRev` and `scheduledCompactRev`;
/// - `lease`: lease ID (8 bytes big-endian) → `leasepb.Lease{ID, TTL}`;
/// - `auth` (`authEnabled`, `authRevision`), `authUsers` and `authRoles` (name → `authpb.User`,
///   `authpb.Role`);
/// - `alarm` (`AlarmMember` → empty), `members` (ID in hex → JSON), `members_removed`,
///   `cluster` (`clusterVersion`).
public enum EtcdSnapshot {
    public static let knownBuckets: Set<String> = [
        "key", "meta", "lease", "auth", "authUsers", "authRoles", "alarm", "members", "members_removed", "cluster",
    ]

    /// Writes a backend as etcd's snapshot file: the `key` bucket streamed from `records` (which
    /// calls its argument with every record, in revision order), then the small buckets.
    public static func write(
        to path: String, records: ((Record) throws -> Void) throws -> Void, meta: [String: Int64],
        blobs: [String: [UInt8]], identity: MemberIdentity, clusterVersion: String
    ) throws {
        let w = try Bolt.FileWriter(path: path)
        w.begin("key")
        var maxRev: Int64 = 1
        try records { r in
            let e = try keyEntry(r)
            try w.add(e.key, e.value)
            maxRev = max(maxRev, r.rev.main)
        }
        try w.end()
        for b in try smallBuckets(
            meta: meta, blobs: blobs, identity: identity, clusterVersion: clusterVersion, maxRev: maxRev)
        {
            try w.bucket(b)
        }
        try w.finish()
    }

    /// A record as etcd's `key` bucket holds it. The `mvccpb.KeyValue` is encoded here (fields 1 to
    /// 6 in order, zeros left out, as protobuf encoders do): this runs once per record of a
    /// snapshot, and a general encoder costs several times more.
    static func keyEntry(_ r: Record) throws -> (key: [UInt8], value: [UInt8]) {
        var k = revisionBytes(r.rev)
        var v: [UInt8] = []
        v.reserveCapacity(r.key.count + (r.kv?.value.count ?? 0) + 40)
        func bytes(_ field: UInt8, _ b: [UInt8]) {
            guard !b.isEmpty else { return }
            v.append(field << 3 | 2)
            Varint.append(UInt64(b.count), &v)
            v += b
        }
        func int(_ field: UInt8, _ n: Int64) {
            guard n != 0 else { return }
            v.append(field << 3)
            Varint.append(UInt64(bitPattern: n), &v)
        }
        bytes(1, r.key)
        if let kv = r.kv {
            int(2, kv.createRevision)
            int(3, kv.modRevision)
            int(4, kv.version)
            bytes(5, kv.value)
            int(6, kv.lease)
        } else {
            k.append(UInt8(ascii: "t"))
        }
        return (k, v)
    }

    /// Every bucket but `key`.
    static func smallBuckets(
        meta: [String: Int64], blobs: [String: [UInt8]], identity: MemberIdentity, clusterVersion: String,
        maxRev: Int64
    ) throws -> [Bolt.Bucket] {
        var metaBucket: [(key: [UInt8], value: [UInt8])] = [
            (Array("consistent_index".utf8), bigEndian(UInt64(max(meta[MetaKey.currentRevision] ?? maxRev, maxRev))))
        ]
        if let compact = meta[MetaKey.compactRevision], compact > 0 {
            let b = revisionBytes(Revision(main: compact))
            metaBucket.append((Array("finishedCompactRev".utf8), b))
            metaBucket.append((Array("scheduledCompactRev".utf8), b))
        }
        var leases: [(key: [UInt8], value: [UInt8])] = []
        for (name, ttl) in meta where name.hasPrefix(LeaseRecords.prefix) {
            guard let id = Int64(name.dropFirst(LeaseRecords.prefix.count)) else { continue }
            leases.append((bigEndian(UInt64(bitPattern: id)), leaseProto(id: id, ttl: ttl)))
        }
        let enabled = (meta[AuthRecordsInStore.metaEnabled] ?? 0) != 0
        let auth: [(key: [UInt8], value: [UInt8])] = [
            (Array("authEnabled".utf8), [enabled ? 1 : 0]),
            (Array("authRevision".utf8), bigEndian(UInt64(max(meta[AuthRecordsInStore.metaRevision] ?? 0, 0)))),
        ]
        var users: [(key: [UInt8], value: [UInt8])] = []
        var roles: [(key: [UInt8], value: [UInt8])] = []
        for (name, bytes) in blobs {
            if name.hasPrefix(AuthRecordsInStore.userPrefix), let u = try? Authpb_User(serializedBytes: bytes) {
                users.append((Array(u.name), bytes))
            } else if name.hasPrefix(AuthRecordsInStore.rolePrefix), let r = try? Authpb_Role(serializedBytes: bytes) {
                roles.append((Array(r.name), bytes))
            }
        }
        var alarms: [(key: [UInt8], value: [UInt8])] = []
        for t in [Etcdserverpb_AlarmType.nospace, .corrupt] {
            if let m = meta[Alarms.name(t)] {
                var a = Etcdserverpb_AlarmMember()
                a.memberID = UInt64(bitPattern: m)
                a.alarm = t
                alarms.append((try a.serializedBytes(), []))
            }
        }
        let memberJSON =
            "{\"id\":\(identity.memberID),\"peerURLs\":\(jsonList(identity.peerURLs)),\"name\":\(jsonList([identity.name]).dropFirst().dropLast()),\"clientURLs\":\(jsonList(identity.clientURLs))}"
        return [
            Bolt.Bucket("meta", metaBucket), Bolt.Bucket("lease", leases),
            Bolt.Bucket("auth", auth), Bolt.Bucket("authUsers", users), Bolt.Bucket("authRoles", roles),
            Bolt.Bucket("alarm", alarms),
            Bolt.Bucket("members", [(Array(String(identity.memberID, radix: 16).utf8), Array(memberJSON.utf8))]),
            Bolt.Bucket("members_removed"),
            Bolt.Bucket("cluster", [(Array("clusterVersion".utf8), Array(clusterVersion.utf8))]),
        ]
    }

    /// What a backend needs from an etcd snapshot besides its records: meta entries and blobs.
    public struct Content {
        public var meta: [String: Int64] = [:]
        public var blobs: [String: [UInt8]] = [:]
    }

    public struct Refused: Error, CustomStringConvertible {
        public let description: String
    }

    /// Reads an etcd (or Vigil) bbolt snapshot: each record goes to `records` in revision order
    /// ; `progress` hears the count read so far, now and then.
    public static func read(
        _ reader: Bolt.Reader, records sink: (Record) throws -> Void, progress: (Int) -> Void = { _ in }
    ) throws -> Content {
        let names = try reader.bucketNames().map { String(decoding: $0, as: UTF8.self) }
        let unknown = names.filter { !knownBuckets.contains($0) }
        guard unknown.isEmpty else {
            throw Refused(
                description: "not an etcd snapshot: unknown buckets \(unknown.sorted().joined(separator: ", "))")
        }
        guard names.contains("key"), names.contains("meta") else {
            throw Refused(description: "not an etcd snapshot: it has no key or meta bucket")
        }
        var c = Content()
        var maxRev: Int64 = 1
        var count = 0
        try reader.forEach(in: "key") { k, v in
            guard k.count == 17 || (k.count == 18 && k[17] == UInt8(ascii: "t")), k[8] == UInt8(ascii: "_") else {
                throw Refused(description: "damaged key bucket: a revision of \(k.count) bytes")
            }
            let rev = Revision(
                main: Int64(bitPattern: fromBigEndian(k[0..<8])), sub: Int64(bitPattern: fromBigEndian(k[9..<17])))
            let kv: Mvccpb_KeyValue
            do { kv = try Mvccpb_KeyValue(serializedBytes: v) } catch {
                throw Refused(description: "damaged key bucket: revision \(rev) does not hold a KeyValue")
            }
            let value: KeyValue? =
                k.count == 18
                ? nil
                : KeyValue(
                    key: kv.key.bytes, createRevision: kv.createRevision, modRevision: kv.modRevision,
                    version: kv.version, value: kv.value.bytes, lease: kv.lease)
            try sink(Record(rev: rev, key: kv.key.bytes, kv: value))
            maxRev = max(maxRev, rev.main)
            count += 1
            if count % 100_000 == 0 { progress(count) }
        }
        progress(count)
        c.meta[MetaKey.currentRevision] = maxRev
        try reader.forEach(in: "meta") { k, v in
            if k == Array("finishedCompactRev".utf8), v.count >= 8 {
                c.meta[MetaKey.compactRevision] = Int64(bitPattern: fromBigEndian(v[0..<8]))
            }
        }
        try reader.forEach(in: "lease") { _, v in
            guard let (id, ttl) = leaseFields(v) else { throw Refused(description: "damaged lease bucket") }
            c.meta[LeaseRecords.prefix + String(id)] = ttl
        }
        try reader.forEach(in: "auth") { k, v in
            if k == Array("authEnabled".utf8) { c.meta[AuthRecordsInStore.metaEnabled] = v.first == 1 ? 1 : 0 }
            if k == Array("authRevision".utf8), v.count == 8 {
                c.meta[AuthRecordsInStore.metaRevision] = Int64(bitPattern: fromBigEndian(v[0..<8]))
            }
        }
        try reader.forEach(in: "authUsers") { k, v in
            c.blobs[AuthRecordsInStore.blobName(AuthRecordsInStore.userPrefix, String(decoding: k, as: UTF8.self))] = v
        }
        try reader.forEach(in: "authRoles") { k, v in
            c.blobs[AuthRecordsInStore.blobName(AuthRecordsInStore.rolePrefix, String(decoding: k, as: UTF8.self))] = v
        }
        try reader.forEach(in: "alarm") { k, _ in
            if let a = try? Etcdserverpb_AlarmMember(serializedBytes: k), a.alarm != .none {
                c.meta[Alarms.name(a.alarm)] = Int64(bitPattern: a.memberID)
            }
        }
        return c
    }

    // MARK: Encodings

    static func revisionBytes(_ r: Revision) -> [UInt8] {
        bigEndian(UInt64(bitPattern: r.main)) + [UInt8(ascii: "_")] + bigEndian(UInt64(bitPattern: r.sub))
    }

    static func bigEndian(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> (56 - 8 * UInt64($0))) & 0xFF) } }

    static func fromBigEndian(_ b: ArraySlice<UInt8>) -> UInt64 { b.reduce(0) { $0 << 8 | UInt64($1) } }

    /// `leasepb.Lease{ID = 1, TTL = 2}` (RemainingTTL = 3 left out: zero).
    static func leaseProto(id: Int64, ttl: Int64) -> [UInt8] {
        var out: [UInt8] = [0x08]
        Varint.append(UInt64(bitPattern: id), &out)
        out.append(0x10)
        Varint.append(UInt64(bitPattern: ttl), &out)
        return out
    }

    static func leaseFields(_ b: [UInt8]) -> (Int64, Int64)? {
        var i = 0
        var id: Int64 = 0, ttl: Int64 = 0
        while i < b.count {
            let tag = b[i]
            i += 1
            guard tag & 7 == 0, let v = Varint.read(b, &i) else { return nil }
            switch tag >> 3 {
            case 1: id = Int64(bitPattern: v)
            case 2: ttl = Int64(bitPattern: v)
            default: break
            }
        }
        return (id, ttl)
    }

    static func jsonList(_ items: [String]) -> String {
        "[" + items.map { VigilCore.JSONText.quote($0) }.joined(separator: ",") + "]"
    }
}
