#!/usr/bin/env python3
"""Records fuzzing seeds for the `connection` target: what real clients send on one connection.

Starts vigil, puts a recording proxy in front of it, runs etcdctl commands and HTTP/1.1 gateway
requests through the proxy, and writes each connection's client-to-server bytes to
Tests/FuzzCorpus/connection/seed-<name>-<n>. Run from the repository root after `swift build`.
"""
import os, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "Tests", "FuzzCorpus", "connection")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Recorder:
    def __init__(self, upstream):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.label = "start"
        self.count = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            c, _ = self.sock.accept()
            self.count += 1
            name = f"seed-{self.label}-{self.count}"
            threading.Thread(target=self.pipe, args=(c, name), daemon=True).start()

    def pipe(self, c, name):
        u = socket.create_connection(("127.0.0.1", self.upstream))
        sent = bytearray()

        def back():
            try:
                while True:
                    d = u.recv(65536)
                    if not d:
                        break
                    c.sendall(d)
            except OSError:
                pass
            try:
                c.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=back, daemon=True).start()
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                sent += d
                u.sendall(d)
        except OSError:
            pass
        try:
            u.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if sent and len(sent) <= 65536:
            with open(os.path.join(OUT, name), "wb") as f:
                f.write(sent)


def main():
    vigil = os.path.join(ROOT, ".build", "debug", "vigil")
    port = free_port()
    data = tempfile.mkdtemp(prefix="vigil-seeds-")
    server = subprocess.Popen([vigil, "--data-dir", data, "--listen-client-urls", f"http://127.0.0.1:{port}",
                               "--unsafe-no-fsync", "--log-level", "error"])
    time.sleep(1.5)
    rec = Recorder(port)
    ep = f"127.0.0.1:{rec.port}"

    def ctl(label, *args, stdin=None, timeout=5):
        rec.label = label
        try:
            subprocess.run(["etcdctl", f"--endpoints={ep}", *args], input=stdin, capture_output=True,
                           timeout=timeout, env={**os.environ, "ETCDCTL_API": "3"})
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.2)

    ctl("put", "put", "app/a", "1")
    ctl("put-lease-prev", "put", "app/b", "2", "--prev-kv")
    ctl("get-prefix", "get", "app/", "--prefix", "--limit", "1", "--order", "DESCEND", "--sort-by", "MODIFY")
    ctl("get-rev", "get", "app/a", "--rev", "1", "-w", "json")
    ctl("get-fromkey", "get", "", "--from-key", "--keys-only")
    ctl("del", "del", "app/", "--prefix", "--prev-kv")
    ctl("txn", "txn", stdin=b'mod("app/a") > "0"\nvalue("app/b") = "2"\n\nput app/c 3\nget app/a\n\ndel app/b\n\n')
    ctl("compaction", "compaction", "2")
    ctl("watch", "watch", "app/", "--prefix", "--prev-kv", "--rev", "1", timeout=1.5)
    ctl("watch-i", "watch", "-i", stdin=b"watch app/a\nwatch app/ --prefix --rev 2\nprogress\n", timeout=1.5)
    ctl("lease", "lease", "grant", "30")
    ctl("lease-list", "lease", "list")
    ctl("lease-ttl", "lease", "timetolive", "694d77aa9e38260f", "--keys")
    ctl("keepalive", "lease", "keep-alive", "--once", "694d77aa9e38260f")
    ctl("lease-revoke", "lease", "revoke", "694d77aa9e38260f")
    ctl("status", "endpoint", "status")
    ctl("hashkv", "endpoint", "hashkv")
    ctl("members", "member", "list")
    ctl("alarm", "alarm", "list")
    ctl("defrag", "defrag")
    ctl("user", "user", "add", "root:pw")
    ctl("role", "role", "grant-permission", "r", "readwrite", "a", "b")
    ctl("auth", "auth", "enable")
    ctl("authed", "--user", "root:pw", "get", "app/a")
    ctl("auth-off", "--user", "root:pw", "auth", "disable")

    def http(label, method, path, body=b"", extra=b""):
        req = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body
        with open(os.path.join(OUT, f"seed-http-{label}"), "wb") as f:
            f.write(req)

    http("put", "POST", "/v3/kv/put", b'{"key":"Zm9v","value":"YmFy","lease":"0","prev_kv":true}')
    http("range", "POST", "/v3/kv/range", b'{"key":"Zm9v","range_end":"Zm9w","limit":"10","sort_order":"DESCEND","count_only":false}')
    http("txn", "POST", "/v3/kv/txn", b'{"compare":[{"target":"VALUE","key":"Zm9v","value":"YmFy","result":"EQUAL"}],'
         b'"success":[{"request_put":{"key":"YQ==","value":"Yg=="}}],"failure":[{"request_range":{"key":"Zm9v"}}]}')
    http("delete", "POST", "/v3/kv/deleterange", b'{"key":"AA==","range_end":"AA==","prev_kv":true}')
    http("compaction", "POST", "/v3/kv/compaction", b'{"revision":"1","physical":true}')
    http("watch", "POST", "/v3/watch", b'{"create_request":{"key":"Zm9v","start_revision":"1","prev_kv":true,"filters":["NOPUT"]}}'
         b'{"progress_request":{}}{"cancel_request":{"watch_id":"0"}}')
    http("grant", "POST", "/v3/lease/grant", b'{"TTL":"30","ID":"7"}')
    http("keepalive", "POST", "/v3/lease/keepalive", b'{"ID":"7"}{"ID":"8"}')
    http("ttl", "POST", "/v3/lease/timetolive", b'{"ID":"7","keys":true}')
    http("auth", "POST", "/v3/auth/authenticate", b'{"name":"root","password":"pw"}', b"Authorization: abc.1\r\n")
    http("useradd", "POST", "/v3/auth/user/add", b'{"name":"u","password":"p","options":{"no_password":false}}')
    http("rolegrant", "POST", "/v3/auth/role/grant", b'{"name":"r","perm":{"permType":"READWRITE","key":"YQ==","range_end":"AA=="}}')
    http("status", "POST", "/v3/maintenance/status", b"{}")
    http("alarm", "POST", "/v3/maintenance/alarm", b'{"action":"GET","alarm":"NOSPACE"}')
    http("health", "GET", "/health?exclude=NOSPACE")
    http("metrics", "GET", "/metrics")
    http("chunked", "POST", "/v3/kv/range", b"", b"Transfer-Encoding: chunked\r\n")
    with open(os.path.join(OUT, "seed-http-pipelined"), "wb") as f:
        one = b'POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{"key":"Zm9v"}'
        f.write(one * 3 + b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    server.terminate()
    server.wait()
    print(f"{len(os.listdir(OUT))} seeds in {OUT}")


if __name__ == "__main__":
    main()
