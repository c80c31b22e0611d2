"""nn.Conv2d (groups=1): the positions are the output pixels, a_{i,t} the (padded) input patch
that output pixel t sees, flattened as (in, kh, kw), so that out_t = W_flat a_t (+ b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qem.errors import UnsupportedModelError
from qem.per_example.layers.registry import LayerType, register_layer


@register_layer(nn.Conv2d)
class Conv2d(LayerType):
    """Patches (B, L, in*kh*kw) and backprops (B, L, out) over the L output pixels."""

    def check(self, name: str, module: nn.Module) -> None:
        if module.groups != 1:
            raise UnsupportedModelError(
                f"Conv2d {name!r} has groups={module.groups}; the per-example engine supports "
                "groups=1 only. Use 'srht' or 'dense', or exclude it with layers=."
            )

    def inputs(self, module: nn.Module, activation: torch.Tensor) -> torch.Tensor:
        return conv_patches(module, activation).transpose(1, 2)

    def backprops(self, module: nn.Module, backprop: torch.Tensor) -> torch.Tensor:
        return backprop.reshape(backprop.shape[0], backprop.shape[1], -1).transpose(1, 2)

    def projected_inputs(
        self, module: nn.Module, activation: torch.Tensor, basis: torch.Tensor
    ) -> torch.Tensor:
        """(P_in^T patches)^T, (B, L, k_in): projected channel-first, the patches untransposed."""
        return (basis.T @ conv_patches(module, activation)).transpose(1, 2)

    def projected_backprops(
        self, module: nn.Module, backprop: torch.Tensor, basis: torch.Tensor
    ) -> torch.Tensor:
        """(P_out^T delta)^T, (B, L, k_out), projected channel-first."""
        delta = backprop.reshape(backprop.shape[0], backprop.shape[1], -1)
        return (basis.T @ delta).transpose(1, 2)


def conv_patches(module: nn.Conv2d, activation: torch.Tensor) -> torch.Tensor:
    """The unfolded patches of a Conv2d's (padded) input, (B, in*kh*kw, L) with L output
    positions, so that the output at position t is W_flat a[:, :, t] (+ b).

    The same values as F.unfold, read through a strided view of the padded input (any memory
    format) and copied once. F.unfold (im2col) was 3.5x slower on one thread for a batch of
    256 MNIST images (11.1 ms versus 3.1 ms), and 30x slower with two threads than with one on
    two cores that other processes also used (338 ms)."""
    if activation.dim() != 4:
        raise UnsupportedModelError(
            f"Conv2d input of shape {tuple(activation.shape)}: per-example gradients need "
            "batched (B, C, H, W) inputs."
        )
    pads = conv_padding(module)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(activation, pads, mode=mode) if any(pads) else activation
    batch, channels, height, width = padded.shape
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    rows = (height - dh * (kh - 1) - 1) // sh + 1
    cols = (width - dw * (kw - 1) - 1) // sw + 1
    s_batch, s_channel, s_row, s_col = padded.stride()
    windows = padded.as_strided(
        (batch, channels, kh, kw, rows, cols),
        (s_batch, s_channel, s_row * dh, s_col * dw, s_row * sh, s_col * sw),
    )
    return windows.reshape(batch, channels * kh * kw, rows * cols)


def conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of a Conv2d, as F.pad takes it (torch's 'same' puts
    the odd pixel on the right/bottom)."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        pads = []
        for dilation, size in zip(module.dilation, module.kernel_size, strict=True):
            total = dilation * (size - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)
    ph, pw = module.padding
    return (pw, pw, ph, ph)
