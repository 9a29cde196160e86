r"""A fault-injecting reverse proxy for OpenAI-compatible servers (tests and chaos runs).

    python -m experiments.serve_fault_proxy --upstream=http://127.0.0.1:8080 --port=8081 \
        --pattern=ok,500,timeout,ok,garbage,junk --timeout_delay_s=5

Listens on 127.0.0.1 and forwards every request to the upstream server, except that the N-th
POST gets the fault ``pattern[N % len(pattern)]``:

  ok       forward unchanged
  500      answer HTTP 500 without forwarding
  timeout  sleep ``timeout_delay_s`` then forward (the client should have timed out)
  garbage  answer 200 with a body that is not JSON
  junk     forward, then replace the completion's content with non-JSON prose
  drop     close the connection without an answer

GET requests (e.g. /v1/models) are always forwarded.  Counts per fault are kept in ``.counts``.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx

FAULTS = ("ok", "500", "timeout", "garbage", "junk", "drop")


class FaultProxy:
    def __init__(self, upstream: str, pattern: list[str], port: int = 0, timeout_delay_s: float = 5.0):
        bad = [p for p in pattern if p not in FAULTS]
        if bad or not pattern:
            raise ValueError(f"fault pattern entries must be in {FAULTS}, got {bad or pattern}")
        self.upstream = upstream.rstrip("/")
        self.pattern = list(pattern)
        self.timeout_delay_s = timeout_delay_s
        self.counts = {f: 0 for f in FAULTS}
        self._n = 0
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=600)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: bytes, ctype: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str, body: bytes | None):
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                r = proxy._client.request(method, proxy.upstream + self.path, content=body, headers=headers)
                return r.status_code, r.content, r.headers.get("content-type", "application/json")

            def do_GET(self):
                try:
                    self._reply(*self._forward("GET", None))
                except (httpx.HTTPError, OSError):
                    self._reply(502, b'{"error": "upstream unreachable"}')

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy._lock:
                    fault = proxy.pattern[proxy._n % len(proxy.pattern)]
                    proxy._n += 1
                    proxy.counts[fault] += 1
                if fault == "500":
                    return self._reply(500, b'{"error": "injected fault"}')
                if fault == "garbage":
                    return self._reply(200, b"<html>this is not a completion</html>", "text/html")
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "timeout":
                    time.sleep(proxy.timeout_delay_s)
                try:
                    code, content, ctype = self._forward("POST", body)
                except (httpx.HTTPError, OSError):
                    return self._reply(502, b'{"error": "upstream unreachable"}')
                if fault == "junk" and code == 200:
                    obj = json.loads(content)
                    obj["choices"][0]["message"]["content"] = "Honestly both are fine, I prefer A."
                    content = json.dumps(obj).encode()
                try:
                    self._reply(code, content, ctype)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout fault)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()


def main():
    from absl import app, flags

    flags.DEFINE_string("upstream", None, "Upstream server base URL.", required=True)
    flags.DEFINE_integer("port", 8081, "Port on 127.0.0.1.")
    flags.DEFINE_list("pattern", ["ok"], f"Fault cycle, entries from {FAULTS}.")
    flags.DEFINE_float("timeout_delay_s", 5.0, "Delay of the 'timeout' fault.")

    def run(argv):
        del argv
        F = flags.FLAGS
        proxy = FaultProxy(F.upstream, F.pattern, F.port, F.timeout_delay_s)
        print(f"fault proxy on {proxy.url} -> {proxy.upstream} pattern {proxy.pattern}", flush=True)
        try:
            proxy.server.serve_forever()
        except KeyboardInterrupt:
            pass
        print(json.dumps(proxy.counts))

    app.run(run)


if __name__ == "__main__":
    main()
