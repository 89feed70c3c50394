"""Drop-in: route the vision attention of Hugging Face Qwen2.5-VL / Qwen3-VL (and Qwen3-VL-MoE) through
``mgpt::vision_attention`` (``mgpt_ops.vision.attention``).

What HF does per vision block (``Qwen*VisionAttention.forward``, read in transformers 5.19):

    q, k, v = qkv(x).view(N, 3, H, D)                      # packed patch tokens of every image / frame
    q', k'  = q * cos + rotate_half(q) * sin, same for k     # 2D RoPE, fp32, cos/sin [N, D]
    out_s   = softmax(scale * q'_s k'_s^T) v_s               # one bidirectional attention per sequence s
    y       = proj(concat_s out_s)

where the sequences are the frames (full blocks, ``cu_seqlens``) or Qwen2.5-VL's 64-token windows (windowed
blocks, ``cu_window_seqlens``). With ``eager``/``sdpa`` HF splits with ``cu_seqlens.tolist()`` (a host sync in
every block) and launches one attention per sequence; with ``flash_attention_2`` it needs flash-attn and pads
head dims 72/80 to 96. The replacement ``_vision_attention_forward`` does the RoPE and all sequences in one call
of our op, whatever ``config._attn_implementation`` says.

Host syncs: the op sizes its grid with ``max_seqlen`` (an int). HF only computes it for flash attention, with a
``.item()``. Our wrapper of the vision model's forward derives it -- and, for Qwen2.5-VL, the longest window --
on the host from ``grid_thw`` (one ``grid_thw.tolist()`` per vision forward, free when ``grid_thw`` lives on the
CPU; HF's own position-id helper already does the same transfer) and hands both to HF through the
``max_seqlen`` / ``max_window_seqlen`` keyword arguments its helpers accept as precomputed. The blocks then run
without any host sync. Pass those keywords yourself to skip even that one.

The rotary tables: HF computes ``position_embeddings = (cos, sin)`` once in the vision model's forward (after
the window permutation for Qwen2.5-VL) and passes the same tensors to every block; the patch keeps that and
only hands them to the op, which rotates q and k inside its kernel.
"""

from __future__ import annotations

import functools
import types

import torch

from mgpt_ops.vision.attention import vision_attention_packed


def _vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None,
                              **kwargs):
    """Replacement ``forward`` of ``Qwen2_5_VLVisionAttention`` / ``Qwen3VL(Moe)VisionAttention``.

    hidden_states [N, C] -> [N, C]. ``max_seqlen`` comes from the patched vision model; a direct caller that
    omits it gets N, an upper bound that needs no host sync (correct, but kernels sized by max_seqlen then do
    more work). HF's attention dropout is 0 for these models and is not applied."""
    seq_len = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).view(seq_len, 3, self.num_heads, -1)  # the op takes q, k, v as views of it
    cos, sin = position_embeddings if position_embeddings is not None else (None, None)
    if cos is not None:  # HF's apply_rotary_pos_emb_vision rotates in fp32 whatever the model dtype
        cos, sin = cos.float(), sin.float()
    if cu_seqlens.dtype != torch.int32:  # HF builds int32, except under torch.jit tracing
        cu_seqlens = cu_seqlens.to(torch.int32)
    out = vision_attention_packed(qkv, cu_seqlens, seq_len if max_seqlen is None else max_seqlen,
                                  cos=cos, sin=sin, scale=self.scaling)
    return self.proj(out.reshape(seq_len, -1))


def _longest_frame(grid: list[list[int]]) -> int:
    """Tokens of the largest frame: every frame of a (t, h, w) entry is one sequence of h * w patches."""
    return max((h * w for t, h, w in grid if t > 0), default=0)


def _longest_window(grid: list[list[int]], window_size: int, patch_size: int, merge: int) -> int:
    """Tokens of the largest Qwen2.5-VL attention window. HF tiles each frame's grid of merged units
    (h/merge x w/merge) with squares of ``window_size // merge // patch_size`` units from the top-left
    corner, so the largest window of a frame holds min(side, h/merge) * min(side, w/merge) units of merge^2
    patches."""
    side = window_size // merge // patch_size
    return max((min(side, h // merge) * min(side, w // merge) * merge * merge for t, h, w in grid if t > 0),
               default=0)


def _with_host_max_seqlens(hf_forward, windowed: bool):
    """Wrap a vision model's HF ``forward`` so its blocks receive ``max_seqlen`` computed on the host."""

    @functools.wraps(hf_forward)
    def forward(self, hidden_states, grid_thw=None, **kwargs):
        need_window = windowed and kwargs.get("max_window_seqlen") is None
        if kwargs.get("max_seqlen") is None or need_window:
            grid = grid_thw.tolist()  # the one host transfer of this forward
            if kwargs.get("max_seqlen") is None:
                kwargs["max_seqlen"] = _longest_frame(grid)
            if need_window:
                kwargs["max_window_seqlen"] = _longest_window(grid, self.window_size, self.patch_size,
                                                              self.spatial_merge_size)
        return hf_forward(self, hidden_states, grid_thw=grid_thw, **kwargs)

    forward._mgpt_hf_forward = hf_forward
    return forward


class PatchHandle:
    """What one ``patch_*`` call changed. ``undo()`` (or leaving the ``with`` block) restores exactly that;
    a second ``patch_*`` call over an already patched target changes nothing and its handle undoes nothing."""

    def __init__(self) -> None:
        self._restores: list = []
        self.patched: list[str] = []  # human-readable names of what was replaced, in order

    def undo(self) -> None:
        while self._restores:
            self._restores.pop()()
        self.patched.clear()

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _is_ours(fn) -> bool:
    fn = getattr(fn, "__func__", fn)
    return fn is _vision_attention_forward or hasattr(fn, "_mgpt_hf_forward")


def _replacement(cls, windowed: bool | None):
    """The patched forward for ``cls``: attention classes get ``_vision_attention_forward``, vision model
    classes (``windowed`` not None) the max_seqlen wrapper around HF's own forward."""
    if windowed is None:
        return _vision_attention_forward
    hf_forward = cls.forward  # HF's, or our wrapper of it when the class is patched too
    return _with_host_max_seqlens(getattr(hf_forward, "_mgpt_hf_forward", hf_forward), windowed)


def _patch_class(cls, windowed, handle: PatchHandle) -> None:
    original = vars(cls)["forward"]
    if _is_ours(original):
        return
    cls.forward = _replacement(cls, windowed)
    handle._restores.append(lambda: setattr(cls, "forward", original))
    handle.patched.append(f"{cls.__name__}.forward")


def _patch_instance(module: torch.nn.Module, windowed, handle: PatchHandle) -> None:
    # Only the instance's own attribute counts: an instance patch must survive undoing a class patch.
    if _is_ours(vars(module).get("forward")):
        return
    module.forward = types.MethodType(_replacement(type(module), windowed), module)
    handle._restores.append(lambda: delattr(module, "forward"))
    handle.patched.append(f"{type(module).__name__}.forward of one instance")


def _patch(targets: dict, model: torch.nn.Module | None, family: str) -> PatchHandle:
    """targets: class -> windowed (True/False for vision models, None for attention classes)."""
    handle = PatchHandle()
    if model is None:
        for cls, windowed in targets.items():
            _patch_class(cls, windowed, handle)
        return handle
    found = False
    for module in model.modules():
        for cls, windowed in targets.items():
            if isinstance(module, cls):
                found = True
                _patch_instance(module, windowed, handle)
                break
    if not found:
        raise ValueError(f"patch_{family}: model ({type(model).__name__}) contains no {family} vision module "
                         f"(expected one of {sorted(c.__name__ for c in targets)})")
    return handle


def patch_qwen2_5_vl(model: torch.nn.Module | None = None) -> PatchHandle:
    """Route Qwen2.5-VL vision attention (windowed and full blocks) through ``mgpt::vision_attention``.

    ``model=None`` patches the classes (every instance, present and future); otherwise only the vision
    modules inside ``model`` (a whole ``Qwen2_5_VLForConditionalGeneration``, its ``visual`` tower, ...).
    Patching twice is harmless. Returns a handle whose ``undo()`` restores what this call changed."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    targets = {m.Qwen2_5_VLVisionAttention: None, m.Qwen2_5_VisionTransformerPretrainedModel: True}
    return _patch(targets, model, "qwen2_5_vl")


def patch_qwen3_vl(model: torch.nn.Module | None = None) -> PatchHandle:
    """Route Qwen3-VL and Qwen3-VL-MoE vision attention through ``mgpt::vision_attention``.

    The MoE model has its own copies of the vision classes (same code), so both families are patched.
    ``model=None`` patches the classes; otherwise only the vision modules inside ``model``. Patching twice is
    harmless. Returns a handle whose ``undo()`` restores what this call changed."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as dense
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as moe

    targets = {dense.Qwen3VLVisionAttention: None, dense.Qwen3VLVisionModel: False,
               moe.Qwen3VLMoeVisionAttention: None, moe.Qwen3VLMoeVisionModel: False}
    return _patch(targets, model, "qwen3_vl")
