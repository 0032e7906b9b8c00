"""The registry description of a version names what it is, its inputs, its gate with this version's value, and
how to use it (`tracking.describe_version`, `tracking.usage`)."""

from __future__ import annotations

from pipeline.tracking import Gate, ModelRef, Promotion, describe_version, usage


def _ref(name: str, version: str) -> ModelRef:
    return ModelRef(name, version, f"runs:/r{version}/model", f"r{version}", {})


def test_promoted_generator_names_inputs_gate_value_evaluator_and_sampling() -> None:
    ref = _ref("ldm-distilled", "3")
    gate = Gate.from_bounds("eval/class_accuracy", min=0.7)
    promotion = Promotion("ldm-distilled", "champion", ref, None, True, False, "passes", gate.metric, 0.9375, None,
                          gate)
    text = describe_version(ref, what="a distilled student", job="ldm", stage="distill",
                            inputs={"diffusion": _ref("ldm", "2")}, promotion=promotion,
                            evaluator=_ref("ldm-classifier", "1"), sampled=True)
    assert text.startswith("**ldm-distilled v3**: a distilled student, trained by stage `distill` of job `ldm`.")
    assert "- Inputs: diffusion = [ldm v2](#/models/ldm/versions/2)" in text
    assert "- Gate: `eval/class_accuracy` ≥ 0.7; this version: 0.9375 (promoted to champion)" in text
    assert "[ldm-classifier v1](#/models/ldm-classifier/versions/1)" in text
    assert "    pipeline sample models:/ldm-distilled/3 --out grid.png" in text.splitlines()


def test_refused_autoencoder_says_why_and_is_not_sampled() -> None:
    ref = _ref("ae", "5")
    gate = Gate.from_bounds("eval/recon_mse", max=0.05)
    promotion = Promotion("ae", "champion", ref, _ref("ae", "4"), False, False, "worse than champion v4",
                          gate.metric, 0.07, 0.02, gate)
    text = describe_version(ref, what="an autoencoder", job="j", stage="autoencoder", inputs={},
                            promotion=promotion, evaluator=None, sampled=False)
    assert "- Gate: `eval/recon_mse` ≤ 0.05; this version: 0.07 (not promoted: worse than champion v4)" in text
    assert "Inputs" not in text and "classifier" not in text
    assert not any("pipeline sample" in line for line in text.splitlines())
    assert "    pipeline lineage models:/ae/5" in text.splitlines()


def test_usage_of_an_alias() -> None:
    lines = usage("models:/ldm@champion", sampled=True)
    assert "    pipeline sample models:/ldm@champion --out grid.png" in lines
    assert lines[-1] == '    mlflow.pyfunc.load_model("models:/ldm@champion").predict(...)'
