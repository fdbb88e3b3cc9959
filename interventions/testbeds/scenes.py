"""The scenes world: one or two coloured shapes with a size and a position, captions written many
ways, and an evaluator that reads every attribute back from an image.

It is the world of the second text-to-image testbed (``scenes-smollm2``: a diffusers
``UNet2DConditionModel`` conditioned on the frozen SmolLM2-135M's hidden states, trained by
``recipes/train/train_scenes.py``). What makes it a test of erasure that holds:

- **Attributes**: 10 colours x 5 shapes x 2 sizes x 3 positions, one object or two (left and right).
- **Phrasings**: each colour and shape has several words ("red", "ruby", "cherry red"), each object
  several phrase forms ("a red circle", "a circle that is red", "a circle the colour of a tomato")
  and each scene several sentence forms. A *held-out* share of them (`Phrasing.heldout`: words such
  as "crimson" and "scarlet", things such as "a fire truck", forms such as "a circle painted red")
  never appears in training, so generalization, and an erasure's reach, can be measured on words the
  model and the edit never saw.
- **Evaluator** (`Evaluator`): connected components of the bright pixels are the objects; each gets
  its colour (median pixel, nearest palette colour), its shape (a small CNN on the component's mask,
  `ShapeNet`), its size (radius from area and shape) and its position (centroid). Its accuracy on
  rendered scenes is measured by `evaluator_accuracy`.

>>> g = torch.Generator().manual_seed(0)
>>> scene = sample_scene(g)
>>> images = render([scene, scene], g)
>>> images.shape
torch.Size([2, 3, 24, 24])
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from interventions.testbeds import shapes

COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white", "gray")
PALETTE = torch.tensor([[1.0, 0.1, 0.1], [1.0, 0.55, 0.05], [1.0, 0.92, 0.1], [0.1, 0.85, 0.1],
                        [0.1, 0.9, 0.9], [0.15, 0.3, 1.0], [0.62, 0.15, 0.92], [1.0, 0.5, 0.78],
                        [0.97, 0.97, 0.97], [0.55, 0.55, 0.55]])
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
SIZE = 24          # pixels per side
SUPER = 4          # drawn at SUPER x SIZE, averaged down
BRIGHT = 0.3       # a pixel is part of an object when its largest channel exceeds this
MIN_PIXELS = 5     # smaller components are noise
RADIUS = {"small": (3.0, 3.8), "large": (4.8, 5.6)}
SMALL_BELOW = 4.3  # estimated radius below this: small
CENTRE_X = {"left": 7.0, "middle": 12.0, "right": 17.0}
PAIR_X = (6.0, 18.0)
# area of each shape at radius 1 (at SIZE resolution), for the size estimate
AREA = {"circle": math.pi, "square": 1.7 ** 2, "triangle": 3 * math.sqrt(3) / 4, "diamond": 2 * 1.1 ** 2,
        "cross": 2 * (0.66 * 2) - 0.66 ** 2}


# ----------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str      # left | middle | right


def sample_scene(g: torch.Generator, two: float = 0.3) -> tuple[Obj, ...]:
    """One object (any position) or, with probability `two`, two (left and right)."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    if float(torch.rand(1, generator=g)) < two:
        return tuple(Obj(pick(COLOURS), pick(SHAPES), pick(SIZES), pos) for pos in ("left", "right"))
    return (Obj(pick(COLOURS), pick(SHAPES), pick(SIZES), pick(POSITIONS)),)


def _mask(shape: str, cx: float, cy: float, r: float, angle: float) -> torch.Tensor:
    big = SIZE * SUPER
    ax = (torch.arange(big, dtype=torch.float32) + 0.5) / SUPER
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    dx, dy = x - cx, y - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if shape == "circle":
        m = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":
        m = (u.abs() <= 0.85 * r) & (v.abs() <= 0.85 * r)
    elif shape == "diamond":
        m = u.abs() + v.abs() <= 1.1 * r
    elif shape == "cross":
        m = ((u.abs() <= 0.33 * r) & (v.abs() <= r)) | ((v.abs() <= 0.33 * r) & (u.abs() <= r))
    else:   # triangle, apex up: sides r/2 from the centre
        m = torch.ones_like(dx, dtype=torch.bool)
        for deg in (90.0, 210.0, 330.0):
            a = math.radians(deg)
            m &= (u * math.cos(a) + v * math.sin(a)) <= r / 2
    return m.float().reshape(SIZE, SUPER, SIZE, SUPER).mean(dim=(1, 3))


def render(scenes, g: torch.Generator) -> torch.Tensor:
    """Images ``Float[Tensor, "n 3 24 24"]`` in [0, 1] on black; position, size and rotation jittered."""
    out = []
    for scene in scenes:
        img = torch.zeros(3, SIZE, SIZE)
        for k, o in enumerate(scene):
            lo, hi = RADIUS[o.size]
            r = lo + (hi - lo) * float(torch.rand(1, generator=g))
            jitter = (torch.rand(2, generator=g) - 0.5) * 2
            cx = (PAIR_X[k] if len(scene) == 2 else CENTRE_X[o.position]) + float(jitter[0])
            cy = SIZE / 2 + 2 * float(jitter[1])
            angle = (float(torch.rand(1, generator=g)) - 0.5) * math.radians(30)
            m = _mask(o.shape, cx, cy, r, angle)
            img = img * (1 - m) + m * PALETTE[COLOURS.index(o.colour)][:, None, None]
        out.append(img.clamp(0, 1))
    return torch.stack(out)


# ----------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class Words:
    train: tuple[str, ...]
    heldout: tuple[str, ...]


COLOUR_WORDS = {
    "red": Words(("red", "ruby", "cherry red"), ("crimson", "scarlet")),
    "orange": Words(("orange", "tangerine"), ("amber",)),
    "yellow": Words(("yellow", "lemon yellow"), ("golden",)),
    "green": Words(("green", "emerald"), ("lime green",)),
    "cyan": Words(("cyan", "turquoise"), ("aqua",)),
    "blue": Words(("blue", "cobalt"), ("azure",)),
    "purple": Words(("purple", "violet"), ("plum",)),
    "pink": Words(("pink", "rose pink"), ("magenta",)),
    "white": Words(("white", "snow white"), ("ivory",)),
    "gray": Words(("gray", "grey"), ("silver",)),
}
COLOUR_THINGS = {   # "the colour of ..."
    "red": Words(("a tomato", "blood"), ("a fire truck", "a ripe strawberry")),
    "orange": Words(("a carrot",), ("a pumpkin",)),
    "yellow": Words(("a banana",), ("a sunflower",)),
    "green": Words(("grass",), ("a leaf",)),
    "cyan": Words(("a tropical sea",), ("a swimming pool",)),
    "blue": Words(("the sky",), ("the ocean",)),
    "purple": Words(("an aubergine",), ("a grape",)),
    "pink": Words(("a flamingo",), ("bubble gum",)),
    "white": Words(("snow",), ("milk",)),
    "gray": Words(("ash",), ("concrete",)),
}
SHAPE_WORDS = {
    "circle": Words(("circle", "disc", "round shape"), ("dot",)),
    "square": Words(("square", "box"), ("block",)),
    "triangle": Words(("triangle", "three-sided shape"), ("wedge",)),
    "diamond": Words(("diamond", "rhombus"), ("lozenge",)),
    "cross": Words(("cross", "plus sign"), ("plus shape",)),
}
SIZE_WORDS = {"small": Words(("small", "little"), ("tiny",)), "large": Words(("large", "big"), ("huge",))}
POSITION_WORDS = {"left": Words(("on the left", "at the left"), ("towards the left",)),
                  "middle": Words(("in the middle", "in the centre"), ("in the center",)),
                  "right": Words(("on the right", "at the right"), ("towards the right",))}
# object phrases: {s} size word (with its space) or '', {c} colour word, {t} colour thing, {h} shape word
OBJECT_FORMS = Words(("{s}{c} {h}", "{s}{h} that is {c}", "{s}{h} in {c}", "{s}{h} the colour of {t}"),
                     ("{s}{h} painted {c}", "{s}{h}, coloured {c}"))
SCENE_FORMS = Words(("{o}", "{o} {p}", "a picture of {o}", "{p}, {o}"), ("there is {o} {p}", "a drawing of {o}"))
PAIR_FORMS = Words(("{o1} on the left and {o2} on the right", "{o1} next to {o2}", "{o2} to the right of {o1}"),
                   ("two shapes: {o1} and {o2}",))


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Phrasing:
    """Which half of every word list a caption draws from: ``heldout=False`` (training) or True."""

    heldout: bool = False

    def pick(self, words: Words, rnd: random.Random, mix: float = 0.0) -> str:
        """A word of this half; a held-out phrasing takes a training word with probability `mix`, so
        that a held-out caption differs from training in some but not all of its words."""
        use = words.heldout if self.heldout and rnd.random() >= mix else words.train
        return rnd.choice(use)

    def object(self, o: Obj, rnd: random.Random, *, colour: bool = True, size: bool | None = None) -> str:
        form = self.pick(OBJECT_FORMS, rnd, 0.5) if colour else "{s}{h}"
        size = rnd.random() < 0.4 if size is None else size
        s = self.pick(SIZE_WORDS[o.size], rnd, 0.5) + " " if size else ""
        return article(form.format(s=s, c=self.pick(COLOUR_WORDS[o.colour], rnd, 0.3),
                                   t=self.pick(COLOUR_THINGS[o.colour], rnd, 0.3),
                                   h=self.pick(SHAPE_WORDS[o.shape], rnd, 0.3)))

    def caption(self, scene, rnd: random.Random, *, colour: bool = True) -> str:
        if len(scene) == 2:
            form = self.pick(PAIR_FORMS, rnd, 0.5)
            return form.format(o1=self.object(scene[0], rnd, colour=colour), o2=self.object(scene[1], rnd, colour=colour))
        o = scene[0]
        form = self.pick(SCENE_FORMS, rnd, 0.5)
        return form.format(o=self.object(o, rnd, colour=colour), p=self.pick(POSITION_WORDS[o.position], rnd, 0.3))


def positioned(caption: str, scene) -> bool:
    """Does the caption say where its single object is? (Otherwise any position fits it.)"""
    return len(scene) == 2 or any(w in caption for ws in POSITION_WORDS.values() for w in ws.train + ws.heldout)


# ----------------------------------------------------------------------------- evaluator
def components(bright: torch.Tensor) -> torch.Tensor:
    """Labels ``Long[Tensor, "h w"]`` of the 8-connected components of a boolean mask (0: background)."""
    h, w = bright.shape
    labels = torch.where(bright, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(()))
    while True:
        grown = nn.functional.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * bright
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


@dataclass(frozen=True)
class Seen:
    """One object the evaluator found."""

    colour: str
    shape: str
    size: str
    position: str
    pixels: int


class ShapeNet(shapes.ShapeNet):
    """The coloured-shapes evaluator's CNN, naming this world's shapes from one object's 16x16 mask crop."""

    def __init__(self):
        super().__init__(classes=len(SHAPES))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops * 2 - 1)


CROP = 16


def crops_of(image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int, float, float]]:
    """Per object: (brightness crop [1, 16, 16] masked to the object, its pixels' RGB, pixel count, cx, cy)."""
    value = image.amax(dim=0)
    labels = components(value > BRIGHT)
    out = []
    for lab in labels.unique():
        if lab == 0:
            continue
        m = labels == lab
        n = int(m.sum())
        if n < MIN_PIXELS:
            continue
        ys, xs = torch.nonzero(m, as_tuple=True)
        cy, cx = float(ys.float().mean()), float(xs.float().mean())
        # the object's own brightness (soft edges kept), everything else black, centred in a 16x16 crop
        own = value * nn.functional.max_pool2d(m[None, None].float(), 3, stride=1, padding=1)[0, 0]
        pad = nn.functional.pad(own, (CROP, CROP, CROP, CROP))
        y0, x0 = int(round(cy)) + CROP - CROP // 2, int(round(cx)) + CROP - CROP // 2
        out.append((pad[y0:y0 + CROP, x0:x0 + CROP][None], image[:, m].T, n, cx, cy))
    return out


class Evaluator:
    """Reads scenes back: ``evaluator.objects(images)`` is a list of `Seen` per image, left to right."""

    colours, shapes = COLOURS, SHAPES

    def __init__(self, shape_net: ShapeNet):
        self.shape_net = shape_net.eval()

    @torch.no_grad()
    def objects(self, images: torch.Tensor) -> list[list[Seen]]:
        out = []
        palette = PALETTE
        for img in images.float().cpu():
            found = crops_of(img)
            if not found:
                out.append([])
                continue
            kinds = self.shape_net(torch.stack([f[0] for f in found])).argmax(1).tolist()
            seen = []
            for (crop, rgb, n, cx, cy), k in zip(found, kinds):
                value = rgb.amax(dim=1)       # the fully covered core: edge pixels are darker mixes
                core = rgb[value >= 0.8 * value.quantile(0.9)]
                colour = COLOURS[int(((palette - core.median(dim=0).values) ** 2).sum(1).argmin())]
                shape = SHAPES[k]
                radius = math.sqrt(n / AREA[shape])
                position = "left" if cx < 9.5 else "right" if cx > 14.5 else "middle"
                seen.append(Seen(colour, shape, "small" if radius < SMALL_BELOW else "large", position, n))
            out.append(sorted(seen, key=lambda s: ("left", "middle", "right").index(s.position)))
        return out

    def shows(self, images: torch.Tensor, word: str) -> torch.Tensor:
        """Bool per image: does any object in it have colour or shape `word`?"""
        if word not in COLOURS + SHAPES:
            raise ValueError(f"`target`: got {word!r}; expected a colour ({', '.join(COLOURS)}) "
                             f"or a shape ({', '.join(SHAPES)})")
        return torch.tensor([any(word in (s.colour, s.shape) for s in objs) for objs in self.objects(images)])

    def matches(self, images: torch.Tensor, scenes, *, check_position: list[bool] | None = None) -> dict[str, float]:
        """Share of images whose objects match their scene: count, colour, shape, size, position, all."""
        hits = {k: 0 for k in ("count", "colour", "shape", "size", "position", "all")}
        for i, (objs, scene) in enumerate(zip(self.objects(images), scenes)):
            if len(objs) != len(scene):
                continue
            hits["count"] += 1
            pos = True if check_position is None else check_position[i]
            ok = {"colour": all(s.colour == o.colour for s, o in zip(objs, scene)),
                  "shape": all(s.shape == o.shape for s, o in zip(objs, scene)),
                  "size": all(s.size == o.size for s, o in zip(objs, scene)),
                  "position": (not pos) or all(s.position == o.position for s, o in zip(objs, scene))}
            for k, v in ok.items():
                hits[k] += v
            hits["all"] += all(ok.values())
        return {k: v / max(1, len(scenes)) for k, v in hits.items()}


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generated images are a little noisy and soft: the evaluator is trained on such images too."""
    noise = torch.randn(images.shape, generator=g) * 0.06 * torch.rand(len(images), 1, 1, 1, generator=g)
    blurred = nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(len(images), 1, 1, 1, generator=g) < 0.3).float()
    return (pick * blurred + (1 - pick) * images + noise).clamp(0, 1)


def train_shape_net(seed: int = 0, steps: int = 800, batch: int = 64) -> ShapeNet:
    """`ShapeNet` trained on the object crops of rendered, augmented scenes."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(steps):
        scenes = [(Obj("white", SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))],
                       SIZES[int(torch.randint(2, (1,), generator=g))], "middle"),) for _ in range(batch)]
        images = augment(render(scenes, g) * (0.5 + 0.5 * torch.rand(batch, 1, 1, 1, generator=g)), g)
        crops, labels = [], []
        for img, scene in zip(images, scenes):
            found = crops_of(img)
            if len(found) == 1:
                crops.append(found[0][0])
                labels.append(SHAPES.index(scene[0].shape))
        loss = nn.functional.cross_entropy(net(torch.stack(crops)), torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def evaluator_accuracy(evaluator: Evaluator, seed: int = 10_000, n: int = 1000) -> dict[str, float]:
    """The evaluator's own accuracy on rendered, augmented scenes it was not trained on."""
    g = torch.Generator().manual_seed(seed)
    scenes = [sample_scene(g) for _ in range(n)]
    return evaluator.matches(augment(render(scenes, g), g), scenes)


# ----------------------------------------------------------------------------- erasure prompts
WORDS = COLOURS + SHAPES     # the concepts the evaluator names


def with_concept(word: str, g: torch.Generator) -> tuple[Obj, ...]:
    """A random scene whose first object has colour or shape `word`."""
    scene = sample_scene(g)
    o = scene[0]
    o = Obj(word, o.shape, o.size, o.position) if word in COLOURS else Obj(o.colour, word, o.size, o.position)
    return (o, *scene[1:])


def heldout_prompts(concepts: list[str], n: int, seed: int) -> list[str]:
    """`n` prompts per concept in the held-out phrasing (words, things and forms training never used;
    a held-out caption keeps some training words, so some name the concept by its own word)."""
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    return [Phrasing(heldout=True).caption(with_concept(w, g), rnd) for w in concepts for _ in range(n)]


def kept_prompts(word: str, n: int, seed: int) -> list[str]:
    """`n` prompts in the training phrasing that ask for `word` (its other attributes random)."""
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    return [Phrasing().caption(with_concept(word, g), rnd) for _ in range(n)]


# ----------------------------------------------------------------------------- contrastive captions
#: the attributes a contrastive model is asked about, and their classes
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "count": ("one", "two")}


def mentions(caption: str) -> dict[str, bool]:
    """Which optional attributes a training-phrasing caption states: its size words, its position words."""
    words = f" {caption} "
    size = any(f" {w} " in words for ws in SIZE_WORDS.values() for w in ws.train + ws.heldout)
    return {"size": size, "position": any(w in caption for ws in POSITION_WORDS.values() for w in ws.train + ws.heldout)}


def consistent(caption: str, described, scene) -> bool:
    """Whether `caption` (written for the scene `described`) also describes `scene`: the same count, and per
    object the same colour and shape, the same size where the caption states sizes, and the same position
    where it states one. A contrastive model trained on random batches treats these pairs as positives."""
    if len(described) != len(scene):
        return False
    said = mentions(caption)
    for a, b in zip(described, scene):
        if (a.colour, a.shape) != (b.colour, b.shape) or (said["size"] and a.size != b.size):
            return False
        if len(scene) == 1 and said["position"] and a.position != b.position:
            return False
    return True


def class_prompts(attribute: str) -> dict[str, list[str]]:
    """Per class of `attribute`, the prompts whose mean text embedding is the zero-shot classifier (prompt
    ensembling over the attributes it does not ask about, in the training phrasing's first words)."""
    c = {k: COLOUR_WORDS[k].train[0] for k in COLOURS}
    h = {k: SHAPE_WORDS[k].train[0] for k in SHAPES}
    objects = [(col, shp) for col in COLOURS for shp in SHAPES]
    if attribute == "colour":
        return {col: [article(f"{c[col]} {h[s]}") for s in SHAPES] for col in COLOURS}
    if attribute == "shape":
        return {s: [article(f"{c[col]} {h[s]}") for col in COLOURS] for s in SHAPES}
    if attribute == "size":
        return {z: [article(f"{SIZE_WORDS[z].train[0]} {c[col]} {h[s]}") for col, s in objects] for z in SIZES}
    if attribute == "position":
        return {p: [article(f"{c[col]} {h[s]}") + " " + POSITION_WORDS[p].train[0] for col, s in objects]
                for p in POSITIONS}
    if attribute == "count":
        pairs = [(objects[i], objects[(7 * i + 3) % len(objects)]) for i in range(len(objects))]
        return {"one": [article(f"{c[col]} {h[s]}") for col, s in objects],
                "two": [f"{article(c[a] + ' ' + h[b])} next to {article(c[x] + ' ' + h[y])}" for (a, b), (x, y) in pairs]}
    raise ValueError(f"`attribute`: got {attribute!r}; expected one of {', '.join(ATTRIBUTES)}")


def truth(scene, attribute: str) -> str:
    """The class of `attribute` a scene shows (for a pair: its left object's, and count 'two')."""
    if attribute == "count":
        return ("one", "two")[len(scene) - 1]
    return getattr(scene[0], attribute)


def parse_scene(text: str) -> tuple[Obj, ...]:
    """``"red circle"``, ``"blue square small left"`` or ``"red circle, blue square"`` (a pair: left, right) as a
    scene; size defaults to large, a single object's position to the middle. Raises ValueError naming what
    is allowed."""
    parts = [p.split() for p in text.split(",")]
    if not 1 <= len(parts) <= 2:
        raise ValueError("one object, or two separated by a comma")
    objects = []
    for k, words in enumerate(parts):
        if not 2 <= len(words) <= 4 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ValueError(f"`<colour> <shape> [size] [position]`, colour one of {', '.join(COLOURS)}, shape one of "
                             f"{', '.join(SHAPES)}")
        rest = words[2:]
        size = next((w for w in rest if w in SIZES), "large")
        position = next((w for w in rest if w in POSITIONS), "middle")
        if any(w not in SIZES + POSITIONS for w in rest) or len(set(rest)) != len(rest):
            raise ValueError(f"after the shape, a size ({', '.join(SIZES)}) and a position ({', '.join(POSITIONS)})")
        objects.append(Obj(words[0], words[1], size, ("left", "right")[k] if len(parts) == 2 else position))
    return tuple(objects)


def text_bank() -> list[tuple[str, str]]:
    """Descriptions that each state one attribute, tagged with it: ``(text, attribute)``. A head that TextSpan
    explains with colour texts is a colour head. Every word comes from the captions' word lists, training and
    held-out."""
    out = []
    for col in COLOURS:
        for w in COLOUR_WORDS[col].train + COLOUR_WORDS[col].heldout:
            out += [(w, "colour"), (f"a shape that is {w}", "colour"), (f"{article(w)} shape", "colour")]
        for thing in COLOUR_THINGS[col].train + COLOUR_THINGS[col].heldout:
            out.append((f"the colour of {thing}", "colour"))
    for shp in SHAPES:
        for w in SHAPE_WORDS[shp].train + SHAPE_WORDS[shp].heldout:
            out += [(article(w), "shape"), (w, "shape"), (f"a picture of {article(w)}", "shape")]
    for size in SIZES:
        for w in SIZE_WORDS[size].train + SIZE_WORDS[size].heldout:
            out += [(w, "size"), (f"{article(w)} shape", "size")]
    for pos in POSITIONS:
        for w in POSITION_WORDS[pos].train + POSITION_WORDS[pos].heldout:
            out += [(w, "position"), (f"a shape {w}", "position")]
    out += [("two shapes", "count"), ("a shape next to a shape", "count"), ("a shape and a shape", "count"),
            ("a shape to the right of a shape", "count")]
    return out
