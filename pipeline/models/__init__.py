"""Model zoo: plain ``torch.nn.Module`` backbones behind a small name -> constructor registry.

>>> model = build_model("unet", in_channels=4, model_channels=32)
>>> model_names()  # doctest: +ELLIPSIS
['DiT-B/2', ...]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

_T = TypeVar("_T", bound=Callable[..., nn.Module])


def register(name: str) -> Callable[[_T], _T]:
    """Class/function decorator adding a model constructor to ``MODEL_REGISTRY`` under ``name``."""

    def decorator(constructor: _T) -> _T:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        MODEL_REGISTRY[name] = constructor
        return constructor

    return decorator


def model_names() -> list[str]:
    """Sorted list of registered model names."""
    return sorted(MODEL_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the registered model ``name`` with keyword arguments.

    Raises ``ValueError`` for an unknown name (listing the known ones), for keyword arguments the
    constructor does not accept and for missing required arguments.
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    constructor = MODEL_REGISTRY[name]
    params = inspect.signature(constructor).parameters
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [
        n for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if not takes_var_kwargs:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"model {name!r} got unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"accepted arguments: {', '.join(accepted)}"
            )
    missing = [
        n for n in accepted
        if params[n].default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing:
        raise ValueError(f"model {name!r} is missing required argument(s): {', '.join(missing)}")
    return constructor(**kwargs)


# Import the backbones so that their @register decorators run.
from pipeline.models import autoencoder, classifier, controlnet, dit, unet  # noqa: E402, F401, I001
from pipeline.models import text  # noqa: E402, F401  (text encoders; minilm's package is imported lazily)
from pipeline.models import mlp_ae  # noqa: E402, F401
from pipeline.models import pixelcnn, vqvae  # noqa: E402, F401
from pipeline.models import tdvae  # noqa: E402, F401
from pipeline.models import clip  # noqa: E402, F401  (unCLIP: CLIP pair, prior, decoder)
from pipeline.models.autoencoder import KLAutoencoder  # noqa: E402
from pipeline.models.classifier import NoisyClassifier  # noqa: E402
from pipeline.models.controlnet import ControlNet  # noqa: E402
from pipeline.models.dit import DiT  # noqa: E402
from pipeline.models.unet import UNet  # noqa: E402

__all__ = [
    "MODEL_REGISTRY",
    "ControlNet",
    "DiT",
    "KLAutoencoder",
    "NoisyClassifier",
    "UNet",
    "build_model",
    "model_names",
    "register",
]
