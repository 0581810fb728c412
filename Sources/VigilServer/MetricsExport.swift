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
    private var counters: [String: (counter: Counter, last: Int64)] = [:]
    private var sums: [String: (counter: FloatingPointCounter, last: Double)] = [:]
    private var gauges: [String: Gauge] = [:]
    /// Exports made (for tests and the benchmark).
    private(set) var exports = 0
    /// The longest export (nanoseconds): the loop time it costs.
    private(set) var longestExportNs: UInt64 = 0

    init(loop: EventLoop, intervalSeconds: Double, metricsText: @escaping () -> String) {
        let ms = UInt64(max(0.01, intervalSeconds) * 1000)
        timer = LoopTimer(loop: loop, timeoutMs: ms, repeatMs: ms) { [unowned self] in
            let t0 = DispatchTime.now().uptimeNanoseconds
            export(metricsText())
            longestExportNs = max(longestExportNs, DispatchTime.now().uptimeNanoseconds - t0)
        }
        timer?.unref()
    }

    func stop() {
        timer?.cancel()
        timer = nil
    }

    /// Hands a Prometheus text exposition to the facade.
    func export(_ text: String) {
        exports += 1
        var types: [Substring: Substring] = [:]
        for line in text.split(separator: "\n") {
            if line.hasPrefix("# TYPE ") {
                let parts = line.split(separator: " ")
                if parts.count >= 4 { types[parts[2]] = parts[3] }
                continue
            }
            if line.hasPrefix("#") { continue }
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                continue
            }
            let series = line[..<space]
            let (name, dimensions) = Self.parse(series)
            var family = name
            for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) && types[name] == nil {
                family = name.dropLast(suffix.count)
            }
            switch types[family] {
            case "gauge":
                gauge(String(series), name, dimensions).record(value)
            case "histogram" where name.hasSuffix("_sum"):
                let key = String(series)
                let entry = sums[key] ?? (FloatingPointCounter(label: String(name), dimensions: dimensions), 0)
                if value > entry.last { entry.counter.increment(by: value - entry.last) }
                sums[key] = (entry.counter, value)
            default:  // counters, histogram buckets and counts
                let key = String(series)
                let entry = counters[key] ?? (Counter(label: String(name), dimensions: dimensions), 0)
                let now = Int64(value)
                if now > entry.last { entry.counter.increment(by: now - entry.last) }
                counters[key] = (entry.counter, now)
            }
        }
    }

    private func gauge(_ key: String, _ name: Substring, _ dimensions: [(String, String)]) -> Gauge {
        if let g = gauges[key] { return g }
        let g = Gauge(label: String(name), dimensions: dimensions)
        gauges[key] = g
        return g
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
