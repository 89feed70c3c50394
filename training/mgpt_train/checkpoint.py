"""Distributed checkpoints: model + optimizer through torch.distributed.checkpoint (DCP), plus the run state.

Layout of a checkpoint folder ``DIR``::

    DIR/step_<N>/            one finished checkpoint (renamed from ``step_<N>.tmp`` only once complete)
        .metadata, *.distcp  DCP files: {"model": ..., "optim": ...}, each rank writing its own shards
        rank_<r>.pt          this rank's run state: {"step", "world_size", "extra": <caller's dict>, "rng": ...}

Why this split:
- Model and optimizer go through ``get_state_dict`` / ``set_state_dict``, which give the same keys for a plain
  module and an FSDP2 (``fully_shard``) one, so a checkpoint can be saved sharded and loaded sharded over a
  different number of ranks (DCP reshards on load). The optimizer state is flattened (``state.<param>.exp_avg``,
  ``param_groups.<param>.lr``), so the pipeline stages a rank holds (a list of model parts, one optimizer each)
  merge into one dict keyed by the full model's parameter names.
- The run state (data position, curriculum stage, LR-scheduler state, RNG states) differs per rank (each
  data-parallel rank reads other data and draws other random numbers), so every rank writes a small
  ``rank_<r>.pt`` with ``torch.save`` (the RNG states of Python, NumPy, torch CPU and CUDA are added and, on
  load, restored). The caller's ``extra_state`` must hold only plain Python values and tensors: files are read
  back with ``torch.load(weights_only=True)``. When the world size changed since the save, every rank reads
  ``rank_0.pt``'s extra state and the RNG states are NOT restored (they would repeat rank 0's random stream on
  every rank); ``load`` then warns.

Atomicity: everything is written into ``step_<N>.tmp``; after a barrier rank 0 renames it to ``step_<N>``, so a
crash mid-save leaves only a ``.tmp`` folder that ``latest_step`` ignores and the next save removes. Old
checkpoints beyond the ``keep`` most recent are deleted by rank 0 after the rename. A shared file system is
assumed (every rank sees DIR).
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^step_(\d+)\.tmp$")


def _rank_and_world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp(function, state: dict, folder: Path) -> None:
    """dcp.save / dcp.load, in a single process without its 'assuming the intent is ...' warning."""
    if _distributed():
        function(state, checkpoint_id=folder)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        function(state, checkpoint_id=folder, no_dist=True)


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step}"


def available_steps(directory: str | Path) -> list[int]:
    """Steps of the finished checkpoints in ``directory``, ascending (``.tmp`` folders are not finished)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def latest_step(directory: str | Path) -> int | None:
    steps = available_steps(directory)
    return steps[-1] if steps else None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, when present) generator states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


Models = torch.nn.Module | Sequence[torch.nn.Module]
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None
# Flat optimizer keys ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr") let the parts' dicts merge into one.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _pairs(model: Models, optimizer: Optimizers, caller: str) -> list[tuple[torch.nn.Module, list]]:
    """(model part, [its optimizer] or []) for one module or for the pipeline stages a rank holds."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if optimizer is None:
        return [(m, []) for m in models]
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if len(optimizers) != len(models):
        raise ValueError(f"checkpoint.{caller}: argument 'optimizer' must hold one optimizer per model part "
                         f"({len(models)}), got {len(optimizers)}")
    return [(m, [o]) for m, o in zip(models, optimizers)]


def _merged_state(pairs) -> tuple[dict, list[tuple[list[str], list[str]]]]:
    """One {"model", "optim"} dict over every part, and each part's (model keys, optimizer keys)."""
    merged, keys = {"model": {}, "optim": {}}, []
    for part, optimizers in pairs:
        model_state, optim_state = get_state_dict(part, optimizers, options=_OPTIONS)
        for name, state in (("model", model_state), ("optim", optim_state)):
            shared = merged[name].keys() & state.keys()
            if shared:
                raise ValueError(f"checkpoint: model parts share {name} keys {sorted(shared)[:3]}")
            merged[name].update(state)
        keys.append((list(model_state), list(optim_state)))
    return merged, keys


def save(step: int, model: Models, optimizer: Optimizers, extra_state: dict | None, directory: str | Path, *,
         keep: int | None = None) -> Path:
    """Write checkpoint ``step`` of ``model`` and ``optimizer`` (plain or FSDP2) and this rank's ``extra_state``.

    ``model`` may be a list of parts (the pipeline stages of this rank) with one optimizer each. Collective:
    every rank of the default process group must call it. Returns the final folder ``directory/step_<step>``.
    ``keep``: how many most recent checkpoints to keep (None = all).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint.save: argument 'step' must be an int >= 0, got {step!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"checkpoint.save: argument 'keep' must be None or an int >= 1, got {keep!r}")
    pairs = _pairs(model, optimizer, "save")
    rank, world = _rank_and_world()
    directory = Path(directory)
    final, tmp = step_dir(directory, step), directory / f"step_{step}.tmp"
    if final.exists():  # every rank checks (shared file system), so none is left waiting in a barrier
        raise FileExistsError(f"checkpoint.save: {final} already exists; checkpoints are never overwritten")
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.iterdir():  # leftovers of a crashed save
            if _TMP_DIR.match(stale.name):
                shutil.rmtree(stale)
        tmp.mkdir()
    _barrier()

    _dcp(dcp.save, _merged_state(pairs)[0], tmp)
    torch.save({"step": step, "world_size": world, "extra": dict(extra_state or {}), "rng": rng_state()},
               tmp / f"rank_{rank}.pt")
    _barrier()  # every rank's shards and run state are on disk before the rename publishes them

    if rank == 0:
        tmp.rename(final)
        if keep is not None:
            for old in available_steps(directory)[:-keep]:
                shutil.rmtree(step_dir(directory, old))
    _barrier()
    return final


def load(model: Models, optimizer: Optimizers, directory: str | Path, step: int | str = "latest", *,
         restore_rng: bool = True) -> tuple[int, dict] | None:
    """Load checkpoint ``step`` (an int or "latest") into ``model`` / ``optimizer`` in place (parts as in
    ``save``; the parts may be split differently from the saving run as long as the parameter names match).

    Returns ``(step, extra_state)``, or None when ``step="latest"`` and ``directory`` holds no finished
    checkpoint (a fresh run). Collective. ``optimizer=None`` loads the model only (e.g. evaluation).
    """
    if step == "latest":
        found = latest_step(directory)
        if found is None:
            return None
        step = found
    if not isinstance(step, int):
        raise ValueError(f"checkpoint.load: argument 'step' must be an int or 'latest', got {step!r}")
    folder = step_dir(directory, step)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint.load: no checkpoint {folder}; finished steps in {directory}: "
                                f"{available_steps(directory)}")

    pairs = _pairs(model, optimizer, "load")
    state, keys = _merged_state(pairs)
    if optimizer is None:
        del state["optim"]
    _dcp(dcp.load, state, folder)  # fills tensors in place and replaces non-tensor values in `state`
    for (part, optimizers), (model_keys, optim_keys) in zip(pairs, keys):
        set_state_dict(part, optimizers, model_state_dict={k: state["model"][k] for k in model_keys},
                       optim_state_dict={k: state["optim"][k] for k in optim_keys}, options=_OPTIONS)

    rank, world = _rank_and_world()
    own = folder / f"rank_{rank}.pt"
    run_state = torch.load(own, weights_only=True) if own.exists() else None
    if run_state is None or run_state["world_size"] != world:
        run_state = torch.load(folder / "rank_0.pt", weights_only=True)
        warnings.warn(f"checkpoint.load: {folder} was saved by {run_state['world_size']} ranks, loading on "
                      f"{world}: the extra state comes from rank 0 and RNG states are not restored", stacklevel=2)
    elif restore_rng:
        set_rng_state(run_state["rng"])
    return step, run_state["extra"]
