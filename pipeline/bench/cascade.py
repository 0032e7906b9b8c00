"""cascade: a registered cascade (jobs/cascade.yaml, jobs/imagen.yaml) sampled whole at several guidance
weights, with and without dynamic thresholding.

`pipeline bench cascade jobs/imagen.yaml [--set KEY=VALUE ...] [--num N] [--guidance 0,1,3,6]
[--thresholds none,0.99] [--tracking-uri URI]` reads the champion of the job's last `superres` stage (and,
through it, the whole chain) from MLflow — run it where the job ran — and samples N images from the held-out
captions (text-conditioned cascades) or class labels, overriding the BASE stage's classifier-free guidance weight
and dynamic-thresholding quantile per row (every super-resolution stage keeps its own settings). Per row:
class accuracy of the final images and FID/KID on the features of the job's classifier against the held-out
split, and the share of saturated base pixels (|x| ≥ 0.98 in [-1, 1]), which dynamic thresholding lowers at
large guidance weights.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

from pipeline.bench import Options, Report

COLUMNS = ["guidance (base)", "dynamic threshold", "class acc", "FID", "KID", "saturated base pixels", "img/s"]


def _parse(extra: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pipeline bench cascade")
    p.add_argument("job", help="the job file of the registered cascade (e.g. jobs/imagen.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--num", type=int, default=None, help="samples per row (default: the job's eval.num_samples)")
    p.add_argument("--guidance", default="0,1,3,6", help="classifier-free guidance weights of the base stage")
    p.add_argument("--thresholds", default="none,0.99", help="dynamic-thresholding quantiles ('none': off)")
    p.add_argument("--tracking-uri", default=None)
    return p.parse_args(extra)


def saturated_share(x: Any, level: float = 0.98) -> float:
    """The share of values with |x| ≥ ``level`` (images in [-1, 1])."""
    return float((x.abs() >= level).float().mean())


def run(opts: Options) -> Report:
    """Sample the job's registered cascade per (guidance, threshold) and measure the final images."""
    import torch

    from pipeline import tracking
    from pipeline.config import load_spec
    from pipeline.data import load_split
    from pipeline.eval import sample_metrics
    from pipeline.stages.superres import load_cascade, sample_cascade
    from pipeline.train.export import load_exported

    args = _parse(opts.extra)
    spec = load_spec(args.job, args.set)
    tracking.connect(tracking.tracking_uri(args.tracking_uri or spec.tracking.uri))
    last = [name for name, s in spec.stages.items() if s.kind == "superres"]
    if not last or not spec.eval.classifier:
        raise SystemExit(f"{args.job}: needs superres stages and eval.classifier")
    ref = tracking.resolve(f"models:/{spec.stages[last[-1]].registry.name}@champion")
    chain = load_cascade(tracking.download(ref))
    cls_ref = tracking.resolve(f"models:/{spec.stages[spec.eval.classifier].registry.name}@champion")
    classifier, _ = load_exported(tracking.download(cls_ref))
    test = load_split(spec.data.dir, "test")
    n = min(args.num or (20 if opts.quick else spec.eval.num_samples), len(test["label"]))
    labels = torch.as_tensor(test["label"][:n], dtype=torch.long)
    captions = [str(c) for c in test["caption"][:n]]
    real = torch.from_numpy(test["image"])
    rows = []
    for w in [float(v) for v in args.guidance.split(",")]:
        for th in args.thresholds.split(","):
            threshold = None if th.strip() == "none" else float(th)
            rowchain = copy.copy(chain)
            model, meta = chain[0]
            meta = copy.deepcopy(meta)
            meta["extra"].setdefault("sampling", {}).update(guidance=w, dynamic_threshold=threshold)
            rowchain[0] = (model, meta)
            t0 = time.perf_counter()
            outs = sample_cascade(rowchain, labels, spec.seed, captions=captions)
            secs = time.perf_counter() - t0
            m = sample_metrics(outs[-1], labels, real, classifier)
            rows.append({"guidance (base)": w, "dynamic threshold": th.strip(), "class acc": m["class_accuracy"],
                         "FID": m["fid"], "KID": m["kid"], "saturated base pixels": saturated_share(outs[0]),
                         "img/s": n / secs})
            print(f"  w={w:g} threshold={th.strip():<5} acc {m['class_accuracy']:.3f}  FID {m['fid']:.3f}  "
                  f"saturated {rows[-1]['saturated base pixels']:.3f}", flush=True)
    sets = "".join(f" --set {s}" for s in args.set)
    sizes = " → ".join(f"{m['extra']['size']}px" for _, m in chain)
    cond = "captions" if chain[0][1]["extra"].get("conditioning") == "text" else "labels"
    return Report(name="cascade", command=f"pipeline bench cascade {args.job}{sets} --num {n} --guidance "
                  f"{args.guidance} --thresholds {args.thresholds}", columns=COLUMNS, rows=rows,
                  notes=[f"{n} samples per row from the held-out {cond}, seed {spec.seed}; cascade {sizes} "
                         f"ending at {ref.name} v{ref.version}; classifier {cls_ref.name} v{cls_ref.version}"],
                  params={"job": args.job, "num": n})
