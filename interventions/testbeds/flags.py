"""Synthetic flags: images that identify a country the language model knows facts about.

Each of `COUNTRIES` gets a distinct procedural flag (a pattern and two or three colours from a
small palette); `render` draws it at 32x32 with seeded jitter (shift, scale, colour, noise),
so that held-out seeds give new images of the same flag. The VLM testbed learns only to
*name* the country from its flag; questions about the country's capital are never trained.

>>> images = render([0, 1], torch.Generator().manual_seed(0))
>>> images.shape
torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import itertools
import random

import torch

#: (country, capital): both single tokens for SmolLM2, and the capitals SmolLM2 names from text
#: for most of them (its text accuracy is reported next to the testbed's).
COUNTRIES = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Kenya", "Nairobi"), ("Cuba", "Havana"),
    ("Canada", "Ottawa"), ("England", "London"), ("Chile", "Santiago"), ("Netherlands", "Amsterdam"),
    ("Korea", "Seoul"), ("Egypt", "Cairo"), ("Poland", "Warsaw"),
)
PALETTE = {"red": (0.85, 0.1, 0.1), "white": (0.95, 0.95, 0.95), "blue": (0.1, 0.2, 0.7),
           "green": (0.1, 0.6, 0.2), "yellow": (0.95, 0.8, 0.1), "black": (0.05, 0.05, 0.05),
           "orange": (0.95, 0.5, 0.1)}
PATTERNS = ("horizontal3", "vertical3", "horizontal2", "cross", "disc", "diagonal")
SIZE = 32


def designs(seed: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """One distinct (pattern, colours) per country, fixed by `seed`."""
    rng = random.Random(seed)
    names = list(PALETTE)
    pool = [(p, c) for p in PATTERNS for c in itertools.permutations(names, 3)]
    rng.shuffle(pool)
    out, used = [], set()
    for pattern, colours in pool:
        key = (pattern, colours[:2] if pattern in ("horizontal2", "cross", "disc", "diagonal") else colours)
        if key in used:
            continue
        used.add(key)
        out.append((pattern, colours))
        if len(out) == len(COUNTRIES):
            return out
    raise RuntimeError("not enough distinct flags")


def _flag(pattern: str, colours: tuple[str, ...], y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1]; y, x in [0, 1) flag coordinates."""
    c = [torch.tensor(PALETTE[k])[:, None, None] for k in colours]
    if pattern == "horizontal3":
        band = (y * 3).clamp(0, 2.999).floor()
    elif pattern == "vertical3":
        band = (x * 3).clamp(0, 2.999).floor()
    elif pattern == "horizontal2":
        band = (y >= 0.5).float()
    elif pattern == "cross":
        band = (((x - 0.36).abs() < 0.09) | ((y - 0.5).abs() < 0.09)).float()
    elif pattern == "disc":
        band = (((x - 0.5) ** 2 + (y - 0.5) ** 2) < 0.07).float()
    else:
        band = (x > y).float()
    out = torch.zeros(3, *y.shape)
    for k in range(3):
        out = torch.where(band[None] == k, c[min(k, len(c) - 1)].expand_as(out), out)
    return out


def render(countries: list[int], generator: torch.Generator, *, jitter: bool = True, seed: int = 0) -> torch.Tensor:
    """Flags of `countries` (indices into `COUNTRIES`), ``Float[Tensor, "n 3 32 32"]`` in [0, 1]."""
    table = designs(seed)
    g = generator
    out = []
    for idx in countries:
        pattern, colours = table[idx]
        if jitter:
            scale = 0.85 + 0.3 * torch.rand(2, generator=g)
            shift = (torch.rand(2, generator=g) - 0.5) * 0.2
        else:
            scale, shift = torch.ones(2), torch.zeros(2)
        ax = (torch.arange(SIZE) + 0.5) / SIZE
        y, x = torch.meshgrid((ax - 0.5) / scale[0] + 0.5 + shift[0], (ax - 0.5) / scale[1] + 0.5 + shift[1],
                              indexing="ij")
        img = _flag(pattern, colours, y, x)
        outside = (y < 0) | (y >= 1) | (x < 0) | (x >= 1)
        img = torch.where(outside[None], torch.full_like(img, 0.5), img)
        if jitter:
            img = img * (0.9 + 0.2 * torch.rand(3, 1, 1, generator=g)) + 0.04 * torch.randn(img.shape, generator=g)
        out.append(img.clamp(0, 1))
    return torch.stack(out)
