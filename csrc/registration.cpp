// Schemas of every C++/CUDA op in namespace `mgpt`. Kernels register their implementations per device
// in their own files (TORCH_LIBRARY_IMPL); fakes (meta) and autograd live in mgpt_ops/ (Python).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mgpt, m) {
  // RL loss family: per-row statistics and gradient of a chunk of vocabulary logits.
  // See mgpt_ops/rl/logprobs.py for the contract (shapes, dtypes, meaning of every field).
  m.def(
      "logits_row_stats(Tensor logits, Tensor labels, float inv_temperature, int vocab_start, "
      "int ignore_index) -> Tensor");
  m.def(
      "logits_row_grad(Tensor logits, Tensor labels, Tensor lse, Tensor mean_z, Tensor grad_logprob, "
      "Tensor grad_entropy, float inv_temperature, int vocab_start, int ignore_index, "
      "ScalarType out_dtype) -> Tensor");

  // Vision family: packed variable-length bidirectional attention with optional fused 2D RoPE.
  // Contract (shapes, RoPE form, lse layout, gradients w.r.t. un-rotated q/k): mgpt_ops/vision/_contract.py.
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, Tensor? cos, "
      "Tensor? sin, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens, int max_seqlen, Tensor? cos, Tensor? sin, float scale) -> (Tensor dq, Tensor dk, "
      "Tensor dv)");

  // Quantized GEMMs (inference only). Contracts: mgpt_ops/quant/scaled_gemm.py (fp8/int8 with per-tensor or
  // per-row scales), mgpt_ops/quant/block_gemm.py (fp8 with 1 x block activation groups and block x block weight
  // blocks; grouped = one such product per MoE expert over its rows offsets[e] .. offsets[e + 1]),
  // mgpt_ops/quant/w4a16.py (int4 group-quantized weights).
  m.def(
      "scaled_mm_kernel(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, ScalarType out_dtype, Tensor? bias) "
      "-> Tensor");
  m.def(
      "block_scaled_mm_kernel(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, ScalarType out_dtype, int block, "
      "Tensor? bias) -> Tensor");
  m.def(
      "grouped_block_scaled_mm_kernel(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor offsets, "
      "ScalarType out_dtype, int block) -> Tensor");
  m.def("w4a16_mm_kernel(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size) -> Tensor");
}

// A bare module init: the extension only registers ops with the dispatcher, so no pybind11 is needed.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
