import Bolt
import EtcdAPI
import EventLoop
import Foundation
import LMDBBackend
import Logging
import MVCC
import VigilCore

/// Maintenance's view of the LMDB backend: its sizes, and the copies (defragment, hash, snapshot)
/// that run on the thread pool between group commits, with no commit in flight meanwhile.
final class BackendMaintenance: MaintenanceBackend {
    private let loop: EventLoop
    private let backend: LMDBBackend
    private unowned let commits: CommitCoordinator
    private let logger: Logger
    private let snapshotDirectory: String
    /// This member as the snapshot's `members` bucket names it (set once the services exist).
    var identity: (() -> MemberIdentity)?

    init(loop: EventLoop, backend: LMDBBackend, commits: CommitCoordinator, logger: Logger, snapshotDirectory: String) {
        self.loop = loop
        self.backend = backend
        self.commits = commits
        self.logger = logger
        self.snapshotDirectory = snapshotDirectory
    }

    /// LMDB's file, plus the logged batches not yet checkpointed into it.
    var dbSize: Int64 { Int64(backend.lastSizes.allocated + backend.unflushedBytes) }
    var dbSizeInUse: Int64 { Int64(backend.lastSizes.inUse + backend.unflushedBytes) }

    func defragment(_ done: @escaping ((any Error)?) -> Void) {
        let backend = self.backend
        let failure = Handoff<(any Error)?>(nil)
        let started = loop.nowMilliseconds
        commits.exclusive(
            {
                do { try backend.defragmentCopy() } catch { failure.value = error }
            },
            done: { [logger, loop] in
                // The copy replaces the file on the loop, which reads values: a reopen, not a copy.
                if failure.value == nil {
                    do { try backend.defragmentSwap() } catch { failure.value = error }
                }
                logger.info(
                    "defragmented",
                    metadata: [
                        "took_ms": "\(loop.nowMilliseconds - started)", "db_size": "\(backend.lastSizes.allocated)",
                    ])
                done(failure.value)
            })
    }

    func hash(_ done: @escaping (Result<UInt32, any Error>) -> Void) {
        let backend = self.backend
        let result = Handoff<Result<UInt32, any Error>>(.failure(EtcdError.notCapable))
        commits.exclusive({ result.value = Result { try backend.hash() } }, done: { done(result.value) })
    }

    /// HashKV off the loop: LMDB's records up to `revision`, read in revision order beside the
    /// commits (the caller has waited for compaction and the commits up to `revision`).
    func hashKV(upTo revision: Int64, _ done: @escaping (Result<UInt32, any Error>) -> Void) {
        let backend = self.backend
        let result = Handoff<Result<UInt32, any Error>>(.failure(EtcdError.notCapable))
        commits.backgroundRead(
            { result.value = Result { try backend.hashKV(upTo: revision) } }, done: { done(result.value) })
    }

    /// A snapshot in etcd's format (a bbolt file with etcd's buckets), made off the loop from one
    /// consistent read of the backend, with no commit in flight.
    func snapshot(_ done: @escaping (Result<String, any Error>) -> Void) {
        let backend = self.backend
        let file = snapshotDirectory + "/snapshot-\(UInt64.random(in: 0...UInt64.max)).db"
        let result = Handoff<Result<String, any Error>>(.failure(EtcdError.notCapable))
        guard let identity = identity?() else { return done(.failure(EtcdError.notCapable)) }
        let clusterVersion = EtcdServices.clusterVersion
        commits.exclusive(
            {
                result.value = Result {
                    try backend.checkpoint()
                    // Streamed: one record at a time from LMDB to the file's leaf pages.
                    try EtcdSnapshot.write(
                        to: file, records: { try backend.forEachRecord($0) }, meta: try backend.loadMeta(),
                        blobs: try backend.loadBlobs(), identity: identity, clusterVersion: clusterVersion)
                    backend.releaseMappedPages()
                    return file
                }
            }, done: { done(result.value) })
    }
}

/// `--restore-snapshot`: starts an empty member directory from a snapshot, an etcd one (bbolt,
/// from a real etcd or from Vigil: revisions, keys, leases, users and roles kept) or one of
/// Vigil's older LMDB copies. A trailing SHA-256 (as etcd's and Vigil's Snapshot streams end) must
/// match. The member directory is built aside and moved into place only when whole: a refused
/// file leaves the data directory as it was.
enum SnapshotRestore {
    struct Refused: Error, CustomStringConvertible {
        let description: String
    }

    static func restore(snapshot: String, into member: String, mapSize: Int, logger: Logger) throws {
        let target = member + "/data.mdb"
        if FileManager.default.fileExists(atPath: target) {
            logger.warning(
                "--restore-snapshot ignored: the data directory already holds data", metadata: ["file": "\(target)"])
            return
        }
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: snapshot), options: .alwaysMapped) } catch {
            throw Refused(description: "cannot read snapshot \(snapshot): \(error.localizedDescription)")
        }
        // etcd's rule: a file whose size is a multiple of 512 plus 32 ends with a SHA-256 of the rest.
        var length = data.count
        if data.count % 512 == 32 {
            var sha = SHA256()
            sha.update(data.prefix(data.count - 32))
            let expected = Array(data.suffix(32)), got = sha.finish()
            guard expected == got else {
                throw Refused(
                    description:
                        "snapshot \(snapshot) failed its integrity check: expected sha256 \(hex(expected)), got \(hex(got))"
                )
            }
            length -= 32
        }
        let building = member + ".restoring"
        try? FileManager.default.removeItem(atPath: building)
        do {
            try FileManager.default.createDirectory(atPath: building, withIntermediateDirectories: true)
            Failpoint.trigger("snapshotMidRestore")
            if length >= 20 && Bolt.Reader.isBolt(data) {
                try restoreBolt(snapshot, into: building, mapSize: mapSize, logger: logger)
            } else {
                try data.prefix(length).write(to: URL(fileURLWithPath: building + "/data.mdb"))
                try LMDBBackend(path: building, mapSize: mapSize).forEachRecord { _ in }
            }
            try? FileManager.default.removeItem(atPath: member)
            try FileManager.default.moveItem(atPath: building, toPath: member)
        } catch {
            try? FileManager.default.removeItem(atPath: building)
            if error is Refused || error is EtcdSnapshot.Refused || error is Bolt.FormatError { throw error }
            throw Refused(description: "cannot restore snapshot \(snapshot): \(error)")
        }
        logger.info("restored snapshot", metadata: ["file": "\(snapshot)", "bytes": "\(length)"])
    }

    private static func restoreBolt(_ snapshot: String, into dir: String, mapSize: Int, logger: Logger) throws {
        let reader = try Bolt.Reader(path: snapshot)
        let started = Date()
        // Records go to LMDB in batches as they are read, so a large snapshot never sits in memory.
        let backend = try LMDBBackend(path: dir, mapSize: mapSize, noSync: true)
        var batch = WriteBatch()
        var count = 0
        let content = try EtcdSnapshot.read(
            reader,
            records: { r in
                batch.records.append(r)
                count += 1
                if batch.records.count == 10_000 {
                    batch.revision = r.rev.main
                    try backend.write(batch)
                    batch.records.removeAll(keepingCapacity: true)
                }
            },
            progress: { n in logger.info("restoring snapshot", metadata: ["records": "\(n)", "file": "\(snapshot)"]) })
        batch.meta = content.meta
        batch.blobs = content.blobs.mapValues { Optional($0) }
        batch.revision = content.meta[MetaKey.currentRevision] ?? 1
        try backend.write(batch)
        try backend.sync()
        logger.info(
            "restored an etcd snapshot",
            metadata: [
                "records": "\(count)", "revision": "\(batch.revision)",
                "took_s": "\(String(format: "%.1f", Date().timeIntervalSince(started)))",
            ])
    }

    private static func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }
}
