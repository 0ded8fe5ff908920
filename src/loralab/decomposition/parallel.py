"""Calibration statistics on more than one process: under torchrun each rank runs the model over
its share of the calibration batches, then the statistics are summed over ranks, so every rank
holds those of the whole calibration set (the same CorDA / ASVD decomposition as one process).
One process: exactly ``covariance.collect_input_stats``.

The collectives themselves (``distributed.sum_``, the launch) live in ``loralab.distributed``.
"""

from __future__ import annotations

import torch

from loralab import distributed
from loralab.decomposition import covariance


def all_reduce_input_stats(stats: list) -> list:
    """Sum ``covariance.InputStats`` (covariance, abs-mean, sample count) over ranks in place;
    returns ``stats``. Statistics are sums over samples, so the sum of the ranks' shards is the
    statistic of the whole calibration set (up to fp32 summation order). A collective: every rank
    calls it with the same modules. CPU-resident accumulators travel through this rank's GPU under
    NCCL (``distributed.sum_``). One process: ``stats`` unchanged."""
    if not distributed.current().distributed:
        return stats
    for st in stats:
        for attr in ("cov", "abs_mean"):
            t = getattr(st, attr)
            if t is not None:
                distributed.sum_(t)
        st.samples = int(distributed.sum_(torch.tensor([st.samples])).item())
    return stats


def collect_input_stats(model, modules, batches, **kwargs) -> list:
    """``covariance.collect_input_stats`` data-parallel: rank r collects ``batches[r::world]``,
    then the statistics are summed over ranks (``all_reduce_input_stats``), so every rank gets
    those of the whole calibration set: the same decomposition as one process. Only rank 0 shows
    a progress bar. Fewer batches than ranks, or one process: every rank collects all of them (no
    sum). Same arguments, returns and errors as ``covariance.collect_input_stats``."""
    launch = distributed.current()
    batches = list(batches)
    if not launch.distributed or len(batches) < launch.world_size:
        return covariance.collect_input_stats(model, modules, batches, **kwargs)
    kwargs = {**kwargs, "progress": kwargs.get("progress", True) and launch.is_main}
    stats = covariance.collect_input_stats(model, modules, batches[launch.rank::launch.world_size], **kwargs)
    return all_reduce_input_stats(stats)
