"""``loralab bench --experiment DIR``: one experiment folder's recipe through ``loralab run``'s own
path (``loralab.run.run_experiment``) and through transformers ``Trainer`` + peft set up as the recipe
says and tuned as a careful user tunes it (``loralab.bench.peers.trainer_row``: bf16 autocast, fused
AdamW, Liger where it installs, its best per-device batch within loralab's measured peak), one after
the other on one device.
"""

from __future__ import annotations

import contextlib

import torch

from loralab.bench.peers import require_causal_lm, trainer_row
from loralab.bench.runner import clean
from loralab.bench.workloads import BenchError, gib, random_model_id


@contextlib.contextmanager
def _environ(**values):
    import os

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_copy(path, into, *, steps: int, random_weights: bool = False, task: str | None = None,
               device: str | None = None, speed: dict | None = None):
    """A copy of the experiment folder ``path`` under ``into/experiments/<its name>`` for a timing
    run, read back with ``read_experiment``: ``max_steps`` = ``steps``, ``logging_steps`` 1 (every
    step ends with a host sync, so ``loralab run`` can tell warm-up steps from steady ones),
    no checkpoints, no evaluation during training; ``random_weights`` swaps the model for its
    ``random:<shape>`` stand-in, ``task`` the training data (e.g. ``gsm8k`` for a MetaMathQA
    recipe when MetaMathQA is not on disk), ``device`` the device, ``speed`` keys set over the
    recipe's (e.g. ``memory_fraction`` for the row within the Trainer's memory). Everything else (batch,
    accumulation, dtype, lr, schedule, max_length, speed keys, the adapter) is the recipe's.
    Raises ConfigError (every problem) for a folder that is not a valid experiment after the
    changes, BenchError (a ValueError) for an unknown id under ``random_weights``.
    """
    import json
    import shutil
    from pathlib import Path

    from loralab.experiment import (
        ADAPTER_FILE,
        PARAMS_FILE,
        experiment_name,
        read_experiment,
    )

    original = read_experiment_params(Path(path))
    overrides = dict(original)
    overrides.update(max_steps=steps, logging_steps=1, checkpoint_steps=0, eval_steps=None)
    if random_weights:
        from loralab.config import default_parameters

        overrides["model_id"] = random_model_id(original.get("model_id", default_parameters()["model_id"]))
    if task is not None:
        overrides["task"] = task
    if device is not None:
        overrides["device"] = device
    if speed:
        overrides["speed"] = {**(original.get("speed") or {}), **speed}
    target = Path(into) / "experiments" / experiment_name(Path(path))
    target.mkdir(parents=True, exist_ok=True)
    if (Path(path) / ADAPTER_FILE).exists():
        shutil.copy(Path(path) / ADAPTER_FILE, target / ADAPTER_FILE)
    (target / PARAMS_FILE).write_text(json.dumps(overrides, indent=2) + "\n")
    return read_experiment(target)


def read_experiment_params(path) -> dict:
    """The raw ``training_parameters.json`` of an experiment folder ({} when absent); a folder
    that does not exist or a file that is not a JSON object raises ConfigError."""
    import json
    from pathlib import Path

    from loralab.config import ConfigError
    from loralab.experiment import PARAMS_FILE

    path = Path(path)
    if not path.is_dir():
        raise ConfigError([f"experiment folder {str(path)!r} does not exist"], str(path))
    file = path / PARAMS_FILE
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{PARAMS_FILE}: not valid JSON ({exc})"], str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{PARAMS_FILE}: must hold a JSON object"], str(path))
    return data


def _loralab_run_row(exp, workdir) -> dict:
    """``loralab run``'s own path (``loralab.run.run_experiment(evaluate=False)``), results and outputs
    under ``workdir``; the row is read off the result record: steady-state tokens/s as the run
    reports it (steps after the first that captured no new CUDA graph; compile, capture and the
    micro-batch probe are warm-up), peak memory = ``cuda_memory_max`` (from after the probe)."""
    from loralab.run import run_experiment

    with _environ(LORALAB_RESULTS_DIR=workdir / "results", LORALAB_OUTPUT_DIR=workdir / "outputs"):
        record, _ = run_experiment(exp, verbose=False, evaluate=False).unwrap()  # a failed run raises, as before
    info = record["train_info"]
    timing = info["timing"]
    losses = [m["train loss"] for m in info["metrics"] if "train loss" in m]
    return {"stack": "loralab", "steps": info["steps"], "samples": info["train_samples"], "tokens": info["train_tokens"],
            "tokens_per_second": info["tokens_per_second"], "samples_per_second": info["samples_per_second"],
            "steady_steps": (timing.get("steady_samples") or 0) // (exp.params.batch_size * exp.params.gradient_accumulation_steps),
            "steady_tokens": timing.get("steady_tokens"), "steady_seconds": timing.get("steady_s"),
            "overall_tokens_per_second": info["train_tokens"] / info["train_time"] if info["train_time"] else None,
            "warmup_seconds": timing.get("warmup_s"), "train_seconds": info["train_time"],
            "peak_memory_gib": gib(info.get("cuda_memory_max")), "losses": losses,
            "micro_batch": timing.get("micro_batch"), "cuda_graphs_captured": timing.get("cuda_graphs"),
            "oom_retries": timing.get("oom_retries"), "speed": info["speed"]}


def _failed_row(stack: str, exc: Exception) -> dict:
    """The row of a stack that raised: its traceback printed, the cause kept (400 characters)."""
    import traceback

    traceback.print_exc()
    return {"stack": stack, "steps": 0, "samples": 0, "tokens": 0, "tokens_per_second": None,
            "samples_per_second": None, "peak_memory_gib": None, "losses": [],
            "error": f"{type(exc).__name__}: {str(exc).strip()[:400]}"}


AT_PEER_MEMORY = "loralab@trainer-memory"
"""The stack name of ``loralab run`` again with its auto micro-batch capped so its peak stays within
the Trainer's (issue 22: the recipe goal is ">= 5x the careful Trainer at <= its memory")."""


def peer_memory_budget(ours: dict, trainer: dict, total_bytes: int) -> dict:
    """The probe budget that keeps a second ``loralab run`` within the Trainer's measured peak.

    The Trainer searched its micro-batch within loralab's peak (``peers.trainer_row``), so it can
    land below it; the goal asks loralab to run at <= the Trainer's memory. The auto micro-batch
    caps the *probed* peak (one forward+backward, ``run.probe``); the run's peak adds what the
    probe does not hold (CUDA graph pools; optimizer state, which records since 2026-12-05 count
    themselves as ``optimizer_state_gib``), measured on the first run as its peak minus its
    probe's peak at the chosen size minus that state. So: budget = Trainer's peak - that margin, and
    ``memory_fraction`` = budget / ``total_bytes`` (the card's memory).

    ``ours``/``trainer``: rows of ``run_experiment_bench`` (GiB figures; ours with ``speed``'s
    ``micro_batch_probe``). Returns {run, fits, reason, budget_gib, margin_gib, memory_fraction}:
    ``run`` False with the reason when there is nothing to do (``fits``: loralab already within; else
    nothing measured: an explicit micro-batch without an FP8 base's "auto" codes, or no GPU, a failed row; an
    explicit micro-batch whose measured peak is over the budget (only the codes "auto" cached would shrink, and
    they are left out of the margin); or micro-batch 1 probed over the budget where the probe could not shrink
    the loss's chunks: records before ``loss_chunk_size`` "auto", or an explicit chunk). The FP8 codes "auto"
    cached (``fp8_transposes_cached``) are not counted in the margin: the capped run caches within its own budget."""
    skip = {"run": False, "fits": False, "budget_gib": None, "margin_gib": None, "memory_fraction": None}
    if ours.get("error") or trainer.get("error") or ours.get("peak_memory_gib") is None \
            or trainer.get("peak_memory_gib") is None:
        return {**skip, "reason": "no peak memory for both stacks (not on CUDA, or a stack failed)"}
    if ours["peak_memory_gib"] <= trainer["peak_memory_gib"]:
        return {**skip, "fits": True, "reason": f"loralab's peak {ours['peak_memory_gib']:.2f} GiB is within the Trainer's "
                                  f"{trainer['peak_memory_gib']:.2f} GiB"}
    speed = ours.get("speed") or {}
    probe = speed.get("micro_batch_probe") or {}
    sizes, peaks = probe.get("sizes") or [], probe.get("peaks_gib") or []
    chosen = ours.get("micro_batch")
    peak = peaks[sizes.index(chosen)] if chosen in sizes else None
    if not isinstance(peak, (int, float)):
        return {**skip, "reason": "loralab's micro-batch was not measured (an explicit speed.micro_batch): "
                                  "nothing to cap"}
    state = probe.get("optimizer_state_gib") or 0.0  # the probe counts it against the budget itself
    cached = speed.get("fp8_transposes_cached") or {}  # FP8 codes "auto" kept: the capped run decides them again
    codes = cached.get("bytes", 0) / 2**30 if "auto_spare_gib" in cached else 0.0
    margin = max(0.0, ours["peak_memory_gib"] - peak - state - codes)
    budget = trainer["peak_memory_gib"] - margin
    if str(probe.get("reason", "")).startswith("explicit") and budget < peak + state:
        return {**skip, "reason": f"loralab's explicit micro-batch {chosen} measured {peak:.2f} GiB"
                                  f"{f' + {state:.2f} GiB of optimizer state' if state else ''}, over the "
                                  f"{budget:.2f} GiB the Trainer's peak leaves: only the cached FP8 codes shrink "
                                  "under a smaller budget, and they are not in that measurement"}
    shrinks = probe.get("loss_chunk_size") is not None  # "auto": the probe may shrink the loss's chunks to fit
    if sizes[0] == 1 and peaks[0] is not None and budget < peaks[0] + state and not shrinks:
        return {**skip, "reason": f"the Trainer's peak {trainer['peak_memory_gib']:.2f} GiB less loralab's unprobed "
                                  f"memory ({margin:.2f} GiB) is below loralab's micro-batch 1 ({peaks[0]:.2f} GiB "
                                  f"probed{f' + {state:.2f} GiB of optimizer state' if state else ''}): no micro-batch fits"}
    return {"run": True, "fits": False, "budget_gib": round(budget, 2), "margin_gib": round(margin, 2),
            "memory_fraction": budget * 2**30 / total_bytes,
            "reason": f"loralab's peak {ours['peak_memory_gib']:.2f} GiB is over the Trainer's "
                      f"{trainer['peak_memory_gib']:.2f} GiB; probe budget = that - {margin:.2f} GiB (run peak "
                      f"minus probed peak at micro-batch {chosen}"
                      + (f" minus the {state:.2f} GiB of optimizer state the probe counts" if state else "") + ")"}


def run_experiment_bench(path, *, steps: int = 3, random_weights: bool = False, task: str | None = None,
                         device: str | None = None, stacks: tuple[str, ...] = ("loralab", "trainer"),
                         speed: dict | None = None, workdir=None, log=print) -> dict:
    """One experiment folder's recipe, ``steps`` optimizer steps, through ``loralab run``'s own
    path and through transformers' ``Trainer`` + peft, one after the other in this process on one
    device (see ``bench_copy``, ``_loralab_run_row``, ``peers.trainer_row``). ``speed``: keys set over
    the recipe's for loralab's rows (an A/B of a speed key; the result records them), not the Trainer's.

    Returns {experiment, model_id, random_weights, task, steps, optimizer_batch, device, rows,
    ratio, at_trainer_memory_plan, at_trainer_memory}: one row per stack with real (non-pad) tokens,
    steady-state tokens/s and samples/s, warm-up seconds, peak memory (GiB, CUDA) and per-step
    losses; ``ratio`` = loralab / trainer steady tokens/s (the Trainer row is the one peer row, so
    also ``ratio_best_peer``, with ``best_peer`` naming it). When loralab's peak is over the
    Trainer's (the Trainer searched within loralab's peak and may land below it), a third row,
    ``AT_PEER_MEMORY``, runs ``loralab run`` again with its probe capped to stay within the
    Trainer's peak (``peer_memory_budget``: the plan and its reason); ``at_trainer_memory`` = {stack,
    ratio, peak_memory_gib, trainer_peak_memory_gib, within}: loralab's figure at <= the Trainer's
    memory (its default row when that already fit; None off CUDA). ``steps`` must be >= 2 (step 1 is warm-up for both stacks). Raises
    ConfigError for a bad folder, BenchError (a ValueError) for bad arguments.
    """
    import tempfile
    from pathlib import Path

    from loralab.config import ConfigError

    if steps < 2:
        raise BenchError(f"--steps = {steps}: at least 2 (the first step is warm-up for both stacks)")
    unknown = [s for s in stacks if s not in ("loralab", "trainer")]
    if unknown or not stacks or len(set(stacks)) != len(stacks):
        raise BenchError(f"--stacks {','.join(stacks)!r}: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'empty or repeated'}; "
                         "allowed with --experiment: loralab, trainer (each once)")
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loralab-bench-")))
        exp = bench_copy(path, root, steps=steps, random_weights=random_weights, task=task, device=device, speed=speed)
        params = exp.params
        if "trainer" in stacks:  # refused before the loralab stack spends minutes training
            require_causal_lm(params.task)
        from loralab.run.build import pick_device

        # attention kernels as torch picks them for both stacks; the preset rows switch cuDNN's SDPA off for the peers of
        # workloads whose lengths vary (bench.runner.peer_attention), the Trainer's padded batches here are not (unmeasured)
        dev = pick_device(params.device)
        rows = []
        for name in stacks:
            clean(dev.type)
            log(f"bench --experiment {exp.name}: {name} stack, {steps} steps of "
                f"{params.batch_size} x {params.gradient_accumulation_steps} on {dev} ({params.model_id}, {params.dtype})")
            allocated = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
            try:
                budget = next((r.get("peak_memory_gib") for r in rows if r["stack"] == "loralab"), None)
                row = _loralab_run_row(exp, root) if name == "loralab" else trainer_row(exp, root, log, budget)
            except (ConfigError, BenchError):
                raise
            except Exception as exc:  # noqa: BLE001 - one stack's failure is a row; the other stack still runs
                row = _failed_row(name, exc)
            row["allocated_gib_at_start"] = gib(allocated)  # left over from the stack before (should be ~0)
            rows.append(row)
            log(format_experiment_row(row))
        clean(dev.type)
        by = {r["stack"]: r for r in rows}
        plan = None
        if "loralab" in by and "trainer" in by:
            plan = peer_memory_budget(by["loralab"], by["trainer"],
                                      torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 0)
            log(f"bench --experiment {exp.name}: {AT_PEER_MEMORY}: {plan['reason']}")
        if plan and plan["run"]:
            capped_root = root / "at-trainer-memory"
            allocated = torch.cuda.memory_allocated(dev)  # anything left over is in the probe's peaks: budget it
            capped = bench_copy(path, capped_root, steps=steps, random_weights=random_weights, task=task, device=device,
                                speed={**(speed or {}), "memory_fraction": min(1.0, plan["memory_fraction"]
                                       + allocated / torch.cuda.get_device_properties(dev).total_memory)})
            try:
                row = {**_loralab_run_row(capped, capped_root), "stack": AT_PEER_MEMORY}
            except Exception as exc:  # noqa: BLE001 - recorded as a failed row, as above
                row = _failed_row(AT_PEER_MEMORY, exc)
            row["allocated_gib_at_start"] = gib(allocated)
            rows.append(row)
            by[AT_PEER_MEMORY] = row
            log(format_experiment_row(row))
            clean(dev.type)
    ratio = at_memory = None
    if "loralab" in by and "trainer" in by and by["loralab"]["tokens_per_second"] and by["trainer"]["tokens_per_second"]:
        ratio = by["loralab"]["tokens_per_second"] / by["trainer"]["tokens_per_second"]
        capped = by.get(AT_PEER_MEMORY, by["loralab"])  # loralab's default run when it already fit
        if capped.get("tokens_per_second") and plan is not None and (plan["run"] or plan["fits"]):
            at_memory = {"stack": capped["stack"], "ratio": capped["tokens_per_second"] / by["trainer"]["tokens_per_second"],
                         "peak_memory_gib": capped["peak_memory_gib"], "trainer_peak_memory_gib": by["trainer"]["peak_memory_gib"],
                         "within": capped["peak_memory_gib"] <= by["trainer"]["peak_memory_gib"]}
    return {"experiment": exp.name, "source": str(path), "model_id": params.model_id, "random_weights": random_weights,
            "task": params.task, "dtype": params.dtype, "steps": steps,
            "batch_size": params.batch_size, "gradient_accumulation_steps": params.gradient_accumulation_steps,
            "optimizer_batch": params.batch_size * params.gradient_accumulation_steps, "max_length": params.max_length,
            "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "speed": speed,
            "rows": rows, "ratio": ratio, "best_peer": "trainer" if ratio else None, "ratio_best_peer": ratio,
            "at_trainer_memory_plan": plan, "at_trainer_memory": at_memory}


def format_experiment_row(row: dict) -> str:
    """One stack's row of ``run_experiment_bench`` as the one progress line it logs."""
    tps = "—" if row.get("tokens_per_second") is None else f"{row['tokens_per_second']:,.0f} tokens/s"
    mem = "—" if row.get("peak_memory_gib") is None else f"{row['peak_memory_gib']:.1f} GiB"
    return (f"{row['stack']:<8} {row['samples']:>6} samples {row['tokens']:>9,} tokens {tps:>18} {mem:>10} "
            f"warm-up {row.get('warmup_seconds') or 0:.1f} s" + (f"  FAILED {row['error']}" if row.get("error") else ""))


def experiment_table(result: dict) -> str:
    """Markdown table of ``run_experiment_bench``'s result (one row per stack, ratio on loralab's)."""
    head = (f"{result['experiment']}: {result['model_id']} ({result['dtype']}"
            f"{', random weights' if result['random_weights'] else ''}), task {result['task']}, "
            f"{result['steps']} steps x {result['batch_size']} x {result['gradient_accumulation_steps']} = "
            f"{result['steps'] * result['optimizer_batch']} samples, max_length {result['max_length']}, "
            + "".join(f"speed.{k} {v} (loralab), " for k, v in (result.get("speed") or {}).items()) +
            f"{result['gpu'] or result['device']}")
    lines = [head, ("steady state: `loralab run`'s own (steps after the first that captured no new CUDA graph: "
                    "compile, capture and the micro-batch probe are warm-up); Trainer: steps 2..N (step ends "
                    "synchronised). Peak memory: torch.cuda.max_memory_allocated over training."), "",
             "| stack | samples | real tokens | steady steps | steady tokens/s | steady samples/s | peak memory | warm-up | step-1 loss | micro-batch | loralab/trainer |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        tps = "—" if r.get("tokens_per_second") is None else f"{r['tokens_per_second']:,.0f}"
        sps = "—" if r.get("samples_per_second") is None else f"{r['samples_per_second']:,.2f}"
        mem = "—" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f} GiB"
        loss = f"{r['losses'][0]:.4f}" if r.get("losses") else "—"
        ratio = f"{result['ratio']:.2f}x" if r["stack"] == "loralab" and result.get("ratio") else ""
        if r["stack"] == AT_PEER_MEMORY and result.get("at_trainer_memory"):
            ratio = f"{result['at_trainer_memory']['ratio']:.2f}x"
        name = {"loralab": "`loralab run`", AT_PEER_MEMORY: "`loralab run` within the Trainer's peak"}.get(
            r["stack"], "transformers Trainer + peft (tuned)")
        micro = "" if r.get("micro_batch") is None else str(r["micro_batch"]) + (
            f" x {r['gradient_accumulation_steps']}" if r.get("gradient_accumulation_steps") else "")
        lines.append(f"| {name} | {r['samples']} | {r['tokens']:,} | {r.get('steady_steps')} | {tps} | {sps} | {mem} | "
                     f"{r.get('warmup_seconds') or 0:.1f} s | {loss} | {micro} | {ratio} |")
    lines += [f"{r['stack']} failed: {r['error']}" for r in result["rows"] if r.get("error")]
    plan = result.get("at_trainer_memory_plan")
    if plan:
        lines.append(f"{AT_PEER_MEMORY}: {plan['reason']}" + (f" -> probe budget {plan['budget_gib']:.2f} GiB "
                     f"(speed.memory_fraction {plan['memory_fraction']:.4f})" if plan["run"] else ""))
    return "\n".join(lines)
