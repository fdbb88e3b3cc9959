"""The coloured-shapes world: synthetic images whose truth is known, and an evaluator for them.

The text-to-image testbed (``checkpoints/shapes_diffusion.safetensors``, trained by
``recipes/train/train_shapes.py``) learns captions such as "a red circle" from these
images. The evaluator says which colour and which shape an image shows, so that a
causal trace or a concept erasure on the testbed is scored without a human:

- colour: the median RGB of the bright pixels, matched to the nearest palette colour
  (or ``none`` when fewer than `MIN_PIXELS` pixels are bright);
- shape: a small CNN trained on rendered images (`ShapeNet`).

>>> images, colours, shapes = render(torch.Generator().manual_seed(0), 4)
>>> images.shape, images.min() >= 0, images.max() <= 1
(torch.Size([4, 3, 16, 16]), tensor(True), tensor(True))
>>> [COLOURS[c] for c in colour_of(images)] == [COLOURS[c] for c in colours]
True
"""

from __future__ import annotations

import math

import torch
from torch import nn

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PALETTE = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.15, 0.3, 1.0], [1.0, 0.9, 0.1]])
SIZE = 16          # pixels per side
SUPER = 4          # shapes are drawn at SUPER x SIZE and averaged down (anti-aliasing)
BRIGHT = 0.35      # a pixel is "bright" when its largest channel exceeds this
MIN_PIXELS = 4     # fewer bright pixels than this: the image shows no colour


def caption(colour: int | None, shape: int | None) -> str:
    """"a red circle", "a circle" (no colour) or "" (neither)."""
    words = ([COLOURS[colour]] if colour is not None else []) + ([SHAPES[shape]] if shape is not None else [])
    return " ".join(["a", *words]) if words else ""


def _masks(shapes: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """(n, S, S) float coverage masks at SUPER resolution, averaged down to SIZE."""
    n, big = len(shapes), SIZE * SUPER
    ax = (torch.arange(big, dtype=torch.float32) + 0.5) / SUPER
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    dx = x[None] - centre[:, 0, None, None]
    dy = y[None] - centre[:, 1, None, None]
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy                    # rotated coordinates
    r = radius[:, None, None]
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = (u.abs() <= 0.85 * r) & (v.abs() <= 0.85 * r)
    # An equilateral triangle inscribed in the circle of radius r, apex up (y grows downwards):
    # its sides lie r/2 from the centre, with outward normals at 90, 210 and 330 degrees.
    tri = torch.ones_like(circle)
    for deg in (90.0, 210.0, 330.0):
        a = math.radians(deg)
        tri &= (u * math.cos(a) + v * math.sin(a)) <= r / 2
    mask = torch.where(shapes[:, None, None] == 0, circle, torch.where(shapes[:, None, None] == 1, square, tri))
    return mask.float().reshape(n, SIZE, SUPER, SIZE, SUPER).mean(dim=(2, 4))


def render(generator: torch.Generator, n: int, colours: torch.Tensor | None = None,
           shapes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` images ``Float[Tensor, "n 3 16 16"]`` in [0, 1] on black, with their colour and shape indices.

    Position (±2.5 px), size (radius 4 to 6 px) and rotation (±15°) vary; colour and shape are
    drawn uniformly unless given."""
    g = generator
    colours = torch.randint(len(COLOURS), (n,), generator=g) if colours is None else colours
    shapes = torch.randint(len(SHAPES), (n,), generator=g) if shapes is None else shapes
    centre = SIZE / 2 + (torch.rand(n, 2, generator=g) - 0.5) * 5
    radius = 4 + 2 * torch.rand(n, generator=g)
    angle = (torch.rand(n, generator=g) - 0.5) * math.radians(30)
    mask = _masks(shapes, centre, radius, angle)
    images = mask[:, None] * PALETTE[colours][:, :, None, None]
    return images.clamp(0, 1), colours, shapes


def colour_of(images: torch.Tensor) -> torch.Tensor:
    """The palette index each image shows (-1: none). images: ``Float[Tensor, "n 3 h w"]`` in [0, 1]."""
    out = []
    palette = PALETTE.to(images.device)
    for img in images.float():
        pixels = img.flatten(1).T                          # (h*w, 3)
        bright = pixels[pixels.max(dim=1).values > BRIGHT]
        if len(bright) < MIN_PIXELS:
            out.append(-1)
            continue
        median = bright.median(dim=0).values
        out.append(int(((palette - median) ** 2).sum(dim=1).argmin()))
    return torch.tensor(out, dtype=torch.long)


class ShapeNet(nn.Module):
    """A 3-layer CNN that names the shape in a 16x16 image, whatever its colour."""

    def __init__(self, classes: int = len(SHAPES)):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Colour-blind on purpose: the brightness (max over channels) carries the shape.
        return self.net(images.amax(dim=1, keepdim=True) * 2 - 1)


def train_shape_net(seed: int = 0, steps: int = 600, batch: int = 128) -> tuple[ShapeNet, float]:
    """Train `ShapeNet` on rendered images with pixel noise and blur; return it and its held-out accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for step in range(steps):
        images, _, shapes = render(g, batch)
        images = _augment(images, g)
        loss = nn.functional.cross_entropy(net(images), shapes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    images, _, shapes = render(torch.Generator().manual_seed(seed + 10_000), 2000)
    with torch.no_grad():
        accuracy = float((net(images).argmax(1) == shapes).float().mean())
    return net, accuracy


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generated images are a little noisy and soft: train the evaluator on such images too."""
    noise = torch.randn(images.shape, generator=g) * 0.08 * torch.rand(len(images), 1, 1, 1, generator=g)
    blurred = nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(len(images), 1, 1, 1, generator=g) < 0.3).float()
    return (pick * blurred + (1 - pick) * images + noise).clamp(0, 1)


class Evaluator:
    """Names the colour and the shape of images: ``evaluator(images) -> (colours, shapes)``."""

    def __init__(self, shape_net: ShapeNet):
        self.shape_net = shape_net.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.float().cpu()
        shapes = self.shape_net(images).argmax(dim=1)
        colours = colour_of(images)
        shapes = torch.where(colours >= 0, shapes, torch.full_like(shapes, -1))   # nothing drawn: no shape
        return colours, shapes

    def shows(self, images: torch.Tensor, word: str) -> torch.Tensor:
        """Bool per image: does it show `word` (a colour or a shape)?"""
        colours, shapes = self(images)
        if word in COLOURS:
            return colours == COLOURS.index(word)
        if word in SHAPES:
            return shapes == SHAPES.index(word)
        raise ValueError(f"`target`: got {word!r}; expected a colour ({', '.join(COLOURS)}) "
                         f"or a shape ({', '.join(SHAPES)})")


# ----------------------------------------------------------------------------- erasure prompts
WORDS = COLOURS + SHAPES     # the concepts the evaluator names


def heldout_prompts(concepts: list[str], n: int, seed: int) -> list[str]:
    """The closed vocabulary has no synonyms: held out are the captions without their article
    ("red circle"), a word order the erase templates ("a {} circle") do not use; at most `n` per concept."""
    out = []
    for w in concepts:
        pairs = [(w, s) for s in SHAPES] if w in COLOURS else [(c, w) for c in COLOURS]
        out += [f"{c} {s}" for c, s in pairs][:n]
    return out


def kept_prompts(word: str, n: int, seed: int) -> list[str]:
    """Every caption that asks for `word` (at most `n`)."""
    return [caption(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))
            if word in (COLOURS[c], SHAPES[s])][:n]
