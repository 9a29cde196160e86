"""Runs LLM-written checker code in a sandboxed subprocess (never ``exec`` in-process).

The checker is Python source defining ``check(response: str) -> bool`` (or a number).  It runs in
a fresh interpreter (``python -I``: no user site, no environment variables, cwd = a temporary
directory) under these layers:

* resource limits: CPU seconds, address space, output file size, open files, no new processes;
* a wall-clock timeout on the parent side (the child is killed);
* no network: a new, empty network namespace (``unshare -rn``) when the kernel allows it, and in
  every case an audit hook that refuses sockets, subprocesses, ``os.system`` / exec / fork,
  ``ctypes`` and writes outside the temporary directory;
* stdout goes to a size-limited file; the verdict is read from the last line carrying a nonce.

Defense in depth, not a security boundary against a determined attacker with kernel exploits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

_BOOTSTRAP = r"""
import json, os, sys
_TMP = os.path.realpath(os.getcwd())
_BLOCKED_EVENTS = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.fork", "os.forkpty", "ctypes.", "os.kill", "os.putenv", "os.unsetenv",
                   "sys._getframe", "winreg.", "webbrowser.")
_BLOCKED_MODULES = {"socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "subprocess",
                    "_posixsubprocess", "multiprocessing", "asyncio", "urllib.request",
                    "http.client", "ftplib", "smtplib", "telnetlib", "pty", "signal"}
_WRITE_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                 "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.")

def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == _TMP or p.startswith(_TMP + os.sep)

class SandboxViolation(PermissionError):
    pass

def _hook(event, args):
    if event.startswith(_BLOCKED_EVENTS):
        raise SandboxViolation(f"sandbox: {event} is not allowed")
    if event == "import" and args and (args[0] in _BLOCKED_MODULES or str(args[0]).split(".")[0] in {"ctypes", "multiprocessing", "asyncio"}):
        raise SandboxViolation(f"sandbox: import of {args[0]} is not allowed")
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                  (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writing and not isinstance(path, int) and not _inside(path):
            raise SandboxViolation(f"sandbox: writing {path!r} outside the temporary directory")
    if event.startswith(_WRITE_EVENTS):
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise SandboxViolation(f"sandbox: {event} outside the temporary directory")

payload = json.loads(sys.stdin.read())
import resource
# Limits are set here, in the fresh interpreter, rather than with preexec_fn: forking a
# multithreaded parent (JAX) and running Python before exec can deadlock.
for _name, _value in payload["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_out = sys.stdout
sys.addaudithook(_hook)
result = {"nonce": payload["nonce"]}
try:
    ns = {"__name__": "checker"}
    exec(compile(payload["code"], "<checker>", "exec"), ns)
    if "check" not in ns:
        raise NameError("checker code must define check(response)")
    value = ns["check"](payload["response"])
    if isinstance(value, bool) or isinstance(value, (int, float)):
        result["value"] = value
    else:
        raise TypeError(f"check() must return a bool or a number, got {type(value).__name__}")
except BaseException as e:
    result["error"] = f"{type(e).__name__}: {e}"[:500]
_out.write("\n" + json.dumps(result) + "\n")
_out.flush()
"""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    max_open_files: int = 64


@dataclasses.dataclass(frozen=True)
class CheckerResult:
    ok: bool  # ran and returned a value
    value: bool | float | None
    error: str | None = None  # why not ok (timeout, memory, violation, exception...)


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` works here (unprivileged user + network namespaces)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    return {
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_CPU": limits.cpu_s,
        "RLIMIT_FSIZE": limits.max_output_bytes,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
    }


def run_checker(code: str, response: str, limits: SandboxLimits = SandboxLimits()) -> CheckerResult:
    """Runs ``check(response)`` from ``code`` in a sandboxed subprocess."""
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="clipo_sandbox_") as tmp:
        boot = os.path.join(tmp, "_boot.py")
        with open(boot, "w") as f:
            f.write(_BOOTSTRAP)
        out_path = os.path.join(tmp, "_stdout.txt")
        cmd = [sys.executable, "-I", "-B", boot]
        if network_namespace_available():
            cmd = ["unshare", "-rn", "--"] + cmd
        stdin_blob = json.dumps(
            {"code": code, "response": response, "nonce": nonce, "rlimits": _rlimits(limits)}
        ).encode()
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                    cwd=tmp,
                    env={"PATH": "/usr/bin:/bin"},
                    start_new_session=True,
                )
            except OSError as e:
                return CheckerResult(False, None, f"cannot start sandbox: {e}")
            try:
                proc.communicate(stdin_blob, timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                return CheckerResult(False, None, f"timeout after {limits.timeout_s}s")
        try:
            with open(out_path, "rb") as f:
                text = f.read(limits.max_output_bytes + 1).decode("utf-8", "replace")
        except OSError:
            text = ""
        for line in reversed(text.strip().splitlines()):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and obj.get("nonce") == nonce:
                if "error" in obj:
                    return CheckerResult(False, None, obj["error"])
                return CheckerResult(True, obj.get("value"))
        rc = proc.returncode
        reason = {
            -9: "killed (CPU limit or memory)",
            -24: "CPU time limit",
            -25: "output size limit",
            120: "output size limit (stdout could not be flushed)",
        }.get(rc, f"exit code {rc}")
        if rc == 1 and not text.strip():
            reason = "crashed (likely memory limit)"
        return CheckerResult(False, None, f"checker produced no verdict: {reason}")
