"""Collaborative curriculum SFT (MindGPT-4ov): stages with their own data mixture, length budget, learning-rate
schedule and trainable parts, iterated deterministically and resumably.

A stage's ``mixture`` maps tag prefixes to sampling weights: each draw first picks a prefix with probability
weight / sum(weights), then the next sample of that prefix's pool. A pool is walked without replacement in a
seeded permutation per pass ("epoch" of that pool); data-parallel ranks take disjoint shards of it
(``perm[dp_rank::dp_size]``). Drawn samples fill a micro-batch up to ``max_tokens``; the draw that does not fit
opens the next micro-batch, so every drawn sample is used and proportions are unbiased by length. Every
``micro_batches`` yielded micro-batches are one optimizer step of the stage's learning-rate schedule (gradient
accumulation; 1 by default).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mgpt_train.data.packing import SampleEncoder
from mgpt_train.data.sample import Sample, tag_matches

TRAINABLE_PARTS = ("vision", "merger", "language")
# Hugging Face Qwen3-VL module names; matched at any module boundary so wrappers (``model.``, ``_orig_mod.``,
# ``_checkpoint_wrapped_module.``) in front do not matter.
VISION_PREFIX = "visual."
MERGER_PREFIXES = ("visual.merger", "visual.deepstack_merger_list")


def _full_trainable(trainable: Mapping[str, bool], where: str) -> dict[str, bool]:
    unknown = sorted(set(trainable) - set(TRAINABLE_PARTS))
    if unknown:
        raise ValueError(f"{where}: unknown trainable parts {unknown}; known: {list(TRAINABLE_PARTS)}")
    full = {part: bool(trainable.get(part, True)) for part in TRAINABLE_PARTS}
    if not any(full.values()):
        raise ValueError(f"{where}: every part is frozen, nothing would train")
    return full


@dataclass(frozen=True)
class CurriculumStage:
    """One stage. Exactly one of ``steps`` (optimizer steps) or ``epochs`` (passes over the pool's tokens, i.e.
    ``ceil(epochs * pool_tokens / (max_tokens * dp_size * micro_batches))`` steps) sets its length. Samples longer than
    ``max_sample_tokens`` (if set) are left out of the pools. The learning rate warms up linearly over
    ``warmup_ratio`` of the steps to ``peak_lr`` and then follows a cosine down to ``min_lr`` at the last step.
    ``trainable`` maps parts (vision, merger, language) to bools; parts not named stay trainable."""

    name: str
    mixture: Mapping[str, float]
    steps: int | None = None
    epochs: float | None = None
    max_tokens: int = 4096
    max_sample_tokens: int | None = None
    peak_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_ratio: float = 0.03
    trainable: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"CurriculumStage {self.name!r}"
        if not self.name:
            raise ValueError("CurriculumStage: name must not be empty")
        if not self.mixture:
            raise ValueError(f"{where}: mixture must name at least one tag prefix")
        for prefix, weight in self.mixture.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"{where}: mixture weight of {prefix!r} must be a finite number > 0, got {weight!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"{where}: give exactly one of steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"{where}: steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"{where}: epochs must be > 0, got {self.epochs}")
        if self.max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_sample_tokens is not None and not 1 <= self.max_sample_tokens <= self.max_tokens:
            raise ValueError(
                f"{where}: max_sample_tokens must be in [1, max_tokens={self.max_tokens}], got {self.max_sample_tokens}"
            )
        if not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"{where}: need 0 <= min_lr <= peak_lr, got min_lr={self.min_lr} peak_lr={self.peak_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{where}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        object.__setattr__(self, "mixture", dict(self.mixture))
        object.__setattr__(self, "trainable", _full_trainable(self.trainable, where))

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of step ``step`` (0-based) of a stage that lasts ``total_steps`` steps."""
        if not 0 <= step < total_steps:
            raise ValueError(f"CurriculumStage.lr_at: step must be in [0, {total_steps}), got {step}")
        warmup = round(self.warmup_ratio * total_steps)
        if step < warmup:
            return self.peak_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup - 1)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def default_curriculum(
    steps: tuple[int, int, int] = (300, 200, 100),
    peak_lr: float = 2e-5,
    max_tokens: int = 4096,
    min_lr_ratio: float = 0.1,
) -> list[CurriculumStage]:
    """The three stages of the paper's collaborative curriculum. The mixture weights, learning rates and frozen
    parts are this library's defaults, not numbers taken from the paper; tune them per run:
    1. ``domain_injection`` - mostly vertical data, everything trainable, full peak lr;
    2. ``general_recovery`` - mostly general data to restore broad skills, vision tower frozen, half the lr;
    3. ``consolidation`` - an even mixture at a quarter of the lr, vision tower frozen.
    Each stage's cosine ends at ``min_lr_ratio`` of its own peak."""
    plan = [
        ("domain_injection", {"vertical": 0.8, "general": 0.2}, 1.0, {}),
        ("general_recovery", {"general": 0.7, "vertical": 0.3}, 0.5, {"vision": False}),
        ("consolidation", {"vertical": 0.5, "general": 0.5}, 0.25, {"vision": False}),
    ]
    stages = []
    for (name, mixture, scale, trainable), n in zip(plan, steps, strict=True):
        peak = peak_lr * scale
        stages.append(CurriculumStage(name, mixture, steps=n, max_tokens=max_tokens, peak_lr=peak,
                                      min_lr=peak * min_lr_ratio, trainable=trainable))
    return stages


@dataclass
class _StagePlan:
    stage: CurriculumStage
    prefixes: list[str]
    weights: list[float]
    pools: list[list[int]]  # dataset indices per mixture prefix
    total_steps: int


class Curriculum:
    """Iterates ``(stage, batch)`` over all stages, ``micro_batches`` packed micro-batches per optimizer step;
    deterministic from ``seed``; resumable at the exact batch with :meth:`state_dict` / :meth:`load_state_dict`.
    After each yield, :attr:`lr` is the learning rate of that batch's step and :attr:`position` says where it
    came from (``micro_batch`` = its index within the step). A stage change is visible as a new ``stage``
    object: call :func:`apply_trainable` then."""

    def __init__(self, stages: Sequence[CurriculumStage], dataset: Sequence[Sample], encoder: SampleEncoder,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1, micro_batches: int = 1) -> None:
        if not stages:
            raise ValueError("Curriculum: at least one stage is needed")
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"Curriculum: stage names must be unique, got {names}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"Curriculum: need 0 <= dp_rank < dp_size, got dp_rank={dp_rank} dp_size={dp_size}")
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"Curriculum: micro_batches must be an int >= 1, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self.dataset, self.encoder = dataset, encoder
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.lengths = [encoder.num_tokens(sample) for sample in dataset]
        self.plans = [self._plan(stage) for stage in stages]
        self.lr: float | None = None
        self.position: dict | None = None
        self._stage_index, self._step, self._micro = 0, 0, 0
        self._reset_stage_cursor()

    def _plan(self, stage: CurriculumStage) -> _StagePlan:
        where = f"Curriculum stage {stage.name!r}"
        tags = sorted({sample.tag for sample in self.dataset})
        pools = []
        for prefix in stage.mixture:
            matching = [i for i, sample in enumerate(self.dataset) if tag_matches(sample.tag, prefix)]
            if not matching:
                raise ValueError(f"{where}: mixture prefix {prefix!r} matches no sample tag; tags present: {tags}")
            limit = stage.max_sample_tokens or stage.max_tokens
            too_long = [i for i in matching if self.lengths[i] > limit]
            if too_long and stage.max_sample_tokens is None:
                i = too_long[0]
                raise ValueError(
                    f"{where}: sample {i} ({self.dataset[i].tag}) has {self.lengths[i]} tokens, more than "
                    f"max_tokens={stage.max_tokens}; raise max_tokens or set max_sample_tokens to filter"
                )
            pool = [i for i in matching if self.lengths[i] <= limit]
            if len(pool) < self.dp_size:
                raise ValueError(
                    f"{where}: prefix {prefix!r} has {len(pool)} samples within the length limit, fewer than "
                    f"dp_size={self.dp_size}"
                )
            pools.append(pool)
        if stage.steps is not None:
            total_steps = stage.steps
        else:
            pool_tokens = sum(self.lengths[i] for i in set().union(*pools))
            step_tokens = stage.max_tokens * self.dp_size * self.micro_batches
            total_steps = max(1, math.ceil(stage.epochs * pool_tokens / step_tokens))
        return _StagePlan(stage, list(stage.mixture), list(stage.mixture.values()), pools, total_steps)

    @property
    def stage_steps(self) -> list[int]:
        return [plan.total_steps for plan in self.plans]

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    def _reset_stage_cursor(self) -> None:
        pools = self.plans[self._stage_index].pools if self._stage_index < len(self.plans) else []
        self._cursors = [[0, 0] for _ in pools]  # per mixture prefix: [pass, position in this rank's shard]
        self._pending: int | None = None
        self._shards: dict[int, tuple[int, list[int]]] = {}

    def _shard(self, component: int, epoch: int) -> list[int]:
        """This rank's share of pass ``epoch`` over a mixture prefix's pool (only the current pass is kept)."""
        cached_epoch, order = self._shards.get(component, (None, []))
        if cached_epoch != epoch:
            plan = self.plans[self._stage_index]
            order = list(plan.pools[component])
            name = f"mgpt-curriculum/{self.seed}/{plan.stage.name}/{plan.prefixes[component]}/{epoch}"
            random.Random(name).shuffle(order)
            order = order[self.dp_rank :: self.dp_size]
            self._shards[component] = (epoch, order)
        return order

    def _draw(self, component: int) -> int:
        cursor = self._cursors[component]
        if cursor[1] == len(self._shard(component, cursor[0])):
            cursor[0], cursor[1] = cursor[0] + 1, 0
        cursor[1] += 1
        return self._shard(component, cursor[0])[cursor[1] - 1]

    def __iter__(self) -> Iterator[tuple[CurriculumStage, dict]]:
        return self

    def __next__(self) -> tuple[CurriculumStage, dict]:
        while self._stage_index < len(self.plans) and self._step >= self.plans[self._stage_index].total_steps:
            self._stage_index, self._step = self._stage_index + 1, 0
            self._reset_stage_cursor()
        if self._stage_index == len(self.plans):
            raise StopIteration
        plan = self.plans[self._stage_index]
        # one generator per (stage, step, micro-batch, rank): the prefix choices need no saved generator state
        rng = random.Random(f"mgpt-curriculum/{self.seed}/{plan.stage.name}/{self._step}/{self._micro}/"
                            f"{self.dp_rank}")
        chosen = [] if self._pending is None else [self._pending]
        used = sum(self.lengths[i] for i in chosen)
        while True:
            component = rng.choices(range(len(plan.pools)), weights=plan.weights)[0]
            index = self._draw(component)
            if used + self.lengths[index] > plan.stage.max_tokens:
                self._pending = index
                break
            chosen.append(index)
            used += self.lengths[index]
        batch = self.encoder.batch([self.dataset[i] for i in chosen])
        self.lr = plan.stage.lr_at(self._step, plan.total_steps)
        self.position = {
            "stage": plan.stage.name,
            "stage_index": self._stage_index,
            "step_in_stage": self._step,
            "global_step": sum(self.stage_steps[: self._stage_index]) + self._step,
            "micro_batch": self._micro,
        }
        self._micro += 1
        if self._micro == self.micro_batches:
            self._step, self._micro = self._step + 1, 0
        return plan.stage, batch

    def state_dict(self) -> dict:
        """Where the next batch comes from (plain Python values, checkpoint-friendly)."""
        return {
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "stage_names": [plan.stage.name for plan in self.plans],
            "dataset_size": len(self.dataset),
            "stage_index": self._stage_index,
            "step": self._step,
            "micro_batch": self._micro,
            "cursors": [list(cursor) for cursor in self._cursors],
            "pending": self._pending,
        }

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        """Continue exactly where ``state`` was taken. ``strict=False`` accepts a state from another data-parallel
        layout (e.g. rank 0's after a resize): stage and step are restored, the pool passes restart on this
        rank's shards - the same schedule position, but not the same samples. A state taken at a step boundary
        also continues under another ``micro_batches`` (the step count of an ``epochs`` stage then differs)."""
        expected = self.state_dict()
        for key in ("seed", "stage_names", "dataset_size") + (("dp_rank", "dp_size") if strict else ()):
            if state[key] != expected[key]:
                raise ValueError(
                    f"Curriculum.load_state_dict: {key} is {state[key]!r} in the state, {expected[key]!r} here"
                )
        micro = int(state.get("micro_batch", 0))  # states written before gradient accumulation have none
        if micro >= self.micro_batches:
            raise ValueError(f"Curriculum.load_state_dict: the state is at micro-batch {micro} of its step, but "
                             f"this curriculum has micro_batches={self.micro_batches}")
        self._stage_index, self._step, self._micro = int(state["stage_index"]), int(state["step"]), micro
        self._reset_stage_cursor()
        if state["dp_size"] != self.dp_size or state["dp_rank"] != self.dp_rank:
            return
        if len(state["cursors"]) != len(self._cursors):
            raise ValueError("Curriculum.load_state_dict: the state's mixture does not match this stage's")
        self._cursors = [[int(epoch), int(offset)] for epoch, offset in state["cursors"]]
        self._pending = state["pending"]


def parameter_part(name: str) -> str:
    """"vision", "merger" or "language" for a parameter name (see VISION_PREFIX / MERGER_PREFIXES)."""
    dotted = "." + name
    if any(f".{prefix}." in dotted for prefix in MERGER_PREFIXES):
        return "merger"
    if "." + VISION_PREFIX in dotted:
        return "vision"
    return "language"


def apply_trainable(model: torch.nn.Module, stage: CurriculumStage | Mapping[str, bool]) -> dict[str, int]:
    """Set ``requires_grad`` of every parameter from the stage's trainable parts; returns the number of trainable
    elements per part (for logging)."""
    trainable = stage.trainable if isinstance(stage, CurriculumStage) else _full_trainable(stage, "apply_trainable")
    counts = dict.fromkeys(TRAINABLE_PARTS, 0)
    for name, parameter in model.named_parameters():
        part = parameter_part(name)
        parameter.requires_grad_(trainable[part])
        if trainable[part]:
            counts[part] += parameter.numel()
    return counts
