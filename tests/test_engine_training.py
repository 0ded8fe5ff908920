"""Generation as training and DDP use it, on the real SmolLM2-135M cut to its first 2 decoder layers
(``smollm2_cut_path``: real weights and tokenizer; what is compared does not depend on depth) and
real GSM8K rows (CPU):

- evaluating during training (``eval_steps`` 1: a GSM8K generation after every step) leaves a
  LoRA run with ``lora_dropout`` 0.1 bitwise as it is without evaluation (every logged loss and
  the saved adapter), for the engine and for the transformers backend: neither reads or advances
  the global random state that draws the dropout masks;
- under two gloo processes, ``generate`` (engine greedy and sampling with temperature > 0 and two
  samples per prompt, whose seeds follow each prompt's index in the whole call; transformers
  greedy) and ``run_eval`` on the engine (GSM8K greedy, BoolQ sampled) give the completions and
  metrics of one process, on an odd number of prompts so the ranks' shares are uneven.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from peft import LoraConfig
from safetensors.torch import load_file

from loralab import distributed


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core CPU, two OpenMP threads waiting on each other under load
    made the same generation 10-20x slower (measured 3 s -> 36-77 s); one thread stays at ~4 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- eval_steps leaves training unchanged ---------------------------------------------------------


def _train(root, name: str, data_dir, model_id: str, **extra) -> dict:
    """A 3-step LoRA SFT of the SmolLM2 cut (dropout 0.1), one GSM8K train row a step, no final evaluation;
    returns the per-step losses, the evaluations logged during training and the adapter."""
    from loralab.experiment import read_experiment
    from loralab.run import run_experiment

    folder = root / "experiments" / "eval-steps" / name
    folder.mkdir(parents=True)
    LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
               task_type="CAUSAL_LM").save_pretrained(folder)
    params = {"model_id": model_id, "task": "gsm8k", "data_dir": str(data_dir),
              "max_train_samples": 3, "max_length": 160, "batch_size": 1, "max_steps": 3,
              "learning_rate": 3e-3, "lr_scheduler": "constant", "weight_decay": 0.0, "logging_steps": 1,
              "eval_tasks": ["gsm8k"], "max_eval_samples": 2, "device": "cpu", "seed": 0, **extra}
    (folder / "training_parameters.json").write_text(json.dumps(params))
    record, _ = run_experiment(read_experiment(folder), evaluate=False).unwrap()
    metrics = record["train_info"]["metrics"]
    adapter = load_file(os.path.join(record["train_info"]["adapter_path"], "adapter_model.safetensors"))
    return {"losses": [m["train loss"] for m in metrics if "train loss" in m],
            "evals": [m for m in metrics if any(k.startswith("eval ") for k in m)], "adapter": adapter}


def _count_calls(monkeypatch, module, names: list[str]) -> list[str]:
    """The names of ``module``'s functions ``names`` in the order they are called from now on."""
    calls = []
    for name in names:
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.slow
def test_eval_steps_leaves_a_dropout_run_bitwise_unchanged(tmp_path, data_dir, monkeypatch, smollm2_cut_path):
    from loralab.tasks import generation

    calls = _count_calls(monkeypatch, generation, ["_generate_engine", "_generate_transformers"])
    off = _train(tmp_path, "off", data_dir, smollm2_cut_path)
    assert len(off["losses"]) == 3 and not off["evals"] and not calls
    for backend in ("engine", "transformers"):
        calls.clear()
        on = _train(tmp_path, backend, data_dir, smollm2_cut_path, eval_steps=1,
                    generation={"backend": backend, "max_new_tokens": 4, "batch_size": 2})
        # evaluated after steps 1 and 2 (the last step's evaluation is the final one, skipped here)
        assert [m["step"] for m in on["evals"]] == [1, 2], (backend, on["evals"])
        assert calls == [f"_generate_{backend}"] * 2, calls
        assert all(m["eval gsm8k/n"] == 2 for m in on["evals"]), on["evals"]
        assert on["losses"] == off["losses"], backend  # bitwise: every step's dropout masks as without evaluation
        assert on["adapter"].keys() == off["adapter"].keys()
        for key, value in off["adapter"].items():
            assert torch.equal(on["adapter"][key], value), (backend, key)


# -- two gloo processes generate what one does ----------------------------------------------------

N_PROMPTS = 7  # odd: rank 0 gets 4 prompts (engine) or 2 of 4 batches of 2 (transformers), rank 1 the rest
GREEDY = {"max_new_tokens": 6}
SAMPLED = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95, "n_samples": 2, "seed": 7}


def _model(path: str):
    """The SmolLM2 cut (fp32) with a LoRA whose B is random (init_lora_weights False) and scaled down to
    look trained, so the engine's merged copies
    change the outputs; the same weights in every process (seeded)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    # 2 of 30 layers (real weights): sharding over processes does not depend on depth, and each
    # process pays for the model's load and forwards (the full model made this the suite's 3rd-slowest test)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    return model, AutoTokenizer.from_pretrained(path)


def _generations(path: str, data_dir) -> dict:
    """Every generation this test compares, computed in this process (one rank or one of two)."""
    from loralab.tasks import evaluate as evals
    from loralab.tasks.generation import GenerationSettings, generate

    model, tokenizer = _model(path)
    ev = evals.EVALS["gsm8k"]
    prompts = [ev.build_prompt("gsm8k", p, evals.resolve_options("gsm8k", None))
               for p in ev.load("gsm8k", data_dir, N_PROMPTS)]
    out = {
        # 2 slots: finished sequences' slots are refilled (and each rank's share differs in size)
        "engine greedy": generate(model, tokenizer, prompts, GenerationSettings(backend="engine", slots=2, **GREEDY)),
        "engine sampled": generate(model, tokenizer, prompts, GenerationSettings(backend="engine", slots=3, **SAMPLED)),
        "transformers greedy": generate(model, tokenizer, prompts,
                                        GenerationSettings(backend="transformers", batch_size=2, **GREEDY)),
    }
    for name, generation in (("gsm8k", {"backend": "engine", **GREEDY}),
                             ("boolq", {"backend": "engine", "num_beams": 1, **SAMPLED})):  # its source: beams
        metrics, records = evals.run_eval(name, model, tokenizer, data_dir=data_dir, generation=generation,
                                          max_samples=N_PROMPTS)
        out[f"run_eval {name}"] = {"metrics": evals.numeric(metrics), "generation": metrics["generation"],
                                   "records": records}
    return out


def _worker(rank: int, world: int, port: int, path: str, data_dir, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as the one-process reference (``_one_thread``)
    distributed.init("cpu")
    try:
        torch.save(_generations(path, data_dir), f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_generate_and_evaluate_like_one(tmp_path, data_dir, smollm2_cut_path):
    # the two ranks start first: this process's one-thread reference runs while they import and load
    workers = mp.spawn(_worker, args=(2, _free_port(), smollm2_cut_path, data_dir, str(tmp_path)), nprocs=2, join=False)
    try:
        one = _generations(smollm2_cut_path, data_dir)
    finally:
        while not workers.join():
            pass
    assert [len(c) for c in one["engine greedy"]] == [1] * N_PROMPTS
    assert [len(c) for c in one["engine sampled"]] == [2] * N_PROMPTS
    assert one["engine sampled"] != one["engine greedy"]  # sampling drew something else somewhere
    assert one["run_eval gsm8k"]["metrics"]["n"] == one["run_eval boolq"]["metrics"]["n"] == N_PROMPTS
    print("one process:", {k: v["metrics"] for k, v in one.items() if k.startswith("run_eval")})
    assert len(one["run_eval boolq"]["records"]) == 2 * N_PROMPTS
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}.pt")
        assert two.keys() == one.keys()
        for key in one:
            assert two[key] == one[key], (rank, key)
