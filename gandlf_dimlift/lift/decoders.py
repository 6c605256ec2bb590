"""Lifted replacements for smp (segmentation-models-pytorch 0.4) models and decoder blocks.

smp decoders resample with ``F.interpolate`` and 2D sizes read from ``x.shape[-2:]`` or
``x.size(2), x.size(3)``; on a 5D tensor those name the wrong axes. Each replacement below adopts the
original children (state dict keys unchanged) and resamples in 3D: scale factors follow the lift spec
(``(2, 2, 2)``, or ``(2, 2, 1)`` in ``2.5d``) and sizes are read from the tensor being matched.
UPerNet and Segformer (MiT encoder) are not covered: the probe rejects them with a named error.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .convert import Lifted, register, replacement
from .ops import check_5d
from .resize import resize_to, upscale
from .spec import LiftSpec

_SMP = "segmentation_models_pytorch.decoders"


class LiftedUpCatBlock(Lifted):
    """unet / unet++ / MAnet ``DecoderBlock``: upsample x2 (nearest), concatenate the skip, two convs."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        x = upscale(x, self.spec, 2, "nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
            if hasattr(self, "attention1"):
                x = self.attention1(x)
        x = self.conv2(self.conv1(x))
        if hasattr(self, "attention2"):
            x = self.attention2(x)
        return x


class LiftedFPNConv(Lifted):
    """FPN ``Conv3x3GNReLU``: conv-GN-ReLU, then optionally upsample x2 (linear, corners aligned)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.block(x)
        return upscale(x, self.spec, 2, "bilinear", align_corners=True) if self.upsample else x


class LiftedFPNBlock(Lifted):
    """FPN ``FPNBlock``: upsample x2 (nearest) and add the 1x1-projected skip."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return upscale(x, self.spec, 2, "nearest") + self.skip_conv(skip)


class LiftedPSPBlock(Lifted):
    """PSPNet ``PSPBlock``: adaptive pool and conv, resized back to the input size (linear, corners aligned)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return resize_to(self.pool(x), x.shape[2:], "bilinear", align_corners=True)


class LiftedASPPPooling(nn.Sequential):
    """DeepLabV3 ``ASPPPooling``: global pool branch resized back to the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        size = x.shape[2:]
        for mod in self:
            x = mod(x)
        return resize_to(x, size, "bilinear", align_corners=False)


class LiftedConvBnRelu(Lifted):
    """PAN ``ConvBnRelu``: conv-BN-(ReLU), then optionally upsample x2 (linear, corners aligned)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.bn(self.conv(x))
        if self.add_relu:
            x = self.activation(x)
        return upscale(x, self.spec, 2, "bilinear", align_corners=True) if self.interpolate else x


class LiftedFPABlock(Lifted):
    """PAN ``FPABlock`` (feature pyramid attention); every resize targets the size of the map it joins."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        up = {"mode": self.upscale_mode, "align_corners": self.align_corners}
        size = x.shape[2:]
        b1 = resize_to(self.branch1(x), size, **up)
        mid = self.mid(x)
        x1 = self.down1(x)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        x2 = self.conv2(x2)
        y = x2 + resize_to(x3, x2.shape[2:], **up)
        x1 = self.conv1(x1)
        y = resize_to(y, x1.shape[2:], **up) + x1
        y = resize_to(y, size, **up)
        return y * mid + b1


class LiftedGAUBlock(Lifted):
    """PAN ``GAUBlock`` (global attention upsample)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y_up = resize_to(y, x.shape[2:], self.upscale_mode, align_corners=self.align_corners)
        return y_up + self.conv2(x) * self.conv1(y)


class LiftedPAB(Lifted):
    """MAnet ``PAB`` (position attention): attention over all voxels (over each slice's pixels in 2.5d)."""

    def _attend(self, top: torch.Tensor, center: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        # (B', C', N) maps -> (B', C, N): joint softmax over the N x N map, as in the 2D block
        b, n = top.shape[0], top.shape[-1]
        sp_map = torch.matmul(center.transpose(1, 2), top)
        sp_map = self.map_softmax(sp_map.reshape(b, -1)).view(b, n, n)
        return torch.matmul(sp_map, bottom.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        top, center, bottom = self.top_conv(x), self.center_conv(x), self.bottom_conv(x)
        if self.spec.per_slice:
            new = 2 + self.spec.new_dim
            fold = [t.movedim(new, 1) for t in (top, center, bottom)]  # (B, Z, C, X, Y)
            b, z = fold[0].shape[:2]
            att = self._attend(*(t.reshape(b * z, t.shape[2], -1) for t in fold))
            plane = fold[2].shape[3:]
            att = att.reshape(b, z, self.in_channels, *plane).movedim(1, new)
        else:
            att = self._attend(top.flatten(2), center.flatten(2), bottom.flatten(2))
            att = att.reshape(x.shape[0], self.in_channels, *x.shape[2:])
        return self.out_conv(x + att)


class LiftedMFAB(Lifted):
    """MAnet ``MFAB`` (multi-scale fusion attention)."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        x = upscale(self.hl_conv(x), self.spec, 2, "nearest")
        attention = self.SE_hl(x)
        if skip is not None:
            x = x * (attention + self.SE_ll(skip))
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class LiftedSegmentationModel(Lifted):
    """An smp segmentation model in 3D: encoder, decoder, segmentation head (and classification head).

    The input check of smp reads ``x.shape[-2:]``; here every axis the encoder downsamples (all three,
    or the two in-plane ones in ``2.5d``) must be divisible by the encoder's output stride.
    """

    def __init__(self, old: nn.Module, spec: LiftSpec, attributes: tuple[str, ...] = ()) -> None:
        super().__init__(old, spec, attributes)
        self.smp_class = type(old).__name__
        self.requires_divisible_input_shape = getattr(old, "requires_divisible_input_shape", True)
        if not hasattr(self, "classification_head"):
            self.classification_head = None

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise a clear error unless the downsampled axes are divisible by the output stride."""
        check_5d(x, f"lifted smp {self.smp_class}")
        stride = getattr(self.encoder, "output_stride", 1)
        axes = [2 + d for d in self.spec.plane_dims] if self.spec.per_slice else [2, 3, 4]
        bad = {("X", "Y", "Z")[a - 2]: x.shape[a] for a in axes if x.shape[a] % stride}
        if bad:
            fix = {k: math.ceil(v / stride) * stride for k, v in bad.items()}
            raise ValueError(
                f"lifted smp {self.smp_class}: spatial size {tuple(x.shape[2:])} is not divisible by the encoder's "
                f"output stride {stride} along {', '.join(bad)}; pad to {fix}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        if self.requires_divisible_input_shape:
            self.check_input_shape(x)
        features = self.encoder(x)
        masks = self.segmentation_head(self.decoder(*features))
        if self.classification_head is not None:
            return masks, self.classification_head(features[-1])
        return masks


def _aspp_pooling(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    new = LiftedASPPPooling(*m.children())
    new.train(m.training)
    return new


def _classification_head(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    # the head yields one label per volume: its pool is global over all three axes in every mode
    pool = m[0]
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        m[0] = nn.AdaptiveAvgPool3d(1)
    elif isinstance(pool, nn.AdaptiveMaxPool2d):
        m[0] = nn.AdaptiveMaxPool3d(1)
    return m


register(f"{_SMP}.unet.decoder.DecoderBlock", f"{_SMP}.unetplusplus.decoder.DecoderBlock",
         f"{_SMP}.manet.decoder.DecoderBlock")(replacement(LiftedUpCatBlock))
register(f"{_SMP}.fpn.decoder.Conv3x3GNReLU")(replacement(LiftedFPNConv, "upsample"))
register(f"{_SMP}.fpn.decoder.FPNBlock")(replacement(LiftedFPNBlock))
register(f"{_SMP}.pspnet.decoder.PSPBlock")(replacement(LiftedPSPBlock))
register(f"{_SMP}.deeplabv3.decoder.ASPPPooling")(_aspp_pooling)
register(f"{_SMP}.pan.decoder.ConvBnRelu")(replacement(LiftedConvBnRelu, "add_relu", "interpolate"))
register(f"{_SMP}.pan.decoder.FPABlock")(replacement(LiftedFPABlock, "upscale_mode", "align_corners"))
register(f"{_SMP}.pan.decoder.GAUBlock")(replacement(LiftedGAUBlock, "upscale_mode", "align_corners"))
register(f"{_SMP}.manet.decoder.PAB")(replacement(LiftedPAB, "pab_channels", "in_channels"))
register(f"{_SMP}.manet.decoder.MFAB")(replacement(LiftedMFAB))
register("segmentation_models_pytorch.base.heads.ClassificationHead")(_classification_head)
register(
    *(
        f"{_SMP}.{pkg}.model.{cls}"
        for pkg, cls in [
            ("unet", "Unet"), ("unetplusplus", "UnetPlusPlus"), ("fpn", "FPN"), ("linknet", "Linknet"),
            ("manet", "MAnet"), ("pan", "PAN"), ("pspnet", "PSPNet"), ("deeplabv3", "DeepLabV3"),
            ("deeplabv3", "DeepLabV3Plus"),
        ]
    )
)(replacement(LiftedSegmentationModel))
