"""Gaussian diffusion as small pure tensor functions (study notes, section 2, eq. 15-46).

Timestep convention: 0-indexed. A per-sample LongTensor ``t`` (B,) holds indices in [0, T-1];
index 0 is the notes' t = 1 and index T-1 is the notes' t = T. Models are always called with
``s.timestep_map[t]`` (the original-schedule timestep), which makes respaced schedules work.
Nothing here depends on ray, deepspeed or mlflow.
"""

from .distill import consistency_fn, consistency_skip_out, karras_sigmas, progressive_distillation_target
from .guidance import classifier_free, classifier_grad, condition_dropout, drop_labels
from .likelihood import nll_bits_per_dim
from .losses import (
    LossHistory,
    decoder_nll,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    importance_timesteps,
    init_loss_history,
    learned_log_variance,
    mean_flat,
    normal_kl,
    p_mean_variance,
    prior_bpd,
    uniform_timesteps,
    update_loss_history,
    vlb_terms,
)
from .param import (
    model_eps_x0,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    score_from_eps,
    split_learned_sigma,
    training_target,
    v_target,
)
from .sampling import (
    SAMPLERS,
    SamplerOptions,
    ddim_step,
    dynamic_threshold,
    langevin_step,
    langevin_timesteps,
    run_sampler,
    sample_ancestral,
    sample_ddim,
    sample_langevin,
    sample_langevin_vp,
)
from .schedule import Schedule, cosine_betas, extract, linear_betas, strided_timesteps

__all__ = [
    "SAMPLERS",
    "LossHistory",
    "SamplerOptions",
    "Schedule",
    "classifier_free",
    "classifier_grad",
    "condition_dropout",
    "consistency_fn",
    "consistency_skip_out",
    "cosine_betas",
    "ddim_step",
    "dynamic_threshold",
    "decoder_nll",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "drop_labels",
    "extract",
    "gaussian_log_likelihood",
    "importance_timesteps",
    "init_loss_history",
    "karras_sigmas",
    "langevin_step",
    "langevin_timesteps",
    "learned_log_variance",
    "linear_betas",
    "mean_flat",
    "model_eps_x0",
    "nll_bits_per_dim",
    "normal_kl",
    "p_mean_variance",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "prior_bpd",
    "progressive_distillation_target",
    "run_sampler",
    "sample_ancestral",
    "sample_ddim",
    "sample_langevin",
    "sample_langevin_vp",
    "score_from_eps",
    "split_learned_sigma",
    "strided_timesteps",
    "training_target",
    "uniform_timesteps",
    "update_loss_history",
    "v_target",
    "vlb_terms",
]
