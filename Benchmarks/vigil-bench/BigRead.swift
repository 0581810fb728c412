import ArgumentParser
import EtcdProto
import EventLoop
import Foundation
import GRPC
import VigilClient
import VigilCore

/// `big-read`: one big range (`--key-space` keys of `--val-size` bytes under one prefix, written
/// first unless `--skip-fill`) read whole three ways, one after the other: by RangeStream (etcd
/// 3.7; skipped where the server answers Unimplemented), by Range pages of `--page-limit` at the
/// first page's revision (the apiserver's fallback), and by one unary Range. For each: seconds,
/// MB/s, and the server's peak memory above what it held just before (total RSS, and its
/// anonymous part: file pages of a memory-mapped database are page cache).
struct BigReadBench {
    let bench: Bench
    let loop: EventLoop
    let connection: GRPCClientConnection
    let probe: ServerProbe
    let prefix = "/big/"
    let pageLimit: Int64

    func key(_ i: Int) -> Data { Data(String(format: "%@%09d", prefix, i).utf8) }

    func run(fill: Bool) throws -> [String: Any] {
        if fill { try write() }
        var out: [String: Any] = ["workload": "big-read", "keys": bench.keySpace, "val_size": bench.valSize]
        for mode in ["stream", "paged", "unary"] {
            // Let the last mode's memory settle.
            _ = loop.run(forAtMost: 1.5) { false }
            let before = probe.memoryKiB()
            var peak = before
            let sampler = LoopTimer(loop: loop, timeoutMs: 5, repeatMs: 5) {
                let m = probe.memoryKiB()
                peak = (max(peak.rss, m.rss), max(peak.anon, m.anon), max(peak.file, m.file))
            }
            let start = DispatchTime.now().uptimeNanoseconds
            let (keys, bytes, error) = read(mode)
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            sampler.cancel()
            var r: [String: Any] = [
                "keys": keys, "seconds": seconds, "mb_per_s": Double(bytes) / 1e6 / seconds,
                "peak_rss_above_mib": Double(peak.rss - before.rss) / 1024,
                "peak_anon_above_mib": Double(peak.anon - before.anon) / 1024,
            ]
            if let error { r["error"] = error }
            out[mode] = r
        }
        return out
    }

    /// Writes the keys, 64 puts in flight.
    private func write() throws {
        let value = Data(repeating: UInt8(ascii: "v"), count: bench.valSize)
        var next = 0, done = 0, failed: String?
        func one() {
            guard next < bench.keySpace else { return }
            var r = Etcdserverpb_PutRequest()
            r.key = key(next)
            r.value = value
            next += 1
            connection.unary(EtcdMethod.put.path, r) { (res: Result<Etcdserverpb_PutResponse, GRPCStatus>) in
                if case .failure(let e) = res, failed == nil { failed = e.description }
                done += 1
                if done == bench.keySpace { loop.stop() } else { one() }
            }
        }
        for _ in 0..<64 { one() }
        loop.run()
        if let failed { throw ValidationError("fill: \(failed)") }
    }

    private var end: Data { Data(KeySpaceEnd.of(prefix).utf8) }

    /// Reads the whole range one way: keys and bytes received (keys + values), or an error.
    private func read(_ mode: String) -> (Int, Int, String?) {
        var keys = 0, bytes = 0
        var error: String?
        var finished = false
        var r = Etcdserverpb_RangeRequest()
        r.key = Data(prefix.utf8)
        r.rangeEnd = end
        switch mode {
        case "stream":
            let call = connection.open(
                EtcdMethod.rangeStream.path,
                onMessage: { m in
                    guard let chunk = try? Etcdserverpb_RangeStreamResponse(serializedBytes: m) else { return }
                    keys += chunk.rangeResponse.kvs.count
                    bytes += chunk.rangeResponse.kvs.reduce(0) { $0 + $1.key.count + $1.value.count }
                },
                onClose: { status in
                    if status.code != .ok { error = status.description }
                    finished = true
                })
            call.send((try? r.serializedBytes()) ?? [])
            call.closeSend()
        case "paged":
            var revision: Int64 = 0
            func page(from start: Data) {
                var p = r
                p.key = start
                p.limit = pageLimit
                p.revision = revision
                connection.unary(EtcdMethod.range.path, p) { (res: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                    switch res {
                    case .failure(let e):
                        error = e.description
                        finished = true
                    case .success(let resp):
                        if revision == 0 { revision = resp.header.revision }
                        keys += resp.kvs.count
                        bytes += resp.kvs.reduce(0) { $0 + $1.key.count + $1.value.count }
                        if resp.more, let last = resp.kvs.last {
                            page(from: last.key + Data([0]))
                        } else {
                            finished = true
                        }
                    }
                }
            }
            page(from: r.key)
        default:
            connection.unary(EtcdMethod.range.path, r) { (res: Result<Etcdserverpb_RangeResponse, GRPCStatus>) in
                switch res {
                case .failure(let e): error = e.description
                case .success(let resp):
                    keys = resp.kvs.count
                    bytes = resp.kvs.reduce(0) { $0 + $1.key.count + $1.value.count }
                }
                finished = true
            }
        }
        _ = loop.run(forAtMost: bench.maxSeconds) { finished }
        return (keys, bytes, finished ? error : "did not finish in \(bench.maxSeconds) s")
    }
}

/// The end of the range of every key with a prefix.
enum KeySpaceEnd {
    static func of(_ prefix: String) -> String {
        var b = Array(prefix.utf8)
        b[b.count - 1] += 1
        return String(decoding: b, as: UTF8.self)
    }
}
