"""The promotion rule shared by `pipeline promote` and a job's stages (`tracking.judge`), and required gates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import SpecError, load_spec, parse_spec
from pipeline.tracking import Gate, judge

ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")
ACC = Gate.from_bounds("eval/accuracy", min=0.5)  # higher is better
MSE = Gate.from_bounds("eval/recon_mse", max=0.05)  # lower is better


def test_gate_direction_comes_from_its_bound():
    assert ACC.higher_is_better and not MSE.higher_is_better
    assert ACC.better(0.9, 0.8) and not ACC.better(0.8, 0.9)
    assert MSE.better(0.02, 0.03) and not MSE.better(0.03, 0.02)


@pytest.mark.parametrize(("gate", "value", "held", "promoted"), [
    (ACC, 0.70, 0.80, False),  # worse than the champion
    (ACC, 0.90, 0.80, True),  # better
    (ACC, 0.80, 0.80, True),  # a tie is no regression
    (ACC, 0.40, None, False),  # below the min bound, even with nothing to beat
    (MSE, 0.04, 0.03, False),  # worse: lower is better
    (MSE, 0.02, 0.03, True),
    (MSE, 0.03, 0.03, True),
    (MSE, 0.06, 0.07, False),  # better than the champion but above the max bound
])
def test_judge_against_a_champion(gate, value, held, promoted):
    holder = None if held is None else "champion v1"
    v = judge(gate, value, held, holder=holder)
    assert (v.promoted, v.forced) == (promoted, False), v.reason


def test_judge_reasons_name_the_values_and_the_holder():
    v = judge(ACC, 0.7, 0.8, holder="champion v3")
    assert v.reason == "eval/accuracy=0.7 is worse than champion v3 (0.8; higher is better)"
    v = judge(MSE, 0.06, None, holder=None)
    assert "outside the gate bounds" in v.reason and "max=0.05" in v.reason


def test_judge_nan_and_missing_values():
    assert not judge(ACC, NAN, 0.8, holder="champion v1").promoted  # a NaN candidate is never inside
    v = judge(ACC, None, None, holder=None, force=True)  # the metric was not logged
    assert not v.promoted and "eval/accuracy was not logged" in v.reason
    assert not judge(MSE, NAN, None, holder=None, force=True).promoted
    # a champion without a comparable value does not block a candidate inside the bounds
    v = judge(MSE, 0.04, NAN, holder="champion v1")
    assert v.promoted and "no eval/recon_mse value" in v.reason
    assert judge(ACC, 0.6, None, holder="champion v1").promoted
    assert judge(ACC, 0.6, None, holder=None).promoted  # no champion at all


def test_force_skips_the_comparison_never_the_bounds():
    v = judge(ACC, 0.6, 0.9, holder="champion v1", force=True)
    assert v.promoted and v.forced and v.reason.startswith("forced: ")
    v = judge(ACC, 0.95, 0.9, holder="champion v1", force=True)
    assert v.promoted and not v.forced  # better anyway: force decided nothing
    v = judge(ACC, 0.3, 0.2, holder="champion v1", force=True)
    assert not v.promoted and "not the bounds" in v.reason
    assert not judge(None, 0.9, 0.1, holder="champion v1").promoted  # no gate known: only force promotes
    assert judge(None, 0.1, 0.9, holder="champion v1", force=True).forced


# ----------------------------------------------------------------------------- every registered stage has a gate


def test_a_registered_stage_without_gate_is_a_spec_error_naming_its_path():
    raw = {"name": "g", "data": {"source": "digits", "dir": "d"}, "eval": {"classifier": None},
           "stages": {"clf": {"kind": "classifier", "model": {"name": "classifier"}, "train": {"steps": 1},
                              "register": {"name": "g-clf"}}}}
    with pytest.raises(SpecError, match=r"stages\.clf\.register: `gate` is required"):
        parse_spec(raw)
    raw["stages"]["clf"]["register"]["gate"] = {"metric": "eval/accuracy", "min": 0.5}
    assert parse_spec(raw).stages["clf"].registry.gate.min == 0.5


def _shipped() -> list[Path]:
    return sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.name)
def test_every_shipped_job_gates_every_registered_stage(path, monkeypatch):
    from pipeline.tune.spec import load_sweep

    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(path.read_text())
    spec = load_sweep(path).base if "job" in raw else load_spec(path, [])
    for name, stage in raw.get("stages", {}).items():  # the file itself names a gate for each
        if "register" in stage:
            assert stage["register"].get("gate"), f"{path.name}: stages.{name}"
    gates = [s.registry.gate for s in spec.stages.values() if hasattr(s, "registry")]
    assert gates and all(g.metric.startswith(("eval/", "train/")) for g in gates)
