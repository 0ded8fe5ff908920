"""``speed.grad_reduce: "after_backward"`` (``run/reduce.py``): two gloo processes that sum their
gradients after the backward train the same LoRA as DDP and as one process over the same optimizer
batches (rank 0's init broadcast, uneven shards, accumulation over micro-batches), and the
all-reduce itself keeps one process's view of parameters without gradients."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from loralab import distributed
from loralab.config import ConfigError, build_parameters
from loralab.experiment import hashed_parameters
from loralab.run.reduce import all_reduce_grads
from loralab.run.step import make_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(seed: int, dora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                            use_dora=dora))


def _batches() -> list[list[dict]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(3):  # 5 samples: shards of 3 and 2; lengths 3..14 tokens
        lengths = torch.randint(3, 15, (5,), generator=g).tolist()
        out.append([{"input_ids": torch.randint(1, 97, (n,), generator=g).tolist()} for n in lengths])
    for batch in out:
        for f in batch:
            f["labels"] = list(f["input_ids"])
    return out


def _train(seed: int, grad_reduce: str, launch=None, dora: bool = False) -> dict:
    model = _model(seed, dora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    step, resolved = make_step(model, optimizer, speed={"grad_reduce": grad_reduce, "micro_batch": 1}, kind="causal_lm",
                               dtype="float32", device=torch.device("cpu"), features=[], batch_size=5, limit=5,
                               max_length=16, pad_id=0, launch=launch, log=lambda s: None)
    losses = [float(step(batch).loss) for batch in _batches()]
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "state": state, "wrapped": step.wrapped is not None, "grad_reduce": resolved.grad_reduce}


def _worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    launch = distributed.init("cpu")
    try:
        # each rank builds its own init (seed 100 + rank): the runs must train from rank 0's
        runs = {mode: _train(100 + rank, mode, launch) for mode in ("ddp", "after_backward")}
        # DoRA: its cached ||W||² must follow the broadcast base weights, not this rank's own init
        runs["dora"] = _train(100 + rank, "after_backward", launch, dora=True)
        # the all-reduce on its own: a gradient on rank 1 only, none anywhere, buckets of 2 values
        a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
        b.grad = torch.full((3,), 2.0) if rank == 1 else None
        a.grad = torch.arange(3.0) + rank
        count = all_reduce_grads([a, b, c], bucket_bytes=8)
        runs["unit"] = {"a": a.grad, "b": b.grad, "c": c.grad, "count": count}
        torch.save(runs, f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_after_backward_trains_like_ddp_and_one_process(tmp_path):
    torch.set_num_threads(1)
    one = _train(100, "after_backward")  # one process: the setting changes nothing
    one_dora = _train(100, "after_backward", dora=True)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    init0, init1 = (dict(_model(seed).named_parameters()) for seed in (100, 101))
    assert not torch.equal(init0["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"],
                           init1["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"])  # so the
    # equality below needs rank 0's init broadcast
    for runs in ranks:
        ddp, after = runs["ddp"], runs["after_backward"]
        assert ddp["wrapped"] and not after["wrapped"]  # DDP's hooks, then none
        torch.testing.assert_close(torch.tensor(after["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
        for name, value in one["state"].items():
            # the sum of the same two shard gradients in another order than one process's backward
            torch.testing.assert_close(after["state"][name], value, rtol=1e-4, atol=1e-6)
            assert torch.equal(after["state"][name], ddp["state"][name]), name  # a + b both ways: bitwise
        for name, value in one_dora["state"].items():
            torch.testing.assert_close(runs["dora"]["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        unit = runs["unit"]
        assert torch.equal(unit["a"], torch.tensor([1.0, 3.0, 5.0]))
        assert torch.equal(unit["b"], torch.full((3,), 2.0))  # rank 0 took part with zeros
        assert unit["c"] is None and unit["count"] == 6  # no gradient anywhere: left as one process leaves it


def test_grad_reduce_is_checked_hashed_only_when_set_and_refused_under_fsdp():
    with pytest.raises(ConfigError, match=r"'speed.grad_reduce' = 'after-backward' is not allowed; allowed: ddp, after_backward"):
        build_parameters({"speed": {"grad_reduce": "after-backward"}})
    assert "grad_reduce" not in hashed_parameters(build_parameters({}))["speed"]  # old hashes unchanged
    assert hashed_parameters(build_parameters({"speed": {"grad_reduce": "after_backward"}}))["speed"]["grad_reduce"] == "after_backward"
    launch = distributed.Launch(rank=0, world_size=2, backend="gloo", sharding="fsdp")
    with pytest.raises(ConfigError, match=r"speed.grad_reduce.*--sharding fsdp"):
        make_step(_model(0), None, speed={"grad_reduce": "after_backward"}, kind="causal_lm", dtype="float32",
                  device=torch.device("cpu"), features=[], batch_size=2, limit=2, max_length=8, pad_id=0, launch=launch)


def test_run_refuses_after_backward_under_fsdp_before_loading_anything(tmp_path, capsys, monkeypatch):
    import json

    from peft import LoraConfig

    from loralab.cli import main

    folder = tmp_path / "experiments" / "dist" / "fsdp-after"
    folder.mkdir(parents=True)
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(folder)
    (folder / "training_parameters.json").write_text(json.dumps({
        "model_id": "a/model-that-does-not-exist", "task": "gsm8k", "speed": {"grad_reduce": "after_backward"}}))
    assert main(["run", str(folder), "--sharding", "fsdp"]) == 2  # a hub id that cannot load: never reached
    err = capsys.readouterr().err
    assert "'speed.grad_reduce' = 'after_backward'" in err and "--sharding fsdp" in err
    monkeypatch.setenv("RANK", "1")  # another rank of a torchrun launch: the same exit, the message said once by rank 0
    assert main(["run", str(folder), "--sharding", "fsdp"]) == 2
    assert "grad_reduce" not in capsys.readouterr().err
