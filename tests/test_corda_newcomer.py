"""What a newcomer reproducing seed 001 met with a trained CorDA adapter, on real SmolLM2-135M cut to two decoder
layers (``smollm2_cut_path``), a real ``loralab decompose`` (KPA, q/k/v, r 4, tiny calibration) and real data:

- ``merge --to-lora`` refused the trained adapter and its initial one for "'target_modules': trained ['q_proj',
  'k_proj', ...] vs initial ['v_proj', ...]", the same names: peft keeps them as a set and writes ``list(set)``,
  whose order follows the process's PYTHONHASHSEED (decompose and training are two processes);
- ``merge`` and ``eval --adapter`` printed peft's "`corda_config` specified but will be ignored" warning;
- ``eval --output`` did not say which model, adapter or data split made its numbers.
"""

import json
import shutil
import warnings

import pytest
import torch

from loralab.cli import main
from loralab.models import model_provenance
from loralab.results import sha256_file

pytest.importorskip("attr", reason="peft's corda module imports the attrs package")
pytestmark = pytest.mark.slow  # the fixture decomposes (~15 s); each test then loads and merges SmolLM2


def _logits(model_dir, adapter=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        with warnings.catch_warnings():  # peft's corda_config warning (not what these lines test)
            warnings.filterwarnings("ignore", message="`corda_config` specified", category=UserWarning)
            model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(**tok(["who sang the song hey jude"], return_tensors="pt")).logits


@pytest.fixture(scope="module")
def corda(smollm2_cut_path, data_dir, tmp_path_factory):
    """(residual model folder, initial adapter, trained adapter): ``loralab decompose --save-path``, then every
    factor moved by a fixed random amount (a stand-in for training) and saved by peft, with target_modules in
    another order than the initial adapter's, as another process writes them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("corda-newcomer")
    residual = root / "kpa"
    assert main(["decompose", "--model", smollm2_cut_path, "--calib-size", "2", "--calib-seqlen", "16", "--batch-size",
                 "2", "--data-dir", str(data_dir), "--device", "cpu", "--r", "4", "--target-modules", "q_proj", "k_proj",
                 "v_proj", "--calib-dataset", "nqopen", "--save-path", str(residual)]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`corda_config` specified", category=UserWarning)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(residual, dtype=torch.float32),
                                          residual / "adapter", is_trainable=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    trained = root / "trained"
    model.save_pretrained(trained)
    initial = json.loads((residual / "adapter" / "adapter_config.json").read_text())["target_modules"]
    path = trained / "adapter_config.json"
    config = json.loads(path.read_text())
    assert config.get("corda_config") and config["base_model_name_or_path"] == str(residual.resolve())
    path.write_text(json.dumps({**config, "target_modules": initial[::-1]}, indent=2))
    return residual, residual / "adapter", trained


def test_to_lora_takes_the_same_modules_in_another_order(corda, smollm2_cut_path, tmp_path, capsys):
    residual, initial, trained = corda
    assert main(["merge", "--adapter", str(trained), "--to-lora", str(initial), "--out", str(tmp_path / "lora")]) == 0, \
        capsys.readouterr().err
    # the rank-2r LoRA on the original model is the trained model (W_res + s·B·A)
    torch.testing.assert_close(_logits(smollm2_cut_path, tmp_path / "lora"), _logits(residual, trained),
                               rtol=1e-4, atol=2e-4)


def test_a_real_difference_names_only_the_differing_modules(corda, tmp_path, capsys):
    _, initial, trained = corda
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    path = other / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["o_proj", "q_proj", "v_proj"]}))
    assert main(["merge", "--adapter", str(other), "--to-lora", str(initial), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot convert: 'target_modules' differs: trained only ['o_proj'], initial only ['k_proj']" in err
    assert "q_proj" not in err and not (tmp_path / "x").exists()


def _corda_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "corda_config" in str(w.message)]


def test_merge_and_eval_of_a_corda_adapter_do_not_print_peft_s_corda_config_warning(corda, tmp_path, data_dir):
    _, _, trained = corda
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["merge", "--adapter", str(trained), "--out", str(tmp_path / "merged")]) == 0
        assert main(["eval", "--adapter", str(trained), "--tasks", "ptb", "--max-samples", "1", "--options",
                     '{"ptb": {"seq_len": 16}}', "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    assert _corda_warnings(caught) == []
    # silenced only around loralab's loads: peft still says it anywhere else
    from peft import LoraConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoraConfig.from_pretrained(str(trained))
    assert len(_corda_warnings(caught)) == 1


def test_only_that_warning_is_silenced():
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig, EvaConfig

    from loralab.merge import quiet_corda_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_corda_config():
            LoraConfig(init_lora_weights=True, corda_config=CordaConfig(), eva_config=EvaConfig())
    assert [str(w.message)[:12] for w in caught] == ["`eva_config`"]


def test_the_eval_output_names_the_model_the_adapter_and_the_ptb_split(corda, tmp_path, data_dir):
    residual, _, trained = corda
    out = tmp_path / "m.json"
    assert main(["eval", "--adapter", str(trained), "--tasks", "ptb,wikitext2", "--max-samples", "1", "--options",
                 '{"seq_len": 16}', "--data-dir", str(data_dir), "--device", "cpu", "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(written) == {"ptb", "wikitext2", "meta_info"} and written["ptb"]["windows"] == 1
    meta = written["meta_info"]
    assert meta["model"] == {**model_provenance(str(residual.resolve())), "from": "the adapter's base_model_name_or_path"}
    assert meta["adapter"]["path"] == str(trained.resolve())
    assert meta["adapter"]["weights"] == {"adapter_model.safetensors": sha256_file(trained / "adapter_model.safetensors")}
    assert meta["adapter"]["config_sha256"] == sha256_file(trained / "adapter_config.json")
    ptb, wiki = meta["data"]["ptb"], meta["data"]["wikitext2"]
    assert ptb["path"] == str((data_dir / "ptb" / "ptb.valid.txt").resolve()) and "validation" in ptb["copy_of"]
    assert ptb["sha256"] == sha256_file(data_dir / "ptb" / "ptb.valid.txt")
    assert wiki["path"].endswith("wikitext-2/wiki.test.raw") and "test" in wiki["copy_of"]
    assert meta["settings"]["options"] == {"seq_len": 16} and meta["settings"]["dtype"] == "float32"
