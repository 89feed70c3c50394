"""ParallelDims: the five parallelism degrees of a run, validated against the world size, and the one
DeviceMesh they live on (torchtitan's layout, read left to right from slowest- to fastest-varying rank):

    pp x dp_replicate x dp_shard x cp x tp          (every degree 1 by default; dp_shard=-1 takes the rest)

Derived, flattened sub-meshes (``DeviceMesh._flatten`` of the root's dims):
    "dp"           dp_replicate x dp_shard         data loading: ranks in one group read different batches
    "dp_shard_cp"  dp_shard x cp                   FSDP2 shards parameters over data AND context ranks
    "dp_cp"        dp_replicate x dp_shard x cp    loss / gradient-norm reductions
    "cp_tp"        cp x tp                         ranks sharing one micro-batch (they split its images)
and the FSDP mesh (``ParallelMesh.fsdp``): "dp_shard_cp", or for HSDP the 2-D ("dp_replicate", "dp_shard_cp")
(unflattened from "dp_cp"). torch >= 2.11 deprecates slicing a flattened dim out of the root mesh, so
``build_mesh`` keeps the meshes ``_flatten`` returns in a ``ParallelMesh``: ``mesh["dp"]`` reads them, while
``mesh["tp"]`` etc. slice the root as before. All meshes are built up front (collective; every rank calls it).
Expert parallelism is folded into dp_shard x cp (as Megatron and torchtitan do): ``ep`` must divide
dp_shard * cp, and the experts of an MoE layer are split over ``ep`` consecutive ranks of "dp_shard_cp".
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("world_size", "dp_replicate", "cp", "tp", "pp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims: '{name}' must be an int >= 1, got {value!r}")
        if not isinstance(self.dp_shard, int) or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ValueError(f"ParallelDims: 'dp_shard' must be an int >= 1 or -1 (use the remaining ranks), "
                             f"got {self.dp_shard!r}")
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(f"ParallelDims: dp_replicate*cp*tp*pp = {others} does not divide the world size "
                                 f"{self.world_size}, so dp_shard=-1 has no valid value")
            object.__setattr__(self, "dp_shard", self.world_size // others)
        if others * self.dp_shard != self.world_size:
            raise ValueError(f"ParallelDims: pp*dp_replicate*dp_shard*cp*tp = {self.pp}*{self.dp_replicate}*"
                             f"{self.dp_shard}*{self.cp}*{self.tp} = {others * self.dp_shard} must equal the world "
                             f"size {self.world_size}")
        if (self.dp_shard * self.cp) % self.ep:
            raise ValueError(f"ParallelDims: 'ep' ({self.ep}) must divide dp_shard*cp = {self.dp_shard * self.cp} "
                             f"(expert parallelism is folded into the data-shard x context ranks)")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    def check_model(self, *, num_heads: int, num_kv_heads: int | None = None, num_experts: int | None = None
                    ) -> None:
        """Errors for a model these degrees cannot split: heads over tp, experts over ep."""
        for name, count in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if count is not None and count % self.tp:
                raise ValueError(f"ParallelDims: {name}={count} is not divisible by tp={self.tp}")
        if num_experts is not None and num_experts % self.ep:
            raise ValueError(f"ParallelDims: num_experts={num_experts} is not divisible by ep={self.ep}")

    def check_sequence(self, seq_len: int) -> None:
        """Context parallelism splits each sequence into 2*cp load-balanced chunks."""
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ValueError(f"ParallelDims: sequence length {seq_len} is not divisible by 2*cp = {2 * self.cp} "
                             f"(context parallelism uses 2*cp load-balanced chunks); pad the packed sequence")

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The run's meshes: the root DeviceMesh with dims MESH_DIMS, the flattened "dp", "dp_shard_cp", "dp_cp"
        sub-meshes and the FSDP mesh (module docstring)."""
        root = init_device_mesh(device_type, self.sizes, mesh_dim_names=MESH_DIMS)
        flattened = {name: root[dims]._flatten(name) for name, dims in FLATTENED_DIMS.items()}
        if self.dp_replicate > 1 and hasattr(DeviceMesh, "_unflatten"):
            fsdp = flattened["dp_cp"]._unflatten(0, (self.dp_replicate, self.dp_shard * self.cp),
                                                 ("dp_replicate", "dp_shard_cp"))
        elif self.dp_replicate > 1:  # older torch (no _unflatten): slicing a flattened dim from the root is allowed
            fsdp = root["dp_replicate", "dp_shard_cp"]
        else:
            fsdp = flattened["dp_shard_cp"]
        return ParallelMesh(root, flattened, fsdp)


FLATTENED_DIMS = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
                  "dp_cp": ("dp_replicate", "dp_shard", "cp"), "cp_tp": ("cp", "tp")}


class ParallelMesh:
    """The meshes of ``ParallelDims.build_mesh``: ``mesh[name]`` is the 1-D mesh of one dim of MESH_DIMS (sliced
    from ``root``) or of a flattened dim of FLATTENED_DIMS (kept from ``_flatten``); ``fsdp`` is the mesh FSDP2
    shards over; ``mesh_dim_names``, ``mesh`` (the rank tensor) and ``device_type`` are the root's."""

    def __init__(self, root: DeviceMesh, flattened: dict[str, DeviceMesh], fsdp: DeviceMesh):
        self.root, self.flattened, self.fsdp = root, flattened, fsdp

    def __getitem__(self, name: str) -> DeviceMesh:
        if name in self.flattened:
            return self.flattened[name]
        if name not in MESH_DIMS:
            raise KeyError(f"ParallelMesh: unknown mesh dim {name!r}; expected one of {MESH_DIMS} or "
                           f"{tuple(self.flattened)} (the HSDP mesh is ParallelMesh.fsdp)")
        return self.root[name]

    @property
    def mesh_dim_names(self) -> tuple[str, ...]:
        return self.root.mesh_dim_names

    @property
    def mesh(self):
        return self.root.mesh

    @property
    def device_type(self) -> str:
        return self.root.device_type
