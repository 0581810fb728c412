#!/usr/bin/env python3
"""Vigil's mirror mode against etcd's own grpc-proxy, side by side in one run, over one real 3-member
etcd cluster on loopback (issue 19).

A fresh cluster is started here; then for each proxy in turn (`etcd grpc-proxy start`, then
`vigil grpc-proxy start`), the same vigil-bench load runs against the proxy's port and the figures
are read from the proxy's process (CPU from /proc/<pid>/stat, memory from VmRSS):

  watch        10,000 watch streams on one prefix over 100 connections, 200 puts through the proxy:
               events/s, proxy CPU s per million events, proxy bytes per stream, lost/reordered/dup
  watch-2k     the same with 2,000 streams (etcd's grpc-proxy does not create 10,000 in 240 s here)
  watchers     100,000 watchers on distinct keys (1,000 streams x 100): proxy bytes per watcher, and the
               most watchers the upstream members held meanwhile (etcd_debugging_mvcc_watcher_total,
               summed over the members, less what they held before the proxy started)
  range-l      linearizable single-key Range through the proxy (64 in flight over 4 connections)
  range-l-1    the same with one client, one request in flight (the latency of each read)
  range-s      serializable single-key Range, 64 in flight
  put-1        one client putting through the proxy (a forwarded write, then the mirror applying it)
  copy-100k    100,000 keys of 256 B in the cluster first: seconds from the proxy's start until it
               listens (Vigil loads its copy first), its memory then, and its first read
  leader-kill  1,000 streams on one prefix, 100 puts/s through the proxy (a failed put is sent again),
               the cluster's leader killed 3 s in and restarted 5 s later: the longest put→event time
               (the longest gap in delivered events, election included), lost/reordered/dup

  scripts/bench-mirror.py                      # all four, a few minutes
  scripts/bench-mirror.py --markdown watch range-l

Needs: Debian's etcd-server (etcd and its grpc-proxy), a release build of vigil and vigil-bench.
"""
import argparse, importlib.util, json, os, shutil, subprocess, sys, tempfile, threading, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The helpers bench-vs-etcd.py already has: ports, /proc readings, stopping a server.
_spec = importlib.util.spec_from_file_location("bench_vs_etcd", os.path.join(ROOT, "scripts", "bench-vs-etcd.py"))
bench_vs_etcd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_vs_etcd)
free_port, wait_port, cpu_seconds = bench_vs_etcd.free_port, bench_vs_etcd.wait_port, bench_vs_etcd.cpu_seconds


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Cluster:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-mirror-etcd-")
        self.members = [(f"m{i}", free_port(), free_port()) for i in range(3)]
        self.procs = [None] * 3
        for i in range(3):
            self.start(i, "new")
        self.wait_healthy()

    @property
    def endpoints(self):
        return ",".join(f"127.0.0.1:{c}" for _, c, _ in self.members)

    def start(self, i, state="existing"):
        name, client, peer = self.members[i]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, _, p in self.members)
        cmd = ["etcd", "--name", name, "--data-dir", f"{self.dir}/{name}",
               "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls",
               f"http://127.0.0.1:{client}", "--listen-peer-urls", f"http://127.0.0.1:{peer}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}", "--initial-cluster", initial,
               "--initial-cluster-token", "bench", "--initial-cluster-state", state,
               "--log-level", "warn", "--logger", "zap"]
        self.procs[i] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_healthy(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(["etcdctl", "--endpoints", self.endpoints, "get", "probe", "--command-timeout", "1s"],
                               capture_output=True, env={**os.environ, "ETCDCTL_API": "3"})
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("etcd cluster not healthy")

    def leader(self):
        r = subprocess.run(["etcdctl", "--endpoints", self.endpoints, "endpoint", "status", "-w", "json"],
                           capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"})
        for st in json.loads(r.stdout):
            if st["Status"]["header"]["member_id"] == st["Status"]["leader"]:
                port = int(st["Endpoint"].rsplit(":", 1)[1])
                return next(i for i, m in enumerate(self.members) if m[1] == port)
        return None

    def watchers(self):
        """etcd_debugging_mvcc_watcher_total summed over the live members."""
        total = 0
        for i, (_, client, _) in enumerate(self.members):
            if self.procs[i] is None or self.procs[i].poll() is not None:
                continue
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{client}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("etcd_debugging_mvcc_watcher_total "):
                    total += int(float(line.split()[1]))
        return total

    def stop(self):
        for p in self.procs:
            if p and p.poll() is None:
                p.terminate()
                p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    def __init__(self, kind, cluster, vigil_bin):
        self.kind = kind
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"bench-proxy-{kind}-")
        if kind == "vigil":
            cmd = [vigil_bin, "grpc-proxy", "start", "--endpoints", cluster.endpoints,
                   "--listen-addr", f"127.0.0.1:{self.port}", "--data-dir", self.dir + "/data", "--log-level", "warn"]
        else:
            cmd = ["etcd", "grpc-proxy", "start", "--endpoints", cluster.endpoints,
                   "--listen-addr", f"127.0.0.1:{self.port}", "--data-dir", self.dir + "/data"]
        self.log = open(self.dir + ".log", "w")
        t = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=None)
        wait_port(self.port, self.proc, timeout=300)
        self.ready_s = time.time() - t  # Vigil listens once its copy is loaded; grpc-proxy at once
        time.sleep(0.5)

    stop = bench_vs_etcd.Server.stop


LOADS = {
    "watch": ["--workload", "watch", "--streams", "10000", "--watch-conns", "100", "--total", "200"],
    "watch-2k": ["--workload", "watch", "--streams", "2000", "--watch-conns", "100", "--total", "200"],
    "watchers": ["--workload", "watchers", "--streams", "1000", "--watch-conns", "100",
                 "--watchers-per-stream", "100", "--total", "200"],
    "range-l": ["--workload", "range", "--consistency", "l", "--total", "20000", "--conns", "4", "--clients", "64",
                "--key-space", "1"],
    "range-l-1": ["--workload", "range", "--consistency", "l", "--total", "5000", "--conns", "1", "--clients", "1",
                  "--key-space", "1"],
    "range-s": ["--workload", "range", "--consistency", "s", "--total", "20000", "--conns", "4", "--clients", "64",
                "--key-space", "1"],
    "put-1": ["--workload", "put", "--total", "2000", "--conns", "1", "--clients", "1"],
    "leader-kill": ["--workload", "watch", "--streams", "1000", "--watch-conns", "100", "--total", "1000",
                    "--rate", "100", "--retry-puts"],
}

COLUMNS = {
    "watch-2k": None,
    "watch": [("events_per_s", "events/s", "{:.0f}"), ("cpu_s_per_million_events", "proxy CPU s/M events", "{:.2f}"),
              ("bytes_per_stream", "proxy B/stream", "{:.0f}"), ("p99_ms", "put→event p99 ms", "{:.1f}"),
              ("lost", "lost", "{}"), ("reordered", "reordered", "{}"), ("duplicated", "dup", "{}")],
    "watchers": [("bytes_per_watcher", "proxy B/watcher", "{:.0f}"),
                 ("upstream_watchers", "upstream watchers (max)", "{}"),
                 ("few_cpu_us_per_put", "proxy CPU µs/put", "{:.0f}")],
    "range-l": [("throughput", "ranges/s", "{:.0f}"), ("p99_ms", "p99 ms", "{:.2f}"),
                ("proxy_cpu_us_per_request", "proxy CPU µs/range", "{:.1f}"), ("errors", "errors", "{}")],
    "leader-kill": [("max_ms", "longest gap ms", "{:.0f}"), ("p99_ms", "put→event p99 ms", "{:.1f}"),
                    ("put_errors", "put retries", "{}"), ("lost", "lost", "{}"), ("reordered", "reordered", "{}"),
                    ("duplicated", "dup", "{}")],
}


COLUMNS["watch-2k"] = COLUMNS["watch"]
for _load in ("range-l-1", "range-s", "put-1"):
    COLUMNS[_load] = COLUMNS["range-l"]
COLUMNS["copy-100k"] = [("ready_s", "start→serving s", "{:.2f}"), ("proxy_rss_kib", "proxy RSS KiB", "{}"),
                        ("first_get_ms", "first get ms", "{:.1f}")]


def fill(bench_bin, cluster, n=100_000):
    """Puts n keys of 256 bytes into the cluster, directly."""
    first = cluster.endpoints.split(",")[0]
    subprocess.run([bench_bin, "--endpoint", first, "--workload", "put", "--total", str(n), "--key-space", str(n),
                    "--conns", "4", "--clients", "64", "--max-seconds", "600"], check=True, capture_output=True)


def run_copy(proxy):
    """How long the proxy took to serve, its memory then, and its first linearizable read."""
    r = {"ready_s": proxy.ready_s, "proxy_rss_kib": rss_kib(proxy.proc.pid)}
    t = time.time()
    subprocess.run(["etcdctl", "--endpoints", f"127.0.0.1:{proxy.port}", "get", "k", "--prefix", "--limit", "1"],
                   check=True, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"})
    r["first_get_ms"] = (time.time() - t) * 1000
    return r


def run(bench_bin, cluster, proxy, load, base):
    if load == "copy-100k":
        return run_copy(proxy)
    cmd = [bench_bin, "--endpoint", f"127.0.0.1:{proxy.port}", "--server-pid", str(proxy.proc.pid),
           "--max-seconds", "240" if load.startswith("watch") else "90"] + LOADS[load]
    if load not in ("range-l", "range-l-1", "range-s", "put-1"):
        cmd += ["--conns", "1", "--clients", "1"]
    most = [base]
    stop = threading.Event()

    def poll():
        while not stop.wait(0.5):
            most[0] = max(most[0], cluster.watchers())

    poller = threading.Thread(target=poll, daemon=True)
    if load == "watchers":
        poller.start()
    cpu0 = cpu_seconds(proxy.proc.pid)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if load == "leader-kill":
        time.sleep(3)
        leader = cluster.leader()
        if leader is not None:
            cluster.procs[leader].kill()
            cluster.procs[leader].wait()
            time.sleep(5)
            cluster.start(leader)
    out, err = p.communicate(timeout=1800)
    stop.set()
    if p.returncode != 0:
        raise RuntimeError(f"vigil-bench failed: {err}")
    r = json.loads(out.strip().splitlines()[-1])
    if load == "watchers":
        r["upstream_watchers"] = most[0] - base
    if load in ("range-l", "range-l-1", "range-s", "put-1"):
        r["proxy_cpu_us_per_request"] = (cpu_seconds(proxy.proc.pid) - cpu0) * 1e6 / max(1, r.get("requests", 1))
    r["proxy_rss_end_kib"] = rss_kib(proxy.proc.pid)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("loads", nargs="*", default=["watch", "watchers", "range-l", "leader-kill"])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if shutil.which("etcd") is None:
        subprocess.run(["sudo", "apt-get", "install", "-y", "etcd-server"], check=True)
    if not a.no_build:
        for product in ("vigil", "vigil-bench"):
            subprocess.run(["swift", "build", "-c", "release", "--product", product], cwd=ROOT, check=True)
    vigil_bin = f"{ROOT}/.build/release/vigil"
    bench_bin = f"{ROOT}/.build/release/vigil-bench"
    results = {}
    for load in a.loads:
        cluster = Cluster()
        try:
            if load == "copy-100k":
                fill(bench_bin, cluster)
            results[load] = {}
            for kind in ("etcd", "vigil"):
                # Upstream watchers before the proxy starts: Vigil's own mirror watch counts.
                base = cluster.watchers()
                for _ in range(30):  # the previous proxy's watchers go away as etcd sees its streams close
                    time.sleep(1)
                    base, before = cluster.watchers(), base
                    if base == before:
                        break
                proxy = Proxy(kind, cluster, vigil_bin)
                try:
                    results[load][kind] = run(bench_bin, cluster, proxy, load, base)
                except Exception as e:  # a proxy that fails the load is reported, not fatal
                    results[load][kind] = {"error": str(e).strip().splitlines()[-1]}
                finally:
                    proxy.stop()
                cluster.wait_healthy()
            print(json.dumps({"load": load, **results[load]}), file=sys.stderr)
        finally:
            cluster.stop()
    for load, r in results.items():
        cols = COLUMNS[load]
        header = ["proxy"] + [c[1] for c in cols]
        rows = []
        for kind, label in (("etcd", "etcd grpc-proxy"), ("vigil", "Vigil mirror")):
            if "error" in r[kind]:
                rows.append([label, "failed: " + r[kind]["error"]] + [""] * (len(cols) - 1))
            else:
                rows.append([label] + [fmt.format(r[kind].get(f, 0)) for f, _, fmt in cols])
        if a.markdown:
            print(f"\n**{load}**\n")
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for row in rows:
                print("| " + " | ".join(row) + " |")
        else:
            print(f"\n{load}")
            for row in [header] + rows:
                print("  ".join(row))


if __name__ == "__main__":
    main()
