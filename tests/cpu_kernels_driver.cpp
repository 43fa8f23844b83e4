// Runs the torch-free CPU kernels (csrc/kernels/*_cpu.h) on inputs read from files, with
// no libtorch: what tests/test_aarch64_kernels.py cross-compiles for aarch64 and runs under
// an emulator (there is no aarch64 torch to build the extension against), and compiles
// natively to check this driver itself against the extension's ops.
//
//   cpu_kernels_driver isa            prints the active path (cpu_isa.h) and whether the
//                                     compiler targeted NEON
//   cpu_kernels_driver run DIR...     runs the op each DIR describes
//
// A case DIR holds `params.txt` ("key value" lines: op, N, V, dtype 0|1|2 as tike::DType,
// k, K1, temperature, tail_bucket, with_entropy, optional `<array>_layout T stride_b
// stride_t`) and one raw little-endian file per input array, `<name>.bin`; an optional
// input is absent when its file is. The op writes each output array to `<name>.out`.
// Rows run in one call over [0, N): the row split is the glue's business, not the kernel's.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu_isa.h"
#include "kernels/full_kl_cpu.h"
#include "kernels/sparse_cpu.h"
#include "kernels/token_logprobs_cpu.h"
#include "kernels/topk_indices_cpu.h"
#include "kernels/topk_kl_cpu.h"

namespace {
using namespace tike;

class Case {
 public:
  explicit Case(std::string dir) : dir_(std::move(dir)) {
    std::ifstream f(dir_ + "/params.txt");
    if (!f) throw std::runtime_error("no params.txt in " + dir_);
    std::string line;
    while (std::getline(f, line)) {
      std::istringstream s(line);
      std::string key, rest;
      if (s >> key && std::getline(s >> std::ws, rest)) params_[key] = rest;
    }
  }
  std::string str(const std::string& key) const {
    const auto it = params_.find(key);
    if (it == params_.end()) throw std::runtime_error(dir_ + ": no parameter " + key);
    return it->second;
  }
  int64_t i64(const std::string& key) const { return std::stoll(str(key)); }
  float f32(const std::string& key) const { return std::stof(str(key)); }
  bool flag(const std::string& key) const { return params_.count(key) && i64(key) != 0; }
  // Row layout of an input array: contiguous [N, V] unless `<name>_layout` is given.
  RowLayout layout(const std::string& name) const {
    if (!params_.count(name + "_layout")) return RowLayout::contiguous(i64("N"), i64("V"));
    RowLayout l;
    std::istringstream s(str(name + "_layout"));
    s >> l.T >> l.stride_b >> l.stride_t;
    return l;
  }

  // An input array (kept alive by this Case); null when its file is absent.
  template <class T>
  const T* in(const std::string& name, bool required = true) {
    std::ifstream f(dir_ + "/" + name + ".bin", std::ios::binary);
    if (!f) {
      if (required) throw std::runtime_error(dir_ + ": no input " + name);
      return nullptr;
    }
    auto& buf = inputs_[name];
    buf.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    buf.resize(buf.size() + 64);  // never empty: a zero-size array still has an address
    return reinterpret_cast<const T*>(buf.data());
  }
  // An output array of n elements, written to `<name>.out` by save().
  template <class T>
  T* out(const std::string& name, int64_t n) {
    auto& buf = outputs_[name];
    buf.assign(size_t(n) * sizeof(T) + 64, char(0));
    sizes_[name] = size_t(n) * sizeof(T);
    return reinterpret_cast<T*>(buf.data());
  }
  // Row-wise ascending copy of an int32 [N, K] input: the `sorted` the kernels walk.
  const int32_t* sorted_rows(const int32_t* rows, int64_t N, int64_t K) {
    auto& buf = inputs_["sorted"];
    buf.resize(size_t(N * K) * sizeof(int32_t) + 64);
    int32_t* s = reinterpret_cast<int32_t*>(buf.data());
    std::copy(rows, rows + N * K, s);
    for (int64_t n = 0; n < N; ++n) std::sort(s + n * K, s + (n + 1) * K);
    return s;
  }
  void save() const {
    for (const auto& [name, buf] : outputs_) {
      std::ofstream f(dir_ + "/" + name + ".out", std::ios::binary);
      f.write(buf.data(), std::streamsize(sizes_.at(name)));
      if (!f) throw std::runtime_error(dir_ + ": cannot write " + name);
    }
  }

 private:
  std::string dir_;
  std::map<std::string, std::string> params_;
  std::map<std::string, std::vector<char>> inputs_, outputs_;
  std::map<std::string, size_t> sizes_;
};

int64_t elem_bytes(DType dt) { return dt == DType::Float32 ? 4 : 2; }

// The fields every op's arguments share: the logits (input `logits`), dtype and shape.
template <class Args>
void set_logits(Case& c, Args& a) {
  a.logits = c.in<char>("logits");
  a.logits_layout = c.layout("logits");
  a.dtype = DType(c.i64("dtype"));
  a.N = c.i64("N");
  a.V = c.i64("V");
}

void run_case(Case& c) {
  const std::string op = c.str("op");
  const int64_t N = c.i64("N"), V = c.i64("V");
  const DType dt = DType(c.i64("dtype"));
  const float tau = c.f32("temperature");
  if (op == "topk_kl") {
    TopkKlForwardArgs a;
    set_logits(c, a);
    a.ref_logits = c.in<char>("ref_logits");
    a.ref_layout = c.layout("ref_logits");
    a.k = c.i64("k"), a.K1 = c.i64("K1");
    a.sampled_tokens = c.in<int64_t>("sampled_tokens", false);
    a.old_logprobs = c.in<float>("old_logprobs", false);
    a.mask = c.in<bool>("mask", false);
    a.temperature = tau, a.tail_bucket = c.flag("tail_bucket");
    a.out = c.out<float>("out", N);
    a.lse = c.out<float>("lse", 2 * N);
    a.idx = c.out<int32_t>("idx", N * a.K1);
    a.coef = c.out<float>("coef", N * a.K1);
    a.shift = c.out<float>("shift", N);
    a.stats = c.out<float>("stats", 3 * N);
    cpu::topk_kl_forward_rows(a, 0, N);
  } else if (op == "topk_kl_backward") {
    TopkKlBackwardArgs a;
    a.grad_out = c.in<float>("grad_out");
    set_logits(c, a);
    a.K1 = c.i64("K1");
    a.lse = c.in<float>("lse");
    a.idx = c.in<int32_t>("idx");
    a.coef = c.in<float>("coef");
    a.shift = c.in<float>("shift");
    a.mask = c.in<bool>("mask", false);
    a.temperature = tau;
    a.grad = c.out<char>("grad", N * V * elem_bytes(dt));
    a.grad_layout = RowLayout::contiguous(N, V);
    cpu::topk_kl_backward_rows(a, 0, N);
  } else if (op == "full_kl") {
    FullKlForwardArgs a;
    set_logits(c, a);
    a.ref_logits = c.in<char>("ref_logits");
    a.ref_layout = c.layout("ref_logits");
    a.mask = c.in<bool>("mask", false);
    a.temperature = tau;
    a.out = c.out<float>("out", N);
    a.lse_p = c.out<float>("lse_p", 2 * N);
    a.lse_q = c.out<float>("lse_q", 2 * N);
    cpu::full_kl_forward_rows(a, 0, N);
  } else if (op == "full_kl_backward") {
    FullKlBackwardArgs a;
    a.grad_out = c.in<float>("grad_out");
    set_logits(c, a);
    a.ref_logits = c.in<char>("ref_logits");
    a.ref_layout = c.layout("ref_logits");
    a.out = c.in<float>("out");
    a.lse_p = c.in<float>("lse_p");
    a.lse_q = c.in<float>("lse_q");
    a.mask = c.in<bool>("mask", false);
    a.temperature = tau;
    a.grad = c.out<char>("grad", N * V * elem_bytes(dt));
    cpu::full_kl_backward_rows(a, 0, N);
  } else if (op == "token_logprobs") {
    TokenLogprobsForwardArgs a;
    set_logits(c, a);
    a.tokens = c.in<int64_t>("tokens");
    a.temperature = tau;
    a.logp = c.out<float>("logp", N);
    a.entropy = c.flag("with_entropy") ? c.out<float>("entropy", N) : nullptr;
    a.lse = c.out<float>("lse", 2 * N);
    cpu::token_logprobs_forward_rows(a, 0, N);
  } else if (op == "token_logprobs_backward") {
    TokenLogprobsBackwardArgs a;
    a.grad_logp = c.in<float>("grad_logp");
    a.grad_entropy = c.in<float>("grad_entropy", false);
    set_logits(c, a);
    a.tokens = c.in<int64_t>("tokens");
    a.lse = c.in<float>("lse");
    a.entropy = c.in<float>("entropy", false);
    a.temperature = tau;
    a.grad = c.out<char>("grad", N * V * elem_bytes(dt));
    cpu::token_logprobs_backward_rows(a, 0, N);
  } else if (op == "topk_indices") {
    TopkIndicesArgs a;
    set_logits(c, a);
    a.k = c.i64("k");
    a.mask = c.in<bool>("mask", false);
    a.idx = c.out<int32_t>("idx", N * a.k);
    cpu::topk_indices_rows(a, 0, N);
  } else if (op == "sparse_reference") {
    SparseReferenceArgs a;
    a.ref_logits = c.in<char>("ref_logits");
    a.ref_layout = c.layout("ref_logits");
    a.dtype = dt, a.N = N, a.V = V, a.k = c.i64("k"), a.K1 = c.i64("K1");
    a.support = c.in<int32_t>("support");
    a.sorted = c.sorted_rows(a.support, N, a.k);
    a.sampled_tokens = c.in<int64_t>("sampled_tokens", false);
    a.mask = c.in<bool>("mask", false);
    a.temperature = tau;
    a.idx = c.out<int32_t>("idx", N * a.K1);
    a.logprobs = c.out<float>("logprobs", N * a.K1);
    a.tail_logmass = c.out<float>("tail_logmass", N);
    cpu::sparse_reference_rows(a, 0, N);
  } else if (op == "topk_kl_sparse") {
    TopkKlSparseArgs a;
    set_logits(c, a);
    a.K1 = c.i64("K1");
    a.idx = c.in<int32_t>("idx");
    a.sorted = c.sorted_rows(a.idx, N, a.K1);
    a.ref_logprobs = c.in<float>("ref_logprobs");
    a.ref_tail_logmass = c.in<float>("ref_tail_logmass");
    a.sampled_tokens = c.in<int64_t>("sampled_tokens", false);
    a.old_logprobs = c.in<float>("old_logprobs", false);
    a.mask = c.in<bool>("mask", false);
    a.temperature = tau, a.tail_bucket = c.flag("tail_bucket");
    a.out = c.out<float>("out", N);
    a.lse = c.out<float>("lse", 2 * N);
    a.coef = c.out<float>("coef", N * a.K1);
    a.shift = c.out<float>("shift", N);
    a.stats = c.out<float>("stats", 3 * N);
    cpu::topk_kl_sparse_rows(a, 0, N);
  } else {
    throw std::runtime_error("unknown op " + op);
  }
  c.save();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "isa") {
#if defined(__ARM_NEON)
      const char* neon = "yes";
#else
      const char* neon = "no";
#endif
      std::printf("isa %s\nneon %s\nsupported %s\n",
                  tike::cpu::isa_name(tike::cpu::active_isa()), neon,
                  tike::cpu::supported_isa_names().c_str());
      return 0;
    }
    if (cmd != "run" || argc < 3) {
      std::fprintf(stderr, "usage: %s isa | run DIR...\n", argv[0]);
      return 2;
    }
    for (int i = 2; i < argc; ++i) {
      Case c(argv[i]);
      run_case(c);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cpu_kernels_driver: %s\n", e.what());
    return 1;
  }
}
