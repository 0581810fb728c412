import EtcdAPI
import EventLoop
import Foundation
import LMDBBackend
import Logging
import VigilCore

/// Maintenance's view of the LMDB backend: its sizes, and the copies (defragment, hash, snapshot)
/// that run on the thread pool between group commits, with no commit in flight meanwhile.
final class BackendMaintenance: MaintenanceBackend {
    private let loop: EventLoop
    private let backend: LMDBBackend
    private unowned let commits: CommitCoordinator
    private let logger: Logger
    private let snapshotDirectory: String

    init(loop: EventLoop, backend: LMDBBackend, commits: CommitCoordinator, logger: Logger, snapshotDirectory: String) {
        self.loop = loop
        self.backend = backend
        self.commits = commits
        self.logger = logger
        self.snapshotDirectory = snapshotDirectory
    }

    var dbSize: Int64 { Int64(backend.lastSizes.allocated) }
    var dbSizeInUse: Int64 { Int64(backend.lastSizes.inUse) }

    func defragment(_ done: @escaping ((any Error)?) -> Void) {
        let backend = self.backend
        let failure = Handoff<(any Error)?>(nil)
        let started = loop.nowMilliseconds
        commits.exclusive(
            {
                do { try backend.defragment() } catch { failure.value = error }
            },
            done: { [logger, loop] in
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

    func snapshot(_ done: @escaping (Result<String, any Error>) -> Void) {
        let backend = self.backend
        let file = snapshotDirectory + "/snapshot-\(UInt64.random(in: 0...UInt64.max)).db"
        let result = Handoff<Result<String, any Error>>(.failure(EtcdError.notCapable))
        commits.exclusive(
            {
                result.value = Result {
                    try backend.copy(to: file)
                    return file
                }
            }, done: { done(result.value) })
    }
}

/// Puts a snapshot file in place as the data file of an empty member directory (`--restore-snapshot`);
/// a trailing SHA-256 (as the Snapshot stream ends) is checked and dropped.
enum SnapshotRestore {
    static func restore(snapshot: String, into member: String, logger: Logger) throws {
        let target = member + "/data.mdb"
        if FileManager.default.fileExists(atPath: target) {
            logger.warning(
                "--restore-snapshot ignored: the data directory already holds data", metadata: ["file": "\(target)"])
            return
        }
        var data = try Data(contentsOf: URL(fileURLWithPath: snapshot))
        if data.count > 32 {
            var sha = SHA256()
            sha.update(data.prefix(data.count - 32))
            if Data(sha.finish()) == data.suffix(32) { data = data.prefix(data.count - 32) }
        }
        try FileManager.default.createDirectory(atPath: member, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: target))
        logger.info("restored snapshot", metadata: ["file": "\(snapshot)", "bytes": "\(data.count)"])
    }
}
