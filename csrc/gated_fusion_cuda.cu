// Gated expert fusion, CUDA implementation (the math is described in gated_fusion.cpp).
//
// Everything is per position: coar [P, L, D], g and m [P, L], outputs [B, L, D].
// Forward: one kernel per weighted mean (users x column blocks of the L * D columns; each
// thread walks its user's few levels), the gate's matrix product through ATen (cuBLAS), one
// elementwise kernel for sigmoid + combine. Backward: an elementwise kernel for the gate, ATen
// products for the gate's linear layer, and one warp per (pair, position) that writes d fin /
// d coar and reduces the two weight gradients over D with warp shuffles. All sums in float
// (double for double inputs).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gated_fusion.h"

namespace adarec {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;

// Weighted mean of the packed rows x [P, L * D] per user and position:
// out[b, l, :] = sum_k w_k[l] x_k[l, :] / (sum_k w_k[l] + eps), w_k[l] = m_k[l] g_k[l] (fine) or
// m_k[l] (1 - g_k[l]) (coarse); den_out [B, L] keeps the denominators for the backward.
template <typename scalar_t, typename acc_t, bool kCoarse>
__global__ void segment_mean_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                    const scalar_t* __restrict__ m, const int64_t* __restrict__ offsets,
                                    int64_t L, int64_t D, scalar_t* __restrict__ out, acc_t* __restrict__ den_out) {
  const int64_t b = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t width = L * D;
  if (j >= width) return;
  const int64_t l = j / D;
  const int64_t k0 = offsets[b], k1 = offsets[b + 1];
  acc_t sum = 0, den = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k * L + l]);
    const acc_t w = static_cast<acc_t>(m[k * L + l]) * (kCoarse ? acc_t(1) - gk : gk);
    den += w;
    sum += w * static_cast<acc_t>(x[k * width + j]);
  }
  den += acc_t(kFusionEps);
  out[b * width + j] = static_cast<scalar_t>(sum / den);
  if (j % D == 0) den_out[b * L + l] = den;
}

template <typename scalar_t, typename acc_t>
__global__ void gate_combine_kernel(const scalar_t* __restrict__ pre, const scalar_t* __restrict__ z_fin,
                                    const scalar_t* __restrict__ z_coar, int64_t total, scalar_t* __restrict__ gate,
                                    scalar_t* __restrict__ h) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const acc_t gt = acc_t(1) / (acc_t(1) + exp(-static_cast<acc_t>(pre[i])));
  gate[i] = static_cast<scalar_t>(gt);
  h[i] = static_cast<scalar_t>(gt * static_cast<acc_t>(z_fin[i]) + (acc_t(1) - gt) * static_cast<acc_t>(z_coar[i]));
}

template <typename scalar_t, typename acc_t>
__global__ void gate_grad_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ grad_zc,
                                 const scalar_t* __restrict__ z_fin, const scalar_t* __restrict__ z_coar,
                                 const scalar_t* __restrict__ gate, int64_t total, acc_t* __restrict__ d_pre,
                                 acc_t* __restrict__ d_zc) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const acc_t gt = static_cast<acc_t>(gate[i]), gi = static_cast<acc_t>(grad_h[i]);
  d_pre[i] = gi * (static_cast<acc_t>(z_fin[i]) - static_cast<acc_t>(z_coar[i])) * gt * (acc_t(1) - gt);
  d_zc[i] = gi * (acc_t(1) - gt) + static_cast<acc_t>(grad_zc[i]);
}

template <typename acc_t>
__device__ acc_t warp_sum(acc_t value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// The user owning packed pair p: the last b with offsets[b] <= p.
__device__ int64_t owner_of(const int64_t* offsets, int64_t num_users, int64_t p) {
  int64_t lo = 0, hi = num_users - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= p) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// One warp per (pair k, position l); a whole warp shares its row, so it exits together.
template <typename scalar_t, typename acc_t>
__global__ void pair_grad_kernel(const scalar_t* __restrict__ grad_h, const acc_t* __restrict__ d_zc,
                                 const scalar_t* __restrict__ fin, const scalar_t* __restrict__ coar,
                                 const scalar_t* __restrict__ g, const scalar_t* __restrict__ m,
                                 const int64_t* __restrict__ offsets, int64_t num_users,
                                 const scalar_t* __restrict__ z_fin, const scalar_t* __restrict__ z_coar,
                                 const scalar_t* __restrict__ gate, const acc_t* __restrict__ den_fin,
                                 const acc_t* __restrict__ den_coar, int64_t P, int64_t L, int64_t D,
                                 scalar_t* __restrict__ d_fin, scalar_t* __restrict__ d_coar,
                                 scalar_t* __restrict__ d_g, scalar_t* __restrict__ d_m) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= P * L) return;
  const int64_t k = row / L, l = row % L;
  const int64_t b = owner_of(offsets, num_users, k);
  const acc_t gk = static_cast<acc_t>(g[row]), mk = static_cast<acc_t>(m[row]);
  const acc_t wf = mk * gk, wc = mk * (acc_t(1) - gk);
  const acc_t inv_df = acc_t(1) / den_fin[b * L + l], inv_dc = acc_t(1) / den_coar[b * L + l];
  const int64_t in = row * D, out = (b * L + l) * D;
  // z = sum_k w_k x_k / (sum_k w_k + eps): dz/dx_k = w_k / den, dz/dw_k = (x_k - z) / den.
  acc_t dwf = 0, dwc = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t dzf = static_cast<acc_t>(grad_h[out + d]) * static_cast<acc_t>(gate[out + d]) * inv_df;
    d_fin[in + d] = static_cast<scalar_t>(wf * dzf);
    dwf += dzf * (static_cast<acc_t>(fin[in + d]) - static_cast<acc_t>(z_fin[out + d]));
    const acc_t dzc = d_zc[out + d] * inv_dc;
    d_coar[in + d] = static_cast<scalar_t>(wc * dzc);
    dwc += dzc * (static_cast<acc_t>(coar[in + d]) - static_cast<acc_t>(z_coar[out + d]));
  }
  dwf = warp_sum(dwf);
  dwc = warp_sum(dwc);
  if (lane == 0) {
    d_g[row] = static_cast<scalar_t>(mk * (dwf - dwc));
    d_m[row] = static_cast<scalar_t>(gk * dwf + (acc_t(1) - gk) * dwc);
  }
}

unsigned int blocks_for(int64_t n, int64_t per_block = kThreads) {
  return static_cast<unsigned int>((n + per_block - 1) / per_block);
}

ForwardResult gated_fusion_forward_cuda(const at::Tensor& fin, const at::Tensor& coar, const at::Tensor& g,
                                        const at::Tensor& m, const at::Tensor& offsets, const at::Tensor& w_gate,
                                        const at::Tensor& b_gate) {
  check_fusion_inputs(fin, coar, g, m, offsets, w_gate);
  check_gate_bias(b_gate, fin);
  const c10::cuda::CUDAGuard guard(fin.device());
  const int64_t B = offsets.size(0) - 1, L = fin.size(1), D = fin.size(2);
  const auto acc = accumulate_type(fin.scalar_type());
  auto z_fin = at::empty({B, L, D}, fin.options());
  auto z_coar = at::empty({B, L, D}, fin.options());
  auto den_fin = at::empty({B, L}, fin.options().dtype(acc));
  auto den_coar = at::empty({B, L}, fin.options().dtype(acc));
  auto gate = at::empty({B, L, D}, fin.options());
  auto h = at::empty({B, L, D}, fin.options());
  // Users on grid x (up to 2^31 - 1), column blocks on grid y (up to 65535 x 256 columns).
  TORCH_CHECK(blocks_for(L * D) <= 65535, "gated_fusion: L * D = ", L * D, " is too large for the CUDA grid");
  if (B == 0 || L * D == 0) {
    return {h.zero_(), z_coar.zero_(), z_fin.zero_(), gate.zero_(), den_fin.zero_(), den_coar.zero_()};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(B, blocks_for(L * D));
    segment_mean_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(
        fin.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), L, D,
        z_fin.data_ptr<scalar_t>(), den_fin.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    segment_mean_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
        coar.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), L,
        D, z_coar.data_ptr<scalar_t>(), den_coar.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto pre = at::linear(z_coar, w_gate, b_gate).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_combine_kernel<scalar_t, acc_t><<<blocks_for(B * L * D), kThreads, 0, stream>>>(
        pre.data_ptr<scalar_t>(), z_fin.data_ptr<scalar_t>(), z_coar.data_ptr<scalar_t>(), B * L * D,
        gate.data_ptr<scalar_t>(), h.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {h, z_coar, z_fin, gate, den_fin, den_coar};
}

BackwardResult gated_fusion_backward_cuda(const at::Tensor& grad_h, const at::Tensor& grad_z_coar,
                                          const at::Tensor& fin, const at::Tensor& coar, const at::Tensor& g,
                                          const at::Tensor& m, const at::Tensor& offsets, const at::Tensor& w_gate,
                                          const at::Tensor& z_fin, const at::Tensor& z_coar, const at::Tensor& gate,
                                          const at::Tensor& den_fin, const at::Tensor& den_coar) {
  check_backward_inputs(grad_h, grad_z_coar, fin, coar, g, m, offsets, w_gate, z_fin, z_coar, gate, den_fin,
                        den_coar);
  const c10::cuda::CUDAGuard guard(fin.device());
  const int64_t B = offsets.size(0) - 1, P = fin.size(0), L = fin.size(1), D = fin.size(2);
  const auto acc = accumulate_type(fin.scalar_type());
  auto d_pre = at::zeros({B, L, D}, fin.options().dtype(acc));
  auto d_zc = at::zeros({B, L, D}, fin.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (B * L * D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_gate_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gate_grad_kernel<scalar_t, acc_t><<<blocks_for(B * L * D), kThreads, 0, stream>>>(
          grad_h.data_ptr<scalar_t>(), grad_z_coar.data_ptr<scalar_t>(), z_fin.data_ptr<scalar_t>(),
          z_coar.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), B * L * D, d_pre.data_ptr<acc_t>(),
          d_zc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto [d_w, d_b] = gate_linear_backward(d_pre, z_coar, w_gate, d_zc);
  // Zero-initialised: the pair kernel is skipped for empty shapes.
  auto d_fin = at::zeros_like(fin);
  auto d_coar = at::zeros_like(coar);
  auto d_g = at::zeros_like(g);
  auto d_m = at::zeros_like(m);
  if (P * L > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_pair_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      pair_grad_kernel<scalar_t, acc_t><<<blocks_for(P * L, kWarpsPerBlock), kThreads, 0, stream>>>(
          grad_h.data_ptr<scalar_t>(), d_zc.data_ptr<acc_t>(), fin.data_ptr<scalar_t>(), coar.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), B,
          z_fin.data_ptr<scalar_t>(), z_coar.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
          den_fin.data_ptr<acc_t>(), den_coar.data_ptr<acc_t>(), P, L, D, d_fin.data_ptr<scalar_t>(),
          d_coar.data_ptr<scalar_t>(), d_g.data_ptr<scalar_t>(), d_m.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {d_fin, d_coar, d_g, d_m, d_w, d_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(adarec, CUDA, lib) {
  lib.impl("gated_fusion_forward", &gated_fusion_forward_cuda);
  lib.impl("gated_fusion_backward", &gated_fusion_backward_cuda);
}

}  // namespace adarec
