#!/usr/bin/python3
"""Opens a page in headless Chromium and evaluates JavaScript in it on request (for tests).

  scripts/browser-page.py URL

Each line read from standard input is a JavaScript expression; its value (JSON) is printed on a
line starting with "= " (or "! " and the error). Chromium is driven over --remote-debugging-pipe
(the DevTools protocol on file descriptors 3 and 4), so no extra library is needed. The page keeps
running between expressions: it sees what the server sends meanwhile.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile


class Chromium:
    def __init__(self, url):
        self.profile = tempfile.mkdtemp(prefix="vigil-chromium-")
        to_child, self.write_fd = os.pipe()
        self.read_fd, from_child = os.pipe()

        def fds():
            # Through spare numbers first: the pipes may already sit on 3 or 4.
            a, b = os.dup(to_child), os.dup(from_child)
            high_a, high_b = os.dup2(a, 100), os.dup2(b, 101)
            os.dup2(high_a, 3)
            os.dup2(high_b, 4)

        self.proc = subprocess.Popen(
            [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.next_id = 0
        self.buffer = b""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def call(self, method, params, session=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    raise SystemExit("chromium exited")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(reply["error"].get("message", "error"))
                return reply["result"]

    def evaluate(self, expression):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self.session)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"].get("text", "exception"))
        return r["result"].get("value")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    browser = Chromium(sys.argv[1])
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                print("= " + json.dumps(browser.evaluate(line)), flush=True)
            except Exception as e:
                print("! " + str(e), flush=True)
    finally:
        browser.close()


if __name__ == "__main__":
    main()
