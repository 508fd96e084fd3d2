// Gated expert fusion (docs/method.md 2.3): shared declarations and input checks of the CPU and
// CUDA implementations. The eager twin and the definition of every quantity is adarec/fusion.py.
// Everything is per position (training is causal): coar [P, L, D], g and m [P, L], outputs [B, L, D].
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>
#include <vector>

namespace adarec {

// Added to the denominators of the weighted means, as in the eager twin.
constexpr double kFusionEps = 1e-8;

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks what every entry point needs: shapes, one device, one floating dtype, int64 offsets,
// contiguous storage. Each failure names the argument and what is wrong with it.
inline void check_fusion_inputs(const at::Tensor& fin, const at::Tensor& coar, const at::Tensor& g,
                                const at::Tensor& m, const at::Tensor& offsets, const at::Tensor& w_gate) {
  TORCH_CHECK(fin.dim() == 3, "gated_fusion: fin must be [P, L, D], got ", fin.sizes());
  const auto P = fin.size(0), L = fin.size(1), D = fin.size(2);
  TORCH_CHECK(coar.sizes() == fin.sizes(), "gated_fusion: coar must be [P, L, D] = [", P, ", ", L, ", ", D,
              "], got ", coar.sizes());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == P && g.size(1) == L, "gated_fusion: g must be [P, L] = [", P, ", ", L,
              "], got ", g.sizes());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == P && m.size(1) == L, "gated_fusion: m must be [P, L] = [", P, ", ", L,
              "], got ", m.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, "gated_fusion: offsets must be [B + 1], got ",
              offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "gated_fusion: offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(w_gate.dim() == 2 && w_gate.size(0) == D && w_gate.size(1) == D,
              "gated_fusion: w_gate must be [D, D] = [", D, ", ", D, "], got ", w_gate.sizes());
  TORCH_CHECK(at::isFloatingType(fin.scalar_type()), "gated_fusion: fin must be floating point, got ",
              fin.scalar_type());
  const std::vector<std::pair<const char*, const at::Tensor*>> same_dtype = {
      {"coar", &coar}, {"g", &g}, {"m", &m}, {"w_gate", &w_gate}};
  for (const auto& [name, t] : same_dtype) {
    TORCH_CHECK(t->scalar_type() == fin.scalar_type(), "gated_fusion: ", name, " must have fin's dtype ",
                fin.scalar_type(), ", got ", t->scalar_type());
  }
  const std::vector<std::pair<const char*, const at::Tensor*>> all = {
      {"fin", &fin}, {"coar", &coar}, {"g", &g}, {"m", &m}, {"offsets", &offsets}, {"w_gate", &w_gate}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->device() == fin.device(), "gated_fusion: ", name, " is on ", t->device(),
                " but fin is on ", fin.device());
    TORCH_CHECK(t->is_contiguous(), "gated_fusion: ", name, " must be contiguous");
  }
}

inline void check_gate_bias(const at::Tensor& b_gate, const at::Tensor& fin) {
  TORCH_CHECK(b_gate.dim() == 1 && b_gate.size(0) == fin.size(2), "gated_fusion: b_gate must be [D] = [",
              fin.size(2), "], got ", b_gate.sizes());
  TORCH_CHECK(b_gate.scalar_type() == fin.scalar_type(), "gated_fusion: b_gate must have fin's dtype ",
              fin.scalar_type(), ", got ", b_gate.scalar_type());
  TORCH_CHECK(b_gate.device() == fin.device(), "gated_fusion: b_gate is on ", b_gate.device(), " but fin is on ",
              fin.device());
}

// The tensors the forward saved, as the backward receives them back.
inline void check_saved_for_backward(const at::Tensor& fin, const at::Tensor& offsets, const at::Tensor& z_fin,
                                     const at::Tensor& z_coar, const at::Tensor& gate, const at::Tensor& den_fin,
                                     const at::Tensor& den_coar) {
  const auto B = offsets.size(0) - 1, L = fin.size(1), D = fin.size(2);
  TORCH_CHECK(z_fin.sizes() == at::IntArrayRef({B, L, D}) && z_coar.sizes() == at::IntArrayRef({B, L, D}) &&
                  gate.sizes() == at::IntArrayRef({B, L, D}) && den_fin.sizes() == at::IntArrayRef({B, L}) &&
                  den_coar.sizes() == at::IntArrayRef({B, L}),
              "gated_fusion backward: the saved z_fin / z_coar / gate / denominators do not match B = ", B,
              ", L = ", L, ", D = ", D);
  for (const at::Tensor* t : {&z_fin, &z_coar, &gate, &den_fin, &den_coar}) {
    TORCH_CHECK(t->device() == fin.device() && t->is_contiguous(),
                "gated_fusion backward: saved tensors must be contiguous and on ", fin.device());
  }
}

inline void check_backward_inputs(const at::Tensor& grad_h, const at::Tensor& grad_z_coar, const at::Tensor& fin,
                                  const at::Tensor& coar, const at::Tensor& g, const at::Tensor& m,
                                  const at::Tensor& offsets, const at::Tensor& w_gate, const at::Tensor& z_fin,
                                  const at::Tensor& z_coar, const at::Tensor& gate, const at::Tensor& den_fin,
                                  const at::Tensor& den_coar) {
  check_fusion_inputs(fin, coar, g, m, offsets, w_gate);
  check_saved_for_backward(fin, offsets, z_fin, z_coar, gate, den_fin, den_coar);
  const std::vector<std::tuple<const char*, const at::Tensor*, const at::Tensor*>> grads = {
      {"grad_h", &grad_h, &z_fin}, {"grad_z_coar", &grad_z_coar, &z_coar}};
  for (const auto& [name, grad, like] : grads) {
    TORCH_CHECK(grad->sizes() == like->sizes() && grad->scalar_type() == fin.scalar_type() &&
                    grad->is_contiguous() && grad->device() == fin.device(),
                "gated_fusion backward: ", name, " must be a contiguous ", fin.scalar_type(), " tensor of shape ",
                like->sizes(), " on ", fin.device(), ", got ", grad->scalar_type(), " ", grad->sizes(), " on ",
                grad->device());
  }
}

// The accumulation dtype: float for float/half/bfloat16, double for double.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Backward of the gate's linear layer pre = z_coar W^T + b over the B * L positions, as ATen
// products in the accumulation dtype of d_pre ([B, L, D]): returns (dW, db) in W's dtype and
// adds d_pre W to d_zc ([B, L, D], same dtype as d_pre).
inline std::pair<at::Tensor, at::Tensor> gate_linear_backward(const at::Tensor& d_pre, const at::Tensor& z_coar,
                                                              const at::Tensor& w_gate, at::Tensor& d_zc) {
  const auto acc = d_pre.scalar_type();
  const auto D = w_gate.size(0);
  const auto d_pre2 = d_pre.reshape({-1, D});
  d_zc.view({-1, D}).add_(d_pre2.mm(w_gate.to(acc)));
  return {d_pre2.t().mm(z_coar.reshape({-1, D}).to(acc)).to(w_gate.scalar_type()),
          d_pre2.sum(0).to(w_gate.scalar_type())};
}

}  // namespace adarec
