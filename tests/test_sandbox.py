"""The checker sandbox, attacked.  Every escape runs in each mode this host gives: bubblewrap +
seccomp (user namespaces), and seccomp alone (as on hosts that refuse user namespaces).  Each
attack must fail, be reported as a failed checker, and leave no trace on the host.

Most attacks first switch the advisory audit hook off (its code object replaced through a gc
walk, or its globals cleared through a traceback's frames), so what stops them is the OS."""

import os
import platform
import signal
import socket
import sys
import threading
import time

import pytest

from clipo_jax.rubrics import pvr, sandbox
from clipo_jax.rubrics.sandbox import SandboxLimits, run_checker

FAST = SandboxLimits(timeout_s=10, cpu_s=5, memory_mb=256, max_output_bytes=4096)

HOOK_OFF = """
import gc, sys
for _o in gc.get_objects():
    if getattr(_o, '__name__', None) == '_hook' and hasattr(_o, '__code__'):
        _o.__code__ = (lambda event, args: None).__code__
"""

FRAMES_OFF = """
try:
    raise Exception
except Exception as _e:
    _f = _e.__traceback__.tb_frame
while _f is not None and '_BLOCKED_EVENTS' not in _f.f_globals:
    _f = _f.f_back
_f.f_globals['_BLOCKED_EVENTS'] = ()
"""

RAW = (
    HOOK_OFF
    + """
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
def raw(nr, *args):
    rc = _libc.syscall(nr, *args)
    if rc < 0:
        raise PermissionError(f'syscall {nr} refused: errno {ctypes.get_errno()}')
    return rc
"""
)


def run(code, layers, response="r", limits=FAST, **kw):
    return run_checker(code, response, limits, layers=layers, **kw)


def refused(res):
    return not res.ok and bool(res.error)


def test_layers_are_described():
    text = sandbox.describe_layers()
    assert "seccomp" in text and "rlimits" in text
    assert "seccomp" in sandbox.detect_layers(use_bubblewrap=False).describe()
    assert "bubblewrap (" not in sandbox.detect_layers(use_bubblewrap=False).describe()


def test_a_plain_checker_runs(layers):
    code = "import re\ndef check(r):\n    return re.fullmatch(r'[a-z ]+', r) is not None and len(r.split()) <= 3"
    assert run(code, layers, "a b c").value is True
    assert run(code, layers, "a b c d").value is False
    assert run("x = 1", layers).error.startswith("NameError")


# ---- escapes that the filesystem or the filter must stop ------------------------------------


@pytest.mark.parametrize(
    "name,attack",
    [
        ("hook_off_then_system", HOOK_OFF + "import os\ndef check(r):\n    assert os.system('touch {t}') == 0"),
        (
            "frames_off_then_system",
            FRAMES_OFF + "import os\ndef check(r):\n    assert os.system('touch {t}') == 0",
        ),
        ("subprocess", HOOK_OFF + "import subprocess\ndef check(r):\n    subprocess.run(['touch', '{t}'])"),
        (
            "posix_spawn",
            HOOK_OFF + "import os\ndef check(r):\n    os.posix_spawn('/usr/bin/touch', ['touch', '{t}'], {{}})",
        ),
        (
            "reloaded_posixsubprocess",
            HOOK_OFF
            + "import importlib, os\ndef check(r):\n    os = importlib.reload(os)\n    os.execv('/usr/bin/touch', ['touch', '{t}'])",
        ),
        ("write_outside", HOOK_OFF + "def check(r):\n    open('{t}', 'w').write('x')"),
        (
            "dir_fd_write",
            HOOK_OFF + "import os\ndef check(r):\n    d = os.open('{d}', os.O_RDONLY)\n"
            "    os.write(os.open('{b}', os.O_WRONLY | os.O_CREAT, dir_fd=d), b'x')",
        ),
        (
            "symlink_then_write",
            HOOK_OFF + "import os\ndef check(r):\n    os.symlink('{t}', 'link')\n    open('link', 'w').write('x')",
        ),
        ("hardlink", HOOK_OFF + "import os\ndef check(r):\n    os.link('{victim}', '{t}')"),
        ("remove_outside", HOOK_OFF + "import os\ndef check(r):\n    os.remove('{victim}')"),
        ("rename_outside", HOOK_OFF + "import os\ndef check(r):\n    os.rename('{victim}', '{t}')"),
        ("chmod_outside", HOOK_OFF + "import os\ndef check(r):\n    os.chmod('{victim}', 0o777)"),
    ],
)
def test_escapes_leave_no_trace(tmp_path, layers, name, attack):
    target = tmp_path / f"escaped_{name}"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o644)
    code = attack.format(t=target, d=tmp_path, b=target.name, victim=victim)
    res = run(code, layers)
    assert refused(res), res
    assert not target.exists() and victim.read_text() == "keep me"
    assert (victim.stat().st_mode & 0o777) == 0o644


@pytest.mark.skipif(platform.machine() != "x86_64", reason="raw syscall numbers are x86_64")
@pytest.mark.parametrize(
    "name,call",
    [
        ("socket", "raw(41, 2, 1, 0)"),
        ("fork", "raw(57)"),
        ("clone3", "raw(435, 0, 0)"),
        ("execve", "raw(59, b'/usr/bin/true', 0, 0)"),
        ("ptrace_traceme", "raw(101, 0, 0, 0, 0)"),
        ("unshare_user", "raw(272, 0x10000000)"),
        ("setsid", "raw(112)"),
        ("bpf", "raw(321, 0, 0, 0)"),
        ("userfaultfd", "raw(323, 0)"),
        ("io_uring_setup", "raw(425, 1, 0)"),
        ("process_vm_readv", "raw(310, 1, 0, 0, 0, 0, 0)"),
        ("memfd_create", "raw(319, b'x', 0)"),
        ("shmat", "raw(30, 0, 0, 0)"),  # attaching an existing segment writes into it
        ("prlimit64_of_the_parent", "raw(302, 1, 7, 0, 0)"),  # another process's limits
        ("fcntl_setown", "raw(72, 1, 8, 1)"),  # SIGIO to another process on each write
        ("fcntl_setsig", "raw(72, 1, 10, 10)"),
    ],
)
def test_raw_syscalls_refused_by_the_filter(layers, name, call):
    """ctypes straight to the kernel, the audit hook gone: only seccomp stands."""
    res = run(RAW + f"def check(r):\n    {call}\n    return True", layers)
    assert refused(res) and res.error.endswith("refused: errno 1"), res  # EPERM: the filter, not the kernel


def test_network_refused(layers):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    port = srv.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    code = HOOK_OFF + f"import socket\ndef check(r):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)"
    res = run(code, layers)
    t.join()
    srv.close()
    assert refused(res) and not accepted, res


def test_signals_to_the_parent_refused(layers):
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    try:
        code = HOOK_OFF + f"import os, signal\ndef check(r):\n    os.kill({os.getpid()}, signal.SIGUSR1)"
        res = run(code, layers)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert refused(res) and not got, res


def test_secrets_of_the_host_stay_closed(layers):
    for path in ("/etc/shadow", f"/proc/{os.getpid()}/environ", f"/proc/{os.getpid()}/mem"):
        res = run(HOOK_OFF + f"def check(r):\n    raise RuntimeError(open('{path}', 'rb').read()[:200])", layers)
        assert refused(res) and ("PermissionError" in res.error or "FileNotFoundError" in res.error), (path, res)
        assert "root:" not in res.error


def test_bubblewrap_hides_the_repository_and_home():
    layers = sandbox.detect_layers()
    if not layers.bubblewrap:
        pytest.skip(f"bubblewrap unavailable here: {layers.reason}")
    for path in (os.path.abspath(__file__), "/etc/passwd", "/work", "/home"):
        res = run(f"import os\ndef check(r):\n    return os.path.exists('{path}')", layers)
        assert res.ok and res.value is False, (path, res)
    # the home directory shows at most the path down to the interpreter's own prefix
    home = os.path.expanduser("~")
    prefix = os.path.realpath(sys.base_prefix)
    allowed = {os.path.relpath(prefix, home).split(os.sep)[0]} if prefix.startswith(home + os.sep) else set()
    code = (
        f"import os\ndef check(r):\n    return not os.path.isdir('{home}') or set(os.listdir('{home}')) <= {allowed!r}"
    )
    assert run(code, layers).value is True


def test_inherited_descriptors_are_closed(tmp_path, layers):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        code = HOOK_OFF + (
            "import os\ndef check(r):\n    for fd in range(3, 256):\n        try:\n"
            "            if b'TOPSECRET' in os.pread(fd, 64, 0):\n                return True\n"
            "        except OSError:\n            pass\n    raise LookupError('no inherited descriptor')"
        )
        res = run(code, layers)
    finally:
        os.close(fd)
    assert refused(res) and "LookupError" in res.error, res


def test_no_threads_or_children(layers):
    code = HOOK_OFF + "import threading\ndef check(r):\n    threading.Thread(target=print).start()"
    assert refused(run(code, layers))
    code = HOOK_OFF + "import os\ndef check(r):\n    os.setsid()"
    assert refused(run(code, layers))


def test_timeout_kills_everything(layers):
    res = run("import time\ndef check(r):\n    time.sleep(60)", layers, limits=SandboxLimits(timeout_s=1))
    assert refused(res) and "timeout" in res.error
    time.sleep(0.2)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"clipo_sandbox_" in f.read():
                    left.append(pid)
        except OSError:
            pass
    assert not left


def test_resource_limits(layers):
    res = run("def check(r):\n    while True:\n        pass", layers, limits=SandboxLimits(timeout_s=10, cpu_s=1))
    assert refused(res) and ("CPU" in res.error or "timeout" in res.error or "killed" in res.error), res
    res = run("def check(r):\n    x = bytearray(1024 ** 3)\n    return True", layers)
    assert refused(res) and "Memory" in res.error, res
    res = run("def check(r):\n    print('x' * 100000)\n    return True", layers)
    assert refused(res) and "output" in res.error, res


def test_disk_is_capped(layers):
    code = "def check(r):\n    with open('big', 'wb') as f:\n        for _ in range(64):\n            f.write(bytes(1 << 20))"
    res = run(code, layers, limits=SandboxLimits(max_disk_mb=2, max_output_bytes=16 << 20))
    assert refused(res), res
    # nothing else takes the bytes the cap refuses: in bubblewrap the root and /dev are read-only
    # and /dev/shm is capped as well (each was a tmpfs of half the RAM); without it, no writes
    for where in ("/big", "/dev/shm/big", "/dev/big"):
        code = f"def check(r):\n    with open('{where}', 'wb') as f:\n        f.write(bytes(8 << 20))\n    return True"
        res = run(code, layers, limits=SandboxLimits(max_disk_mb=2, max_output_bytes=16 << 20))
        assert refused(res) and ("OSError" in res.error or "PermissionError" in res.error), (where, res)
    if layers.bubblewrap:  # a scratch file within the cap is allowed in the private tmpfs
        code = "def check(r):\n    open('s', 'w').write(r)\n    return open('s').read() == r"
        assert run(code, layers, "hello").value is True
    else:  # without a private filesystem nothing is writable
        assert refused(run("def check(r):\n    open('s', 'w')", layers))


def test_output_built_to_break_the_parser_is_no_verdict(layers):
    """A checker that echoes the response: a response of 70,000 '[' (or digits) cut by the output
    cap once made the parent's JSON parse raise (RecursionError / ValueError) out of run_checker."""
    for junk in ("[" * 70000, "9" * 70000):
        res = run("def check(r):\n    print(r)\n    return True", layers, "ok\n" + junk)
        assert refused(res) and "no verdict" in res.error, res


def test_seccomp_alone_keeps_the_callers_rights_and_is_refused(monkeypatch):
    """Without bubblewrap and without a root caller to drop to nobody, a checker would read the
    caller's files, environment and memory: refused unless the operator opts in."""
    layers = sandbox.Layers(None, True, False, "bubblewrap unavailable; running as a non-root user")
    monkeypatch.delenv(sandbox.ALLOW_UNCONFINED_ENV, raising=False)
    res = run("def check(r):\n    return True", layers)
    assert refused(res) and "checker refused" in res.error and sandbox.ALLOW_UNCONFINED_ENV in res.error
    assert "UNAVAILABLE" in layers.describe()
    if os.getuid() != 0:  # as root the opt-in would run the checker as root: not tried here
        monkeypatch.setenv(sandbox.ALLOW_UNCONFINED_ENV, "1")
        assert run("def check(r):\n    return True", layers).value is True


def test_forged_verdict_is_ignored(layers):
    code = 'def check(r):\n    print(\'{"nonce": "guess", "value": true}\')\n    return False'
    assert run(code, layers).value is False


# ---- what check() may return, and who sets the limits ----------------------------------------


@pytest.mark.parametrize("value", ["float('nan')", "-0.5", "2", "'yes'", "None", "float('inf')"])
def test_check_must_return_a_bool(value):
    res = run_checker(f"def check(r):\n    return {value}", "r", FAST)
    assert refused(res) and "check()" in res.error, res


def test_scores_in_unit_interval_where_allowed():
    assert run_checker("def check(r):\n    return 0.75", "r", FAST, allow_score=True).value == 0.75
    assert refused(run_checker("def check(r):\n    return 0.75", "r", FAST))
    assert refused(run_checker("def check(r):\n    return 1.5", "r", FAST, allow_score=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_mb": -1},
        {"timeout_s": 1e10},
        {"timeout_s": float("nan")},
        {"cpu_s": 0},
        {"max_disk_mb": 10**9},
        {"max_output_bytes": "big"},
    ],
)
def test_limits_are_validated(kwargs):
    with pytest.raises(ValueError, match="SandboxLimits"):
        SandboxLimits(**kwargs)


def test_a_row_cannot_set_limits():
    code = "def check(r):\n    return True"
    assert pvr.check_constraint("r", {"type": "code", "code": code}) is True
    with pytest.raises(pvr.ConstraintError, match="cannot set sandbox limits"):
        pvr.check_constraint("r", {"type": "code", "code": code, "limits": {"memory_mb": -1, "timeout_s": 30}})
    # a checker that returns a number passes only when it is True itself
    assert pvr.check_constraint("r", {"type": "code", "code": "def check(r):\n    return -0.5"}) is False
