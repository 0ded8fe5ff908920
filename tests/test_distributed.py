"""loralab.distributed on CPU: the launch read from torchrun's variables, each optimizer batch split
exactly once over the ranks, evaluation work split by rank and gathered back in input order, and CorDA's calibration
statistics collected on two gloo processes (each on half of real SST-2 sentences through the real
MiniLM encoder) equal to one process over all of them."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from loralab import distributed
from loralab.decomposition import parallel
from loralab.distributed import Launch, launch_from_env, shard


def test_launch_from_env_reads_torchrun_variables_and_names_bad_ones():
    assert launch_from_env({}) == Launch()
    launch = launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.distributed) == (3, 4, 1, True)
    with pytest.raises(ValueError, match="WORLD_SIZE = 'two'"):
        launch_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK = 2, WORLD_SIZE = 2"):
        launch_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="allowed: ddp, fsdp"):
        distributed.init("cpu", sharding="zero3")


def test_shard_deals_every_sample_once_with_its_global_weight():
    feats = [{"input_ids": list(range(n)), "id": i} for i, n in enumerate([5, 9, 2, 9, 7, 1, 3])]
    weights = [0.1 * (i + 1) for i in range(len(feats))]
    parts = [shard(feats, weights, Launch(rank=r, world_size=3, backend="gloo")) for r in range(3)]
    ids = sorted(f["id"] for fs, _ in parts for f in fs)
    assert ids == list(range(len(feats)))
    for fs, ws in parts:
        assert ws == [weights[f["id"]] for f in fs]
    tokens = [sum(len(f["input_ids"]) for f in fs) for fs, _ in parts]
    assert max(tokens) - min(tokens) <= 9  # longest-first round robin: balanced within one sample
    # a rank without a sample still runs one backward, contributing nothing
    few = shard(feats[:1], weights[:1], Launch(rank=1, world_size=2, backend="gloo"))
    assert few == ([feats[0]], [0.0])



def test_recorded_micro_batch_per_rank_is_what_a_rank_runs():
    # batch_size 8 (the micro-batch off the GPU) over 2 ranks: each rank runs 4 samples of the optimizer batch
    feats = [{"input_ids": [1, 2, 3], "id": i} for i in range(8)]
    launch = Launch(rank=0, world_size=2, backend="gloo")
    most = max(len(shard(feats, [1.0] * 8, Launch(rank=r, world_size=2, backend="gloo"))[0]) for r in range(2))
    assert launch.record(8, optimizer_batch=8)["micro_batch_per_rank"] == most == 4
    assert launch.record(3, optimizer_batch=8)["micro_batch_per_rank"] == 3  # smaller than the share: as set
    assert Launch().record(8, optimizer_batch=8)["micro_batch_per_rank"] == 8  # one process runs it all
    assert launch.record(None, optimizer_batch=8)["micro_batch_per_rank"] is None

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sst2_batches(data_dir, tokenizer, n=12, per_batch=3):
    lines = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1 : n + 1]
    sentences = [line.split("\t")[0] for line in lines]
    out = []
    for k in range(0, n, per_batch):
        enc = tokenizer(sentences[k : k + per_batch], padding=True, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _calibrate(data_dir):
    from loralab.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model("packaged:minilm-l6", "seq_cls", 2, "float32")
    tok = load_tokenizer("packaged:minilm-l6")
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layer.0." in n}
    stats = parallel.collect_input_stats(model, modules, _sst2_batches(data_dir, tok), abs_mean=True, progress=False)
    return {tuple(st.names): (st.cov, st.abs_mean, st.samples) for st in stats}


def _worker(rank, world, port, data_dir, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init("cpu")
    try:
        squares = distributed.gather_in_order(lambda xs: [x * x for x in xs], list(range(7)))
        batches = distributed.share([[0, 1], [2], [3, 4], [5]])  # a generation loop's batches
        results = [[] for _ in range(6)]
        for batch in batches:
            for i in batch:
                results[i].append(f"out{i}")
        merged = distributed.merge_shared(results)
        torch.save({"stats": _calibrate(data_dir), "squares": squares, "batches": batches, "merged": merged},
                   f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_processes_calibrate_like_one_and_gather_outputs_in_order(tmp_path, data_dir):
    one = _calibrate(data_dir)
    mp.spawn(_worker, args=(2, _free_port(), data_dir, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["squares"] == [x * x for x in range(7)]  # gathered back in input order
        assert saved["batches"] == [[[0, 1], [3, 4]], [[2], [5]]][rank]  # whole batches, dealt by rank
        assert saved["merged"] == [[f"out{i}"] for i in range(6)]
        two = saved["stats"]
        assert two.keys() == one.keys()
        for key, (cov, abs_mean, samples) in one.items():
            assert two[key][2] == samples == 12  # every sentence counted once
            torch.testing.assert_close(two[key][0], cov, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(two[key][1], abs_mean, rtol=1e-9, atol=1e-9)
            assert not torch.equal(cov, torch.zeros_like(cov))
