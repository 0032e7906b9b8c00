"""Model registry: names, construction, error messages."""

import pytest
import torch
from torch import nn

from pipeline.models import MODEL_REGISTRY, build_model, model_names, register

DIT_NAMES = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def test_all_names_registered():
    names = model_names()
    for name in ["kl_vae", "unet", "classifier", "dit", "controlnet", *DIT_NAMES]:
        assert name in names
    assert names == sorted(MODEL_REGISTRY)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'nope'.*kl_vae.*unet"):
        build_model("nope")


def test_unknown_kwarg_names_model_and_argument():
    with pytest.raises(ValueError, match=r"'unet'.*'bogus'"):
        build_model("unet", in_channels=3, bogus=1)
    # Sizes fixed by a DiT preset name cannot be overridden.
    with pytest.raises(ValueError, match=r"'DiT-S/2'.*'depth'"):
        build_model("DiT-S/2", depth=2)


def test_missing_required_argument():
    with pytest.raises(ValueError, match=r"'classifier'.*num_classes"):
        build_model("classifier", in_channels=3)


def test_build_and_duplicate_register():
    torch.manual_seed(0)
    model = build_model("kl_vae", base_channels=16)
    assert isinstance(model, nn.Module)
    with pytest.raises(ValueError, match="already registered"):
        register("kl_vae")(nn.Identity)
