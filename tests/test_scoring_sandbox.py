"""Issue 12, kinds 2, 3 and 9: a program passes only when its tests ran to the end; concurrent
evaluators never share a uid; timeouts are re-run alone and counted apart; generations carry
their protocol.

Every program here runs in the real sandbox on the real HumanEval problems."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab.tasks import code, sandbox
from loralab.tasks import evaluate as evals
from loralab.tasks.sandbox import Limits, run_program, run_programs

REPO = Path(__file__).resolve().parents[1]

# Completions of HumanEval/3 (below_zero) that must never pass. The first is issue 12's input.
FORGERIES = {
    "os_exit_0": "\n    return None\nimport os\nos._exit(0)\n",
    "sys_exit_0": "\n    return None\nimport sys\nsys.exit(0)\n",
    "raise_systemexit_0": "\n    return None\nraise SystemExit(0)\n",
    "atexit_exit_0": "\n    return None\nimport atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)\n",
    "atexit_raises_systemexit": "\n    return None\nimport atexit\ndef _bye():\n    raise SystemExit(0)\natexit.register(_bye)\nraise KeyError\n",
    "thread_exits_first": "\n    return None\nimport os, threading, time\nthreading.Thread(target=lambda: os._exit(0)).start()\ntime.sleep(2)\n",
    "kill_self": "\n    return None\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "print_marker": ("\n    return None\nimport os\nm = b'loralab-sandbox-finished:' + b'0' * 32\nprint(m.decode())\n"
                     "for fd in range(0, 64):\n    try:\n        os.write(fd, m)\n    except OSError:\n        pass\nos._exit(0)\n"),
    "patch_harness_exit": ("\n    return None\nimport os, __main__\n__main__._exit = lambda code: None\nos._exit = lambda code: None\n"
                           "__main__.REPORT_PREFIX = b''\n"),
    "patch_write_and_exit_in_test": ("\n    return None\nimport builtins, os, sys\nos.write = lambda fd, b: len(b)\n"
                                     "sys.exit = lambda *a: None\nbuiltins.print = lambda *a, **k: None\n"),
    "swallow_tests_in_string": "\n    return None\n_ = '''\n",
    "swallow_tests_in_comment_continuation": "\n    return None\n_ = (\n",
    "close_harness_fds": "\n    return None\nimport os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n    except OSError:\n        pass\n",
}


@pytest.fixture(scope="module")
def humaneval(data_dir):
    return {p["id"]: p for p in code.load("humaneval", data_dir, None)}


def _reference(problem):
    """The canonical solution as a bigcode-protocol completion (continues the stripped prompt)."""
    return problem["prompt"][len(problem["prompt"].rstrip()):] + problem["canonical_solution"]


def test_forged_completions_never_pass(humaneval):
    options = evals.resolve_options("humaneval", {"timeout": 3.0})
    problem = humaneval["HumanEval/3"]
    results = code.run_tests("humaneval", [problem], {problem["id"]: list(FORGERIES.values())}, options)[problem["id"]]
    by_kind = {kind: r for kind, r in zip(FORGERIES, results)}
    assert {k: r.status for k, r in by_kind.items() if r.passed} == {}
    assert by_kind["os_exit_0"].returncode == 0  # exit status 0, yet failed: the tests never ran
    assert by_kind["swallow_tests_in_string"].status == "failed"
    # the same program with the right body passes: the failures above are the forgeries' own
    right = code.run_tests("humaneval", [problem], {problem["id"]: [_reference(problem)]}, options)[problem["id"]][0]
    assert right.passed and right.status == "passed"


def test_issue_12_input_scores_zero(humaneval):
    options = evals.resolve_options("humaneval", {})
    problem = humaneval["HumanEval/3"]
    metrics = code.score("humaneval", [problem], {problem["id"]: [FORGERIES["os_exit_0"]]}, options)
    assert metrics["pass@1"] == 0.0 and metrics["failed"] == 1 and metrics["timed_out"] == 0


def test_generic_programs_need_their_test_to_finish():
    assert run_program("x = 1\n", test="assert x == 1").passed
    assert not run_program("x = 1\n", test="assert x == 2").passed
    assert not run_program("import os\nos._exit(0)\n", test="pass").passed
    # the test runs in the program's namespace, after it, even if the program rewrote test.py
    assert not run_program("open('test.py', 'w').write('pass')\nx = 1\n", test="assert x == 2").passed


@pytest.mark.slow
def test_uid_slots_are_unique_across_processes(tmp_path, monkeypatch):
    """Each process's slot counter starts at 0; the flock on the slot's file keeps a second
    process off a slot this one holds, and a dead holder's slot comes free."""
    monkeypatch.setenv("LORALAB_SANDBOX_LOCK_DIR", str(tmp_path / "locks"))
    held = [sandbox._acquire_slot() for _ in range(3)]
    mine = {slot for slot, _ in held}
    script = ("import json, sys\nfrom loralab.tasks import sandbox\n"
              "print(json.dumps([sandbox._acquire_slot()[0] for _ in range(5)]))\nsys.stdout.flush()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    theirs = json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                       check=True).stdout)
    assert not mine & set(theirs), (mine, theirs)
    assert len(set(theirs)) == 5
    for _, fd in held:
        sandbox._release_slot(fd)
    again = json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    assert again == theirs  # the first child died: its slots came free without any clean-up


def test_lock_dir_owned_by_someone_else_is_refused(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to create a folder owned by another uid")
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 12345, 12345)
    monkeypatch.setenv("LORALAB_SANDBOX_LOCK_DIR", str(planted))
    with pytest.raises(RuntimeError, match="not a directory owned by uid"):
        sandbox.lock_dir()


@pytest.mark.slow
def test_timeouts_are_counted_apart_and_rerun_alone(monkeypatch):
    real = sandbox.run_program
    calls = []

    def loaded_then_idle(source, limits, test=""):
        """The sleeper's first run sees a loaded machine (0.3 s of wall clock in all); later runs do not."""
        calls.append(source)
        loaded = "sleep" in source and calls.count(source) == 1
        timeout = 0.3 - sandbox.STARTUP_GRACE_S if loaded else limits.timeout
        return real(source, Limits(timeout=timeout, cpu_seconds=limits.cpu_seconds), test)

    monkeypatch.setattr(sandbox, "run_program", loaded_then_idle)
    slow_but_fine = "import time\ntime.sleep(0.8)\n"
    results = run_programs([slow_but_fine, "x = 1\n", "while True:\n    pass\n"], Limits(timeout=1.5, cpu_seconds=2),
                           workers=2, tests=["pass", "assert x == 1", "pass"])
    assert [r.status for r in results] == ["passed", "passed", "timeout"]
    assert [r.rerun for r in results] == [True, False, True]
    assert len(calls) == 5  # the two timeouts ran twice


@pytest.mark.slow
def test_code_score_counts_timeouts_apart_from_failures(humaneval):
    options = evals.resolve_options("humaneval", {"timeout": 1.0})
    problems = [humaneval["HumanEval/0"], humaneval["HumanEval/1"], humaneval["HumanEval/2"]]
    completions = {problems[0]["id"]: ["\n    while True:\n        pass\n"], problems[1]["id"]: ["\n    return 0\n"],
                   problems[2]["id"]: [_reference(problems[2])]}
    m = code.score("humaneval", problems, completions, options)
    assert (m["programs"], m["failed"], m["timed_out"], m["reruns"]) == (3, 1, 1, 1)
    assert m["pass@1"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_human_eval_protocol_warns_and_rescores_with_its_prompt(humaneval, data_dir):
    """openai/human-eval completions continue the unstripped prompt: under loralab's default
    (bigcode) protocol they do not compile, and the result says so; given their prompt, they pass."""
    problems = list(humaneval.values())[:40]
    rows = [{"task": "humaneval", "id": p["id"], "completion": p["canonical_solution"]} for p in problems]
    plain = evals.score_generations(rows, data_dir=data_dir)["humaneval"]
    assert plain["pass@1"] < 0.2
    assert plain["not_compiling"] > 20
    assert "another harness's protocol" in plain["warnings"][0] and '"prompt"' in plain["warnings"][0]
    with_prompt = [{**r, "prompt": p["prompt"]} for r, p in zip(rows, problems)]
    fixed = evals.score_generations(with_prompt, data_dir=data_dir)["humaneval"]
    assert fixed["pass@1"] == 1.0 and "warnings" not in fixed
    # bigcode-style completions with the stripped prompt given explicitly score the same as without it
    bigcode = [{"task": "humaneval", "id": p["id"], "completion": _reference(p), "prompt": p["prompt"].strip()} for p in problems[:10]]
    assert evals.score_generations(bigcode, data_dir=data_dir)["humaneval"]["pass@1"] == 1.0


def _hostile_rows(problems):
    kinds = [
        "\n    import os\n    while True:\n        os.fork()\n",  # fork bomb (NPROC of its own uid)
        "\n    import os, signal\n    os.kill(-1, signal.SIGKILL)\n",  # every process it may signal
        ("\n    import os, signal\n    for pid in range(2, 40000):\n        try:\n            os.kill(pid, signal.SIGKILL)\n"
         "        except OSError:\n            pass\n"),
        "\n    return None\nimport os\nos._exit(0)\n",
        "\n    x = bytearray(1 << 40)\n",
        "\n    import os\n    while True:\n        if os.fork() == 0:\n            os.setsid()\n",
    ]
    return [{"task": "humaneval", "id": p["id"], "completion": kinds[i % len(kinds)]} for i, p in enumerate(problems)]


@pytest.mark.slow
def test_three_concurrent_evaluators_score_as_alone(humaneval, tmp_path):
    """Issue 12 kind 3: three ``loralab eval --generations`` processes started together, one full
    of hostile programs; the two honest ones still score 164/164 and the hostile one 0."""
    honest = [{"task": "humaneval", "id": p["id"], "completion": _reference(p)} for p in humaneval.values()]
    hostile = _hostile_rows(list(humaneval.values())[:36])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs = []
    for name, rows in (("honest_a", honest), ("hostile", hostile), ("honest_b", honest)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, "-m", "loralab", "eval", "--tasks", "humaneval", "--generations", str(path),
               "--output", str(tmp_path / f"{name}.json")]
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    start = time.monotonic()
    for name, proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (name, err[-2000:])
    scores = {name: json.loads((tmp_path / f"{name}.json").read_text())["humaneval"] for name, _ in procs}
    assert scores["honest_a"]["pass@1"] == 1.0 and scores["honest_a"]["programs"] == 164, scores["honest_a"]
    assert scores["honest_b"]["pass@1"] == 1.0 and scores["honest_b"]["programs"] == 164, scores["honest_b"]
    assert scores["hostile"]["pass@1"] == 0.0
    print(f"three evaluators: {time.monotonic() - start:.0f} s")
    if os.geteuid() == 0:  # nothing of the sandbox uid range is left running that no running sandbox owns
        assert sandbox.stray_pids() == []
