"""The robot task's image encoders (task.image_encoder): a small conv net with spatial softmax and the diffusion-policy
ResNet-18 with GroupNorm, both taking camera frames as uint8 and cropping them at random in training. Split from
robot.py (the task) so each reads in one sitting."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

def to_unit(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def crop(x: torch.Tensor, ratio: float | None, training: bool) -> torch.Tensor:
    """Diffusion Policy's augmentation: a random crop of ``ratio`` of each side in training (one offset
    per image), the centre crop in evaluation; ``ratio`` None: the whole image."""
    if not ratio:
        return x
    h, w = x.shape[-2:]
    ch, cw = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
    if training:
        top = torch.randint(0, h - ch + 1, (x.shape[0],), device=x.device)
        left = torch.randint(0, w - cw + 1, (x.shape[0],), device=x.device)
        rows = (top[:, None] + torch.arange(ch, device=x.device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(cw, device=x.device))[:, None, None, :]
        return x[torch.arange(x.shape[0], device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


class ImageEncoder(nn.Module):
    """A small CNN per camera: three stride-2 convs (GroupNorm, Mish), global average pool, Linear,
    after the random crop (``crop_ratio``) of Diffusion Policy's recipe. Trains on a CPU;
    ``task.model.encoder=resnet18`` is Diffusion Policy's encoder."""

    def __init__(self, out_dim: int, width: int = 32, crop_ratio: float | None = None):
        super().__init__()
        self.crop_ratio = crop_ratio
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.Mish(),
                                 nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.Mish(),
                                 nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.Mish(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, out_dim))

    def forward(self, images):  # (B, H, W, 3) uint8
        return self.net(crop(to_unit(images), self.crop_ratio, self.training))


class BasicBlock(nn.Module):
    """ResNet's basic block with GroupNorm (groups = channels / 16) in place of BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(c_out // 16, c_out)
        self.conv2, self.norm2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.GroupNorm(c_out // 16, c_out)
        self.skip = nn.Sequential() if stride == 1 and c_in == c_out else \
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(c_out // 16, c_out))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.skip(x))


class SpatialSoftmax(nn.Module):
    """Per channel of a 1x1-conv projection, the softmax-weighted mean image position (x, y in [-1, 1]):
    ``keypoints`` 2-D points (Diffusion Policy's pooling, from robomimic)."""

    def __init__(self, channels: int, keypoints: int = 32):
        super().__init__()
        self.proj = nn.Conv2d(channels, keypoints, 1)

    def forward(self, x):
        h = self.proj(x)
        b, k, height, width = h.shape
        weights = h.flatten(2).softmax(-1).view(b, k, height, width)
        ys = torch.linspace(-1, 1, height, device=h.device, dtype=h.dtype)
        xs = torch.linspace(-1, 1, width, device=h.device, dtype=h.dtype)
        return torch.stack([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], dim=-1).flatten(1)  # (B, 2k)


class ResNet18Encoder(nn.Module):
    """Diffusion Policy's image encoder: ResNet-18 (random init) with GroupNorm, spatial softmax instead
    of the average pool, a Linear to ``out_dim``; a random crop of ``crop_ratio`` of each side in
    training and the centre crop in evaluation. Written here because torchvision (its usual source)
    requires a torch build of its own (it would replace the suite's pinned torch)."""

    def __init__(self, out_dim: int, crop_ratio: float | None = 0.9, keypoints: int = 32):
        super().__init__()
        self.crop_ratio = crop_ratio
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.GroupNorm(4, 64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        widths, blocks = [64, 128, 256, 512], []
        for i, w in enumerate(widths):
            c_in = widths[max(0, i - 1)]
            blocks += [BasicBlock(c_in, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        self.blocks = nn.Sequential(*blocks)
        self.pool = SpatialSoftmax(512, keypoints)
        self.out = nn.Linear(2 * keypoints, out_dim)

    def forward(self, images):  # (B, H, W, 3) uint8
        return self.out(self.pool(self.blocks(self.stem(crop(to_unit(images), self.crop_ratio, self.training)))))
