"""Streaming holds a few blocks, never a split: the training stream's peak memory does not grow with the split.

Two ranks (Ray actors, as Ray Train's workers are) each iterate `worker_stream` over one epoch of a split of
128-px RGB JPEGs and convert every batch with `batch_tensors`, in an in-process Ray whose object store is capped
at 128 MiB; a thread samples the RSS of every process of this test's tree (Ray's included) every 0.05 s. The
large split is 4x the small one (the same shards listed 4 times: 4x the samples to read and decode, keys
repeated). Both epochs run in one Ray instance after a warm-up stream, so they find the same processes.

Summed RSS counts a page shared by several processes once in each: here the pages of the 128 MiB store that
each process mapping it (2 ranks, Ray Data's task workers) has touched so far, which creeps up as a stream goes
on, by at most a few times the store (measured: +2-7% from the small split to the large one). So the summed RSS
may grow by 15% at most, and the private memory (RSS less shared pages) by 150 MB.

What an unbounded stream would do at these sizes: the large split is 8,192 x 49,152 B = 403 MB of decoded
uint8 pixels (1.6 GB as the float32 batches the loop receives), the small one 101 MB. A stream (or a consumer)
that gathered its split in its own memory would add at least 403 - 101 = 302 MB of private memory to the large
run's peak (measured without: within 30 MB). One that gathered it in Ray's object store (a materialized split,
blocks held) would make Ray spill, the split being 3x the store (allowed: 64 MiB; measured: none). Both kinds of
gathering were tried (a consumer keeping every batch it received, as views and as copies): each failed its check.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.data.stream import StreamSpec
from tests.reliability.helpers import local_ray

ray = pytest.importorskip("ray")

SIZE = 128
SMALL = 2048
SHARD = 512
MICRO = 32
MB = 1e6


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[int]]:
    """SMALL synthetic RGB JPEGs (smooth colour fields plus noise, so they neither compress away nor take long)
    in shards of SHARD, written by the pipeline's shard writer."""
    from PIL import Image

    from pipeline.data.shards import _ShardWriter

    out = tmp_path_factory.mktemp("stream-memory")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    fields = np.stack([xx, yy, 1 - xx * yy], axis=-1)  # (H, W, 3)
    noise = rng.normal(0, 8, (16, SIZE, SIZE, 3)).astype(np.float32)
    w = _ShardWriter(out, "train", SHARD)
    for i in range(SMALL):
        img = fields * rng.uniform(0, 255, 3).astype(np.float32) + noise[i % 16]
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
        w.add(f"s{i:05d}", {"jpg": buf.getvalue(), "cls": str(i % 10).encode(), "txt": b"a synthetic field"},
              i % 10)
    w.finish()
    return [str(out / s.name) for s in w.shards], [s.num_samples for s in w.shards]


@pytest.fixture(scope="module")
def ray_small_store() -> Iterator[None]:
    with local_ray(num_cpus=4, object_store_memory=128 * 2**20,
                   runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}}):
        yield


@ray.remote(num_cpus=1)
class Rank:
    """One training worker's data path: `worker_stream` -> `batch_tensors`, nothing kept."""

    def stream(self, spec: StreamSpec, rank: int, world: int, batches: int) -> int:
        from pipeline.data.ray_data import worker_stream
        from pipeline.train.loop import batch_tensors

        n = 0
        it = worker_stream(spec, rank=rank, world=world, micro=MICRO, start=0, count=batches)
        for i, (_, nb) in enumerate(it):
            n += len(batch_tensors(nb, set(), rank)["image"])
            if i + 1 == batches:
                break
        it.close()
        return n


def _spilled_mib() -> int:
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    return int(m.group(1)) if m else 0


def test_peak_memory_does_not_grow_with_the_split(shards, ray_small_store) -> None:
    from pipeline.bench.data import TreeSampler

    paths, counts = shards
    small = StreamSpec(paths=tuple(paths), counts=tuple(counts), shape=(3, SIZE, SIZE), seed=0, hflip=True, shift=2)
    large = StreamSpec(paths=tuple(paths) * 4, counts=tuple(counts) * 4, shape=(3, SIZE, SIZE), seed=0, hflip=True,
                       shift=2)
    ranks = [Rank.remote() for _ in range(2)]

    def epoch(spec: StreamSpec) -> int:
        batches = spec.size // (2 * MICRO)
        return sum(ray.get([r.stream.remote(spec, k, 2, batches) for k, r in enumerate(ranks)], timeout=300))

    with TreeSampler(0.05) as sampler:
        t0 = time.time()
        epoch(small)  # warm-up: Ray Data's task workers started, modules imported, the object store in use
        peaks = {}
        for name, spec in (("small", small), ("large", large)):
            spilled = _spilled_mib()
            t1 = sampler.mark()
            assert epoch(spec) == spec.size // (2 * MICRO) * 2 * MICRO
            t2 = sampler.mark()
            peaks[name] = (sampler.peak_rss(t1, t2), sampler.peak_rss(t1, t2, "anon"), _spilled_mib() - spilled)
        elapsed = time.time() - t0
    (rss_s, anon_s, spill_s), (rss_l, anon_l, spill_l) = peaks["small"], peaks["large"]
    report = (f"peak summed RSS small {rss_s / MB:.0f} MB, large {rss_l / MB:.0f} MB; private {anon_s / MB:.0f} / "
              f"{anon_l / MB:.0f} MB; spilled {spill_s} / {spill_l} MiB; {elapsed:.0f} s")
    print(report)
    assert anon_l - anon_s < 150 * MB, report  # a split gathered in private memory: >= 302 MB more
    assert rss_l < 1.15 * rss_s, report  # shared pages of the store touched by more processes: measured +2-7%
    assert rss_l < 5e9 and rss_s < 5e9, report  # the bound: Ray's processes, 2 ranks, task workers (measured 3.0 GB)
    assert spill_l < 64, report  # a split gathered in the object store (3x its size) would spill
