"""The DoRA diagnostic scripts measure what they say: the ablation's variants change only their part of the
step, and the refresh's alternative product forms compute the shipped values (scripts/dora_ablation_bench.py,
scripts/fp8_refresh_gemm_bench.py; issue 22's DoRA goal)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fp8_dora_models import exact_dora_norms, fp8_dora_llama

from loralab.bench import runner
from loralab.run import step as run_step
from loralab.speed import dora_refresh, fast_dora, fp8_kernels
from loralab.speed.fp8 import FP8, split_rows, weights_times


def test_the_refresh_products_alternative_forms_give_the_shipped_values(load_script):
    """The W·Aᵀ product with the terms on the left is the codes-left form transposed, bit for bit (same products,
    one rounding to bf16 each), and that form is ``speed.fp8.weights_times``'s product up to its bf16 output; the
    Gram matrix split over K is the whole bmm up to summation order."""
    bench = load_script("fp8_refresh_gemm_bench")
    rows = bench.bench(rank=4, layers=3, repeats=1, device="cpu", shapes={"small": (48, 64), "wide": (32, 128)})
    assert [r["layers"] for r in rows] == ["small", "wide"]
    for r in rows:
        assert r["product_max_rel_diff"] == 0.0
        assert r["gram_max_rel_diff"] < 1e-6
    torch.manual_seed(0)
    codes = (torch.randn(48, 64) * 100).clamp(-448, 448).to(FP8)
    scales, a = torch.rand(48) + 0.5, torch.randn(4, 64) / 8
    terms, term_scales = split_rows(a)
    form = torch._scaled_mm(codes, terms.t(), scale_a=scales.view(-1, 1), scale_b=term_scales.view(1, -1),
                            out_dtype=torch.bfloat16).float()
    shipped = weights_times([codes], [scales], a[None])[0]
    assert torch.allclose(form[:, :4] + form[:, 4:], shipped, rtol=2 ** -7, atol=2 ** -7 * float(shipped.abs().max()))


@pytest.mark.slow  # six bench rows of the tiny preset on CPU (~15 s)
def test_the_ablation_freezes_magnitudes_and_refreshes_once_only_where_asked(tmp_path, monkeypatch, load_script):
    """The frozen variant's model trains A and B but no magnitude (and its magnitudes end as they began); the
    norm-once variant's step computes the norm once (at its build) where the shipped step computes it at every
    step; the script puts the step's refresh and the bench's wrap back."""
    ablation = load_script("dora_ablation_bench")
    real_refresh, real_wrap, real_keep, ratios = run_step.refresh_dora_norms, runner.wrap, dora_refresh._keep_norms, {}
    refreshes, models, initial, real_times, products = [], [], [], dora_refresh.weights_times, []
    real_run_one = runner.run_one

    def seen_run_one(*args, **kwargs):  # the refresh product each row's step reads (a bf16 FP8 base's; CPU runs float32)
        products.append((dora_refresh.weights_times, dora_refresh.KERNEL_OVERRIDE))
        return real_run_one(*args, **kwargs)

    monkeypatch.setattr(runner, "run_one", seen_run_one)

    def counted_refresh(model, backend=None):
        refreshes.append(model)
        return real_refresh(model, backend)

    def kept_wrap(model, w, method):
        models.append(real_wrap(model, w, method))
        initial.append({n: p.detach().clone() for n, p in models[-1].named_parameters() if "lora_" in n})
        return models[-1]

    monkeypatch.setattr(run_step, "refresh_dora_norms", counted_refresh)
    monkeypatch.setattr(runner, "wrap", kept_wrap)
    counts, params = {}, {}
    out = tmp_path / "abl.json"
    rows = {}
    for variant in ("dora", "dora-frozen-m", "dora-norm-once", "dora-per-group-gram", "dora-ratio-in-forward",
                    "dora-triton-product", "dora-cublas-product"):
        refreshes.clear()
        ablation.main(["--device", "cpu", "--preset", "tiny", "--only", "tiny-llama/fixed", "--bases", "fp8",
                       "--variants", variant, "--micro-batch", "2", "--steps", "2", "--warmup", "1",
                       "--output", str(out), "--speed", "memory_fraction=0.5"])
        rows[variant] = json.loads(out.read_text())[0]
        counts[variant] = len(refreshes)  # the step's calls (the script times the refresh alone through its own import)
        params[variant] = {n: (p.requires_grad, p.detach().clone()) for n, p in models[-1].named_parameters()
                           if "lora_" in n}
        assert run_step.refresh_dora_norms is counted_refresh and runner.wrap is kept_wrap  # put back
        assert dora_refresh._keep_norms is real_keep and dora_refresh.weights_times is real_times
        assert products[-1] == (real_times, {"dora-triton-product": "triton", "dora-cublas-product": "cublas"
                                             }.get(variant))  # the kernel each form takes, whatever the layers'
        assert (dora_refresh.weights_times, dora_refresh.KERNEL_OVERRIDE) == (real_times, None)  # put back
        ratios[variant] = sum(hasattr(m.lora_magnitude_vector["default"], "_loralab_ratio")
                              for m, _ in fast_dora._fast_dora_adapters(models[-1]))
    row = rows["dora-norm-once"]
    assert row["variant"] == "dora-norm-once" and row["refresh_python_calls"] == 9
    # make_step's refresh, then one per step (1 warm-up, the first of its shape, 3 windows of 2 timed); norm-once: the
    # first only; per-group-gram: the script's own refresh in the step, never the shipped one
    assert len(rows["dora"]["window_throughputs"]) == 3
    assert counts["dora"] == 1 + 8 and counts["dora-norm-once"] == 1 and counts["dora-per-group-gram"] == 0
    assert ratios["dora"] == ratios["dora-per-group-gram"] == 14 and ratios["dora-ratio-in-forward"] == 0  # that row's forwards make m / n each time
    assert all(r["speed"]["memory_fraction"] == 0.5 and r["speed"]["micro_batch"] == 2 for r in rows.values())
    with pytest.raises(SystemExit):  # the micro-batch has one way in
        ablation.main(["--device", "cpu", "--preset", "tiny", "--speed", "micro_batch=2"])
    frozen = params["dora-frozen-m"]
    magnitudes = [n for n in frozen if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 14 and not any(frozen[n][0] for n in magnitudes)
    assert all(frozen[n][0] for n in frozen if "lora_A" in n or "lora_B" in n)
    assert all(grad for grad, _ in params["dora"].values())
    # the frozen row's magnitudes end as they began while its B moved; the shipped row's magnitudes moved
    frozen_start, dora_start = initial[1], initial[0]
    assert all(torch.equal(frozen[n][1], frozen_start[n]) for n in magnitudes)
    assert any(not torch.equal(frozen[n][1], frozen_start[n]) for n in frozen if "lora_B" in n)
    assert any(not torch.equal(params["dora"][n][1], dora_start[n]) for n in magnitudes)


def test_the_refresh_forms_compute_the_shipped_norms_in_their_own_form_and_are_put_back(load_script, monkeypatch):
    """Each refresh form of ``dora_refresh_forms`` runs its own products (counted) on a bf16 DoRA Llama on an FP8
    base (W·Aᵀ read from the codes), gives the shipped norms up to summation order, and leaves ``speed.fast_dora``
    as it was; a form computing wrong values shows as a large difference."""
    from loralab.speed import streams

    forms = load_script("dora_refresh_forms")
    model = fp8_dora_llama(2)

    shipped = (dora_refresh.weights_times, fast_dora._gram, streams.PRODUCT_STREAMS)
    codes_left, calls = forms.weights_times_codes_left, {}
    alternatives = ("weights_times_cast_stack", "weights_times_codes_left", "gram_split")
    for attr in alternatives:  # each form's own product, counted

        def counted(*args, _fn=getattr(forms, attr), _attr=attr):
            calls[_attr] = calls.get(_attr, 0) + 1
            return _fn(*args)

        monkeypatch.setattr(forms, attr, counted)
    got = forms.time_forms(model, "cpu", None, repeats=1)
    assert list(got) == list(forms.FORMS) and all(v["calls"] == 14 for v in got.values())
    assert all(v["max_rel_diff"] < 1e-5 for k, v in got.items() if not k.startswith("triton")), got
    # the Triton product takes A in float16, not as two FP8 terms: it moves from the shipped norms by about the
    # shipped form's own distance from the exact norm (the float64 row norms of W + s·BA), and lands closer to it
    exact = exact_dora_norms(model)

    def off(name):
        with forms.form(name):
            dora_refresh.refresh_dora_norms(model, None)
            return max(((g.double() - e).abs().max() / e.abs().max()).item()
                       for g, e in zip(forms._norms(model), exact, strict=True))

    for name in ("triton-product", "triton-product-256x64"):  # two tiles, one product
        assert got[name]["max_rel_diff"] < 2 * off("shipped") and off(name) < off("shipped") / 10, name
    assert (fp8_kernels.WA_BLOCK_N, fp8_kernels.WA_BLOCK_K) == (128, 128)  # the tile put back
    assert dora_refresh.KERNEL_OVERRIDE is None
    # each form: 4 groups (q/o, k/v, gate/up, down) x (1 checked + 2 timed) calls of its product
    assert calls == {**dict.fromkeys(alternatives, 4 * 3), "gram_split": 2 * 4 * 3}, calls  # two Gram forms
    assert (dora_refresh.weights_times, fast_dora._gram, streams.PRODUCT_STREAMS) == shipped
    monkeypatch.setattr(forms, "weights_times_codes_left", lambda codes, scales, a: codes_left(codes, scales, a) * 0)
    assert forms.time_forms(model, "cpu", None, forms=["codes-left"], repeats=1)["codes-left"]["max_rel_diff"] > 1e-3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter (no CUDA)")
def test_every_refresh_form_runs_where_the_layers_take_the_triton_kernel(load_script):
    """The forms on a model whose FP8 layers take the Triton refresh product (``speed.fp8_refresh_kernel``, CUDA's
    default): each one runs (a form that reached the library's products through another path, as per-group-gram's
    own refresh did, must not meet a tuple or a list it does not expect) and lands near the exact norms; the
    layers' kernel is as it was after them."""
    from loralab.speed.fp8 import fp8_layers

    forms = load_script("dora_refresh_forms")
    model = fp8_dora_llama(1)
    assert dora_refresh.use_refresh_kernel(model, "triton") == "triton"
    exact = exact_dora_norms(model)
    for name in forms.FORMS:
        with forms.form(name):
            assert dora_refresh.refresh_dora_norms(model, None) == 7, name
        worst = max(((g.double() - e).abs().max() / e.abs().max()).item()
                    for g, e in zip(forms._norms(model), exact, strict=True))
        assert worst < 1e-3, (name, worst)
    assert {m.refresh_kernel for m in fp8_layers(model)} == {"triton"} and dora_refresh.KERNEL_OVERRIDE is None


def test_the_fused_projection_bench_times_the_same_products(load_script):
    """scripts/fused_proj_bench.py's fused forms give the separate forms' values: the forward exactly (each output
    column is the same dot product), the input gradient within bf16's rounding of one sum against three."""
    bench = load_script("fused_proj_bench")
    diffs = bench.agreement(32, "cpu", {"qkv": (64, (64, 16, 16)), "gate_up": (64, (128, 128))})
    assert {k for k in diffs if k[2] == "forward fused"} == {("qkv", "bf16", "forward fused"), ("qkv", "fp8", "forward fused"),
                                                             ("gate_up", "bf16", "forward fused"), ("gate_up", "fp8", "forward fused")}
    for (group, base, form), diff in diffs.items():
        assert diff <= (0.0 if form.startswith("forward") else 2 ** -7), (group, base, form, diff)


def test_the_piggyback_bench_stacks_the_terms_without_changing_the_layers_output(load_script):
    """scripts/piggyback_gemm_bench.py's premise: A's FP8 terms stacked under the activations' codes, with their own
    row scales, leave the layer's output rows as the plain GEMM gives them and give the terms' own product with W
    in the rows below (on CPU each output is its own dot product: bitwise)."""
    from loralab.speed.fp8 import quantize_rows

    bench = load_script("piggyback_gemm_bench")
    torch.manual_seed(0)
    codes, scales = quantize_rows(torch.randn(48, 64, dtype=torch.bfloat16))
    xq, sx = quantize_rows(torch.randn(16, 64, dtype=torch.bfloat16))
    tq, st = quantize_rows(torch.randn(8, 64, dtype=torch.bfloat16) * 0.02)
    sw = scales.view(1, -1)
    both = bench.stacked_product(xq, sx, tq, st, codes, sw)
    assert both.shape == (24, 48)
    assert torch.equal(both[:16], bench._mm(xq, codes.t(), sx, sw))
    assert torch.equal(both[16:], bench._mm(tq, codes.t(), st, sw))
    exact = (tq.double() * st.double()) @ (codes.double() * scales.double()).t()
    assert ((both[16:].double() - exact).abs().max() / exact.abs().max()).item() < 2 ** -8  # bf16 out


def test_the_piggyback_sums_weight_each_shape_by_its_gemms_in_a_decoder_layer(load_script):
    """forward_sums over the stored H100 rows (results/bench-fair-h100-1207e) gives the sums the bench printed then
    for separate q/k/v, and with the base's q/k/v fused one 6144-wide GEMM in place of q, k and v."""
    bench = load_script("piggyback_gemm_bench")
    stored = json.loads((Path(__file__).parents[1] / "results/bench-fair-h100-1207e/ablation/piggyback.json").read_text())
    sums = bench.forward_sums(stored["rows"])
    assert sums["separate q/k/v"] == stored["extra_ms_per_forward"]
    extra = {(r["shape"], r["form"]): r["extra_us"] for r in stored["rows"]}
    fused = 32 * (extra[("qkv fused", "+64")] + extra[("q / o", "+64")] + 2 * extra[("gate / up", "+64")]
                  + extra[("down", "+64")]) / 1000
    assert sums["fused q/k/v"]["+64"] == round(fused, 3)
