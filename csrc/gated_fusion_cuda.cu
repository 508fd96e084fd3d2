// Gated expert fusion, CUDA implementation (the math is described in gated_fusion.cpp).
//
// Forward: one kernel per weighted mean (users x column blocks; each thread walks its user's
// few levels), the gate's matrix product through ATen (cuBLAS), one elementwise kernel for
// sigmoid + combine. Backward: a per-(b, d) reduction over positions for the gate, ATen
// products for the gate's linear layer, and one block per packed pair that writes d fin / d coar
// and reduces the pair's two weight gradients in shared memory. All sums in float (double for
// double inputs).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gated_fusion.h"

namespace adarec {
namespace {

constexpr int kThreads = 256;

// Weighted mean of the packed rows x [P, W] per user: out[b] = sum_k w_k x_k / (sum_k w_k + eps),
// with w_k = m_k g_k (fine) or m_k (1 - g_k) (coarse).
template <typename scalar_t, typename acc_t, bool kCoarse>
__global__ void segment_mean_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                    const scalar_t* __restrict__ m, const int64_t* __restrict__ offsets,
                                    int64_t width, scalar_t* __restrict__ out, acc_t* __restrict__ den_out) {
  const int64_t b = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t k0 = offsets[b], k1 = offsets[b + 1];
  acc_t sum = 0, den = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t gk = static_cast<acc_t>(g[k]);
    const acc_t w = static_cast<acc_t>(m[k]) * (kCoarse ? acc_t(1) - gk : gk);
    den += w;
    if (j < width) sum += w * static_cast<acc_t>(x[k * width + j]);
  }
  den += acc_t(kFusionEps);
  if (j < width) out[b * width + j] = static_cast<scalar_t>(sum / den);
  if (j == 0) den_out[b] = den;
}

template <typename scalar_t, typename acc_t>
__global__ void gate_combine_kernel(const scalar_t* __restrict__ pre, const scalar_t* __restrict__ z_fin,
                                    const scalar_t* __restrict__ z_coar, int64_t L, int64_t D, int64_t total,
                                    scalar_t* __restrict__ gate, scalar_t* __restrict__ h) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t d = i % D, b = i / (L * D), l = (i / D) % L;
  const acc_t gt = acc_t(1) / (acc_t(1) + exp(-static_cast<acc_t>(pre[b * D + d])));
  if (l == 0) gate[b * D + d] = static_cast<scalar_t>(gt);
  h[i] = static_cast<scalar_t>(gt * static_cast<acc_t>(z_fin[i]) +
                               (acc_t(1) - gt) * static_cast<acc_t>(z_coar[b * D + d]));
}

template <typename scalar_t, typename acc_t>
__global__ void gate_grad_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ grad_zc,
                                 const scalar_t* __restrict__ z_fin, const scalar_t* __restrict__ z_coar,
                                 const scalar_t* __restrict__ gate, int64_t L, int64_t D,
                                 acc_t* __restrict__ d_pre, acc_t* __restrict__ d_zc) {
  const int64_t b = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const acc_t gt = static_cast<acc_t>(gate[b * D + d]), c = static_cast<acc_t>(z_coar[b * D + d]);
  acc_t sum_gate = 0, sum_h = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = (b * L + l) * D + d;
    const acc_t gi = static_cast<acc_t>(grad_h[i]);
    sum_gate += gi * (static_cast<acc_t>(z_fin[i]) - c);
    sum_h += gi;
  }
  d_pre[b * D + d] = sum_gate * gt * (acc_t(1) - gt);
  d_zc[b * D + d] = sum_h * (acc_t(1) - gt) + static_cast<acc_t>(grad_zc[b * D + d]);
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();
  return total;
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

template <typename scalar_t, typename acc_t>
__global__ void pair_grad_kernel(const scalar_t* __restrict__ grad_h, const acc_t* __restrict__ d_zc,
                                 const scalar_t* __restrict__ fin, const scalar_t* __restrict__ coar,
                                 const scalar_t* __restrict__ g, const scalar_t* __restrict__ m,
                                 const int64_t* __restrict__ offsets, int64_t num_users,
                                 const scalar_t* __restrict__ z_fin, const scalar_t* __restrict__ z_coar,
                                 const scalar_t* __restrict__ gate, const acc_t* __restrict__ den_fin,
                                 const acc_t* __restrict__ den_coar, int64_t L, int64_t D,
                                 scalar_t* __restrict__ d_fin, scalar_t* __restrict__ d_coar,
                                 scalar_t* __restrict__ d_g, scalar_t* __restrict__ d_m) {
  __shared__ acc_t shared[kThreads];
  const int64_t p = blockIdx.x, LD = L * D;
  const int64_t b = owner_of(offsets, num_users, p);
  const acc_t gk = static_cast<acc_t>(g[p]), mk = static_cast<acc_t>(m[p]);
  const acc_t wf = mk * gk, wc = mk * (acc_t(1) - gk);
  const acc_t inv_df = acc_t(1) / den_fin[b], inv_dc = acc_t(1) / den_coar[b];
  // z = sum_k w_k x_k / (sum_k w_k + eps): dz/dx_k = w_k / den, dz/dw_k = (x_k - z) / den.
  acc_t dwf = 0, dwc = 0;
  for (int64_t j = threadIdx.x; j < LD; j += blockDim.x) {
    const acc_t dzf = static_cast<acc_t>(grad_h[b * LD + j]) * static_cast<acc_t>(gate[b * D + j % D]) * inv_df;
    d_fin[p * LD + j] = static_cast<scalar_t>(wf * dzf);
    dwf += dzf * (static_cast<acc_t>(fin[p * LD + j]) - static_cast<acc_t>(z_fin[b * LD + j]));
  }
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t dzc = d_zc[b * D + d] * inv_dc;
    d_coar[p * D + d] = static_cast<scalar_t>(wc * dzc);
    dwc += dzc * (static_cast<acc_t>(coar[p * D + d]) - static_cast<acc_t>(z_coar[b * D + d]));
  }
  dwf = block_sum(dwf, shared);
  dwc = block_sum(dwc, shared);
  if (threadIdx.x == 0) {
    d_g[p] = static_cast<scalar_t>(mk * (dwf - dwc));
    d_m[p] = static_cast<scalar_t>(gk * dwf + (acc_t(1) - gk) * dwc);
  }
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

ForwardResult gated_fusion_forward_cuda(const at::Tensor& fin, const at::Tensor& coar, const at::Tensor& g,
                                        const at::Tensor& m, const at::Tensor& offsets, const at::Tensor& w_gate,
                                        const at::Tensor& b_gate) {
  check_fusion_inputs(fin, coar, g, m, offsets, w_gate);
  check_gate_bias(b_gate, fin);
  const c10::cuda::CUDAGuard guard(fin.device());
  const int64_t B = offsets.size(0) - 1, L = fin.size(1), D = fin.size(2);
  const auto acc = accumulate_type(fin.scalar_type());
  auto z_fin = at::empty({B, L, D}, fin.options());
  auto z_coar = at::empty({B, D}, fin.options());
  auto den_fin = at::empty({B}, fin.options().dtype(acc));
  auto den_coar = at::empty({B}, fin.options().dtype(acc));
  auto gate = at::empty({B, D}, fin.options());
  auto h = at::empty({B, L, D}, fin.options());
  // Users on grid x (up to 2^31 - 1), column blocks on grid y (up to 65535 x 256 columns).
  TORCH_CHECK(blocks_for(L * D) <= 65535, "gated_fusion: L * D = ", L * D, " is too large for the CUDA grid");
  if (B == 0 || L * D == 0) {
    return {h.zero_(), z_coar.zero_(), z_fin.zero_(), gate.zero_(), den_fin.zero_(), den_coar.zero_()};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    segment_mean_kernel<scalar_t, acc_t, false><<<dim3(B, blocks_for(L * D)), kThreads, 0, stream>>>(
        fin.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(),
        L * D, z_fin.data_ptr<scalar_t>(), den_fin.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    segment_mean_kernel<scalar_t, acc_t, true><<<dim3(B, blocks_for(D)), kThreads, 0, stream>>>(
        coar.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(),
        D, z_coar.data_ptr<scalar_t>(), den_coar.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto pre = at::linear(z_coar, w_gate, b_gate).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gate_combine_kernel<scalar_t, acc_t><<<blocks_for(B * L * D), kThreads, 0, stream>>>(
        pre.data_ptr<scalar_t>(), z_fin.data_ptr<scalar_t>(), z_coar.data_ptr<scalar_t>(), L, D, B * L * D,
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
  auto d_pre = at::zeros({B, D}, fin.options().dtype(acc));
  auto d_zc = at::zeros({B, D}, fin.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (B > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_gate_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gate_grad_kernel<scalar_t, acc_t><<<dim3(B, blocks_for(D)), kThreads, 0, stream>>>(
          grad_h.data_ptr<scalar_t>(), grad_z_coar.data_ptr<scalar_t>(), z_fin.data_ptr<scalar_t>(),
          z_coar.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), L, D, d_pre.data_ptr<acc_t>(),
          d_zc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto [d_w, d_b] = gate_linear_backward(d_pre, z_coar, w_gate, d_zc);
  // Zero-initialised: the pair kernel is skipped for empty shapes. [P, D] and [P] are small.
  auto d_fin = at::empty_like(fin);
  auto d_coar = at::zeros_like(coar);
  auto d_g = at::zeros_like(g);
  auto d_m = at::zeros_like(m);
  if (P > 0 && L * D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fin.scalar_type(), "gated_fusion_pair_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      pair_grad_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(P), kThreads, 0, stream>>>(
          grad_h.data_ptr<scalar_t>(), d_zc.data_ptr<acc_t>(), fin.data_ptr<scalar_t>(), coar.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), B,
          z_fin.data_ptr<scalar_t>(), z_coar.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
          den_fin.data_ptr<acc_t>(), den_coar.data_ptr<acc_t>(), L, D, d_fin.data_ptr<scalar_t>(),
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
