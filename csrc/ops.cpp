// The one place where every tike_cuda operator schema is declared.
//
// Device implementations live in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(..., CPU)) and
// csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(..., CUDA)); the Python package registers fake
// (meta) kernels and autograd formulas for the forward ops (python/tike_cuda/).
//
// Conventions shared by every op (see docs/kernels.md for the full contract):
//  * logits / ref_logits are [..., V] with a unit stride on the last dim; the leading
//    dims are flattened to N rows (N = numel / V). Outputs are float32 of shape [N].
//  * the saved tensors (lse, idx, coef, shift, ...) are float32 / int32 of shape [N],
//    [N, 2] or [N, K1]; they are what the backward op needs instead of re-reading
//    ref_logits. Each lse is [N, 2]: (max x, log Σ exp((x − max)/τ)) per row, so that
//    log p = (x − max)/τ − ℓ keeps its digits at a tiny τ and near the float limit.
//  * mask (bool [N], optional): false rows are never read; outputs and gradients are 0.
#include <torch/library.h>

TORCH_LIBRARY(tike_cuda, m) {
  // Top-k (∪ sampled token) partial KL, times the detached IS weight.
  // Returns (out[N], lse[N,2], idx[N,K1] int32, coef[N,K1], shift[N], stats[N,3]).
  m.def(
      "topk_kl(Tensor logits, Tensor ref_logits, int k, Tensor? sampled_tokens, "
      "Tensor? old_logprobs, Tensor? mask, float temperature, bool union_sampled, "
      "bool tail_bucket) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // d out / d logits: grad[n, j] = g[n] * p[n, j] * (1[j in S~] * coef[n, s(j)] - shift[n]).
  m.def(
      "topk_kl_backward(Tensor grad_out, Tensor logits, Tensor lse, Tensor idx, "
      "Tensor coef, Tensor shift, Tensor? mask, float temperature) -> Tensor");
  // Same gradient written over the logits buffer (no N x V allocation).
  m.def(
      "topk_kl_backward_(Tensor grad_out, Tensor(a!) logits, Tensor lse, Tensor idx, "
      "Tensor coef, Tensor shift, Tensor? mask, float temperature) -> ()");

  // The local pass of the vocabulary-parallel topk_kl (tike_cuda.distributed): topk_kl's
  // passes over this rank's vocabulary shard without the combination. A sampled token of
  // -1 is not on this shard. Returns (idx[N,K1] int32 (local ids), values[N,K1,2] (z, zr)
  // at idx, lse_p[N,2], lse_q[N,2] (pairs, as topk_kl saves its lse), log_tails[N,2]).
  m.def(
      "topk_kl_shard(Tensor logits, Tensor ref_logits, int k, Tensor? sampled_tokens, "
      "Tensor? mask, float temperature, bool tail_bucket) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Exact full-vocabulary KL(p || q). Returns (out[N], lse_p[N,2], lse_q[N,2]).
  m.def(
      "full_kl(Tensor logits, Tensor ref_logits, Tensor? mask, float temperature) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "full_kl_backward(Tensor grad_out, Tensor logits, Tensor ref_logits, Tensor out, "
      "Tensor lse_p, Tensor lse_q, Tensor? mask, float temperature) -> Tensor");

  // log p(token) and (optionally) the entropy of p. Returns (logp[N], entropy[N] or [0], lse[N,2]).
  m.def(
      "token_logprobs(Tensor logits, Tensor tokens, float temperature, bool with_entropy) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "token_logprobs_backward(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, "
      "Tensor tokens, Tensor lse, Tensor entropy, float temperature) -> Tensor");

  // Fixed support (design.md §6): S~ chosen once (e.g. by the rollout policy), the
  // reference stored sparsely on it, TIKE computed later against that store.
  // The k largest logits of each row, best first (topk_kl's S): int32 [N, k]; −1 rows
  // where masked.
  m.def("topk_indices(Tensor logits, int k, Tensor? mask) -> Tensor");
  // The reference on S~ = support ∪ {sampled token}: (idx[N,K1] int32, logprobs[N,K1],
  // tail_logmass[N]), K1 = k (+1 with sampled tokens; that slot is −1 when o ∈ support).
  m.def(
      "sparse_reference(Tensor ref_logits, Tensor support, Tensor? sampled_tokens, "
      "Tensor? mask, float temperature) -> (Tensor, Tensor, Tensor)");
  // TIKE on the fixed S~ `idx` against the stored reference. Returns (out[N], lse[N,2],
  // coef[N,K1], shift[N], stats[N,3]) as topk_kl; the backward is topk_kl_backward(idx).
  m.def(
      "topk_kl_sparse(Tensor logits, Tensor idx, Tensor ref_logprobs, "
      "Tensor ref_tail_logmass, Tensor? sampled_tokens, Tensor? old_logprobs, Tensor? mask, "
      "float temperature, bool tail_bucket) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#ifdef TIKE_HAVE_PYTHON_MODULE
// `import tike_cuda._C` loads this library (and with it the registrations above); the
// module itself only says how it was built.
#include <Python.h>
#ifdef TIKE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <exception>

#include "cpu/grad_cache.h"
#include "kernels/cpu_isa.h"

namespace {

// tike_cuda.cpu_grad_cache_info(): (idle_blocks, idle_bytes, hits, misses, cap_bytes).
PyObject* py_cpu_grad_cache_info(PyObject*, PyObject*) {
  const tike::CpuGradCacheInfo i = tike::cpu_grad_cache_info();
  return Py_BuildValue("(LLLLL)", (long long)i.idle_blocks, (long long)i.idle_bytes,
                       (long long)i.hits, (long long)i.misses, (long long)i.cap_bytes);
}

PyObject* py_cpu_grad_cache_clear(PyObject*, PyObject*) {
  tike::cpu_grad_cache_clear();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_grad_cache_info", py_cpu_grad_cache_info, METH_NOARGS, nullptr},
    {"cpu_grad_cache_clear", py_cpu_grad_cache_clear, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  // The CPU kernels' instruction-set path is chosen here, at import: a TIKE_CPU_ISA this
  // CPU cannot run fails the import with the reason instead of the first op call.
  // Likewise a malformed TIKE_CPU_GRAD_CACHE_MB.
  const char* cpu_isa = nullptr;
  try {
    cpu_isa = tike::cpu::isa_name(tike::cpu::active_isa());
    (void)tike::cpu_grad_cache_info();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "tike_cuda kernels", -1, methods};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "CPU_ISA", cpu_isa);
  PyModule_AddStringConstant(m, "CPU_ISAS", tike::cpu::supported_isa_names().c_str());
#ifdef TIKE_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
  PyModule_AddIntConstant(m, "CUDA_VERSION", CUDART_VERSION);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
  PyModule_AddIntConstant(m, "CUDA_VERSION", 0);
#endif
  return m;
}
#endif
