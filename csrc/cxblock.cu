// CXBlock's depthwise conv + LayerNorm over channels, on channels-last tokens (B, H, W, C).
//
// dwconv_ln_kernel<T, W, KS>: a block owns one row segment of kDwTile output pixels and every
// channel (LayerNorm needs the whole pixel); thread i owns channels 2i and 2i+1. Per kernel row
// it loads the kDwTile + KS - 1 input pixels it needs once and reuses them for all KS taps (a
// register sliding window: 7 rows x 14 pixel loads per 8 outputs instead of 49 per output); the
// loads of a warp cover 64 consecutive channels of one pixel. LayerNorm statistics: two passes
// (mean, then squared deviations) over values held in registers, warp shuffles plus one shared
// exchange per pass.
//
// It writes the LayerNorm's output with its affine applied (the MLP's first GEMM reads it as is) and
// the residual `x + gamma * b2` (gamma: the layer scale, optional; b2: the second Linear's bias),
// which the MLP's second GEMM accumulates into: x is read here anyway, so the residual costs no
// extra pass. Parameters are read as the module holds them: the dwconv weight (C, 1, KS, KS), every
// parameter in the activations' type T or in float32 (W).
//
// Launch configuration: one block per kDwTile pixels of a row, so SAM 2's B=1 call (64x64 tokens)
// launches 512 blocks, a wave on every GPU; the block has one thread per two channels.
#include <string>

#include "common.cuh"
#include "kernel_configs.h"

namespace mf {

constexpr int kDwTile = 8;
constexpr int kDwMaxWarps = 8;
constexpr int kDwChannelsPerWarp = 64;  // two per thread

// The depthwise kernel sizes (KS x KS) the library is instantiated for.
#define MF_DWCONV_KERNEL_SIZES(X) X(3) X(5) X(7)

bool has_dwconv_kernel(int kernel_size, int channels) {
  bool sized = false;
#define MF_DWCONV_MATCH(KS) sized = sized || kernel_size == KS;
  MF_DWCONV_KERNEL_SIZES(MF_DWCONV_MATCH)
#undef MF_DWCONV_MATCH
  return sized && channels > 0 && channels % kDwChannelsPerWarp == 0 && channels <= kDwChannelsPerWarp * kDwMaxWarps;
}

struct DwParams {
  DwconvLnArgs args;
  int pad, tiles_w;
};

template <typename T, typename W, int KS>
__device__ __forceinline__ void dwconv_ln(const DwParams& p) {
  __shared__ float partial[2][kDwMaxWarps][kDwTile];  // per pass, warp and pixel
  const DwconvLnArgs& a = p.args;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = 2 * threadIdx.x;
  const int row = blockIdx.x / p.tiles_w;  // b * H + oh
  const int ow0 = (blockIdx.x % p.tiles_w) * kDwTile;
  const int oh = row % a.height;
  const int64_t image = static_cast<int64_t>(row / a.height) * a.height * a.width * a.channels;
  const T* x = static_cast<const T*>(a.x) + image;
  const W* w = static_cast<const W*>(a.dw_weight);

  float acc0[kDwTile], acc1[kDwTile];
  float bias0, bias1;
  load_pair(static_cast<const W*>(a.dw_bias) + c, bias0, bias1);
  for (int t = 0; t < kDwTile; ++t) {
    acc0[t] = bias0;
    acc1[t] = bias1;
  }
  for (int kh = 0; kh < KS; ++kh) {
    const int ih = oh - p.pad + kh;
    if (ih < 0 || ih >= a.height) continue;
    float w0[KS], w1[KS];
    for (int kw = 0; kw < KS; ++kw) {
      w0[kw] = to_float(w[(c * KS + kh) * KS + kw]);
      w1[kw] = to_float(w[((c + 1) * KS + kh) * KS + kw]);
    }
    float in0[kDwTile + KS - 1], in1[kDwTile + KS - 1];
    const T* x_row = x + static_cast<int64_t>(ih) * a.width * a.channels + c;
    for (int j = 0; j < kDwTile + KS - 1; ++j) {
      const int iw = ow0 - p.pad + j;
      in0[j] = 0.f;
      in1[j] = 0.f;
      if (iw >= 0 && iw < a.width) load_pair(x_row + static_cast<int64_t>(iw) * a.channels, in0[j], in1[j]);
    }
    for (int t = 0; t < kDwTile; ++t)
      for (int kw = 0; kw < KS; ++kw) {
        acc0[t] += w0[kw] * in0[t + kw];
        acc1[t] += w1[kw] * in1[t + kw];
      }
  }

  // Every pixel of the tile takes part in the reductions (uniform control flow); pixels past
  // the row's end are not stored.
  const float inv_c = 1.0f / a.channels;
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

  float scale0, scale1, shift0, shift1, b20, b21;
  load_pair(static_cast<const W*>(a.norm_weight) + c, scale0, scale1);
  load_pair(static_cast<const W*>(a.norm_bias) + c, shift0, shift1);
  load_pair(static_cast<const W*>(a.b2) + c, b20, b21);
  if (a.gamma != nullptr) {
    float gamma0, gamma1;
    load_pair(static_cast<const W*>(a.gamma) + c, gamma0, gamma1);
    b20 *= gamma0;
    b21 *= gamma1;
  }
  const int64_t out_row = image + static_cast<int64_t>(oh) * a.width * a.channels + c;
#pragma unroll
  for (int t = 0; t < kDwTile; ++t) {
    if (ow0 + t >= a.width) break;
    const int64_t offset = out_row + static_cast<int64_t>(ow0 + t) * a.channels;
    store_pair(static_cast<T*>(a.normed) + offset, (acc0[t] - mean[t]) * rstd[t] * scale0 + shift0,
               (acc1[t] - mean[t]) * rstd[t] * scale1 + shift1);
    float r0, r1;
    load_pair(static_cast<const T*>(a.x) + offset, r0, r1);
    store_pair(static_cast<T*>(a.residual) + offset, r0 + b20, r1 + b21);
  }
}

template <typename T, typename W, int KS>
__global__ void __launch_bounds__(32 * kDwMaxWarps, 1) dwconv_ln_kernel(const __grid_constant__ DwParams p) {
  if constexpr (kServedHere<T>) {
    dwconv_ln<T, W, KS>(p);
  } else {
    unserved_kernel();
  }
}

bool dwconv_pointers_set(const DwconvLnArgs& a) {
  // gamma may be null: no layer scale.
  return all_set(a.x, a.dw_weight, a.dw_bias, a.norm_weight, a.norm_bias, a.b2, a.normed, a.residual);
}

cudaError_t dwconv_params(const DwconvLnArgs& a, DwParams* p) {
  if (a.batch < 1 || a.height < 1 || a.width < 1) return cudaErrorInvalidValue;
  if (!has_dwconv_kernel(a.kernel_size, a.channels)) return cudaErrorNotSupported;
  // Every tensor but the dwconv weight is read or written in channel pairs (channels are even).
  if (!aligned_to(2 * dtype_bytes(a.dtype), a.x, a.normed, a.residual) ||
      !aligned_to(2 * dtype_bytes(a.weight_dtype), a.dw_bias, a.norm_weight, a.norm_bias, a.b2, a.gamma)) {
    return cudaErrorInvalidValue;
  }
  p->args = a;
  p->pad = (a.kernel_size - 1) / 2;
  p->tiles_w = ceil_div(a.width, kDwTile);
  return static_cast<int64_t>(a.batch) * a.height * p->tiles_w > INT32_MAX ? cudaErrorInvalidValue : cudaSuccess;
}

template <typename T, typename W>
struct DwPlanner {
  // One tile, without dynamic shared memory: it fits every GPU.
  template <int KS>
  static Plan<DwParams> plan(const DwParams& p, const GpuTarget& target) {
    static const KernelInfo info =
        kernel_info<T, W, KS>("dwconv_ln_kernel", std::to_string(kDwTile) + " pixels of a row per block");
    const TileCandidate tiles[] = {{static_cast<int64_t>(p.args.batch) * p.args.height * p.tiles_w, 0, kDwTile}};
    return plan_of<dwconv_ln_kernel<T, W, KS>, DwParams, 0>(info, tiles[0].blocks, 1, p.args.channels / 2,
                                                            fill_a_wave(tiles, target).small_grid_reason);
  }

  static cudaError_t run(const DwParams& p, const GpuTarget& target, Plan<DwParams>* plan) {
#define MF_DWCONV_CASE(KS)                \
  if (p.args.kernel_size == KS) {         \
    *plan = DwPlanner::plan<KS>(p, target); \
    return cudaSuccess;                   \
  }
    MF_DWCONV_KERNEL_SIZES(MF_DWCONV_CASE)
#undef MF_DWCONV_CASE
    return cudaErrorNotSupported;
  }
};

cudaError_t plan_dwconv(const DwParams& p, const GpuTarget& target, Plan<DwParams>* plan) {
  return dispatch_types<DwPlanner>(p.args.dtype, p.args.weight_dtype, p, target, plan);
}

const Op<DwconvLnArgs, DwParams> kDwconvOp{dwconv_pointers_set, dwconv_params, plan_dwconv};

std::string cxblock_kernel_configs() {
  std::string sizes;
#define MF_DWCONV_SIZE(KS) sizes += (sizes.empty() ? "" : ",") + std::to_string(KS);
  MF_DWCONV_KERNEL_SIZES(MF_DWCONV_SIZE)
#undef MF_DWCONV_SIZE
  return "dwconv_ln kernel_size=" + sizes + " channels%" + std::to_string(kDwChannelsPerWarp) +
         " channels<=" + std::to_string(kDwChannelsPerWarp * kDwMaxWarps) + "\n";
}

}  // namespace mf

using namespace mf;

MF_EXPORT int memenc_fast_dwconv_ln(const DwconvLnArgs* args, int device, void* stream) {
  return launch_op(kDwconvOp, args, device, stream);
}

MF_EXPORT int memenc_fast_dwconv_ln_plan(const DwconvLnArgs* args, const GpuTarget* target, KernelLaunch* launch) {
  return plan_op(kDwconvOp, args, target, launch);
}
