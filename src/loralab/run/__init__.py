"""The run path behind ``loralab run``: build -> step -> loop -> save -> evaluate -> record.

- ``build`` (``run.build``): the model, the task data, the method's adapter (``calibrate`` for
  data-driven inits), the method's optimizer and the schedule; on ``--resume``, the newest
  matching checkpoint (``run.record.find_resume``).
- ``make_step`` (``run.step``): speed settings resolved, the model prepared and (more than one
  process) wrapped, the micro-batch settled; the ``Step`` (micro-batching, exact loss
  normalisation, packing, CUDA graphs).
- ``loop`` (``run.loop``): the optimizer steps, logging, evaluation and checkpoints every N steps.
- save first, evaluate second: adapter and tokenizer are on disk before any evaluation, which
  runs in the precision training used; then a checkpoint marks training complete, so that a
  ``--resume`` after a stop in the evaluation does not train again.
- evaluate (``run.evaluation``): one evaluation at a time; a signal stops after the current one,
  and ``--resume`` reuses those that finished on the same adapter.
- record (``run.record``): one result file for every ending, returned as an ``Outcome``.

Under ``torchrun`` / ``accelerate launch`` (``loralab.distributed``) every rank builds the model and
runs the same loop over the same optimizer batches, each on its shard (``Step``); every rank
evaluates; rank 0 alone logs and writes checkpoints, the adapter and the result.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

from loralab import checkpoint, distributed, results
from loralab.config import ConfigError
from loralab.data import pad_id as _pad_id
from loralab.experiment import Experiment
from loralab.methods.common import embeddings_trained
from loralab.methods.qlora import write_base_record
from loralab.models import portable_model_id
from loralab.run import build, evaluation, loop
from loralab.run.build import (
    Built,
    count_trainable,
    init_tensors,
    make_scheduler,
    output_dir,
    output_root,
    seed_everything,
)
from loralab.run.meter import Meter
from loralab.run.record import (
    FINISHED,
    Cancelled,
    Diverged,
    Lifecycle,
    Outcome,
    Record,
    calibration_entry,
    config_of,
    error_info,
    find_resume,
)
from loralab.run.step import make_step
from loralab.speed.step import autocast_context, budget_partitions, partitions_since
from loralab.trackers import Trackers

__all__ = ["run_experiment", "Outcome", "output_dir"]


def _quiet(line: str) -> None:
    """Ranks other than 0 log nothing."""


def _shown(path: Path) -> str:
    """A path as the user reads it beside the run's other paths: relative to the working folder
    when it lies under it, else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _dropped(provenance: dict, max_length: int) -> str:
    """The opening line's clause on training rows the tokenisation dropped (``dropped_without_target``: the
    prompt filled all ``max_length`` tokens, so truncation cut off the whole target and nothing was left to learn);
    "" where none was."""
    dropped = provenance.get("dropped_without_target") or 0
    if not dropped:
        return ""
    rows = dropped + (provenance.get("train_examples") or 0)
    return (f"; {dropped} of {rows} training rows dropped: their target falls beyond max_length = {max_length} tokens "
            "after truncation (the prompt fills them), leaving nothing to learn; raise 'max_length' to keep them")


def _say(line: str) -> None:
    print(f"[loralab] {line}", file=sys.stderr, flush=True)


def run_experiment(exp: Experiment, verbose: bool = False, resume: bool = False, evaluate: bool = True) -> Outcome:
    """Train and evaluate one experiment; returns its ``Outcome`` (status, result record, path, error).

    ``evaluate`` False skips the final evaluation (``loralab bench --experiment`` times training only).
    Every ending writes a record and is returned, not raised; bad input raises ConfigError before
    anything is written, and a record that fails validation raises ``results.InvalidRecord``.
    """
    params = exp.params
    launch = distributed.current()
    say = _say if launch.is_main else _quiet
    # peft asks transformers a deprecated question on every model it wraps; not ours to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    start = time.perf_counter()
    created_at = distributed.broadcast_object(results.now_iso())  # one output folder for all ranks
    git = results.git_state(experiment=exp.path)  # the tree the code runs from
    out_root = output_root()
    run_dir, resume_from = find_resume(exp, out_root) if resume else (None, None)
    if resume and resume_from is None:
        say("--resume: no checkpoint of this experiment yet; starting from the beginning")
    elif resume_from is not None and (writer := checkpoint.read_state(resume_from).get("experiment_path")) not in (
            None, str(exp.path.resolve())):
        say(f"--resume: the checkpoint was written by the experiment folder {writer} (the same name and configuration: "
            "taken as this one, moved)")
    out_dir = run_dir or output_dir(exp, created_at)
    ckpt_root = out_dir / "checkpoints"
    life = Lifecycle(log=say)
    record = Record(created_at=created_at, start=start, checkpoint=str(resume_from) if resume_from else None,
                    resumed_from=str(resume_from) if resume_from else None)
    error, evals = None, []  # evals: the final evaluations, named once the run is built
    trackers = Trackers()  # none until built; ranks other than 0 keep none
    with life:
        try:
            seed_everything(params.seed)
            resume_state = checkpoint.read_state(resume_from) if resume_from else None
            init_state = ckpt_root / checkpoint.INIT_STATE
            built = build.build(exp, life,
                                init_state=init_state if resume_state and resume_state.get("init_state") else None,
                                trainable_names=resume_state.get("trainable_names") if resume_state else None)
            record.method, record.cfg, record.provenance = built.named or built.method, built.cfg, built.data.provenance
            record.init_adapter = _init_adapter(exp, built, resume_state)
            # the run's init happened in its first process: a resumed one (which may skip it) carries its cost over
            record.init_cost = (resume_state or {}).get("init_cost") or built.method.init_cost
            calibration = (resume_state or {}).get("calibration") or built.calibration  # the same: the first's
            record.provenance = {**record.provenance, **calibration_entry(calibration, record.method.NAME,
                                                                          params.init_adapter, resume_state)}
            if launch.is_main:
                trackers = Trackers.open(params, out_dir, config_of(exp), (resume_state or {}).get("step", 0))
            evals = evaluation.names(built.task, params) if evaluate else []
            counted = evaluation.counts(built.task, built.data, params, evals)
            n_eval = sum(counted.values())
            say(f"{exp.name}: {params.model_id} ({params.dtype}) on {params.task} "
                f"({len(built.data.train)} train / {n_eval} eval examples), method {record.method.NAME}"
                + (f" from the adapter in {_shown(params.init_adapter)} (no init runs)" if params.init_adapter else "")
                + f", device {built.device}; adapter -> {_shown(out_dir / 'adapter')}, result -> "
                f"{_shown(results.route('success', git))}/ on success ({results.route_reason(git)})"
                + _dropped(built.data.provenance, params.max_length)
                + ("; the classification head starts from random weights and trains with the adapter"
                   if built.task.kind == "seq_cls" else "")
                + ("; an FP8 base on the CPU runs torch's reference _scaled_mm, slower than float matmuls (FP8 pays on "
                   "GPUs with FP8 tensor cores)" if params.quantization == "fp8" and built.device.type == "cpu" else ""))
            state, save_checkpoint = _train(exp, built, life, say, trackers, record, ckpt_root, resume_from, verbose)
            with life.enter("save"):
                _save(built, out_dir / "adapter", record, params.model_id)
                say(f"adapter saved to {_shown(out_dir / 'adapter')}")
                adapter_sha = evaluation.adapter_sha256(out_dir / "adapter") if evals and launch.is_main else None
                if evals and not state.get("trained"):  # training complete: a --resume evaluates, it does not train
                    state["trained"] = {"adapter_sha256": adapter_sha}
                    save_checkpoint(state["step"])
                life.stop_if_requested()  # a signal while saving
            if evaluate and not evals:
                say("no evaluation: " + ("eval_tasks is [] (leave the key out for the task's default evaluations)"
                                         if params.eval_tasks == [] else f"task {params.task} has none by default (set eval_tasks)"))
            elif evals:
                with life.enter("evaluate"):
                    t0 = time.perf_counter()
                    metrics = evaluation.run(
                        evals, counted, lambda name, folder: _evaluate(built, evaluation.narrowed(built.task, params, name), folder),
                        root=ckpt_root, out_dir=out_dir, adapter_sha=adapter_sha, life=life, record=record, trackers=trackers,
                        say=say)
                    record.timing["final_eval_s"] = time.perf_counter() - t0
                    record.history.append({"step": record.step, "train samples": record.samples,
                                           **{f"final {k}": v for k, v in metrics.items()}})
        except ConfigError:
            raise
        except KeyboardInterrupt as exc:  # Cancelled (our handlers) or a plain one (raised by another handler)
            cancelled = isinstance(exc, Cancelled)
            record.end("cancelled", {"type": type(exc).__name__, "message": (str(exc) if cancelled else "") or "SIGINT",
                                     "phase": life.phase})
            error = exc if cancelled else Cancelled("SIGINT")
            if record.evaluations is None and evals:  # stopped before the evaluation: none of them ran
                record.evaluations = {"ran": [], "reused": [], "not_run": list(evals)}
            if life.phase == "evaluate" and record.evaluations:
                done = [n for n in evals if n not in record.evaluations["not_run"]]
                left = record.evaluations["not_run"]
                say(f"stopped in the evaluation: {', '.join(done) or 'none'} finished (their metrics are in the record)"
                    + (f"; not run: {', '.join(left)} (--resume runs those alone)" if left else ""))
        except Diverged as exc:
            last = checkpoint.list_checkpoints(ckpt_root)
            record.end("diverged", {**error_info(exc, life.phase), "step": exc.step,
                                    "last_good_checkpoint": str(last[-1]) if last else None})
            error = exc
        except Exception as exc:  # noqa: BLE001 - every ending gets a record and is returned
            record.end("failed", error_info(exc, life.phase))
            error = exc
        finally:
            trackers.close(record.status)
    result = record.result(exp, git)
    path = results.write_result(result, git) if launch.is_main else None
    if record.status == "success" and launch.is_main and ckpt_root.is_dir():
        (ckpt_root / FINISHED).write_text(json.dumps({"result": str(path)}))  # --resume: nothing left
    return Outcome(record.status, result, path, error)


def _init_adapter(exp: Experiment, built: Built, resume_state: dict | None) -> dict | None:
    """The saved adapter the run started from (``Built.init_adapter``), the first process's on a ``--resume``;
    raises ConfigError where the folder's weights are no longer those the run started from."""
    first = (resume_state or {}).get("init_adapter")
    if first and built.init_adapter and first["sha256"] != built.init_adapter["sha256"]:
        raise ConfigError([f"--resume: 'init_adapter' = {exp.params.init_adapter!r} changed since the run began: its "
                           f"{first['weights']} had sha256 {first['sha256'][:12]}..., now {built.init_adapter['sha256'][:12]}... "
                           "(a new decomposition writes a new residual model too); restore it, or run without --resume "
                           "to start afresh"], str(exp.path))
    return first or built.init_adapter


def _train(exp: Experiment, built: Built, life: Lifecycle, say, trackers: Trackers, record: Record, ckpt_root: Path,
           resume_from: Path | None, verbose: bool):
    """Make the step, restore a checkpoint, run the loop; the record learns what happened. Returns the
    checkpoint state and ``save_checkpoint(step)``, which writes it with the weights."""
    params, model, launch = exp.params, built.model, distributed.current()
    record.trainable, record.total_steps = count_trainable(model), built.total_steps
    opt_batch = params.batch_size * params.gradient_accumulation_steps
    partitions = budget_partitions()  # before the step: its micro-batch probe may compile the layers
    step_fn, speed = make_step(
        model, built.optimizer, speed=params.speed, kind=built.task.kind, dtype=params.dtype, device=built.device,
        features=built.data.train, batch_size=params.batch_size, limit=opt_batch, max_length=params.max_length,
        pad_id=_pad_id(built.tokenizer), normalization=params.loss_normalization,
        pad_to=params.max_length if params.pad_to_max_length else None, max_grad_norm=params.max_grad_norm,
        launch=launch, rewrites_base=built.method.NAME if built.saver is not None else None,
        remake_optimizer=lambda: built.make_optimizer(params), log=say)
    built.wrapped = step_fn.wrapped
    if step_fn.optimizer is not built.optimizer:  # FSDP: remade over the sharded parameters
        built.optimizer, built.scheduler = step_fn.optimizer, make_scheduler(step_fn.optimizer, params, built.total_steps)
    if resume_from is not None:
        state = checkpoint.load(resume_from, model=model, optimizer=built.optimizer, scheduler=built.scheduler)
        if launch.is_main:
            checkpoint.prune(ckpt_root, params.keep_checkpoints)
        say(f"resumed from {resume_from} (step {state['step']} of {built.total_steps})"
            + ("; training had finished: the final adapter is restored, not trained again" if state.get("trained") else ""))
        record.first_step, record.train_time_start = state["step"], state["train_time"]
        record.earlier = state.get("parts") or [{  # a checkpoint written before checkpoints kept the run's parts
            "created_at": None, "total_time": state["train_time"], "train_time": state["train_time"],
            "steps": [0, state["step"]], "evaluations": [], "note": "its wall time was not kept: its train time stands in"}]
    else:
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "tokens": 0, "history": [],
                 "running": [], "train_time": 0.0, "warmup_time": 0.0, "steady_time": 0.0, "steady_tokens": 0,
                 "steady_samples": 0}
        if built.saver is not None and hasattr(built.saver, "initial"):
            if launch.is_main:
                checkpoint.save_init_state(ckpt_root, init_tensors(model))  # resume without redoing the decomposition
            state["init_state"] = True
    state.update(train_params_sha=exp.train_params_sha, peft_config_sha=exp.peft_config_sha, config=config_of(exp),
                 init_cost=record.init_cost, calibration=record.provenance.get("calibration"),
                 init_adapter=record.init_adapter,
                 experiment_path=str(exp.path.resolve()),  # find_resume: this folder's checkpoints, not a namesake's
                 trainable_names=[n for n, p in model.named_parameters() if p.requires_grad])
    if resume_from is not None:
        checkpoint.load_rng(resume_from)  # last: nothing between here and the next step draws
    meter = Meter(built.device, state)
    record.meter, record.speed = meter.memory, speed.record()
    trackers.log_config({"resolved": {"method": built.method.NAME, "total_steps": built.total_steps,
                                      "trainable_params": record.trainable, "speed": record.speed}}, state["step"])

    def save_checkpoint(step: int) -> None:
        if launch.distributed and launch.sharding == "fsdp":
            return  # not written under FSDP (logged at start)
        if launch.is_main:  # DDP: every rank holds the same weights and optimizer state
            state["parts"] = record.parts(step, state["train_time"])  # the run's time so far, for a --resume
            record.checkpoint = str(checkpoint.save(ckpt_root, step, model=model, optimizer=built.optimizer,
                                                    scheduler=built.scheduler, state=state, keep=params.keep_checkpoints))
        distributed.barrier()

    def evaluate_now(step: int) -> dict:
        metrics = _evaluate(built, params, None)
        trackers.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        model.train()
        return metrics

    try:
        loop.train(exp.name, params, built, step_fn, state, life=life, meter=meter, trackers=trackers,
                   evaluate=evaluate_now, save_checkpoint=save_checkpoint, say=say, verbose=verbose)
    finally:
        record.step, record.history, record.samples = state["step"], state["history"], state["samples"]
        record.tokens, record.train_time = state["tokens"], state["train_time"]
        record.timing.update(meter.timing(), micro_batch=step_fn.micro_batch, oom_retries=step_fn.oom_retries,
                             cuda_graphs=step_fn.trainer.graphs)
        if speed.compile and speed.activation_memory_budget < 1:  # did torch's budgeted partition hold?
            record.timing["activation_memory_budget_partitions"] = partitions_since(partitions)
        record.launch = launch.record(step_fn.micro_batch, opt_batch)
    return state, save_checkpoint


def _save(built: Built, path: Path, record: Record, model_id: str) -> None:
    """The adapter (or full model) and tokenizer; only trained tensors (no frozen embedding copies).
    The adapter's ``base_model_name_or_path`` is the model id the experiment gave
    (``models.portable_model_id``: a hub id or ``packaged:<name>``), not a path inside this
    machine's virtual environment or cache, so the adapter travels."""
    model = built.model
    portable = portable_model_id(model_id)
    for cfg in getattr(model, "peft_config", {}).values():
        cfg.base_model_name_or_path = portable
    gathered = {}
    if distributed.is_sharded(built.wrapped):  # FSDP: a collective, then rank 0 writes
        gathered = {"state_dict": distributed.full_state_dict(built.wrapped)}
    if not distributed.is_main():
        return
    # peft's model card (the adapter's README.md) names the base from the model's config and its
    # name_or_path (a tag): the same id there, restored after saving
    hf = model.get_base_model() if hasattr(model, "peft_config") else None
    config = getattr(hf, "config", None)
    loaded_from = (getattr(config, "_name_or_path", None), getattr(hf, "name_or_path", None))
    if config is not None:
        config._name_or_path = hf.name_or_path = portable
    try:
        if built.saver is not None:
            built.saver.save(model, path)
        elif hasattr(model, "peft_config"):
            model.save_pretrained(path, save_embedding_layers=embeddings_trained(model), **gathered)
        else:
            model.save_pretrained(path, **gathered)
    finally:
        if config is not None:
            config._name_or_path, hf.name_or_path = loaded_from
    if hasattr(model, "peft_config"):  # the base it trained on (float / NF4), for an exact `loralab merge`
        write_base_record(model, path)
    built.tokenizer.save_pretrained(path)
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    record.adapter_path = str(path)
    record.file_size = sum(p.stat().st_size for p in weights)


def _evaluate(built: Built, params, out_dir) -> dict:
    """The task's metrics, in the precision training used (the model's autocast). More than one
    process: every rank evaluates (generation loops split their batches over DDP ranks with
    ``distributed.share``); rank 0 alone writes files."""
    out_dir = out_dir if distributed.is_main() else None
    with torch.no_grad(), autocast_context(built.model, built.device.type), distributed.gathered(built.wrapped):
        return built.task.evaluate(built.model, built.tokenizer, built.data, params, out_dir)

