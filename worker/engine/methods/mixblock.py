"""MixUnlearn's generator g (paper Eq. 2): the MixBlock of AdAutoMix (Qin et al., ICLR 2024, Sec. 3.2).

It reads the initial model's feature maps of a forgetting sample (a) and a remaining sample (b),
cross-attends between them and returns a two-channel mask at input resolution with M_a + M_b = 1 per pixel
(paper footnote 4).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# lambda may be one mixing ratio for the whole batch or one per sample (a (B,) tensor); both broadcast.
Lambda = float | torch.Tensor


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision (autocast) values to float32; float32 and float64 pass unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def lambda_column(lam: Lambda, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``lam`` as a (B,) tensor on ``like``'s device and dtype."""
    value = torch.as_tensor(lam, device=like.device, dtype=like.dtype)
    return value.expand(batch) if value.dim() == 0 else value.reshape(batch)


class MixBlock(nn.Module):
    """AdAutoMix's adaptive mask: shared 1x1 query/key convs (C' -> C/2, ReLU, no norm), a value conv
    (C' -> 1), cross attention over the H*W positions, bilinear upsampling and a softmax over the two maps.

    ``lambda_channel`` appends a constant lambda channel to h_a and 1 - lambda to h_b (C' = C + 1). With
    C = 256 (ResNet-18 layer3) the block has 66,306 parameters, the paper's "66K" (Sec. 4.1).
    """

    def __init__(
        self, in_channels: int, lambda_channel: bool = True, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.lambda_channel = lambda_channel
        channels = in_channels + 1 if lambda_channel else in_channels
        self.inter_channels = max(in_channels // 2, 1)
        # Query and key are separate convs, each shared by the two samples (2 x 257 x 128 weights + the value
        # conv give the 66K count; one conv for both would give 33K).
        self.query = nn.Sequential(nn.Conv2d(channels, self.inter_channels, 1), nn.ReLU())
        self.key = nn.Sequential(nn.Conv2d(channels, self.inter_channels, 1), nn.ReLU())
        self.value = nn.Conv2d(channels, 1, 1)
        # AdAutoMix init: N(0, 0.01) weights, zero bias; the initial mask is therefore ~0.5 everywhere.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.01, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self, h_a: torch.Tensor, h_b: torch.Tensor, lam: Lambda, out_size: tuple[int, int] | torch.Size
    ) -> torch.Tensor:
        """Mask (B, 2, *out_size): channel 0 weights the forgetting image, channel 1 the remaining image."""
        batch, _, height, width = h_a.shape
        if self.lambda_channel:
            lam_map = lambda_column(lam, batch, h_a).view(batch, 1, 1, 1).expand(batch, 1, height, width)
            h_a = torch.cat([h_a, lam_map], dim=1)
            h_b = torch.cat([h_b, 1 - lam_map], dim=1)
        q_a, q_b = (self.query(h).flatten(2).transpose(1, 2) for h in (h_a, h_b))  # (B, HW, d)
        k_a, k_b = (self.key(h).flatten(2) for h in (h_a, h_b))  # (B, d, HW)
        v_a, v_b = (self.value(h).flatten(2).transpose(1, 2) for h in (h_a, h_b))  # (B, HW, 1)
        scale = self.inter_channels**-0.5
        attn_ab = torch.softmax(q_a @ k_b * scale, dim=-1)
        attn_ba = torch.softmax(q_b @ k_a * scale, dim=-1)
        # As AdAutoMix writes it: each attention map weights its OWN sample's values (m_a = A_ab v_a).
        m_a, m_b = attn_ab @ v_a, attn_ba @ v_b
        logits = torch.cat([m_a, m_b], dim=2).transpose(1, 2).reshape(batch, 2, height, width)
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return torch.softmax(at_least_float32(logits), dim=1)


def apply_mask(x_f: torch.Tensor, x_r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_mix = x_f * M_a + x_r * M_b (paper footnote 4); the same mask on every image channel."""
    return x_f * mask[:, :1] + x_r * mask[:, 1:]
