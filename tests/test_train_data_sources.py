"""mgpt_train.data sources: the synthetic dataset (determinism, splits, answers checked from pixels) and JSONL."""

import json
import math
import re
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from mgpt_train.data import ByteTokenizer, ImageProcessorConfig, SampleEncoder, load_jsonl, make_synthetic, patchify
from mgpt_train.data import synthetic as syn

TOK = ByteTokenizer()
TINY = ImageProcessorConfig.tiny()


def by_tag(samples, tag):
    return [s for s in samples if s.tag == tag]


def question_answer(sample):
    return sample.messages[-2]["content"].replace("<image>", ""), sample.messages[-1]["content"]


def pixels(image):
    return np.asarray(image, dtype=np.int64)


def colour_mask(image, rgb):
    return (pixels(image) == np.asarray(rgb)).all(-1)


def components(mask):
    """4-connected components of a boolean mask (plain BFS)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


@pytest.fixture(scope="module")
def train():
    return make_synthetic(600, seed=7)


def test_synthetic_deterministic_and_seeded(train):
    again = make_synthetic(40, seed=7)
    other = make_synthetic(40, seed=8)
    for a, b in zip(train[:40], again, strict=True):
        assert a.messages == b.messages and a.tag == b.tag
        assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert [s.messages for s in train[:40]] != [s.messages for s in other]


def test_synthetic_covers_tasks_sizes_and_splits(train):
    assert {s.tag for s in train} == set(syn.TASKS)
    assert any(not s.images for s in train) and any(len(s.images) == 2 for s in train)
    sizes = [side for s in train for im in s.images for side in im.size]
    assert min(sizes) >= 32 and max(sizes) <= 96 and len(set(sizes)) > 20
    heldout = make_synthetic(200, seed=7, split="heldout")
    def key(sample):
        return question_answer(sample), tuple(image.tobytes() for image in sample.images)

    assert not {key(s) for s in train} & {key(s) for s in heldout}
    assert {s.tag.split("/")[0] for s in heldout} == {"vertical", "general"}
    with pytest.raises(ValueError, match="unknown or no task tags"):
        make_synthetic(1, tags=("vertical/nope",))
    with pytest.raises(ValueError, match="split must be one of"):
        make_synthetic(1, split="test")


def test_synthetic_counts_colours_shapes_from_pixels(train):
    for sample in by_tag(train, "general/count"):
        image = sample.images[0]
        assert components((pixels(image) != 255).any(-1)) == int(question_answer(sample)[1])
    for sample in by_tag(train, "general/color"):
        foreground = pixels(sample.images[0])[(pixels(sample.images[0]) != 255).any(-1)]
        assert (foreground == np.asarray(syn.PALETTE[question_answer(sample)[1]])).all()
    fill_ratio = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
    for sample in by_tag(train, "general/shape"):
        mask = (pixels(sample.images[0]) != 255).any(-1)
        ys, xs = np.nonzero(mask)
        ratio = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert abs(ratio - fill_ratio[question_answer(sample)[1]]) < 0.1


def needle_speed(image):
    """Speed read back from the red needle's pixels: the angle of their centroid around the image centre."""
    ys, xs = np.nonzero(colour_mask(image, syn.NEEDLE))
    centre = (image.width - 1) / 2
    angle = math.degrees(math.atan2(-(ys.mean() - centre), xs.mean() - centre))
    speed = (syn.DIAL_START_DEG - angle) % 360 / syn.DIAL_SWEEP_DEG * syn.SPEED_MAX
    return round(speed / syn.SPEED_STEP) * syn.SPEED_STEP


def test_synthetic_vertical_answers_from_pixels(train):
    for sample in by_tag(train, "vertical/gauge"):
        assert f"{needle_speed(sample.images[0])} km/h" == question_answer(sample)[1]
    for sample in by_tag(train, "vertical/compare"):
        first, second = (needle_speed(image) for image in sample.images)
        assert first != second and question_answer(sample)[1] == ("first" if first > second else "second")
    for sample in by_tag(train, "vertical/battery"):
        lit = components(colour_mask(sample.images[0], syn.LIT_SEGMENT))
        assert question_answer(sample)[1] == f"{lit * 20}%"
    for sample in by_tag(train, "vertical/gear"):
        image = sample.images[0]
        xs = np.nonzero(colour_mask(image, syn.GEAR_HIGHLIGHT))[1]
        assert question_answer(sample)[1] == syn.GEARS[int(xs.mean() // (image.width / len(syn.GEARS)))]
    for sample in by_tag(train, "vertical/sign"):
        answer = question_answer(sample)[1]
        assert answer in syn.SIGN_MEANINGS or re.fullmatch(r"speed limit \d+", answer)
        assert sign_kind(sample.images[0]) == re.sub(r" \d+$", "", answer)


def sign_kind(image):
    """The sign's kind from a few probe pixels (relative to the centre, in radii) and its yellow area."""
    centre, radius = (image.width - 1) / 2, image.width / 2 - 2
    red = np.asarray(syn.PALETTE["red"])

    def is_red(dx, dy):
        return (pixels(image)[round(centre + dy * radius), round(centre + dx * radius)] == red).all()

    if colour_mask(image, syn.PALETTE["yellow"]).mean() > 0.2:
        return "warning"
    if is_red(0, 0):
        return "stop"
    if is_red(0, -0.4):
        return "no entry"
    return "speed limit" if is_red(0, -0.9) else "yield"


def test_synthetic_text_answers(train):
    for sample in by_tag(train, "general/arith"):
        question, answer = question_answer(sample)
        a, op, b = re.fullmatch(r"What is (\d+) (\+|times) (\d+)\?", question).groups()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    for sample in by_tag(train, "vertical/knowledge"):
        question, answer = question_answer(sample)
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        if "km/h" in question:
            assert answer == f"{numbers[0] * numbers[1]} km"
        elif "kWh" in question:
            assert answer == f"{numbers[0] * numbers[2] // 100} kWh"
        else:
            assert syn.SIGN_MEANINGS[answer] in question


# ---------------------------------------------------------------------------------------------- JSONL


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records) + "\n")


def test_jsonl_loads_and_encodes(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "imgs").mkdir()
    arrays = [rng.integers(0, 256, (40 + 7 * i, 70 - 5 * i, 3), dtype=np.uint8) for i in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / "imgs" / f"{i}.png")
    write_jsonl(tmp_path / "data.jsonl", [
        {"messages": [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "no"}],
         "images": ["imgs/0.png", "imgs/1.png"], "tags": ["vertical", "cockpit"]},
        "",
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
         "images": [str(tmp_path / "imgs" / "2.png")], "tags": ["general"]},
    ])
    samples = load_jsonl(tmp_path / "data.jsonl", default_tag="general/chat")
    assert [s.tag for s in samples] == ["vertical/cockpit", "general/chat", "general"]
    encoded = SampleEncoder(TOK, TINY).encode(samples[0])
    expected = torch.cat([patchify(Image.fromarray(a), TINY)[0] for a in arrays[:2]])
    assert torch.equal(encoded.pixel_values, expected)
    assert "Same?" in TOK.decode(encoded.input_ids.tolist()) and encoded.image_grid_thw.shape == (2, 3)


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "data.jsonl:1: invalid JSON"),
        ('{"messages": "hi", "tags": ["a"]}', "'messages' list"),
        ('{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], '
         '"images": ["missing.png"], "tags": ["a"]}', "image files not found"),
        ('{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], '
         '"tags": ["a"]}', "1 '<image>' placeholders but 0 images"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}]}', "no 'tags'"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], "tags": []}',
         "'tags' must be a non-empty list"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, match):
    write_jsonl(tmp_path / "data.jsonl", [line])
    with pytest.raises(ValueError, match=re.escape(match)):
        load_jsonl(tmp_path / "data.jsonl")
