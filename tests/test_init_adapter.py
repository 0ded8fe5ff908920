"""``init_adapter``: a run starts from a saved adapter folder (seed 001's step 2, ``train_CorDA.sh
{path_to_decomposed_model}``) instead of computing an init.

- end to end: ``loralab decompose --save-path DIR`` (real SmolLM2-135M cut to two layers, real NQ-open rows),
  then ``loralab run`` from ``DIR/adapter`` with ``model_id`` left unset (the adapter's base, DIR): its first
  step's loss is the loss of DIR + the initial adapter (so the init was loaded, not recomputed: the residual alone
  differs), no calibration runs, the record names the folder and its weights' sha256 and calls the run CorDA's,
  and the trained adapter loads with plain peft on DIR;
- ``--resume`` goes on from a checkpoint to the same adapter as the uninterrupted run, and refuses once the
  folder's weights changed;
- every problem is reported at once before any model loads: a missing folder, no adapter_config.json, a key that
  shapes the weights set otherwise, a second init, a CorDA adapter on the original model, a plain adapter on a
  residual model, an init that loading would re-run, another peft type or model class, a method that does not
  compose with the folder's layer.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from loralab.cli import main
from loralab.config import ConfigError
from loralab.experiment import hashed_parameters, read_experiment
from loralab.results import sha256_file

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")
# peft warns of a CorDA initial adapter's config (corda_config kept, init_lora_weights true), as decompose saves it
pytestmark = pytest.mark.filterwarnings("ignore:.corda_config. specified but will be ignored:UserWarning")

RUN = {"task": "gsm8k", "max_train_samples": 4, "batch_size": 4, "max_steps": 2, "max_length": 64,
       "logging_steps": 1, "eval_tasks": [], "device": "cpu", "learning_rate": 1e-3}


def experiment(root: Path, name: str, params: dict, adapter: dict | None = None) -> Path:
    folder = root / "experiments" / "from-adapter" / name
    folder.mkdir(parents=True)
    (folder / "training_parameters.json").write_text(json.dumps(params))
    if adapter is not None:
        (folder / "adapter_config.json").write_text(json.dumps(adapter, default=list))  # peft's sets as lists
    return folder


def record(root: Path, status: str = "success") -> dict:
    found = [json.loads(p.read_text()) for p in (root / "loralab-results").rglob("*.json")]
    found = [r for r in found if r["train_info"]["status"] == status]
    return max(found, key=lambda r: r["run_info"]["created_at"])


@pytest.fixture(scope="module")
def decomposed(smollm2_cut_path, data_dir, tmp_path_factory) -> Path:
    """An IPA decomposition (q_proj and v_proj, r 4) saved with --save-path: residual model + initial adapter."""
    out = tmp_path_factory.mktemp("decomposed") / "ipa"
    assert main(["decompose", "--model", smollm2_cut_path, "--calib-size", "2", "--calib-seqlen", "16",
                 "--batch-size", "2", "--data-dir", str(data_dir), "--device", "cpu", "--r", "4", "--first-eigen",
                 "--target-modules", "q_proj", "v_proj", "--calib-dataset", "nqopen", "--save-path", str(out)]) == 0
    return out


def batch_loss(model_dir, data_dir, adapter=None) -> float:
    """The loss of the model in ``model_dir`` (+ ``adapter``, by plain peft) over every training example of
    ``RUN``, in one batch: what the run's first step computes before its update."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.config import build_parameters
    from loralab.data import collate
    from loralab.models import load_tokenizer
    from loralab.tasks import get_task

    tokenizer = load_tokenizer(str(model_dir))
    features = get_task("gsm8k").load(build_parameters({**RUN, "data_dir": str(data_dir)}), tokenizer).train
    assert 0 < len(features) <= RUN["batch_size"]  # the first optimizer batch is all of them
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(**collate(features, tokenizer.pad_token_id)).loss.item()


@pytest.mark.slow
def test_a_run_from_decompose_save_path_starts_at_the_decomposed_model_and_saves_a_plain_adapter(
        decomposed, data_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab import decomposition
    from loralab.methods.context import MethodContext

    def calibrated(*args, **kwargs):
        raise AssertionError("the run calibrated: the method's init ran")

    monkeypatch.setattr(MethodContext, "calibration_samples", calibrated)
    monkeypatch.setattr(decomposition, "attach_corda_eigens", calibrated)
    folder = experiment(tmp_path, "corda", {**RUN, "data_dir": str(data_dir), "init_adapter": str(decomposed / "adapter")})
    assert read_experiment(folder).params.model_id == str(decomposed)  # unset: the base the adapter names
    assert main(["run", str(folder)]) == 0
    result = record(tmp_path)

    first = result["train_info"]["metrics"][0]
    assert first["step"] == 1
    expected = batch_loss(decomposed, data_dir, decomposed / "adapter")
    assert first["train loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(batch_loss(decomposed, data_dir) - expected) > 1e-2  # the residual alone: another model
    run_info = result["run_info"]
    weights = decomposed / "adapter" / "adapter_model.safetensors"
    assert run_info["init_adapter"]["path"] == str((decomposed / "adapter").resolve())
    assert run_info["init_adapter"]["sha256"] == sha256_file(weights)
    assert run_info["init_adapter"]["decomposition"]["mode"] == "ipa"
    assert run_info["method"] == "corda_ipa" and run_info["method_parts"]["init"] == "corda_ipa"

    trained = Path(result["train_info"]["adapter_path"])
    saved = json.loads((trained / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(decomposed) and saved["r"] == 4  # its base, no rank-2r conversion
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(decomposed, dtype=torch.float32), trained)
    tensors, initial = load_file(str(trained / "adapter_model.safetensors")), load_file(str(weights))
    assert sorted(tensors) == sorted(initial)
    assert any(not torch.equal(tensors[k], initial[k]) for k in tensors)  # it trained
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(tensors) == 8  # 2 layers x (q_proj, v_proj) x (A, B)
    assert batch_loss(decomposed, data_dir, trained) < first["train loss"]  # two steps on its one batch helped


@pytest.mark.slow
def test_resume_goes_on_to_the_same_adapter_and_refuses_changed_weights(decomposed, data_dir, tmp_path, capsys):
    source = tmp_path / "adapter"
    shutil.copytree(decomposed / "adapter", source)
    params = {**RUN, "data_dir": str(data_dir), "init_adapter": str(source), "max_steps": 3, "checkpoint_steps": 1,
              "keep_checkpoints": 3}
    folder = experiment(tmp_path, "resumed", params)
    assert main(["run", str(folder)]) == 0
    (run_dir,) = (tmp_path / "loralab-outputs").iterdir()
    uninterrupted = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    # as if killed after step 2's checkpoint (the last step writes none: the adapter is saved): no finished mark
    (run_dir / "checkpoints" / "finished.json").unlink()
    assert json.loads((run_dir / "checkpoints" / "step-2" / "state.json").read_text())["init_adapter"]["path"] == str(source)
    assert main(["run", str(folder), "--resume"]) == 0
    resumed = record(tmp_path)
    assert resumed["train_info"]["resumed_from"].endswith("step-2")
    assert resumed["run_info"]["init_adapter"]["sha256"] == sha256_file(source / "adapter_model.safetensors")
    again = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)

    (run_dir / "checkpoints" / "finished.json").unlink()
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in tensors.items()}, str(source / "adapter_model.safetensors"))
    capsys.readouterr()
    assert main(["run", str(folder), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: 'init_adapter'" in err and "changed since the run began" in err

    # an experiment's "all-linear" (checked once the model names its layers): the folder adapted q_proj and v_proj only
    wider = experiment(tmp_path, "all-linear", {**params, "max_steps": 1}, {"target_modules": "all-linear"})
    assert main(["run", str(wider)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the adapter built from its config on this model: the model's adapter has, and the folder " \
           "lacks, 20 tensor(s)" in err  # 2 layers x (k, o, gate, up, down) x (A, B)


# ---- checked before any model loads --------------------------------------------------------------------
def adapter_folder(root: Path, name: str, **config) -> Path:
    """A peft adapter folder: adapter_config.json as peft writes it, and a weights file (not read before the run)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(LoraConfig(**config).to_dict(), default=list))
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture
def residual(tmp_path, smollm2_cut_path) -> Path:
    """A residual model folder as ``loralab decompose --save-path`` marks one (its config and decompose.json:
    nothing here loads its weights), holding its CorDA adapter."""
    folder = tmp_path / "residual"
    folder.mkdir()
    shutil.copy(Path(smollm2_cut_path) / "config.json", folder / "config.json")
    (folder / "decompose.json").write_text(json.dumps({"model_id": smollm2_cut_path, "r": 4, "mode": "kpa"}))
    adapter = adapter_folder(folder, "adapter", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM", corda_config={"corda_method": "kpm"},
                             base_model_name_or_path=str(folder))
    assert adapter == folder / "adapter"
    return folder


def problems(folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_experiment(folder)
    return info.value.problems


def test_every_problem_of_an_init_adapter_is_reported_at_once_before_the_model_loads(tmp_path, residual, data_dir,
                                                                                    smollm2_cut_path):
    base = {**RUN, "data_dir": str(data_dir)}
    missing = tmp_path / "nowhere"
    found = problems(experiment(tmp_path, "missing", {**base, "init_adapter": str(missing), "learning_rate": -1}))
    assert any(p.startswith(f"'init_adapter' = {str(missing)!r}: no such folder") for p in found)
    assert any(p.startswith("'learning_rate' = -1") for p in found)  # reported together

    found = problems(experiment(tmp_path, "no-config", {**base, "init_adapter": str(residual)}))
    assert any("holds no adapter_config.json" in p and "its subfolder adapter/ is one" in p for p in found)

    # the experiment's adapter_config.json (every key, as LoraConfig.save_pretrained writes it) sets r (8: peft's
    # default, and still a setting), target_modules (the same set) and an init; training_parameters another init
    own = {**LoraConfig(r=8, lora_alpha=4, target_modules=["v_proj", "q_proj"]).to_dict(), "init_lora_weights": "pissa"}
    found = problems(experiment(tmp_path, "disagree", {**base, "init_adapter": str(residual / "adapter"),
                                                       "init": "milora"}, own))
    assert any(p.startswith("adapter_config.json 'r' = 8 but the adapter in") and "has 'r' = 4" in p for p in found)
    assert not any("'target_modules'" in p or "'lora_alpha'" in p for p in found)  # the same set; the same value
    assert any("'init_lora_weights' = 'pissa': two initialisations" in p for p in found)
    assert any(p.startswith("'init' = 'milora' with 'init_adapter'") for p in found)

    # a CorDA adapter on the original model: the rule of merge.residual_base_problem, naming both keys
    found = problems(experiment(tmp_path, "original", {**base, "init_adapter": str(residual / "adapter"),
                                                       "model_id": smollm2_cut_path}))
    assert len(found) == 1 and found[0].startswith("'init_adapter' with 'model_id'")
    assert "carries 'corda_config'" in found[0] and f"(here: 'model_id' {residual.resolve()})" in found[0]

    # a plain adapter on the residual model; an adapter whose init loading would re-run; another peft type; a
    # classification task for a causal-LM adapter
    plain = adapter_folder(tmp_path, "plain", r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    found = problems(experiment(tmp_path, "plain-on-residual", {**base, "init_adapter": str(plain),
                                                                "model_id": str(residual)}))
    assert len(found) == 1 and "is a residual model" in found[0] and "carries no 'corda_config'" in found[0]
    pissa = adapter_folder(tmp_path, "pissa", r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    found = problems(experiment(tmp_path, "pissa", {**base, "init_adapter": str(pissa), "model_id": smollm2_cut_path}))
    assert len(found) == 1 and "records 'init_lora_weights' = 'pissa'" in found[0]
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["v_proj"]}))
    found = problems(experiment(tmp_path, "ia3", {**base, "init_adapter": str(ia3), "model_id": smollm2_cut_path}))
    assert any("holds a 'IA3' adapter" in p for p in found) and any("holds no adapter_model.safetensors" in p for p in found)
    found = problems(experiment(tmp_path, "glue", {**base, "task": "glue/rte", "init_adapter": str(plain),
                                                   "model_id": "packaged:minilm-l6"}))
    assert any("is a CAUSAL_LM adapter and 'task' = 'glue/rte' trains a SEQ_CLS model" in p for p in found)

    # the method is checked against the folder's layer: LoRA-FA's optimizer does not compose with its DoRA
    dora = adapter_folder(tmp_path, "dora", r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    found = problems(experiment(tmp_path, "dora-lorafa", {**base, "init_adapter": str(dora), "optimizer": "lorafa",
                                                          "model_id": smollm2_cut_path}))
    assert len(found) == 1 and "'optimizer' = 'lorafa'" in found[0] and "does not compose" in found[0]


def test_the_folders_config_is_the_adapters_and_a_setting_that_leaves_its_weights_alone_wins(tmp_path, residual,
                                                                                             data_dir):
    own = LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj", "q_proj"], lora_dropout=0.1).to_dict()
    folder = experiment(tmp_path, "dropout", {**RUN, "data_dir": str(data_dir), "init_adapter": str(residual / "adapter")},
                        own)
    exp = read_experiment(folder)
    cfg = exp.peft_config
    assert (cfg.r, cfg.lora_alpha, sorted(cfg.target_modules), cfg.lora_dropout) == (4, 4, ["q_proj", "v_proj"], 0.1)
    assert cfg.init_lora_weights is True and cfg.inference_mode is False  # no init runs; the adapter trains
    assert cfg.corda_config is not None  # what made it, for the record and for merge's base rule
    assert exp.params.model_id == str(residual)
    assert hashed_parameters(exp.params)["init_adapter"] == str(residual / "adapter")
    alone = read_experiment(experiment(tmp_path, "none", {**RUN, "data_dir": str(data_dir)}, {"r": 4}))
    assert "init_adapter" not in hashed_parameters(alone.params)  # unset: every earlier experiment's hash holds


# ---- a newcomer's reproduction of seed 001 on the CPU ------------------------------------------------------
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_mismatched_target_modules_names_the_difference_and_the_closest_name(tmp_path, smollm2_cut_path, data_dir):
    """The folder adapted all 7 projections; the experiment's adapter_config.json lists 7 names in another order
    with one typo: the problem names that one name, the folder's closest name, and the name only the folder has
    (it printed both 7-name lists)."""
    folder = tmp_path / "residual"
    folder.mkdir()
    shutil.copy(Path(smollm2_cut_path) / "config.json", folder / "config.json")
    (folder / "decompose.json").write_text(json.dumps({"model_id": smollm2_cut_path, "r": 4, "mode": "kpa"}))
    adapter_folder(folder, "adapter", r=4, lora_alpha=4, target_modules=SEVEN, task_type="CAUSAL_LM",
                   corda_config={"corda_method": "kpm"}, base_model_name_or_path=str(folder))
    mine = ["down_proj", "up_proj", "gate_proj", "o_proj", "v_proj", "k_proj", "q_prj"]
    found = problems(experiment(tmp_path, "typo", {**RUN, "data_dir": str(data_dir), "init_adapter": str(folder / "adapter")},
                                {"r": 4, "target_modules": mine}))
    (line,) = [p for p in found if "'target_modules'" in p]
    assert line.startswith("adapter_config.json 'target_modules' differs from the 'target_modules' of the adapter in")
    assert "only adapter_config.json names 'q_prj' (did you mean 'q_proj'?); only the folder names 'q_proj';" in line
    assert "'down_proj'" not in line  # the names both have are not listed


def test_calibration_provenance_checks_the_decompositions_file_against_this_runs_evaluations(tmp_path, residual,
                                                                                              data_dir, capsys):
    """decompose.json's calibration (the local NQ-open dev file, as ``decompose --calib-dataset nqopen`` records
    it) against the run's evaluations: nq_open scores that file (a warning and overlaps_evaluations), gsm8k does not;
    the decomposition's own overlaps_evaluations (computed against other evaluations) is not taken."""
    from loralab.init_adapter import calibration_provenance, provenance

    nq = str(data_dir / "nq_open" / "NQ-open.dev.jsonl")
    cal = {"source": nq, "split": "dev", "official_split": "train", "name": "nqopen", "num_samples": 2,
           "overlaps_evaluations": ["wikitext2"]}
    (residual / "decompose.json").write_text(json.dumps({"model_id": "m", "r": 4, "mode": "kpa", "calibration": cal}))
    source = provenance(residual / "adapter", str(residual))
    got = calibration_provenance(source, ["gsm8k", "nq_open"], str(data_dir), "dir/adapter")
    assert got["source"] == nq and got["split"] == "dev" and got["num_samples"] == 2
    assert got["decomposition"] == str((residual / "decompose.json").resolve())
    assert got["overlaps_evaluations"] == ["nq_open"] and "nq_open" in got["overlap_note"]
    err = capsys.readouterr().err
    assert "warning: 'init_adapter' = 'dir/adapter' (its decomposition calibrated on 'nqopen'): the calibration " \
           f"text ({nq}) is what nq_open score(s)" in err
    clean = calibration_provenance(source, ["gsm8k"], str(data_dir), "dir/adapter")
    assert clean["overlaps_evaluations"] == [] and "overlap_note" not in clean
    assert capsys.readouterr().err == ""
    (residual / "decompose.json").write_text(json.dumps({"model_id": "m", "r": 4, "mode": "kpa"}))
    assert calibration_provenance(provenance(residual / "adapter", str(residual)), ["nq_open"], None, "x") is None


@pytest.mark.slow
def test_a_run_from_a_decomposition_calibrated_on_nq_open_dev_records_and_warns_the_overlap(decomposed, data_dir,
                                                                                            tmp_path, capsys):
    """``decompose --calib-dataset nqopen`` offline reads NQ-open dev, the file ``nq_open`` scores: a run from its
    adapter with eval_tasks ["nq_open"] warns and records the decomposition's calibration in
    meta_info.dataset.calibration (it was null, the fact only in a note under run_info.init_adapter)."""
    params = {**RUN, "data_dir": str(data_dir), "init_adapter": str(decomposed / "adapter"), "max_steps": 1,
              "eval_tasks": ["nq_open"], "max_eval_samples": 1, "generation": {"max_new_tokens": 4}}
    assert main(["run", str(experiment(tmp_path, "nq", params))]) == 0
    err = capsys.readouterr().err
    nq = (data_dir / "nq_open" / "NQ-open.dev.jsonl").resolve()
    assert f"warning: 'init_adapter' = {str(decomposed / 'adapter')!r} (its decomposition calibrated on 'nqopen')" in err
    calibration = record(tmp_path)["meta_info"]["dataset"]["calibration"]
    assert calibration["source"] == str(nq) and calibration["split"] == "dev"
    assert calibration["overlaps_evaluations"] == ["nq_open"] and calibration["overlap_note"]
    assert calibration["decomposition"] == str((decomposed / "decompose.json").resolve())
