"""``loralab decompose`` end to end on the real SmolLM2-135M (one projection type, tiny calibration)."""

import pytest
import torch

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")


@pytest.mark.slow
def test_decompose_save_path_round_trip_and_cache(smollm2_path, data_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.cli import main

    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "kpa"
    argv = ["decompose", "--model", smollm2_path, "--r", "4", "--calib-dataset", "nqopen", "--calib-size", "4",
            "--calib-seqlen", "32", "--batch-size", "2", "--target-modules", "v_proj", "--save-path", str(out),
            "--use-cache", "--data-dir", str(data_dir), "--device", "cpu"]
    assert main(argv) == 0
    assert (out / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    cached = sorted(p.parent.name for p in (tmp_path / "cache" / "corda").rglob("*.pt"))
    assert cached == ["calibration", "covariance", "eigens"]

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    x = tok(["who sang the song hey jude"], return_tensors="pt")
    original = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    residual = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w0 = original.model.layers[3].self_attn.v_proj.weight
    assert (residual.model.layers[3].self_attn.v_proj.weight - w0).norm() > 1e-4  # a real residual
    model = PeftModel.from_pretrained(residual, out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, original(**x).logits, rtol=1e-4, atol=1e-4)

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "corda").rglob("*.pt")}
    assert main([str(tmp_path / "again") if a == str(out) else a for a in argv]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "corda").rglob("*.pt")} == mtimes  # all hits
