"""ksparse-filters: the learned filters of k-sparse autoencoders for several k (notes figure 1-4).

`pipeline bench ksparse-filters --k 10 25 40 --out DIR [--steps N] [--latent 100] [--data DIR]`
trains one k-sparse AE per k on the bundled 16x16 digits, in this process (no Ray: a plain Adam loop
over the same `ksparse` objective, `mlp_ae` model and AdamW settings as `jobs/ksparse.yaml`), and writes
`DIR/filters_k{k}.png` (the encoder's weight rows as tiles) plus a table of the held-out reconstruction
MSE against the mean-image baseline and the fraction of dead units per k. Small k gives global,
digit-like templates (each of the few active units must explain much of the image); larger k gives
more local, stroke-like parts. With $MLFLOW_TRACKING_URI (or --tracking-uri)
set, each k is also logged as an MLflow run (experiment `ksparse-filters`) with its metrics and image.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench import Options, Report


def train_ksparse(data_dir: Path, k: int, *, steps: int, latent: int, lr: float, weight_decay: float,
                  batch_size: int, anneal_steps: int, seed: int
                  ) -> tuple[torch.nn.Module, dict[str, float], dict[str, bytes]]:
    """Train one k-sparse AE on the train split of `data_dir`; (model, held-out metrics, images)."""
    from pipeline.data import load_split
    from pipeline.models import build_model
    from pipeline.objectives import get_objective

    torch.manual_seed(seed)
    x = torch.from_numpy(load_split(data_dir, "train")["image"])
    c, h, _ = x.shape[1:]
    model = build_model("mlp_ae", in_channels=c, image_size=h, hidden=[], latent=latent,
                        code_activation="linear", tied_init=True)
    cfg = {"type": "ksparse", "k": k, "anneal_steps": anneal_steps}
    objective = get_objective("ksparse")
    objective.check_cfg(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)  # as the job's DeepSpeed engine
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss, _ = objective.loss(model, {"image": x[idx]}, gen, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    metrics, images = objective.evaluate(model, data_dir, cfg, seed)
    return model, metrics, images


def _log_mlflow(uri: str, k: int, params: dict[str, Any], metrics: dict[str, float], png: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("ksparse-filters")
    with mlflow.start_run(run_name=f"ksparse-k{k}") as run:
        mlflow.log_params({**params, "k": k})
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(png), "samples")
        return run.info.run_id


def run(opts: Options) -> Report:
    """Train one k-sparse AE per k and write its filter image; a row of held-out metrics per k."""
    p = argparse.ArgumentParser(prog="pipeline bench ksparse-filters")
    p.add_argument("--k", type=int, nargs="+", default=[10, 25, 40], help="sparsity levels (units kept)")
    p.add_argument("--out", default="bench-results/ksparse-filters", help="folder for filters_k{k}.png")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--latent", type=int, default=100, help="code units (filters)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1.0,
                   help="AdamW decoupled weight decay: unused weights fade to 0, so filters come out cleaner")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--anneal-steps", type=int, default=None, help="k annealing steps (default: steps / 2)")
    p.add_argument("--data", default=None, help="digits shards (default: built under a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="log each k as an MLflow run (default: $MLFLOW_TRACKING_URI; none: no logging)")
    a = p.parse_args(opts.extra)
    if opts.quick:
        a.steps, a.k = 50, a.k[:1]
    if any(k < 1 or k > a.latent for k in a.k):
        p.error(f"every --k must be in [1, --latent={a.latent}]")
    anneal = a.steps // 2 if a.anneal_steps is None else a.anneal_steps
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(a.data) if a.data else Path(tmp) / "digits"
        if not (data_dir / "manifest.json").is_file():
            from pipeline.data import build_dataset

            build_dataset("digits", data_dir, image_size=16, held_out=0.15, shard_size=512, seed=a.seed)
        rows: list[dict[str, Any]] = []
        for k in a.k:
            t0 = time.perf_counter()
            _, metrics, images = train_ksparse(data_dir, k, steps=a.steps, latent=a.latent, lr=a.lr,
                                               weight_decay=a.weight_decay, batch_size=a.batch_size,
                                               anneal_steps=anneal, seed=a.seed)
            png = out / f"filters_k{k}.png"
            png.write_bytes(images["samples/filters.png"])
            (out / f"reconstructions_k{k}.png").write_bytes(images["samples/reconstructions.png"])
            row = {"k": k, "recon MSE": metrics["eval/recon_mse"], "mean-image MSE": metrics["eval/mean_image_mse"],
                   "recon / mean-image": metrics["eval/recon_ratio"], "PSNR dB": metrics["eval/psnr"],
                   "dead units": metrics["eval/dead_units"], "train s": time.perf_counter() - t0,
                   "image": str(png)}
            if a.tracking_uri:
                row["mlflow run"] = _log_mlflow(a.tracking_uri, k, {"steps": a.steps, "latent": a.latent,
                                                                    "lr": a.lr, "weight_decay": a.weight_decay,
                                                                    "anneal_steps": anneal}, metrics, png)
            rows.append(row)
            print(f"k={k}: recon MSE {row['recon MSE']:.4f} (mean image {row['mean-image MSE']:.4f}), "
                  f"dead units {row['dead units']:.2f} -> {png}", flush=True)
    columns = ["k", "recon MSE", "mean-image MSE", "recon / mean-image", "PSNR dB", "dead units", "train s", "image"]
    if a.tracking_uri:
        columns.append("mlflow run")
    return Report(
        name="ksparse-filters", command="pipeline bench ksparse-filters " + " ".join(opts.extra),
        columns=columns, rows=rows,
        notes=[f"mlp_ae 256-{a.latent} linear code, tied init, {a.steps} AdamW steps (lr {a.lr}, weight decay "
               f"{a.weight_decay}, batch {a.batch_size}), k annealed from {a.latent} over {anneal} steps; "
               "held-out 16x16 digits"],
        params=vars(a) | {"anneal_steps": anneal})
