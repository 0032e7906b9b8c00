"""Spec rules that keep job files faithful to the study notes: L_hybrid needs a learned Σ (notes 2.2.4, eq. 35),
consistency training follows the N(k)/μ(k) curriculum, Langevin (eq. 32-33) is a sampler choice."""

import re
from pathlib import Path

import pytest

from pipeline.config import CurriculumSpec, SpecError, apply_overrides, parse_spec, read_yaml

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _job(name: str, *overrides: str):
    path = JOBS / name
    return parse_spec(apply_overrides(read_yaml(path), list(overrides), str(path)), str(path))


def test_hybrid_loss_without_learned_sigma_is_refused_with_its_key_path():
    with pytest.raises(SpecError) as err:
        _job("sweep-base-pixel.yaml", "stages.diffusion.diffusion.loss=hybrid")
    msg = str(err.value)
    assert "stages.diffusion.diffusion.learn_sigma: diffusion.loss: hybrid needs learned Σ" in msg
    assert "learn_sigma: true" in msg and "loss: simple" in msg  # what to do
    spec = _job("sweep-base-pixel.yaml", "stages.diffusion.diffusion.loss=hybrid",
                "stages.diffusion.diffusion.learn_sigma=true", "stages.diffusion.model.args.learn_sigma=true")
    assert spec.stages["diffusion"].diffusion.loss == "hybrid" and spec.stages["diffusion"].diffusion.learn_sigma
    assert _job("sweep-base-pixel.yaml", "stages.diffusion.diffusion.learn_sigma=true")  # learned Σ, L_simple: ok


def test_sweeps_combining_hybrid_with_learned_sigma_still_validate():
    from pipeline.tune.spec import load_sweep

    for name in ("sweep-schedule-loss.yaml", "sweep-lambda.yaml"):
        sweep = load_sweep(JOBS / name)
        assert sweep.spec.name


def test_toy_hybrid_without_learn_sigma_exits_2_with_one_error_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        rc = main(["toy", "swissroll", "--loss", "hybrid", "--steps", "5", "--tracking-uri", uri])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and err[-1].startswith("error:")
    assert "--learn-sigma" in err[-1] and "hybrid" in err[-1]
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was created


def test_consistency_training_takes_the_curriculum_and_distillation_fixed_levels():
    assert CurriculumSpec().model_dump() == {"s0": 2, "s1": 150, "mu0": 0.9}  # the paper's CIFAR-10 setting
    spec = _job("distill.yaml")
    ct, cd = spec.stages["consistency_train"], spec.stages["consistency_distill"]
    assert (ct.curriculum.s0, ct.curriculum.s1, ct.curriculum.mu0) == (2, 17, 0.9)
    assert (cd.levels, cd.target_ema) == (18, 0.95)
    bad = {
        "stages.consistency_train.levels=18": "mode: train follows the N(k)/μ(k) curriculum; remove levels",
        "stages.consistency_train.target_ema=0.9": "remove target_ema",
        "stages.consistency_distill.curriculum={s0: 2}": "mode: distill uses fixed `levels` and `target_ema`",
        "stages.consistency_train.eval_steps=[18]": "eval_steps must lie in [1, curriculum.s1 = 17]",
        "stages.consistency_train.curriculum.mu0=1.0": "stages.consistency_train.curriculum.mu0",
        "stages.consistency_train.curriculum.s0=1": "stages.consistency_train.curriculum.s0",
        "stages.consistency_train.curriculum={s0: 5, s1: 3}": "s1 + 1 = 4 must be >= s0 = 5",
    }
    for override, message in bad.items():
        with pytest.raises(SpecError, match=re.escape(message)):
            _job("distill.yaml", override)
    assert _job("distill.yaml", "stages.consistency_train.eval_steps=[1, 17]")


def test_langevin_is_a_sampler_of_job_files():
    spec = _job("distill.yaml", "stages.diffusion.sampling.sampler=langevin",
                "stages.diffusion.sampling.langevin_steps=4", "stages.diffusion.sampling.langevin_step_ratio=0.2")
    s = spec.stages["diffusion"].sampling
    assert (s.sampler, s.langevin_steps, s.langevin_step_ratio) == ("langevin", 4, 0.2)
    assert _job("distill.yaml").stages["diffusion"].sampling.langevin_steps == 3  # default
    for override, message in {"stages.diffusion.sampling.sampler=euler": "'langevin'",
                              "stages.diffusion.sampling.langevin_step_ratio=0": "langevin_step_ratio",
                              "stages.diffusion.sampling.langevin_steps=0": "langevin_steps"}.items():
        with pytest.raises(SpecError, match=re.escape(message)):
            _job("distill.yaml", override)


def _subparser(parser, *names):
    import argparse

    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


@pytest.mark.parametrize("command", [("sample",), ("eval",), ("toy", "swissroll")])
def test_every_sampler_choice_offers_langevin_and_its_settings(command):
    from pipeline.cli import build_parser

    sub = _subparser(build_parser(), *command)
    opts = {a.dest: a for a in sub._actions}
    assert "langevin" in opts["sampler"].choices
    assert (opts["langevin_steps"].default, opts["langevin_step_ratio"].default) == (3, 0.5)
    if command == ("sample",):  # `sample` needs no files to parse: the flags reach args
        args = sub.parse_args(["models:/x@champion", "--sampler", "langevin", "--langevin-steps", "4",
                               "--langevin-step-ratio", "0.25"])
        assert (args.sampler, args.langevin_steps, args.langevin_step_ratio) == ("langevin", 4, 0.25)
