import Histogram

/// Latencies in milliseconds, kept in an HDR histogram (microsecond units, three significant
/// digits): memory stays bounded whatever the count, and percentiles need no sort.
struct Latencies {
    private var histogram = Histogram<UInt64>(numberOfSignificantValueDigits: .three)

    mutating func record(ms: Double) { _ = histogram.record(UInt64(max(0, ms * 1000).rounded())) }

    var count: Int { Int(histogram.totalCount) }
    var isEmpty: Bool { histogram.totalCount == 0 }

    /// The value at quantile `q` (0…1), in ms.
    func ms(_ q: Double) -> Double { isEmpty ? 0 : Double(histogram.valueAtPercentile(q * 100)) / 1000 }

    var maxMs: Double { isEmpty ? 0 : Double(histogram.max) / 1000 }
}
