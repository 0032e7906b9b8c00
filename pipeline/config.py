"""Job specs: YAML parsed into pydantic models, validated whole before any work starts.

A job file describes a whole run: its data, its stages (each with a model, an objective, a
trainer scale, a step budget, a checkpoint cadence, an evaluation and a registry name).
Errors name the file, the key path and what was expected; they never show a traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class SpecError(Exception):
    """A user error in a job spec: the message is complete and meant to be shown as is."""


class ClusterError(Exception):
    """The machine or Ray cluster cannot do what the spec asks (unreachable address, no GPU, too few
    resources): the message is complete and meant to be shown as is."""


def user_error_root(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of one of `kinds` behind `exc`, looking through Ray's wrappers.

    Ray Train raises `WorkerGroupError` (`worker_failures`: rank -> error, each wrapping the
    worker's exception in `_base_exc`) or `ControllerError` (`controller_failure`); Ray tasks
    raise `RayTaskError` (`cause`). Attributes are read by name, so this module needs no Ray.
    """
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, kinds):  # a RayTaskError posing as its cause: prefer the original
            return cause if isinstance(cause, kinds) else e
        if type(e).__name__ == "InsufficientClusterResourcesError":
            return ClusterError(str(e).strip())
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            queue.extend(v for _, v in sorted(failures.items()) if isinstance(v, BaseException))
        for attr in ("_base_exc", "controller_failure", "cause", "__cause__", "__context__"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                queue.append(inner)
    return None


_RAY_DATA_RETRY_NOTE = "\nFailed to apply UDF transform after "


def user_message(root: BaseException) -> str:
    """The message of a user error, without the retry note Ray Data appends to errors from its tasks."""
    return str(root).split(_RAY_DATA_RETRY_NOTE, 1)[0]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelSpec(_Strict):
    """A network from the model registry: `name` plus constructor arguments."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class ScaleSpec(_Strict):
    """How a stage is spread over Ray Train workers and what DeepSpeed does on each."""

    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    max_failures: int = Field(1, ge=-1)


class TrainSpec(_Strict):
    """Step budget, optimisation and checkpoint cadence of a training stage."""

    steps: int = Field(..., ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    on_nonfinite: Literal["skip", "stop"] = "stop"
    torch_threads: int = Field(1, ge=1)


class GateSpec(_Strict):
    """A metric threshold: `champion` moves to a new version only when it passes and does not regress.

    A `min` bound makes the metric "higher is better", a `max` bound "lower is better" (min wins when
    both are given); `pipeline.tracking.judge` is the promotion rule.
    """

    metric: str
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> GateSpec:
        if self.max is None and self.min is None:
            raise ValueError("a gate needs `max` or `min`")
        return self

    def passes(self, metrics: dict[str, float]) -> bool:
        """True when `metrics[metric]` is within the bounds."""
        value = metrics.get(self.metric)
        if value is None or value != value:  # missing or NaN
            return False
        if self.max is not None and value > self.max:
            return False
        return not (self.min is not None and value < self.min)


class RegisterSpec(_Strict):
    """Where a stage's result is registered in the MLflow model registry, and its promotion gate."""

    name: str
    gate: GateSpec

    @model_validator(mode="before")
    @classmethod
    def _gate_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gate") is None:
            raise ValueError("`gate` is required: every registered stage needs one ({metric: M, min: X} or "
                             "{metric: M, max: X}, a metric the stage logs); `champion` moves only to versions "
                             "that pass it and do not regress on M")
        return data


class _StageBase(_Strict):
    needs: list[str] = Field(default_factory=list)


class _TrainedStage(_StageBase):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    registry: RegisterSpec = Field(alias="register")

    @model_validator(mode="after")
    def _batch_splits_over_workers(self):
        scale, train = getattr(self, "scale", None), getattr(self, "train", None)
        if scale is not None and train is not None and train.batch_size % scale.workers:
            raise ValueError(f"train.batch_size ({train.batch_size}) must be a multiple of scale.workers "
                             f"({scale.workers}): each worker reads batch_size / workers samples of every global "
                             "batch, which keeps the data order the same for any worker count")
        return self


class AutoencoderStage(_TrainedStage):
    """An autoencoder-family model; `objective.type` picks the objective (default `kl_vae`, the LDM first stage)."""

    kind: Literal["autoencoder"]
    model: ModelSpec
    objective: dict[str, Any] = Field(default_factory=lambda: {"beta": 1e-4})
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: dict[str, Any]) -> dict[str, Any]:
        from pipeline.objectives import get_objective

        objective = get_objective(str(v.get("type", "kl_vae")))  # ValueError naming the known types
        if hasattr(objective, "check_cfg"):  # an objective may validate its own keys and values
            objective.check_cfg(v)
        return v


class ClassifierStage(_TrainedStage):
    """Classifier of (optionally noisy) real images, used by evaluation and guidance."""

    kind: Literal["classifier"]
    model: ModelSpec
    noisy: bool = False
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec


class EncodeStage(_StageBase):
    """Ray Data batch inference with the registered autoencoder, writing latent shards."""

    kind: Literal["encode"]
    batch_size: int = Field(256, ge=1)  # images per forward pass
    workers: int = Field(1, ge=1)  # actors in the Ray Data pool, each with the model loaded
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # > 0: the actors encode on a GPU


class DiffusionSpec(_Strict):
    """The diffusion process and its training objective."""

    schedule: Literal["linear", "cosine"] = "cosine"
    timesteps: int = Field(1000, ge=2)
    parameterization: Literal["eps", "x0", "v"] = "eps"
    loss: Literal["simple", "hybrid"] = "simple"
    lambda_vlb: float = Field(0.001, ge=0)
    learn_sigma: bool = Field(False, validate_default=True)
    label_dropout: float = Field(0.1, ge=0, le=1)

    @field_validator("learn_sigma")
    @classmethod
    def _hybrid_needs_learned_sigma(cls, v: bool, info: ValidationInfo) -> bool:
        # L_hybrid = L_simple + λ L_VLB (notes 2.2.4): with a fixed Σ the VLB term has no gradient of its own
        if info.data.get("loss") == "hybrid" and not v:
            raise ValueError("diffusion.loss: hybrid needs learned Σ (eq. 35; its λ·L_VLB term only trains Σ_θ): "
                             "set diffusion.learn_sigma: true and model.args.learn_sigma: true, or use loss: simple")
        return v


class SamplingSpec(_Strict):
    """How samples are drawn for the grid and the evaluation."""

    sampler: Literal["ddim", "ancestral", "langevin"] = "ddim"
    steps: int = Field(50, ge=1)  # langevin: the number of noise levels
    eta: float = Field(0.0, ge=0)
    langevin_steps: int = Field(3, ge=1)  # langevin: steps of eq. 32 per noise level
    langevin_step_ratio: float = Field(0.5, gt=0)  # langevin: δ = ratio·σ² at every level (eq. 32-33)
    guidance: float = Field(0.0, ge=0)
    num_samples: int = Field(500, ge=1)
    classifier: str | None = None  # classifier guidance: a noisy `classifier` stage or models:/NAME@ALIAS
    classifier_scale: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _scale_needs_classifier(self) -> SamplingSpec:
        if self.classifier_scale and not self.classifier:
            raise ValueError("classifier_scale needs `classifier` (a noisy classifier stage or models:/NAME@ALIAS)")
        return self


class TextEncoderSpec(_Strict):
    """The text encoder τ_θ of a text-conditioned stage: `trainable` (joint) or `minilm` (frozen, `text` extra)."""

    name: Literal["trainable", "minilm"] = "trainable"
    args: dict[str, Any] = Field(default_factory=dict)


class DiffusionStage(_TrainedStage):
    """DDPM on the latents (or pixels) of its input, conditioned on class labels or (`conditioning: text`)
    on captions through `text_encoder` (cross-attention; `diffusion.label_dropout` drops captions for CFG)."""

    kind: Literal["diffusion"]
    model: ModelSpec
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec
    conditioning: Literal["class", "text"] = "class"
    text_encoder: TextEncoderSpec | None = None

    @model_validator(mode="after")
    def _text_conditioning(self) -> DiffusionStage:
        _check_text_conditioning(self)
        return self


def _check_text_encoder(spec: TextEncoderSpec) -> None:
    """The encoder's name and args are valid (and minilm's package is installed), or a ValueError naming the key."""
    from pipeline.models.text import check_text_encoder_spec

    try:
        check_text_encoder_spec(spec.model_dump())
    except (ValueError, ImportError) as exc:  # unknown args, or minilm's package not installed
        raise ValueError(f"text_encoder: {exc}") from None


def _check_text_conditioning(stage: DiffusionStage | SuperResStage) -> None:
    """Validate ``conditioning`` / ``text_encoder`` of a stage (and default the encoder to `trainable`)."""
    if stage.conditioning == "class":
        if stage.text_encoder is not None:
            raise ValueError("text_encoder is set but conditioning is 'class'; set conditioning: text")
        return
    stage.text_encoder = stage.text_encoder or TextEncoderSpec()
    _check_text_encoder(stage.text_encoder)
    if stage.model.args.get("num_classes"):
        raise ValueError("conditioning: text takes no class labels; remove model.args.num_classes")
    if stage.sampling.classifier_scale:
        raise ValueError("conditioning: text supports classifier-free guidance only; "
                         "set sampling.classifier_scale to 0")


class DistillStage(_TrainedStage):
    """Progressive distillation: each halving trains a student on two teacher DDIM steps."""

    kind: Literal["distill"]
    teacher_steps: int = Field(16, ge=2)
    halvings: int = Field(2, ge=1)
    parameterization: Literal["v", "x0"] = "v"
    guidance: float = Field(0.0, ge=0)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec

    @model_validator(mode="after")
    def _divisible(self) -> DistillStage:
        if self.teacher_steps % (2**self.halvings):
            raise ValueError(
                f"teacher_steps={self.teacher_steps} must be divisible by 2**halvings={2**self.halvings}"
            )
        return self


class CondAugSpec(_Strict):
    """Noise conditioning augmentation of a super-resolution stage's low-res input (notes 2.6.1)."""

    kind: Literal["noise", "blur"] = "noise"  # noise: std γ of √(1−γ²)x + γε; blur: Gaussian σ in pixels
    levels: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], min_length=1)
    sample_level: float = 0.0  # chosen at sampling time (snapped to the nearest level)

    @model_validator(mode="after")
    def _ranges(self) -> CondAugSpec:
        top = 1.0 if self.kind == "noise" else float("inf")
        if any(not 0.0 <= v < top for v in [*self.levels, self.sample_level]):
            raise ValueError(f"{self.kind} levels and sample_level must be in [0, {top:g})")
        return self


class CascadeSamplingSpec(SamplingSpec):
    """Sampling of a cascade stage (DDIM only): `guidance` is classifier-free guidance on the class (base) or
    the caption (`conditioning: text`); `dynamic_threshold` (a quantile such as 0.995) applies Imagen's
    dynamic thresholding to every predicted x̂₀, null = none."""

    dynamic_threshold: float | None = Field(None, gt=0.5, le=1.0)

    @model_validator(mode="after")
    def _ddim_only(self) -> CascadeSamplingSpec:
        if self.sampler != "ddim" or self.classifier:
            raise ValueError("cascade stages sample with DDIM and classifier-free guidance only "
                             "(sampler: ddim, no classifier)")
        return self


class SuperResStage(_TrainedStage):
    """A cascade stage: `low_res` → `size` super-resolution diffusion (or the base model when `low_res` is null).

    `conditioning: text` conditions it on the captions through `text_encoder` (cross-attention; Imagen with the
    frozen `minilm`), with `diffusion.label_dropout` dropping captions for classifier-free guidance."""

    kind: Literal["superres"]
    size: int = Field(..., ge=4)
    low_res: int | None = Field(None, ge=2)
    residual_scale: float | None = Field(None, gt=0)  # set: model (x − upsampled conditioning) / residual_scale
    model: ModelSpec
    augment: CondAugSpec = Field(default_factory=CondAugSpec)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    sampling: CascadeSamplingSpec = Field(default_factory=CascadeSamplingSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec
    conditioning: Literal["class", "text"] = "class"
    text_encoder: TextEncoderSpec | None = None

    @model_validator(mode="after")
    def _cascade(self) -> SuperResStage:
        _check_text_conditioning(self)
        if self.low_res and self.conditioning == "class" and self.sampling.guidance:
            raise ValueError("sampling.guidance: a class-conditioned super-resolution stage has no ∅ condition "
                             "to guide against (its only label is the augmentation level); set it to 0")
        if self.residual_scale and self.sampling.dynamic_threshold:
            raise ValueError("sampling.dynamic_threshold thresholds a predicted image, but with residual_scale "
                             "the stage predicts a residual; drop one of them")
        if self.low_res is not None and self.low_res >= self.size:
            raise ValueError(f"low_res={self.low_res} must be smaller than size={self.size}")
        if self.low_res is not None and len(self.needs) != 1:
            raise ValueError("a super-resolution stage needs exactly one stage: the cascade stage producing low_res")
        return self


class EdgeSpec(_Strict):
    """Canny edge maps (skimage.feature.canny on images scaled to [0, 1]) used as ControlNet's control."""

    sigma: float = Field(1.0, ge=0)
    low_threshold: float = Field(0.1, ge=0)
    high_threshold: float = Field(0.2, ge=0)


class ControlNetStage(_TrainedStage):
    """ControlNet (eq. 50) over the frozen registered U-Net of its one needed diffusion stage."""

    kind: Literal["controlnet"]
    edges: EdgeSpec = Field(default_factory=EdgeSpec)
    class_labels: bool = False  # false: trained and sampled on the null label, so the edges alone steer it
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    scale: ScaleSpec = Field(default_factory=lambda: ScaleSpec(zero_stage=0))
    train: TrainSpec

    @model_validator(mode="after")
    def _one_base(self) -> ControlNetStage:
        if len(self.needs) != 1:
            raise ValueError("a controlnet stage needs exactly one stage: the base diffusion model")
        if self.scale.zero_stage != 0:  # the checkpoint's full_state reads frozen weights only at ZeRO-0
            raise ValueError(f"scale.zero_stage={self.scale.zero_stage}: a controlnet stage (frozen base weights) "
                             "trains with zero_stage 0")
        return self


class CurriculumSpec(_Strict):
    """Consistency training's schedule of N (levels) and μ (target EMA) over the K training steps (Song et al.
    2023, CT of eq. 46): N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1, μ(k) = exp(s0·log μ0 / N(k))."""

    s0: int = Field(2, ge=2)  # initial number of levels N(0)
    s1: int = Field(150, ge=1)  # final number of levels N(K) = s1 + 1
    mu0: float = Field(0.9, gt=0, lt=1)  # initial target EMA μ(0)

    @model_validator(mode="after")
    def _grows(self) -> CurriculumSpec:
        if self.s1 + 1 < self.s0:
            raise ValueError(f"s1 + 1 = {self.s1 + 1} must be >= s0 = {self.s0} (N(k) grows from s0 to s1 + 1)")
        return self


class ConsistencyStage(_TrainedStage):
    """Consistency model (eq. 44-46): `mode: distill` from the diffusion stage it needs, or `mode: train`.

    CD uses a fixed number of `levels` and a fixed target EMA `target_ema`; CT follows `curriculum`."""

    kind: Literal["consistency"]
    mode: Literal["distill", "train"]
    model: ModelSpec | None = None  # mode train only (distill copies the teacher)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)  # mode train: the VP schedule of the levels
    levels: int = Field(18, ge=2)
    sigma_max: float = Field(80.0, gt=0)
    rho: float = Field(7.0, gt=0)
    sigma_data: float = Field(1.0, gt=0)
    target_ema: float = Field(0.95, ge=0, lt=1)
    curriculum: CurriculumSpec = Field(default_factory=CurriculumSpec)  # mode train only
    guidance: float = Field(0.0, ge=0)
    label_dropout: float = Field(0.1, ge=0, le=1)
    eval_steps: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec

    @model_validator(mode="after")
    def _model_per_mode(self) -> ConsistencyStage:
        if self.mode == "train" and self.model is None:
            raise ValueError("mode: train needs `model` (the network to train from scratch)")
        if self.mode == "distill" and self.model is not None:
            raise ValueError("mode: distill copies the teacher's network; remove `model`")
        if self.mode == "train":
            fixed = sorted({"levels", "target_ema"} & self.model_fields_set)
            if fixed:
                raise ValueError(f"mode: train follows the N(k)/μ(k) curriculum; remove {', '.join(fixed)} and set "
                                 "curriculum: {s0, s1, mu0} instead")
            if any(k < 1 or k > self.curriculum.s1 for k in self.eval_steps):
                raise ValueError(f"eval_steps must lie in [1, curriculum.s1 = {self.curriculum.s1}] (N(K) = s1 + 1)")
            return self
        if "curriculum" in self.model_fields_set:
            raise ValueError("mode: distill uses fixed `levels` and `target_ema`; remove `curriculum` (CT only)")
        if any(k < 1 or k >= self.levels for k in self.eval_steps):
            raise ValueError(f"eval_steps must lie in [1, levels-1 = {self.levels - 1}]")
        return self


class PriorSamplingSpec(_Strict):
    """How a code prior's samples are drawn for the grid and the evaluation."""

    num_samples: int = Field(500, ge=1)
    temperature: float = Field(1.0, gt=0)


class PriorStage(_TrainedStage):
    """A gated PixelCNN over the codes of its one needed VQ autoencoder stage (VQ-VAE / VQ-VAE-2 prior)."""

    kind: Literal["prior"]
    model: ModelSpec
    sampling: PriorSamplingSpec = Field(default_factory=PriorSamplingSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec

    @model_validator(mode="after")
    def _one_input(self) -> PriorStage:
        if len(self.needs) != 1:
            raise ValueError("a prior stage needs exactly one stage: the VQ autoencoder whose codes it models")
        return self


def _check_prior_input(spec: JobSpec, name: str, stage: Any) -> None:
    ae = spec.stages[stage.needs[0]]
    if ae.kind != "autoencoder" or str(ae.objective.get("type", "kl_vae")) != "vq":
        raise ValueError(f"stages.{name}.needs: a prior stage needs an autoencoder stage with objective.type vq, "
                         f"but '{stage.needs[0]}' is not one")


def _check_unclip_diffusion(diffusion: DiffusionSpec, sampling: SamplingSpec) -> None:
    if diffusion.loss != "simple" or diffusion.learn_sigma:
        raise ValueError("unCLIP stages train with diffusion.loss: simple and learn_sigma: false")
    if sampling.classifier or sampling.classifier_scale:
        raise ValueError("unCLIP stages support classifier-free guidance only; remove sampling.classifier "
                         "and sampling.classifier_scale")


class ClipStage(_TrainedStage):
    """unCLIP's CLIP (notes 2.6.2): an image encoder and a text encoder trained contrastively on captioned images."""

    kind: Literal["clip"]
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="clip"))
    text_encoder: TextEncoderSpec = Field(default_factory=TextEncoderSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec

    @model_validator(mode="after")
    def _clip_model(self) -> ClipStage:
        if self.needs:
            raise ValueError("a clip stage trains on the captioned data alone; remove `needs`")
        if self.model.name != "clip":
            raise ValueError(f"model.name is {self.model.name!r}; a clip stage trains the `clip` model")
        if "text_encoder" in self.model.args:
            raise ValueError("set the text encoder with the stage's `text_encoder` key, not model.args.text_encoder")
        _check_text_encoder(self.text_encoder)
        return self


class ClipPriorStage(_TrainedStage):
    """unCLIP's diffusion prior P(c_i | y) (eq. 49) over the image embeddings of its one needed clip stage."""

    kind: Literal["clip_prior"]
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="clip_prior"))
    diffusion: DiffusionSpec = Field(default_factory=lambda: DiffusionSpec(parameterization="x0"))
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec

    @model_validator(mode="after")
    def _prior(self) -> ClipPriorStage:
        if len(self.needs) != 1:
            raise ValueError("a clip_prior stage needs exactly one stage: the clip stage whose embeddings it models")
        _check_unclip_diffusion(self.diffusion, self.sampling)
        return self


class UnclipDecoderStage(_TrainedStage):
    """unCLIP's decoder P(x | c_i) (eq. 49), sampled text → prior → decoder; needs a clip and a clip_prior stage."""

    kind: Literal["unclip_decoder"]
    model: ModelSpec
    embedding_tokens: int = Field(4, ge=1)  # context tokens projected from the image embedding
    context_dim: int = Field(64, ge=1)  # their width (the denoiser's cross-attention context_dim)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    train: TrainSpec

    @model_validator(mode="after")
    def _decoder(self) -> UnclipDecoderStage:
        if len(self.needs) != 2:
            raise ValueError("an unclip_decoder stage needs exactly two stages: the clip stage and the clip_prior "
                             "stage trained on it")
        if self.model.args.get("num_classes"):
            raise ValueError("the unCLIP decoder takes no class labels; remove model.args.num_classes")
        _check_unclip_diffusion(self.diffusion, self.sampling)
        return self


def _check_unclip_inputs(spec: JobSpec, name: str, stage: Any) -> None:
    """A clip_prior needs a clip stage; a decoder needs a clip stage and a clip_prior trained on that one."""
    kinds = {n: spec.stages[n].kind for n in stage.needs}
    if stage.kind == "clip_prior" and kinds[stage.needs[0]] != "clip":
        raise ValueError(f"stages.{name}.needs: a clip_prior stage needs a clip stage, but '{stage.needs[0]}' "
                         f"is a {kinds[stage.needs[0]]} stage")
    if stage.kind == "unclip_decoder":
        clips = [n for n, k in kinds.items() if k == "clip"]
        priors = [n for n, k in kinds.items() if k == "clip_prior"]
        if len(clips) != 1 or len(priors) != 1:
            raise ValueError(f"stages.{name}.needs: an unclip_decoder stage needs one clip stage and one clip_prior "
                             f"stage, got {', '.join(f'{n} ({k})' for n, k in kinds.items())}")
        if spec.stages[priors[0]].needs != clips:
            raise ValueError(f"stages.{name}.needs: the clip_prior stage '{priors[0]}' was trained on "
                             f"'{spec.stages[priors[0]].needs[0]}', not on '{clips[0]}'; the prior and the decoder "
                             "must share one clip stage")


Stage = Annotated[
    AutoencoderStage | ClassifierStage | EncodeStage | DiffusionStage | DistillStage | SuperResStage
    | ControlNetStage | ConsistencyStage | PriorStage | ClipStage | ClipPriorStage | UnclipDecoderStage,
    Field(discriminator="kind"),
]


class AugmentSpec(_Strict):
    """Augmentation of training images, applied in Ray Data tasks (never to latents)."""

    hflip: bool = False
    shift: int = Field(0, ge=0)


class DataSpec(_Strict):
    """Where the training data comes from: a bundled source or existing shards."""

    source: str = "digits"
    dir: str = "data/digits"  # a local directory or a URI (s3://bucket/prefix, gs://..., see pipeline.data.storage)
    # source "shards": shards without a manifest (img2dataset's) need it; their images are resized (shorter side)
    # and cropped to it, and so are our shards when it differs from their written size
    image_size: int | None = Field(None, ge=4)
    crop: Literal["center", "random"] = "center"  # where resized training images are cropped; held-out: center
    held_out: float = Field(0.15, gt=0, lt=1)  # shards without a manifest: the last ceil(held_out x n) shards
    shard_size: int = Field(512, ge=1)
    shuffle_shards: int = Field(16, ge=1)  # shards whose samples are shuffled together, each epoch anew
    on_corrupt: Literal["skip", "fail"] = "fail"
    augment: AugmentSpec = Field(default_factory=AugmentSpec)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in ("digits", "photos", "sprites", "moving-digits", "shards") or v.startswith("imagefolder:"):
            return v
        raise ValueError("expected one of 'digits', 'photos', 'sprites', 'moving-digits', 'shards', "
                         "'imagefolder:PATH'")

    @model_validator(mode="after")
    def _crop_where_resized(self) -> DataSpec:
        if self.crop == "random" and self.source != "shards":
            raise ValueError(f"data.crop: random crops images as shards are read (data.source: shards); the "
                             f"'{self.source}' source is resized and center-cropped once, when its shards are "
                             "built: use data.crop: center, or augment.shift for random translations")
        return self


class TrackingSpec(_Strict):
    """MLflow tracking: `uri` defaults to $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""

    uri: str | None = None
    experiment: str | None = None


class EvalSpec(_Strict):
    """End-of-pipeline evaluation against held-out data."""

    classifier: str | None = "classifier"
    num_samples: int = Field(500, ge=10)
    # held-out (test) samples read for evaluation: the first ones in shard order, never the whole split
    held_out_samples: int = Field(2048, ge=1)


class RaySpec(_Strict):
    """Where Ray runs: in-process by default, or an existing cluster's address."""

    address: str | None = None
    num_cpus: int | None = Field(8, ge=1)
    storage: str = ".pipeline/ray"
    # where encode stages cache their latent shards: a directory (relative to the working directory) or a URI
    latent_cache: str = ".pipeline/latents"
    # directories every node of the cluster mounts at the same place (NFS, EFS, Filestore): a local path under
    # one of them is storage all nodes can see (`pipeline.stages.storage_problems`)
    shared_mounts: list[str] = []

    @field_validator("shared_mounts")
    @classmethod
    def _absolute_mounts(cls, v: list[str]) -> list[str]:
        for mount in v:
            if not mount.startswith("/"):
                raise ValueError(f"'{mount}' is not an absolute path; list where every node mounts the shared "
                                 "file system, e.g. /mnt/efs")
        return v


class JobSpec(_Strict):
    """A whole run: data, stages and where results go."""

    name: str
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    stages: dict[str, Stage]
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _needs_exist(self) -> JobSpec:
        names = list(self.stages)
        for name, stage in self.stages.items():
            for need in stage.needs:
                if need not in self.stages:
                    raise ValueError(
                        f"stage '{name}' needs '{need}', which is not a stage of this job "
                        f"(stages: {', '.join(names)})"
                    )
                if names.index(need) > names.index(name):
                    raise ValueError(f"stage '{name}' needs '{need}', which comes after it")
            _check_generation_refs(self, name, stage)
            _check_text_teacher(self, name, stage)
            if stage.kind == "prior":
                _check_prior_input(self, name, stage)
            if stage.kind in ("clip_prior", "unclip_decoder"):
                _check_unclip_inputs(self, name, stage)
        if self.eval.classifier is not None and self.eval.classifier not in self.stages:
            raise ValueError(f"eval.classifier '{self.eval.classifier}' is not a stage of this job")
        return self

    def stage_hash(self, name: str) -> str:
        """A hash of everything that determines a stage's result (its spec, data and seed)."""
        # defaults are left out, so a new optional field does not invalidate earlier results
        payload = {
            "stage": self.stages[name].model_dump(mode="json", exclude_defaults=True),
            "data": self.data.model_dump(mode="json", exclude_defaults=True),
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_text_teacher(spec: JobSpec, name: str, stage: Any) -> None:
    """Only class-conditional diffusion stages feed later training stages (distillation samples by label)."""
    for need in stage.needs:
        if stage.kind == "superres" and spec.stages[need].kind == "superres":
            continue  # a cascade stage upsamples its input's samples, text-conditioned or not
        if getattr(spec.stages[need], "conditioning", "class") == "text":
            raise ValueError(f"stage '{name}' needs '{need}', a text-conditioned diffusion stage; distilling "
                             "text conditioning is not supported (drop the stage or use conditioning: class)")


def _check_generation_refs(spec: JobSpec, name: str, stage: Any) -> None:
    """A consistency distillation needs a teacher stage; `sampling.classifier` names an earlier noisy classifier."""
    names = list(spec.stages)
    if stage.kind == "consistency" and stage.mode == "distill" and not any(
            spec.stages[n].kind in ("diffusion", "distill") for n in stage.needs):
        raise ValueError(f"stage '{name}' (consistency, mode: distill) needs a diffusion stage as its teacher")
    clf = getattr(getattr(stage, "sampling", None), "classifier", None)
    if clf and not clf.startswith("models:/"):
        other = spec.stages.get(clf)
        if other is None or other.kind != "classifier" or not other.noisy or names.index(clf) > names.index(name):
            raise ValueError(f"stages.{name}.sampling.classifier '{clf}' must be an earlier `classifier` stage "
                             "with `noisy: true`, or models:/NAME@ALIAS")


def _describe_error(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see jobs/ldm.yaml for the known keys)"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        ctx = err.get("ctx", {})
        return f"expected `kind` to be one of {ctx.get('expected_tags', '')}"
    msg = err.get("msg", "invalid value")
    if "input" in err and kind not in ("value_error",):
        return f"{msg}, got {err['input']!r}"
    return msg.removeprefix("Value error, ")


def _loc(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "stages" and parts[2] in _STAGE_KINDS:
        del parts[2]  # pydantic's discriminator tag, not a key of the file
    return ".".join(str(p) for p in parts) or "(top level)"


_STAGE_KINDS = {"autoencoder", "classifier", "encode", "diffusion", "distill", "superres", "controlnet",
                "consistency", "prior", "clip", "clip_prior", "unclip_decoder"}


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `key.path=value` overrides (value parsed as YAML) to a raw spec mapping."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"{source}: --set {item!r}: expected key.path=value")
        path, value_text = item.split("=", 1)
        keys = path.strip().split(".")
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{source}: --set {path}: value is not valid YAML ({exc})") from None
        node: Any = raw
        for i, key in enumerate(keys[:-1]):
            if not isinstance(node, dict):
                raise SpecError(f"{source}: --set {path}: '{'.'.join(keys[:i])}' is not a mapping")
            node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SpecError(f"{source}: --set {path}: '{'.'.join(keys[:-1])}' is not a mapping")
        node[keys[-1]] = value
    return raw


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    """Validate a raw mapping into a JobSpec, turning pydantic errors into one SpecError."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: invalid job spec ({exc.error_count()} problem(s)):"]
        for err in exc.errors():
            lines.append(f"  {_loc(err['loc'])}: {_describe_error(err)}")
        raise SpecError("\n".join(lines)) from None
    _check_files(spec, source)
    return spec


def _check_files(spec: JobSpec, source: str) -> None:
    if spec.data.source.startswith("imagefolder:"):
        path = Path(spec.data.source.split(":", 1)[1])
        if not path.is_dir():
            raise SpecError(f"{source}: data.source: image folder '{path}' does not exist")
    if spec.data.source == "shards" and "://" not in spec.data.dir and not (
            Path(spec.data.dir) / "manifest.json").is_file():
        from pipeline.data.shards import unfinished_build

        tars = sorted(p.name for p in Path(spec.data.dir).glob("*.tar"))
        foreign = bool(tars) and not unfinished_build(tars)  # shards written elsewhere (e.g. by img2dataset)
        if not foreign or spec.data.image_size is None:
            raise SpecError(
                f"{source}: data.dir: no shards at '{spec.data.dir}' (manifest.json missing); "
                "build them with `pipeline data build`"
                + ("; to train on shards written elsewhere (e.g. by img2dataset), set data.image_size"
                   if foreign else "")
            )


def read_yaml(path: str | Path, what: str = "job file") -> Any:
    """Safely load a YAML file; a missing file or a syntax error is a SpecError with line and column."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job file. Raises SpecError with a complete message."""
    raw = read_yaml(path)
    raw = apply_overrides(raw if raw is not None else {}, overrides or [], str(path))
    return parse_spec(raw, str(path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
