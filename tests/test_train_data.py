"""mgpt_train.data: tokenizer and chat format, HF-layout patches, shifted answer labels, packing, batch contract."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mgpt_train.data import (
    ByteTokenizer,
    ImageProcessorConfig,
    Sample,
    SampleEncoder,
    collate,
    pack_greedy,
    patchify,
    smart_resize,
)

TOK = ByteTokenizer()
TINY = ImageProcessorConfig.tiny()


def random_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


# ---------------------------------------------------------------------------------------------- tokenizer


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_tokenizer_round_trip_and_no_special_injection(text):
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text


def test_tokenizer_ids_and_vocab():
    special = [TOK.pad_id, TOK.eos_id, TOK.im_start_id, TOK.im_end_id, TOK.vision_start_id, TOK.vision_end_id,
               TOK.image_token_id]
    assert len(set(special)) == len(special) and min(special) >= 256 and max(special) < TOK.vocab_size
    assert TOK.vocab_size % 64 == 0
    assert TOK.encode("<|im_end|>") == list(b"<|im_end|>")
    last = TOK.vocab_size - 1
    assert TOK.decode([TOK.im_start_id, 104, 105, last]) == f"<|im_start|>hi<|reserved_{last}|>"
    with pytest.raises(ValueError, match="outside"):
        TOK.decode([TOK.vocab_size])
    with pytest.raises(TypeError, match="'text' must be a str"):
        TOK.encode(b"bytes")


def test_chat_format_matches_qwen_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Look: <image> and <image>?"},
        {"role": "assistant", "content": "Two gauges."},
    ]
    ids = TOK.apply_chat(messages, image_token_counts=[2, 1], add_generation_prompt=False)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nLook: <|vision_start|><|image_pad|><|image_pad|><|vision_end|> and "
        "<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n"
        "<|im_start|>assistant\nTwo gauges.<|im_end|>\n"
    )
    assert TOK.decode(ids) == expected
    prompt = TOK.apply_chat(messages[:2], [2, 1], add_generation_prompt=True)
    assert TOK.decode(prompt) == expected[: expected.index("Two")]


@pytest.mark.parametrize(
    "messages, counts, match",
    [
        ([{"role": "user", "content": "<image><image>"}], [3], "more '<image>' placeholders"),
        ([{"role": "user", "content": "<image>"}], [3, 4], "2 image token counts given"),
        ([{"role": "robot", "content": "x"}], [], "role must be one of"),
        ([{"role": "user", "content": ["x"]}], [], "content must be a str"),
        ([{"content": "x"}], [], "must be a dict with 'role' and 'content'"),
    ],
)
def test_chat_errors(messages, counts, match):
    with pytest.raises(ValueError, match=re.escape(match) if "'" in match else match):
        TOK.apply_chat(messages, counts)


# ---------------------------------------------------------------------------------------------- images

HF_CASES = [
    # (config, image sizes); Qwen3-VL layout with a small budget, then Qwen2-VL's defaults (patch 14, CLIP stats)
    (ImageProcessorConfig(min_pixels=32 * 32, max_pixels=96 * 96), [(37, 91), (64, 64), (20, 20), (300, 41)]),
    (ImageProcessorConfig(), [(50, 70)]),  # Qwen3-VL defaults: upscaled to >= 65536 pixels
    (ImageProcessorConfig(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                          image_mean=(0.48145466, 0.4578275, 0.40821073),
                          image_std=(0.26862954, 0.26130258, 0.27577711)), [(61, 113), (1200, 900)]),
]


@pytest.mark.parametrize("config, sizes", HF_CASES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_patchify_matches_transformers(config, sizes, mode):
    from transformers import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(
        patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size, merge_size=config.merge_size,
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        image_mean=list(config.image_mean), image_std=list(config.image_std),
    )
    rng = np.random.default_rng(len(sizes))
    images = [random_image(rng, h, w, mode) for h, w in sizes]
    expected = hf(images=images, return_tensors="pt")
    ours = [patchify(image, config) for image in images]
    assert torch.equal(torch.cat([pixels for pixels, _ in ours]), expected["pixel_values"].float())
    assert torch.equal(torch.tensor([grid for _, grid in ours]), expected["image_grid_thw"])
    assert ours[0][0].dtype == torch.float32 and ours[0][0].shape[1] == config.patch_dim


def test_patchify_accepts_arrays_and_paths(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (45, 77, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    reference = patchify(Image.fromarray(pixels), TINY)
    for source in (pixels, tmp_path / "a.png", str(tmp_path / "a.png")):
        got = patchify(source, TINY)
        assert torch.equal(got[0], reference[0]) and got[1] == reference[1]
    with pytest.raises(ValueError, match="must be uint8"):
        patchify(pixels.astype(np.float32), TINY)
    with pytest.raises(TypeError, match="expected a PIL image"):
        patchify([1, 2, 3], TINY)


def test_patch_layout_merge_blocks_contiguous():
    """Independent of transformers: pixel values encode their own (y, x), so every patch's origin is readable."""
    config = ImageProcessorConfig(patch_size=4, merge_size=2, min_pixels=16, max_pixels=64 * 64,
                                  image_mean=(0, 0, 0), image_std=(1, 1, 1))
    height, width = 16, 24  # multiples of patch * merge = 8: no resize
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([y * 10, x * 10, (y + x) % 7], axis=-1).astype(np.uint8)
    pixel_values, grid = patchify(image, config)
    assert grid == (1, 4, 6)
    patches = pixel_values.reshape(-1, 3, 2, 4, 4)  # [patch, channel, time, py, px]
    assert torch.equal(patches[:, :, 0], patches[:, :, 1])  # the image repeated in time
    origin_y = torch.round(patches[:, 0, 0, 0, 0] * 255 / 10).long()
    origin_x = torch.round(patches[:, 1, 0, 0, 0] * 255 / 10).long()
    order = []
    for block_row in range(2):
        for block_col in range(3):
            for inner_row in range(2):
                for inner_col in range(2):
                    order.append(((block_row * 2 + inner_row) * 4, (block_col * 2 + inner_col) * 4))
    assert list(zip(origin_y.tolist(), origin_x.tolist(), strict=True)) == order


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.sampled_from([28, 32]), st.integers(1, 4000))
def test_smart_resize_budget_and_transformers_agree(height, width, factor, budget_side):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width, factor, factor * factor, factor * factor * 4)
        return
    min_pixels, max_pixels = factor * factor, max(factor * factor, budget_side * 64)
    h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert (h, w) == hf_smart_resize(height, width, factor, min_pixels, max_pixels)
    assert h % factor == 0 and w % factor == 0 and h * w >= min_pixels


def test_image_config_errors():
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessorConfig(min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        ImageProcessorConfig(patch_size=0)


# ---------------------------------------------------------------------------------------------- labels, packing


def chat_sample(rng: np.random.Generator) -> Sample:
    """A multi-turn sample with 0-2 images per user turn and random texts."""
    messages, images = [], []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "sys " * int(rng.integers(0, 3))})
    for _ in range(int(rng.integers(1, 3))):
        n_images = int(rng.integers(0, 3))
        images += [random_image(rng, int(rng.integers(20, 80)), int(rng.integers(20, 80))) for _ in range(n_images)]
        messages.append({"role": "user", "content": "<image>" * n_images + "q" * int(rng.integers(1, 9))})
        answer = "ä" * int(rng.integers(0, 5)) + "a" * int(rng.integers(1, 6))  # multi-byte characters too
        messages.append({"role": "assistant", "content": answer})
    return Sample(messages=messages, images=images, tag="general/test")


def test_labels_are_shifted_answer_tokens():
    encoder = SampleEncoder(TOK, TINY)
    rng = np.random.default_rng(0)
    for _ in range(6):
        sample = chat_sample(rng)
        encoded = encoder.encode(sample)
        ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
        assert len(ids) == len(labels) and labels[-1] == -100
        targets = [i for i, label in enumerate(labels) if label != -100]
        assert all(labels[i] == ids[i + 1] for i in targets)
        answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        # the predicted tokens, read in order, are exactly each answer followed by <|im_end|>
        assert TOK.decode([labels[i] for i in targets]) == "".join(a + "<|im_end|>" for a in answers)
        # and each answer is predicted from the end of its "<|im_start|>assistant\n" header onwards
        header = [TOK.im_start_id, *TOK.encode("assistant\n")]
        starts = [i + len(header) - 1 for i in range(len(ids)) if ids[i : i + len(header)] == header]
        assert sorted(set(starts) & set(targets)) == starts
        assert not any(ids[i + 1] == TOK.image_token_id for i in targets)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=40), st.integers(50, 120))
def test_pack_greedy_next_fit(lengths, max_tokens):
    groups = pack_greedy(lengths, max_tokens)
    assert [i for group in groups for i in group] == list(range(len(lengths)))  # order kept, nothing split
    assert all(group and sum(lengths[i] for i in group) <= max_tokens for group in groups)
    for current, following in zip(groups, groups[1:]):
        assert sum(lengths[i] for i in current) + lengths[following[0]] > max_tokens  # greedy: no room left


def test_pack_greedy_rejects_long_sample():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than max_tokens=8"):
        pack_greedy([3, 9], 8)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        pack_greedy([3], 0)


def test_collate_batch_contract():
    encoder = SampleEncoder(TOK, TINY)
    rng = np.random.default_rng(1)
    samples = [chat_sample(rng) for _ in range(8)]
    encoded = [encoder.encode(sample) for sample in samples]
    groups = pack_greedy([e.num_tokens for e in encoded], 400)
    assert len(groups) > 1
    for group in groups:
        batch = collate([encoded[i] for i in group], TINY.patch_dim)
        ids, cu, grid = batch["input_ids"], batch["cu_seqlens"], batch["image_grid_thw"]
        assert ids.dtype == batch["labels"].dtype == grid.dtype == torch.int64 and cu.dtype == torch.int32
        assert batch["pixel_values"].dtype == torch.float32 and ids.numel() <= 400
        assert cu[0] == 0 and cu[-1] == ids.numel()
        assert (cu[1:] - cu[:-1]).tolist() == [encoded[i].num_tokens for i in group]
        assert all(batch["labels"][end - 1] == -100 for end in cu[1:].tolist())
        assert int((ids == TOK.image_token_id).sum()) == int((grid.prod(-1) // TINY.merge_size**2).sum())
        assert int((ids == TOK.vision_start_id).sum()) == grid.shape[0] == sum(len(samples[i].images) for i in group)
        assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), TINY.patch_dim)
        assert batch["sample_tags"] == ["general/test"] * len(group)
    text_only = SampleEncoder(TOK, TINY).batch([Sample([{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}])])
    assert text_only["pixel_values"].shape == (0, TINY.patch_dim) and text_only["image_grid_thw"].shape == (0, 3)
    assert SampleEncoder(TOK, TINY).num_tokens(samples[0]) == encoded[0].num_tokens
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], TINY.patch_dim)


def test_sample_validation():
    with pytest.raises(ValueError, match="1 '<image>' placeholders but 0 images"):
        Sample([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="at least one assistant"):
        Sample([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="tag must be"):
        Sample([{"role": "assistant", "content": "a"}], tag="vertical//x")
