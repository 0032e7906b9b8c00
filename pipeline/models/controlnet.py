"""ControlNet (notes section 2.7.2, eq. 50) on top of a frozen :class:`~pipeline.models.unet.UNet`.

y_c = F_theta(x) + Z_z2(F_theta_c(x + Z_z1(c))): the base U-Net F_theta is frozen; a trainable copy
F_theta_c of its encoder + middle block receives the control image through a zero-initialised
convolution Z_z1, and its outputs re-enter the frozen decoder through zero-initialised 1x1
convolutions Z_z2 (one per skip connection and one for the middle block). At initialisation the
output is exactly the base model's output.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pipeline.models import register
from pipeline.models.layers import zero_module
from pipeline.models.unet import UNet


@register("controlnet")
class ControlNet(nn.Module):
    """``forward(x, t, control, y=None, context=None)`` with ``control`` (B, control_channels, H, W)
    at the same spatial size as ``x``.

    ``base_unet`` is frozen (``requires_grad_(False)``); only the copy and the zero convolutions train.
    """

    def __init__(self, base_unet: UNet, control_channels: int) -> None:
        super().__init__()
        if not isinstance(base_unet, UNet):
            raise ValueError(f"ControlNet needs a UNet base model, got {type(base_unet).__name__}")
        self.base = base_unet
        self.base.requires_grad_(False)
        self.control_channels = control_channels
        mc = base_unet.model_channels

        # Trainable copy F_theta_c of the encoder and middle block (initialised from the base weights).
        self.time_embed = copy.deepcopy(base_unet.time_embed)
        self.label_embed = copy.deepcopy(base_unet.label_embed)
        self.conv_in = copy.deepcopy(base_unet.conv_in)
        self.input_blocks = copy.deepcopy(base_unet.input_blocks)
        self.middle_block = copy.deepcopy(base_unet.middle_block)
        for module in (self.time_embed, self.label_embed, self.conv_in, self.input_blocks, self.middle_block):
            if module is not None:
                module.requires_grad_(True)

        # Z_z1: control image -> feature space of conv_in, last layer zero-initialised (eq. 50).
        self.control_in = nn.Sequential(
            nn.Conv2d(control_channels, mc, 3, padding=1),
            nn.SiLU(),
            zero_module(nn.Conv2d(mc, mc, 3, padding=1)),
        )
        # Z_z2: one zero 1x1 conv per skip connection, plus one for the middle block (eq. 50).
        skip_channels = [base_unet.conv_in.out_channels] + [
            _out_channels(block) for block in base_unet.input_blocks
        ]
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in skip_channels)
        mid = skip_channels[-1]
        self.middle_zero_conv = zero_module(nn.Conv2d(mid, mid, 1))

    def control_residuals(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        control: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Z_z2(F_theta_c(x + Z_z1(c))) for every skip connection and the middle block."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.base.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)
        h = self.conv_in(x) + self.control_in(control)  # x + Z_z1(c), eq. 50
        residuals = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks, self.zero_convs[1:], strict=True):
            h = block(h, emb, context)
            residuals.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        return residuals, self.middle_zero_conv(h)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        control: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y_c = F_theta(x) + Z_z2(F_theta_c(x + Z_z1(c))) (eq. 50), added inside the frozen U-Net."""
        skip_res, mid_res = self.control_residuals(x, t, control, y, context)
        return self.base.forward_with_residuals(x, t, y, context, skip_res, mid_res)


def _out_channels(block: nn.Module) -> int:
    """Channel count produced by an encoder block (the last conv's output channels)."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    last = convs[-1]
    # ResBlock's skip conv may come after conv2 in module order; both have the same out_channels.
    return last.out_channels


@register("controlnet_unet")
def controlnet_unet(base: dict[str, Any], control_channels: int = 1) -> ControlNet:
    """A ControlNet around a freshly built ``unet`` with arguments ``base`` (the export recipe of a trained one)."""
    from pipeline.models import build_model

    return ControlNet(build_model("unet", **base), control_channels)
