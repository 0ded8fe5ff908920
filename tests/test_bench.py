"""`loralab bench --preset tiny --device cpu` runs end to end and reports both stacks."""

import json

import pytest

from loralab.bench.runner import table
from loralab.bench.workloads import presets
from loralab.cli import main
from loralab.speed.lengths import sample_lengths


@pytest.mark.slow  # ~25 s on 2 shared cores
def test_bench_tiny_cpu_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    expected = {(w.name, m, s) for w in presets("tiny") for m in w.methods for s in ("peer", "loralab")}
    assert {(r["workload"], r["method"], r["stack"]) for r in rows} == expected
    for r in rows:
        assert set(r) >= {"workload", "method", "stack", "throughput", "unit", "peak_memory_gib", "mfu"}
        assert r["throughput"] > 0, r
        assert r["unit"] == ("samples/s" if "roberta" in r["workload"] else "tokens/s")
        if r["stack"] == "loralab":  # loralab run's CPU defaults: no graphs, compile or autocast; packing for causal LMs
            assert r["speed"]["packing"] == ("roberta" not in r["workload"]) and r["speed"]["cuda_graphs"] is False
            assert r["micro_batch"] == next(w.batch_size for w in presets("tiny") if w.name == r["workload"])
    # every stack trained on the same samples: same real units per step
    for w in presets("tiny"):
        for m in w.methods:
            per_step = {r["stack"]: r["units_per_step"] for r in rows if r["workload"] == w.name and r["method"] == m}
            assert per_step["loralab"] == per_step["peer"], (w.name, m, per_step)
    printed = capsys.readouterr().out
    assert "| tiny-llama/fixed-2x64 | dora | loralab |" in printed and "| tiny-llama/fixed-2x64 | dora | peer |" in printed


def test_table_reports_ours_over_peer():
    rows = [{"workload": "w", "method": "lora", "stack": "peer", "throughput": 100.0, "unit": "tokens/s", "peak_memory_gib": 2.0, "mfu": 0.1},
            {"workload": "w", "method": "lora", "stack": "loralab", "throughput": 250.0, "unit": "tokens/s", "peak_memory_gib": 1.0, "mfu": 0.25}]
    assert "| w | lora | loralab | 250 tokens/s | 1.0 GiB | 25.0% | 2.50x |" in table(rows)


def test_stored_length_histograms_look_like_the_data():
    gsm = sample_lengths("gsm8k_sft", 2000, seed=0)
    sst = sample_lengths("sst2", 2000, seed=0)
    assert 150 < sum(gsm) / len(gsm) < 250 and max(gsm) <= 600  # GSM8K SFT samples: ~195 tokens
    assert 10 < sum(sst) / len(sst) < 17 and max(sst) <= 70  # SST-2 sentences: ~13 tokens
