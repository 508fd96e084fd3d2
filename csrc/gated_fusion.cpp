// Gated expert fusion: operator schemas, the CPU implementation and the Python module stub.
//
// Forward, per user b with packed pairs k in offsets[b]:offsets[b+1], per position l:
//   den_fin[l]  = sum_k m_k[l] g_k[l] + eps,        z_fin[l]  = sum_k m_k[l] g_k[l] fin_k[l] / den_fin[l]
//   den_coar[l] = sum_k m_k[l] (1 - g_k[l]) + eps,  z_coar[l] = sum_k m_k[l] (1 - g_k[l]) coar_k[l] / den_coar[l]
//   gate = sigmoid(z_coar W^T + b)   (the matrix product over all B * L positions is an ATen call)
//   h = gate * z_fin + (1 - gate) * z_coar
// The segment sums, normalisations, sigmoid and combine are single passes with the sums kept in
// the accumulation dtype; the backward uses the saved z_fin, z_coar, gate and denominators.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "gated_fusion.h"

namespace adarec {
namespace {

template <typename scalar_t, typename acc_t>
void segment_means_cpu(const at::Tensor& fin, const at::Tensor& coar, const at::Tensor& g, const at::Tensor& m,
                       const at::Tensor& offsets, at::Tensor& z_fin, at::Tensor& z_coar, at::Tensor& den_fin,
                       at::Tensor& den_coar) {
  const int64_t B = offsets.size(0) - 1, L = fin.size(1), D = fin.size(2), LD = L * D;
  const auto* fin_p = fin.data_ptr<scalar_t>();
  const auto* coar_p = coar.data_ptr<scalar_t>();
  const auto* g_p = g.data_ptr<scalar_t>();
  const auto* m_p = m.data_ptr<scalar_t>();
  const auto* off = offsets.data_ptr<int64_t>();
  auto* zf = z_fin.data_ptr<scalar_t>();
  auto* zc = z_coar.data_ptr<scalar_t>();
  auto* df = den_fin.data_ptr<acc_t>();
  auto* dc = den_coar.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_f(LD), acc_c(LD), sum_f(L), sum_c(L);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc_f.begin(), acc_f.end(), acc_t(0));
      std::fill(acc_c.begin(), acc_c.end(), acc_t(0));
      std::fill(sum_f.begin(), sum_f.end(), acc_t(0));
      std::fill(sum_c.begin(), sum_c.end(), acc_t(0));
      for (int64_t k = off[b]; k < off[b + 1]; ++k) {
        for (int64_t l = 0; l < L; ++l) {
          const acc_t gk = g_p[k * L + l], mk = m_p[k * L + l];
          const acc_t wf = mk * gk, wc = mk * (acc_t(1) - gk);
          sum_f[l] += wf;
          sum_c[l] += wc;
          const scalar_t* frow = fin_p + k * LD + l * D;
          const scalar_t* crow = coar_p + k * LD + l * D;
          acc_t* af = acc_f.data() + l * D;
          acc_t* ac = acc_c.data() + l * D;
          for (int64_t d = 0; d < D; ++d) {
            af[d] += wf * static_cast<acc_t>(frow[d]);
            ac[d] += wc * static_cast<acc_t>(crow[d]);
          }
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        const acc_t den_f = sum_f[l] + acc_t(kFusionEps), den_c = sum_c[l] + acc_t(kFusionEps);
        df[b * L + l] = den_f;
        dc[b * L + l] = den_c;
        for (int64_t d = 0; d < D; ++d) {
          zf[b * LD + l * D + d] = static_cast<scalar_t>(acc_f[l * D + d] / den_f);
          zc[b * LD + l * D + d] = static_cast<scalar_t>(acc_c[l * D + d] / den_c);
        }
      }
    }
  });
}

// gate = sigmoid(pre) and h = gate * z_fin + (1 - gate) * z_coar, elementwise over [B, L, D].
template <typename scalar_t, typename acc_t>
void gate_combine_cpu(const at::Tensor& pre, const at::Tensor& z_fin, const at::Tensor& z_coar, at::Tensor& gate,
                      at::Tensor& h) {
  const int64_t total = z_fin.numel();
  const auto* pre_p = pre.data_ptr<scalar_t>();
  const auto* zf = z_fin.data_ptr<scalar_t>();
  const auto* zc = z_coar.data_ptr<scalar_t>();
  auto* gate_p = gate.data_ptr<scalar_t>();
  auto* h_p = h.data_ptr<scalar_t>();
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gt = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(pre_p[i])));
      gate_p[i] = static_cast<scalar_t>(gt);
      h_p[i] = static_cast<scalar_t>(gt * static_cast<acc_t>(zf[i]) + (acc_t(1) - gt) * static_cast<acc_t>(zc[i]));
    }
  });
}

ForwardResult gated_fusion_forward_cpu(const at::Tensor& fin, const at::Tensor& coar, const at::Tensor& g,
                                       const at::Tensor& m, const at::Tensor& offsets, const at::Tensor& w_gate,
                                       const at::Tensor& b_gate) {
  check_fusion_inputs(fin, coar, g, m, offsets, w_gate);
  check_gate_bias(b_gate, fin);
  // Read through the pointer (a CPU tensor): indexing + item() would go through ATen's dispatcher
  // and show as a host read in the sync-free profile of a step.
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[offsets.size(0) - 1] == fin.size(0),
              "gated_fusion: offsets must start at 0 and end at P = ", fin.size(0));
  const int64_t B = offsets.size(0) - 1, L = fin.size(1), D = fin.size(2);
  const auto acc = accumulate_type(fin.scalar_type());
  auto z_fin = at::empty({B, L, D}, fin.options());
  auto z_coar = at::empty({B, L, D}, fin.options());
  auto den_fin = at::empty({B, L}, fin.options().dtype(acc));
  auto den_coar = at::empty({B, L}, fin.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    segment_means_cpu<scalar_t, acc_t>(fin, coar, g, m, offsets, z_fin, z_coar, den_fin, den_coar);
  });
  const auto pre = at::linear(z_coar, w_gate, b_gate).contiguous();
  auto gate = at::empty({B, L, D}, fin.options());
  auto h = at::empty({B, L, D}, fin.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_combine_cpu<scalar_t, acc_t>(pre, z_fin, z_coar, gate, h);
  });
  return {h, z_coar, z_fin, gate, den_fin, den_coar};
}

// Elementwise over [B, L, D]: d pre-activation of the gate and the direct gradient of z_coar.
template <typename scalar_t, typename acc_t>
void gate_grad_cpu(const at::Tensor& grad_h, const at::Tensor& grad_zc, const at::Tensor& z_fin,
                   const at::Tensor& z_coar, const at::Tensor& gate, at::Tensor& d_pre, at::Tensor& d_zc) {
  const int64_t total = z_fin.numel();
  const auto* gh = grad_h.data_ptr<scalar_t>();
  const auto* gzc = grad_zc.data_ptr<scalar_t>();
  const auto* zf = z_fin.data_ptr<scalar_t>();
  const auto* zc = z_coar.data_ptr<scalar_t>();
  const auto* gt_p = gate.data_ptr<scalar_t>();
  auto* dp = d_pre.data_ptr<acc_t>();
  auto* dz = d_zc.data_ptr<acc_t>();
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t gt = gt_p[i], gi = gh[i];
      dp[i] = gi * (static_cast<acc_t>(zf[i]) - static_cast<acc_t>(zc[i])) * gt * (acc_t(1) - gt);
      dz[i] = gi * (acc_t(1) - gt) + static_cast<acc_t>(gzc[i]);
    }
  });
}

// Gradients of the packed inputs: fin, coar and the two per-(pair, position) weights, folded
// into g [P, L] and m [P, L].
template <typename scalar_t, typename acc_t>
void pair_grad_cpu(const at::Tensor& grad_h, const at::Tensor& d_zc, const at::Tensor& fin, const at::Tensor& coar,
                   const at::Tensor& g, const at::Tensor& m, const at::Tensor& offsets, const at::Tensor& z_fin,
                   const at::Tensor& z_coar, const at::Tensor& gate, const at::Tensor& den_fin,
                   const at::Tensor& den_coar, at::Tensor& d_fin, at::Tensor& d_coar, at::Tensor& d_g,
                   at::Tensor& d_m) {
  const int64_t B = offsets.size(0) - 1, L = fin.size(1), D = fin.size(2), LD = L * D;
  const auto* gh = grad_h.data_ptr<scalar_t>();
  const auto* dz = d_zc.data_ptr<acc_t>();
  const auto* fin_p = fin.data_ptr<scalar_t>();
  const auto* coar_p = coar.data_ptr<scalar_t>();
  const auto* g_p = g.data_ptr<scalar_t>();
  const auto* m_p = m.data_ptr<scalar_t>();
  const auto* off = offsets.data_ptr<int64_t>();
  const auto* zf = z_fin.data_ptr<scalar_t>();
  const auto* zc = z_coar.data_ptr<scalar_t>();
  const auto* gt_p = gate.data_ptr<scalar_t>();
  const auto* df = den_fin.data_ptr<acc_t>();
  const auto* dc = den_coar.data_ptr<acc_t>();
  auto* dfin = d_fin.data_ptr<scalar_t>();
  auto* dcoar = d_coar.data_ptr<scalar_t>();
  auto* dg = d_g.data_ptr<scalar_t>();
  auto* dm = d_m.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = off[b]; k < off[b + 1]; ++k) {
        for (int64_t l = 0; l < L; ++l) {
          const acc_t gk = g_p[k * L + l], mk = m_p[k * L + l];
          const acc_t wf = mk * gk, wc = mk * (acc_t(1) - gk);
          const acc_t inv_df = acc_t(1) / df[b * L + l], inv_dc = acc_t(1) / dc[b * L + l];
          // z = sum_k w_k x_k / (sum_k w_k + eps): dz/dx_k = w_k / den, dz/dw_k = (x_k - z) / den.
          acc_t dwf = 0, dwc = 0;
          const int64_t row = k * LD + l * D, out = b * LD + l * D;
          for (int64_t d = 0; d < D; ++d) {
            const acc_t dzf = static_cast<acc_t>(gh[out + d]) * static_cast<acc_t>(gt_p[out + d]) * inv_df;
            dfin[row + d] = static_cast<scalar_t>(wf * dzf);
            dwf += dzf * (static_cast<acc_t>(fin_p[row + d]) - static_cast<acc_t>(zf[out + d]));
            const acc_t dzc = dz[out + d] * inv_dc;
            dcoar[row + d] = static_cast<scalar_t>(wc * dzc);
            dwc += dzc * (static_cast<acc_t>(coar_p[row + d]) - static_cast<acc_t>(zc[out + d]));
          }
          dg[k * L + l] = static_cast<scalar_t>(mk * (dwf - dwc));
          dm[k * L + l] = static_cast<scalar_t>(gk * dwf + (acc_t(1) - gk) * dwc);
        }
      }
    }
  });
}

BackwardResult gated_fusion_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_z_coar,
                                         const at::Tensor& fin, const at::Tensor& coar, const at::Tensor& g,
                                         const at::Tensor& m, const at::Tensor& offsets, const at::Tensor& w_gate,
                                         const at::Tensor& z_fin, const at::Tensor& z_coar, const at::Tensor& gate,
                                         const at::Tensor& den_fin, const at::Tensor& den_coar) {
  check_backward_inputs(grad_h, grad_z_coar, fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin,
                        den_coar);
  const auto acc = accumulate_type(fin.scalar_type());
  auto d_pre = at::empty(z_fin.sizes(), fin.options().dtype(acc));
  auto d_zc = at::empty(z_fin.sizes(), fin.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_gate_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_grad_cpu<scalar_t, acc_t>(grad_h, grad_z_coar, z_fin, z_coar, gate, d_pre, d_zc);
  });
  const auto [d_w, d_b] = gate_linear_backward(d_pre, z_coar, w_gate, d_zc);
  auto d_fin = at::empty_like(fin);
  auto d_coar = at::empty_like(coar);
  auto d_g = at::empty_like(g);
  auto d_m = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_pair_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pair_grad_cpu<scalar_t, acc_t>(grad_h, d_zc, fin, coar, g, m, offsets, z_fin, z_coar, gate, den_fin, den_coar,
                                   d_fin, d_coar, d_g, d_m);
  });
  return {d_fin, d_coar, d_g, d_m, d_w, d_b};
}

}  // namespace

TORCH_LIBRARY(adarec, lib) {
  lib.def(
      "gated_fusion_forward(Tensor fin, Tensor coar, Tensor g, Tensor m, Tensor offsets, Tensor w_gate, "
      "Tensor b_gate) -> (Tensor h, Tensor z_coar, Tensor z_fin, Tensor gate, Tensor den_fin, Tensor den_coar)");
  lib.def(
      "gated_fusion_backward(Tensor grad_h, Tensor grad_z_coar, Tensor fin, Tensor coar, Tensor g, Tensor m, "
      "Tensor offsets, Tensor w_gate, Tensor z_fin, Tensor z_coar, Tensor gate, Tensor den_fin, Tensor den_coar) "
      "-> (Tensor d_fin, Tensor d_coar, Tensor d_g, Tensor d_m, Tensor d_w_gate, Tensor d_b_gate)");
}

TORCH_LIBRARY_IMPL(adarec, CPU, lib) {
  lib.impl("gated_fusion_forward", &gated_fusion_forward_cpu);
  lib.impl("gated_fusion_backward", &gated_fusion_backward_cpu);
}

}  // namespace adarec

// Importing adarec._C registers the operators above with torch.ops.adarec; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
