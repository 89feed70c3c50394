"""mgpt_train.data curriculum: mixtures, lr schedule, stages, exact resume, data-parallel shards,
apply_trainable, per-tag evaluation and config errors."""

import json
import math

import pytest
import torch

from mgpt_train.data import (
    ByteTokenizer,
    Curriculum,
    CurriculumStage,
    ImageProcessorConfig,
    Sample,
    SampleEncoder,
    apply_trainable,
    default_curriculum,
    evaluate_by_tag,
    make_synthetic,
    parameter_part,
)
from mgpt_train.data.prefetch import Prefetcher

TOK = ByteTokenizer()
ENCODER = SampleEncoder(TOK, ImageProcessorConfig.tiny())


def numbered(tag, count, start=0, filler=""):
    """Text samples whose answer is their unique number, so a batch's samples can be identified."""
    return [Sample([{"role": "user", "content": f"item{filler}"}, {"role": "assistant", "content": f"#{i}#"}], tag=tag)
            for i in range(start, start + count)]


def ids_in(batch):
    text = TOK.decode(batch["input_ids"].tolist())
    return [int(piece.split("#")[0]) for piece in text.split("assistant\n#")[1:]]


DATA = numbered("vertical/gauge", 60) + numbered("vertical/sign", 40, 100) + numbered("general/count", 80, 200)


def tag_of(number):
    return "vertical/gauge" if number < 100 else "vertical/sign" if number < 200 else "general/count"


def test_mixture_proportions():
    stage = CurriculumStage("s", {"vertical": 3.0, "general": 1.0, "vertical/sign": 1.0}, steps=120, max_tokens=400)
    drawn = [n for _, batch in Curriculum([stage], DATA, ENCODER, seed=3) for n in ids_in(batch)]
    # a draw picks "vertical" w.p. 3/5 (then gauge:sign = 60:40 of its pool), "general" 1/5, "vertical/sign" 1/5
    expected = {"vertical/gauge": 0.6 * 0.6, "vertical/sign": 0.6 * 0.4 + 0.2, "general/count": 0.2}
    assert len(drawn) > 1200
    for tag, share in expected.items():
        assert abs(sum(tag_of(n) == tag for n in drawn) / len(drawn) - share) < 0.05, tag


def test_pool_walked_without_replacement_and_dp_shards_disjoint():
    stage = CurriculumStage("s", {"general": 1.0}, steps=20, max_tokens=150)
    ranks = [[n for _, b in Curriculum([stage], DATA, ENCODER, seed=1, dp_rank=r, dp_size=2) for n in ids_in(b)]
             for r in range(2)]
    assert all(len(drawn) > 40 for drawn in ranks)
    first_pass = [drawn[:40] for drawn in ranks]  # each rank's shard is 40 of the 80 general samples
    assert all(len(set(p)) == 40 for p in first_pass)
    assert set(first_pass[0]) | set(first_pass[1]) == set(range(200, 280))
    assert all(tag_of(n) == "general/count" for n in ranks[0] + ranks[1])


def test_lr_schedule_values():
    stage = CurriculumStage("s", {"general": 1.0}, steps=21, peak_lr=1e-3, min_lr=1e-4, warmup_ratio=0.1)
    lrs = [stage.lr_at(step, 21) for step in range(21)]
    warmup = round(0.1 * 21)  # 2 steps
    assert lrs[:warmup] == pytest.approx([1e-3 * (s + 1) / warmup for s in range(warmup)])
    for step in range(warmup, 21):
        progress = (step - warmup) / (21 - warmup - 1)
        assert lrs[step] == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi * progress)) / 2)
    assert lrs[warmup] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4) and lrs[11] == pytest.approx(5.5e-4)
    with pytest.raises(ValueError, match="step must be in"):
        stage.lr_at(21, 21)


def test_stage_switching_epochs_and_positions():
    stages = [
        CurriculumStage("one", {"vertical": 1.0}, steps=3, max_tokens=200, peak_lr=1.0, min_lr=0.5, warmup_ratio=0),
        CurriculumStage("two", {"general": 1.0}, epochs=1.5, max_tokens=200, peak_lr=0.1, min_lr=0.1),
    ]
    curriculum = Curriculum(stages, DATA, ENCODER, seed=0)
    general_tokens = sum(ENCODER.num_tokens(s) for s in DATA if s.tag.startswith("general"))
    assert curriculum.stage_steps == [3, math.ceil(1.5 * general_tokens / 200)]
    seen = []
    for stage, batch in curriculum:
        seen.append((stage.name, curriculum.position["global_step"], curriculum.lr))
        assert {tag.split("/")[0] for tag in batch["sample_tags"]} == {"vertical" if stage.name == "one" else "general"}
        assert batch["input_ids"].numel() <= 200
    assert [name for name, _, _ in seen] == ["one"] * 3 + ["two"] * curriculum.stage_steps[1]
    assert [step for _, step, _ in seen] == list(range(curriculum.total_steps))
    assert [lr for _, _, lr in seen[:3]] == pytest.approx([1.0, 0.75, 0.5])
    assert all(lr == pytest.approx(0.1) for _, _, lr in seen[3:])
    with pytest.raises(StopIteration):
        next(curriculum)


def test_micro_batches_share_their_step_lr_and_position_and_resume_mid_step():
    """micro_batches=3 (gradient accumulation): three yields per optimizer step, with that step's learning rate
    and position (micro_batch 0, 1, 2); an epochs stage counts steps of three micro-batches; a state taken in the
    middle of a step resumes the same stream; every micro-batch is a full packed batch."""
    stages = [
        CurriculumStage("one", {"vertical": 1.0}, steps=3, max_tokens=200, peak_lr=1.0, min_lr=0.5, warmup_ratio=0),
        CurriculumStage("two", {"general": 1.0}, epochs=1.5, max_tokens=200, peak_lr=0.1, min_lr=0.1),
    ]

    def build(micro_batches=3):
        return Curriculum(stages, DATA, ENCODER, seed=2, dp_rank=0, dp_size=2, micro_batches=micro_batches)

    curriculum = build()
    general_tokens = sum(ENCODER.num_tokens(s) for s in DATA if s.tag.startswith("general"))
    assert curriculum.stage_steps == [3, math.ceil(1.5 * general_tokens / (200 * 2 * 3))]
    items, seen = [], []
    for item in curriculum:
        items.append(item)
        seen.append((curriculum.position["global_step"], curriculum.position["micro_batch"], curriculum.lr))
        assert 0 < item[1]["input_ids"].numel() <= 200
    assert [(step, micro) for step, micro, _ in seen] == [(k, m) for k in range(curriculum.total_steps)
                                                           for m in range(3)]
    assert [lr for _, _, lr in seen[:9]] == pytest.approx([1.0] * 3 + [0.75] * 3 + [0.5] * 3)
    ids = [n for stage, batch in items if stage.name == "one" for n in ids_in(batch)]
    assert len(ids) > 50 and len(set(ids[:50])) == 50  # one pass over this rank's 50 vertical samples first

    first = build()
    head = [next(first) for _ in range(4)]  # step 1, micro-batch 1 next
    state = json.loads(json.dumps(first.state_dict()))
    assert state["micro_batch"] == 1
    resumed = build()
    resumed.load_state_dict(state)
    assert_same_batches(head + list(resumed), items)
    with pytest.raises(ValueError, match="micro-batch 1 of its step, but this curriculum has micro_batches=1"):
        build(micro_batches=1).load_state_dict(state)
    boundary = build()
    [next(boundary) for _ in range(3)]
    other = build(micro_batches=1)
    other.load_state_dict(boundary.state_dict())  # at a step boundary: continues with one micro-batch per step
    assert other.position is None and next(other)[0].name == "one" and other.position["global_step"] == 1
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1, got 0"):
        build(micro_batches=0)


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for (stage_a, a), (stage_b, b) in zip(left, right, strict=True):
        assert stage_a.name == stage_b.name and a["sample_tags"] == b["sample_tags"]
        for key in ("input_ids", "labels", "cu_seqlens", "pixel_values", "image_grid_thw"):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stop_after", [2, 4, 5])  # inside stage one, inside stage two, at the two/three boundary
def test_resume_reproduces_the_uninterrupted_stream(stop_after):
    data = make_synthetic(120, seed=4)
    stages = default_curriculum(steps=(3, 2, 2), max_tokens=700)

    def build():
        return Curriculum(stages, data, ENCODER, seed=9, dp_rank=1, dp_size=2)

    reference = build()
    uninterrupted, positions = [], []
    for item in reference:
        uninterrupted.append(item)
        positions.append((dict(reference.position), reference.lr))
    first = build()
    head = [next(first) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # plain values: survives any checkpoint format
    assert state["pending"] is not None  # a carried-over sample is part of what must be restored
    resumed = build()
    resumed.load_state_dict(state)
    tail = []
    for item in resumed:
        tail.append(item)
        assert (resumed.position, resumed.lr) == positions[stop_after + len(tail) - 1]
    assert_same_batches(head + tail, uninterrupted)
    assert uninterrupted[0][1]["pixel_values"].shape[0] > 0  # images really went through the stream
    other_seed = Curriculum(stages, data, ENCODER, seed=10, dp_rank=1, dp_size=2)
    with pytest.raises(ValueError, match="seed is 9 in the state, 10 here"):
        other_seed.load_state_dict(state)
    resized = Curriculum(stages, data, ENCODER, seed=9, dp_rank=1, dp_size=3)
    with pytest.raises(ValueError, match="dp_size is 2 in the state, 3 here"):
        resized.load_state_dict(state)
    resized.load_state_dict(state, strict=False)  # same schedule position on a new data-parallel layout
    rest = list(resized)
    assert [stage.name for stage, _ in rest] == [stage.name for stage, _ in uninterrupted[stop_after:]]
    assert resized.position == positions[-1][0]


def test_default_curriculum_stages():
    one, two, three = default_curriculum(steps=(5, 4, 3), peak_lr=1e-3, max_tokens=512, min_lr_ratio=0.2)
    assert [s.name for s in (one, two, three)] == ["domain_injection", "general_recovery", "consolidation"]
    assert one.mixture["vertical"] > one.mixture["general"] and two.mixture["general"] > two.mixture["vertical"]
    assert three.mixture["vertical"] == three.mixture["general"]
    assert one.trainable == {"vision": True, "merger": True, "language": True}
    assert two.trainable["vision"] is three.trainable["vision"] is False and two.trainable["language"]
    assert one.peak_lr == 1e-3 > two.peak_lr > three.peak_lr
    assert all(s.min_lr == pytest.approx(0.2 * s.peak_lr) and s.max_tokens == 512 for s in (one, two, three))
    assert [s.steps for s in (one, two, three)] == [5, 4, 3]


class TinyVL(torch.nn.Module):
    """Hugging Face Qwen3-VL-like parameter names."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.patch_embed = torch.nn.Linear(4, 4)
        self.visual.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        self.visual.merger = torch.nn.Linear(4, 3)
        self.visual.deepstack_merger_list = torch.nn.ModuleList([torch.nn.Linear(4, 2)])
        self.language_model = torch.nn.Module()
        self.language_model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 5)])
        self.visualizer = torch.nn.Linear(1, 1)  # not the vision tower: "visual" must be a whole module name
        self.lm_head = torch.nn.Linear(5, 7, bias=False)


def test_apply_trainable_by_hf_names():
    wrapped = torch.nn.Module()
    wrapped.model = TinyVL()  # names gain a "model." prefix, as in HF's ForConditionalGeneration
    expected_part = {"visual.patch_embed": "vision", "visual.blocks": "vision", "visual.merger": "merger",
                     "visual.deepstack_merger_list": "merger", "language_model": "language", "visualizer": "language",
                     "lm_head": "language"}
    for name, _ in wrapped.named_parameters():
        assert parameter_part(name) == next(p for k, p in expected_part.items() if name.startswith("model." + k))
    for trainable in ({"vision": False}, {"vision": False, "merger": False}, {"language": False}, {}):
        stage = CurriculumStage("s", {"x": 1.0}, steps=1, trainable=trainable)
        counts = apply_trainable(wrapped, stage)
        for name, parameter in wrapped.named_parameters():
            assert parameter.requires_grad == trainable.get(parameter_part(name), True), name
        for part in ("vision", "merger", "language"):
            total = sum(p.numel() for n, p in wrapped.named_parameters() if parameter_part(n) == part)
            assert counts[part] == (total if trainable.get(part, True) else 0)
    apply_trainable(wrapped, {"merger": False})
    assert not wrapped.model.visual.merger.weight.requires_grad and wrapped.model.visual.blocks[0].weight.requires_grad


def test_evaluate_by_tag():
    heldout = make_synthetic(40, seed=2, split="heldout")

    def oracle(batch):
        return torch.where(batch["labels"] == -100, 0, batch["labels"])

    def wrong_on_vertical(batch):
        predicted = oracle(batch)
        bounds = batch["cu_seqlens"].tolist()
        for index, tag in enumerate(batch["sample_tags"]):
            if tag.startswith("vertical/"):
                labels = batch["labels"][bounds[index] : bounds[index + 1]]
                last_answer = bounds[index] + int((labels != -100).nonzero().max())
                predicted[last_answer] = TOK.eos_id  # the answer ends without <|im_end|>: not an exact match
        return predicted

    perfect = evaluate_by_tag(oracle, heldout, ENCODER, max_tokens=600)
    assert set(perfect.values()) == {1.0}
    assert {"all", "vertical", "general"} <= set(perfect) and {s.tag for s in heldout} <= set(perfect)
    scores = evaluate_by_tag(wrong_on_vertical, heldout, ENCODER, max_tokens=600)
    share_general = sum(s.tag.startswith("general") for s in heldout) / len(heldout)
    assert scores["vertical"] == 0.0 and scores["general"] == 1.0 and scores["all"] == pytest.approx(share_general)
    with pytest.raises(ValueError, match="one token per position"):
        evaluate_by_tag(lambda batch: batch["input_ids"][:-1], heldout, ENCODER, max_tokens=600)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mixture": {"vertical": 0.0}}, "weight of 'vertical' must be a finite number > 0"),
        ({"mixture": {"vertical": -1.0}}, "must be a finite number > 0"),
        ({"mixture": {"vertical": float("nan")}}, "must be a finite number > 0"),
        ({"mixture": {}}, "at least one tag prefix"),
        ({"steps": None}, "exactly one of steps or epochs"),
        ({"epochs": 1.0}, "exactly one of steps or epochs"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"max_sample_tokens": 9999}, "max_sample_tokens must be in"),
        ({"min_lr": 1.0}, "min_lr <= peak_lr"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be in"),
        ({"trainable": {"vison": False}}, "unknown trainable parts"),
        ({"trainable": {"vision": False, "merger": False, "language": False}}, "nothing would train"),
    ],
)
def test_stage_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurriculumStage(**{"name": "bad", "mixture": {"vertical": 1.0}, "steps": 2, "max_tokens": 100, **kwargs})


def test_curriculum_config_errors():
    def stage(**kwargs):
        return CurriculumStage(**{"name": "s", "mixture": {"vertical": 1.0}, "steps": 2, "max_tokens": 100, **kwargs})

    with pytest.raises(ValueError, match="prefix 'vertical/gauges' matches no sample tag"):
        Curriculum([stage(mixture={"vertical/gauges": 1.0})], DATA, ENCODER)
    long_data = DATA + numbered("vertical/gauge", 2, 1000, filler="x" * 200)
    with pytest.raises(ValueError, match="tokens, more than max_tokens=100; raise max_tokens or set max_sample_tokens"):
        Curriculum([stage()], long_data, ENCODER)
    filtered = Curriculum([stage(max_sample_tokens=100, steps=5)], long_data, ENCODER)
    assert all(n < 1000 for _, batch in filtered for n in ids_in(batch))
    with pytest.raises(ValueError, match="fewer than dp_size=64"):
        Curriculum([stage(mixture={"vertical/sign": 1.0})], DATA, ENCODER, dp_rank=0, dp_size=64)
    with pytest.raises(ValueError, match="stage names must be unique"):
        Curriculum([stage(), stage()], DATA, ENCODER)
    with pytest.raises(ValueError, match="dp_rank < dp_size"):
        Curriculum([stage()], DATA, ENCODER, dp_rank=2, dp_size=2)


# ------------------------------------------------------------------------------------------------------------
# Prefetcher: the curriculum in a background thread
# ------------------------------------------------------------------------------------------------------------
def prefetch_stages():
    return [CurriculumStage("one", {"vertical": 1.0}, steps=3, max_tokens=200),
            CurriculumStage("two", {"general": 1.0}, steps=3, max_tokens=200)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_yields_the_inline_stream_and_resumable_states(depth):
    reference = Curriculum(prefetch_stages(), DATA, ENCODER, seed=4, micro_batches=2)
    expected = []
    for item in reference:
        expected.append((item, dict(reference.position), reference.lr))
    prefetcher = Prefetcher(Curriculum(prefetch_stages(), DATA, ENCODER, seed=4, micro_batches=2), depth)
    got = list(prefetcher)
    assert_same_batches([(p.stage, p.batch) for p in got], [item for item, _, _ in expected])
    assert [(p.position, p.lr) for p in got] == [(position, lr) for _, position, lr in expected]
    with pytest.raises(StopIteration):
        next(prefetcher)
    # the state handed out with micro-batch k resumes at micro-batch k + 1, whatever the thread ran ahead to
    resumed = Curriculum(prefetch_stages(), DATA, ENCODER, seed=4, micro_batches=2)
    resumed.load_state_dict(got[4].state)
    assert_same_batches(list(resumed), [item for item, _, _ in expected[5:]])
    prefetcher.close()


def test_prefetcher_raises_the_threads_error_and_stops_on_close():
    curriculum = Curriculum(prefetch_stages(), DATA, ENCODER, seed=4)
    calls = {"n": 0}
    encode = curriculum.encoder.batch

    class BrokenEncoder:
        def batch(self, samples):
            calls["n"] += 1
            if calls["n"] == 3:
                raise FileNotFoundError("image file gone.png")
            return encode(samples)

    curriculum.encoder = BrokenEncoder()
    prefetcher = Prefetcher(curriculum, depth=2)
    next(prefetcher), next(prefetcher)
    for _ in range(2):  # and again: the stream stays failed
        with pytest.raises(FileNotFoundError, match="image file gone.png"):
            next(prefetcher)
    blocked = Prefetcher(Curriculum(prefetch_stages(), DATA, ENCODER, seed=4), depth=1)
    next(blocked)  # the thread now waits on a full queue
    blocked.close()
    assert not blocked._thread.is_alive()
    with pytest.raises(ValueError, match="depth must be an int >= 0, got -1"):
        Prefetcher(curriculum, depth=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA (MGPT_TEST_DEVICE=cuda runs)")
def test_prefetcher_pins_batches_for_the_given_device():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    prefetcher = Prefetcher(Curriculum(prefetch_stages(), DATA, ENCODER, seed=4), depth=2, pin_device=device)
    item = next(prefetcher)
    assert all(v.is_pinned() for v in item.batch.values() if torch.is_tensor(v))
    prefetcher.close()


def test_prefetcher_pin_device_must_be_cuda():
    with pytest.raises(ValueError, match="pin_device must be a CUDA device or None, got cpu"):
        Prefetcher(Curriculum(prefetch_stages(), DATA, ENCODER, seed=4), pin_device=torch.device("cpu"))
