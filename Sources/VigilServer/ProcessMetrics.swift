import Foundation

/// The standard `process_*` series (Prometheus's process collector, which etcd exports and its
/// dashboards query), read from /proc at each scrape.
enum ProcessMetrics {
    static func text() -> String {
        #if os(Linux)
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ value: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n\(name) \(value)\n"
        }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let page = Double(sysconf(Int32(_SC_PAGESIZE)))
        if let stat = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        {
            // Fields after the command: state is 0, so utime is 11, stime 12, starttime 19,
            // vsize 20 and rss 21 (proc(5) numbers minus 3).
            let f = stat[stat.index(after: close)...].split(separator: " ")
            if f.count > 21 {
                let cpu = ((Double(f[11]) ?? 0) + (Double(f[12]) ?? 0)) / ticks
                metric(
                    "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
                    "\(cpu)")
                metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", String(f[20]))
                metric(
                    "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                    "\(Int((Double(f[21]) ?? 0) * page))")
                if let boot = bootTime() {
                    let start = Double(boot) + (Double(f[19]) ?? 0) / ticks
                    metric(
                        "process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
                        "\(start)")
                }
            }
        }
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
        metric("process_open_fds", "gauge", "Number of open file descriptors.", "\(fds)")
        var limit = rlimit()
        if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 {
            metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", "\(limit.rlim_cur)")
        }
        metric(
            "process_virtual_memory_max_bytes", "gauge", "Maximum amount of virtual memory available in bytes.", "-1")
        return out
        #else
        return ""
        #endif
    }

    /// The system's boot time (seconds since the epoch), from /proc/stat's `btime`.
    private static func bootTime() -> Int? {
        guard let s = try? String(contentsOfFile: "/proc/stat", encoding: .utf8) else { return nil }
        for line in s.split(separator: "\n") where line.hasPrefix("btime ") {
            return Int(line.dropFirst(6).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }
}
