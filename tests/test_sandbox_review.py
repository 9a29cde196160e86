"""Holes an adversarial review of the checker sandbox found, each pinned by the attack that
exposed it.  Like tests/test_sandbox.py, these run the real sandbox in each mode this host gives
(bubblewrap + seccomp, and seccomp alone), with the advisory audit hook switched off first."""

import fcntl
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import time

import pytest
from test_sandbox import refused, run  # the layers fixture is in conftest.py

from clipo_jax.rubrics import sandbox
from clipo_jax.rubrics.sandbox import SandboxLimits

# the audit hook off, then raw syscalls with full 64-bit arguments through ctypes
RAW = """
import gc
for _o in gc.get_objects():
    if getattr(_o, '__name__', None) == '_hook' and hasattr(_o, '__code__'):
        _o.__code__ = (lambda event, args: None).__code__
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
def raw(nr, *args):
    rc = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if rc < 0:
        raise PermissionError(f'syscall {nr} refused: errno {ctypes.get_errno()}')
    return rc
"""

x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="raw syscall numbers are x86_64")


@x86_64
@pytest.mark.parametrize(
    "name,call",
    [
        ("fcntl_setown_upper_bits", "raw(72, 1, (1 << 32) | 8, 1)"),
        ("fcntl_setsig_upper_bits", "raw(72, 1, (1 << 32) | 10, 9)"),
        (  # struct f_owner_ex {F_OWNER_PID, pid 1}
            "fcntl_setown_ex_upper_bits",
            "raw(72, 1, (1 << 32) | 15, ctypes.addressof((ctypes.c_int * 2)(1, 1)))",
        ),
        ("ioctl_tiocsti_upper_bits", "raw(16, 1, (1 << 32) | 0x5412, ctypes.addressof(ctypes.c_char(b'x')))"),
    ],
)
def test_command_upper_bits_do_not_slip_past_the_filter(layers, name, call):
    """fcntl and ioctl take an `unsigned int` command: the kernel drops the upper 32 bits, so a
    rule comparing all 64 bits let (1 << 32) | F_SETOWN through as F_SETOWN."""
    res = run(RAW + f"def check(r):\n    {call}\n    return True", layers)
    assert refused(res) and res.error.endswith("refused: errno 1"), res


@x86_64
def test_setown_cannot_kill_another_nobody_process():
    """Without bubblewrap every checker is uid nobody in the host's pid namespace: F_SETOWN and
    F_SETSIG on a pipe (upper bits set) sent SIGKILL to another nobody process (a concurrent
    checker) on each write."""
    layers = sandbox.detect_layers(use_bubblewrap=False)
    if not (layers.usable and layers.drop_to_nobody):
        pytest.skip(f"needs a root caller dropped to nobody: {layers.reason}")
    victim = subprocess.Popen(["sleep", "30"], user=sandbox.NOBODY, group=sandbox.NOBODY)
    try:
        code = RAW + (
            "import os\ndef check(r):\n    rd, wr = os.pipe()\n"
            "    raw(72, rd, 4, os.O_ASYNC)\n"  # F_SETFL
            f"    raw(72, rd, (1 << 32) | 8, {victim.pid})\n"  # F_SETOWN
            "    raw(72, rd, (1 << 32) | 10, 9)\n"  # F_SETSIG SIGKILL
            "    os.write(wr, b'x')\n    return True"
        )
        res = run(code, layers)
        time.sleep(0.2)
        assert victim.poll() is None, "the checker killed another process"
        assert refused(res) and res.error.endswith("refused: errno 1"), res
    finally:
        victim.kill()
        victim.wait()


@x86_64
def test_fallocate_cannot_grow_the_output_file_past_its_cap(layers):
    """stdout is a file on the host's disk; RLIMIT_FSIZE caps writes and ftruncate, but not
    fallocate(FALLOC_FL_KEEP_SIZE), which reserved any number of blocks on the host."""
    code = RAW + (
        "import os\ndef check(r):\n    raw(285, 1, 1, 0, 64 << 20)\n"  # FALLOC_FL_KEEP_SIZE, 64 MB
        "    return os.fstat(1).st_blocks * 512 >= 64 << 20"
    )
    res = run(code, layers)
    assert refused(res) and res.error.endswith("refused: errno 1"), res


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
FS_NODUMP_FL = 0x40


@x86_64
@pytest.mark.parametrize("how", ["fssetxattr", "setflags_upper_bits"])
def test_no_inode_flags_change_without_bubblewrap(how):
    """Without bubblewrap no file on the host may change, yet a nobody-owned host file opened
    read-only took new inode flags through FS_IOC_FSSETXATTR (not filtered) or FS_IOC_SETFLAGS
    with the upper bits of the command set."""
    layers = sandbox.detect_layers(use_bubblewrap=False)
    if not (layers.usable and layers.drop_to_nobody):
        pytest.skip(f"needs a root caller dropped to nobody: {layers.reason}")
    where = tempfile.mkdtemp(prefix="sandbox_review_", dir="/tmp")
    try:
        os.chmod(where, 0o755)
        path = os.path.join(where, "victim.txt")
        with open(path, "w") as f:
            f.write("keep me")
        os.chown(path, sandbox.NOBODY, sandbox.NOBODY)
        with open(path, "rb") as f:
            try:
                before = struct.unpack("l", fcntl.ioctl(f, FS_IOC_GETFLAGS, b"\0" * 8))[0]
            except OSError as e:
                pytest.skip(f"this filesystem keeps no inode flags: {e}")
        if how == "fssetxattr":
            set_flag = (
                f"    buf = (ctypes.c_char * 28)()\n    raw(16, fd, {FS_IOC_FSGETXATTR}, ctypes.addressof(buf))\n"
                "    ctypes.c_uint32.from_buffer(buf, 0).value |= 0x80\n"  # FS_XFLAG_NODUMP
                f"    raw(16, fd, {FS_IOC_FSSETXATTR}, ctypes.addressof(buf))\n"
            )
        else:
            set_flag = (
                f"    fl = ctypes.c_long({before | FS_NODUMP_FL})\n"
                f"    raw(16, fd, (1 << 32) | {FS_IOC_SETFLAGS}, ctypes.addressof(fl))\n"
            )
        code = RAW + f"import os\ndef check(r):\n    fd = os.open('{path}', os.O_RDONLY)\n{set_flag}    return True"
        res = run(code, layers)
        with open(path, "rb") as f:
            after = struct.unpack("l", fcntl.ioctl(f, FS_IOC_GETFLAGS, b"\0" * 8))[0]
        assert after == before, f"inode flags changed {before:#x} -> {after:#x}"
        assert refused(res) and res.error.endswith("refused: errno 1"), res
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_forged_bad_value_gives_a_short_reason(layers):
    """The checker can read the nonce from the bootstrap's globals and write its own verdict line;
    a value that is not a bool then came back (repr'd, up to the output cap) as the reason,
    which callers log once per response."""
    code = RAW + (
        "import os\n_g = next(o for o in gc.get_objects() if isinstance(o, dict) and '_nonce' in o and '_out' in o)\n"
        "def check(r):\n"
        "    _g['_out'].write('\\n{\"nonce\": \"' + _g['_nonce'] + '\", \"value\": [' + '1,' * 20000 + '1]}\\n')\n"
        "    _g['_out'].flush()\n    os._exit(0)"
    )
    res = run(code, layers, limits=SandboxLimits(max_output_bytes=1 << 20))
    assert refused(res) and "check() returned" in res.error and len(res.error) <= 300, res.error[:100]


def _descendants_running(root_pid, marker):
    """Host pids of this process's descendants whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker not in f.read():
                    continue
            pid = int(entry)
            while pid > 1:
                with open(f"/proc/{pid}/status") as f:
                    pid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
                if pid == root_pid:
                    found.append(int(entry))
                    break
        except (OSError, StopIteration, ValueError):
            continue
    return found


def test_bubblewrap_started_by_root_gives_the_checker_no_root_on_the_host():
    """Started by root, bubblewrap mapped the checker's uid nobody to host uid 0: without
    capabilities, yet the owner of every root-owned file, it read root's 0600 files in the bound
    trees (the interpreter's prefix) and chmod'ed its stdout file."""
    import sys
    import threading

    if os.geteuid() != 0:
        pytest.skip("needs a root caller (bubblewrap started by another user maps that user)")
    layers = sandbox.detect_layers()
    if not layers.bubblewrap:
        pytest.skip(f"bubblewrap unavailable here: {layers.reason}")
    prefix = os.path.realpath(sys.base_prefix)
    secret = os.path.join(prefix, f".clipo_sandbox_review_{os.getpid()}")
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"root only")
        os.close(fd)
        code = (
            "import os, time\ndef check(r):\n    time.sleep(1.5)\n    out = []\n"
            f"    try:\n        out.append(open({secret!r}).read())\n    except OSError as e:\n"
            "        out.append(type(e).__name__)\n"
            "    try:\n        os.fchmod(1, 0o666)\n        out.append('chmod')\n    except OSError as e:\n"
            "        out.append(type(e).__name__)\n    raise ValueError(out)"
        )
        result, seen = [], {}
        thread = threading.Thread(target=lambda: result.append(run(code, layers)))
        thread.start()
        deadline = time.time() + 8
        while thread.is_alive() and not seen and time.time() < deadline:
            for pid in _descendants_running(os.getpid(), b"/sandbox/boot/boot.py"):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        uid = next(line for line in f if line.startswith("Uid:")).split()[1:]
                    with open(f"/proc/{pid}/uid_map") as f:  # host uids, read from the host's namespace
                        uid_map = f.read().split()
                    if os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                        seen[pid] = (uid, uid_map)  # inside bubblewrap's user namespace
                except (OSError, StopIteration):
                    continue
            time.sleep(0.05)
        thread.join()
    finally:
        os.unlink(secret)
    assert seen, "no checker process found in a user namespace"
    for uid, uid_map in seen.values():
        assert uid == [str(sandbox.NOBODY)] * 4, f"host uids (real, effective, saved, fs): {uid}"
        assert uid_map == [str(sandbox.NOBODY), str(sandbox.NOBODY), "1"], f"uid_map read from the host: {uid_map}"
    (res,) = result
    assert refused(res) and res.error == "ValueError: ['PermissionError', 'PermissionError']", res
