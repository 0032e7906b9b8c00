"""Shard writing and reading: WebDataset tars + manifest, a local iterator and (in
``pipeline.data.ray_data``, imported explicitly) the Ray Data path.

This package never imports Ray; ``pipeline.data.ray_data`` does.
"""

from pipeline.data.errors import DataError
from pipeline.data.local import HELD_OUT_LIMIT, TRAIN_SAMPLE_LIMIT, ReadStats, iterate_batches, load_split
from pipeline.data.shards import (
    Manifest,
    ShardInfo,
    SplitInfo,
    build_dataset,
    manifest_sha256,
    read_manifest,
    shard_paths,
    verify_shards,
    write_array_shard,
    write_array_shards,
    write_manifest,
    write_shards,
)
from pipeline.data.sources import SOURCES, Sample, iter_source, source_classes

__all__ = [
    "HELD_OUT_LIMIT",
    "TRAIN_SAMPLE_LIMIT",
    "SOURCES",
    "DataError",
    "Manifest",
    "ReadStats",
    "Sample",
    "ShardInfo",
    "SplitInfo",
    "build_dataset",
    "iter_source",
    "iterate_batches",
    "load_split",
    "manifest_sha256",
    "read_manifest",
    "shard_paths",
    "source_classes",
    "verify_shards",
    "write_array_shard",
    "write_array_shards",
    "write_manifest",
    "write_shards",
]
