// Projection + add: out = [W_m | W_p] . [m ; p] + (b_m + b_p), one GEMM over the concatenated
// input channels (K = C_m + C_p), the biases in the epilogue, tokens (B, H, W, N) out. The two 1x1
// conv weights are read where the module keeps them, (N, C, 1, 1) each, in the activations' type T
// or in float32 (W): k tiles of the mask features read W_m, those of pix_feat read W_p. The mask
// features and pix_feat are read where they lie, each in either layout:
//   channels-last (channel stride 1: the mask path's output, or channels_last pix_feat): A tiles
//     are filled m-major, 16-byte vectors along channels;
//   channels-first (pixel stride 1: NCHW pix_feat, as SAM 2 passes it): A tiles are filled
//     k-major, 16-byte vectors along pixels, and the GEMM reads them transposed;
// so neither input is copied or transposed in memory first. A k tile never straddles the two.
//
// Launch configuration: 64 tokens x BN output channels per block, BN 128 where that fills a wave
// of SMs, else 64 (SAM 2's B=1 call: 128 blocks of 128 channels on up to 128 SMs, 256 blocks of 64
// on an H100, B200 or RTX 5090). Blocks that share their tokens read them from L2 once each.
#include <string>

#include "common.cuh"
#include "gemm.cuh"
#include "kernel_configs.h"

namespace mf {

constexpr int kProjBM = 64;
constexpr int kProjBK = 32;

// The output-channel tiles the kernel is built with, largest first; out_channels must be a multiple
// of the smallest.
#define MF_PROJ_TILES(X) X(128) X(64)
#define MF_PROJ_BN(BN) BN,
constexpr int kProjTileBNs[] = {MF_PROJ_TILES(MF_PROJ_BN)};
#undef MF_PROJ_BN
constexpr int kProjMinBN = kProjTileBNs[sizeof(kProjTileBNs) / sizeof(kProjTileBNs[0]) - 1];

template <typename T, int BN>
using ProjGemm = BlockGemm<T, kProjBM, BN, kProjBK, 2, 4>;

struct ProjSource {
  const void* ptr;
  int64_t stride_b, stride_c, stride_p;  // elements; pixels are flattened (h * W + w)
  int channels;
  int kmajor;          // 1: channels-first (stride_p == 1), 0: channels-last (stride_c == 1)
  const void* weight;  // (N, channels) row-major
  const void* bias;    // (N,)
};

struct ProjParams {
  int dtype, weight_dtype;  // MEMENC_DTYPE_*
  ProjSource src[2];        // mask features, pix_feat
  int HW, M, N;       // M = batch * HW tokens
  int precise;
  void* out;  // (M, N)
};

template <typename T, typename W, int BN>
struct ProjLoader {
  using G = ProjGemm<T, BN>;
  static constexpr int kVec = G::kVec;
  static constexpr int kTotal = kProjBM * kProjBK / kVec;  // 16-byte vectors per A tile, either layout
  static constexpr int kSlots = (kTotal + G::kThreads - 1) / G::kThreads;
  static_assert(kTotal % G::kThreads == 0, "every thread loads whole vectors");

  const ProjParams* p;
  int m0, n0, first_tiles;
  int fetched_kmajor;
  uint4 ra[kSlots];
  WeightRows<T, W, BN, kProjBK, G::kThreads> wrows;

  __device__ __forceinline__ void fetch(int kt) {
    const int s = kt < first_tiles ? 0 : 1;
    const ProjSource& src = p->src[s];
    const int k0 = (kt - (s ? first_tiles : 0)) * kProjBK;
    const T* base = static_cast<const T*>(src.ptr);
    fetched_kmajor = src.kmajor;
    for (int i = 0; i < kSlots; ++i) {
      const int v = threadIdx.x + i * G::kThreads;
      int pixel, offset_c;
      if (src.kmajor) {  // vector v: channel k0 + v / (BM / kVec), pixels (v % (BM / kVec)) * kVec ..
        pixel = m0 + (v % (kProjBM / kVec)) * kVec;
        offset_c = k0 + v / (kProjBM / kVec);
      } else {  // vector v: pixel v / (BK / kVec), channels k0 + (v % (BK / kVec)) * kVec ..
        pixel = m0 + v / (kProjBK / kVec);
        offset_c = k0 + (v % (kProjBK / kVec)) * kVec;
      }
      ra[i] = make_uint4(0u, 0u, 0u, 0u);
      if (pixel < p->M)
        ra[i] = load16(base + (pixel / p->HW) * src.stride_b + static_cast<int64_t>(offset_c) * src.stride_c +
                       static_cast<int64_t>(pixel % p->HW) * src.stride_p);
    }
    wrows.fetch(static_cast<const W*>(src.weight) + static_cast<int64_t>(n0) * src.channels, src.channels, k0);
  }

  __device__ __forceinline__ void stash(T* a_tile, T* b_tile) const {
    for (int i = 0; i < kSlots; ++i) {
      const int v = threadIdx.x + i * G::kThreads;
      T* dst = fetched_kmajor
                   ? a_tile + (v / (kProjBM / kVec)) * G::kLdt + (v % (kProjBM / kVec)) * kVec
                   : a_tile + (v / (kProjBK / kVec)) * G::kLda + (v % (kProjBK / kVec)) * kVec;
      store16(dst, ra[i]);
    }
    wrows.stash(b_tile, G::kLdb);
  }

  __device__ __forceinline__ bool a_kmajor(int kt) const { return p->src[kt < first_tiles ? 0 : 1].kmajor != 0; }
};

// The loader keeps a pointer to the parameters (which source a k tile reads is known only at run
// time): the kernel's __grid_constant__ parameter, without a local copy of it.
template <typename T, typename W, int BN>
__device__ __forceinline__ void proj_add(const ProjParams& p) {
  using G = ProjGemm<T, BN>;
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  const int m0 = blockIdx.x * kProjBM, n0 = blockIdx.y * BN;

  ProjLoader<T, W, BN> loader;
  loader.p = &p;
  loader.m0 = m0;
  loader.n0 = n0;
  loader.first_tiles = p.src[0].channels / kProjBK;
  G gemm;
  gemm.run(loader, (p.src[0].channels + p.src[1].channels) / kProjBK, smem, p.precise != 0);

  float* c = reinterpret_cast<float*>(smem);
  gemm.store(c);
  __syncthreads();

  constexpr int kPairs = BN / 64;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float bias[2 * kPairs];
  for (int q = 0; q < kPairs; ++q) {
    const int ch = n0 + 2 * lane + 64 * q;
    float mask_bias0, mask_bias1, pix_bias0, pix_bias1;
    load_pair(static_cast<const W*>(p.src[0].bias) + ch, mask_bias0, mask_bias1);
    load_pair(static_cast<const W*>(p.src[1].bias) + ch, pix_bias0, pix_bias1);
    bias[2 * q] = mask_bias0 + pix_bias0;
    bias[2 * q + 1] = mask_bias1 + pix_bias1;
  }
  for (int r = warp; r < kProjBM && m0 + r < p.M; r += G::kThreads / 32) {
    T* row = static_cast<T*>(p.out) + static_cast<int64_t>(m0 + r) * p.N + n0;
    for (int q = 0; q < kPairs; ++q) {
      const float2 acc = *reinterpret_cast<const float2*>(c + r * G::kLdc + 2 * lane + 64 * q);
      store_pair(row + 2 * lane + 64 * q, acc.x + bias[2 * q], acc.y + bias[2 * q + 1]);
    }
  }
}

template <typename T, typename W, int BM, int BN>
__global__ void __launch_bounds__(256, 1) proj_add_kernel(const __grid_constant__ ProjParams p) {
  static_assert(BM == kProjBM, "one row tile");
  if constexpr (kServedHere<T>) {
    proj_add<T, W, BN>(p);
  } else {
    unserved_kernel();
  }
}

bool proj_pointers_set(const ProjAddArgs& a) {
  return all_set(a.mask_features, a.pix_feat, a.mask_weight, a.mask_bias, a.pix_weight, a.pix_bias, a.out);
}

cudaError_t proj_params(const ProjAddArgs& a, ProjParams* p) {
  if (a.batch < 1 || a.pixels < 1) return cudaErrorInvalidValue;
  const bool sizes_have_kernel = a.mask_channels > 0 && a.mask_channels % kProjBK == 0 && a.pix_channels > 0 &&
                                 a.pix_channels % kProjBK == 0 && a.out_channels > 0 &&
                                 a.out_channels % kProjMinBN == 0;
  if (!sizes_have_kernel) return cudaErrorNotSupported;
  const int64_t tokens = static_cast<int64_t>(a.batch) * a.pixels;
  if (tokens > INT32_MAX) return cudaErrorInvalidValue;
  p->src[0] = ProjSource{a.mask_features, a.mask_stride_b, a.mask_stride_c, a.mask_stride_p, a.mask_channels,
                         a.mask_stride_c != 1, a.mask_weight, a.mask_bias};
  p->src[1] = ProjSource{a.pix_feat, a.pix_stride_b, a.pix_stride_c, a.pix_stride_p, a.pix_channels,
                         a.pix_stride_c != 1, a.pix_weight, a.pix_bias};
  // Every 16-byte vector must be aligned and, channels-first, inside one image; the biases and the
  // output go in pairs.
  const int vec = 16 / dtype_bytes(a.dtype);
  for (const ProjSource& s : p->src) {
    const bool aligned = aligned_to(16, s.ptr, s.weight) && s.stride_b % vec == 0 &&
                         (s.kmajor ? (s.stride_p == 1 && s.stride_c % vec == 0 && a.pixels % vec == 0)
                                   : (s.stride_c == 1 && s.stride_p % vec == 0)) &&
                         aligned_to(2 * dtype_bytes(a.weight_dtype), s.bias);
    if (!aligned) return cudaErrorInvalidValue;
  }
  if (!aligned_to(2 * dtype_bytes(a.dtype), a.out)) return cudaErrorInvalidValue;
  p->dtype = a.dtype;
  p->weight_dtype = a.weight_dtype;
  p->HW = a.pixels;
  p->M = static_cast<int>(tokens);
  p->N = a.out_channels;
  p->precise = a.precise;
  p->out = a.out;
  return cudaSuccess;
}

template <typename T, typename W>
struct ProjPlanner {
  template <int BN>
  static Plan<ProjParams> plan(const ProjParams& p, const char* small_grid_reason) {
    static const KernelInfo info = kernel_info<T, W, kProjBM, BN>("proj_add_kernel", ProjGemm<T, BN>::describe());
    return plan_of<proj_add_kernel<T, W, kProjBM, BN>, ProjParams, ProjGemm<T, BN>::kSmemBytes>(
        info, ceil_div(p.M, kProjBM), p.N / BN, ProjGemm<T, BN>::kThreads, small_grid_reason);
  }

  static cudaError_t run(const ProjParams& p, const GpuTarget& target, Plan<ProjParams>* plan) {
    const int64_t row_blocks = ceil_div(p.M, kProjBM);
#define MF_PROJ_CANDIDATE(BN) {p.N % BN == 0 ? row_blocks * (p.N / BN) : 0, ProjGemm<T, BN>::kSmemBytes, kProjBM},
    const TileCandidate candidates[] = {MF_PROJ_TILES(MF_PROJ_CANDIDATE)};
#undef MF_PROJ_CANDIDATE
    const TileChoice choice = fill_a_wave(candidates, target);
    if (choice.index < 0) return cudaErrorInvalidConfiguration;  // no tile fits this GPU's shared memory
    int index = 0;
#define MF_PROJ_CHOICE(BN) \
  if (index++ == choice.index) *plan = ProjPlanner::plan<BN>(p, choice.small_grid_reason);
    MF_PROJ_TILES(MF_PROJ_CHOICE)
#undef MF_PROJ_CHOICE
    return cudaSuccess;
  }
};

cudaError_t plan_proj(const ProjParams& p, const GpuTarget& target, Plan<ProjParams>* plan) {
  return dispatch_types<ProjPlanner>(p.dtype, p.weight_dtype, p, target, plan);
}

const Op<ProjAddArgs, ProjParams> kProjOp{proj_pointers_set, proj_params, plan_proj};

std::string proj_add_kernel_configs() {
  const std::string k = std::to_string(kProjBK);
  return "proj_add mask_channels%" + k + " pix_channels%" + k + " out_channels%" + std::to_string(kProjMinBN) + "\n";
}

}  // namespace mf

using namespace mf;

MF_EXPORT int memenc_fast_proj_add(const ProjAddArgs* args, int device, void* stream) {
  return launch_op(kProjOp, args, device, stream);
}

MF_EXPORT int memenc_fast_proj_add_plan(const ProjAddArgs* args, const GpuTarget* target, KernelLaunch* launch) {
  return plan_op(kProjOp, args, target, launch);
}
