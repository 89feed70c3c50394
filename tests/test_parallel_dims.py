"""ParallelDims: validation against the world size and the model, and the meshes it builds (4 gloo ranks): the
dims' groups, the flattened sub-meshes and the FSDP / HSDP mesh, read without torch's warning about slicing
flattened dims from the root mesh."""

import warnings

import pytest
import torch.distributed as dist

from gloo_ranks import run_on_gloo_ranks
from mgpt_train.parallel_dims import ParallelDims


def test_dp_shard_takes_the_remaining_ranks():
    dims = ParallelDims(world_size=16, dp_replicate=2, tp=2, pp=2)
    assert dims.dp_shard == 2 and dims.sizes == (2, 2, 2, 1, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=8, tp=3), "does not divide the world size"),
    (dict(world_size=8, dp_shard=2, tp=2), "must equal the world size 8"),
    (dict(world_size=8, dp_shard=4, cp=2, ep=3), "'ep' \\(3\\) must divide dp_shard\\*cp = 8"),
    (dict(world_size=4, tp=0), "'tp' must be an int >= 1"),
    (dict(world_size=4, dp_shard=0), "'dp_shard' must be an int >= 1 or -1"),
])
def test_bad_degrees(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_model_and_sequence_checks():
    dims = ParallelDims(world_size=8, dp_shard=2, cp=2, tp=2, ep=4)
    dims.check_model(num_heads=32, num_kv_heads=4, num_experts=128)
    with pytest.raises(ValueError, match="num_heads=3 is not divisible by tp=2"):
        dims.check_model(num_heads=3)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by ep=4"):
        dims.check_model(num_heads=2, num_experts=6)
    dims.check_sequence(8)
    with pytest.raises(ValueError, match="not divisible by 2\\*cp = 4"):
        dims.check_sequence(10)


def _rank_body(rank: int) -> dict:
    world = dist.get_world_size()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = ParallelDims(world_size=world, dp_replicate=1, dp_shard=2, tp=2).build_mesh("cpu")
        sizes = {name: mesh[name].size() for name in ("dp_shard", "tp", "dp", "dp_shard_cp", "dp_cp", "cp_tp")}
        # tp is the fastest-varying dim: ranks {0,1} form one tp group, {0,2} one dp_shard group.
        tp_peers = sorted(dist.get_process_group_ranks(mesh["tp"].get_group()))
        cp_tp_peers = sorted(dist.get_process_group_ranks(mesh["cp_tp"].get_group()))
        dp_peers = sorted(dist.get_process_group_ranks(mesh["dp_shard"].get_group()))
        fsdp_peers = sorted(dist.get_process_group_ranks(mesh.fsdp.get_group()))
        hsdp = ParallelDims(world_size=world, dp_replicate=2, dp_shard=2).build_mesh("cpu").fsdp
        hsdp_peers = [sorted(dist.get_process_group_ranks(hsdp.get_group(d))) for d in ("dp_replicate", "dp_shard_cp")]
    # torch without DeviceMesh._unflatten (older than the GPU machine's may be): the HSDP mesh is sliced from the root
    from torch.distributed.device_mesh import DeviceMesh
    unflatten = DeviceMesh.__dict__.get("_unflatten")
    if unflatten is not None:
        delattr(DeviceMesh, "_unflatten")
    try:
        old_hsdp = ParallelDims(world_size=world, dp_replicate=2, dp_shard=2).build_mesh("cpu").fsdp
    finally:
        if unflatten is not None:
            DeviceMesh._unflatten = unflatten
    old_hsdp_peers = [sorted(dist.get_process_group_ranks(old_hsdp.get_group(d)))
                      for d in ("dp_replicate", "dp_shard_cp")]
    try:
        mesh["dp_shard_tp"]
        unknown = "no error"
    except KeyError as exc:
        unknown = str(exc)
    return {"sizes": sizes, "tp_peers": tp_peers, "cp_tp_peers": cp_tp_peers, "dp_peers": dp_peers,
            "fsdp_peers": fsdp_peers, "hsdp_names": list(hsdp.mesh_dim_names), "hsdp_peers": hsdp_peers,
            "flattened_warnings": [str(w.message) for w in caught if "flattened" in str(w.message)],
            "unknown": unknown, "old_hsdp_peers": old_hsdp_peers}


@pytest.mark.distributed
def test_mesh_on_four_gloo_ranks(tmp_path):
    for rank, r in enumerate(run_on_gloo_ranks(_rank_body, 4, tmp_path)):
        assert r["sizes"] == {"dp_shard": 2, "tp": 2, "dp": 2, "dp_shard_cp": 2, "dp_cp": 2, "cp_tp": 2}
        assert r["tp_peers"] == r["cp_tp_peers"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["dp_peers"] == r["fsdp_peers"] == [rank % 2, rank % 2 + 2]
        # HSDP over (dp_replicate, dp_shard): replicas {r, r+2}, shards {0,1} / {2,3}
        assert r["hsdp_names"] == ["dp_replicate", "dp_shard_cp"]
        assert r["hsdp_peers"] == [[rank % 2, rank % 2 + 2], [rank - rank % 2, rank - rank % 2 + 1]]
        assert r["old_hsdp_peers"] == r["hsdp_peers"]
        assert r["flattened_warnings"] == []
        assert "unknown mesh dim 'dp_shard_tp'" in r["unknown"] and "ParallelMesh.fsdp" in r["unknown"]
