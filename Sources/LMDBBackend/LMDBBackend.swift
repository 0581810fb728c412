import CLMDB
import Foundation
import MVCC

#if canImport(Glibc)
import Glibc
import VigilCore
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

/// The durable backend: LMDB, with a write-ahead log in front. LMDB's databases:
/// - `key`: 16-byte revision (big-endian main, sub) → encoded record (etcd's "key" bucket layout);
/// - `meta`: name → 8-byte big-endian integer;
/// - `blob`: name → bytes (auth users and roles).
///
/// With the log (`log: true`, the server's mode), `commit` appends the batch to the log and syncs
/// it: one `fdatasync` per group commit. Logged batches reach LMDB in `checkpoint`s (one LMDB
/// transaction for many batches), which also record the last log sequence applied
/// (`walApplied` in `meta`); opening replays what the log holds past it. Without the log, `commit`
/// is one LMDB transaction (tools, restores). LMDB fsyncs at its commits unless `noSync`.
///
/// Threads: commits, checkpoints and copies run on the thread pool (`lock` serializes LMDB's
/// writer and environment changes; `walLock` the log and its batch list); the loop reads values
/// (`values(at:)`) through its own read transaction, which LMDB lets run beside the writer.
public final class LMDBBackend: Backend, ValueSource, @unchecked Sendable {
    private var env: OpaquePointer?
    private var keyDB: MDB_dbi = 0
    private var metaDB: MDB_dbi = 0
    private var blobDB: MDB_dbi = 0
    public let path: String
    private let mapSize: Int
    private let flags: UInt32
    private let noSync: Bool
    /// Serializes LMDB's writer and environment changes (commits without the log, checkpoints,
    /// defragment, copies, sizes).
    private let lock = NSLock()

    /// The log (its files guarded by `logLock`, held across a record's write) and the batches it
    /// holds that LMDB does not have yet (guarded by `walLock`, only ever held briefly: the loop
    /// reads these counts).
    private var wal: WriteAheadLog?
    private let logLock = NSLock()
    private let walLock = NSLock()
    private var unflushed: [(sequence: UInt64, batch: WriteBatch, bytes: Int)] = []
    private var unflushedByteCount = 0
    private var unflushedRecordCount = 0
    private var checkpointed: Int64 = 0
    private var lastLogged: UInt64 = 0
    private var lastCheckpointed: UInt64 = 0
    private var spareFailure: String?

    /// The loop's read transaction (reset between reads; renewed for the next).
    private var readTxn: OpaquePointer?

    static let walAppliedName = "walApplied"

    /// Opens (creating if needed) the environment in directory `path`.
    /// - Parameters:
    ///   - mapSize: the largest the data file may grow to.
    ///   - noSync: skip fsync at commit (etcd's `--unsafe-no-fsync`; tests only).
    ///   - log: put the write-ahead log (directory `wal` beside the data file) in front; what it
    ///     holds from an earlier run is applied to LMDB first.
    public init(path: String, mapSize: Int, noSync: Bool = false, log: Bool = false) throws {
        self.path = path
        self.mapSize = mapSize
        self.noSync = noSync
        var flags = UInt32(MDB_NOTLS)
        if noSync { flags |= UInt32(MDB_NOSYNC) }
        self.flags = flags
        mkdir(path, 0o700)
        try open()
        if log { try openLog() }
        refreshSizes()
    }

    /// Replays the log into LMDB (one transaction), then starts it afresh.
    private func openLog() throws {
        let applied = UInt64(bitPattern: try readMeta()[Self.walAppliedName] ?? 0)
        var replay: [(UInt64, WriteBatch)] = []
        wal = try WriteAheadLog(
            directory: path + "/wal", sync: !noSync, applied: applied,
            replay: { sequence, payload in
                guard let batch = BatchCodec.decode(payload) else {
                    throw WriteAheadLog.Failure(description: "write-ahead log record \(sequence) does not decode")
                }
                replay.append((sequence, batch))
            },
            replayed: {
                guard let last = replay.last?.0 else { return }
                try writeTransaction { txn in
                    for (_, batch) in replay { try apply(batch, txn) }
                    try put(txn, metaDB, Array(Self.walAppliedName.utf8), Self.bigEndian(Int64(bitPattern: last)))
                }
                if noSync { try sync() }
            })
        checkpointed = replay.last?.1.revision ?? 0
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

    /// Every record and meta entry (tests and tools: values included, all in memory).
    public func load() throws -> (records: [Record], meta: [String: Int64]) {
        var records: [Record] = []
        try forEachRecord { records.append($0) }
        return (records, try loadMeta())
    }

    /// Calls `body` with every record in revision order, from one read transaction (a consistent
    /// view), holding one record at a time. `values` false leaves them empty (and unread: a
    /// value's overflow pages are never touched).
    public func forEachRecord(values: Bool = true, _ body: (Record) throws -> Void) throws {
        try forEachRecord(values: values, upTo: Int64.max, body)
    }

    private func forEachRecord(values: Bool, upTo: Int64, _ body: (Record) throws -> Void) throws {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn))
        defer { mdb_txn_abort(txn) }
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, keyDB, &cursor))
        defer { mdb_cursor_close(cursor) }
        var k = MDB_val(), v = MDB_val()
        var rc = mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
        var scanned = 0
        while rc == 0 {
            if let rev = Revision(bytes: UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size)),
                let rec = RecordCodec.decode(
                    rev: rev, UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size), value: values)
            {
                if rev.main > upTo { break }
                try body(rec)
            }
            // A walk over the whole file maps all of it: let go of what is behind the cursor.
            scanned += v.mv_size + 64
            if scanned >= 64 << 20 {
                scanned = 0
                releaseMappedPages()
            }
            rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
        }
        if rc != 0 && rc != MDB_NOTFOUND { throw LMDBError(code: rc) }
    }

    /// The meta entries the store and services keep (the log's own entry left out).
    public func loadMeta() throws -> [String: Int64] {
        var meta = try readMeta()
        meta[Self.walAppliedName] = nil
        return meta
    }

    private func readMeta() throws -> [String: Int64] {
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

    /// Makes `batch` durable: with the log, one log record and its sync (LMDB gets it at a later
    /// checkpoint); without, one LMDB transaction.
    public func commit(_ batch: WriteBatch) throws {
        guard wal != nil else { return try write(batch) }
        let payload = BatchCodec.encode(batch)
        Failpoint.trigger("walBeforeWrite")
        logLock.lock()
        let sequence: UInt64
        do {
            sequence = try wal!.append(payload)
        } catch {
            logLock.unlock()
            throw error
        }
        logLock.unlock()
        Failpoint.trigger("walAfterWrite")
        walLock.lock()
        defer { walLock.unlock() }
        unflushed.append((sequence, batch, payload.count))
        unflushedByteCount += payload.count
        unflushedRecordCount += batch.records.count + batch.removed.count
        lastLogged = sequence
    }

    /// Writes `batch` to LMDB in one transaction (no log).
    public func write(_ batch: WriteBatch) throws {
        lock.lock()
        defer { lock.unlock() }
        try writeTransaction { txn in try apply(batch, txn) }
        refreshSizes()
    }

    /// Runs `body` in an LMDB write transaction and commits it. Call with `lock` held (or alone).
    private func writeTransaction(_ body: (OpaquePointer?) throws -> Void) throws {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, 0, &txn))
        do {
            try body(txn)
            try check(mdb_txn_commit(txn))
        } catch {
            mdb_txn_abort(txn)
            throw error
        }
    }

    private func apply(_ batch: WriteBatch, _ txn: OpaquePointer?) throws {
        var buffer: Bytes = []
        for r in batch.records { try put(record: r, txn, &buffer) }
        for rev in batch.removed { try delete(txn, keyDB, rev.bytes) }
        for (name, value) in batch.meta { try put(txn, metaDB, Array(name.utf8), Self.bigEndian(value)) }
        for name in batch.removedMeta { try delete(txn, metaDB, Array(name.utf8)) }
        for (name, value) in batch.blobs {
            if let value {
                try put(txn, blobDB, Array(name.utf8), value)
            } else {
                try delete(txn, blobDB, Array(name.utf8))
            }
        }
    }

    private func put(record r: Record, _ txn: OpaquePointer?, _ buffer: inout Bytes) throws {
        buffer.removeAll(keepingCapacity: true)
        RecordCodec.encode(r, into: &buffer)
        // New revisions sort after every stored one: appended, LMDB fills its pages instead of
        // splitting them in half (a third smaller file for 1 KiB values).
        try put(txn, keyDB, r.rev.bytes, buffer, append: true)
    }

    static func bigEndian(_ value: Int64) -> Bytes {
        let u = UInt64(bitPattern: value)
        return (0..<8).map { UInt8((u >> (56 - 8 * UInt64($0))) & 0xFF) }
    }

    // MARK: The log's checkpoints

    /// Bytes of logged batches LMDB does not have yet.
    public var unflushedBytes: Int {
        walLock.lock()
        defer { walLock.unlock() }
        return unflushedByteCount
    }

    /// Records (written or removed) in logged batches LMDB does not have yet.
    public var unflushedRecords: Int {
        walLock.lock()
        defer { walLock.unlock() }
        return unflushedRecordCount
    }

    /// The sequence numbers of the last batch logged and of the last one LMDB holds.
    public var logSequences: (logged: UInt64, checkpointed: UInt64) {
        walLock.lock()
        defer { walLock.unlock() }
        return (lastLogged, lastCheckpointed)
    }

    /// The store revision LMDB holds everything up to (the store may drop values up to it).
    public var checkpointedRevision: Int64 {
        walLock.lock()
        defer { walLock.unlock() }
        return checkpointed
    }

    /// Whether the log's records go down with `O_DIRECT | O_DSYNC` (sync on, and a file system
    /// that takes it), rather than `pwrite` and `fdatasync`.
    public var logWritesDirect: Bool {
        logLock.lock()
        defer { logLock.unlock() }
        return wal?.writesDirect ?? false
    }

    /// Why the log could not make its next segment ahead of need (the disk is full), if so.
    public var logSpaceFailure: String? {
        walLock.lock()
        defer { walLock.unlock() }
        return spareFailure
    }

    /// Moves every logged batch into LMDB in one transaction and retires the log segments it
    /// covered (thread pool). On failure (a full disk) the batches stay logged and in memory.
    public func checkpoint() throws {
        lock.lock()
        defer { lock.unlock() }
        try checkpointLocked()
    }

    private func checkpointLocked() throws {
        guard let wal else { return }
        walLock.lock()
        let taken = unflushed
        walLock.unlock()
        logLock.lock()
        let needSpare = !wal.hasSpare
        logLock.unlock()
        if let last = taken.last {
            // Several LMDB transactions of `maxCheckpointRecords` each: the new records in order
            // (appended), then the removed ones sorted by revision (a compaction's removals come
            // key by key, spread over the whole file; sorted, each transaction touches a few
            // neighbouring pages), then the meta entries, blobs and the log sequence applied.
            // Pages one transaction frees are reused by the next, where one huge transaction
            // would copy every page it touches and grow the file. Until the last one commits, the
            // log still holds every batch: replaying them again over a partial checkpoint puts
            // and removes the same records (both idempotent), in order.
            var removed: [Revision] = []
            var recordCount = 0
            for entry in taken {
                recordCount += entry.batch.records.count
                removed.append(contentsOf: entry.batch.removed)
            }
            removed.sort()
            var buffer: Bytes = []
            // The records where they are (batch by batch), `maxCheckpointRecords` a transaction.
            var batch = 0, index = 0, written = 0
            while written < recordCount {
                try writeTransaction { txn in
                    var n = 0
                    while batch < taken.count && n < Self.maxCheckpointRecords {
                        let records = taken[batch].batch.records
                        while index < records.count && n < Self.maxCheckpointRecords {
                            try put(record: records[index], txn, &buffer)
                            index += 1
                            n += 1
                            written += 1
                        }
                        if index == records.count {
                            batch += 1
                            index = 0
                        }
                    }
                }
            }
            // The records are in LMDB; the removals, meta entries and log sequence are not yet.
            Failpoint.trigger("checkpointMidway")
            var at = 0
            while at < removed.count {
                let end = min(removed.count, at + Self.maxCheckpointRecords)
                try writeTransaction { txn in
                    for rev in removed[at..<end] { try delete(txn, keyDB, rev.bytes) }
                }
                if end - at == Self.maxCheckpointRecords { releaseMappedPages() }
                at = end
            }
            Failpoint.trigger("checkpointBeforeCommit")
            try writeTransaction { txn in
                for entry in taken {
                    var rest = entry.batch
                    rest.records = []
                    rest.removed = []
                    try apply(rest, txn)
                }
                try put(
                    txn, metaDB, Array(Self.walAppliedName.utf8), Self.bigEndian(Int64(bitPattern: last.sequence)))
            }
            walLock.lock()
            unflushed.removeFirst(taken.count)
            unflushedByteCount -= taken.reduce(0) { $0 + $1.bytes }
            unflushedRecordCount -= recordCount + removed.count
            checkpointed = last.batch.revision
            lastCheckpointed = last.sequence
            walLock.unlock()
            logLock.lock()
            wal.retire(through: last.sequence)
            logLock.unlock()
        }
        if !taken.isEmpty { refreshSizes() }
        if needSpare {
            do {
                let spare = try wal.makeSpare()
                logLock.lock()
                wal.adoptSpare(spare)
                logLock.unlock()
                walLock.lock()
                spareFailure = nil
                walLock.unlock()
            } catch {
                walLock.lock()
                spareFailure = "\(error)"
                walLock.unlock()
            }
        }
    }

    /// Records per LMDB transaction in a checkpoint.
    static let maxCheckpointRecords = 20_000

    // MARK: Reads from the loop

    /// The values at `revs`, read through the loop's read transaction (see `ValueSource`).
    public func values(at revs: [Revision]) -> [Bytes] {
        guard beginRead() else { return Array(repeating: [], count: revs.count) }
        defer { mdb_txn_reset(readTxn) }
        return revs.map { read($0) }
    }

    public func value(at rev: Revision) -> Bytes {
        guard beginRead() else { return [] }
        defer { mdb_txn_reset(readTxn) }
        return read(rev)
    }

    /// Starts (or renews) the loop's read transaction on the latest committed state.
    private func beginRead() -> Bool {
        if readTxn == nil {
            if mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &readTxn) != 0 {
                readTxn = nil
                return false
            }
            return true
        }
        return mdb_txn_renew(readTxn) == 0
    }

    /// One record's value through the read transaction (empty if absent).
    private func read(_ rev: Revision) -> Bytes {
        withUnsafeTemporaryAllocation(byteCount: 16, alignment: 8) { key in
            key.storeBytes(of: UInt64(bitPattern: rev.main).bigEndian, toByteOffset: 0, as: UInt64.self)
            key.storeBytes(of: UInt64(bitPattern: rev.sub).bigEndian, toByteOffset: 8, as: UInt64.self)
            var k = MDB_val(mv_size: 16, mv_data: key.baseAddress)
            var v = MDB_val()
            guard mdb_get(readTxn, keyDB, &k, &v) == 0 else { return [] }
            return RecordCodec.value(UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
        }
    }

    /// Unmaps the data file's pages from this process (they stay in the page cache): after a walk
    /// over the whole file (loading the index, HashKV, a snapshot) the process's resident memory
    /// goes back to what it holds itself. Reads map pages again as they touch them.
    public func releaseMappedPages() {
        // LMDB tells the map's address only for fixed maps: find it in /proc/self/maps.
        guard let maps = try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8) else { return }
        let file = path + "/data.mdb"
        for line in maps.split(separator: "\n") where line.hasSuffix(file) {
            let range = line.prefix { $0 != " " }.split(separator: "-")
            guard range.count == 2, let start = UInt(range[0], radix: 16), let end = UInt(range[1], radix: 16),
                end > start, let base = UnsafeMutableRawPointer(bitPattern: start)
            else { continue }
            madvise(base, Int(end - start), MADV_DONTNEED)
        }
    }

    /// Ends the loop's read transaction (before the environment closes).
    private func dropReadTransaction() {
        if readTxn != nil {
            mdb_txn_abort(readTxn)
            readTxn = nil
        }
    }

    /// `append`: try LMDB's append mode first (the key sorts after every stored one), and a plain
    /// put if it does not.
    private func put(_ txn: OpaquePointer?, _ dbi: MDB_dbi, _ key: Bytes, _ value: Bytes, append: Bool = false) throws {
        var key = key
        var value = value
        try key.withUnsafeMutableBytes { kp in
            try value.withUnsafeMutableBytes { vp in
                var k = MDB_val(mv_size: kp.count, mv_data: kp.baseAddress)
                var v = MDB_val(mv_size: vp.count, mv_data: vp.baseAddress)
                if append {
                    let rc = mdb_put(txn, dbi, &k, &v, UInt32(MDB_APPEND))
                    if rc != MDB_KEYEXIST { return try check(rc) }
                }
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
    /// replaces the file, then the environment is reopened on it (tools: nothing else may use
    /// the backend meanwhile).
    public func defragment() throws {
        try defragmentCopy()
        try defragmentSwap()
    }

    private var defragDirectory: String { path + "/defrag" }

    /// Defragment's first half (thread pool, no commit in flight): checkpoints, writes the
    /// compacting copy beside the data file, syncs it and renames it over the data file (the open
    /// environment keeps reading the old file, whose data is the same). Readers go on meanwhile.
    public func defragmentCopy() throws {
        lock.lock()
        defer { lock.unlock() }
        try checkpointLocked()
        let tmp = defragDirectory
        mkdir(tmp, 0o700)
        unlink(tmp + "/data.mdb")
        defer { rmdir(tmp) }
        do {
            try check(mdb_env_copy2(env, tmp, UInt32(MDB_CP_COMPACT)))
        } catch {
            unlink(tmp + "/data.mdb")
            throw error
        }
        let fd = Glibc.open(tmp + "/data.mdb", O_RDONLY)
        if fd >= 0 {
            fsync(fd)
            close(fd)
        }
        // The old file's mappings go now (while /proc/self/maps still names it), so that closing
        // it on the loop is quick.
        releaseMappedPages()
        // Held open so that the loop's close of the environment is not the old file's last
        // reference: freeing a large deleted file's blocks takes tens of milliseconds.
        let old = Glibc.open(path + "/data.mdb", O_RDONLY | O_CLOEXEC)
        guard rename(tmp + "/data.mdb", path + "/data.mdb") == 0 else {
            let code = errno
            if old >= 0 { close(old) }
            unlink(tmp + "/data.mdb")
            throw LMDBError(code: code)
        }
        oldFile = old
        let dir = Glibc.open(path, O_RDONLY)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
        defragmented = true
    }

    /// Set between `defragmentCopy` and `defragmentSwap`.
    private var defragmented = false
    private var oldFile: Int32 = -1

    /// Defragment's second half (on the loop, which reads values, with no commit in flight): the
    /// environment is reopened on the new file, in a millisecond or two.
    public func defragmentSwap() throws {
        lock.lock()
        defer { lock.unlock() }
        guard defragmented else { return }
        Failpoint.trigger("defragBeforeSwap")
        defragmented = false
        dropReadTransaction()
        mdb_env_close(env)
        env = nil
        if oldFile >= 0 {
            let fd = oldFile
            oldFile = -1
            Thread.detachNewThread { close(fd) }
        }
        try open()
        refreshSizes()
    }

    /// Writes a consistent compacted copy of the store to the file `file` (for snapshots).
    public func copy(to file: String) throws {
        lock.lock()
        defer { lock.unlock() }
        try checkpointLocked()
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
        try checkpointLocked()
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
                let name = UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size)
                if dbi == metaDB && name.elementsEqual(Self.walAppliedName.utf8) {
                    rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
                    continue
                }
                crc.update(UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size))
                crc.update(UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
                rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
            }
            mdb_cursor_close(cursor)
        }
        return crc.value
    }
}

extension LMDBBackend {
    /// HashKV over LMDB (thread pool): checkpoints, then hashes the records up to `upTo` in
    /// revision order from one read transaction (`RecordHasher`), one record in memory at a time.
    /// The caller waits for compaction's removals and the commits up to `upTo` first.
    public func hashKV(upTo: Int64) throws -> UInt32 {
        try checkpoint()
        var hasher = RecordHasher()
        try forEachRecord(values: true, upTo: upTo) { hasher.add($0) }
        releaseMappedPages()
        return hasher.value
    }
}

/// The stored form of a record: flag (1 = live), varint key length, key, then for live records
/// create revision, version and lease (8 bytes each, big-endian) and the value. The mod revision is
/// the record's own revision.
public enum RecordCodec {
    public static func encode(_ r: Record) -> Bytes {
        var out = Bytes()
        encode(r, into: &out)
        return out
    }

    public static func encode(_ r: Record, into out: inout Bytes) {
        out.reserveCapacity(out.count + r.key.count + (r.kv?.value.count ?? 0) + 32)
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
    }

    /// Where a stored record's key starts and how long it is (after the flag byte and the varint
    /// length), if the bytes hold that much.
    private static func keySpan(_ b: UnsafeRawBufferPointer) -> (start: Int, count: Int)? {
        guard b.count >= 2 else { return nil }
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
        guard len <= UInt64(b.count - i) else { return nil }
        return (i, Int(len))
    }

    /// The value of a stored live record (empty for a deletion or a malformed one).
    public static func value(_ b: UnsafeRawBufferPointer) -> Bytes {
        guard let key = keySpan(b), b[0] == 1 else { return [] }
        let start = key.start + key.count + 24
        guard start <= b.count else { return [] }
        return Bytes(UnsafeRawBufferPointer(rebasing: b[start...]))
    }

    public static func decode(rev: Revision, _ b: UnsafeRawBufferPointer, value: Bool = true) -> Record? {
        guard let span = keySpan(b) else { return nil }
        let live = b[0] == 1
        var i = span.start
        let key = Bytes(b[i..<(i + span.count)])
        i += span.count
        guard live else { return Record(rev: rev, key: key, kv: nil) }
        guard i + 24 <= b.count else { return nil }
        func int64(_ at: Int) -> Int64 {
            var u: UInt64 = 0
            for j in 0..<8 { u = u << 8 | UInt64(b[at + j]) }
            return Int64(bitPattern: u)
        }
        let kv = KeyValue(
            key: key, createRevision: int64(i), modRevision: rev.main, version: int64(i + 8),
            value: value ? Bytes(UnsafeRawBufferPointer(rebasing: b[(i + 24)...])) : [], lease: int64(i + 16))
        return Record(rev: rev, key: key, kv: kv)
    }
}
