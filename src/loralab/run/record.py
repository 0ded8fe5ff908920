"""A run's context and its record: phases, signals, every ending as a value, resume, the result.

Endings (``train_info.status`` of the record): ``success``; ``failed`` (an exception: its type,
message, traceback tail and the phase it came from: build, calibrate, train, save, evaluate);
``cancelled`` (SIGINT or SIGTERM); ``diverged`` (a non-finite loss or weight). ``run_experiment``
returns every ending as an ``Outcome`` value; ``loralab run`` maps it to its exit code.

Signals: loralab installs its own handlers whatever the inherited disposition (a job started in
the background, under nohup or by a scheduler may inherit SIGINT as *ignored*, and Python then
installs no KeyboardInterrupt handler at all). The first signal is acknowledged on stderr and asks
the run to stop at the next point where nothing is lost (``Lifecycle.DEFERRED``): in training after
the current optimizer step (a checkpoint, then a ``cancelled`` record), while saving once the
adapter and the checkpoint marking training complete are written, in the final evaluation after the
current evaluation (the finished ones' metrics go into the record). A second one, or a signal while
building, interrupts at once (``Cancelled``, a KeyboardInterrupt caught by the run and turned into
its ``cancelled`` outcome).

Resume: ``find_resume`` picks the newest checkpoint whose configuration hashes match. A run that
goes on over several processes (interrupted, then ``--resume``) counts its time over all of them:
each checkpoint and each finished evaluation carries the run's ``parts`` so far (``Record.parts``),
and the record's ``total_time`` and ``train_time`` are their sums.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from loralab import checkpoint, distributed, results
from loralab.config import ConfigError
from loralab.experiment import Experiment
from loralab.models import model_provenance

PHASES = ("build", "calibrate", "train", "save", "evaluate")
FINISHED = "finished.json"
"""Written into a successful run's checkpoint folder: ``--resume`` has nothing left to do."""


class Cancelled(KeyboardInterrupt):
    """SIGINT or SIGTERM received; the message is the signal's name."""


class Diverged(RuntimeError):
    """A non-finite loss or trainable weight; ``step`` is the first step seen non-finite."""

    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(f"{what} at step {step}")


class Lifecycle:
    """Tracks the phase and the stop request; use as a context manager around a run (it installs
    the SIGINT/SIGTERM handlers on the main thread and restores the previous ones on exit)."""

    DEFERRED = {  # phase -> where its first signal stops (the phase's code checks ``stop_requested``)
        "train": "after this step (checkpoint, then a cancelled record)",
        "save": "once the adapter is saved (then a cancelled record)",
        "evaluate": "after this evaluation (the finished evaluations' metrics go into a cancelled record; "
                    "--resume runs the others)",
    }

    def __init__(self, log=print):
        self.phase = "build"
        self.stop_requested: str | None = None
        self.log = log
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase in self.DEFERRED and self.stop_requested is None:
            self.stop_requested = name
            self.log(f"{name}: stopping {self.DEFERRED[self.phase]}; again to stop at once")
            return
        raise Cancelled(name)

    def stop_if_requested(self) -> None:
        """Raise ``Cancelled`` where a signal asked to stop (every rank alike: a collective under torchrun)."""
        if distributed.any_rank(self.stop_requested is not None):
            raise Cancelled(self.stop_requested or "SIGTERM")

    @contextlib.contextmanager
    def enter(self, phase: str):
        """Mark the phase a failure would be attributed to (one of ``PHASES``)."""
        assert phase in PHASES, phase
        previous, self.phase = self.phase, phase
        yield  # an exception leaves self.phase at the failing phase, for the record
        self.phase = previous


def error_info(exc: BaseException, phase: str, lines: int = 25) -> dict:
    """The ``train_info.error`` entry of a failed record: type, message (first 2,000 characters),
    phase and the last ``lines`` lines of the traceback."""
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tail).rstrip().splitlines()
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "phase": phase,
            "traceback": "\n".join(text[-lines:])}


@dataclass
class Outcome:
    """How a run ended, as a value: ``status`` (success, failed, cancelled, diverged), the result
    record written, its path (None on ranks other than 0) and, unless it succeeded, the error
    (``Cancelled`` for a cancelled run)."""

    status: str
    result: dict
    path: Path | None
    error: BaseException | None = None

    def unwrap(self) -> tuple[dict, Path | None]:
        """(result record, path) of a successful run; raises the run's error otherwise (with
        ``result_path`` set on it), for callers that want an exception."""
        if self.error is not None:
            self.error.result_path = self.path
            raise self.error
        return self.result, self.path


def config_of(exp: Experiment) -> dict:
    """The effective configuration recorded in results and checkpoints."""
    return {"training_parameters": exp.params.to_dict(),
            "adapter_config": exp.peft_config.to_dict() if exp.peft_config is not None else None}


def calibration_entry(calibration: dict | None, method_name: str, init_adapter: str | None,
                      resume_state: dict | None = None) -> dict:
    """``meta_info.dataset``'s calibration keys: ``calibration``, where the calibration rows came from (an in-process
    init's ``MethodContext.calibration_provenance``, or a decomposition's for a run from its adapter:
    ``init_adapter.calibration_provenance``); where none ran, ``calibration`` null and ``calibration_note`` saying so
    and why. A record keeps the full training parameters (seed 004's format), so their ``calibration`` block (256
    samples, seqlen 2048 by default) is there either way: the note says nothing read it."""
    if calibration:
        return {"calibration": calibration}
    if resume_state is not None and "calibration" not in resume_state:
        why = "the run resumed from a checkpoint that does not record its first process's calibration"
    elif init_adapter is not None:
        why = (f"the run started from the adapter in 'init_adapter' = {init_adapter!r} (no init runs), whose base "
               "records no decomposition (decompose.json)")
    else:
        why = f"method {method_name}'s init reads no data"
    return {"calibration": None, "calibration_note": f"no calibration ran: {why}; the 'calibration' block of "
                                                     "run_info.config.training_parameters was not used"}


def find_resume(exp: Experiment, out_root: Path) -> tuple[Path | None, Path | None]:
    """(run output dir, checkpoint) of the newest checkpoint of this experiment whose configuration
    hashes match; (None, None) when there is none. Raises ConfigError naming the changed keys when this folder's
    checkpoints exist but none matches, or when the newest matching run already finished.

    Which output folders are this experiment's: those whose newest checkpoint records this folder's absolute path
    (``experiment_path``), or none (written before checkpoints recorded it). Two folders of one name
    (``experiment_name`` outside an ``experiments`` folder is the last folder's name, e.g. two ``seed0``) share
    their output folders' prefix, and one must not be refused by the other's checkpoint. Where only other paths
    wrote checkpoints of this name, those whose configuration hashes match are taken (the same experiment, its
    folder moved, re-cloned or mounted elsewhere: the caller says so); with none matching, none is this
    experiment's, and the run starts afresh."""
    stem = exp.name.replace("/", "--") + "--"
    here = str(exp.path.resolve())
    own, others = [], []
    for run_dir in out_root.glob(stem + "*") if out_root.is_dir() else []:
        ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")  # oldest first
        if ckpts:
            writer = checkpoint.read_state(ckpts[-1]).get("experiment_path")
            (own if writer in (None, here) else others).extend((c.stat().st_mtime, run_dir, c) for c in ckpts)

    def matches(ckpt: Path) -> bool:
        state = checkpoint.read_state(ckpt)
        return state.get("train_params_sha") == exp.train_params_sha and state.get("peft_config_sha") == exp.peft_config_sha

    found = own or [t for t in others if matches(t[2])]
    if not found:
        return None, None
    found.sort(key=lambda t: t[0])
    for _, run_dir, ckpt in reversed(found):
        if matches(ckpt):
            done = run_dir / "checkpoints" / FINISHED
            if done.exists():
                raise ConfigError([f"--resume: the newest run of this experiment ({run_dir}) already finished; its result is "
                                   f"{json.loads(done.read_text()).get('result')}. Run without --resume to train it again."],
                                  str(exp.path))
            return run_dir, ckpt
    newest = checkpoint.read_state(found[-1][2])
    changes = checkpoint.config_changes(newest.get("config", {}), config_of(exp))
    raise ConfigError([f"--resume: the configuration changed since checkpoint {found[-1][2]}; changed keys: "
                       + ("; ".join(changes) or "(hash differs)")
                       + ". Restore them, or run without --resume to start afresh."], str(exp.path))


@dataclass
class Record:
    """What a run learns about itself, filled as it goes; ``result`` turns it into the result
    record (``loralab.results`` schema) once, at the end."""

    created_at: str = ""
    start: float = field(default_factory=time.perf_counter)
    """This process's ``time.perf_counter()`` at its beginning."""
    earlier: list = field(default_factory=list)
    """The parts of the run that earlier processes ran (``--resume``), as the newest checkpoint or
    finished evaluation this one continues recorded them (``parts``)."""
    first_step: int = 0
    train_time_start: float = 0.0
    """The step and the run's train time where this process took over."""
    init_cost: dict | None = None
    """The adapter init's cost (``Method.init_cost``), carried over checkpoints by a resumed run."""
    init_adapter: dict | None = None
    """The saved adapter the run started from (training_parameters ``init_adapter``; ``init_adapter.provenance``:
    path, weights' sha256, ...), carried over checkpoints; None where the method's init made the adapter."""
    evaluations: dict | None = None
    """The final evaluation's names: ``ran`` (in this process), ``reused`` (finished by an earlier
    process on the same adapter), ``not_run`` (a stop or a failure came first)."""
    checkpoint: str | None = None
    resumed_from: str | None = None
    status: str = "success"
    error: dict | None = None
    step: int = 0
    history: list = field(default_factory=list)
    final: dict = field(default_factory=dict)
    adapter_path: str | None = None
    file_size: int | None = None
    train_time: float = 0.0
    samples: int = 0
    tokens: int = 0
    speed: dict = field(default_factory=dict)
    """The resolved speed settings (no "auto" left)."""
    timing: dict = field(default_factory=dict)
    total_steps: int | None = None
    trainable: int | None = None
    method: object = None
    cfg: object = None
    provenance: dict = field(default_factory=dict)
    meter: object = None
    """The run's ``MemoryMeter`` (its summary goes into ``train_info``)."""
    launch: dict | None = None

    def end(self, status: str, error: dict | None = None) -> None:
        """Set the ending (``success``, ``failed``, ``cancelled``, ``diverged``) and its error entry."""
        self.status, self.error = status, error

    def parts(self, step: int, train_time: float) -> list[dict]:
        """The run's parts up to now, one per process, this one last (at ``step``, with the run's
        ``train_time`` so far): each its ``created_at``, ``total_time`` and ``train_time`` (seconds, up to the
        last checkpoint or finished evaluation it left), ``steps`` [from, to] and the evaluations it ran.
        Written into every checkpoint and finished evaluation, so that a resumed run counts them."""
        ran = (self.evaluations or {}).get("ran", [])
        memory = self.meter.summary() if self.meter is not None else {}
        return [*self.earlier, {"created_at": self.created_at, "total_time": time.perf_counter() - self.start,
                                "train_time": train_time - self.train_time_start, "steps": [self.first_step, step],
                                "evaluations": list(ran),
                                "peak_memory": memory.get("cuda_memory_max", memory.get("peak_rss"))}]

    def result(self, exp: Experiment, git: dict) -> dict:
        """The result record: run_info, train_info, eval, meta_info. ``total_time`` and ``train_time``
        count the whole run (seconds): over several processes (``--resume``), ``run_info.resumed`` lists
        the parts they sum (``parts``); a run in one process has ``resumed`` null."""
        params = exp.params
        parts = self.parts(self.step, self.train_time)
        timing = self.timing
        steady = timing.get("steady_s") or 0.0
        method = self.method
        train_info = {
            "status": self.status,
            "train_time": self.train_time,
            "steps": self.step,
            "total_steps": self.total_steps,
            "trainable_params": self.trainable,
            "file_size": self.file_size,
            "adapter_path": self.adapter_path,
            "checkpoint": self.checkpoint,
            "resumed_from": self.resumed_from,
            "train_samples": self.samples,
            "train_tokens": self.tokens,
            "tokens_per_second": timing.get("steady_tokens", 0) / steady if steady else None,
            "samples_per_second": timing.get("steady_samples", 0) / steady if steady else None,
            "warmup_time": timing.get("warmup_s"),
            "timing": timing,
            "speed": dict(self.speed),
            "loss_normalization": params.loss_normalization,
            "distributed": self.launch or distributed.current().record(None),
            **_whole_run_peak(self.meter.summary() if self.meter is not None else {}, parts),
            "metrics": self.history,
        }
        if self.evaluations is not None:
            train_info["evaluations"] = self.evaluations
        if self.error is not None:
            train_info["error"] = self.error
        method_parts = getattr(method, "parts", None)
        return {
            "run_info": {
                "created_at": self.created_at,
                "total_time": sum(p["total_time"] for p in parts),
                "resumed": parts if self.earlier else None,
                "experiment_name": exp.name,
                "git": git,
                "train_params_sha": exp.train_params_sha,
                "peft_config_sha": exp.peft_config_sha,
                "method": method.NAME if method is not None else None,
                "method_parts": dict(method_parts) if method_parts else None,
                "init_cost": self.init_cost if self.init_cost is not None else getattr(method, "init_cost", None),
                **({"init_adapter": self.init_adapter} if self.init_adapter is not None else {}),
                "task": params.task,
                "seed": params.seed,
                "config": {
                    "training_parameters": params.to_dict(),
                    "adapter_config": self.cfg.to_dict() if self.cfg is not None else None,
                },
            },
            "train_info": train_info,
            "eval": self.final,
            "meta_info": {
                "model": model_provenance(params.model_id),
                "dataset": {"task": params.task, **self.provenance},
                "package_info": results.package_info(),
                "system_info": results.system_info(),
            },
        }


def _whole_run_peak(memory: dict, parts: list[dict]) -> dict:
    """``MemoryMeter.summary()`` of this process with its peak (``cuda_memory_max`` or ``peak_rss``, bytes) raised to
    the largest any part of the run reached (``parts``' ``peak_memory``): a resumed run's peak is the whole run's, not
    its last process's (a resumed SmolLM2 run recorded 0.62 GB where its first part had reached 2.29 GB)."""
    key = "cuda_memory_max" if "cuda_memory_max" in memory else "peak_rss" if "peak_rss" in memory else None
    peaks = [p["peak_memory"] for p in parts if isinstance(p.get("peak_memory"), int)]
    return {**memory, key: max([memory[key], *peaks])} if key and peaks else memory

