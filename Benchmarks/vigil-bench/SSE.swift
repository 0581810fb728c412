// The watch-sse workload of vigil-bench: `streams` Server-Sent Events watches on the prefix "w/"
// (GET /v3/watch?key=w/&prefix=true, one HTTP/1.1 connection each, as browsers and curl make
// them), then one writer puts `total` keys under it with one put in flight, over gRPC. Reports
// the same figures as the gRPC watch workload: events/s, put→event latency, server CPU per
// million events, server memory per stream, and events lost, duplicated or out of order.
import EventLoop
import Foundation
import GRPC
import VigilClient

/// One SSE watch: reads the chunked HTTP/1.1 answer and counts the `event: put` blocks, checking
/// that their ids (revisions) only go up.
final class SSEBenchStream: ByteStreamDelegate {
    private var raw: [UInt8] = []
    private var headDone = false
    private var text: [UInt8] = []
    private(set) var created = false
    private(set) var events = 0
    private(set) var outOfOrder = 0
    private var lastID: Int64 = 0
    private(set) var closed = false
    var onEvent: (() -> Void)?

    func connection(_ c: any ByteStream, received bytes: UnsafeRawBufferPointer) {
        raw.append(contentsOf: bytes)
        if !headDone {
            guard let end = find([13, 10, 13, 10], in: raw, from: 0) else { return }
            raw.removeFirst(end + 4)
            headDone = true
        }
        // Chunked transfer coding: whole chunks into `text`.
        var at = 0
        while let lineEnd = find([13, 10], in: raw, from: at) {
            let sizeText = String(decoding: raw[at..<lineEnd], as: UTF8.self).split(separator: ";").first ?? ""
            guard let size = Int(sizeText, radix: 16), lineEnd + 2 + size + 2 <= raw.count else { break }
            text.append(contentsOf: raw[(lineEnd + 2)..<(lineEnd + 2 + size)])
            at = lineEnd + 2 + size + 2
        }
        if at > 0 { raw.removeFirst(at) }
        // SSE blocks end with a blank line.
        var start = 0
        while let end = find([10, 10], in: text, from: start) {
            block(text[start..<end])
            start = end + 2
        }
        if start > 0 { text.removeFirst(start) }
    }

    private func block(_ b: ArraySlice<UInt8>) {
        let s = String(decoding: b, as: UTF8.self)
        if s.hasPrefix("retry:") || s.hasPrefix(":") {
            if s.contains(": watching") { created = true }
            return
        }
        guard s.contains("event: put") else { return }
        var id: Int64 = 0
        for line in s.split(separator: "\n") where line.hasPrefix("id: ") { id = Int64(line.dropFirst(4)) ?? 0 }
        if id <= lastID { outOfOrder += 1 }
        lastID = id
        events += 1
        onEvent?()
    }

    private func find(_ needle: [UInt8], in hay: [UInt8], from: Int) -> Int? {
        guard hay.count >= needle.count else { return nil }
        var i = from
        while i + needle.count <= hay.count {
            if hay[i] == needle[0] && Array(hay[i..<(i + needle.count)]) == needle { return i }
            i += 1
        }
        return nil
    }

    func connectionClosed(_ c: any ByteStream) { closed = true }
    func connectionWritable(_ c: any ByteStream) {}
}

extension WatchBench {
    func runSSE() throws -> [String: Any] {
        let rss0 = probe.rssKiB()
        var streams: [SSEBenchStream] = []
        var sockets: [TCPConnection] = []
        var failures = 0
        let request = Array(
            "GET /v3/watch?key=w/&prefix=true HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".utf8)
        // Connected 500 at a time (the listen backlog).
        var opened = 0
        while opened < bench.streams {
            let batch = min(500, bench.streams - opened)
            var done = 0
            for _ in 0..<batch {
                TCPConnection.connect(loop: loop, host: "127.0.0.1", port: bench.port) { r in
                    done += 1
                    switch r {
                    case .success(let c):
                        let s = SSEBenchStream()
                        streams.append(s)
                        sockets.append(c)
                        c.start(delegate: s)
                        c.write(request)
                    case .failure: failures += 1
                    }
                }
            }
            _ = runUntil(seconds: 30) { done == batch }
            opened += batch
        }
        guard failures == 0 else { throw BenchError("\(failures) SSE connections failed") }
        guard runUntil(seconds: bench.maxSeconds, { streams.allSatisfy(\.created) }) else {
            throw BenchError("not every SSE watch was created")
        }
        Thread.sleep(forTimeInterval: 1)
        let rssStreams = probe.rssKiB()

        let total = bench.total
        var sendTimes = [UInt64](repeating: 0, count: total)
        var latencies = Latencies()
        let sampleEvery = max(1, total * streams.count / 20_000_000)
        var delivered = 0
        for (n, s) in streams.enumerated() {
            s.onEvent = { [unowned s] in
                delivered += 1
                guard n % sampleEvery == 0, s.events <= total else { return }
                latencies.record(ms: Double(DispatchTime.now().uptimeNanoseconds - sendTimes[s.events - 1]) / 1e6)
            }
        }
        var result = deliver(
            total: total, expected: total * streams.count, sentAt: { sendTimes[$0] = $1 }, delivered: { delivered })
        result.merge(
            figures(
                streams: streams.map { ($0.events, $0.outOfOrder) }, perStream: total, latencies: latencies,
                memory: (rss0, rssStreams))
        ) { $1 }
        result["workload"] = "watch-sse"
        for c in sockets { c.close() }
        return result
    }
}
