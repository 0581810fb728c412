#!/usr/bin/env python3
"""Draws Benchmarks/watch-fanout.png: delivered events per second and put→event p99 latency
against the number of Watch streams on one prefix, Vigil and etcd side by side in the same run.

Each point starts a fresh server (etcd, then Vigil) and runs the `watch` workload of vigil-bench
(streams over 100 connections, one writer, --puts puts). Needs gnuplot (the Debian package
gnuplot-nox, installed if missing) and release builds of vigil and vigil-bench.

  scripts/bench-chart.py                       # 1000 2500 5000 10000 streams, 200 puts each
  scripts/bench-chart.py --streams 500 1000 --puts 100
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib.util
spec = importlib.util.spec_from_file_location("bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench-vs-etcd.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

ROOT = bench.ROOT


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="*", default=[1000, 2500, 5000, 10000])
    ap.add_argument("--puts", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(ROOT, "Benchmarks", "watch-fanout.png"))
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()

    if not shutil.which("gnuplot"):
        subprocess.run(["bash", "-c", "sudo=; [ $(id -u) -ne 0 ] && sudo=sudo; $sudo apt-get install -y -qq gnuplot-nox"], check=True)
    if not shutil.which("etcd"):
        subprocess.run([os.path.join(ROOT, "scripts/install-deps.sh"), "--test"], check=True)
    if not a.no_build:
        for product in ("vigil", "vigil-bench"):
            subprocess.run(["swift", "build", "-c", "release", "--product", product], cwd=ROOT, check=True)
    vigil_bin = os.path.join(ROOT, ".build/release/vigil")
    bench_bin = os.path.join(ROOT, ".build/release/vigil-bench")

    rows = []
    for n in a.streams:
        point = {}
        for kind in ("etcd", "vigil"):
            server = bench.Server(kind, vigil_bin)
            try:
                cmd = [bench_bin, "--endpoint", f"127.0.0.1:{server.port}", "--workload", "watch", "--streams", str(n),
                       "--watch-conns", "100", "--total", str(a.puts), "--conns", "1", "--clients", "1",
                       "--max-seconds", "600", "--server-pid", str(server.proc.pid)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800).stdout
                point[kind] = json.loads(out.strip().splitlines()[-1])
            finally:
                server.stop()
        rows.append((n, point))
        print(json.dumps({"streams": n, **{k: {f: v[f] for f in ("events_per_s", "p99_ms", "lost", "reordered")}
                                              for k, v in point.items()}}), file=sys.stderr)

    data = tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False)
    for n, p in rows:
        data.write(f"{n} {p['vigil']['events_per_s']:.0f} {p['etcd']['events_per_s']:.0f} "
                   f"{p['vigil']['p99_ms']:.2f} {p['etcd']['p99_ms']:.2f}\n")
    data.close()
    script = f"""
set terminal pngcairo size 1100,450 font ',10'
set output '{a.out}'
set multiplot layout 1,2 title 'Watch fan-out on one prefix: {a.puts} puts, one writer (2 cores, loopback)'
set xlabel 'watch streams'
set key top left
set grid
set ylabel 'delivered events / s'
plot '{data.name}' using 1:2 with linespoints lw 2 title 'Vigil', '' using 1:3 with linespoints lw 2 title 'etcd 3.4'
set ylabel 'put → event p99 (ms)'
plot '{data.name}' using 1:4 with linespoints lw 2 title 'Vigil', '' using 1:5 with linespoints lw 2 title 'etcd 3.4'
unset multiplot
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    os.unlink(data.name)
    print("| streams | Vigil events/s | etcd events/s | Vigil p99 ms | etcd p99 ms |")
    print("|---|---|---|---|---|")
    for n, p in rows:
        print(f"| {n} | {p['vigil']['events_per_s']:.0f} | {p['etcd']['events_per_s']:.0f} | "
              f"{p['vigil']['p99_ms']:.1f} | {p['etcd']['p99_ms']:.1f} |")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
