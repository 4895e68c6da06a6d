"""Procedural product-catalog images at 128×128 with captions, deterministic from a seed.

Nothing is stored: sample ``i`` of a split is drawn from ``random.Random(f"{split}:{seed}:{i}")``, so a
dataset is its seed. Objects are drawn at 2× and downsampled (anti-aliased edges), shaded with a
light-from-the-left gradient and given a soft contact shadow.

Held out of training: ``HELD_OUT`` (object, colour, background) triples and the ``EVAL_TEMPLATES``
caption templates; the evaluation prompts use them to measure generalisation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SUPER = 2  # draw at 256, downsample to 128

OBJECTS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "t-shirt"),
    "mug": ("mug", "coffee mug", "cup"),
    "bottle": ("bottle", "water bottle", "flask"),
    "chair": ("chair", "dining chair", "side chair"),
    "lamp": ("lamp", "desk lamp", "table lamp"),
    "sneaker": ("sneaker", "running shoe", "trainer"),
    "backpack": ("backpack", "rucksack", "daypack"),
    "table": ("table", "side table", "small table"),
    "vase": ("vase", "flower vase", "ceramic vase"),
    "cap": ("cap", "baseball cap", "sports cap"),
}
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((200, 30, 35), ("red", "crimson", "scarlet")),
    "orange": ((240, 130, 20), ("orange", "tangerine", "orange")),
    "yellow": ((245, 215, 40), ("yellow", "lemon yellow", "golden yellow")),
    "green": ((40, 150, 60), ("green", "emerald", "grass green")),
    "blue": ((30, 80, 200), ("blue", "royal blue", "cobalt")),
    "purple": ((120, 50, 160), ("purple", "violet", "plum")),
    "pink": ((240, 120, 170), ("pink", "rose pink", "hot pink")),
    "brown": ((120, 75, 40), ("brown", "chocolate brown", "chestnut")),
    "black": ((28, 28, 30), ("black", "jet black", "charcoal black")),
    "white": ((238, 238, 236), ("white", "snow white", "ivory")),
    "grey": ((128, 128, 132), ("grey", "gray", "slate grey")),
}
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "white": ("white", "plain white", "clean white"),
    "grey": ("grey", "gray", "neutral grey"),
    "black": ("black", "dark", "jet black"),
    "beige": ("beige", "cream", "sand"),
    "blue": ("pastel blue", "light blue", "sky blue"),
    "wood": ("wooden", "wood", "oak"),
}
BG_BASE = {
    "white": (244, 244, 242),
    "grey": (165, 166, 170),
    "black": (22, 22, 24),
    "beige": (226, 210, 178),
    "blue": (170, 200, 235),
    "wood": (150, 102, 60),
}
TRAIN_TEMPLATES = (
    "a {c} {o} on a {b} background",
    "product photo of a {c} {o}, {b} backdrop",
    "{c} {o} against a {b} background",
    "studio shot of a {c} {o} on {b}",
    "a {o} in {c}, {b} background",
    "catalog image: {c} {o}, {b} backdrop",
    "e-commerce photo, {c} {o} on a {b} surface",
    "{c} {o}, {b} background, product shot",
    "a {b} backdrop with a {c} {o}",
    "{o}, {c}, on a {b} background",
    "{b} background, {c} {o}",
    "shop image of a {c} {o} with a {b} background",
    "{c} coloured {o} shot against {b}",
    "a single {o}, colour {c}, {b} studio background",
)
EVAL_SEEN_TEMPLATES = TRAIN_TEMPLATES[:8]  # the evaluation set was drawn with these: keep it fixed
EVAL_TEMPLATES = (  # paraphrases never seen in training
    "photograph of a {c} {o} placed on a {b} backdrop",
    "listing picture: one {c} {o} in front of a {b} background",
    "the {o} is {c} and the background is {b}",
)
OBJECT_NAMES = tuple(OBJECTS)
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)


def _held_out() -> frozenset[tuple[str, str, str]]:
    """~8% of all triples, fixed, with every object, colour and background still seen in training."""
    rng = random.Random("held-out-v1")
    triples = [(o, c, b) for o in OBJECT_NAMES for c in COLOUR_NAMES for b in BACKGROUND_NAMES]
    return frozenset(rng.sample(triples, len(triples) // 12))


HELD_OUT = _held_out()


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (128, 128, 3) uint8
    caption: str
    obj: str
    colour: str
    background: str


def caption_for(rng: random.Random, obj: str, colour: str, background: str, templates: tuple[str, ...]) -> str:
    return rng.choice(templates).format(
        c=rng.choice(COLOURS[colour][1]), o=rng.choice(OBJECTS[obj]), b=rng.choice(BACKGROUNDS[background])
    )


def _background(rng: random.Random, name: str) -> Image.Image:
    s = SIZE * SUPER
    base = np.array(BG_BASE[name], dtype=np.float32) * rng.uniform(0.94, 1.06)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    # studio light: a soft vertical falloff plus a vignette
    light = 1.0 + 0.06 * (0.5 - yy) - 0.08 * ((xx - 0.5) ** 2 + (yy - 0.45) ** 2)
    img = base[None, None, :] * light[..., None]
    if name == "wood":
        phase = rng.uniform(0, 2 * math.pi)
        grain = 0.08 * np.sin(yy * 60 + 3 * np.sin(xx * 7 + phase)) + 0.05 * np.sin(yy * 170 + phase)
        planks = ((yy * 5 + rng.uniform(0, 1)) % 1.0 < 0.03).astype(np.float32) * -0.25
        img = img * (1 + grain + planks)[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _shade(rgb: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * k))) for v in rgb)  # type: ignore[return-value]


def _draw_object(draw: ImageDraw.ImageDraw, obj: str, rgb: tuple[int, int, int], s: int) -> None:
    """Draw ``obj`` centred in an s×s canvas (filled shapes; shading is applied afterwards)."""
    dark, light = _shade(rgb, 0.72), _shade(rgb, 1.15)
    c = s // 2
    u = s / 10  # unit
    if obj == "t-shirt":
        body = [(c - 2.2 * u, c - 3 * u), (c - 1 * u, c - 3.4 * u), (c + 1 * u, c - 3.4 * u), (c + 2.2 * u, c - 3 * u),
                (c + 3.8 * u, c - 1.6 * u), (c + 3 * u, c - 0.6 * u), (c + 2.2 * u, c - 1.2 * u),
                (c + 2.2 * u, c + 3.4 * u), (c - 2.2 * u, c + 3.4 * u), (c - 2.2 * u, c - 1.2 * u),
                (c - 3 * u, c - 0.6 * u), (c - 3.8 * u, c - 1.6 * u)]  # fmt: skip
        draw.polygon(body, fill=rgb)
        draw.chord([c - 1 * u, c - 3.9 * u, c + 1 * u, c - 2.6 * u], 0, 180, fill=dark)
    elif obj == "mug":
        draw.ellipse([c + 1.2 * u, c - 1.6 * u, c + 3.4 * u, c + 1.4 * u], outline=rgb, width=int(0.6 * u))
        draw.rounded_rectangle([c - 2.4 * u, c - 2.6 * u, c + 2 * u, c + 2.8 * u], radius=int(0.5 * u), fill=rgb)
        draw.ellipse([c - 2.4 * u, c - 3.1 * u, c + 2 * u, c - 2.1 * u], fill=dark)
    elif obj == "bottle":
        draw.rounded_rectangle([c - 1.6 * u, c - 1.4 * u, c + 1.6 * u, c + 3.6 * u], radius=int(0.8 * u), fill=rgb)
        draw.polygon([(c - 1.6 * u, c - 0.8 * u), (c - 0.6 * u, c - 2.4 * u), (c + 0.6 * u, c - 2.4 * u),
                      (c + 1.6 * u, c - 0.8 * u)], fill=rgb)  # fmt: skip
        draw.rectangle([c - 0.6 * u, c - 3.2 * u, c + 0.6 * u, c - 2.2 * u], fill=rgb)
        draw.rectangle([c - 0.7 * u, c - 3.8 * u, c + 0.7 * u, c - 3.1 * u], fill=dark)
        draw.rectangle([c - 1.6 * u, c + 0.4 * u, c + 1.6 * u, c + 1.6 * u], fill=light)
    elif obj == "chair":
        w = int(0.45 * u)
        draw.rectangle([c - 2 * u, c - 3.6 * u, c + 2 * u, c - 0.2 * u], fill=rgb)  # backrest
        draw.rectangle([c - 2.4 * u, c - 0.4 * u, c + 2.4 * u, c + 0.5 * u], fill=dark)  # seat
        for x in (c - 2.1 * u, c + 2.1 * u - w):
            draw.rectangle([x, c + 0.5 * u, x + w, c + 3.6 * u], fill=rgb)
        draw.rectangle([c - 1.3 * u, c + 0.5 * u, c - 1.3 * u + w, c + 3 * u], fill=dark)
        draw.rectangle([c + 1.3 * u - w, c + 0.5 * u, c + 1.3 * u, c + 3 * u], fill=dark)
    elif obj == "lamp":
        draw.polygon([(c - 1.2 * u, c - 3.6 * u), (c + 1.2 * u, c - 3.6 * u), (c + 2.4 * u, c - 0.8 * u),
                      (c - 2.4 * u, c - 0.8 * u)], fill=rgb)  # fmt: skip
        draw.rectangle([c - 0.25 * u, c - 0.8 * u, c + 0.25 * u, c + 3 * u], fill=dark)
        draw.ellipse([c - 1.8 * u, c + 2.6 * u, c + 1.8 * u, c + 3.6 * u], fill=rgb)
    elif obj == "sneaker":
        upper = [(c - 3.6 * u, c + 0.2 * u), (c - 3.2 * u, c - 1.6 * u), (c - 1.6 * u, c - 1.8 * u),
                 (c - 0.2 * u, c - 0.6 * u), (c + 2 * u, c - 0.2 * u), (c + 3.6 * u, c + 0.6 * u),
                 (c + 3.6 * u, c + 1.4 * u), (c - 3.6 * u, c + 1.4 * u)]  # fmt: skip
        draw.polygon(upper, fill=rgb)
        draw.rounded_rectangle([c - 3.8 * u, c + 1.2 * u, c + 3.8 * u, c + 2 * u], radius=int(0.3 * u),
                               fill=(235, 235, 230) if sum(rgb) < 600 else (60, 60, 60))  # fmt: skip
        for k in range(3):
            x = c - 1.4 * u + k * 0.6 * u
            draw.line([(x, c - 1.2 * u + k * 0.3 * u), (x + 0.6 * u, c - 0.9 * u + k * 0.3 * u)], fill=dark,
                      width=int(0.25 * u))  # fmt: skip
    elif obj == "backpack":
        draw.rounded_rectangle([c - 2.4 * u, c - 3.2 * u, c + 2.4 * u, c + 3.4 * u], radius=int(1.4 * u), fill=rgb)
        draw.rounded_rectangle([c - 1.6 * u, c + 0.4 * u, c + 1.6 * u, c + 2.8 * u], radius=int(0.6 * u), fill=dark)
        draw.arc([c - 1 * u, c - 4.2 * u, c + 1 * u, c - 2.4 * u], 180, 360, fill=dark, width=int(0.4 * u))
    elif obj == "table":
        draw.rectangle([c - 3.8 * u, c - 1.4 * u, c + 3.8 * u, c - 0.6 * u], fill=rgb)
        w = int(0.55 * u)
        for x in (c - 3.3 * u, c + 3.3 * u - w):
            draw.rectangle([x, c - 0.6 * u, x + w, c + 3.2 * u], fill=dark)
        draw.rectangle([c - 3.3 * u, c + 1.6 * u, c + 3.3 * u, c + 1.9 * u], fill=dark)
    elif obj == "vase":
        draw.ellipse([c - 2.2 * u, c - 1 * u, c + 2.2 * u, c + 3.4 * u], fill=rgb)
        draw.polygon([(c - 0.8 * u, c - 3.2 * u), (c + 0.8 * u, c - 3.2 * u), (c + 1.4 * u, c),
                      (c - 1.4 * u, c)], fill=rgb)  # fmt: skip
        draw.ellipse([c - 1.1 * u, c - 3.6 * u, c + 1.1 * u, c - 2.8 * u], fill=dark)
    elif obj == "cap":
        draw.chord([c - 2.8 * u, c - 2.6 * u, c + 2.4 * u, c + 2.4 * u], 180, 360, fill=rgb)
        draw.polygon([(c + 1.6 * u, c - 0.3 * u), (c + 4 * u, c + 0.2 * u), (c + 3.8 * u, c + 0.7 * u),
                      (c - 2.8 * u, c + 0.3 * u), (c - 2.8 * u, c - 0.1 * u)], fill=dark)  # fmt: skip
        draw.ellipse([c - 0.4 * u, c - 2.9 * u, c + 0.2 * u, c - 2.4 * u], fill=dark)
    else:
        raise ValueError(obj)


def render(rng: random.Random, obj: str, colour: str, background: str) -> np.ndarray:
    return render_with_mask(rng, obj, colour, background)[0]


def render_with_mask(rng: random.Random, obj: str, colour: str, background: str) -> tuple[np.ndarray, np.ndarray]:
    """``render``'s image (the same random draws, the same pixels) and the object's coverage: (128, 128) uint8
    alpha, 255 on the object, 0 on the backdrop and its contact shadow, soft along the anti-aliased edge."""
    s = SIZE * SUPER
    canvas = _background(rng, background)
    rgb = _shade(COLOURS[colour][0], rng.uniform(0.9, 1.08))
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    _draw_object(ImageDraw.Draw(layer), obj, rgb, s)
    scale = rng.uniform(0.62, 0.9)
    angle = rng.uniform(-15, 15)
    layer = layer.rotate(angle, resample=Image.BICUBIC, center=(s / 2, s / 2))
    size = int(s * scale)
    layer = layer.resize((size, size), Image.LANCZOS)
    dx = int(rng.uniform(-0.1, 0.1) * s + (s - size) / 2)
    dy = int(rng.uniform(-0.08, 0.08) * s + (s - size) / 2)
    # light from the upper left: the object darkens towards its lower right
    arr = np.asarray(layer).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    arr[..., :3] *= (1.12 - 0.28 * (0.6 * xx + 0.4 * yy))[..., None]
    layer = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")
    # contact shadow: a blurred ellipse under the object's footprint
    alpha = np.asarray(layer)[..., 3]
    rows = np.nonzero(alpha.max(axis=1) > 0)[0]
    cols = np.nonzero(alpha.max(axis=0) > 0)[0]
    shadow = Image.new("L", (s, s), 0)
    if len(rows) and len(cols):
        bottom = dy + rows[-1]
        left, right = dx + cols[0], dx + cols[-1]
        ImageDraw.Draw(shadow).ellipse([left, bottom - 0.03 * s, right, bottom + 0.04 * s], fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(0.02 * s))
    canvas.paste(Image.new("RGB", (s, s), (0, 0, 0)), (0, 0), shadow)
    canvas.paste(layer, (dx, dy), layer)
    coverage = Image.new("L", (s, s), 0)
    coverage.paste(layer.getchannel("A"), (dx, dy))
    image = canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(image), np.asarray(coverage.resize((SIZE, SIZE), Image.Resampling.BOX))


def _triple(rng: random.Random, split: str) -> tuple[str, str, str]:
    """'train' avoids held-out triples; 'heldout' draws only them; other splits draw any."""
    if split == "heldout":
        return rng.choice(sorted(HELD_OUT))
    while True:
        obj, colour, background = rng.choice(OBJECT_NAMES), rng.choice(COLOUR_NAMES), rng.choice(BACKGROUND_NAMES)
        if split != "train" or (obj, colour, background) not in HELD_OUT:
            return obj, colour, background


def sample(split: str, seed: int, index: int) -> Sample:
    """Sample ``index`` of a split (deterministic from split, seed and index)."""
    rng = random.Random(f"{split}:{seed}:{index}")
    obj, colour, background = _triple(rng, split)
    image = render(rng, obj, colour, background)
    caption = caption_for(rng, obj, colour, background, TRAIN_TEMPLATES)
    return Sample(image=image, caption=caption, obj=obj, colour=colour, background=background)


def backdrop(split: str, seed: int, index: int) -> np.ndarray:
    """The studio backdrop of sample ``index`` without its object or shadow (the same random draws)."""
    rng = random.Random(f"{split}:{seed}:{index}")
    _, _, background = _triple(rng, split)
    return np.asarray(_background(rng, background).resize((SIZE, SIZE), Image.LANCZOS))


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    obj: str
    colour: str
    background: str
    subset: str  # held_out_combination | held_out_paraphrase | paraphrase


def eval_prompts() -> list[EvalPrompt]:
    """The fixed evaluation set: every held-out triple twice (a training template, an unseen template)
    and as many seen triples again with unseen templates."""
    rng = random.Random("eval-prompts-v1")
    out = []
    for o, c, b in sorted(HELD_OUT):
        out.append(EvalPrompt(caption_for(rng, o, c, b, EVAL_SEEN_TEMPLATES), o, c, b, "held_out_combination"))
        out.append(EvalPrompt(caption_for(rng, o, c, b, EVAL_TEMPLATES), o, c, b, "held_out_paraphrase"))
    seen = [
        (o, c, b) for o in OBJECT_NAMES for c in COLOUR_NAMES for b in BACKGROUND_NAMES if (o, c, b) not in HELD_OUT
    ]
    for o, c, b in rng.sample(seen, len(HELD_OUT) * 2):
        out.append(EvalPrompt(caption_for(rng, o, c, b, EVAL_TEMPLATES), o, c, b, "paraphrase"))
    return out
