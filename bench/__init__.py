"""mgpt kernel benchmarks: ``python -m bench`` (or ``mgpt-bench``).

Each family of ops is one module that lists its cases and builds, for each case, our implementation(s)
and the baselines on identical random inputs (see ``bench.common.CaseSetup``). Everything else is
shared: timing and peak memory (``bench.measure``), machine/software capture (``bench.env``), the
runner (``bench.runner``) and the JSON/table/plot output (``bench.report``).

To add a family: write ``bench/<module>.py`` with ``cases(device, quick) -> list[CaseSpec]`` and
``setup(name, params, device) -> CaseSetup``, and register it in ``FAMILIES`` below.
"""

FAMILIES = {
    "quant": "bench.quant_gemm",
    "rl": "bench.rl_losses",
    "train": "bench.train_throughput",
    "vision": "bench.vision_attention",
}
