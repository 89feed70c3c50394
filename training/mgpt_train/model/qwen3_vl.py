"""``Qwen3VLModel``: the vision tower, the text decoder and the head, on a packed batch.

    model(batch)        -> {"loss", "n_tokens", "aux_loss", "loss_sum", "aux_term"}   (training; never [T, V])
    model.greedy_tokens(batch) -> [T]                          (argmax at labelled rows: the evaluation)
    model.logits(batch) -> [T, V]                              (tests only)
    model.hidden_states(batch) -> (hidden [T, H], aux_loss)    (for callers with their own head / loss)

The batch (see the train interfaces): ``input_ids`` [T], ``labels`` [T] (already shifted, -100 = no loss),
``cu_seqlens`` int32 [S + 1], ``pixel_values`` [P, C*T*p*p], ``image_grid_thw`` [N, 3]; optional ``pad_tokens``
(int: that many trailing tokens are padding -- a label-free sample -- left out of the MoE router statistics).

Loss = mean over labels != -100 of -log p(label) through ``mgpt_ops.fused_linear_logprobs`` on the labelled
rows only, + ``router_aux_loss_coef`` x aux_loss for MoE (aux_loss: HF's load-balancing loss, 0 for dense).
Its two parts for ``mgpt_train.objective.StepLoss``: loss_sum = the sum of -log p, aux_term = coef x aux_loss.

Module tree (HF names minus the ``model.`` prefix): ``visual.*``, ``language_model.*``, ``lm_head``. With
``tie_word_embeddings`` the head IS ``language_model.embed_tokens.weight``.

Attention of the decoder goes through one replaceable function: ``set_attention_fn(fn)`` (see attention.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mgpt_ops import fused_linear_logprobs
from mgpt_train.model.attention import AttentionInfo
from mgpt_train.model.config import Qwen3VLConfig
from mgpt_train.model.language import RMSNorm, TextAttention, TextModel
from mgpt_train.model.moe import GroupedExperts, TopKRouter, load_balancing_loss
from mgpt_train.model.positions import mrope_position_ids
from mgpt_train.model.vision import VisionModel

IGNORE_INDEX = -100


def check_batch(batch: dict, config: Qwen3VLConfig) -> None:
    """Clear errors for a malformed packed batch (shapes and dtypes of the train interfaces)."""
    input_ids, cu_seqlens = batch["input_ids"], batch["cu_seqlens"]
    if input_ids.dim() != 1 or input_ids.dtype != torch.int64:
        raise ValueError(f"Qwen3VLModel: batch['input_ids'] must be int64 [T], got {input_ids.dtype} "
                         f"{list(input_ids.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"Qwen3VLModel: batch['cu_seqlens'] must be int32 [S + 1], got {cu_seqlens.dtype} "
                         f"{list(cu_seqlens.shape)}")
    pad = batch.get("pad_tokens", 0)
    if not isinstance(pad, int) or not 0 <= pad <= input_ids.shape[0]:
        raise ValueError(f"Qwen3VLModel: batch['pad_tokens'] (trailing padding tokens) must be an int in [0, "
                         f"{input_ids.shape[0]}], got {pad!r}")
    labels = batch.get("labels")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"Qwen3VLModel: batch['labels'] must have the shape of input_ids {list(input_ids.shape)}, "
                         f"got {list(labels.shape)}")
    pixels, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if pixels is not None and pixels.shape[0]:
        if pixels.dim() != 2 or pixels.shape[1] != config.vision.patch_dim:
            raise ValueError(f"Qwen3VLModel: batch['pixel_values'] must be [P, {config.vision.patch_dim}], got "
                             f"{list(pixels.shape)}")
        if grid is None or grid.dim() != 2 or grid.shape[1] != 3 or int(grid.prod(-1).sum()) != pixels.shape[0]:
            raise ValueError(f"Qwen3VLModel: batch['image_grid_thw'] must be [N, 3] with sum(t*h*w) = P = "
                             f"{pixels.shape[0]}, got {None if grid is None else grid.tolist()}")


def greedy_at_labels(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tp_group=None,
                     rows_per_chunk: int = 1024) -> torch.Tensor:
    """argmax over the vocabulary of ``hidden[i] @ weight.T`` at the rows with a label, -1 at the others (int64
    [T]). ``tp_group``: ``weight`` is this rank's contiguous vocabulary shard (rank order = vocabulary order,
    shards may be uneven); the ranks' maxima are compared and ties go to the lowest token id, as ``argmax`` over
    the whole vocabulary does. Logits are made ``rows_per_chunk`` rows at a time."""
    out = labels.new_full(labels.shape, -1)
    rows = torch.nonzero(labels != IGNORE_INDEX).flatten()
    offset = 0
    if tp_group is not None:
        world = dist.get_world_size(tp_group)
        sizes = [torch.zeros((), dtype=torch.int64, device=weight.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(weight.shape[0], device=weight.device), group=tp_group)
        offset = int(sum(sizes[:dist.get_rank(tp_group)]))
    weight = weight.float()  # fp32 logits as the loss has them (a no-op for fp32 weights)
    for chunk in rows.split(rows_per_chunk):
        values, tokens = (hidden[chunk].float() @ weight.T).max(-1)
        tokens = tokens + offset
        if tp_group is not None:
            all_values = [torch.empty_like(values) for _ in range(world)]
            all_tokens = [torch.empty_like(tokens) for _ in range(world)]
            dist.all_gather(all_values, values.contiguous(), group=tp_group)
            dist.all_gather(all_tokens, tokens.contiguous(), group=tp_group)
            best = torch.stack(all_values).argmax(0)  # the first maximum: the lowest vocabulary shard
            tokens = torch.stack(all_tokens).gather(0, best[None])[0]
        out[chunk] = tokens
    return out


def padding_row_mask(batch: dict, config: Qwen3VLConfig) -> torch.Tensor | None:
    """bool [T], False on the batch's ``pad_tokens`` trailing padding tokens (``pad_packed_batch`` and the
    pipeline add them), for the MoE router statistics; None for dense models or a batch without padding."""
    pad, length = int(batch.get("pad_tokens", 0)), batch["input_ids"].shape[0]
    if not config.is_moe or pad == 0:
        return None
    return torch.arange(length, device=batch["input_ids"].device) < length - pad


@torch.no_grad()
def init_module_weights(root: nn.Module, std: float = 0.02) -> None:
    """HF's initialisation rules on every submodule of ``root`` (a model or a pipeline stage): normal(0, std)
    matrices, embeddings, routers and experts; zero biases; unit norms."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, TopKRouter)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, GroupedExperts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class Qwen3VLModel(nn.Module):
    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionModel(config.vision)
        self.language_model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------------
    # Set-up helpers
    # ----------------------------------------------------------------------------------------------------
    def set_attention_fn(self, fn) -> None:
        """Install ``fn(q, k, v, cu_seqlens, info)`` as the attention kernel of every decoder layer."""
        for module in self.modules():
            if isinstance(module, TextAttention):
                module.attention_fn = fn

    def tie_weights(self) -> None:
        """Make the head share the embedding when the config ties them (``to_empty`` unties parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def init_weights(self, std: float = 0.02) -> None:
        """HF's initialisation after re-tying the head; for a model built on the meta device and materialised
        with ``to_empty``."""
        self.tie_weights()
        init_module_weights(self, std)

    # ----------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------
    def hidden_states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(final normed hidden states [T, H], load-balancing aux loss (a 0 tensor for dense models))."""
        c = self.config
        check_batch(batch, c)
        input_ids, cu_seqlens = batch["input_ids"], batch["cu_seqlens"]
        empty_grid = torch.zeros(0, 3, dtype=torch.int64)
        grid = batch.get("image_grid_thw", empty_grid)
        grid = empty_grid if grid is None else grid
        embeds = self.language_model.embed_tokens(input_ids)
        visual_rows, deepstack = None, []
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.shape[0]:
            image_embeds, deepstack = self.visual(pixels, grid)
            visual_rows = torch.nonzero(input_ids == c.image_token_id).flatten()
            if visual_rows.shape[0] != image_embeds.shape[0]:
                raise ValueError(f"Qwen3VLModel: {visual_rows.shape[0]} image tokens in input_ids but the images "
                                 f"give {image_embeds.shape[0]} embeddings")
            embeds = embeds.index_copy(0, visual_rows, image_embeds.to(embeds.dtype))
        position_ids = mrope_position_ids(input_ids, cu_seqlens, grid, c.image_token_id,
                                          c.vision.spatial_merge_size)
        info = AttentionInfo.from_cu_seqlens(cu_seqlens)
        hidden, router_stats = self.language_model(embeds, position_ids, cu_seqlens, info, visual_rows, deepstack,
                                                   padding_row_mask(batch, c))
        aux = (load_balancing_loss(router_stats, c.text.num_experts, c.text.top_k) if router_stats
               else hidden.new_zeros((), dtype=torch.float32))
        return hidden, aux

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        hidden, aux = self.hidden_states(batch)
        labels = batch["labels"]
        rows = torch.nonzero(labels != IGNORE_INDEX).flatten()  # prompt and image rows cost no head matmul
        logprobs, _ = fused_linear_logprobs(hidden[rows], self.lm_head.weight, labels[rows],
                                            ignore_index=IGNORE_INDEX, return_entropy=False)
        n_tokens = torch.tensor(rows.shape[0], device=hidden.device)
        loss_sum = -logprobs.sum()
        aux_term = self.config.text.router_aux_loss_coef * aux if self.config.is_moe else torch.zeros_like(loss_sum)
        return {"loss": loss_sum / max(rows.shape[0], 1) + aux_term, "n_tokens": n_tokens, "aux_loss": aux,
                "loss_sum": loss_sum, "aux_term": aux_term}

    def greedy_tokens(self, batch: dict) -> torch.Tensor:
        """The argmax token [T] at every labelled position, -1 elsewhere (the held-out evaluation's teacher-forced
        greedy answer; the head runs on labelled rows only, never [T, V] logits)."""
        hidden, _ = self.hidden_states(batch)
        return greedy_at_labels(hidden, self.lm_head.weight, batch["labels"])

    def logits(self, batch: dict) -> torch.Tensor:
        """Full logits [T, V] (materialised: tests only)."""
        hidden, _ = self.hidden_states(batch)
        return self.lm_head(hidden)
