"""Nothing lost: a run killed with SIGKILL at random steps and resumed ends bitwise equal (CPU) to
an uninterrupted run — adapter tensors, loss history and final metrics; SIGTERM writes a checkpoint
and a cancelled record; a changed configuration refuses to resume and names the changed key; a
residual init (PiSSA) resumes without redoing its SVD. Real MiniLM-L6, real GLUE rows."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PARAMS = {"task": "glue/stsb", "max_train_samples": 40, "max_eval_samples": 16, "batch_size": 4,
          "gradient_accumulation_steps": 2, "num_epochs": 2, "learning_rate": 1e-3, "logging_steps": 2,
          "checkpoint_steps": 1, "keep_checkpoints": 2, "seed": 3}


def make(root: Path, name: str, params: dict, adapter: dict) -> Path:
    folder = root / "experiments" / name
    folder.mkdir(parents=True)
    LoraConfig(**adapter).save_pretrained(folder)
    (folder / "training_parameters.json").write_text(json.dumps(params))
    return folder


def env_for(root: Path, data_dir) -> dict:
    return {**os.environ, "LORALAB_RESULTS_DIR": str(root / "res"), "LORALAB_OUTPUT_DIR": str(root / "out"),
            "LORALAB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


def run(folder: Path, env: dict, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loralab", "run", str(folder), *extra], env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_here(folder: Path, env: dict, monkeypatch, capsys, *extra: str) -> tuple[int, str]:
    """``loralab run`` in this process, for a ``--resume`` refused before anything is built: its exit
    code and stderr, without a launch's ~10 s of interpreter start and imports."""
    from loralab.cli import main

    for key in ("LORALAB_RESULTS_DIR", "LORALAB_OUTPUT_DIR", "LORALAB_DATA_DIR"):
        monkeypatch.setenv(key, env[key])
    capsys.readouterr()
    code = main(["run", str(folder), *extra])
    return code, capsys.readouterr().err


class Background:
    """A ``loralab run`` started now and collected on first use (its stderr goes to a file, so it
    never waits on a pipe): an uninterrupted reference runs beside the killed runs it is compared
    with, instead of before them, and a launch's single-threaded start-up uses the other core."""

    def __init__(self, folder: Path, env: dict, root: Path):
        self.root = root
        self.log = open(root / "run.log", "w+")  # closed by result() or stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "loralab", "run", str(folder)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self._final = None

    def result(self) -> tuple[dict, dict]:
        """``final(root)`` once the run has ended with exit code 0."""
        if self._final is None:
            self.proc.wait(timeout=300)
            self.log.seek(0)
            err = self.log.read()
            self.log.close()
            assert self.proc.returncode == 0, err[-2000:]
            self._final = final(self.root)
        return self._final

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def checkpoints(root: Path) -> list[Path]:
    return sorted((root / "out").glob("*/checkpoints/step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def kill_at(folder: Path, env: dict, root: Path, min_step: int, extra=()) -> int:
    """Start a run, SIGKILL it once checkpoint ``min_step`` (or later) exists; returns that step."""
    proc = subprocess.Popen([sys.executable, "-m", "loralab", "run", str(folder), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = [int(p.name.split("-")[1]) for p in checkpoints(root)]
            if done and max(done) >= min_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return max(done)
            if proc.poll() is not None:
                raise AssertionError("the run ended before it could be killed")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    raise AssertionError("no checkpoint appeared")


def final(root: Path) -> tuple[dict, dict]:
    results = [p for p in (root / "res").rglob("*.json")]
    success = [json.loads(p.read_text()) for p in results]
    success = [r for r in success if r["train_info"]["status"] == "success"]
    assert len(success) == 1, [p.name for p in results]
    record = success[0]
    adapter = Path(record["train_info"]["adapter_path"]) / "adapter_model.safetensors"
    return record, load_file(str(adapter))


def assert_same_run(a: tuple[dict, dict], b: tuple[dict, dict]):
    (rec_a, ten_a), (rec_b, ten_b) = a, b
    assert sorted(ten_a) == sorted(ten_b)
    for key in ten_a:
        assert torch.equal(ten_a[key], ten_b[key]), key  # bitwise
    losses = lambda r: [(m["step"], m.get("train loss")) for m in r["train_info"]["metrics"] if "train loss" in m]  # noqa: E731
    assert losses(rec_a) == losses(rec_b)
    assert rec_a["eval"] == rec_b["eval"]
    assert rec_a["train_info"]["steps"] == rec_b["train_info"]["steps"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run, running in the background from the first test that asks for it."""
    root = tmp_path_factory.mktemp("uninterrupted")
    folder = make(root, "lora/stsb", PARAMS, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})
    started = Background(folder, env_for(root, data_dir), root)
    yield started
    started.stop()


def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(tmp_path, data_dir, reference):
    root = tmp_path
    folder = make(root, "lora/stsb", PARAMS, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})
    env = env_for(root, data_dir)
    total = 10  # ceil(40 / (4 x 2)) x 2 epochs; the reference's total_steps, asserted once it has ended
    rng = random.Random(int(time.time()))
    first = rng.randint(1, 4)
    killed = kill_at(folder, env, root, first)
    assert killed < total
    second = rng.randint(killed + 1, total - 2)
    killed2 = kill_at(folder, env, root, second, extra=("--resume",))
    assert killed2 >= second
    done = run(folder, env, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    record, tensors = final(root)
    assert record["train_info"]["resumed_from"]
    assert reference.result()[0]["train_info"]["total_steps"] == total
    assert_same_run((record, tensors), reference.result())
    assert len(checkpoints(root)) <= PARAMS["keep_checkpoints"]  # older ones pruned


def test_sigterm_writes_checkpoint_and_cancelled_record_then_resumes(tmp_path, data_dir, reference, monkeypatch,
                                                                     capsys):
    root = tmp_path
    folder = make(root, "lora/stsb", PARAMS, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})
    env = env_for(root, data_dir)
    # started the way background jobs are: SIGINT ignored (loralab must install its own handlers)
    proc = subprocess.Popen([sys.executable, "-m", "loralab", "run", str(folder)], env=env, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 240
    while not checkpoints(root) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-1500:]
    cancelled = list((root / "res" / "cancelled_results").glob("*.json"))
    assert len(cancelled) == 1
    record = json.loads(cancelled[0].read_text())
    assert record["train_info"]["status"] == "cancelled"
    assert record["train_info"]["error"]["phase"] == "train"
    ckpt = Path(record["train_info"]["checkpoint"])
    assert ckpt.exists() and int(ckpt.name.split("-")[1]) == record["train_info"]["steps"]
    done = run(folder, env, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(final(root), reference.result())
    code, err = run_here(folder, env, monkeypatch, capsys, "--resume")  # nothing left to do: refused, not retrained
    assert code == 2 and "already finished" in err


def test_pissa_resumes_from_saved_init_without_svd_and_refuses_a_changed_config(tmp_path, data_dir, monkeypatch,
                                                                                capsys, request):
    """Also the refusal of a changed configuration, on this test's killed run (it was a test of its
    own, whose killed LoRA run cost a launch)."""
    root = tmp_path
    adapter = {"r": 4, "lora_alpha": 4, "target_modules": ["query", "value"], "init_lora_weights": "pissa"}
    params = {**PARAMS, "num_epochs": 1}
    ref_root = tmp_path / "ref"
    ref = Background(make(ref_root, "pissa/stsb", params, adapter), env_for(ref_root, data_dir), ref_root)
    request.addfinalizer(ref.stop)
    folder = make(root, "pissa/stsb", params, adapter)
    env = env_for(root, data_dir)
    kill_at(folder, env, root, 2)
    assert list((root / "out").glob("*/checkpoints/init_state.safetensors"))
    # a namesake (another tree's experiments/pissa/stsb, the same output folder) with another configuration finds
    # none of these checkpoints, where it was refused by them; the same experiment moved (its configuration
    # unchanged) still resumes them
    from loralab.experiment import read_experiment
    from loralab.run.record import find_resume

    namesake = make(tmp_path / "elsewhere", "pissa/stsb", {**params, "learning_rate": 5e-4}, adapter)
    assert read_experiment(namesake).name == read_experiment(folder).name
    assert find_resume(read_experiment(namesake), root / "out") == (None, None)
    own = find_resume(read_experiment(folder), root / "out")
    assert own[1] is not None
    assert find_resume(read_experiment(make(tmp_path / "moved", "pissa/stsb", params, adapter)), root / "out") == own
    (folder / "training_parameters.json").write_text(json.dumps({**params, "learning_rate": 5e-4}))
    code, err = run_here(folder, env, monkeypatch, capsys, "--resume")
    assert code == 2
    assert "learning_rate: 0.001 -> 0.0005" in err
    assert not list((root / "res").rglob("*.json"))  # refused before anything ran
    (folder / "training_parameters.json").write_text(json.dumps(params))  # restored: the resume below goes on
    # resuming must not decompose again: make peft's PiSSA init fail if it is called
    env["LORALAB_TEST_FORBID_PISSA"] = "1"
    sitecustom = root / "site"
    sitecustom.mkdir()
    (sitecustom / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('LORALAB_TEST_FORBID_PISSA'):\n"
        "    from peft.tuners.lora import layer\n"
        "    def forbidden(*a, **k):\n"
        "        raise RuntimeError('PiSSA SVD recomputed on resume')\n"
        "    layer.LoraLayer.pissa_init = forbidden\n")
    env["PYTHONPATH"] = f"{sitecustom}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = run(folder, env, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(final(root), ref.result())


def test_leftovers_of_a_killed_save_or_prune_are_not_checkpoints(tmp_path):
    """A SIGKILL between prune's rename and its delete leaves ``step-6.del`` with its state.json (the
    random-kill test met it: --resume failed on int("6.del")); a killed save leaves ``step-7.tmp``.
    Neither is listed or resumed from, and the next prune removes them."""
    from loralab.checkpoint import STATE, list_checkpoints, prune

    for name in ("step-3", "step-10", "step-6.del", "step-7.tmp", "step-8"):
        (tmp_path / name).mkdir()
        if name != "step-8":  # a folder without state.json: a save killed before it finished
            (tmp_path / name / STATE).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-10"]  # numeric order, leftovers out
    prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10"]
