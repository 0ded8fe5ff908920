"""``loralab eval``'s output says what it scored (a newcomer reproducing seed 001 could not tell later
which adapter or which PTB split made a number): one reserved ``meta_info`` key (``tasks.eval_output``)
beside the evaluations, with the data file each evaluation read and its sha256, the model, the adapter,
the re-scored file and the settings. The live path with a CorDA adapter is in ``test_corda_newcomer.py``."""

import json

from loralab.cli import main
from loralab.results import sha256_file
from loralab.tasks.eval_output import RESERVED, data_provenance, task_metrics
from loralab.tasks.evaluate import EVALS, GROUPS
from loralab.tasks.glue import TASKS as GLUE


def test_no_evaluation_or_group_is_named_like_a_reserved_key():
    assert not set(RESERVED) & (set(EVALS) | set(GROUPS) | set(GLUE))


def test_a_rescored_output_names_the_generations_the_data_and_the_settings(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("LORALAB_DATA_DIR", str(data_dir))
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"task": "gsm8k", "id": 0, "completion": "The answer is: 18"}) + "\n")  # row 0's gold: 18
    out = tmp_path / "m.json"
    assert main(["eval", "--tasks", "gsm8k", "--generations", str(gens), "--max-samples", "1", "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written  # printed and written: one document
    assert set(written) == {"gsm8k", "meta_info"}
    assert task_metrics(written) == {"gsm8k": written["gsm8k"]} and written["gsm8k"]["accuracy"] == 1.0
    meta = written["meta_info"]
    assert meta["model"] is None and meta["adapter"] is None  # re-scored: no model ran
    assert meta["generations"] == {"path": str(gens.resolve()), "sha256": sha256_file(gens)}
    gsm8k = meta["data"]["gsm8k"]
    assert gsm8k["read"] == "file" and gsm8k["path"] == str((data_dir / "gsm8k" / "test.jsonl").resolve())
    assert gsm8k["sha256"] == sha256_file(data_dir / "gsm8k" / "test.jsonl") and "test" in gsm8k["copy_of"]
    assert meta["settings"]["max_samples"] == "1" and meta["settings"]["data_dir"] == str(data_dir)  # from the env
    assert meta["git"]["code_sha256"] and meta["package_info"]["peft"] and meta["created_at"].endswith("Z")


def test_each_evaluation_records_the_file_its_loader_opens_or_the_hub_split(data_dir):
    ptb = data_provenance("ptb", data_dir)
    assert ptb["path"].endswith("ptb/ptb.valid.txt") and ptb["sha256"] == sha256_file(data_dir / "ptb" / "ptb.valid.txt")
    assert "validation" in ptb["copy_of"] and "validation" in ptb["description"]
    assert data_provenance("ptb", None) == {"read": "hub", "hub": "ptb_text_only (penn_treebank, validation)",
                                            "description": EVALS["ptb"].description}
    rte = data_provenance("glue/rte", data_dir)
    assert rte["path"].endswith("RTE/dev.tsv") and rte["sha256"] == sha256_file(rte["path"])
    assert data_provenance("glue/rte", None) == {"read": "hub", "hub": "nyu-mll/glue (rte, validation)"}
    assert data_provenance("nq_open_lm_eval", data_dir)["read"] == "lm-eval's own download"
