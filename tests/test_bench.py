"""`loralab bench --preset tiny --device cpu` runs end to end and reports loralab, the docs peer and the
tuned peer (no Liger on CPU), with loralab's ratios over the best peer row."""

import json

import pytest

from loralab.bench.rows import add_ratios, table
from loralab.bench.workloads import presets
from loralab.cli import main
from loralab.speed.lengths import sample_lengths


@pytest.mark.slow  # ~25 s on 2 shared cores
def test_bench_tiny_cpu_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    expected = {(w.name, m, s) for w in presets("tiny") for m in w.methods for s in ("peer", "loralab", "tuned")
                if s == "loralab" or not m.startswith("fp8+")}  # an FP8 base: loralab's row only
    assert ("tiny-llama/fixed-2x64", "fp8+lora", "loralab") in expected
    assert {(r["workload"], r["method"], r["stack"]) for r in rows} == expected
    for r in rows:
        assert set(r) >= {"workload", "method", "stack", "throughput", "unit", "peak_memory_gib", "mfu"}
        assert r["throughput"] > 0, r
        assert r["unit"] == ("samples/s" if "roberta" in r["workload"] else "tokens/s")
        if r["stack"] == "loralab":  # loralab run's CPU defaults: no graphs, compile or autocast; packing for causal LMs
            assert r["speed"]["packing"] == ("roberta" not in r["workload"]) and r["speed"]["cuda_graphs"] is False
            assert r["micro_batch"] == next(w.batch_size for w in presets("tiny") if w.name == r["workload"])
            assert r["speed"]["micro_batch_probe"]["reason"] == "not probed on cpu: the experiment's batch_size"
            # an FP8-base row against the float method's peers (fp8+lora: lora's)
            same = [p for p in rows if (p["workload"], p["method"]) == (r["workload"], r["method"].removeprefix("fp8+"))
                    and p["stack"] != "loralab"]
            best = max(same, key=lambda p: p["throughput"])
            assert r["best_peer"] == best["stack"] and r["ratio_best_peer"] == round(r["throughput"] / best["throughput"], 3)
            docs = next(p for p in same if p["stack"] == "peer")
            assert r["ratio_docs_peer"] == round(r["throughput"] / docs["throughput"], 3)
        if r["stack"] == "tuned":  # what Trainer(bf16=True, optim="adamw_torch_fused") does on CPU: no autocast
            assert r["speed"] == {"autocast": None, "optim": "adamw_torch_fused", "liger": False}
            probe = r["micro_batch_probe"]
            batch = next(w.batch_size for w in presets("tiny") if w.name == r["workload"])
            assert probe["sizes"][0] == 1 and probe["sizes"] == [min(2**k, batch) for k in range(len(probe["sizes"]))]
            assert r["micro_batch"] == probe["micro_batch"] in probe["sizes"] and probe["reason"]
            assert len(probe["tokens_per_second"]) == len(probe["sizes"]) and all(probe["tokens_per_second"])
            assert probe["peaks_gib"] == [None] * len(probe["sizes"]) and probe["budget_gib"] is None  # CPU
    # every stack trained on the same samples: same real units per step
    for w in presets("tiny"):
        for m in w.methods:
            per_step = {f"{r['method']} {r['stack']}": r["units_per_step"] for r in rows if r["workload"] == w.name
                        and r["method"].removeprefix("fp8+") == m.removeprefix("fp8+")}
            assert len(per_step) >= 3 and len(set(per_step.values())) == 1, (w.name, m, per_step)  # FP8 rows too
    fp8 = next(r for r in rows if r["method"] == "fp8+lora")
    assert fp8["ratio_best_peer"] > 0  # over lora's peers
    fp8_dora = next(r for r in rows if r["method"] == "fp8+dora")  # fast DoRA's FP8 norm, the fused matmul off
    assert fp8_dora["speed"]["fast_dora"] is True and fp8_dora["speed"]["fused_lora"] is False
    printed = capsys.readouterr().out
    assert "| tiny-llama/fixed-2x64 | dora | loralab |" in printed and "| tiny-llama/fixed-2x64 | dora | peer |" in printed


def test_table_reports_ours_over_the_best_peer_and_the_docs_peer():
    rows = [{"workload": "w", "method": "lora", "stack": "peer", "throughput": 100.0, "unit": "tokens/s", "peak_memory_gib": 2.0, "mfu": 0.1},
            {"workload": "w", "method": "lora", "stack": "loralab", "throughput": 250.0, "unit": "tokens/s", "peak_memory_gib": 1.0, "mfu": 0.25,
             "micro_batch": 4}]
    assert "| w | lora | loralab | 250 tokens/s | 1.0 GiB | 25.0% | 4 | 2.50x (peer) | 2.50x |" in table(rows)
    rows += [{"workload": "w", "method": "lora", "stack": "tuned", "throughput": 200.0, "unit": "tokens/s", "peak_memory_gib": 1.0,
              "mfu": 0.2, "micro_batch": 2},
             {"workload": "w", "method": "lora", "stack": "liger", "throughput": 150.0, "unit": "tokens/s", "peak_memory_gib": 1.5, "mfu": 0.15},
             {"workload": "v", "method": "lora", "stack": "tuned", "throughput": 900.0, "unit": "tokens/s", "peak_memory_gib": 1.0, "mfu": 0.9}]
    text = table(rows)
    assert "| w | lora | loralab | 250 tokens/s | 1.0 GiB | 25.0% | 4 | 1.25x (tuned) | 2.50x |" in text  # not workload v's
    assert "| w | lora | tuned | 200 tokens/s | 1.0 GiB | 20.0% | 2 |  |  |" in text
    add_ratios(rows)
    assert (rows[1]["best_peer"], rows[1]["ratio_best_peer"], rows[1]["ratio_docs_peer"]) == ("tuned", 1.25, 2.5)
    rows[0]["throughput"] = None  # a failed docs peer: no docs ratio, the best of the others still
    add_ratios(rows)
    assert (rows[1]["best_peer"], rows[1]["ratio_docs_peer"]) == ("tuned", None)


def test_stored_length_histograms_look_like_the_data():
    gsm = sample_lengths("gsm8k_sft", 2000, seed=0)
    sst = sample_lengths("sst2", 2000, seed=0)
    assert 150 < sum(gsm) / len(gsm) < 250 and max(gsm) <= 600  # GSM8K SFT samples: ~195 tokens
    assert 10 < sum(sst) / len(sst) < 17 and max(sst) <= 70  # SST-2 sentences: ~13 tokens


TINY_FIXED = ["bench", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--only", "tiny-llama/fixed"]
"""One step of the tiny preset's fixed-shape Llama rows on CPU: the options' tests below."""


def test_methods_keeps_those_rows_and_names_an_unknown_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*TINY_FIXED, "--methods", "lora", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["method"], r["stack"]) for r in rows} == {("lora", "peer"), ("lora", "loralab"), ("lora", "tuned")}
    with pytest.raises(SystemExit) as exc:
        main([*TINY_FIXED, "--methods", "lora,qlora"])
    assert "'qlora' not in the preset 'tiny' (--only 'tiny-llama/fixed'); its methods: dora, fp8+dora, fp8+lora, full, lora" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--experiment", str(tmp_path), "--methods", "lora"])
    assert "--methods" in str(exc.value)


def test_stacks_keeps_those_rows_and_names_an_unknown_one(tmp_path):
    """--stacks loralab: an A/B of speed keys without minutes of peer rows (the DoRA pairs on the GPU)."""
    out = tmp_path / "bench.json"
    assert main([*TINY_FIXED, "--methods", "dora,fp8+dora", "--stacks", "loralab", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["method"], r["stack"]) for r in rows} == {("dora", "loralab"), ("fp8+dora", "loralab")}
    assert all(r["throughput"] and r["ratio_best_peer"] is None for r in rows)  # no peer ran: no ratio
    with pytest.raises(SystemExit) as exc:
        main([*TINY_FIXED, "--stacks", "loralab,trainer"])
    assert "--stacks 'loralab,trainer': 'trainer' not a stack; allowed: peer, loralab, liger, tuned" in str(exc.value)
    with pytest.raises(SystemExit) as exc:  # --experiment runs its own two stacks (tests/test_bench_experiment.py)
        main(["bench", "--experiment", str(tmp_path), "--stacks", "tuned"])
    assert "--stacks 'tuned': unknown 'tuned'; allowed with --experiment: loralab, trainer" in str(exc.value)
    with pytest.raises(SystemExit) as exc:  # nothing left to run: refused, not an empty table
        main([*TINY_FIXED, "--stacks", "liger"])
    assert "--stacks 'liger': no row to run: stacks liger of methods" in str(exc.value) and "Liger needs CUDA" in str(exc.value)


def test_speed_option_sets_loralab_keys_and_fp8_keys_reach_the_fp8_rows_only(tmp_path):
    out = tmp_path / "bench.json"
    assert main([*TINY_FIXED, "--methods", "lora,fp8+lora", "--speed", "fp8_transpose_cache=1", "--speed", "chunked_loss=false",
                 "--output", str(out)]) == 0
    rows = {(r["method"], r["stack"]): r for r in json.loads(out.read_text())}
    fp8, lora = rows[("fp8+lora", "loralab")]["speed"], rows[("lora", "loralab")]["speed"]
    assert fp8["fp8_transpose_cache"] == 1 and lora["fp8_transpose_cache"] == 0.0  # the float row: the default
    assert fp8["chunked_loss"] is False and lora["chunked_loss"] is False
    for bad, said in [("fp8_transpose_cache", "KEY=VALUE expected"), ("fast_dor=true", "unknown key 'fast_dor'"),
                      ("fp8_transpose_cache=2", "'speed.fp8_transpose_cache' = 2 must be \"auto\" or a number in [0, 1]")]:
        with pytest.raises(SystemExit) as exc:
            main([*TINY_FIXED, "--speed", bad])
        assert said in str(exc.value), (bad, exc.value)


def test_the_gpu_table_script_reports_a_partial_loss_curve_file_and_a_changed_rerun(load_script, tmp_path, monkeypatch,
                                                                                   capsys):
    """scripts/fair_bench_table.py on an fp8loss.json that its script left partial (a deadline stopped it) says which
    variants ended and computes no gap; on a whole file whose bf16 rerun ran another loss chunk, its note names
    both chunks instead of calling the runs identical."""
    script = load_script("fair_bench_table")
    curve = {"losses": [2.0, 1.0], "seconds": 1.0, "speed": {"micro_batch": 2, "loss_chunk_size": 128}}
    (tmp_path / "fp8loss.json").write_text(json.dumps({"partial": True, "curves": {"fp32": curve, "bf16": curve}}))
    monkeypatch.setattr("sys.argv", ["fair_bench_table.py", str(tmp_path)])
    script.main()
    printed = capsys.readouterr().out
    assert "`fp8loss.json` is partial: fp32, bf16 ended" in printed and "goal (issue 22)" not in printed
    rerun = dict(curve, speed={"micro_batch": 2, "loss_chunk_size": 1024})
    whole = {"shape": "llama-3-8b", "steps": 2, "batch": 16, "gpu": "a GPU", "fp8_within_bf16_gap": False,
             "curves": {"fp32": curve, "bf16": curve, "bf16_rerun": rerun}, "gap_bf16_rerun": 0.003,
             "drift_bf16_rerun": 0.003, **dict.fromkeys(("gap_fp8_vs_bf16", "gap_bf16_vs_fp32", "drift_fp8_vs_bf16",
                                                         "drift_bf16_vs_fp32"), 0.01)}
    (tmp_path / "fp8loss.json").write_text(json.dumps(whole))
    script.main()
    printed = capsys.readouterr().out
    assert "with 1024-token loss chunks where the first's probe took 128" in printed and "identical" not in printed
    whole["curves"]["bf16_rerun"] = curve
    (tmp_path / "fp8loss.json").write_text(json.dumps(whole))
    script.main()
    assert "Two identical bf16 runs on a GPU" in capsys.readouterr().out


@pytest.mark.slow  # two bench rows of the tiny preset on CPU, layers compiled (~10 s)
def test_a_bench_row_records_whether_its_budgeted_partition_held(monkeypatch, recwarn):
    """A loralab row at an activation budget below 1 says how torch's partition went, as `loralab run`'s record
    does: a row at 0.6 whose partition failed (torch 2.11's grouped-query SDPA flop count on an H100,
    results/bench-ratio-h100/actdora.log) ran at the default budget, and its row says so, not the 0.6 alone."""
    import torch
    import torch._functorch.config as functorch_config

    from loralab.bench import runner
    from loralab.speed.step import budgeted_backend

    def fails_under_a_budget(gm, example_inputs):
        if functorch_config.activation_memory_budget < 1:
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
        return gm.forward

    monkeypatch.setattr("torch._dynamo.lookup_backend", lambda name: fails_under_a_budget)
    workload = next(w for w in presets("tiny") if w.name.startswith("tiny-llama/fixed"))
    rows = {}
    try:
        for budget in (0.6, 1.0):
            budgeted_backend.cache_clear()
            torch._dynamo.reset()
            rows[budget] = runner.run_one(workload, "lora", "loralab", "cpu", 1, 1, speed={
                "compile": True, "cuda_graphs": False, "activation_memory_budget": budget, "micro_batch": 2})
    finally:
        budgeted_backend.cache_clear()
        torch._dynamo.reset()
    held = rows[0.6]["activation_memory_budget_partitions"]
    assert rows[0.6]["speed"]["activation_memory_budget"] == 0.6 and held["fell_back"] >= 1 and held["within_budget"] == 0
    assert "sdpa_flop_count" in held["error"]
    assert "activation_memory_budget_partitions" not in rows[1.0]  # nothing budgeted, nothing to say


def test_the_tuned_peer_is_held_to_loralabs_peak_or_its_budget():
    """``tuned_cap`` on an H100 row at an H200's budget (results/bench-fair-h100-1206/h200budget): loralab's probe's
    budget by default, its measured peak with ``peer_memory="peak"`` or where nothing was probed, no cap
    without loralab's row; an unknown choice is refused naming the allowed ones."""
    from pathlib import Path

    from loralab.bench.runner import tuned_cap
    from loralab.bench.workloads import BenchError

    rows = json.loads((Path(__file__).parents[1] / "results/bench-fair-h100-1206/h200budget/fair8b.json").read_text())
    ours = next(r for r in rows if (r["method"], r["stack"]) == ("lora", "loralab"))
    assert tuned_cap(ours, "peak") == (24.22, "loralab's measured peak")
    assert tuned_cap(ours) == (34.92, "loralab's memory budget") == tuned_cap(ours, "budget")
    explicit = {**ours, "speed": {**ours["speed"], "micro_batch_probe": None}}  # speed.micro_batch set: no probe
    assert tuned_cap(explicit, "budget") == (24.22, "loralab's measured peak")
    assert tuned_cap(None, "budget") == (None, None) == tuned_cap({**ours, "peak_memory_gib": None}, "budget")
    over = {**ours, "peak_memory_gib": 35.5}  # micro-batch 1 may run over the budget: the peer gets loralab's peak
    assert tuned_cap(over, "budget") == (35.5, "loralab's measured peak")
    with pytest.raises(BenchError, match="'trough' unknown; allowed: peak, budget"):
        tuned_cap(ours, "trough")


@pytest.mark.slow  # runs the table script (imports torch, transformers)
def test_peer_memory_is_for_preset_rows_and_the_table_names_the_cap(tmp_path):
    """``--peer-memory`` with ``--experiment`` is refused naming it; the fair-bench table's tuned-peer note says which
    cap the peer searched within (loralab's budget, the default, or its peak: every fair-bench run in results/ before
    results/bench-fair-h100-1206's call 6)."""
    import subprocess
    import sys
    from pathlib import Path

    with pytest.raises(SystemExit, match="--peer-memory, which apply to the preset rows only"):
        main(["bench", "--experiment", str(tmp_path), "--peer-memory", "budget"])
    root = Path(__file__).parents[1]
    rows = json.loads((root / "results/bench-fair-h100-1206/h200budget/fair8b.json").read_text())
    for r in rows:
        if r["stack"] == "tuned":
            r["micro_batch_probe"]["budget_from"] = "loralab's memory budget"
    (tmp_path / "fair8b.json").write_text(json.dumps(rows))
    run = subprocess.run([sys.executable, "scripts/fair_bench_table.py", str(tmp_path)], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert run.returncode == 0, run.stderr
    notes = [line for line in run.stdout.splitlines() if line.startswith("- Tuned peer")]
    assert len(notes) == 2 and all("loralab's budget): " in line for line in notes)
    peak = subprocess.run([sys.executable, "scripts/fair_bench_table.py", str(root / "results/bench-fair-h100-1206/h200budget")],
                          capture_output=True, text=True, cwd=root, timeout=120).stdout
    assert "GiB, loralab's peak): " in peak and "loralab's budget" not in peak


@pytest.mark.parametrize("flag", [None, "peak", "budget"])
def test_the_cli_holds_the_tuned_peer_to_loralabs_budget_by_default(monkeypatch, flag):
    """``loralab bench`` hands the tuned peer's row the cap of ``--peer-memory`` (default: loralab's budget), from
    loralab's row of the same workload and method, with where it came from (stand-in rows: no model is built)."""
    from loralab.bench import runner

    seen = {}

    def fake_run_one(w, method, stack, device, steps, warmup, speed=None, budget_gib=None, budget_from=None, windows=1):
        seen[stack] = (budget_gib, budget_from)
        probe = {"budget_gib": 19.79} if stack == "loralab" else None
        return {"workload": w.name, "method": method, "stack": stack, "throughput": 1.0, "unit": "tokens/s",
                "peak_memory_gib": 18.5, "mfu": None, "micro_batch": 1, "speed": {"micro_batch_probe": probe}}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--only", "fixed-2x64", "--methods", "lora",
            "--stacks", "loralab,tuned"] + (["--peer-memory", flag] if flag else [])
    assert main(args) == 0
    want = (18.5, "loralab's measured peak") if flag == "peak" else (19.79, "loralab's memory budget")
    assert seen == {"loralab": (None, None), "tuned": want}


def test_the_tuned_peer_records_where_its_cap_came_from():
    """A tuned row run with a cap records it and its source in ``micro_batch_probe`` (tiny Llama on CPU: no peaks,
    so the cap stops nothing)."""
    from loralab.bench.runner import run_one

    w = next(w for w in presets("tiny") if w.name == "tiny-llama/fixed-2x64")
    row = run_one(w, "lora", "tuned", "cpu", 1, 1, budget_gib=5.0, budget_from="loralab's memory budget")
    probe = row["micro_batch_probe"]
    assert (probe["budget_gib"], probe["budget_from"]) == (5.0, "loralab's memory budget")
    assert probe["sizes"] == [1, 2] and row["micro_batch"] == probe["micro_batch"]


def test_bench_goals_are_decided_on_the_unrounded_ratio(load_script):
    """A loralab row 1.4996x its tuned peer is stored as ratio_best_peer 1.5 (3 decimals); the goal line must still
    read "not met", and met where the quotient itself reaches the goal."""
    script = load_script("fair_bench_table")
    w = "llama-3-8b/fixed-4x512"

    def rows(ours):
        peer = {"workload": w, "method": "lora", "stack": "tuned", "throughput": 10000.0, "peak_memory_gib": 20.0}
        fp8 = {"workload": w, "method": "fp8+lora", "stack": "loralab", "throughput": 2 * ours, "peak_memory_gib": 19.0,
               "best_peer": "tuned", "ratio_best_peer": round(2 * ours / 10000, 3)}
        lora = {"workload": w, "method": "lora", "stack": "loralab", "throughput": ours, "peak_memory_gib": 21.0,
                "best_peer": "tuned", "ratio_best_peer": round(ours / 10000, 3)}
        return [peer, lora, fp8]

    under = {goal: verdict for goal, _, verdict in script.bench_goals(rows(14996.0))}
    assert rows(14996.0)[1]["ratio_best_peer"] == 1.5
    assert under["bf16 LoRA >= 1.5x the best peer (its best micro-batch within loralab's memory)"] == "**not met**"
    assert under["FP8-base LoRA >= 2.0x the best peer"] == "met"  # 29,992 / 10,000 = 2.9992
    met = {goal: verdict for goal, _, verdict in script.bench_goals(rows(15000.0))}
    assert met["bf16 LoRA >= 1.5x the best peer (its best micro-batch within loralab's memory)"] == "met"


def test_a_stall_in_one_timing_window_does_not_move_the_row(monkeypatch):
    """Each row times its steps ``windows`` times and counts the median window: a host stall inside one window
    (here 100 s added to the bench's clock in the second window's first step of a tiny peer row: the same on a
    loaded machine) shows in ``window_throughputs`` and leaves the row's throughput at an unstalled window's."""
    import time as time_module
    from types import SimpleNamespace

    from loralab.bench import runner

    calls, real_step, stalled = [], runner.peer_step, [0.0]

    def stalling_step(model, opt, batch):
        calls.append(1)
        if len(calls) == 5:  # warm-up and first-of-shape: calls 1-2; windows of 2 steps: 3-4, 5-6, 7-8
            stalled[0] += 100.0
        real_step(model, opt, batch)

    monkeypatch.setattr(runner, "peer_step", stalling_step)
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: time_module.perf_counter() + stalled[0]))
    w = next(w for w in presets("tiny") if w.name == "tiny-llama/fixed-2x64")
    row = runner.run_one(w, "lora", "peer", "cpu", 2, 1, windows=3)
    rates = row["window_throughputs"]
    assert len(calls) == 8 and len(rates) == 3
    assert rates[1] == min(rates) and rates[1] < 0.1 * max(rates)  # the stall shows where it happened
    assert row["throughput"] == sorted(rates)[1] and row["throughput"] > 10 * rates[1]  # and does not move the row
    one = runner.run_one(w, "lora", "peer", "cpu", 2, 1)  # one window: timed as before
    assert one["throughput"] == one["window_throughputs"][0]


def test_an_even_window_count_counts_a_window_of_its_own(monkeypatch):
    """Two windows: the row's throughput is one window's (the slower), not the mean of two, which no window ran."""
    from loralab.bench import runner

    w = next(w for w in presets("tiny") if w.name == "tiny-llama/fixed-2x64")
    row = runner.run_one(w, "lora", "peer", "cpu", 2, 1, windows=2)
    assert row["throughput"] == min(row["window_throughputs"])


def test_the_window_count_defaults_by_preset_and_an_explicit_one_wins(monkeypatch):
    from loralab.bench import runner
    from loralab.bench.workloads import BenchError

    seen = []
    monkeypatch.setattr(runner, "run_one", lambda *a, windows=1, **k: seen.append(windows) or {
        "workload": a[0].name, "method": a[1], "stack": a[2], "throughput": 1.0, "unit": "tokens/s",
        "peak_memory_gib": None, "mfu": None})
    for preset, windows, want in (("tiny", None, 1), ("full", None, 3), ("full", 5, 5), ("tiny", 2, 2)):
        seen.clear()
        runner.run_bench(preset, "cpu", only="fixed", methods=("lora",), stacks=("peer",), windows=windows, log=lambda s: None)
        assert seen and set(seen) == {want}
    with pytest.raises(BenchError, match="windows 0: must be a positive integer"):
        runner.run_bench("tiny", "cpu", windows=0)


@pytest.mark.parametrize("args, says", [(["--windows", "0"], "--windows = 0: must be a positive integer"),
                                        (["--windows", "2", "--eval"], "--windows is a training-bench option"),
                                        (["--windows", "2", "--experiment", "x"], "remove --preset, --only, --methods, "
                                                                                  "--profile, --warmup, --windows")])
def test_windows_must_be_positive_and_go_with_preset_rows(args, says, capsys):
    try:
        code = main(["bench", "--device", "cpu"] + args)
    except SystemExit as exc:
        code, message = 2, str(exc)
    else:
        message = capsys.readouterr().err
    assert code != 0 and says in message


def test_the_table_script_gives_each_rows_window_spread_and_the_ratio_at_its_extremes(load_script):
    script = load_script("fair_bench_table")
    w = "llama-3-8b/fixed-4x512"
    rows = [{"workload": w, "method": "lora", "stack": "tuned", "throughput": 8000.0, "window_throughputs": [7000.0, 8000.0, 9000.0]},
            {"workload": w, "method": "lora", "stack": "loralab", "throughput": 15000.0, "best_peer": "tuned",
             "window_throughputs": [14000.0, 15000.0, 15400.0]}]
    notes = script.window_notes(rows)
    assert "lora tuned 7,000 to 9,000 (28.6%)" in notes[0] and "lora loralab 14,000 to 15,400 (10.0%)" in notes[0]
    assert "1.56x (loralab's slowest over the peer's fastest) to 2.20x; the counted windows give 1.88x" in notes[1]
    assert script.window_notes([{**r, "window_throughputs": None} for r in rows]) == []


def test_a_goal_ratio_is_printed_on_the_side_of_the_goal_it_falls(load_script):
    """scripts/fair_bench_table.py ``shown``: a ratio prints at its usual digits unless rounding carries it across the
    goal, either way; then with as many more digits as it takes (results/bench-fair-h100-1207e: 0.89957 had read
    "0.900" beside "not met")."""
    shown = load_script("fair_bench_table").shown
    assert shown(0.899566, 0.9, 3) == "0.8996"  # under the goal: never "0.900"
    assert shown(0.914, 0.9, 3) == "0.914"
    assert shown(1.5001, 1.5, 2, printed=1.494) == "1.500"  # over it while the printed figure reads under
    assert shown(3.9253, 2.0, 2, printed=3.925) == "3.92"  # far from it: the table's own rounded figure
    assert shown(0.89999997, 0.9, 3) == "0.89999997"  # within 5e-7 of it: more than 6 decimals, still under
    assert shown(0.9 - 2 ** -52, 0.9, 3).startswith("0.8999999999999") and float(shown(0.9 - 2 ** -52, 0.9, 3)) < 0.9
