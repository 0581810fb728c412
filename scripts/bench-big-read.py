#!/usr/bin/env python3
"""Big reads, Vigil against etcd 3.4 on the same data: KEYS keys of VAL bytes under one prefix,
read whole by RangeStream (etcd 3.7's; etcd 3.4 answers Unimplemented), by Range pages of 500 at
the first page's revision (kube-apiserver's fallback), and by one unary Range. For each: seconds,
MB/s, and the server's peak memory above what it held before the read (total RSS, and its
anonymous part: a memory-mapped database's file pages are page cache).

  scripts/bench-big-read.py [--keys 1000000] [--val-size 1024] [--markdown] [--no-build]
"""
import argparse, importlib.util, json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_vs_etcd", os.path.join(ROOT, "scripts", "bench-vs-etcd.py"))
bench_vs_etcd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_vs_etcd)
Server = bench_vs_etcd.Server


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1000000)
    ap.add_argument("--val-size", type=int, default=1024)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--servers", default="vigil,etcd", help="which to measure (comma-separated)")
    a = ap.parse_args()
    if not a.no_build:
        for product in ("vigil", "vigil-bench"):
            subprocess.run(["swift", "build", "-c", "release", "--product", product], cwd=ROOT, check=True)
    vigil_bin = os.path.join(ROOT, ".build/release/vigil")
    bench_bin = os.path.join(ROOT, ".build/release/vigil-bench")
    rows = []
    for kind in a.servers.split(","):
        server = Server(kind, vigil_bin)
        try:
            cmd = [bench_bin, "--endpoint", f"127.0.0.1:{server.port}", "--workload", "big-read",
                   "--key-space", str(a.keys), "--val-size", str(a.val_size), "--max-seconds", "1800",
                   "--server-pid", str(server.proc.pid)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=7200).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(json.dumps({"server": kind, **r}), file=sys.stderr)
            for mode in ("stream", "paged", "unary"):
                m = r[mode]
                rows.append([kind, mode, m.get("keys", 0), f"{m['seconds']:.2f}", f"{m['mb_per_s']:.0f}",
                             f"{m['peak_rss_above_mib']:.0f}", f"{m['peak_anon_above_mib']:.0f}",
                             m.get("error", "")[:60]])
        finally:
            server.stop()
    header = ["server", "read", "keys", "s", "MB/s", "peak RSS above MiB", "of it anon MiB", "error"]
    if a.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
    else:
        for row in [header] + rows:
            print("\t".join(str(c) for c in row))


if __name__ == "__main__":
    main()
