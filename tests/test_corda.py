"""CorDA toolkit: our attach_corda_eigens against peft's preprocess_corda, on the real
SmolLM2-135M and MiniLM-L6, restricted to a few layers to stay fast on CPU."""

import copy

import pytest
import torch

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402

from loralab.decomposition import attach_corda_eigens  # noqa: E402
from loralab.decomposition.calibration import make_batches  # noqa: E402
from loralab.decomposition.corda import check_options, damped_inverse, decompose_weight  # noqa: E402
from loralab.decomposition.covariance import collect_input_stats  # noqa: E402

TEXTS = [
    "when was the last time anyone was on the moon",
    "who wrote he ain't heavy he's my brother lyrics and when was it first recorded by the hollies",
    "how many seasons of the bastard executioner are there",
    "The quick brown fox jumps over the lazy dog while the farmer sleeps in the afternoon sun.",
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32), tok


def _config(method, targets, layers, r=8, **corda):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, layers_to_transform=layers,
                      init_lora_weights="corda", corda_config=CordaConfig(corda_method=method, **corda))


def _eigens(model):
    return {n: m.eigens for n, m in model.named_modules() if hasattr(m, "eigens")}


def _peft_reference(model, tok, config):
    def run_model():
        for t in TEXTS:
            model(**tok(t, return_tensors="pt"))

    preprocess_corda(model, config, run_model=run_model)


@pytest.mark.slow
def test_matches_peft_preprocess_corda_smollm2(smol):
    """KPA here; IPA is checked against peft on MiniLM below (padded batch)."""
    method = "kpm"
    base, tok = smol
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    _peft_reference(ref, tok, _config(method, targets, [1]))
    singles = [tok(t, return_tensors="pt") for t in TEXTS]  # batch 1, as peft needs
    attach_corda_eigens(ours, _config(method, targets, [1]), singles, options={"normalisation": "count", "progress": False})
    e_ref, e_ours = _eigens(ref), _eigens(ours)
    assert sorted(e_ref) == sorted(e_ours) and len(e_ref) == 4
    for name in e_ref:
        torch.testing.assert_close(e_ours[name].S_WC, e_ref[name].S_WC, rtol=1e-5, atol=1e-6)
        for k in ("U_WC", "V_WC"):
            # unit-norm singular vectors in fp32: a component moves by ~eps/gap between two correct
            # SVDs (seen: 3.8e-6 on 1 of 12,288 components, with this machine's BLAS threads), so
            # agreement is checked to 1e-5 absolute, five digits of a unit vector
            torch.testing.assert_close(getattr(e_ours[name], k), getattr(e_ref[name], k), rtol=1e-5, atol=1e-5)
    assert not ours.training and not ref.training  # preprocess_corda leaves eval mode
    # peft's own corda_init on both: identical adapters and residuals
    p_ref = get_peft_model(ref, _config(method, targets, [1]))
    p_ours = get_peft_model(ours, _config(method, targets, [1]))
    s_ref, s_ours = p_ref.state_dict(), p_ours.state_dict()
    for key in s_ref:
        torch.testing.assert_close(s_ours[key], s_ref[key], rtol=1e-5, atol=1e-6)
    assert not _eigens(p_ours)  # corda_init consumed them


def test_matches_peft_on_minilm_and_reproduces_w(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    base = AutoModel.from_pretrained(minilm_path, dtype=torch.float32)
    targets = ["query", "key", "value"]
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    _peft_reference(ref, tok, _config("ipm", targets, [0]))
    batch = tok(TEXTS, return_tensors="pt", padding=True)  # padded batch of 4
    attach_corda_eigens(ours, _config("ipm", targets, [0]), [batch], options={"normalisation": "count", "progress": False})
    for name, e in _eigens(ref).items():
        mine = _eigens(ours)[name]
        # padding changes the attention kernel's rounding only: the top components agree closely
        torch.testing.assert_close(mine.S_WC, e.S_WC, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(mine.U_WC @ torch.diag(mine.S_WC) @ mine.V_WC.T,
                                   e.U_WC @ torch.diag(e.S_WC) @ e.V_WC.T, rtol=1e-3, atol=1e-4)
    originals = {n: m.weight.detach().clone() for n, m in ours.named_modules() if hasattr(m, "eigens")}
    peft_model = get_peft_model(ours, _config("ipm", targets, [0]))
    for name, w in originals.items():
        layer = peft_model.get_submodule("base_model.model." + name)
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(layer.base_layer.weight + delta, w, rtol=1e-5, atol=2e-6)
        assert (layer.base_layer.weight - w).norm() > 1e-3  # the adapter really took a part of W
    x = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**x).last_hidden_state, base(**x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_kpa_takes_smallest_ipa_largest_and_solvers_agree(smol):
    model, tok = smol
    layer = model.model.layers[2].self_attn.k_proj
    batches = make_batches([tok(t, return_tensors="pt").input_ids[0] for t in TEXTS], 2, tok.pad_token_id)
    (st,) = [s for s in collect_input_stats(model, {"k": layer}, batches, progress=False)]
    fixed, inv, _ = damped_inverse(st.cov / 256)
    w = layer.weight.detach()
    full = torch.linalg.svdvals(w.float() @ fixed)
    kpa = decompose_weight(w, fixed, inv, 8, largest=False, solver="svd")
    ipa = decompose_weight(w, fixed, inv, 8, largest=True, solver="svd")
    torch.testing.assert_close(kpa.S, full[-8:])
    torch.testing.assert_close(ipa.S, full[:8])
    assert kpa.S.max() < ipa.S.min()
    # reference in fp64: the smallest components of W C are below fp32 SVD's accuracy
    U, S, Vh = torch.linalg.svd(w.double() @ fixed.double(), full_matrices=False)
    for largest, sl in ((False, slice(-8, None)), (True, slice(0, 8))):
        ref = (U[:, sl] * S[sl]) @ Vh[sl] @ inv.double()
        for solver in ("gram", "lowrank") if largest else ("gram",):
            d = decompose_weight(w, fixed, inv, 8, largest=largest, solver=solver, niter=12)
            torch.testing.assert_close(d.S.double(), S[sl], rtol=1e-3, atol=1e-7)
            product = (d.U * d.S @ d.V.T).double()
            assert ((product - ref).norm() / ref.norm()).item() < 1e-2, solver
    with pytest.raises(ValueError, match="largest components only"):
        decompose_weight(w, fixed, inv, 8, largest=False, solver="lowrank")


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_padded_covariance_equals_one_at_a_time(smol, side):
    model, tok = smol
    modules = {n: m for n, m in model.named_modules() if n.startswith("model.layers.3.") and n.endswith("_proj")}
    samples = [tok(t, return_tensors="pt").input_ids[0] for t in TEXTS]
    one = collect_input_stats(model, modules, make_batches(samples, 1, tok.pad_token_id), abs_mean=True, progress=False)
    batched = collect_input_stats(model, modules, make_batches(samples, 4, tok.pad_token_id, side), abs_mean=True,
                                  progress=False)
    groups = sorted(tuple(sorted(s.names)) for s in batched)
    assert len(groups) == 4  # q/k/v share one input, gate/up one, o and down their own
    assert any(len(g) == 3 and all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj") for n in g) for g in groups)
    by_names = {tuple(s.names): s for s in one}
    for s in batched:
        ref = by_names[tuple(s.names)]
        assert s.samples == ref.samples == 4
        torch.testing.assert_close(s.cov, ref.cov, rtol=1e-4, atol=1e-4 * ref.cov.abs().max().item())
        torch.testing.assert_close(s.abs_mean, ref.abs_mean, rtol=1e-4, atol=1e-6)


def test_cache_hit_skips_work_and_changed_setting_invalidates(smol, tmp_path):
    base, tok = smol
    batches = [tok(TEXTS, return_tensors="pt", padding=True)]
    calls = []

    def run(options):
        model = copy.deepcopy(base)
        model.register_forward_hook(lambda *a: calls.append(1))
        opts = {"cache_dir": str(tmp_path), "progress": False, **options}
        attach_corda_eigens(model, _config("kpm", ["v_proj"], [0]), batches, options=opts)
        return _eigens(model)["model.layers.0.self_attn.v_proj"]

    first = run({})
    n_first = len(calls)
    assert n_first >= 1
    again = run({})
    assert len(calls) == n_first  # no forward pass: covariances and eigens came from the cache
    torch.testing.assert_close(again.U_WC, first.U_WC)
    changed = run({"normalisation": "count"})
    assert len(calls) > n_first  # a new setting recomputes
    # C/256 vs C/4: same product U S V^T, different factor scale
    torch.testing.assert_close(changed.U_WC * changed.S_WC @ changed.V_WC.T, first.U_WC * first.S_WC @ first.V_WC.T,
                               rtol=1e-3, atol=1e-5)
    assert not torch.allclose(changed.S_WC, first.S_WC)


def test_options_are_checked():
    with pytest.raises(ValueError, match="did you mean 'normalisation'"):
        check_options({"normalization": "count"})
    with pytest.raises(ValueError, match="allowed"):
        check_options({"scaling": "max"})
    assert check_options(None)["norm_constant"] == 256


@pytest.mark.slow  # a regression case (2-3 s); the fast subset keeps CorDA's decomposition tests
def test_calibration_feeds_token_type_ids_as_training_does(minilm_path, data_dir):
    """Issue 12 item 5: CorDA's covariance on real RTE sentence pairs equals the one computed from
    what the training forward feeds layer 0's query (token_type_ids included); without the
    token types (the old calibration) it differs, so the test can fail."""
    from loralab.config import build_parameters
    from loralab.data import collate
    from loralab.methods.context import MethodContext
    from loralab.models import load_model, load_tokenizer
    from loralab.tasks import get_task

    model = load_model("packaged:minilm-l6", "seq_cls", 2).eval()
    tok = load_tokenizer("packaged:minilm-l6")
    params = build_parameters({"task": "glue/rte", "data_dir": str(data_dir), "max_length": 128,
                               "max_train_samples": 64, "calibration": {"num_samples": 64, "batch_size": 16}})
    features = get_task("glue/rte").load(params, tok).train
    assert any(1 in f["token_type_ids"] for f in features)
    target = {"bert.encoder.layer.0.attention.self.query": model.bert.encoder.layer[0].attention.self.query}

    batches = MethodContext(params, features, tok).calibration_batches()
    assert all("token_type_ids" in b for b in batches)
    ours = collect_input_stats(model, target, batches, progress=False)[0].cov

    # what the training loop feeds the model: collate(features) (loralab.run.step.Step)
    seen = []
    handle = target["bert.encoder.layer.0.attention.self.query"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    batch = collate(features, tok.pad_token_id)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    x, mask = seen[0], batch["attention_mask"].bool()
    ref = torch.zeros_like(ours)
    for n in range(x.shape[0]):
        xn = x[n][mask[n]]
        xn = xn / xn.max().abs()  # CorDA's per-sample scale (signed max), as the official code
        ref += xn.T @ xn
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    no_types = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in batches]
    old = collect_input_stats(model, target, no_types, progress=False)[0].cov
    assert torch.linalg.matrix_norm(old - ref) / torch.linalg.matrix_norm(ref) > 0.01
