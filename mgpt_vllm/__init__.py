"""vLLM plugin: serve mgpt-quantized checkpoints (``mgpt_ops.quant.checkpoint.save_quantized``) with mgpt's ops.

Installed with the ``mgpt`` distribution as the entry point ``vllm.general_plugins: mgpt = mgpt_vllm:register``,
so every vLLM process (engine core, workers, API server) registers the quantization methods ``mgpt_fp8``,
``mgpt_fp8_block``, ``mgpt_int8`` and ``mgpt_w4a16`` by itself. vLLM then picks the method from the checkpoint's
``quantization_config.quant_method`` or from ``--quantization``; ``--quantization mgpt_fp8_block`` also takes over
Qwen's ``fp8`` 128x128 block checkpoints. Formats and layer coverage: ``mgpt_vllm.config``, ``.linear``, ``.moe``.

Importing this package does not import vLLM; ``register()`` does (vLLM is optional for mgpt).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register the mgpt quantization methods with vLLM. Idempotent: vLLM calls it once per process, users may
    call it again."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from mgpt_vllm.config import CONFIGS

    for config in CONFIGS:
        register_quantization_config(config.NAME)(config)
    _registered = True
