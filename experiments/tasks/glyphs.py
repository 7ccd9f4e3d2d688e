"""Glyphs: an embedded image data set for the flow task that needs no download, is too diverse to
memorise at CPU scale, and whose true distribution can be sampled without limit.

An image is one of ``chars`` (the class; the 10 digits by default) in one of the outline fonts
matplotlib ships (``mpl-data/fonts/ttf``: DejaVu Sans / Sans Mono / Serif and STIX, each in four
weights and slants, and five Computer Modern faces), with a random stroke width, rotation, scale,
aspect ratio, shear, translation and ink intensity, antialiased to ``image_size`` pixels (grey,
uint8 like any image data set). Every draw is a function of ``(spec, n, stream)`` only (the
generator is seeded from ``spec["seed"]`` and the stream number), so the training set, the
validation set, the FD reference set and any fresh set are fixed, disjoint streams of the same
distribution.

What libraries do: FreeType (matplotlib's ``ft2font``) renders each (font, glyph) once, antialiased;
``F.interpolate(antialias=True)`` fits it into the canvas; ``F.max_pool2d`` dilates the strokes;
``F.affine_grid`` / ``F.grid_sample`` apply the affine maps to a batch; ``F.avg_pool2d`` is the area
(box) filter that downsamples from the render resolution. Written here: the glyph normalisation
(crop to the ink, fit, centre), the affine parametrisation and the parameter draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import file_lock, load_checkpoint, save_checkpoint

VERSION = 1  # bumped when the generator's output changes for the same settings (part of the cache key)

# Faces that have the ten digits as ordinary glyphs (DejaVu*Display has none; cmmi10's digits are
# old-style figures; STIXNonUni, STIXSiz*, cmex10 and cmsy10 are symbol fonts).
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)

# The settings of the embedded default (configs/task/flow.yaml's ``glyphs``; any key may be overridden).
DEFAULTS = {
    "seed": 0,              # the data seed: every set is a stream of it
    "chars": "0123456789",  # one class per character, in this order
    "fonts": list(FONTS),
    "render_scale": 4,      # glyphs are drawn at render_scale x image_size, then area-averaged down
    "height": 0.62,         # glyph height (ink bounding box) as a fraction of the image side, before scaling
    "dilate": 0.5,          # stroke growth per side, up to this many output pixels (uniform over the render-pixel steps)
    "rotation": 15.0,       # degrees, uniform in +-rotation
    "scale": [0.8, 1.15],   # uniform
    "aspect": 0.15,         # log aspect ratio (width / height), uniform in +-aspect
    "shear": 0.25,          # horizontal shear, uniform in +-shear
    "translate": 0.1,       # fraction of the image side, uniform in +-translate on each axis
    "intensity": [0.6, 1.0],  # ink level (background 0), uniform
}


def spec_of(cfg) -> dict:
    """The generator's settings: DEFAULTS updated with ``cfg`` (a mapping, e.g. ``task.glyphs``)."""
    spec = dict(DEFAULTS)
    for key, value in dict(cfg or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"task.glyphs.{key}: unknown setting (known: {', '.join(DEFAULTS)})")
        spec[key] = value if isinstance(value, (str, int, float)) else list(value)  # a ListConfig -> a list
    return spec


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=8)
def _bank(chars: str, fonts: tuple[str, ...], size: int, height: float, dilate: int) -> torch.Tensor:
    """(dilate + 1, fonts, chars, size, size) float32 in [0, 1]: every glyph rendered once, cropped to
    its ink, fitted to ``height * size`` pixels high (or ``0.9 * size`` wide), centred, and grown by
    k = 0..dilate pixels (max-pooling: a dilation of the grey mask)."""
    from matplotlib import ft2font

    target = height * size
    bank = torch.zeros(len(fonts), len(chars), size, size)
    for i, name in enumerate(fonts):
        path = font_dir() / name
        if not path.is_file():
            raise FileNotFoundError(f"font {name!r} is not in matplotlib's {font_dir()}: remove it from task.glyphs.fonts")
        font = ft2font.FT2Font(str(path))
        font.set_size(2.5 * target, 72)  # points at 72 dpi = pixels: draw at ~2x the target, then shrink
        for j, ch in enumerate(chars):
            if font.get_char_index(ord(ch)) == 0:
                raise ValueError(f"font {name!r} has no glyph {ch!r}: remove it from task.glyphs.fonts or the character from task.glyphs.chars")
            font.set_text(ch)
            font.draw_glyphs_to_bitmap(antialiased=True)
            ink = torch.from_numpy(font.get_image().copy()).float() / 255.0
            rows, cols = ink.sum(1).nonzero().squeeze(1), ink.sum(0).nonzero().squeeze(1)
            ink = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            h, w = ink.shape
            f = min(target / h, 0.9 * size / w)
            nh, nw = max(1, round(h * f)), max(1, round(w * f))
            small = F.interpolate(ink[None, None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
            top, left = (size - nh) // 2, (size - nw) // 2
            bank[i, j, top : top + nh, left : left + nw] = small.clamp(0, 1)
    grown = [bank] + [F.max_pool2d(bank.view(-1, 1, size, size), 2 * k + 1, 1, k).view_as(bank) for k in range(1, dilate + 1)]
    return torch.stack(grown)


def dilation_steps(spec: dict) -> int:
    """The largest dilation in render pixels (``dilate`` is in output pixels)."""
    return int(round(spec["dilate"] * spec["render_scale"]))


def draw_params(spec: dict, n: int, stream: int) -> dict[str, torch.Tensor]:
    """Every random choice of ``n`` images of ``stream``, drawn up front in a fixed order (so images
    do not depend on the batch size they are rendered in)."""
    g = torch.Generator().manual_seed(int(spec["seed"]) * 1_000_003 + int(stream))
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "label": torch.randint(0, len(spec["chars"]), (n,), generator=g),
        "font": torch.randint(0, len(spec["fonts"]), (n,), generator=g),
        "dilate": torch.randint(0, dilation_steps(spec) + 1, (n,), generator=g),
        "rotation": u(-spec["rotation"], spec["rotation"]) * math.pi / 180,
        "scale": u(*spec["scale"]),
        "aspect": u(-spec["aspect"], spec["aspect"]).exp(),
        "shear": u(-spec["shear"], spec["shear"]),
        "tx": u(-spec["translate"], spec["translate"]),
        "ty": u(-spec["translate"], spec["translate"]),
        "intensity": u(*spec["intensity"]),
    }


def affine_theta(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, 2, 3) for ``F.affine_grid``: it maps output coordinates to where they sample the glyph,
    so it is the inverse of the forward map x -> A x + t, A = rotation @ shear @ diag(sx, sy), in
    normalised coordinates ([-1, 1] across the image; t = 2 * translate)."""
    c, s = p["rotation"].cos(), p["rotation"].sin()
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    shear = torch.eye(2, dtype=torch.float64).repeat(len(c), 1, 1)
    shear[:, 0, 1] = p["shear"]
    sx, sy = p["scale"] * p["aspect"].sqrt(), p["scale"] / p["aspect"].sqrt()
    a = rot @ shear @ torch.diag_embed(torch.stack([sx, sy], -1))
    inv = torch.linalg.inv(a)
    t = 2 * torch.stack([p["tx"], p["ty"]], -1).unsqueeze(-1)
    return torch.cat([inv, -inv @ t], -1).float()


def render(spec: dict, p: dict[str, torch.Tensor], image_size: int, chunk: int = 2048) -> torch.Tensor:
    """The images of the parameters ``p``: (n, 1, image_size, image_size) uint8."""
    r = spec["render_scale"]
    hi = r * image_size
    bank = _bank(spec["chars"], tuple(spec["fonts"]), hi, float(spec["height"]), dilation_steps(spec))
    theta = affine_theta(p)
    out = torch.empty((len(theta), 1, image_size, image_size), dtype=torch.uint8)
    for i in range(0, len(theta), chunk):
        sl = slice(i, i + chunk)
        glyphs = bank[p["dilate"][sl], p["font"][sl], p["label"][sl]].unsqueeze(1)
        grid = F.affine_grid(theta[sl], list(glyphs.shape), align_corners=False)
        moved = F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        small = F.avg_pool2d(moved, r) * p["intensity"][sl].float().view(-1, 1, 1, 1)
        out[sl] = (small.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def generate(spec: dict, n: int, stream: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8, n x 1 x S x S) and their labels (int64) from ``stream``."""
    p = draw_params(spec, n, stream)
    return render(spec, p, image_size), p["label"]


def cache_key(spec: dict, n: int, stream: int, image_size: int) -> str:
    import matplotlib

    key = {"version": VERSION, "spec": spec, "n": n, "stream": stream, "image_size": image_size,
           "matplotlib": matplotlib.__version__}  # FreeType ships with matplotlib: its rendering can change with it
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cached(spec: dict, n: int, stream: int, image_size: int, cache_dir: str | os.PathLike | None, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate`` through a file in ``cache_dir`` keyed by a hash of everything that changes the
    output (written atomically under a lock, so concurrent runs generate it once)."""
    if not cache_dir:
        return generate(spec, n, stream, image_size)
    path = Path(cache_dir).expanduser() / f"glyphs-{cache_key(spec, n, stream, image_size)}.pt"
    state = load_checkpoint(path, "cpu")
    if state is None:
        with file_lock(path.with_suffix(".lock")):
            state = load_checkpoint(path, "cpu")
            if state is None:
                import time

                t0 = time.time()
                x, y = generate(spec, n, stream, image_size)
                state = {"images": x, "labels": y}
                save_checkpoint(path, state)
                log(f"generated {n} glyph images ({image_size}x{image_size}, stream {stream}) in {time.time() - t0:.1f} s -> {path}")
    return state["images"], state["labels"]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the flow task's image range)."""
    return x.float() / 127.5 - 1.0
