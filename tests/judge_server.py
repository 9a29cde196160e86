"""Pieces of the rule-based OpenAI-compatible judge servers the judge tests run on 127.0.0.1."""

import contextlib
import http.server
import json
import re
import threading


def rule_judgment(label: str) -> dict:
    """A schema-valid judgment with one core criterion labelled ``label`` (A / B / S)."""
    crit = {"id": "c1", "title": "quality", "type": "core", "evidence": "e", "reason": "r", "label": label}
    crit["score"] = 0 if label == "S" else 2
    intent = {"task": "t", "explicit_requirements": [], "implicit_requirements": []}
    return {"intent": intent, "differences": ["d"], "criteria": [crit]}


def responses(user_text: str) -> tuple[str, str] | None:
    """The two responses of a pairwise judge prompt, or None for another prompt."""
    a = re.search(r"<response_a>\n(.*?)\n</response_a>", user_text, re.DOTALL)
    b = re.search(r"<response_b>\n(.*?)\n</response_b>", user_text, re.DOTALL)
    return None if a is None or b is None else (a.group(1), b.group(1))


def good_label(a: str, b: str) -> str:
    """A wins iff only A contains GOOD, B iff only B does, else S."""
    return "A" if "GOOD" in a and "GOOD" not in b else ("B" if "GOOD" in b and "GOOD" not in a else "S")


class JSONHandler(http.server.BaseHTTPRequestHandler):
    """Quiet handler with a JSON ``_send`` and an empty ``/v1/models``."""

    def log_message(self, *args):
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_chat(self, content: str):
        """A chat completion whose message is ``content``."""
        self._send(
            200,
            {
                "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5},
            },
        )

    def do_GET(self):
        self._send(200, {"data": []})


def run_judge_cli(capsys, *args):
    """experiments.judge's main in this process; returns (exit status, stdout, stderr)."""
    from absl import flags

    from experiments import judge as cli

    FLAGS = flags.FLAGS
    FLAGS.unparse_flags()
    FLAGS(["judge", *args])
    code = 0
    try:
        cli.main([])
    except SystemExit as e:
        code = e.code
    finally:
        FLAGS.unparse_flags()
    out = capsys.readouterr()
    return code, out.out, out.err


@contextlib.contextmanager
def serve(handler_cls):
    """Runs ``handler_cls`` on a free port of 127.0.0.1; yields the base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
