// The tail mass Σ_{v∉S~} p_v of a row on the CPU (torch-free), shared by topk_kl's
// reference pass and the fixed-support kernels: an online log-sum-exp of its own over
// the row with the S~ columns set to −inf, relative to the tail's own max. So a tail far
// below the float range (t_p ~ 1e-60) keeps its digits, and it is a sum of the tail
// terms, never 1 − Σ_{S~} p_v (which cancels when the head holds ~all the mass).
#pragma once
#include <cmath>
#include <cstring>

#include "cpu_simd.h"

namespace tike::cpu {

// A cursor over the S~ columns of a row, ascending (`col(e)` gives the column of entry
// e), walked tile by tile in column order.
template <class Col>
struct MemberCursor {
  Col col;
  size_t count = 0, next = 0;

  // Moves past the entries of the tile [j0, j0 + n); returns the first of them (they are
  // [first, next) after the call).
  TIKE_INLINE size_t advance(int64_t j0, int n) {
    const size_t first = next;
    while (next < count && col(next) < j0 + n) ++next;
    return first;
  }
  // The padded tile x[0, npad) of columns j0 .. with the entries [first, next) set to
  // −inf: x itself when there are none, else a copy in buf (buf may be x).
  TIKE_INLINE const float* mask(const float* x, int npad, int64_t j0, size_t first,
                                float* buf) const {
    if (next == first) return x;
    if (x != buf) std::memcpy(buf, x, sizeof(float) * size_t(npad));
    for (size_t e = first; e < next; ++e) buf[col(e) - j0] = -kInf;
    return buf;
  }
};
template <class Col>
MemberCursor<Col> member_cursor(Col col, size_t count) {
  return MemberCursor<Col>{col, count};
}

// log Σ_{v∉S~} p_v from the tail's own online log-sum-exp (relative to the tail's max)
// and the row's pair: NaN when the row is, −inf for an empty tail.
template <class S>
TIKE_INLINE double log_tail(const OnlineLse<S>& tail, const LsePair& row, float s) {
  if (tail.bad() || std::isnan(row.max) || std::isnan(row.log_sum)) return double(kNaN);
  if (!(tail.sum > 0.0)) return -double(kInf);
  return (double(tail.M) - double(row.max)) * s + std::log(tail.sum) - double(row.log_sum);
}

}  // namespace tike::cpu
