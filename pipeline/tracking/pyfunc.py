"""The pipeline's MLflow model: every registered version loads with `mlflow.pyfunc.load_model` and serves
with `mlflow models serve`.

A version is an MLflow model whose `data/model` folder is the pipeline's own export (model.json +
model.safetensors, read with safetensors: nothing is unpickled). A latent model carries the autoencoder
it was trained on in `data/model/decoder`, so it loads without the registry. What `predict` takes and
returns, by kind (each version's signature and input example say the same):

- class-conditional generators (diffusion, distilled, consistency): a `label` column, one image per row;
- text-conditioned generators: a `caption` column, one image per row;
  for both, the params `seed`, `steps` (0: the model's own), `guidance`, `sampler` and `eta` apply to the
  whole request, as the options of `pipeline sample` do: the same request draws the same images;
- autoencoders: images (N, C, H, W) in [-1, 1]; param `mode` = reconstruct | encode | decode (latents in);
- classifiers: images (N, C, H, W) in [-1, 1] → logits (N, classes).

Generated images come out as uint8 arrays (N, H, W, C), quantized as `pipeline sample`'s grids are.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: where the pipeline's export sits inside the MLflow model
DATA = "model"
GENERATOR_KINDS = ("diffusion", "consistency")
SERVED = "class- or text-conditioned generators, autoencoders and classifiers"


def export_dir(model_dir: str | Path) -> Path:
    """The pipeline export inside a downloaded version: `data/model` of an MLflow model, else the folder itself."""
    inner = Path(model_dir) / "data" / DATA
    return inner if (inner / "model.json").is_file() else Path(model_dir)


def _kind(meta: dict[str, Any]) -> str | None:
    return meta["extra"].get("kind")


def _is_text(meta: dict[str, Any]) -> bool:
    return meta["extra"].get("conditioning") == "text"


def signature(meta: dict[str, Any], image_chw: tuple[int, int, int] | None):
    """The MLflow signature and input example of a version of this kind (None, None where not served).

    Images of unknown shape (`image_chw` None) get -1 dimensions and no example."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    c, h, w = image_chw or (-1, -1, -1)
    pixels = np.zeros((1, c, h, w), np.float32) if image_chw else None
    images = TensorSpec(np.dtype(np.float32), (-1, c, h, w))  # images in [-1, 1]
    kind = _kind(meta)
    if kind in GENERATOR_KINDS:
        import pandas as pd

        column = "caption" if _is_text(meta) else "label"
        params = ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("steps", "long", 0),
                              ParamSpec("guidance", "double", 0.0), ParamSpec("sampler", "string", "ddim"),
                              ParamSpec("eta", "double", 0.0)])
        out = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))])  # images (N, H, W, C)
        example = (pd.DataFrame({"caption": ["a handwritten digit three"] * 2}) if column == "caption"
                   else pd.DataFrame({"label": [0, 1]}))
        return ModelSignature(Schema([ColSpec("string" if column == "caption" else "long", column)]), out,
                              params), example
    if kind == "autoencoder":
        params = ParamSchema([ParamSpec("mode", "string", "reconstruct")])
        any_shape = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))])  # images, or latents to decode
        return ModelSignature(any_shape, any_shape, params), pixels
    if kind == "classifier":
        out = Schema([TensorSpec(np.dtype(np.float32), (-1, -1))])  # logits
        return ModelSignature(Schema([images]), out), pixels
    return None, None


def requirements() -> list[str]:
    """What a serving environment needs besides this package (`--env-manager local` runs in ours)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "safetensors", "numpy", "pandas", "pillow", "mlflow")]


def log_model(run_id: str, export: str | Path, *, name: str, image_chw: tuple[int, int, int] | None = None):
    """Log `export` as the run's MLflow model (a LoggedModel, python_function flavor); returns its ModelInfo.

    A latent model's autoencoder (`extra.autoencoder`, a version URI) is bundled beside it as `decoder/`.
    """
    import sys

    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from pipeline.train.export import read_meta

    meta = read_meta(export)
    sig, example = signature(meta, image_chw)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / DATA
        shutil.copytree(export, staged)
        ae = meta["extra"].get("autoencoder")
        if ae and not (staged / "decoder").exists():
            from pipeline import tracking

            shutil.copytree(tracking.download(tracking.resolve(ae)), staged / "decoder")
        # in the run's experiment (MLflow would take the process's active one); no serving-input check at
        # logging time: it would sample from a generator in the driver
        client = MlflowClient()
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name,
                                            source_run_id=run_id, model_type=str(_kind(meta)))
        return Model.log(None, model_id=logged.model_id, flavor=sys.modules[__name__], run_id=run_id,
                         export=staged, signature=sig, input_example=example, kind=str(_kind(meta)),
                         validate_serving_input=False)


def save_model(path: str, mlflow_model, *, export: Path, signature, input_example, kind: str, **_: Any) -> None:
    """Write the MLflow model (what `Model.log` calls): the python_function flavor around `export`."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(path, loader_module=__name__, data_path=str(export), mlflow_model=mlflow_model,
                             signature=signature, input_example=input_example, pip_requirements=requirements(),
                             metadata={"pipeline_kind": kind})


class PipelineModel:
    """What `mlflow.pyfunc.load_model` returns the inside of: `predict` by the version's kind."""

    def __init__(self, model_dir: Path):
        from pipeline.train.export import load_exported, read_meta

        self.meta = read_meta(model_dir)
        self.kind = _kind(self.meta)
        if self.kind in GENERATOR_KINDS:
            from pipeline.eval import Generator

            model, meta = load_exported(model_dir)
            decoder = load_exported(model_dir / "decoder")[0] if (model_dir / "decoder").is_dir() else None
            self.gen = Generator(model, meta, decoder)
        elif self.kind in ("autoencoder", "classifier"):
            self.model, _ = load_exported(model_dir)
        else:
            raise ValueError(f"a {self.kind} model is not served through mlflow.pyfunc (it serves {SERVED}); "
                             "draw from it with `pipeline sample`")

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Images, latents or logits for `model_input` (a DataFrame or an array, as the signature says)."""
        import torch

        params = params or {}
        with torch.no_grad():
            if self.kind in GENERATOR_KINDS:
                return self._generate(model_input, params)
            x = torch.tensor(np.asarray(model_input, dtype=np.float32))
            if self.kind == "classifier":
                return self.model(x).numpy()
            mode = params.get("mode", "reconstruct")
            if mode == "decode":
                return self.model.decode(x).numpy()
            if mode not in ("reconstruct", "encode") or not hasattr(self.model, "encode"):
                raise ValueError(f"mode {mode!r}: this autoencoder takes reconstruct, encode or decode"
                                 + ("" if hasattr(self.model, "encode") else " (it has no encoder: decode only)"))
            z = self.model.encode(x)
            z = z[0] if isinstance(z, tuple) else z  # a VAE's mean, a VQ-VAE's quantized code
            return (z if mode == "encode" else self.model.decode(z)).numpy()

    def _generate(self, model_input: Any, params: dict[str, Any]) -> np.ndarray:
        import torch

        from pipeline.eval import generate

        steps = int(params.get("steps") or 0) or None
        kw = {"steps": steps, "guidance": float(params.get("guidance", 0.0)), "seed": int(params.get("seed", 0)),
              "sampler": str(params.get("sampler", "ddim")), "eta": float(params.get("eta", 0.0))}
        if _is_text(self.meta):
            from pipeline.eval.text import generate_from_captions

            x = generate_from_captions(self.gen, [str(c) for c in model_input["caption"]], **kw)
        else:
            labels = torch.tensor(np.asarray(model_input["label"], dtype=np.int64))
            if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < self.gen.num_classes):
                raise ValueError(f"labels must be in [0, {self.gen.num_classes - 1}]")
            x = generate(self.gen, labels, **kw)
        return to_uint8(x)


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) → uint8 (N, H, W, C), rounded as `pipeline.eval.image_grid` does."""
    import torch

    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _load_pyfunc(data_path: str) -> PipelineModel:
    """The python_function flavor's loader: `data_path` is the model's `data/model` folder."""
    return PipelineModel(Path(data_path))
