import CLMDB
import Foundation
import MVCC

#if canImport(Glibc)
import Glibc
#endif

/// An error from LMDB with its code and LMDB's text.
public struct LMDBError: Error, CustomStringConvertible {
    public let code: Int32
    public var description: String { "lmdb: " + String(cString: mdb_strerror(code)) }
}

@inline(__always)
private func check(_ rc: Int32) throws {
    if rc != 0 { throw LMDBError(code: rc) }
}

/// The durable backend on LMDB. Two databases:
/// - `key`: 16-byte revision (big-endian main, sub) → encoded record (etcd's "key" bucket layout);
/// - `meta`: name → 8-byte big-endian integer;
/// - `blob`: name → bytes (auth users and roles).
/// Each `commit` is one LMDB write transaction; LMDB fsyncs at commit unless `noSync`.
public final class LMDBBackend: Backend, @unchecked Sendable {
    private var env: OpaquePointer?
    private var keyDB: MDB_dbi = 0
    private var metaDB: MDB_dbi = 0
    private var blobDB: MDB_dbi = 0
    public let path: String
    private let mapSize: Int
    private let flags: UInt32
    /// Serializes use of `env` between the loop (sizes) and the thread pool (commits, defrag, copies).
    private let lock = NSLock()

    /// Opens (creating if needed) the environment in directory `path`.
    /// - Parameters:
    ///   - mapSize: the largest the data file may grow to.
    ///   - noSync: skip fsync at commit (etcd's `--unsafe-no-fsync`; tests only).
    public init(path: String, mapSize: Int, noSync: Bool = false) throws {
        self.path = path
        self.mapSize = mapSize
        var flags = UInt32(MDB_NOTLS)
        if noSync { flags |= UInt32(MDB_NOSYNC) }
        self.flags = flags
        mkdir(path, 0o700)
        try open()
        refreshSizes()
    }

    private func open() throws {
        try check(mdb_env_create(&env))
        do {
            try check(mdb_env_set_maxdbs(env, 4))
            try check(mdb_env_set_mapsize(env, mapSize))
            try check(mdb_env_open(env, path, flags, 0o600))
            var txn: OpaquePointer?
            try check(mdb_txn_begin(env, nil, 0, &txn))
            do {
                try check(mdb_dbi_open(txn, "key", UInt32(MDB_CREATE), &keyDB))
                try check(mdb_dbi_open(txn, "meta", UInt32(MDB_CREATE), &metaDB))
                try check(mdb_dbi_open(txn, "blob", UInt32(MDB_CREATE), &blobDB))
                try check(mdb_txn_commit(txn))
            } catch {
                mdb_txn_abort(txn)
                throw error
            }
        } catch {
            // Closed once: a throwing init still runs deinit, which would close it again.
            mdb_env_close(env)
            env = nil
            throw error
        }
    }

    deinit { if env != nil { mdb_env_close(env) } }

    /// Flushes everything committed to disk (for an environment opened with `noSync`).
    public func sync() throws { try check(mdb_env_sync(env, 1)) }

    /// Every record and meta entry (at start: nothing writes meanwhile).
    public func load() throws -> (records: [Record], meta: [String: Int64]) {
        var records: [Record] = []
        try forEachRecord { records.append($0) }
        return (records, try loadMeta())
    }

    /// Calls `body` with every record in revision order, from one read transaction (a consistent
    /// view), holding one record at a time.
    public func forEachRecord(_ body: (Record) throws -> Void) throws {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        defer { mdb_txn_abort(txn) }
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, keyDB, &cursor))
        defer { mdb_cursor_close(cursor) }
        var k = MDB_val(), v = MDB_val()
        var rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
        while rc == 0 {
            if let rev = Revision(bytes: UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size)),
                let rec = RecordCodec.decode(rev: rev, UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
            {
                try body(rec)
            }
            rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
        }
        if rc != MDB_NOTFOUND { throw LMDBError(code: rc) }
    }

    /// The meta entries alone.
    public func loadMeta() throws -> [String: Int64] {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        defer { mdb_txn_abort(txn) }
        var meta: [String: Int64] = [:]
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, metaDB, &cursor))
        defer { mdb_cursor_close(cursor) }
        var k = MDB_val(), v = MDB_val()
        var rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
        while rc == 0 {
            let name = String(decoding: UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size), as: UTF8.self)
            if v.mv_size == 8 {
                let raw = UnsafeRawBufferPointer(start: v.mv_data, count: 8)
                meta[name] = Int64(bitPattern: raw.reduce(0) { $0 << 8 | UInt64($1) })
            }
            rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
        }
        return meta
    }

    /// The named byte values (see `WriteBatch.blobs`).
    public func loadBlobs() throws -> [String: [UInt8]] {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        defer { mdb_txn_abort(txn) }
        var out: [String: [UInt8]] = [:]
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, blobDB, &cursor))
        defer { mdb_cursor_close(cursor) }
        var k = MDB_val(), v = MDB_val()
        var rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
        while rc == 0 {
            let name = String(decoding: UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size), as: UTF8.self)
            out[name] = Array(UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
            rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
        }
        if rc != MDB_NOTFOUND { throw LMDBError(code: rc) }
        return out
    }

    public func commit(_ batch: WriteBatch) throws {
        lock.lock()
        defer { lock.unlock() }
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, 0, &txn))
        do {
            for r in batch.records {
                try put(txn, keyDB, r.rev.bytes, RecordCodec.encode(r))
            }
            for rev in batch.removed {
                var kb = rev.bytes
                let rc = kb.withUnsafeMutableBytes { kp -> Int32 in
                    var k = MDB_val(mv_size: 16, mv_data: kp.baseAddress)
                    return mdb_del(txn, keyDB, &k, nil)
                }
                if rc != 0 && rc != MDB_NOTFOUND { throw LMDBError(code: rc) }
            }
            for (name, value) in batch.meta {
                let u = UInt64(bitPattern: value)
                try put(txn, metaDB, Array(name.utf8), (0..<8).map { UInt8((u >> (56 - 8 * UInt64($0))) & 0xFF) })
            }
            for name in batch.removedMeta { try delete(txn, metaDB, Array(name.utf8)) }
            for (name, value) in batch.blobs {
                if let value {
                    try put(txn, blobDB, Array(name.utf8), value)
                } else {
                    try delete(txn, blobDB, Array(name.utf8))
                }
            }
            try check(mdb_txn_commit(txn))
        } catch {
            mdb_txn_abort(txn)
            throw error
        }
        refreshSizes()
    }

    private func put(_ txn: OpaquePointer?, _ dbi: MDB_dbi, _ key: Bytes, _ value: Bytes) throws {
        var key = key, value = value
        try key.withUnsafeMutableBytes { kp in
            try value.withUnsafeMutableBytes { vp in
                var k = MDB_val(mv_size: kp.count, mv_data: kp.baseAddress)
                var v = MDB_val(mv_size: vp.count, mv_data: vp.baseAddress)
                try check(mdb_put(txn, dbi, &k, &v, 0))
            }
        }
    }

    private func delete(_ txn: OpaquePointer?, _ dbi: MDB_dbi, _ key: Bytes) throws {
        var key = key
        let rc = key.withUnsafeMutableBytes { kp -> Int32 in
            var k = MDB_val(mv_size: kp.count, mv_data: kp.baseAddress)
            return mdb_del(txn, dbi, &k, nil)
        }
        if rc != 0 && rc != MDB_NOTFOUND { throw LMDBError(code: rc) }
    }

    /// Bytes the data file occupies (LMDB's last used page × page size).
    private let sizeLock = NSLock()
    private var cachedSizes = (allocated: 0, inUse: 0)

    /// The sizes as of the last commit or defragment (never waits for a commit in progress).
    public var lastSizes: (allocated: Int, inUse: Int) {
        sizeLock.lock()
        defer { sizeLock.unlock() }
        return cachedSizes
    }

    public var sizeInUse: Int { lastSizes.allocated }

    private func refreshSizes() {
        let s = measureSizes()
        sizeLock.lock()
        cachedSizes = s
        sizeLock.unlock()
    }

    /// Bytes the data file's pages span (etcd's dbSize) and those holding data, free pages
    /// excluded (dbSizeInUse). Call with `lock` held.
    private func measureSizes() -> (allocated: Int, inUse: Int) {
        var info = MDB_envinfo()
        var stat = MDB_stat()
        mdb_env_info(env, &info)
        mdb_env_stat(env, &stat)
        let pages = info.me_last_pgno + 1
        // The free list (database 0): each value is a count followed by that many page numbers.
        var free = 0
        var txn: OpaquePointer?
        if mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn) == 0 {
            var cursor: OpaquePointer?
            if mdb_cursor_open(txn, 0, &cursor) == 0 {
                var k = MDB_val(), v = MDB_val()
                var rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
                while rc == 0 {
                    if v.mv_size >= MemoryLayout<Int>.size {
                        free += v.mv_data.loadUnaligned(as: Int.self)
                    }
                    rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
                }
                mdb_cursor_close(cursor)
            }
            mdb_txn_abort(txn)
        }
        let psize = Int(stat.ms_psize)
        return (pages * psize, max(0, pages - free) * psize)
    }

    /// Rewrites the data file without free pages (etcd's defragment): a compacting copy that
    /// replaces the file, then the environment is reopened on it.
    public func defragment() throws {
        lock.lock()
        defer { lock.unlock() }
        let tmp = path + "/defrag"
        mkdir(tmp, 0o700)
        defer {
            unlink(tmp + "/data.mdb")
            rmdir(tmp)
        }
        try check(mdb_env_copy2(env, tmp, UInt32(MDB_CP_COMPACT)))
        let fd = Glibc.open(tmp + "/data.mdb", O_RDONLY)
        if fd >= 0 {
            fsync(fd)
            close(fd)
        }
        mdb_env_close(env)
        env = nil
        guard rename(tmp + "/data.mdb", path + "/data.mdb") == 0 else {
            try open()
            throw LMDBError(code: errno)
        }
        try open()
        refreshSizes()
    }

    /// Writes a consistent compacted copy of the store to the file `file` (for snapshots).
    public func copy(to file: String) throws {
        lock.lock()
        defer { lock.unlock() }
        let fd = Glibc.open(file, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw LMDBError(code: errno) }
        defer { close(fd) }
        try check(mdb_env_copyfd2(env, fd, UInt32(MDB_CP_COMPACT)))
        fsync(fd)
    }

    /// CRC-32C over every record and meta entry (Maintenance.Hash).
    public func hash() throws -> UInt32 {
        lock.lock()
        defer { lock.unlock() }
        var crc = CRC32C()
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        defer { mdb_txn_abort(txn) }
        for dbi in [keyDB, metaDB, blobDB] {
            var cursor: OpaquePointer?
            try check(mdb_cursor_open(txn, dbi, &cursor))
            var k = MDB_val(), v = MDB_val()
            var rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
            while rc == 0 {
                crc.update(UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size))
                crc.update(UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
                rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
            }
            mdb_cursor_close(cursor)
        }
        return crc.value
    }
}

/// The stored form of a record: flag (1 = live), varint key length, key, then for live records
/// create revision, version and lease (8 bytes each, big-endian) and the value. The mod revision is
/// the record's own revision.
public enum RecordCodec {
    public static func encode(_ r: Record) -> Bytes {
        var out = Bytes()
        out.reserveCapacity(r.key.count + (r.kv?.value.count ?? 0) + 32)
        out.append(r.kv == nil ? 0 : 1)
        var n = UInt64(r.key.count)
        while n >= 0x80 {
            out.append(UInt8(n & 0x7F) | 0x80)
            n >>= 7
        }
        out.append(UInt8(n))
        out.append(contentsOf: r.key)
        if let kv = r.kv {
            for x in [kv.createRevision, kv.version, kv.lease] {
                let u = UInt64(bitPattern: x)
                for i in 0..<8 { out.append(UInt8((u >> (56 - 8 * UInt64(i))) & 0xFF)) }
            }
            out.append(contentsOf: kv.value)
        }
        return out
    }

    public static func decode(rev: Revision, _ b: UnsafeRawBufferPointer) -> Record? {
        guard b.count >= 2 else { return nil }
        let live = b[0] == 1
        var i = 1
        var len: UInt64 = 0, shift: UInt64 = 0
        while i < b.count {
            let c = b[i]
            i += 1
            len |= UInt64(c & 0x7F) << shift
            if c & 0x80 == 0 { break }
            shift += 7
            if shift > 63 { return nil }
        }
        guard i + Int(len) <= b.count else { return nil }
        let key = Bytes(b[i..<(i + Int(len))])
        i += Int(len)
        guard live else { return Record(rev: rev, key: key, kv: nil) }
        guard i + 24 <= b.count else { return nil }
        func int64(_ at: Int) -> Int64 {
            var u: UInt64 = 0
            for j in 0..<8 { u = u << 8 | UInt64(b[at + j]) }
            return Int64(bitPattern: u)
        }
        let kv = KeyValue(
            key: key, createRevision: int64(i), modRevision: rev.main, version: int64(i + 8),
            value: Bytes(b[(i + 24)...]), lease: int64(i + 16))
        return Record(rev: rev, key: key, kv: kv)
    }
}
