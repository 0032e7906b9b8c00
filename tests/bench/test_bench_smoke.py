"""Smoke test of the benchmark harness: one benchmark in --quick mode writes a well-formed JSON.

Not a timing test: it only checks that the command runs and the result has the expected shape.
"""

from __future__ import annotations

import json
import math

from pipeline.bench.__main__ import main


def test_sampling_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    assert main(["sampling", "--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("name", "command", "machine", "date", "columns", "rows", "ratios", "load_before", "load_after"):
        assert key in r
    assert r["name"] == "sampling"
    assert {row["sampler"] for row in r["rows"]} >= {"DDIM-50", "consistency 1-step"}
    for row in r["rows"]:
        assert row["images/CPU-s"] > 0 and math.isfinite(row["images/CPU-s"])
    assert r["ratios"]["ddim50_ours_vs_diffusers_speed"] > 0
    assert r["ratios"]["ddim50_max_abs_diff"] < 1e-3  # same algorithm, same denoiser and inputs
    assert "| sampler |" in capsys.readouterr().out


def test_cascade_bench_saturation_share_and_registry():
    import torch

    from pipeline.bench import BENCHMARKS
    from pipeline.bench.cascade import _parse, saturated_share

    x = torch.tensor([[-1.0, -0.99, 0.5, 0.0], [0.98, 0.2, 1.0, -0.3]])
    assert saturated_share(x) == 4 / 8  # -1, -0.99, 0.98, 1.0
    assert BENCHMARKS["cascade"] == "pipeline.bench.cascade"
    args = _parse(["jobs/imagen.yaml", "--thresholds", "none,0.995"])
    assert args.thresholds.split(",") == ["none", "0.995"] and args.guidance == "0,1,3,6"
