#!/usr/bin/env python3
"""The Swift client library (VigilClient.EtcdClient) and the in-process API under load (issue 21).

Against Vigil and a real etcd, started side by side here (fsync on), the same requests through
vigil-bench's raw loop client and through the async EtcdClient, ROUNDS times alternating; for each
the median throughput, p99 and this process's CPU per request, and the async API's overhead (its
CPU per request minus the raw client's):
  put        durable puts, --clients in flight, one connection
  range-s    serializable single-key reads
  watch      --streams watches on one prefix, --watch-puts puts: events/s and client CPU per event
Then, with no server process (a VigilServer embedded in vigil-bench):
  inprocess  --consumers in-process watch consumers (AsyncSequence) on one prefix, --watch-puts puts
             through the in-process API: events/s to all consumers and the loop's longest turn,
             without and with the swift-metrics export every 1 s and every 0.1 s (its cost: the
             longest export, in CPU time of the loop thread)

  scripts/bench-client.py --markdown            # all of it, a few minutes
Needs: etcd-server (installed if missing), release builds of vigil and vigil-bench.
"""
import argparse, importlib.util, json, os, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_vs_etcd", os.path.join(ROOT, "scripts", "bench-vs-etcd.py"))
bve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bve)


def bench(bench_bin, args):
    out = subprocess.run([bench_bin] + args, check=True, capture_output=True, text=True, timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--total", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--consumers", type=int, default=1000)
    ap.add_argument("--watch-puts", type=int, default=2000)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--only-inprocess", action="store_true", help="only the in-process watch")
    a = ap.parse_args()
    if not a.no_build:
        for p in ("vigil", "vigil-bench"):
            subprocess.run(["swift", "build", "-c", "release", "--product", p], cwd=ROOT, check=True)
    vigil_bin = os.path.join(ROOT, ".build/release/vigil")
    bench_bin = os.path.join(ROOT, ".build/release/vigil-bench")
    if not bve.shutil.which("etcd"):
        subprocess.run([os.path.join(ROOT, "scripts/install-deps.sh"), "--test"], check=True)

    if a.only_inprocess:
        return inprocess(bench_bin, a)
    common = ["--total", str(a.total), "--clients", str(a.clients), "--conns", "1"]
    loads = {
        "put": (["--workload", "put"], ["--workload", "client-put"]),
        "range-s": (["--workload", "range", "--consistency", "s"],
                    ["--workload", "client-range", "--consistency", "s"]),
    }
    rows = []
    for kind in ("vigil", "etcd"):
        for name, (raw_args, client_args) in loads.items():
            server = bve.Server(kind, vigil_bin)
            try:
                raw, client = [], []
                for _ in range(a.rounds):
                    ep = ["--endpoint", f"127.0.0.1:{server.port}"]
                    raw.append(bench(bench_bin, ep + raw_args + common))
                    client.append(bench(bench_bin, ep + client_args + common))
            finally:
                server.stop()
            med = lambda rs, f: statistics.median(r[f] for r in rs)
            rows.append([name, kind,
                         "{:.0f}".format(med(raw, "throughput")), "{:.0f}".format(med(client, "throughput")),
                         "{:.2f}".format(med(raw, "p99_ms")), "{:.2f}".format(med(client, "p99_ms")),
                         "{:.1f}".format(med(raw, "client_cpu_us_per_op")),
                         "{:.1f}".format(med(client, "client_cpu_us_per_op")),
                         "{:+.1f}".format(med(client, "client_cpu_us_per_op") - med(raw, "client_cpu_us_per_op")),
                         str(sum(r["errors"] for r in raw + client))])
            print(json.dumps({"load": name, "server": kind, "raw": raw, "client": client}), file=sys.stderr)
    bve.print_table(["load", "server", "raw req/s", "EtcdClient req/s", "raw p99 ms", "EtcdClient p99 ms",
                     "raw CPU µs/req", "EtcdClient CPU µs/req", "overhead µs/req", "errors"], rows, a.markdown)
    print()

    rows = []
    for kind in ("vigil", "etcd"):
        server = bve.Server(kind, vigil_bin)
        try:
            r = bench(bench_bin, ["--endpoint", f"127.0.0.1:{server.port}", "--workload", "client-watch",
                                  "--streams", str(a.streams), "--total", str(a.watch_puts)])
        finally:
            server.stop()
        print(json.dumps(r), file=sys.stderr)
        rows.append(["client-watch", kind, str(a.streams), str(r["events"]), str(r["expected"]),
                     str(r["out_of_order"]), "{:.0f}".format(r["events_per_second"]),
                     "{:.2f}".format(r["client_cpu_us_per_event"])])
    bve.print_table(["load", "server", "watches", "events", "expected", "out of order", "events/s",
                     "client CPU µs/event"], rows, a.markdown)
    print()

    inprocess(bench_bin, a)


def inprocess(bench_bin, a):
    rows = []
    for export in (None, 1.0, 0.1):
        args = ["--workload", "inprocess-watch", "--streams", str(a.consumers), "--total", str(a.watch_puts),
                "--clients", "4"]
        if export:
            args += ["--metrics-export", str(export)]
        runs = []
        for _ in range(a.rounds):
            runs.append(bench(bench_bin, args))
            print(json.dumps(runs[-1]), file=sys.stderr)
        med = lambda f: statistics.median(r[f] for r in runs)
        rows.append(["inprocess-watch", f"every {export} s" if export else "off", str(a.consumers),
                     str(sum(r["events"] for r in runs)), str(sum(r["expected"] for r in runs)),
                     str(sum(r["out_of_order"] for r in runs)), "{:.0f}".format(med("events_per_second")),
                     "{:.2f}".format(med("cpu_us_per_event")), "{:.1f}".format(max(r["loop_turn_max_ms"] for r in runs)),
                     "{:.2f}".format(max(r["metrics_export_max_ms"] for r in runs)) if export else "-"])
    bve.print_table(["load", "metrics export", "consumers", "events", "expected", "out of order",
                     "events/s (median)", "process CPU µs/event", "longest loop turn ms", "longest export ms"],
                    rows, a.markdown)

if __name__ == "__main__":
    main()
