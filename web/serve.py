#!/usr/bin/env python3
"""Serves the browser demo (web/, after web/build.sh) on 127.0.0.1.

    python3 web/serve.py [--port 8000]      then open http://127.0.0.1:8000/
    python3 web/serve.py --check [PATH...]  runs the page in headless Chromium (WebGPU on
                                            SwiftShader) on each path, prints each result,
                                            exits non-zero unless every one matches the CPU

Only the standard library; only loopback.
"""

import argparse
import http.server
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

WEB = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4
# The flags of web/webdriver.json (the wasm test) plus a fresh profile.
CHROMIUM_FLAGS = json.load(open(os.path.join(WEB, "webdriver.json")))["goog:chromeOptions"]["args"]

results: "queue.Queue[dict]" = queue.Queue()


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
        ".js": "text/javascript",
    }

    def __init__(self, *a, **kw):
        super().__init__(*a, directory=WEB, **kw)

    def do_POST(self):
        # The page reports its result here in --check mode.
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.end_headers()
        try:
            results.put(json.loads(body))
        except ValueError:
            results.put({"error": f"unreadable report: {body[:200]!r}"})

    def log_message(self, fmt, *args):
        if not quiet:
            super().log_message(fmt, *args)


quiet = False


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium on PATH (apt-get install chromium)")


def stop(proc: subprocess.Popen) -> None:
    """Stops the browser and every process it started (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def check(port: int, paths: list[str], timeout: float) -> int:
    failed = 0
    for path in paths:
        url = f"http://127.0.0.1:{port}/index.html?autorun&report&path={path}"
        # Chromium's helper processes can outlive the browser and keep writing to the profile:
        # they share its process group, which is stopped as a whole, and cleanup tolerates stragglers.
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
            log = open(os.path.join(profile, "chromium.log"), "w+")
            proc = subprocess.Popen(
                [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}/ud", url],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            t0 = time.time()
            try:
                r = results.get(timeout=timeout)
            except queue.Empty:
                r = {"error": f"no result within {timeout:.0f} s"}
            finally:
                stop(proc)
            errs = [r.get(k) for k in ("rel_l2_output", "rel_l2_conv_state", "rel_l2_ssm_state")]
            ok = "error" not in r and all(isinstance(e, (int, float)) and e <= TOL for e in errs)
            verdict = "PASS" if ok else "FAIL"
            print(f"{verdict} web demo ({time.time() - t0:.1f} s): {json.dumps(r)}", flush=True)
            if not ok:
                failed += 1
                log.seek(0)
                tail = [l for l in log.read().splitlines() if "dbus" not in l][-30:]
                print("chromium log (last lines):\n  " + "\n  ".join(tail), flush=True)
    return 1 if failed else 0


def main() -> int:
    global quiet
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, default=8000, help="0: any free port")
    ap.add_argument("--check", nargs="*", metavar="PATH", help="full, decode, chunked=N, spec=K")
    ap.add_argument("--timeout", type=float, default=180.0)
    a = ap.parse_args()
    if not os.path.exists(os.path.join(WEB, "pkg", "mamba_mixer_web.js")):
        sys.exit("web/pkg is missing: run web/build.sh first")
    if a.check is not None:
        quiet = True
        a.port = 0 if a.port == 8000 else a.port
    server = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    port = server.server_address[1]
    if a.check is None:
        print(f"serving web/ at http://127.0.0.1:{port}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return check(port, a.check or ["full", "decode"], a.timeout)
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
