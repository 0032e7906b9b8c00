"""The `pipeline` command line: run jobs, build data, sample, evaluate, submit to a cluster."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TextIO

log = logging.getLogger("pipeline")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.config import ClusterError, SpecError
    from pipeline.data import DataError
    from pipeline.tracking import TrackingError

    kinds: tuple[type[BaseException], ...] = (SpecError, DataError, TrackingError, ClusterError)
    if "pipeline.train.loop" in sys.modules:  # only a command that trained can raise it
        kinds += (sys.modules["pipeline.train.loop"].NonFiniteLoss,)
    return kinds


def _user_error(exc: BaseException) -> BaseException | None:
    """The user error behind `exc` (also inside Ray Train / Ray Data wrappers), or None for a bug."""
    from pipeline.config import user_error_root

    return user_error_root(exc, _user_errors())


class UsageError(SystemExit):
    """Bad command-line input: `main` prints ``error: <message>`` as the last stderr line and exits 2.

    A `SystemExit` whose ``code`` is 2 and whose ``str()`` is the message, so callers of `main` and
    of the command functions can match the message (``pytest.raises(SystemExit, match=...)``).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


class _Parser(argparse.ArgumentParser):
    """argparse with the pipeline's error form: the usage, then ``error: PROG: argument --x: why`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}")


_SEED_MAX = 2**32 - 1


def _number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a `kind` (int or float) in the range [lo, hi] (open ends where asked)."""
    def show(v: float) -> str:
        return str(int(v)) if kind is int else f"{v:g}"

    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        want = f"{noun} in {'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        want = f"{noun} {'>' if lo_open else '≥'} {show(lo)}"
    else:
        want = noun

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        below = lo is not None and (value < lo or (lo_open and value == lo))
        above = hi is not None and (value > hi or (hi_open and value == hi))
        if below or above or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _out_path(text: str) -> str:
    """An argparse ``type=`` for ``--out``: its folder must exist (commands never create the folders above
    what they write) and it must not be an existing folder."""
    path = Path(text)
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {str(parent)!r} of {text!r} does not exist; create it "
                                         f"first (mkdir -p {parent})")
    return text


def _out_file(text: str) -> str:
    """``--out`` of a command that writes one file: as `_out_path`, and not an existing folder."""
    if Path(_out_path(text)).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name, e.g. {Path(text) / 'grid.png'}")
    return text


def _out_dir(text: str) -> str:
    """``--out`` of a command that writes a folder: as `_out_path`, and not an existing file."""
    if Path(_out_path(text)).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder to write the dataset to")
    return text


def _existing_dir(text: str) -> str:
    """An argparse ``type=``: a folder that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no folder {text!r}" + (" (it is a file)" if Path(text).exists() else ""))
    return text


def _data_dir(text: str) -> str:
    """An argparse ``type=`` for ``--data``: a dataset folder that exists (its shards are read later)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no dataset folder {text!r}; build it with `pipeline data build --out "
                                         f"{text}` or give the folder of one")
    return text


def _model_uri(text: str) -> str:
    """An argparse ``type=``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from pipeline.tracking import TrackingError, parse_model_uri

    try:
        parse_model_uri(text)
    except TrackingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _alias(text: str) -> str:
    """An argparse ``type=``: a registry alias (letters, digits, ``_`` and ``-``; not only digits)."""
    if not re.fullmatch(r"[\w-]+", text) or text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an alias name (letters, digits, _ and -, e.g. champion)")
    return text


def _alias_or_version(text: str) -> str:
    """An argparse ``type=``: a registry alias or a version number."""
    return text if text.isdigit() and int(text) > 0 else _alias(text)


def _model_name(text: str) -> str:
    """An argparse ``type=``: a registered model's name (no ``/``, ``@`` or ``:``)."""
    if not text or re.search(r"[/@:\s]", text):
        raise argparse.ArgumentTypeError(f"{text!r} is a model URI or not a name; give the registered name "
                                         "alone, e.g. ldm")
    return text


def _data_source(text: str) -> str:
    """An argparse ``type=`` for ``data build --source``: a named source, or ``imagefolder:PATH`` of a folder."""
    from pipeline.data import SOURCES

    named = [s for s in SOURCES if ":" not in s]
    if text.startswith("imagefolder:"):
        folder = text.split(":", 1)[1]
        if not Path(folder).is_dir():
            raise argparse.ArgumentTypeError(f"image folder {folder!r} does not exist; expected "
                                             "PATH/<class_name>/*.png|jpg")
    elif text not in named:
        raise argparse.ArgumentTypeError(f"unknown data source {text!r}; valid sources: {', '.join(SOURCES)}")
    return text


def _dashboard_url(text: str) -> str:
    """An argparse ``type=`` for ``submit --address``: the Ray dashboard's http(s)://HOST:PORT."""
    if not re.fullmatch(r"https?://[^/\s:]+(:\d+)?/?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dashboard URL; expected http://HOST:8265 (the Ray "
                                         "job API; `pipeline run` with ray.address takes the GCS address)")
    return text


def _check_steps(steps: int | None, extra: dict, what: str = "--steps") -> None:
    """``--steps`` against the model's own limit: its T timesteps, or its consistency levels − 1."""
    if steps is None:
        return
    if "consistency" in extra:  # a consistency model (eq. 44): steps index its noise levels
        top, why = len(extra["consistency"]["timesteps"]) - 1, "noise levels − 1 of this consistency model"
    else:
        top, why = int(extra.get("diffusion", {}).get("timesteps", 1000)), "timesteps T of this model"
    if not 1 <= steps <= top:
        raise UsageError(f"{what} {steps}: must be in [1, {top}] (the {why})")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec

    spec = load_spec(args.job, args.set)  # validated whole before any work starts
    from pipeline import progress
    from pipeline.stages import run_job

    if not args.verbose:  # the terminal shows the pipeline's lines and a bar per stage; the log file the rest
        progress.log_to_file_later(Path(".pipeline") / "logs" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    t0 = time.perf_counter()
    outcomes = run_job(spec, args.job, force_promote=args.force_promote)
    out = progress.stdout()
    from pipeline import tracking

    uri = tracking.tracking_uri(spec.tracking.uri)
    print(f"\nJob '{spec.name}' finished in {time.perf_counter() - t0:.0f} s.", file=out)
    print(f"{'stage':<14}{'status':<10}{'version':<9}{'champion':<10}{'time':>7}", file=out)
    for o in outcomes:
        print(f"{o.name:<14}{o.status:<10}{(o.version or '-'):<9}{('yes' if o.champion else 'no'):<10}"
              f"{o.seconds:>6.0f}s", file=out)
    for o in outcomes:
        if spec.stages[o.name].kind != "distill" or not o.metrics:
            continue
        teacher = spec.stages[spec.stages[o.name].needs[0]]
        metrics = dict(o.metrics)
        base = next((p.metrics for p in outcomes if p.name == spec.stages[o.name].needs[0]), {})
        steps = getattr(teacher, "sampling", None)
        if steps is not None:  # the teacher's own evaluation, at its full step count
            metrics.update({k.replace("eval/", f"eval/teacher_{steps.steps}steps_"): v for k, v in base.items()})
        final = spec.stages[o.name].teacher_steps >> spec.stages[o.name].halvings  # its registered student
        metrics.update({f"eval/student_{final}steps_{k[5:]}": v for k, v in o.metrics.items()
                        if re.fullmatch(r"eval/[a-z_]+", k) and "steps_" not in k})
        _print_distill_report(metrics, out)
    experiment = spec.tracking.experiment or spec.name
    print(f"\nMLflow runs and registered models: {tracking.redact(uri)} (experiment '{experiment}'); "
          + "\n".join(tracking.ui_links(uri, tracking.training_experiment(experiment))), file=out)
    names = [s.registry.name for s in spec.stages.values() if hasattr(s, "registry") and s.kind != "encode"]
    print("Registered models (alias champion): " + ", ".join(f"models:/{n}@champion" for n in names), file=out)
    last = list(spec.stages.values())[-1]
    text = last.kind == "unclip_decoder" or getattr(last, "conditioning", "class") == "text"
    how = '--caption "a handwritten digit three" --num 8' if text else "--label 3"
    if last.kind == "controlnet":
        how = "--control PICTURE.png --num 8" + (" --label 3" if last.class_labels else "")
    print("Sample grids: the artifacts samples/*.png of each stage's run"
          + ("" if last.kind in NOT_SAMPLED else f"; draw a new one with\n  pipeline sample "
             f"models:/{names[-1]}@champion {how} --out grid.png"), file=out)
    return 0


def _print_distill_report(metrics: dict[str, float], out: TextIO | None = None) -> None:
    rows = sorted({m.group(1) for k in metrics if (m := re.match(r"eval/((?:teacher|student)_\d+steps)_", k))},
                  key=lambda r: (r.startswith("student"), -int(re.sub(r"\D", "", r))))
    if not rows:
        return
    print("\nTeacher vs distilled students on held-out digits (classifier features):", file=out)
    print(f"{'model':<22}{'class acc':>10}{'FID':>10}{'KID':>10}{'img/s':>9}", file=out)
    for r in rows:
        def g(m: str, r: str = r) -> float:
            return metrics.get(f"eval/{r}_{m}", float("nan"))
        print(f"{r:<22}{g('class_accuracy'):>10.3f}{g('fid'):>10.3f}{g('kid'):>10.4f}"
              f"{g('samples_per_sec'):>9.1f}", file=out)


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec

    spec = load_spec(args.job, args.set)
    print(f"{args.job}: ok ({len(spec.stages)} stages: {', '.join(spec.stages)})")
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from pipeline.data import build_dataset

    m = build_dataset(args.source, Path(args.out), image_size=args.image_size, held_out=args.held_out,
                      shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite)
    for name, split in m.splits.items():
        print(f"{name}: {split.num_samples} samples in {len(split.shards)} shard(s)")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _connect(uri: str | None) -> None:
    from pipeline import tracking

    tracking.connect(tracking.tracking_uri(uri))


def cmd_sample(args: argparse.Namespace) -> int:

    from pipeline import tracking
    from pipeline.eval import generate, image_grid
    from pipeline.stages import load_generator

    _connect(args.tracking_uri)
    ref = tracking.resolve(args.model)
    model_dir = tracking.download(ref)
    kind = _model_kind(model_dir)
    if kind == "unclip_decoder":  # text → CLIP → prior → decoder (eq. 49)
        return _sample_unclip(args, ref, model_dir)
    if kind == "superres":  # the whole cascade ending at this stage
        return _sample_cascade(args, ref, model_dir)
    if kind == "controlnet":
        return _sample_controlnet(args, ref, model_dir)
    if args.control:
        raise UsageError("--control needs a ControlNet model")
    if kind in NOT_SAMPLED:
        raise UsageError(f"{ref.name} v{ref.version} is a {kind} model, which `pipeline sample` does not draw "
                         f"from ({NOT_SAMPLED[kind]})")
    gen = load_generator(model_dir)
    _check_steps(args.steps, gen.extra)
    if hasattr(gen.model, "encode_text"):  # a text-conditioned diffusion model (conditioning: text)
        return _sample_text(args, ref, gen)
    if args.caption:
        raise UsageError("--caption needs a text-conditioned model (unCLIP decoder, conditioning: text); "
                         "this model takes --label")
    labels = _labels(args, gen.num_classes)
    cond_fn = _classifier_guidance(args, gen)
    x = generate(gen, labels, steps=args.steps, guidance=args.guidance, sampler=args.sampler, eta=args.eta,
                 seed=args.seed, cond_fn=cond_fn, classifier_scale=args.classifier_scale if cond_fn else 0.0,
                 **_langevin_kw(args))
    Path(args.out).write_bytes(image_grid(x, nrow=args.nrow, scale=4))
    guided = f", classifier guidance {args.classifier_scale:g} ({args.classifier})" if cond_fn else ""
    print(f"{len(x)} samples of {ref.name} v{ref.version}{guided} → {args.out}")
    return 0


#: model kinds `pipeline sample` refuses, and why
NOT_SAMPLED = {"autoencoder": "not a generator of its own", "classifier": "not a generator",
               "clip": "an encoder pair; sample its unCLIP decoder", "clip_prior": "it samples image embeddings; "
               "sample its unCLIP decoder", "prior": "a PixelCNN over VQ codes"}


def _check_label(args: argparse.Namespace, num_classes: int) -> None:
    if args.label is not None and not 0 <= args.label < num_classes:
        raise UsageError(f"--label must be in [0, {num_classes - 1}]")


def _labels(args: argparse.Namespace, num_classes: int):
    """``--num`` labels: all ``--label``, or the classes in turn."""
    import torch

    _check_label(args, num_classes)
    if args.label is not None:
        return torch.full((args.num,), args.label, dtype=torch.long)
    return torch.arange(args.num) % num_classes


def _model_kind(model_dir) -> str | None:
    from pipeline.train.export import read_meta

    return read_meta(model_dir)["extra"].get("kind")


def _captions(args: argparse.Namespace, what: str) -> list[str]:
    """``--num`` copies of each ``--caption`` (one grid row per caption), after checking the options fit."""
    if not args.caption:
        raise UsageError(f'{what} samples from text: give --caption "a handwritten digit three" (repeatable)')
    if args.label is not None or args.classifier:
        raise UsageError(f"{what} takes --caption, not --label or --classifier")
    return [c for c in args.caption for _ in range(args.num)]


def _sample_text(args: argparse.Namespace, ref, gen) -> int:
    """`pipeline sample` for a text-conditioned diffusion model: ``--num`` samples of each ``--caption``."""
    from pipeline.eval.text import generate_from_captions

    return _sample_captions(args, ref, "a text-conditioned model",
                            lambda captions, **kw: generate_from_captions(gen, captions, **kw))


def _sample_captions(args: argparse.Namespace, ref, what: str, draw) -> int:
    """Draw ``--num`` samples of each ``--caption`` with ``draw(captions, steps=, guidance=, sampler=, eta=,
    seed=)`` and write them as a grid, one row per caption."""
    from pipeline.eval import image_grid

    captions = _captions(args, what)
    x = draw(captions, steps=args.steps, guidance=args.guidance, sampler=args.sampler, eta=args.eta, seed=args.seed)
    Path(args.out).write_bytes(image_grid(x, nrow=args.num, scale=4))
    print(f"{len(x)} samples of {ref.name} v{ref.version} from {len(args.caption)} caption(s) → {args.out}")
    return 0


def _sample_cascade(args: argparse.Namespace, ref, model_dir) -> int:
    """`pipeline sample` for a cascade stage: the whole registered cascade up to it, each stage with its own
    registered sampling settings; ``--caption`` for text-conditioned cascades, else ``--label``."""
    import torch

    from pipeline.eval import image_grid
    from pipeline.stages.superres import load_cascade, sample_cascade

    chain = load_cascade(model_dir)
    if args.steps is not None or args.guidance or args.sampler != "ddim" or args.eta:
        raise UsageError("a cascade samples with each stage's registered settings (DDIM steps, guidance, "
                         "dynamic threshold); drop --steps/--guidance/--sampler/--eta")
    if any(m["extra"].get("conditioning") == "text" for _, m in chain):
        captions = _captions(args, "a text-conditioned cascade")
        labels, nrow = torch.zeros(len(captions), dtype=torch.long), args.num
    else:
        if args.caption or args.classifier:
            raise UsageError("this cascade is class-conditional: it takes --label (no --caption/--classifier)")
        labels = _labels(args, int(chain[0][1]["extra"]["num_classes"]))
        captions, nrow = None, args.nrow
    x = sample_cascade(chain, labels, args.seed, captions=captions)[-1]
    Path(args.out).write_bytes(image_grid(x, nrow=nrow, scale=4))
    sizes = " → ".join(f"{m['extra']['size']}px" for _, m in chain)
    print(f"{len(x)} samples of the cascade {sizes} ending at {ref.name} v{ref.version} → {args.out}")
    return 0


def _sample_controlnet(args: argparse.Namespace, ref, model_dir) -> int:
    """`pipeline sample` for a ControlNet: ``--num`` samples following the Canny edges of each ``--control``
    picture (one row each: the edge map, then the samples)."""
    import torch

    from pipeline.eval import image_grid
    from pipeline.train.controlnet_task import control_from_image, sample_controlled
    from pipeline.train.export import load_exported

    if not args.control:
        raise UsageError("a ControlNet draws images that follow the edges of a picture: give --control "
                         "IMAGE.png (repeatable, one row each)")
    if args.caption or args.classifier:
        raise UsageError("a ControlNet takes --control (and --label when trained with class labels), not "
                         "--caption or --classifier")
    if args.sampler != "ddim":
        raise UsageError("a ControlNet samples with DDIM (drop --sampler)")
    model, meta = load_exported(model_dir)
    _check_steps(args.steps, meta["extra"])
    try:
        controls = [control_from_image(p, meta)[0] for p in args.control]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    extra = meta["extra"]
    n_cls = int(extra.get("num_classes", 0))
    if args.label is not None and not (extra.get("class_labels") and n_cls):
        raise UsageError("this ControlNet was trained without class labels: drop --label")
    _check_label(args, n_cls)
    if args.guidance and args.label is None:
        raise UsageError("--guidance guides toward a class: give --label too")
    label = args.label if args.label is not None else n_cls  # the null label ∅ without --label
    control = torch.cat([c.expand(args.num, -1, -1, -1) for c in controls])
    labels = torch.full((len(control),), label, dtype=torch.long)
    steps = args.steps if args.steps is not None else int(extra.get("sampling_timesteps") or 50)
    x = sample_controlled(model, meta, labels, control, steps=steps, guidance=args.guidance, eta=args.eta,
                          seed=args.seed)
    shown = (control * 2 - 1).expand(-1, x.shape[1], -1, -1)[:: args.num]  # edges white on black
    rows = [torch.cat([shown[i:i + 1], x[i * args.num:(i + 1) * args.num]]) for i in range(len(controls))]
    Path(args.out).write_bytes(image_grid(torch.cat(rows), nrow=args.num + 1, scale=4))
    print(f"{len(x)} samples of {ref.name} v{ref.version} following the edges of {len(controls)} picture(s) "
          f"(first column) → {args.out}")
    return 0


def _sample_unclip(args: argparse.Namespace, ref, model_dir) -> int:
    """`pipeline sample` for an unCLIP decoder: `--num` samples of each `--caption`, one row per caption."""
    from pipeline.stages.unclip import sample_unclip
    from pipeline.train.export import read_meta

    _check_steps(args.steps, read_meta(model_dir)["extra"])
    return _sample_captions(args, ref, "an unCLIP decoder",
                            lambda captions, **kw: sample_unclip(model_dir, captions, **kw))


def _classifier_guidance(args: argparse.Namespace, gen):
    """``cond_fn`` for ``generate`` from ``--classifier`` (a registered noisy classifier), or None."""
    if not args.classifier:
        if args.classifier_scale:
            raise UsageError("--classifier-scale needs --classifier models:/NAME@ALIAS")
        return None
    if args.classifier_scale is None:
        args.classifier_scale = 1.0
    from pipeline import tracking
    from pipeline.eval.guidance import GuidanceError, registered_cond_fn

    ref = tracking.resolve(args.classifier)
    try:
        return registered_cond_fn(ref, gen)
    except GuidanceError as exc:
        raise UsageError(f"{ref.name} v{ref.version} cannot guide this model: {exc}") from None


def cmd_eval_nll(args: argparse.Namespace) -> int:
    import torch

    from pipeline import tracking
    from pipeline.data import HELD_OUT_LIMIT, load_split
    from pipeline.eval.likelihood import generator_nll, log_nll_run
    from pipeline.stages import load_generator

    _connect(args.tracking_uri)
    ref = tracking.resolve(args.model)
    gen = load_generator(tracking.download(ref))
    if gen.meta.get("extra", {}).get("kind") != "diffusion":
        raise UsageError(f"{ref.name} v{ref.version} is not a diffusion model")
    data = load_split(args.data, args.split, limit=HELD_OUT_LIMIT if args.num is None else args.num)
    n = len(data["label"]) if args.num is None else min(args.num, len(data["label"]))
    images, labels = torch.from_numpy(data["image"][:n]), torch.from_numpy(data["label"][:n])
    d = gen.extra["diffusion"]
    print(f"{ref.name} v{ref.version}: full VLB over all {gen.schedule.num_timesteps} terms + prior "
          f"({d.get('schedule', 'cosine')}, {d.get('parameterization', 'eps')}"
          f"{', learned Σ' if d.get('learn_sigma') else ''}) on {n} '{args.split}' examples of {args.data}")

    def progress(done: int, total: int) -> None:
        log.info("nll: %d/%d examples", done, total)

    r = generator_nll(gen, images, labels, conditional=args.conditional, var_type=args.var_type,
                      batch_size=args.batch_size, seed=args.seed, progress=progress)
    params = {"data": args.data, "split": args.split, "num": n, "conditional": args.conditional,
              "var_type": args.var_type, "seed": args.seed, "timesteps": gen.schedule.num_timesteps,
              "space": r.space, "decoder": r.decoder}
    run_id = log_nll_run(ref, r, params)
    what = ("bits/dim of the LATENTS (continuous: Gaussian L_0, a bound on their differential entropy per latent "
            "dimension, not comparable with pixel bits/dim)" if r.space == "latent"
            else "bits/dim of the 8-bit pixels (discretized Gaussian L_0)")
    cond = "−log p(x | y), true labels" if r.conditional else "−log p(x), null label"
    print(f"NLL {r.bits_per_dim:.4f} ± {r.stderr:.4f} {what}; {r.dims} dims per example; {cond}")
    print(f"logged to MLflow run {run_id} (metric nll/bits_per_dim) in the experiment of the model's training run")
    return 0


def cmd_toy_swissroll(args: argparse.Namespace) -> int:
    import torch

    from pipeline import tracking
    from pipeline.toy import SwissRollConfig, run_swissroll

    if args.sample_steps > args.timesteps:
        raise UsageError(f"--sample-steps {args.sample_steps}: must be at most --timesteps ({args.timesteps})")
    torch.set_num_threads(args.threads)  # a 2-D MLP: extra intra-op threads only add contention
    cfg = SwissRollConfig(schedule=args.schedule, timesteps=args.timesteps, parameterization=args.parameterization,
                          loss=args.loss, lambda_vlb=args.lambda_vlb, learn_sigma=args.learn_sigma,
                          var_type=args.var_type, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          max_lr=args.max_lr, samplers=args.sampler or ["ancestral", "strided", "ddim"],
                          sample_steps=args.sample_steps, eta=args.eta, num_samples=args.num_samples,
                          nll_points=args.nll_points, seed=args.seed, **_langevin_kw(args))
    r = run_swissroll(cfg, tracking_uri=args.tracking_uri, experiment=args.experiment)
    m = r.metrics
    print(f"Swiss roll: {cfg.steps} training steps in {m['train_seconds']:.0f} s, "
          f"final loss {m['train/final_loss']:.4f}")
    print(f"{'sampler':<18}{'sliced W2':>10}{'seconds':>9}")
    for label in r.samples:
        print(f"{label:<18}{m[f'sw/{label}']:>10.4f}{m[f'sample_seconds/{label}']:>9.1f}")
    print(f"{'(data vs data)':<18}{m['sw/data_vs_data']:>10.4f}\n{'(N(0, I))':<18}{m['sw/gaussian']:>10.4f}")
    print(f"VLB {m['bits_per_dim']:.4f} bits/dim (continuous data, Gaussian L_0; best single Gaussian "
          f"{m['gaussian_bits_per_dim']:.4f})")
    uri = tracking.redact(tracking.tracking_uri(args.tracking_uri))
    print(f"MLflow run {r.run_id} in experiment '{args.experiment}' at {uri} (artifact swissroll.png)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from pipeline import tracking
    from pipeline.data import HELD_OUT_LIMIT, load_split
    from pipeline.eval import generate, sample_metrics
    from pipeline.stages import load_generator
    from pipeline.train.export import load_exported

    _connect(args.tracking_uri)
    ref = tracking.resolve(args.model)
    model_dir = tracking.download(ref)
    kind = _model_kind(model_dir)
    if kind in NOT_SAMPLED or kind in ("superres", "unclip_decoder", "controlnet"):
        raise UsageError(f"`pipeline eval` measures diffusion models drawn per class or per caption; "
                         f"{ref.name} v{ref.version} is a {kind} model (its stage's evaluation is in its MLflow run)")
    gen = load_generator(model_dir)
    _check_steps(args.steps, gen.extra)
    classifier, _ = load_exported(tracking.download(tracking.resolve(args.classifier)))
    test = load_split(args.data, "test", limit=HELD_OUT_LIMIT)
    real = torch.from_numpy(test["image"])
    kw = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler, "seed": args.seed,
          **_langevin_kw(args)}
    if hasattr(gen.model, "encode_text"):  # text-conditioned: one sample per held-out caption, its class known
        if not any(c.strip() for c in test["caption"]):
            raise UsageError(f"{args.data} has no captions to draw this text-conditioned model from")
        from pipeline.eval.text import generate_from_captions

        idx = [i % len(test["label"]) for i in range(args.num)]
        labels = torch.as_tensor(test["label"][idx], dtype=torch.long)
        fake = generate_from_captions(gen, [test["caption"][i] for i in idx], **kw)
    else:
        labels = torch.arange(args.num) % gen.num_classes
        fake = generate(gen, labels, **kw)
    m = sample_metrics(fake, labels, real, classifier)
    print(f"{ref.name} v{ref.version}: class accuracy {m['class_accuracy']:.3f}  FID {m['fid']:.3f}  "
          f"KID {m['kid']:.4f} ± {m['kid_std']:.4f}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_spec

    load_spec(args.job, args.set)  # fail here, not on the cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
    except ConnectionError as exc:
        raise UsageError(f"cannot reach the Ray job API at {args.address} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]}); start the cluster's head (`ray start --head`) or "
                         "fix --address") from None
    entry = " ".join(["pipeline", "run", args.job, *[f"--set {s}" for s in args.set]])
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}
    job_id = client.submit_job(entrypoint=entry, runtime_env={"working_dir": args.working_dir,
                                                              "env_vars": env,
                                                              "excludes": [".venv", "mlruns", ".pipeline",
                                                                           "mlflow.db", ".git"]})
    print(f"submitted {job_id} to {args.address}: {entry}")
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="")

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline import tracking

    if args.higher_is_better and not args.metric:
        raise UsageError("--higher-is-better goes with --metric NAME (the stage's own gate knows its direction)")
    _connect(args.tracking_uri)
    gate = None
    if args.metric:
        gate = tracking.Gate(args.metric, higher_is_better=args.higher_is_better)
    r = tracking.promote(args.name, to=args.to, from_=args.from_, force=args.force, gate=gate)
    prev = f"v{r.previous.version}" if r.previous else "(none)"
    values = f" [{r.metric}: candidate {r.candidate_value}, {args.to} {r.previous_value}]" if r.metric else ""
    if r.promoted:
        print(f"{args.name}@{args.to}: {prev} → v{r.candidate.version} ({r.reason}){values}")
        return 0
    print(f"{args.name}@{args.to} stays {prev}: not promoting v{r.candidate.version}: {r.reason}{values}")
    return 1


def cmd_lineage(args: argparse.Namespace) -> int:
    from pipeline import tracking

    _connect(args.tracking_uri)
    print("\n".join(tracking.format_lineage(tracking.lineage(args.model))))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune import format_table, load_sweep, run_sweep

    sweep = load_sweep(args.sweep, args.set)  # validated whole before any work starts
    result = run_sweep(sweep, sweep_set=args.set, resume=not args.restart)
    print(f"\nSweep '{result.name}'{' (resumed)' if result.restored else ''}: {len(result.rows)} trials, "
          f"MLflow run {result.sweep_run_id}, Tune experiment {result.storage}")
    print(format_table(result))
    failed = [r for r in result.rows if r.status == "failed"]
    for r in failed:
        print(f"trial {r.trial_id} failed: {r.error}")
    if result.candidate:
        print(f"best trial {result.best.trial_id}: {result.metric}={result.best.metric_value:.6g} → "
              f"{result.candidate} (@{sweep.spec.register_alias}); promote with `pipeline promote "
              f"{result.candidate.split('/')[1]} --to champion`")
        return 0
    print("no trial completed; nothing was registered")
    return 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Forward to `python -m pipeline.bench` (see BENCHMARKS.md)."""
    from pipeline.bench.__main__ import build_parser as bench_parser
    from pipeline.bench.__main__ import main as bench_main

    parser = bench_parser()
    parser.error = _Parser.error.__get__(parser)  # the pipeline's error form for its options too
    known, _ = parser.parse_known_args(args.bench_args)
    if known.repeats is not None and known.repeats < 1:
        parser.error(f"argument --repeats: must be an integer ≥ 1, got '{known.repeats}'")
    if known.json is not None:
        try:
            _out_file(known.json)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --json: {exc}")
    return bench_main(args.bench_args)


def _langevin_flags(parser: argparse.ArgumentParser) -> None:
    """The settings of `--sampler langevin` (annealed Langevin, eq. 32-33; --steps counts its noise levels)."""
    parser.add_argument("--langevin-steps", type=_number(int, 1), default=3,
                        help="langevin: steps of eq. 32 per noise level")
    parser.add_argument("--langevin-step-ratio", type=_number(float, 0, lo_open=True), default=0.5,
                        help="langevin: step size δ = ratio·σ² at each noise level")


def _langevin_kw(args: argparse.Namespace) -> dict[str, float]:
    return {"langevin_steps": args.langevin_steps, "langevin_step_ratio": args.langevin_step_ratio}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pipeline", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run every stage of a job file")
    r.add_argument("job")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec field (repeatable)")
    r.add_argument("--force-promote", action="store_true",
                   help="a stage's new version takes @champion even when worse than the current champion on "
                        "the gate metric (never outside the gate's bounds); recorded in the version's tag "
                        "pipeline.promotion.champion.forced")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="check a job file without running it")
    v.add_argument("job")
    v.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    v.set_defaults(fn=cmd_validate)

    d = sub.add_parser("data", help="datasets as WebDataset shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="write shards + manifest from a source")
    b.add_argument("--source", required=True, type=_data_source,
                   help="digits | photos | sprites | moving-digits | imagefolder:PATH")
    b.add_argument("--out", required=True, type=_out_dir, help="dataset folder (created; its parent must exist)")
    b.add_argument("--image-size", type=_number(int, 1), default=None)
    b.add_argument("--held-out", type=_number(float, 0, 1, lo_open=True, hi_open=True), default=0.15,
                   help="fraction held out as the test split, in (0, 1)")
    b.add_argument("--shard-size", type=_number(int, 1), default=512)
    b.add_argument("--seed", type=_number(int, 0, _SEED_MAX), default=0)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(fn=cmd_data_build)

    s = sub.add_parser("sample", help="draw an image grid from a registered diffusion model")
    s.add_argument("model", type=_model_uri, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    s.add_argument("--steps", type=_number(int, 1), default=None,
                   help="sampling steps, at most the model's T (default: the model's own)")
    s.add_argument("--guidance", type=_number(float, 0), default=0.0, help="classifier-free guidance weight w ≥ 0")
    s.add_argument("--label", type=_number(int, 0), default=None, help="class to draw (default: all classes)")
    s.add_argument("--caption", action="append", default=None,
                   help="text-conditioned models (unCLIP decoders, conditioning: text, text cascades): a caption to "
                        "draw --num samples of (repeatable, one row each)")
    s.add_argument("--control", action="append", default=None, metavar="IMAGE",
                   help="ControlNet models: a picture whose Canny edges the samples follow (repeatable, one row each)")
    s.add_argument("--sampler", choices=["ddim", "ancestral", "langevin"], default="ddim")
    _langevin_flags(s)
    s.add_argument("--eta", type=_number(float, 0, 1), default=0.0, help="DDIM η in [0, 1]")
    s.add_argument("--num", type=_number(int, 1), default=64)
    s.add_argument("--nrow", type=_number(int, 1), default=8)
    s.add_argument("--seed", type=_number(int, 0, _SEED_MAX), default=0)
    s.add_argument("--out", type=_out_file, default="grid.png", help="PNG file to write (its folder must exist)")
    s.add_argument("--tracking-uri", default=None)
    s.add_argument("--classifier", type=_model_uri, default=None, metavar="MODEL_URI",
                   help="noisy classifier for classifier guidance (trained on the model's own input space: "
                        "pixels, or the same scaled latents for a latent model)")
    s.add_argument("--classifier-scale", type=_number(float, 0), default=None,
                   help="classifier guidance scale s (Algorithm 1 / eq. 38); default 1 with --classifier")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="FID/KID and class accuracy of a generator (`eval [fid] MODEL`; "
                       "likelihood: `eval nll MODEL`)")
    e.add_argument("model", type=_model_uri)
    e.add_argument("--classifier", type=_model_uri, default="models:/ldm-classifier@champion")
    e.add_argument("--data", type=_data_dir, default="data/digits")
    e.add_argument("--steps", type=_number(int, 1), default=None)
    e.add_argument("--guidance", type=_number(float, 0), default=0.0)
    e.add_argument("--sampler", choices=["ddim", "ancestral", "langevin"], default="ddim")
    _langevin_flags(e)
    e.add_argument("--num", type=_number(int, 2), default=500, help="samples (≥ 2: FID needs a covariance)")
    e.add_argument("--seed", type=_number(int, 0, _SEED_MAX), default=0)
    e.add_argument("--tracking-uri", default=None)
    e.set_defaults(fn=cmd_eval)

    n = sub.add_parser("eval-nll", help="NLL in bits/dim of held-out data from the full VLB (= `eval nll MODEL`)")
    n.add_argument("model", type=_model_uri, help="models:/NAME@ALIAS or models:/NAME/VERSION of a diffusion model")
    n.add_argument("--data", type=_data_dir, default="data/digits",
                   help="pixel shards (latent models encode them)")
    n.add_argument("--split", choices=["train", "test"], default="test")
    n.add_argument("--num", type=_number(int, 1), default=1000, help="first N examples of the split (default 1000)")
    n.add_argument("--conditional", action="store_true", help="−log p(x|y) with the true labels (default: p(x))")
    n.add_argument("--var-type", choices=["beta", "beta_tilde"], default="beta",
                   help="fixed reverse variance when the model does not learn Σ")
    n.add_argument("--batch-size", type=_number(int, 1), default=64)
    n.add_argument("--seed", type=_number(int, 0, _SEED_MAX), default=0)
    n.add_argument("--tracking-uri", default=None)
    n.set_defaults(fn=cmd_eval_nll)

    ty = sub.add_parser("toy", help="toy experiments from the study notes")
    tysub = ty.add_subparsers(dest="toy_command", required=True)
    sr = tysub.add_parser("swissroll", help="MLP DDPM on the 2-D Swiss roll (notes fig. 2-3), logged to MLflow")
    sr.add_argument("--steps", type=_number(int, 1), default=4000, help="training steps")
    sr.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    sr.add_argument("--timesteps", type=_number(int, 2), default=1000, help="T")
    sr.add_argument("--parameterization", choices=["eps", "x0", "v"], default="eps")
    sr.add_argument("--loss", choices=["simple", "hybrid"], default="simple")
    sr.add_argument("--lambda-vlb", type=_number(float, 0), default=0.001, help="λ of the hybrid loss")
    sr.add_argument("--learn-sigma", action="store_true", help="learn Σ (eq. 35); use with --loss hybrid")
    sr.add_argument("--var-type", choices=["beta", "beta_tilde"], default="beta", help="fixed Σ otherwise")
    sr.add_argument("--batch-size", type=_number(int, 1), default=512)
    sr.add_argument("--lr", type=_number(float, 0, lo_open=True), default=1e-3)
    sr.add_argument("--max-lr", type=_number(float, 0, lo_open=True), default=3e-3,
                    help="peak of the one-cycle LR schedule")
    sr.add_argument("--sampler", action="append", choices=["ancestral", "strided", "ddim", "langevin"],
                    default=None,
                    help="repeatable (default: the first three): ancestral = all T steps, strided = ancestral on "
                         "--sample-steps, ddim = --sample-steps DDIM steps with --eta, langevin = annealed "
                         "Langevin (eq. 32-33) on --sample-steps noise levels")
    _langevin_flags(sr)
    sr.add_argument("--sample-steps", type=_number(int, 1), default=50, help="at most --timesteps")
    sr.add_argument("--eta", type=_number(float, 0, 1), default=0.0, help="DDIM η in [0, 1]")
    sr.add_argument("--num-samples", type=_number(int, 2), default=2000)
    sr.add_argument("--nll-points", type=_number(int, 1), default=500, help="held-out points for bits/dim")
    sr.add_argument("--seed", type=_number(int, 0, _SEED_MAX), default=0)
    sr.add_argument("--tracking-uri", default=None)
    sr.add_argument("--experiment", default="toy-swissroll")
    sr.add_argument("--threads", type=_number(int, 1), default=1, help="torch intra-op threads (default 1: tiny ops)")
    sr.set_defaults(fn=cmd_toy_swissroll)

    bn = sub.add_parser("bench", help="benchmarks: bench NAME [--json OUT] [--repeats N] [--quick] (BENCHMARKS.md)",
                        description="Forwards to `python -m pipeline.bench` (`pipeline bench data -h`).")
    bn.add_argument("bench_args", nargs=argparse.REMAINDER)
    bn.set_defaults(fn=cmd_bench)

    j = sub.add_parser("submit", help="submit a job to a Ray cluster and stream its logs")
    j.add_argument("job")
    j.add_argument("--address", required=True, type=_dashboard_url,
                   help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    j.add_argument("--working-dir", type=_existing_dir, default=".")
    j.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    j.set_defaults(fn=cmd_submit)

    pr = sub.add_parser("promote", help="move a registry alias to a better version (metric-gated)")
    pr.add_argument("name", type=_model_name, help="registered model name")
    pr.add_argument("--to", type=_alias, default="champion", help="alias to move (default: champion)")
    pr.add_argument("--from", dest="from_", type=_alias_or_version, default="candidate",
                    help="alias or version to promote")
    pr.add_argument("--force", action="store_true", help="promote without comparing (recorded in a tag)")
    pr.add_argument("--metric", default=None, help="compare on this metric instead of the stage's gate")
    pr.add_argument("--higher-is-better", action="store_true", help="with --metric: higher values win")
    pr.add_argument("--tracking-uri", default=None)
    pr.set_defaults(fn=cmd_promote)

    ln = sub.add_parser("lineage", help="print the chain of versions behind a model back to the data")
    ln.add_argument("model", type=_model_uri, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ln.add_argument("--tracking-uri", default=None)
    ln.set_defaults(fn=cmd_lineage)

    t = sub.add_parser("tune", help="Ray Tune sweep of a job's stage (jobs/sweep*.yaml)")
    t.add_argument("sweep")
    t.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a sweep-file field (repeatable)")
    t.add_argument("--restart", action="store_true", help="do not resume an interrupted sweep of this name")
    t.set_defaults(fn=cmd_tune)
    return p


def _eval_subverb(argv: list[str] | None) -> list[str]:
    """`eval nll MODEL` → `eval-nll MODEL`; `eval fid MODEL` → `eval MODEL` (plain `eval MODEL` is FID/KID)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is not None and argv[i] == "eval" and i + 1 < len(argv) and argv[i + 1] in ("nll", "fid"):
        argv[i:i + 2] = ["eval-nll" if argv[i + 1] == "nll" else "eval"]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pipeline` console script: the exit code. Bad command-line input (argparse's
    checks, or a command's own before it works) prints one ``error:`` line last and raises `UsageError`
    (a `SystemExit` with code 2); a user error met while working prints the same and returns 2."""
    from pipeline import progress

    try:
        args = build_parser().parse_args(_eval_subverb(argv))
        _setup_logging(args.verbose)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return int(args.fn(args) or 0)
    except UsageError as exc:
        _stop_ray()
        print(f"error: {exc}", file=progress.stderr())
        raise
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=progress.stderr())
        return 130
    except Exception as exc:
        from pipeline.config import user_message

        root = _user_error(exc)
        if root is None:
            if progress.stderr() is not sys.stderr:  # a bug: its traceback on the terminal too, not only the log
                traceback.print_exc(file=progress.stderr())
            raise
        _stop_ray()  # flush Ray's forwarded worker logs first, so the message is the last line
        print(f"error: {user_message(root)}", file=progress.stderr())
        return 2


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
