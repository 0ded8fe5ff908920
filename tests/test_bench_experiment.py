"""`loralab bench --experiment DIR`: one recipe through `loralab run` and through transformers'
Trainer + peft, on a tiny random-weight Llama shape with real GSM8K rows and SmolLM2's tokenizer."""

import json
from pathlib import Path

import pytest

from loralab.bench.experiment import bench_copy
from loralab.bench.workloads import random_model_id
from loralab.cli import main
from loralab.models import check_model_id, load_model, random_config

ADAPTER = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
           "target_modules": ["q_proj", "v_proj", "lm_head"], "task_type": "CAUSAL_LM"}


def make_experiment(root, model_id, **params):
    folder = root / "experiments" / "llm" / "tiny-math" / "lora"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(ADAPTER))
    recipe = {"model_id": model_id, "task": "gsm8k", "max_train_samples": 32, "batch_size": 2,
              "gradient_accumulation_steps": 2, "max_length": 256, "learning_rate": 1e-3, "lr_scheduler": "cosine",
              "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "eval_tasks": ["gsm8k"], **params}
    (folder / "training_parameters.json").write_text(json.dumps(recipe))
    return folder


@pytest.mark.slow
def test_bench_experiment_runs_both_stacks_on_the_same_samples(tmp_path, capsys):
    folder = make_experiment(tmp_path, "random:tiny-llama")
    out = tmp_path / "bench.json"
    assert main(["bench", "--experiment", str(folder), "--steps", "3", "--device", "cpu", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["experiment"] == "llm/tiny-math/lora" and result["optimizer_batch"] == 4 and result["steps"] == 3
    rows = {r["stack"]: r for r in result["rows"]}
    assert set(rows) == {"loralab", "trainer"}
    for r in rows.values():
        assert set(r) >= {"samples", "tokens", "tokens_per_second", "samples_per_second", "peak_memory_gib",
                          "warmup_seconds", "losses", "steady_tokens", "steady_seconds"}
        assert r["samples"] == 12 and r["tokens_per_second"] > 0 and len(r["losses"]) == 3
    # the very same samples (loralab run's order) went through both stacks
    assert rows["loralab"]["tokens"] == rows["trainer"]["tokens"]
    assert rows["loralab"]["steady_tokens"] == rows["trainer"]["steady_tokens"]  # steps 2..3 in both
    # same weights (random:<shape> is seeded), same samples, token-mean loss in both: same step-1 loss
    assert rows["loralab"]["losses"][0] == pytest.approx(rows["trainer"]["losses"][0], rel=1e-4)
    assert result["ratio"] == pytest.approx(rows["loralab"]["tokens_per_second"] / rows["trainer"]["tokens_per_second"])
    assert rows["loralab"]["speed"]["packing"] is True  # loralab run's CPU defaults, resolved
    assert result["best_peer"] == "trainer" and result["ratio_best_peer"] == result["ratio"]
    # the careful Trainer: fused AdamW, no autocast on CPU (bf16=False there), no Liger (CUDA only),
    # its best per-device batch found by doubling within the optimizer batch, accumulation keeping it
    trainer = rows["trainer"]
    assert trainer["speed"] == {"bf16": False, "fp16": False, "optim": "adamw_torch_fused", "liger": False}
    probe = trainer["micro_batch_probe"]
    assert probe["sizes"] == [1, 2, 4][:len(probe["sizes"])] and trainer["micro_batch"] == probe["micro_batch"]
    assert trainer["micro_batch"] * trainer["gradient_accumulation_steps"] == 4 and probe["reason"]
    assert len(probe["tokens_per_second"]) == len(probe["sizes"]) and probe["budget_gib"] is None  # no GPU peak on CPU
    printed = capsys.readouterr().out
    assert "| `loralab run` | 12 |" in printed and "| transformers Trainer + peft (tuned) | 12 |" in printed
    # no GPU peaks: no run within the Trainer's memory, and the table says why
    assert result["at_trainer_memory"] is None and result["at_trainer_memory_plan"]["run"] is False
    assert "loralab@trainer-memory: no peak memory for both stacks" in printed


def test_random_weights_maps_hub_ids_to_shapes(tmp_path):
    folder = make_experiment(tmp_path, "meta-llama/Meta-Llama-3-8B")
    exp = bench_copy(folder, tmp_path / "copy", steps=2, random_weights=True)
    assert exp.params.model_id == "random:llama-3-8b" and exp.params.max_steps == 2
    assert exp.params.checkpoint_steps == 0 and exp.params.logging_steps == 1
    assert exp.params.batch_size == 2 and exp.params.gradient_accumulation_steps == 2  # the recipe's batch
    assert exp.name == "llm/tiny-math/lora"
    config = random_config("random:llama-3-8b", "causal_lm")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 128256)  # the real 8B shape
    with pytest.raises(ValueError, match="no known shape for model_id 'someone/unknown-7b'.*meta-llama/Meta-Llama-3-8B"):
        random_model_id("someone/unknown-7b")


def test_random_model_ids_are_checked_and_reproducible():
    assert check_model_id("random:tiny-llama") == []
    problems = check_model_id("random:llama-4")
    assert len(problems) == 1 and "unknown random shape 'llama-4'" in problems[0] and "random:llama-3-8b" in problems[0]
    a = load_model("random:tiny-llama", "causal_lm")
    b = load_model("random:tiny-llama", "causal_lm")
    assert a.config.vocab_size == 49152  # grown to SmolLM2's tokenizer (the shape's 512 would not hold its ids)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))


def test_bench_experiment_reports_a_bad_folder(tmp_path):
    folder = make_experiment(tmp_path, "random:tiny-llama", batch_size=0)
    with pytest.raises(SystemExit, match="'batch_size' = 0 must be > 0"):
        main(["bench", "--experiment", str(folder), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--steps = 1: at least 2"):
        main(["bench", "--experiment", str(make_experiment(tmp_path / "b", "random:tiny-llama")), "--steps", "1"])


def test_an_encoder_recipe_is_refused_before_anything_trains(tmp_path, monkeypatch):
    import loralab.bench.experiment as experiment

    trained = []
    monkeypatch.setattr(experiment, "_loralab_run_row", lambda *a: trained.append(a))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--experiment", str(Path(__file__).parents[1] / "experiments/quickstart/lora-minilm-sst2"),
              "--steps", "2"])
    assert "the Trainer peer covers causal-LM recipes; task 'glue/sst2' is seq_cls" in str(exc.value)
    assert trained == []


RECIPE_H200 = Path(__file__).resolve().parents[1] / "results" / "bench-fair" / "recipe.json"


def test_the_budget_within_the_trainers_memory_from_the_h200_recipe_rows():
    """On the rows the H200 measured (results/bench-fair/recipe.json): loralab peaked at 28.94 GiB
    with micro-batch 4 (probed at 27.38 GiB), the Trainer at 25.94 GiB; the second run's probe may
    spend the Trainer's peak less what the probe does not hold (1.56 GiB): 24.38 GiB, which excludes
    micro-batch 4 and keeps 2 (21.63 GiB probed)."""
    from loralab.bench.experiment import peer_memory_budget
    from loralab.run.probe import Trial, decide_micro_batch

    rows = {r["stack"]: r for r in json.loads(RECIPE_H200.read_text())["rows"]}
    total = 150_000_000_000  # bytes, any card size: the fraction scales with it
    plan = peer_memory_budget(rows["loralab"], rows["trainer"], total)
    assert plan["run"] and plan["margin_gib"] == pytest.approx(28.94 - 27.38, abs=0.01)
    assert plan["budget_gib"] == pytest.approx(25.94 - 1.56, abs=0.01)
    assert plan["memory_fraction"] * total / 2**30 == pytest.approx(plan["budget_gib"], abs=0.01)
    probe = rows["loralab"]["speed"]["micro_batch_probe"]
    trials = [Trial(m, g * 2**30, r) for m, g, r in zip(probe["sizes"], probe["peaks_gib"], probe["tokens_per_second"])]
    assert decide_micro_batch(trials[:3], limit=128, budget=plan["memory_fraction"] * total, min_gain=0.05).micro_batch == 2
    # nothing to do when loralab already fits, or when its micro-batch was set (not probed)
    assert peer_memory_budget({**rows["loralab"], "peak_memory_gib": 25.0}, rows["trainer"], total)["fits"] is True
    explicit = {**rows["loralab"], "speed": {**rows["loralab"]["speed"], "micro_batch_probe": None}}
    assert "not measured" in peer_memory_budget(explicit, rows["trainer"], total)["reason"]
    assert peer_memory_budget({**rows["loralab"], "error": "OOM"}, rows["trainer"], total)["run"] is False
    small = peer_memory_budget(rows["loralab"], {**rows["trainer"], "peak_memory_gib": 19.0}, total)  # 19 - 1.56 < 18.76
    assert small["run"] is False and "no micro-batch fits" in small["reason"]



def test_the_budget_within_the_trainers_memory_leaves_auto_cached_fp8_codes_to_the_capped_run():
    """FP8 codes "auto" kept are not part of the margin the capped run subtracts (it caches within its own budget);
    an explicit share's are. An explicit micro-batch measured once (run/micro_batch.py) is capped like a probed
    one where its measured peak fits what the Trainer's peak leaves, and skipped with the reason where it does not:
    only the codes would shrink, and the measurement holds none."""
    from loralab.bench.experiment import peer_memory_budget

    total = 80 * 2**30
    probe = {"sizes": [1, 2], "peaks_gib": [12.0, 14.0], "optimizer_state_gib": 0.5, "loss_chunk_size": None,
             "reason": "memory: ..."}
    ours = {"peak_memory_gib": 21.0, "micro_batch": 2, "speed": {"micro_batch_probe": probe, "fp8_transposes_cached": {
        "layers": 7, "bytes": 6 * 2**30, "total_bytes": 6 * 2**30, "auto_spare_gib": 9.0, "auto_headroom_gib": 1.0}}}
    trainer = {"peak_memory_gib": 18.0}
    plan = peer_memory_budget(ours, trainer, total)
    assert plan["run"] and plan["margin_gib"] == pytest.approx(21.0 - 14.0 - 0.5 - 6.0)
    assert plan["budget_gib"] == pytest.approx(18.0 - 0.5)
    share = {**ours, "speed": {**ours["speed"], "fp8_transposes_cached": {"layers": 7, "bytes": 6 * 2**30,
                                                                           "total_bytes": 6 * 2**30}}}
    assert peer_memory_budget(share, {"peak_memory_gib": 20.0}, total)["margin_gib"] == pytest.approx(6.5)  # a share stays
    explicit = {**ours, "speed": {**ours["speed"], "micro_batch_probe": {
        **probe, "sizes": [2], "peaks_gib": [14.0], "reason": "explicit: speed.micro_batch; measured once: ..."}}}
    assert peer_memory_budget(explicit, trainer, total)["run"] is True  # 14.0 + 0.5 within 17.5
    tight = peer_memory_budget(explicit, {"peak_memory_gib": 14.8}, total)  # 14.3 left: 14.5 does not fit
    assert tight["run"] is False and "explicit micro-batch 2 measured 14.00 GiB + 0.50 GiB" in tight["reason"]
    oom = {**explicit, "speed": {**explicit["speed"], "micro_batch_probe": {**explicit["speed"]["micro_batch_probe"],
                                                                           "peaks_gib": ["oom"]}}}
    assert "not measured" in peer_memory_budget(oom, trainer, total)["reason"]


@pytest.mark.slow  # builds and runs the Liger peer's loss (3-5 s)
def test_liger_keeps_an_adapted_lm_head_in_the_loss():
    """Liger's fused linear cross-entropy reads lm_head.weight, the frozen base weight under a peft
    LoRA layer: a recipe that adapts the head (seed 000's) gets the fused loss off and Liger's
    cross-entropy over the logits; without a head adapter, Liger's defaults."""
    from peft import LoraConfig, get_peft_model

    from loralab.bench.peers import LIGER_DEFAULTS, liger_options

    def tiny():
        return load_model("random:tiny-llama", "causal_lm", 2, "float32")

    head = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert liger_options(head) == {**LIGER_DEFAULTS, "fused_linear_cross_entropy": False, "cross_entropy": True}
    dora_head = get_peft_model(tiny(), LoraConfig(r=4, use_dora=True, target_modules=["lm_head"]))  # any adapter kind
    assert liger_options(dora_head) == liger_options(head)
    body = get_peft_model(tiny(), LoraConfig(r=4, target_modules="all-linear"))  # peft's all-linear leaves the head
    assert liger_options(body) == LIGER_DEFAULTS and LIGER_DEFAULTS["fused_linear_cross_entropy"] is True
    assert liger_options(tiny()) == LIGER_DEFAULTS  # full fine-tuning: the head's own weight trains
    # the preset bench's Liger and tuned rows take the same rule on the model they adapt (runner.run_one)
    from loralab.bench.peers import wrap
    from loralab.bench.workloads import float_method, presets

    for w in presets("tiny"):
        if w.model == "tiny-llama":
            for m in w.methods:
                assert liger_options(wrap(tiny(), w, float_method(m))) == LIGER_DEFAULTS, (w.name, m)


def test_liger_patched_puts_back_what_liger_rebinds_outside_the_model(monkeypatch):
    """Liger's apply function rebinds transformers' Llama names and, with cross_entropy, torch's
    cross_entropy for the process; the rows after the Trainer (loralab within its memory) must run
    plain torch and transformers. Liger needs triton (not on CPU): a stand-in with its signature
    rebinds what the real one rebinds (liger_kernel/transformers/monkey_patch.py)."""
    import sys
    import types

    import torch
    from transformers.models.llama import modeling_llama

    from loralab.bench.peers import liger_patched

    calls = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True, model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy))
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (), {})
        if cross_entropy:
            torch.nn.functional.cross_entropy = lambda *a, **k: None

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    norm, ce = modeling_llama.LlamaRMSNorm, torch.nn.functional.cross_entropy
    with liger_patched(object(), cross_entropy=True, fused_linear_cross_entropy=False):
        assert modeling_llama.LlamaRMSNorm is not norm and torch.nn.functional.cross_entropy is not ce
    assert modeling_llama.LlamaRMSNorm is norm and torch.nn.functional.cross_entropy is ce
    assert calls == [{"rope": True, "cross_entropy": True, "fused_linear_cross_entropy": False}]


@pytest.mark.slow
def test_bench_experiment_runs_one_stack_when_asked(tmp_path, capsys):
    """``--stacks loralab``: loralab run's row alone (a GPU call then spends no minutes on the Trainer
    whose peak an earlier call measured); no ratio, no capped rerun. A stack --experiment does not
    run is refused, naming what it allows."""
    folder = make_experiment(tmp_path, "random:tiny-llama")
    out = tmp_path / "bench.json"
    assert main(["bench", "--experiment", str(folder), "--steps", "2", "--device", "cpu", "--stacks", "loralab",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["stack"] for r in result["rows"]] == ["loralab"] and result["rows"][0]["tokens_per_second"] > 0
    assert result["ratio"] is None and result["at_trainer_memory_plan"] is None
    # --speed: keys over the recipe's for loralab's rows, recorded and named in the table
    assert main(["bench", "--experiment", str(folder), "--steps", "2", "--device", "cpu", "--stacks", "loralab",
                 "--speed", "loss_chunk_size=64", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["speed"] == {"loss_chunk_size": 64} and result["rows"][0]["speed"]["loss_chunk_size"] == 64
    assert "speed.loss_chunk_size 64 (loralab)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown key 'loss_chunk'"):
        main(["bench", "--experiment", str(folder), "--device", "cpu", "--speed", "loss_chunk=64"])
    for bad, why in (("peer", "unknown 'peer'"), ("loralab,loralab", "empty or repeated")):
        with pytest.raises(SystemExit, match=f"{why}; allowed with --experiment: loralab, trainer"):
            main(["bench", "--experiment", str(folder), "--device", "cpu", "--stacks", bad])
