// CXBlock's depthwise conv + LayerNorm over channels, on channels-last tokens (B, H, W, C).
//
// dwconv_ln_kernel<T, KS>: a block owns one row segment of kDwTile output pixels and every
// channel (LayerNorm needs the whole pixel); thread i owns channels 2i and 2i+1. Per kernel row
// it loads the kDwTile + KS - 1 input pixels it needs once and reuses them for all KS taps (a
// register sliding window: 7 rows x 14 pixel loads per 8 outputs instead of 49 per output); the
// loads of a warp cover 64 consecutive channels of one pixel. LayerNorm statistics: two passes
// (mean, then squared deviations) over values held in registers, warp shuffles plus one shared
// exchange per pass.
//
// It writes the normalized tokens (the LayerNorm affine is folded into the MLP's first Linear) and
// `x + b2` (the residual with the second Linear's bias), which the MLP's second GEMM accumulates
// into: x is read here anyway, so the residual costs no extra pass.
#include "common.cuh"

namespace mf {

constexpr int kDwTile = 8;
constexpr int kDwMaxWarps = 8;

struct DwArgs {
  const void* x;   // (B, H, W, C) tokens
  const void* w;   // (C, 1, KS, KS)
  const void* b;   // (C,)
  const void* b2;  // (C,): added to the residual output
  float eps;
  int H, W, C, pad, tiles_w;
  void* normed;  // (B, H, W, C)
  void* resid;   // (B, H, W, C): x + b2
};

template <typename T, int KS>
__global__ void __launch_bounds__(32 * kDwMaxWarps, 1) dwconv_ln_kernel(DwArgs a) {
  __shared__ float partial[2][kDwMaxWarps][kDwTile];  // per pass, warp and pixel
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = 2 * threadIdx.x;
  const int row = blockIdx.x / a.tiles_w;  // b * H + oh
  const int ow0 = (blockIdx.x % a.tiles_w) * kDwTile;
  const int oh = row % a.H;
  const int64_t image = static_cast<int64_t>(row / a.H) * a.H * a.W * a.C;
  const T* x = static_cast<const T*>(a.x) + image;
  const T* w = static_cast<const T*>(a.w);

  float acc0[kDwTile], acc1[kDwTile];
  float bias0, bias1;
  load_pair(static_cast<const T*>(a.b) + c, bias0, bias1);
  for (int t = 0; t < kDwTile; ++t) {
    acc0[t] = bias0;
    acc1[t] = bias1;
  }
  for (int kh = 0; kh < KS; ++kh) {
    const int ih = oh - a.pad + kh;
    if (ih < 0 || ih >= a.H) continue;
    float w0[KS], w1[KS];
    for (int kw = 0; kw < KS; ++kw) {
      w0[kw] = to_float(w[(c * KS + kh) * KS + kw]);
      w1[kw] = to_float(w[((c + 1) * KS + kh) * KS + kw]);
    }
    float in0[kDwTile + KS - 1], in1[kDwTile + KS - 1];
    const T* x_row = x + static_cast<int64_t>(ih) * a.W * a.C + c;
    for (int j = 0; j < kDwTile + KS - 1; ++j) {
      const int iw = ow0 - a.pad + j;
      in0[j] = 0.f;
      in1[j] = 0.f;
      if (iw >= 0 && iw < a.W) load_pair(x_row + static_cast<int64_t>(iw) * a.C, in0[j], in1[j]);
    }
    for (int t = 0; t < kDwTile; ++t)
      for (int kw = 0; kw < KS; ++kw) {
        acc0[t] += w0[kw] * in0[t + kw];
        acc1[t] += w1[kw] * in1[t + kw];
      }
  }

  // Every pixel of the tile takes part in the reductions (uniform control flow); pixels past
  // the row's end are not stored.
  const float inv_c = 1.0f / a.C;
  float mean[kDwTile], rstd[kDwTile];
  for (int t = 0; t < kDwTile; ++t) {
    const float s = warp_sum(acc0[t] + acc1[t]);
    if (lane == 0) partial[0][warp][t] = s;
  }
  __syncthreads();
  for (int t = 0; t < kDwTile; ++t) {
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += partial[0][i][t];
    mean[t] = s * inv_c;
    const float d0 = acc0[t] - mean[t], d1 = acc1[t] - mean[t];
    const float sq = warp_sum(d0 * d0 + d1 * d1);
    if (lane == 0) partial[1][warp][t] = sq;
  }
  __syncthreads();
  for (int t = 0; t < kDwTile; ++t) {
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += partial[1][i][t];
    rstd[t] = rsqrtf(s * inv_c + a.eps);
  }

  float b20, b21;
  load_pair(static_cast<const T*>(a.b2) + c, b20, b21);
  const int64_t out_row = image + static_cast<int64_t>(oh) * a.W * a.C + c;
#pragma unroll
  for (int t = 0; t < kDwTile; ++t) {
    if (ow0 + t >= a.W) break;
    const int64_t offset = out_row + static_cast<int64_t>(ow0 + t) * a.C;
    store_pair(static_cast<T*>(a.normed) + offset, (acc0[t] - mean[t]) * rstd[t], (acc1[t] - mean[t]) * rstd[t]);
    float r0, r1;
    load_pair(static_cast<const T*>(a.x) + offset, r0, r1);
    store_pair(static_cast<T*>(a.resid) + offset, r0 + b20, r1 + b21);
  }
}

template <typename T>
struct DwLaunch {
  template <int KS>
  static cudaError_t go(const DwArgs& a, int blocks, cudaStream_t stream, int device) {
    return launch(dwconv_ln_kernel<T, KS>, dim3(blocks), dim3(a.C / 2), 0, stream, device, a);
  }

  static cudaError_t run(int ks, DwArgs a, int blocks, cudaStream_t stream, int device) {
    switch (ks) {
      case 3:
        return go<3>(a, blocks, stream, device);
      case 5:
        return go<5>(a, blocks, stream, device);
      case 7:
        return go<7>(a, blocks, stream, device);
      default:
        return cudaErrorNotSupported;
    }
  }
};

}  // namespace mf

using namespace mf;

// Whether memenc_fast_dwconv_ln has a kernel for C channels and a KS x KS depthwise conv.
MF_EXPORT int memenc_fast_dwconv_ln_supported(int channels, int kernel_size) {
  return channels % 64 == 0 && channels >= 64 && channels <= 64 * kDwMaxWarps &&
         (kernel_size == 3 || kernel_size == 5 || kernel_size == 7);
}

// Depthwise KS x KS conv ("same" padding (KS - 1) / 2) + bias, then LayerNorm over C without
// affine, on tokens x (B, H, W, C); writes normed (B, H, W, C) and resid = x + b2.
MF_EXPORT int memenc_fast_dwconv_ln(int dtype, const void* x, int batch, int H, int W, int channels, const void* w,
                                    int kernel_size, const void* b, const void* b2, float eps, void* normed,
                                    void* resid, int device, void* stream) {
  if (!x || !w || !b || !b2 || !normed || !resid || batch < 1 || H < 1 || W < 1) return cudaErrorInvalidValue;
  if (!memenc_fast_dwconv_ln_supported(channels, kernel_size)) return cudaErrorNotSupported;
  DwArgs a{};
  a.x = x;
  a.w = w;
  a.b = b;
  a.b2 = b2;
  a.eps = eps;
  a.H = H;
  a.W = W;
  a.C = channels;
  a.pad = (kernel_size - 1) / 2;
  a.tiles_w = ceil_div(W, kDwTile);
  a.normed = normed;
  a.resid = resid;
  const int64_t blocks = static_cast<int64_t>(batch) * H * a.tiles_w;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  return dispatch_dtype<DwLaunch>(dtype, kernel_size, a, static_cast<int>(blocks), static_cast<cudaStream_t>(stream),
                                  device);
}
