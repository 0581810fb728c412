#!/usr/bin/env python3
"""Snapshot save and restore of a large database, Vigil and a real etcd side by side (issue 16).

For each server: fill it with --puts durable puts of --val-size bytes over --keys keys (vigil-bench),
then `etcdctl snapshot save` (time, the server's peak RSS while it runs, the file's size), then
restore: Vigil starts from the file with --restore-snapshot (time until it serves, its peak RSS);
etcd's file goes through `etcdctl snapshot restore` (time, peak RSS) and a real etcd starts from
the result (time until it serves). Vigil's own snapshot is also restored by etcdctl, and etcd's
by Vigil (migration), to show both directions work at this size.

  scripts/bench-snapshot.py --no-build --markdown            # ~1 GB databases (500,000 puts of 1 KiB)
  scripts/bench-snapshot.py --puts 20000 --keys 2000         # quick
"""
import argparse, json, os, resource, shutil, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import importlib.util
spec = importlib.util.spec_from_file_location("bve", os.path.join(ROOT, "scripts/bench-vs-etcd.py"))
bve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bve)


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakSampler:
    """Samples a process's RSS every 20 ms; `peak` is the largest seen."""
    def __init__(self, pid):
        self.pid, self.peak, self.stop_flag = pid, 0.0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop_flag:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def stop(self):
        self.stop_flag = True
        self.t.join()
        return self.peak


def wait_serving(endpoint, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + str(proc.returncode))
        r = subprocess.run(["etcdctl", "--endpoints", endpoint, "--dial-timeout=1s", "--command-timeout=2s",
                            "get", "probe"], capture_output=True, env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError("not serving")


def ctl(endpoint, *args):
    return subprocess.run(["etcdctl", "--endpoints", endpoint, "--command-timeout=600s"] + list(args),
                          check=True, capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3")).stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=500000)
    ap.add_argument("--keys", type=int, default=100000)
    ap.add_argument("--val-size", type=int, default=1024)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        for p in ("vigil", "vigil-bench"):
            subprocess.run(["swift", "build", "-c", "release", "--product", p], cwd=ROOT, check=True)
    vigil_bin = os.path.join(ROOT, ".build/release/vigil")
    bench = os.path.join(ROOT, ".build/release/vigil-bench")
    work = tempfile.mkdtemp(prefix="bench-snapshot-")
    rows = {}
    files = {}
    try:
        for kind in ("etcd", "vigil"):
            s = bve.Server(kind, vigil_bin)
            ep = f"127.0.0.1:{s.port}"
            try:
                subprocess.run([bench, "--endpoint", ep, "--workload", "put", "--total", str(a.puts), "--key-space",
                                str(a.keys), "--val-size", str(a.val_size), "--conns", "4", "--clients", "64",
                                "--max-seconds", "3600"], check=True, capture_output=True)
                status = json.loads(ctl(ep, "endpoint", "status", "-w", "json"))[0]["Status"]
                snap = os.path.join(work, f"{kind}.db")
                sampler = PeakSampler(s.proc.pid)
                base = rss_mb(s.proc.pid)
                t0 = time.time()
                ctl(ep, "snapshot", "save", snap)
                save_s = time.time() - t0
                peak = sampler.stop()
                files[kind] = snap
                rows[kind] = {"db_mb": status["dbSize"] / 1e6, "revision": status["header"]["revision"],
                              "save_s": save_s, "save_rss_growth_mb": max(0.0, peak - base),
                              "server_rss_mb": peak, "file_mb": os.path.getsize(snap) / 1e6}
            finally:
                s.stop()

        def restore_vigil(snap, name):
            d = os.path.join(work, name)
            port = bve.free_port()
            return serve_once([vigil_bin, "--data-dir", d, "--listen-client-urls", f"http://127.0.0.1:{port}",
                               "--restore-snapshot", snap, "--log-level", "warn"], d + ".log", port)

        def serve_once(cmd, log_path, port):
            """Starts a server, waits until it serves; its seconds to get there, peak RSS and revision."""
            log = open(log_path, "w")
            t0 = time.time()
            p = subprocess.Popen(cmd, stdout=log, stderr=log)
            sampler = PeakSampler(p.pid)
            wait_serving(f"127.0.0.1:{port}", p)
            took = time.time() - t0
            peak = sampler.stop()
            rev = json.loads(ctl(f"127.0.0.1:{port}", "endpoint", "status", "-w", "json"))[0]["Status"]["header"]["revision"]
            p.terminate()
            p.wait()
            return took, peak, rev

        def restore_etcd(snap, name):
            d = os.path.join(work, name)
            peer, client = bve.free_port(), bve.free_port()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            t0 = time.time()
            subprocess.run(["etcdctl", "snapshot", "restore", snap, "--data-dir", d, "--name", "default",
                            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}"],
                           check=True, capture_output=True, env=dict(os.environ, ETCDCTL_API="3"))
            restore_s = time.time() - t0
            restore_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            start_s, peak, rev = serve_once(["etcd", "--data-dir", d, "--name", "default",
                                             "--listen-client-urls", f"http://127.0.0.1:{client}",
                                             "--advertise-client-urls", f"http://127.0.0.1:{client}",
                                             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                                             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
                                            d + ".log", client)
            return restore_s, restore_peak if restore_peak > before / 1024 else 0, start_s, peak, rev

        t, peak, rev = restore_vigil(files["vigil"], "vigil-from-vigil")
        rows["vigil"].update({"restore_s": t, "restore_rss_mb": peak, "restored_rev_ok": rev == rows["vigil"]["revision"]})
        r_s, r_peak, s_s, s_peak, rev = restore_etcd(files["etcd"], "etcd-from-etcd")
        rows["etcd"].update({"restore_s": r_s + s_s, "restore_rss_mb": max(r_peak, s_peak),
                             "restored_rev_ok": rev == rows["etcd"]["revision"],
                             "detail": f"etcdctl restore {r_s:.1f} s ({r_peak:.0f} MiB), etcd start {s_s:.1f} s ({s_peak:.0f} MiB)"})
        # Across: etcd's snapshot into Vigil, Vigil's through etcdctl into etcd.
        t, peak, rev = restore_vigil(files["etcd"], "vigil-from-etcd")
        cross_v = f"etcd's snapshot into Vigil: {t:.1f} s, {peak:.0f} MiB, revision kept: {rev == rows['etcd']['revision']}"
        r_s, r_peak, s_s, s_peak, rev = restore_etcd(files["vigil"], "etcd-from-vigil")
        cross_e = (f"Vigil's snapshot into etcd: restore {r_s:.1f} s + start {s_s:.1f} s, revision kept: "
                   f"{rev == rows['vigil']['revision']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cols = [("db_mb", "db MB", "{:.0f}"), ("file_mb", "snapshot MB", "{:.0f}"), ("save_s", "save s", "{:.1f}"),
            ("save_rss_growth_mb", "server RSS growth during save MiB", "{:.0f}"),
            ("restore_s", "restore until serving s", "{:.1f}"), ("restore_rss_mb", "restore peak RSS MiB", "{:.0f}"),
            ("restored_rev_ok", "revision kept", "{}")]
    header = ["server"] + [c[1] for c in cols]
    lines = [[k] + [f.format(rows[k][c]) for c, _, f in cols] for k in ("vigil", "etcd")]
    lines.append(["vigil/etcd"] + ["{:.2f}x".format(rows["vigil"][c] / rows["etcd"][c])
                                   if isinstance(rows["etcd"][c], float) and rows["etcd"][c] else "-" for c, _, _ in cols])
    bve.print_table(header, lines, a.markdown)
    print()
    print("etcd restore: " + rows["etcd"]["detail"])
    print(cross_v)
    print(cross_e)


if __name__ == "__main__":
    main()
