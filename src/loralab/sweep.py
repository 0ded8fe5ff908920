"""``loralab run DIR... --gpus N|all [--gpus-per-run K | --runs-per-gpu M]``: many experiment folders
at once, one run per GPU (or per group of K GPUs, each group one ``torchrun`` launch; or M runs
sharing each GPU), each a ``loralab run`` of its own in a subprocess that sees only its GPUs
(``CUDA_VISIBLE_DEVICES``).

``--runs-per-gpu``: a small model's step is launch-bound (MiniLM at batch 32 leaves an H200
mostly idle), so M processes on one GPU overlap their host work (start-up, data, evaluation,
Python) and keep it busier. Each run still has the whole GPU's memory in view: M must fit.

A folder whose experiment already has a ``success`` result for the same configuration (its
``train_params_sha`` and ``peft_config_sha``, under ``LORALAB_RESULTS_DIR``) is skipped, so a
half-done sweep run again continues with the runs that have no result yet. Each run's output goes
to ``<LORALAB_OUTPUT_DIR or outputs>/sweep-logs/<experiment>.log``; one line per start and end on
stdout. SIGINT/SIGTERM is passed on to the running children (each writes its ``cancelled``
record), and no new run starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def parse_gpus(value: str, available: list[str]) -> list[str]:
    """The GPU ids a sweep may use: ``all`` or a count N (the first N of ``available``).
    Raises ValueError naming the value and what is allowed."""
    if value == "all":
        if not available:
            raise ValueError("--gpus all: no GPU is visible (CUDA_VISIBLE_DEVICES / torch.cuda.device_count())")
        return list(available)
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--gpus {value!r}: allowed: 'all' or a positive integer") from None
    if n < 1 or n > len(available):
        raise ValueError(f"--gpus {n}: allowed: 1 to {len(available)} (visible GPUs: {', '.join(available) or 'none'})")
    return list(available[:n])


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` when set, else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def has_success(exp) -> Path | None:
    """A ``success`` result of this experiment with the same configuration hashes, or None."""
    from loralab.results import results_root

    stem = exp.name.replace("/", "--") + "--"
    for folder in ("results", "temporary_results"):
        for path in sorted((results_root() / folder).glob(stem + "*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            run = record.get("run_info", {})
            if (record.get("train_info", {}).get("status") == "success" and run.get("experiment_name") == exp.name
                    and run.get("train_params_sha") == exp.train_params_sha
                    and run.get("peft_config_sha") == exp.peft_config_sha):
                return path
    return None


@dataclass
class _Job:
    exp: object
    gpus: list[str]
    proc: subprocess.Popen
    log: Path
    started: float


def command(exp_path: str, n_gpus: int, resume: bool, sharding: str = "ddp") -> list[str]:
    """The child's command line: ``loralab run`` for one GPU, ``torchrun --standalone`` for more."""
    run = ["-m", "loralab", "run", str(exp_path), "--sharding", sharding] + (["--resume"] if resume else [])
    if n_gpus == 1:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}", *run]


def slots_for(gpus: list[str], per_run: int = 1, runs_per_gpu: int = 1) -> list[list[str]]:
    """The sweep's slots (each the GPU ids of one concurrent run): groups of ``per_run`` GPUs, or
    each GPU ``runs_per_gpu`` times (interleaved, so the first runs spread over all GPUs).
    Raises ValueError naming the bad option and what is allowed."""
    if per_run < 1 or per_run > len(gpus):
        raise ValueError(f"--gpus-per-run {per_run}: allowed: 1 to {len(gpus)} (the GPUs of the sweep)")
    if runs_per_gpu < 1:
        raise ValueError(f"--runs-per-gpu {runs_per_gpu}: allowed: a positive integer")
    if runs_per_gpu > 1 and per_run > 1:
        raise ValueError(f"--runs-per-gpu {runs_per_gpu} with --gpus-per-run {per_run}: allowed: one of them above 1")
    groups = [gpus[i:i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]
    return [list(g) for _ in range(runs_per_gpu) for g in groups]


def run_sweep(experiments: list, gpus: list[str], *, per_run: int = 1, runs_per_gpu: int = 1, resume: bool = False,
              sharding: str = "ddp", out=sys.stdout, poll_s: float = 0.5) -> int:
    """Run ``experiments`` (``Experiment`` objects) concurrently on ``gpus`` (ids), ``per_run`` GPUs
    each, or ``runs_per_gpu`` runs sharing each GPU.

    Returns 0 when every run succeeded (or was skipped), else the first failing run's exit code
    (``loralab run``'s codes; 130 when cancelled). Raises ValueError when the options do not fit.
    """
    slots = slots_for(gpus, per_run, runs_per_gpu)
    from loralab.run.build import output_root

    logs = output_root() / "sweep-logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = []
    for exp in experiments:
        done = has_success(exp)
        if done is not None:
            print(f"skip {exp.name}: success result {done}", file=out, flush=True)
        else:
            todo.append(exp)
    print(f"sweep: {len(todo)} run(s) on {len(slots)} slot(s) of {per_run} GPU(s) "
          f"({', '.join(','.join(s) for s in slots)}); logs in {logs}", file=out, flush=True)
    stop = {"signal": None}
    previous = {}

    def handle(signum, frame):
        stop["signal"] = signum
        for job in running:
            if job.proc.poll() is None:
                job.proc.send_signal(signum)

    running: list[_Job] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handle)
    code = 0
    try:
        free = list(slots)
        while (todo and stop["signal"] is None) or running:
            while todo and free and stop["signal"] is None:
                exp, slot = todo.pop(0), free.pop(0)
                log = logs / f"{exp.name.replace('/', '--')}.log"
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(slot)}
                if runs_per_gpu > 1:  # recorded in the result's system_info: its seconds were measured sharing a GPU
                    env["LORALAB_RUNS_PER_GPU"] = str(runs_per_gpu)
                with open(log, "ab") as fh:
                    proc = subprocess.Popen(command(str(exp.path), len(slot), resume, sharding), env=env, stdout=fh,
                                            stderr=subprocess.STDOUT)
                running.append(_Job(exp, slot, proc, log, time.perf_counter()))
                print(f"start {exp.name} on GPU {','.join(slot)}", file=out, flush=True)
            time.sleep(poll_s)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                running.remove(job)
                free.append(job.gpus)
                took = time.perf_counter() - job.started
                word = {0: "done", 130: "cancelled"}.get(rc, f"exit {rc}")
                print(f"{word} {job.exp.name} ({took:.0f} s; log {job.log})", file=out, flush=True)
                if rc != 0 and code == 0:
                    code = rc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop["signal"] is not None:
        return 130
    return code
