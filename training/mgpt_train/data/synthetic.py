"""A small synthetic multimodal dataset, rendered locally with PIL, deterministic from a seed.

Two domains, tagged ``domain/task``:
- ``vertical`` (in-car reading skills, the specialised domain): ``gauge`` (speedometer needle), ``battery``
  (lit charge segments), ``gear`` (highlighted P/R/N/D), ``sign`` (traffic sign meaning), ``compare`` (two
  speedometers, two images), ``knowledge`` (text only: sign facts, travel and energy arithmetic).
- ``general``: ``color``, ``shape``, ``count``, ``ocr`` (a rendered word) and ``arith`` (text only).

Images are 32-96 px (non-square for some tasks) so tiny models run fast; shapes are drawn without
anti-aliasing in the palette colours on a white background, which keeps the answers checkable from pixels.
The held-out split is disjoint from train by construction: a sample belongs to the split given by a hash of
its question, answer and image bytes (1/8 of that space is held out), so no held-out sample occurs in train.
"""

from __future__ import annotations

import hashlib
import math
import random

from PIL import Image, ImageDraw, ImageFont

from mgpt_train.data.sample import Sample

BACKGROUND = (255, 255, 255)
INK = (60, 60, 60)  # dial rims, ticks, battery outline, letters
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
NEEDLE = PALETTE["red"]
LIT_SEGMENT, UNLIT_SEGMENT = PALETTE["green"], (200, 200, 200)
GEAR_HIGHLIGHT = PALETTE["blue"]
GEARS = ("P", "R", "N", "D")
SPEED_MAX, SPEED_STEP = 200, 20
BATTERY_SEGMENTS = 5
# The dial sweeps 240 degrees: 0 km/h at 210 degrees (lower left), SPEED_MAX at -30 degrees (lower right),
# angles counter-clockwise from the +x axis with y pointing up.
DIAL_START_DEG, DIAL_SWEEP_DEG = 210.0, 240.0
SIGN_MEANINGS = {
    "stop": "a red octagon",
    "yield": "a red-bordered triangle pointing down",
    "no entry": "a red disc with a white horizontal bar",
    "warning": "a yellow diamond with a black border",
}
WORDS = (
    "apple", "river", "stone", "cloud", "light", "house", "paper", "music", "table", "water", "bread", "chair",
    "dream", "field", "glass", "horse", "lemon", "night", "ocean", "piano", "robot", "smile", "tiger", "wheel",
)
HELDOUT_BUCKETS = 8
SPLITS = ("train", "heldout")
SYSTEM_PROMPT = "You are the in-car assistant. Answer briefly."


def speed_to_angle(speed: float) -> float:
    """Needle angle in degrees for a speed (see DIAL_START_DEG)."""
    return DIAL_START_DEG - speed / SPEED_MAX * DIAL_SWEEP_DEG


def _canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, height), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _single_shape(rng: random.Random, kind: str, colour: str) -> Image.Image:
    width, height = rng.randint(32, 80), rng.randint(32, 80)
    side = rng.randint(12, min(width, height) - 4)
    x0, y0 = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
    image, draw = _canvas(width, height)
    _draw_shape(draw, kind, (x0, y0, x0 + side - 1, y0 + side - 1), PALETTE[colour])
    return image


def _color(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    colour = rng.choice(sorted(PALETTE))
    return [_single_shape(rng, rng.choice(SHAPES), colour)], "What colour is the shape?", colour


def _shape(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    kind = rng.choice(SHAPES)
    return [_single_shape(rng, kind, rng.choice(sorted(PALETTE)))], "What shape is shown?", kind


def _count(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    columns, rows = rng.randint(2, 3), rng.randint(2, 3)
    cell = rng.randint(16, 28)
    count = rng.randint(1, columns * rows)
    image, draw = _canvas(columns * cell, rows * cell)
    colour, kind = PALETTE[rng.choice(sorted(PALETTE))], rng.choice(SHAPES)
    for slot in rng.sample(range(columns * rows), count):
        # a margin of >= 2 px inside each cell keeps the shapes apart (pixel-countable as components)
        side = rng.randint(cell // 2, cell - 4)
        x0 = (slot % columns) * cell + rng.randint(2, cell - side - 2)
        y0 = (slot // columns) * cell + rng.randint(2, cell - side - 2)
        _draw_shape(draw, kind, (x0, y0, x0 + side - 1, y0 + side - 1), colour)
    return [image], "How many shapes are in the image?", str(count)


def _ocr(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    word = rng.choice(WORDS)
    font = ImageFont.load_default(size=rng.randint(12, 18))
    left, top, right, bottom = font.getbbox(word)
    pad_x, pad_y = rng.randint(2, 10), rng.randint(2, 10)
    image, draw = _canvas(max(32, right - left + 2 * pad_x), max(32, bottom - top + 2 * pad_y))
    draw.text((pad_x - left, pad_y - top), word, fill=(0, 0, 0), font=font)
    return [image], "What word is written in the image?", word


def _arith(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return [], f"What is {a} + {b}?", str(a + b)
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    return [], f"What is {a} times {b}?", str(a * b)


def _speedometer(rng: random.Random, speed: int) -> Image.Image:
    size = rng.randint(48, 96)
    image, draw = _canvas(size, size)
    centre, radius = (size - 1) / 2, size / 2 - 2
    draw.ellipse((centre - radius, centre - radius, centre + radius, centre + radius), outline=INK, width=2)
    for tick in range(0, SPEED_MAX + 1, SPEED_STEP):
        angle = math.radians(speed_to_angle(tick))
        inner, outer = radius * 0.8, radius * 0.95
        draw.line(
            [(centre + inner * math.cos(angle), centre - inner * math.sin(angle)),
             (centre + outer * math.cos(angle), centre - outer * math.sin(angle))],
            fill=INK, width=1,
        )
    angle = math.radians(speed_to_angle(speed))
    tip = (centre + 0.7 * radius * math.cos(angle), centre - 0.7 * radius * math.sin(angle))
    draw.line([(centre, centre), tip], fill=NEEDLE, width=2)
    return image


def _gauge(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    speed = rng.randrange(0, SPEED_MAX + 1, SPEED_STEP)
    return [_speedometer(rng, speed)], "What speed does the speedometer show?", f"{speed} km/h"


def _compare(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    first, second = rng.sample(range(0, SPEED_MAX + 1, SPEED_STEP), 2)
    question = "Which speedometer shows the higher speed, the first or the second?"
    return [_speedometer(rng, first), _speedometer(rng, second)], question, "first" if first > second else "second"


def _battery(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    lit = rng.randint(0, BATTERY_SEGMENTS)
    segment, gap = rng.randint(8, 14), 2
    width = BATTERY_SEGMENTS * (segment + gap) + gap + 8
    height = rng.randint(32, 48)
    image, draw = _canvas(width, height)
    top, bottom = height // 4, height - height // 4
    draw.rectangle((2, top - 2, width - 6, bottom + 2), outline=INK, width=1)
    draw.rectangle((width - 5, (top + bottom) // 2 - 3, width - 3, (top + bottom) // 2 + 3), fill=INK)
    for index in range(BATTERY_SEGMENTS):
        x0 = 4 + gap + index * (segment + gap)
        draw.rectangle((x0, top, x0 + segment - 1, bottom), fill=LIT_SEGMENT if index < lit else UNLIT_SEGMENT)
    return [image], "What is the battery charge level?", f"{lit * 100 // BATTERY_SEGMENTS}%"


def _gear(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    selected = rng.randrange(len(GEARS))
    slot = rng.randint(16, 24)
    image, draw = _canvas(slot * len(GEARS), rng.randint(32, 40))
    font = ImageFont.load_default(size=slot - 4)
    for index, letter in enumerate(GEARS):
        x0 = index * slot
        if index == selected:
            draw.rectangle((x0 + 1, 4, x0 + slot - 2, image.height - 5), fill=GEAR_HIGHLIGHT)
        draw.text((x0 + slot / 2, image.height / 2), letter, fill=BACKGROUND if index == selected else INK,
                  font=font, anchor="mm")
    return [image], "Which gear is selected?", GEARS[selected]


def _sign(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    size = rng.randint(32, 64)
    image, draw = _canvas(size, size)
    c, r = (size - 1) / 2, size / 2 - 2
    kind = rng.choice(sorted(SIGN_MEANINGS) + ["speed limit"])
    red = PALETTE["red"]
    if kind == "stop":
        points = [(c + r * math.cos(math.radians(22.5 + 45 * k)), c + r * math.sin(math.radians(22.5 + 45 * k)))
                  for k in range(8)]
        draw.polygon(points, fill=red)
    elif kind == "yield":
        draw.polygon([(c - r, c - r * 0.8), (c + r, c - r * 0.8), (c, c + r)], fill=red)
        draw.polygon([(c - r * 0.55, c - r * 0.55), (c + r * 0.55, c - r * 0.55), (c, c + r * 0.45)], fill=BACKGROUND)
    elif kind == "no entry":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=red)
        draw.rectangle((c - r * 0.7, c - r * 0.18, c + r * 0.7, c + r * 0.18), fill=BACKGROUND)
    elif kind == "warning":
        draw.polygon([(c, c - r), (c + r, c), (c, c + r), (c - r, c)], fill=(0, 0, 0))
        draw.polygon([(c, c - r * 0.8), (c + r * 0.8, c), (c, c + r * 0.8), (c - r * 0.8, c)], fill=PALETTE["yellow"])
    else:
        limit = rng.choice((30, 50, 60, 80, 100, 120))
        draw.ellipse((c - r, c - r, c + r, c + r), fill=red)
        draw.ellipse((c - r * 0.75, c - r * 0.75, c + r * 0.75, c + r * 0.75), fill=BACKGROUND)
        font = ImageFont.load_default(size=max(8, int(r * 0.8)))
        draw.text((c, c), str(limit), fill=(0, 0, 0), font=font, anchor="mm")
        kind = f"speed limit {limit}"
    return [image], "What does this traffic sign mean?", kind


def _knowledge(rng: random.Random) -> tuple[list[Image.Image], str, str]:
    topic = rng.randrange(3)
    if topic == 0:
        meaning = rng.choice(sorted(SIGN_MEANINGS))
        template = rng.choice(("What does {} mean on a traffic sign?", "A traffic sign shows {}. What does it mean?",
                               "Which instruction is given by {}?"))
        return [], template.format(SIGN_MEANINGS[meaning]), meaning
    if topic == 1:
        speed, hours = rng.randrange(30, 131, 10), rng.randint(1, 5)
        return [], f"A car drives at {speed} km/h for {hours} hours. How far does it travel?", f"{speed * hours} km"
    per_100km, distance = rng.randint(12, 25), rng.randrange(100, 901, 100)
    question = f"An electric car uses {per_100km} kWh per 100 km. How much energy does it need for {distance} km?"
    return [], question, f"{per_100km * distance // 100} kWh"


TASKS = {
    "vertical/gauge": _gauge,
    "vertical/battery": _battery,
    "vertical/gear": _gear,
    "vertical/sign": _sign,
    "vertical/compare": _compare,
    "vertical/knowledge": _knowledge,
    "general/color": _color,
    "general/shape": _shape,
    "general/count": _count,
    "general/ocr": _ocr,
    "general/arith": _arith,
}


def _split_of(question: str, answer: str, images: list[Image.Image]) -> str:
    digest = hashlib.sha256(f"{question}\x00{answer}".encode())
    for image in images:
        digest.update(image.tobytes())
    return "heldout" if digest.digest()[0] % HELDOUT_BUCKETS == 0 else "train"


def synthetic_sample(seed: int, index: int, split: str = "train", tags: tuple[str, ...] | None = None) -> Sample:
    """Sample ``index`` of the ``split`` stream for ``seed``; a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"synthetic_sample: split must be one of {SPLITS}, got {split!r}")
    tags = tuple(sorted(TASKS)) if tags is None else tags
    unknown = [tag for tag in tags if tag not in TASKS]
    if unknown or not tags:
        raise ValueError(f"synthetic_sample: unknown or no task tags {unknown}; known: {sorted(TASKS)}")
    for attempt in range(1000):
        rng = random.Random(f"mgpt-synthetic/{seed}/{split}/{index}/{attempt}")
        tag = rng.choice(tags)
        images, question, answer = TASKS[tag](rng)
        if _split_of(question, answer, images) != split:
            continue  # this draw belongs to the other split; draw again
        user = "<image>" * len(images) + question
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if tag.startswith("vertical/") and rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        return Sample(messages=messages, images=images, tag=tag)
    raise RuntimeError(f"synthetic_sample: no {split} sample found for seed {seed} index {index}")


def make_synthetic(
    num_samples: int, seed: int = 0, split: str = "train", tags: tuple[str, ...] | None = None
) -> list[Sample]:
    """``num_samples`` samples of one split (tasks drawn uniformly from ``tags``, default all of TASKS)."""
    if num_samples < 0:
        raise ValueError(f"make_synthetic: num_samples must be >= 0, got {num_samples}")
    return [synthetic_sample(seed, index, split, tags) for index in range(num_samples)]
