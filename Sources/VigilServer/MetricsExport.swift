import CoreMetrics
import EventLoop
import Foundation

/// The server's metrics through the swift-metrics facade, for programs that embed Vigil and
/// collect their metrics with a swift-metrics backend (`MetricsSystem.bootstrap`).
///
/// The request paths keep counting in the server's own plain counters (no facade call, no lock, no
/// allocation per request); every `Configuration.metricsExportInterval` seconds the loop reads
/// those (the same numbers `/metrics` shows) and hands them to the facade: counters as the
/// increase since the last export, gauges as their value, histograms as counters of their buckets
/// (label `le`), `_sum` and `_count`. Names and labels are `/metrics`'s.
final class MetricsFacadeExport {
    private var timer: LoopTimer?
    /// Exports made (for tests and the benchmark).
    private(set) var exports = 0
    /// The longest export (nanoseconds of the loop thread's CPU time, so that time the thread
    /// spends preempted on a busy machine is not counted).
    private(set) var longestExportNs: UInt64 = 0

    init(loop: EventLoop, intervalSeconds: Double, metricsText: @escaping () -> String) {
        let ms = UInt64(max(0.01, intervalSeconds) * 1000)
        timer = LoopTimer(loop: loop, timeoutMs: ms, repeatMs: ms) { [unowned self] in
            let t0 = Self.threadCPUNanoseconds()
            export(metricsText())
            longestExportNs = max(longestExportNs, Self.threadCPUNanoseconds() - t0)
        }
        timer?.unref()
    }

    static func threadCPUNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    func stop() {
        timer?.cancel()
        timer = nil
    }

    /// One series and where it goes.
    private final class Entry {
        enum Kind {
            case gauge(Gauge)
            case counter(Counter)
            case sum(FloatingPointCounter)
        }
        let kind: Kind
        var last = 0.0
        init(_ kind: Kind) { self.kind = kind }
    }
    private var series: [String: Entry] = [:]

    /// Hands a Prometheus text exposition to the facade. A series seen before costs one lookup;
    /// its name and labels are parsed once, when it first appears.
    func export(_ text: String) {
        exports += 1
        var types: [Substring: Substring] = [:]
        for raw in text.utf8.split(separator: UInt8(ascii: "\n")) {
            if raw.first == UInt8(ascii: "#") {
                let line = Substring(raw)
                if line.hasPrefix("# TYPE ") {
                    let parts = line.split(separator: " ")
                    if parts.count >= 4 { types[parts[2]] = parts[3] }
                }
                continue
            }
            guard let space = raw.lastIndex(of: UInt8(ascii: " ")),
                let value = Double(Substring(raw[raw.index(after: space)...]))
            else { continue }
            let key = String(Substring(raw[..<space]))
            let entry = series[key] ?? makeEntry(key, types)
            switch entry.kind {
            case .gauge(let g):
                guard value.isFinite else { continue }
                g.record(value)
            case .counter(let c):
                // Counts are whole and finite; anything else is skipped rather than trapped on.
                guard value.isFinite, value < 9e18 else { continue }
                if value > entry.last { c.increment(by: Int64(value) - Int64(entry.last)) }
            case .sum(let c):
                guard value.isFinite else { continue }
                if value > entry.last { c.increment(by: value - entry.last) }
            }
            entry.last = value
        }
    }

    private func makeEntry(_ key: String, _ types: [Substring: Substring]) -> Entry {
        let (name, dimensions) = Self.parse(Substring(key))
        var family = name
        for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) && types[name] == nil {
            family = name.dropLast(suffix.count)
        }
        let label = String(name)
        let entry: Entry
        switch types[family] {
        case "gauge": entry = Entry(.gauge(Gauge(label: label, dimensions: dimensions)))
        case "histogram" where name.hasSuffix("_sum"):
            entry = Entry(.sum(FloatingPointCounter(label: label, dimensions: dimensions)))
        default: entry = Entry(.counter(Counter(label: label, dimensions: dimensions)))  // counters, buckets, counts
        }
        series[key] = entry
        return entry
    }

    /// `name{a="x",b="y"}` as the name and its labels.
    static func parse(_ series: Substring) -> (Substring, [(String, String)]) {
        guard let brace = series.firstIndex(of: "{") else { return (series, []) }
        let name = series[..<brace]
        var dims: [(String, String)] = []
        var rest = series[series.index(after: brace)...].dropLast()  // without the closing brace
        while let eq = rest.firstIndex(of: "=") {
            let label = rest[..<eq].trimmingCharacters(in: [","])
            rest = rest[rest.index(eq, offsetBy: 2)...]  // past `="`
            guard let quote = rest.firstIndex(of: "\"") else { break }
            dims.append((label, String(rest[..<quote])))
            rest = rest[rest.index(after: quote)...]
        }
        return (name, dims)
    }
}
