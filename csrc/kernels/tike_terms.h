// The TIKE value and backward coefficients of one row from the log-probs of its S~
// entries (docs/kernels.md), in double, written once for the CPU and CUDA kernels of the
// fixed-support op. With lp_v = log p_v, lq_v = log q_v over v ∈ S~:
//   D = Σ p_v (lp_v − lq_v),  C = Σ p_v (lp_v − lq_v + 1),  m_p = Σ p_v,  m_q = Σ q_v;
//   tail bucket: T = t_p log(t_p/t_q), b = log(t_p/t_q) + 1 (both 0 when t_p = 0);
//   coef_v = (r/τ)(lp_v − lq_v + 1 − b) where p_v ≠ 0,  shift = (r/τ)(C − m_p b).
// A term with p_v = 0 counts 0 whatever lq_v is; NaN propagates.
#pragma once
#include <cmath>

#include "row_layout.h"

namespace tike {

struct TikeHead {
  double D = 0.0, C = 0.0, m_p = 0.0, m_q = 0.0;

  TIKE_HD void add(double lp, double lq) {
    const double p = exp(lp);
    m_p += p;
    m_q += exp(lq);
    if (p != 0.0) {  // 0 · log 0 counts as 0 (a NaN p stays NaN)
      D += p * (lp - lq);
      C += p * (lp - lq + 1.0);
    }
  }
};

struct TikeTail {
  double T = 0.0, b = 0.0;
};

// From log t_p and log t_q, t = Σ_{v∉S~} of p or q, each taken from a direct tail sum
// (kept as a logarithm: a tail below the float range keeps its digits). T = b = 0 when
// t_p = 0 in double; NaN propagates.
TIKE_HD TikeTail tike_tail(double log_tp, double log_tq) {
  TikeTail t;
  const double t_p = exp(log_tp);
  if (t_p != 0.0) {
    const double log_ratio = log_tp - log_tq;
    t.T = t_p * log_ratio;
    t.b = log_ratio + 1.0;
  }
  return t;
}

// coef of one S~ entry; scale = r/τ.
TIKE_HD float tike_coef(double lp, double lq, double scale, double b) {
  return exp(lp) != 0.0 ? float(scale * (lp - lq + 1.0 - b)) : 0.f;
}

}  // namespace tike
