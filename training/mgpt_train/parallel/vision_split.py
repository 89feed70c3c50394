"""The vision tower split by images over the ranks that share a micro-batch (the cp x tp ranks of a data rank).

Without it every one of those ranks runs the whole tower on every image of the micro-batch (cp x tp copies of
the same work). ``split_vision(visual, group, replicas)`` replaces ``visual.forward`` (an instance attribute;
parameter names do not change) by one that

    1. assigns the micro-batch's images (whole images or videos: a grid row of ``image_grid_thw``) to the ranks
       of ``group``, largest first to the least loaded rank (``assign_images``: the same answer on every rank,
       from the grid alone);
    2. runs the original forward on this rank's images only -- or, when it got none, on one blank merge block
       (``idle``) so that every rank runs the tower's FSDP collectives once;
    3. all-gathers the merged embeddings and DeepStack features of all images (``_GatherImages``, padded to the
       largest rank's rows) and returns them in the micro-batch's image order, as the unsplit forward does.

Gradients. Each rank's decoder hands back gradients for the image embeddings of its own tokens. Over the tp
ranks those are identical (sequence parallelism all-gathers them), over the cp ranks they are partial (each
rank's context shard): the gather's backward reduce-scatters them (sum over the group, divided by
``replicas`` = tp), so every rank receives the complete gradient of its own images. The vision parameters'
gradients are then partial over the group (each rank saw some images): the FSDP reduction of the vision tower
must SUM over the group's tp ranks (``mgpt_train.parallelize`` shards it over dp_shard x cp x tp) -- over cp it
already sums, as for every parameter. An idle rank's blank block enters the graph through the gather (an input
of the same autograd node), so its tower's backward, like every rank's, runs after the reduce-scatter.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

# torch >= 2.12 renames the single-tensor collectives; the GPU stack (2.11) only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def assign_images(patches: Sequence[int], ranks: int) -> list[list[int]]:
    """Image indices per rank (each list ascending): images by decreasing patch count (then index) go to the
    rank with the fewest patches so far (then the lowest rank)."""
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"assign_images: 'ranks' must be an int >= 1, got {ranks!r}")
    loads = [(0, rank) for rank in range(ranks)]
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for image in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        load, rank = heapq.heappop(loads)
        owned[rank].append(image)
        heapq.heappush(loads, (load + patches[image], rank))
    return [sorted(images) for images in owned]


class _GatherImages(torch.autograd.Function):
    """Rows of every rank's ``local`` [rows_r, F] concatenated in rank order (``rows`` lists rows_r for all
    ranks). Backward: the gradient's rows of each rank, summed over the group and divided by ``replicas``.
    ``idle`` (this rank's blank-block output, or None) only orders the backward: it gets a zero gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, idle: torch.Tensor | None, rows: list[int], group, replicas: int):
        ctx.rows, ctx.group, ctx.replicas, ctx.rank = rows, group, replicas, dist.get_rank(group)
        ctx.idle_like = None if idle is None else (idle.shape, idle.dtype, idle.device)
        width, most = local.shape[1], max(rows)
        padded = local.new_zeros((most, width))
        padded[:local.shape[0]] = local
        gathered = local.new_empty((len(rows) * most, width))
        _all_gather_single(gathered, padded, group=group)
        return torch.cat([gathered[r * most:r * most + count] for r, count in enumerate(rows)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, most = ctx.rows, max(ctx.rows)
        padded = grad.new_zeros((len(rows) * most, grad.shape[1]))
        for r, piece in enumerate(grad.split(rows)):
            padded[r * most:r * most + rows[r]] = piece
        mine = grad.new_empty((most, grad.shape[1]))
        _reduce_scatter_single(mine, padded.contiguous(), group=ctx.group)
        grad_local = mine[:rows[ctx.rank]] / ctx.replicas
        grad_idle = None if ctx.idle_like is None else torch.zeros(ctx.idle_like[0], dtype=ctx.idle_like[1],
                                                                    device=ctx.idle_like[2])
        return grad_local, grad_idle, None, None, None


def split_vision(visual: nn.Module, group, replicas: int) -> None:
    """Install the split forward on ``visual`` (a ``VisionModel``, possibly FSDP-wrapped) over ``group``;
    ``replicas``: how many ranks of the group hold identical gradients for the same tokens (tp)."""
    size = dist.get_world_size(group)
    if replicas < 1 or size % replicas:
        raise ValueError(f"split_vision: 'replicas' ({replicas}) must divide the group size ({size})")
    config = visual.config
    unsplit = type(visual).forward

    def forward(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        patches = [t * h * w for t, h, w in grid]
        merge = config.spatial_merge_size ** 2
        owned = assign_images(patches, size)
        mine = owned[dist.get_rank(group)]
        starts = [0]
        for count in patches:
            starts.append(starts[-1] + count)
        idle = None
        if mine:
            pixel_rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine]).to(pixel_values.device)
            embeds, deepstack = unsplit(visual, pixel_values[pixel_rows], grid_thw[mine])
            local = torch.cat([embeds, *deepstack], dim=1)
        else:  # one blank merge block: the tower's collectives run on every rank
            side = config.spatial_merge_size
            blank = pixel_values.new_zeros((merge, pixel_values.shape[1]))
            embeds, deepstack = unsplit(visual, blank, torch.tensor([[1, side, side]]))
            idle = torch.cat([embeds, *deepstack], dim=1)
            local = idle.new_zeros((0, idle.shape[1]))
        rows = [sum(patches[i] for i in images) // merge for images in owned]
        gathered = _GatherImages.apply(local, idle, rows, group, replicas)  # rank order
        # rank order -> image order
        first_row, order = {}, [i for images in owned for i in images]
        offset = 0
        for image in order:
            first_row[image] = offset
            offset += patches[image] // merge
        index = torch.cat([torch.arange(first_row[i], first_row[i] + patches[i] // merge) for i in range(len(grid))]
                          ).to(gathered.device)
        features = gathered[index].split(embeds.shape[1], dim=1)
        return features[0], list(features[1:])

    visual.forward = forward
