#!/usr/bin/env python3
"""Runs a workload against Vigil and a real etcd side by side, in one run, and prints a table.

Both servers are started here on loopback ports with temporary data directories (fsync on for
both), and the same vigil-bench load runs against each in turn, alternating, ROUNDS times. For each
server it reports the median throughput and latency over the rounds, the server's CPU seconds per
1,000 requests (from /proc/<pid>/stat) and its peak RSS (VmHWM from /proc/<pid>/status), and the
ratio Vigil/etcd.

  scripts/bench-vs-etcd.py put range-l range-s txn           # default workloads, a few minutes
  scripts/bench-vs-etcd.py --rounds 3 --total 50000 put
  scripts/bench-vs-etcd.py --markdown put >> Benchmarks/RESULTS.md
  scripts/bench-vs-etcd.py --markdown watch watch-slow watchers  # the watch hub (issue 4)
  scripts/bench-vs-etcd.py --markdown keepalive-1 keepalive-100 leases lease-expiry  # leases (issue 5)
  scripts/bench-vs-etcd.py --markdown compaction                 # history (issue 3)

The watch workloads (fresh servers for each round, one round by default):
  watch       10,000 streams on one prefix over 100 connections, one writer putting --watch-puts keys
  watch-slow  the same plus one stream that stops reading (its connection paused)
  watch-fanout  1,000 streams x 10 watchers each on the prefix
  watch-latency the 10,000 streams with the writer at 20 puts/s (latency without queueing)
  watch-sse   10,000 Server-Sent Events watches on the prefix (one HTTP/1.1 connection each), the same
              writer; Vigil only (etcd has none), printed next to Vigil's `watch` if both are asked for
  watch-conn-each  10,000 gRPC watch streams on one prefix, each on a connection of its own (the
              transport shape of SSE clients); printed next to watch-sse too
  watchers    1,000,000 watchers (10,000 streams x 100 distinct keys): memory per watcher, and
              server CPU per put with 10,000 watchers and with 1,000,000
The lease workloads (same way):
  keepalive-1, keepalive-100   200,000 renewals over 1 / 100 LeaseKeepAlive streams (one in flight each)
  leases                       100,000 leases granted: server memory per lease
  lease-expiry                 100,000 leases (TTL 2 s, one key each) expiring while reads probe the server
The history workload:
  compaction                   1,000,000 revisions over 10,000 keys, then HashKV and Compact(physical),
                               each while reads probe the server every millisecond, then Defragment
The storage workload (issue 17):
  storage                      1,000,000 durable puts of 1 KiB over 100,000 keys; the server's memory after
                               them (VmRSS and its anonymous part); then a restart on the same data: seconds
                               until a Range is answered, and the memory then
The connection workload:
  connections                  2,000 new connections (8 at a time), each one Range, then 2,000 idle ones:
                               connections/s, server CPU per connection, server memory per idle connection

--tls serves both over TLS with the same certificates (scripts/make-test-certs.sh: RSA 2048 server key,
server certificate only) and the load connects with the CA:
  scripts/bench-vs-etcd.py --tls --markdown connections watch put range-s

Needs: the Debian package etcd-server (installed if missing), a release build of vigil and vigil-bench.
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")

WORKLOADS = {
    "put": ["--workload", "put"],
    "range-l": ["--workload", "range", "--consistency", "l"],
    "range-s": ["--workload", "range", "--consistency", "s"],
    "range-history": ["--workload", "range", "--consistency", "s", "--historic"],
    "txn": ["--workload", "txn"],
}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited early")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# Set by --tls: the certificate directory; both servers then serve https:// with its server pair.
TLS_DIR = None


def rss_now_mb(pid):
    """VmRSS and RssAnon of a process now, in MiB."""
    rss = anon = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
    return rss, anon


def tls_server_flags():
    return ["--cert-file", f"{TLS_DIR}/server.pem", "--key-file", f"{TLS_DIR}/server-key.pem"] if TLS_DIR else []


def tls_bench_flags():
    return ["--cacert", f"{TLS_DIR}/ca.pem"] if TLS_DIR else []


class Server:
    def __init__(self, kind, vigil_bin):
        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix=f"bench-{kind}-")
        self.port = free_port()
        url = f"{'https' if TLS_DIR else 'http'}://127.0.0.1:{self.port}"
        if kind == "vigil":
            cmd = [vigil_bin, "--data-dir", self.dir + "/data", "--listen-client-urls", url, "--log-level", "warn"]
        else:
            peer = f"http://127.0.0.1:{free_port()}"
            cmd = ["etcd", "--data-dir", self.dir + "/data", "--listen-client-urls", url,
                   "--advertise-client-urls", url, "--listen-peer-urls", peer,
                   "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}",
                   "--log-level", "warn", "--logger", "zap"]
        cmd += tls_server_flags()
        self.cmd = cmd
        self.log = open(self.dir + ".log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        time.sleep(0.5 if kind == "etcd" else 0.1)  # etcd elects itself leader after listening

    def restart(self, bench_bin):
        """Stops the server (SIGTERM) and starts it again on the same data; returns the seconds from
        the start until it answered a Range."""
        self.proc.terminate()
        self.proc.wait(60)
        t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, timeout=300)
        probe = [bench_bin, "--endpoint", f"127.0.0.1:{self.port}", "--workload", "range", "--total", "1",
                 "--conns", "1", "--clients", "1", "--max-seconds", "5"] + tls_bench_flags()
        while True:
            r = subprocess.run(probe, capture_output=True, text=True)
            if r.returncode == 0 and not json.loads(r.stdout.strip().splitlines()[-1])["errors"]:
                return time.time() - t0
            time.sleep(0.01)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        os.unlink(self.dir + ".log")


def run_bench(bench_bin, server, workload, extra):
    cmd = [bench_bin, "--endpoint", f"127.0.0.1:{server.port}"] + WORKLOADS[workload] + extra + tls_bench_flags()
    cpu0 = cpu_seconds(server.proc.pid)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900).stdout
    cpu = cpu_seconds(server.proc.pid) - cpu0
    r = json.loads(out.strip().splitlines()[-1])
    r["server_cpu_s"] = cpu
    return r


WATCH_WORKLOADS = {
    "watch": ["--workload", "watch", "--streams", "10000", "--watch-conns", "100"],
    "watch-fanout": ["--workload", "watch", "--streams", "1000", "--watch-conns", "100",
                     "--prefix-watchers-per-stream", "10"],
    "watch-latency": ["--workload", "watch-latency", "--streams", "10000", "--watch-conns", "100"],
    "watch-slow": ["--workload", "watch", "--streams", "10000", "--watch-conns", "100", "--slow-streams", "1"],
    "watch-sse": ["--workload", "watch-sse", "--streams", "10000"],
    "watch-conn-each": ["--workload", "watch", "--streams", "10000", "--watch-conns", "10000"],
    "watchers": ["--workload", "watchers", "--streams", "10000", "--watch-conns", "100",
                 "--watchers-per-stream", "100", "--total", "2000"],
    "keepalive-1": ["--workload", "keepalive", "--streams", "1", "--total", "50000"],
    "keepalive-100": ["--workload", "keepalive", "--streams", "100", "--total", "200000", "--conns", "4", "--clients", "4"],
    "leases": ["--workload", "leases", "--total", "100000", "--conns", "4", "--clients", "64"],
    "lease-expiry": ["--workload", "lease-expiry", "--total", "100000", "--conns", "4", "--clients", "64"],
    "compaction": ["--workload", "compaction", "--total", "1000000", "--key-space", "10000", "--conns", "8",
                   "--clients", "256", "--val-size", "64"],
    "connections": ["--workload", "connections", "--total", "2000", "--clients", "8", "--streams", "2000"],
    "storage": ["--workload", "compaction", "--write-only", "--total", "1000000", "--key-space", "100000",
                "--conns", "8", "--clients", "256", "--val-size", "1024"],
}

WATCH_COLUMNS = {
    "watch": [("events_per_s", "events/s", "{:.0f}"), ("p50_ms", "put→event p50 ms", "{:.1f}"),
              ("p99_ms", "p99 ms", "{:.1f}"), ("cpu_s_per_million_events", "CPU s/M events", "{:.2f}"),
              ("bytes_per_stream", "B/stream", "{:.0f}"), ("lost", "lost", "{}"), ("reordered", "reordered", "{}"),
              ("duplicated", "dup", "{}"), ("rss_end_kib", "RSS end KiB", "{}")],
    "watchers": [("bytes_per_watcher", "B/watcher", "{:.0f}"), ("few_cpu_us_per_put", "CPU µs/put 10k", "{:.0f}"),
                 ("many_cpu_us_per_put", "CPU µs/put 1M", "{:.0f}"), ("few_p99_ms", "p99 ms 10k", "{:.2f}"),
                 ("many_p99_ms", "p99 ms 1M", "{:.2f}"), ("rss_many_kib", "RSS KiB", "{}")],
    "keepalive": [("per_s", "renewals/s", "{:.0f}"), ("p50_ms", "p50 ms", "{:.3f}"), ("p99_ms", "p99 ms", "{:.3f}"),
                  ("cpu_us_per_renewal", "CPU µs/renewal", "{:.1f}"), ("expired_answers", "TTL 0 answers", "{}")],
    "leases": [("grants_per_s", "grants/s", "{:.0f}"), ("bytes_per_lease", "B/lease", "{:.0f}")],
    "lease-expiry": [("seconds_to_expire_all", "s until all expired", "{:.1f}"),
                     ("longest_read_ms", "longest read ms", "{:.1f}"), ("left", "keys left", "{}"),
                     ("loop_turn_max_ms", "longest loop turn ms (Vigil)", "{:.1f}")],
    "storage": [("write_seconds", "write 1M s", "{:.1f}"), ("db_mb_before", "db MB", "{:.0f}"),
                ("rss_mb_after_writes", "RSS MiB after writes", "{:.0f}"),
                ("rss_anon_mb_after_writes", "of it anon MiB", "{:.0f}"),
                ("restart_seconds", "restart→serving s", "{:.2f}"),
                ("rss_mb_after_restart", "RSS MiB after restart", "{:.0f}"),
                ("rss_anon_mb_after_restart", "of it anon MiB", "{:.0f}")],
    "compaction": [("write_seconds", "write 1M s", "{:.1f}"),
                   ("hashkv_seconds", "HashKV s", "{:.2f}"), ("hashkv_probe_p99_ms", "read p99 ms during HashKV", "{:.1f}"),
                   ("hashkv_probe_max_ms", "read max ms during HashKV", "{:.1f}"),
                   ("compact_seconds", "compact s", "{:.2f}"),
                   ("probe_p99_ms", "read p99 ms during", "{:.1f}"), ("probe_max_ms", "read max ms during", "{:.1f}"),
                   ("defrag_seconds", "defrag s", "{:.2f}"), ("db_mb_before", "db MB", "{:.1f}"),
                   ("db_mb_after_defrag", "db MB after defrag", "{:.1f}"),
                   ("loop_turn_max_ms", "longest loop turn ms (Vigil)", "{:.1f}")],
    "connections": [("connections_per_s", "new conns/s", "{:.0f}"), ("cpu_ms_per_connection", "server CPU ms/conn", "{:.2f}"),
                    ("bytes_per_idle_connection", "B/idle conn", "{:.0f}"), ("errors", "errors", "{}")],
}


# Every special workload also reports the server's whole CPU time and peak RSS for its run.
COMMON_COLUMNS = [("server_cpu_total_s", "server CPU s", "{:.1f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}")]


def columns_for(workload):
    if workload.startswith("keepalive"):
        return WATCH_COLUMNS["keepalive"]
    if workload in ("watchers", "leases", "lease-expiry", "compaction", "connections", "storage"):
        return WATCH_COLUMNS[workload]
    return WATCH_COLUMNS["watch"]


def loop_turn_max_ms(server):
    """Vigil's longest loop turn so far, from its /metrics (etcd has no such figure)."""
    import ssl, urllib.request
    try:
        scheme = "https" if TLS_DIR else "http"
        ctx = ssl.create_default_context(cafile=f"{TLS_DIR}/ca.pem") if TLS_DIR else None
        text = urllib.request.urlopen(f"{scheme}://127.0.0.1:{server.port}/metrics", timeout=10,
                                      context=ctx).read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("vigil_loop_turn_seconds_max "):
            return float(line.split()[1]) * 1000
    return 0


def run_watch(bench_bin, vigil_bin, workload, a):
    """One watch workload against fresh servers, each alone on the machine in turn."""
    out = {}
    for k in (("vigil",) if workload == "watch-sse" else ("etcd", "vigil")):
        runs = []
        for _ in range(a.watch_rounds):
            server = Server(k, vigil_bin)
            try:
                extra = ["--total", str(a.watch_puts)] if workload.startswith("watch") and workload != "watchers" else []
                cmd = [bench_bin, "--endpoint", f"127.0.0.1:{server.port}", "--conns", "1", "--clients", "1",
                       "--max-seconds", "600", "--server-pid", str(server.proc.pid)] + WATCH_WORKLOADS[workload] + extra \
                    + tls_bench_flags()
                res = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800).stdout
                r = json.loads(res.strip().splitlines()[-1])
                r["loop_turn_max_ms"] = loop_turn_max_ms(server) if k == "vigil" else 0
                r["server_cpu_total_s"] = cpu_seconds(server.proc.pid)
                r["peak_rss_mb"] = peak_rss_mb(server.proc.pid)
                if workload == "storage":
                    r["restart_seconds"] = server.restart(bench_bin)
                    rss, anon = rss_now_mb(server.proc.pid)
                    r["rss_mb_after_restart"], r["rss_anon_mb_after_restart"] = rss, anon
                runs.append(r)
            finally:
                server.stop()
        cols = columns_for(workload) + COMMON_COLUMNS
        out[k] = {f: statistics.median(r[f] for r in runs) for f, _, _ in cols}
    print(json.dumps({"workload": workload, **out}), file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=["put", "range-l", "range-s", "txn"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--total", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--val-size", type=int, default=256)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--vigil-binary", help="a vigil binary to measure instead of this tree's release build "
                    "(e.g. an earlier commit's, to compare two builds against the same etcd)")
    ap.add_argument("--watch-rounds", type=int, default=1)
    ap.add_argument("--watch-puts", type=int, default=200)
    ap.add_argument("--tls", action="store_true", help="serve both over TLS with the same certificates")
    a = ap.parse_args()
    if a.tls:
        global TLS_DIR
        TLS_DIR = os.path.join(ROOT, ".build/test-certs")
        subprocess.run([os.path.join(ROOT, "scripts/make-test-certs.sh"), TLS_DIR], check=True)

    if not shutil.which("etcd"):
        subprocess.run([os.path.join(ROOT, "scripts/install-deps.sh"), "--test"], check=True)
    if not a.no_build:
        subprocess.run(["swift", "build", "-c", "release", "--product", "vigil"], cwd=ROOT, check=True)
        subprocess.run(["swift", "build", "-c", "release", "--product", "vigil-bench"], cwd=ROOT, check=True)
    vigil_bin = a.vigil_binary or os.path.join(ROOT, ".build/release/vigil")
    bench_bin = os.path.join(ROOT, ".build/release/vigil-bench")
    extra = ["--total", str(a.total), "--conns", str(a.conns), "--clients", str(a.clients),
             "--val-size", str(a.val_size)]

    watch = [w for w in a.workloads if w in WATCH_WORKLOADS]
    results = {}
    for w in watch:
        out = run_watch(bench_bin, vigil_bin, w, a)
        results[w] = out
        cols = columns_for(w) + COMMON_COLUMNS
        header = ["workload", "server"] + [c[1] for c in cols]
        if w == "watch-sse":
            # etcd has no SSE: next to Vigil's gRPC streams of the same run (`watch`), if measured.
            lines = [[w, "vigil (SSE)"] + [fmt.format(out["vigil"][f]) for f, _, fmt in cols]]
            for grpc in ("watch", "watch-conn-each"):
                if grpc not in results:
                    continue
                g = results[grpc]["vigil"]
                lines.append([grpc, "vigil (gRPC)"] + [fmt.format(g[f]) for f, _, fmt in cols])
                lines.append([w, f"SSE/gRPC {grpc}"] + ["{:.2f}x".format(out["vigil"][f] / g[f]) if g[f] else "-"
                                                        for f, _, _ in cols])
            print_table(header, lines, a.markdown)
            continue
        lines = [[w, k] + [fmt.format(out[k][f]) for f, _, fmt in cols] for k in ("vigil", "etcd")]
        lines.append([w, "vigil/etcd"] + ["{:.2f}x".format(out["vigil"][f] / out["etcd"][f]) if out["etcd"][f] else "-"
                                          for f, _, _ in cols])
        print_table(header, lines, a.markdown)
    a.workloads = [w for w in a.workloads if w not in WATCH_WORKLOADS]

    rows = []
    for w in a.workloads:
        servers = {k: Server(k, vigil_bin) for k in ("vigil", "etcd")}
        results = {"vigil": [], "etcd": []}
        try:
            for _ in range(a.rounds):
                for k in ("etcd", "vigil"):
                    results[k].append(run_bench(bench_bin, servers[k], w, extra))
            rss = {k: peak_rss_mb(s.proc.pid) for k, s in servers.items()}
        finally:
            for s in servers.values():
                s.stop()
        summary = {}
        for k, rs in results.items():
            med = lambda f: statistics.median(r[f] for r in rs)
            summary[k] = {
                "throughput": med("throughput"), "p50_ms": med("p50_ms"), "p90_ms": med("p90_ms"),
                "p99_ms": med("p99_ms"), "max_ms": max(r["max_ms"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "cpu_s_per_1k": 1000 * sum(r["server_cpu_s"] for r in rs) / sum(r["requests"] for r in rs),
                "peak_rss_mb": rss[k],
            }
        # Each etcd round is followed at once by a Vigil round: the ratio of each such pair is
        # less exposed to the machine's speed drifting over the run than the ratio of medians.
        pairs = [v["throughput"] / e["throughput"] for v, e in zip(results["vigil"], results["etcd"])
                 if e["throughput"]]
        summary["paired_ratios"] = [round(r, 2) for r in pairs]
        rows.append((w, summary))
        print(json.dumps({"workload": w, **summary}), file=sys.stderr)

    cols = [("throughput", "req/s", "{:.0f}"), ("p50_ms", "p50 ms", "{:.2f}"), ("p90_ms", "p90 ms", "{:.2f}"),
            ("p99_ms", "p99 ms", "{:.2f}"), ("max_ms", "max ms", "{:.1f}"), ("errors", "errors", "{}"),
            ("cpu_s_per_1k", "CPU s/1k req", "{:.3f}"), ("peak_rss_mb", "peak RSS MiB", "{:.1f}")]
    header = ["workload", "server"] + [c[1] for c in cols]
    lines = []
    for w, s in rows:
        for k in ("vigil", "etcd"):
            lines.append([w, k] + [fmt.format(s[k][f]) for f, _, fmt in cols])
        ratio = []
        for f, _, _ in cols:
            e = s["etcd"][f]
            ratio.append("{:.2f}x".format(s["vigil"][f] / e) if e else "-")
        lines.append([w, "vigil/etcd"] + ratio)
    if rows:
        print_table(header, lines, a.markdown)
        for w, s in rows:
            p = s["paired_ratios"]
            if p:
                print(f"{w}: vigil/etcd req/s round by round {', '.join(f'{r:.2f}x' for r in p)}; "
                      f"median {statistics.median(p):.2f}x")


def print_table(header, lines, markdown):
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for l in lines:
            print("| " + " | ".join(l) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
        for l in [header] + lines:
            print("  ".join(str(x).rjust(wd) for x, wd in zip(l, widths)))


if __name__ == "__main__":
    main()
