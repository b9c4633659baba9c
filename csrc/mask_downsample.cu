// The mask downsampler: sigmoid (or the caller's scale/bias) and the stages
// conv3x3 stride 2 padding 1 -> LayerNorm over channels -> exact GELU, channels 1 -> 4 -> 16 -> 64 -> 256.
//
// Two kernels, three launches (SAM 2 sizes: 1024^2 mask -> 512^2x4 -> 256^2x16 -> 128^2x64 -> 64^2x256):
//
// * mask_stem_kernel: the mask transform and stages 1 and 2 chained per 16x16 tile of stage-2
//   output. The transformed 67x67 input patch and the 33x33x4 stage-1 patch live in shared
//   memory (fp32); only the stage-2 tile (channels-last) is written. CUDA cores: 4 and 16 output
//   channels are too few for tensor-core tiles.
// * conv3x3s2_ln_gelu_kernel<T, W, CIN, COUT>: one stage as an implicit GEMM on tensor cores
//   (M = output pixels, N = COUT, K = 9 taps x CIN, k tiles never straddle a tap), the conv bias,
//   LayerNorm over all COUT channels of a pixel and GELU in the epilogue; channels-last in and
//   out. Runs stage 3 (16 -> 64) and stage 4 (64 -> 256).
//
// Why not one kernel for all four stages: an 8x8 tile of stage-4 output needs a 17x17x64 stage-3
// halo, 35x35x16 stage-2 and 71x71x4 stage-1 patches; in fp32 the stage-1 and stage-2 patches
// alone are 159 KB, beyond what an A100 block can hold next to the stage-4 weight tiles, and a
// smaller tile re-reads the 295 KB (bf16) stage-4 weights for fewer pixels. Each split costs one
// write and one read of a 1M-element-per-object activation, most of it in L2 at small batch.
//
// Both read the module's parameters as they are: conv weights in nn.Conv2d's (C_out, C_in, 3, 3)
// layout, every parameter in the activations' type T or in float32 (W). All math is fp32
// (accumulation, LayerNorm statistics); I/O in the activations' dtype.
//
// Launch configurations: the stem's 16x16 tile gives SAM 2's B=1 mask 256 blocks, a wave on every
// GPU up to an RTX 5090's 170 SMs. Each stage kernel has row tiles (output pixels per block) to choose
// from per GPU (plan_stage): stage 3 fills a wave; stage 4 chooses by its floor (stage4_tile).
#include <string>

#include "common.cuh"
#include "gemm.cuh"
#include "kernel_configs.h"

namespace mf {

// ---- shared helpers -----------------------------------------------------------------------------

// v[0..N) <- GELU(LayerNorm(v) * gamma + beta), statistics in fp32 as torch computes them.
template <int N>
__device__ __forceinline__ void layer_norm_gelu(float* v, const float* gamma, const float* beta, float eps) {
  float mean = 0.f;
  for (int i = 0; i < N; ++i) mean += v[i];
  mean *= 1.0f / N;
  float var = 0.f;
  for (int i = 0; i < N; ++i) var += (v[i] - mean) * (v[i] - mean);
  const float rstd = rsqrtf(var * (1.0f / N) + eps);
  for (int i = 0; i < N; ++i) v[i] = gelu((v[i] - mean) * rstd * gamma[i] + beta[i]);
}

// N consecutive values to global memory in 16-byte stores (dst 16-byte aligned).
template <typename T, int N>
__device__ __forceinline__ void store_row(T* dst, const float* v) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static_assert(N % kVec == 0, "row must be whole 16-byte vectors");
  for (int i = 0; i < N; i += kVec) {
    union {
      uint4 vec;
      T elems[kVec];
    } pack;
    for (int e = 0; e < kVec; ++e) pack.elems[e] = from_float<T>(v[i + e]);
    store16(dst + i, pack.vec);
  }
}

// ---- stages 1 and 2 -----------------------------------------------------------------------------

constexpr int kStemC1 = 4;
constexpr int kStemC2 = 16;
constexpr int kStemTile = 16;                  // stage-2 pixels per tile side
constexpr int kStemS1 = 2 * kStemTile + 1;     // stage-1 patch side
constexpr int kStemIn = 2 * kStemS1 + 1;       // input patch side
constexpr int kStemInLd = kStemIn + 1;
constexpr int kStemThreads = kStemTile * kStemTile;

struct StemParams {
  MaskStemArgs args;
  int H1, W1, H2, W2;
  int tiles_x, tiles_per_image;
};

template <typename T, typename W>
__device__ __forceinline__ void mask_stem(const StemParams& p) {
  __shared__ __align__(16) float in_patch[kStemIn * kStemInLd];
  __shared__ __align__(16) float4 s1[kStemS1 * kStemS1];
  __shared__ __align__(16) float w2s[kStemC2 * 9 * kStemC1];  // [c_out][tap][c_in]: matches s1
  __shared__ float w1s[kStemC1 * 9];
  __shared__ float p1[3 * kStemC1];  // bias, LayerNorm weight, LayerNorm bias
  __shared__ float p2[3 * kStemC2];

  const MaskStemArgs& a = p.args;
  const int tid = threadIdx.x;
  const int b = blockIdx.x / p.tiles_per_image;
  const int tile = blockIdx.x % p.tiles_per_image;
  const int y2 = (tile / p.tiles_x) * kStemTile, x2 = (tile % p.tiles_x) * kStemTile;
  const int y1 = 2 * y2 - 1, x1 = 2 * x2 - 1;  // stage-1 patch origin
  const int y0 = 2 * y1 - 1, x0 = 2 * x1 - 1;  // input patch origin

  for (int i = tid; i < kStemC1 * 9; i += kStemThreads) w1s[i] = to_float(static_cast<const W*>(a.conv1_weight)[i]);
  for (int i = tid; i < kStemC2 * 9 * kStemC1; i += kStemThreads) {
    const int c = i / (9 * kStemC1), tap = (i / kStemC1) % 9, ci = i % kStemC1;
    w2s[i] = to_float(static_cast<const W*>(a.conv2_weight)[(c * kStemC1 + ci) * 9 + tap]);
  }
  if (tid < kStemC1) {
    p1[tid] = to_float(static_cast<const W*>(a.conv1_bias)[tid]);
    p1[kStemC1 + tid] = to_float(static_cast<const W*>(a.norm1_weight)[tid]);
    p1[2 * kStemC1 + tid] = to_float(static_cast<const W*>(a.norm1_bias)[tid]);
  }
  if (tid < kStemC2) {
    p2[tid] = to_float(static_cast<const W*>(a.conv2_bias)[tid]);
    p2[kStemC2 + tid] = to_float(static_cast<const W*>(a.norm2_weight)[tid]);
    p2[2 * kStemC2 + tid] = to_float(static_cast<const W*>(a.norm2_bias)[tid]);
  }

  // The transformed input patch; outside the image it is the conv's zero padding (applied after
  // the transform, as the reference pads the transformed mask).
  const T* mask = static_cast<const T*>(a.masks) + static_cast<int64_t>(b) * a.masks_stride_b;
  for (int i = tid; i < kStemIn * kStemIn; i += kStemThreads) {
    const int y = i / kStemIn, x = i % kStemIn;
    const int gy = y0 + y, gx = x0 + x;
    float v = 0.f;
    if (gy >= 0 && gy < a.height && gx >= 0 && gx < a.width) {
      v = to_float(mask[gy * a.masks_stride_h + gx * a.masks_stride_w]);
      if (a.apply_sigmoid) v = 1.0f / (1.0f + expf(-v));
      v = v * a.scale + a.bias;
    }
    in_patch[y * kStemInLd + x] = v;
  }
  __syncthreads();

  // Stage 1 over the patch; pixels outside the stage-1 image are stage 2's zero padding.
  for (int i = tid; i < kStemS1 * kStemS1; i += kStemThreads) {
    const int y = i / kStemS1, x = i % kStemS1;
    const int gy = y1 + y, gx = x1 + x;
    float v[kStemC1] = {0.f, 0.f, 0.f, 0.f};
    if (gy >= 0 && gy < p.H1 && gx >= 0 && gx < p.W1) {
      for (int c = 0; c < kStemC1; ++c) v[c] = p1[c];
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
          const float xin = in_patch[(2 * y + kh) * kStemInLd + 2 * x + kw];
          for (int c = 0; c < kStemC1; ++c) v[c] += w1s[c * 9 + kh * 3 + kw] * xin;
        }
      layer_norm_gelu<kStemC1>(v, p1 + kStemC1, p1 + 2 * kStemC1, a.eps1);
    }
    s1[i] = make_float4(v[0], v[1], v[2], v[3]);
  }
  __syncthreads();

  // Stage 2: one output pixel (all 16 channels) per thread.
  const int ly = tid / kStemTile, lx = tid % kStemTile;
  const int gy = y2 + ly, gx = x2 + lx;
  if (gy >= p.H2 || gx >= p.W2) return;
  float patch[9 * kStemC1];
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) {
      const float4 q = s1[(2 * ly + kh) * kStemS1 + 2 * lx + kw];
      float* dst = patch + (kh * 3 + kw) * kStemC1;
      dst[0] = q.x;
      dst[1] = q.y;
      dst[2] = q.z;
      dst[3] = q.w;
    }
  float v[kStemC2];
  for (int c = 0; c < kStemC2; ++c) {
    const float4* w = reinterpret_cast<const float4*>(w2s + c * 9 * kStemC1);
    float sum = p2[c];
    for (int q = 0; q < 9; ++q) {
      const float4 wq = w[q];
      sum += wq.x * patch[4 * q] + wq.y * patch[4 * q + 1] + wq.z * patch[4 * q + 2] + wq.w * patch[4 * q + 3];
    }
    v[c] = sum;
  }
  layer_norm_gelu<kStemC2>(v, p2 + kStemC2, p2 + 2 * kStemC2, a.eps2);
  T* out = static_cast<T*>(a.out) + ((static_cast<int64_t>(b) * p.H2 + gy) * p.W2 + gx) * kStemC2;
  store_row<T, kStemC2>(out, v);
}

template <typename T, typename W>
__global__ void __launch_bounds__(kStemThreads) mask_stem_kernel(const __grid_constant__ StemParams p) {
  if constexpr (kServedHere<T>) {
    mask_stem<T, W>(p);
  } else {
    unserved_kernel();
  }
}

bool stem_pointers_set(const MaskStemArgs& a) {
  return all_set(a.masks, a.conv1_weight, a.conv1_bias, a.norm1_weight, a.norm1_bias, a.conv2_weight, a.conv2_bias,
                 a.norm2_weight, a.norm2_bias, a.out);
}

cudaError_t stem_params(const MaskStemArgs& a, StemParams* p) {
  if (a.batch < 1 || a.height < 1 || a.width < 1) return cudaErrorInvalidValue;
  if (a.channels1 != kStemC1 || a.channels2 != kStemC2) return cudaErrorNotSupported;
  if (!aligned_to(16, a.out)) return cudaErrorInvalidValue;  // rows stored in 16-byte vectors; the rest read by element
  p->args = a;
  p->H1 = conv3x3s2_size(a.height);
  p->W1 = conv3x3s2_size(a.width);
  p->H2 = conv3x3s2_size(p->H1);
  p->W2 = conv3x3s2_size(p->W1);
  p->tiles_x = ceil_div(p->W2, kStemTile);
  p->tiles_per_image = p->tiles_x * ceil_div(p->H2, kStemTile);
  return static_cast<int64_t>(a.batch) * p->tiles_per_image > INT32_MAX ? cudaErrorInvalidValue : cudaSuccess;
}

template <typename T, typename W>
struct StemPlanner {
  // One tile, whose 38 KB of static shared memory fit every GPU.
  static cudaError_t run(const StemParams& p, const GpuTarget& target, Plan<StemParams>* plan) {
    static const KernelInfo info = kernel_info<T, W>(
        "mask_stem_kernel", std::to_string(kStemTile) + "x" + std::to_string(kStemTile) + " stage-2 pixels per block");
    const TileCandidate tiles[] = {{static_cast<int64_t>(p.args.batch) * p.tiles_per_image, 0, kStemTile}};
    const TileChoice choice = fill_a_wave(tiles, target);
    *plan = plan_of<mask_stem_kernel<T, W>, StemParams, 0>(info, tiles[0].blocks, 1, kStemThreads,
                                                           choice.small_grid_reason);
    return cudaSuccess;
  }
};

cudaError_t plan_stem(const StemParams& p, const GpuTarget& target, Plan<StemParams>* plan) {
  return dispatch_types<StemPlanner>(p.args.dtype, p.args.weight_dtype, p, target, plan);
}

const Op<MaskStemArgs, StemParams> kStemOp{stem_pointers_set, stem_params, plan_stem};

// ---- one stage on tensor cores ------------------------------------------------------------------

// The (in, out) channel counts with a stage kernel: SAM 2's stages 3 and 4.
#define MF_MASK_STAGE_CHANNELS(X) X(16, 64) X(64, 256)

bool has_stage_kernel(int in_channels, int out_channels) {
#define MF_STAGE_MATCH(CIN, COUT) \
  if (in_channels == CIN && out_channels == COUT) return true;
  MF_MASK_STAGE_CHANNELS(MF_STAGE_MATCH)
#undef MF_STAGE_MATCH
  return false;
}

struct StageParams {
  Conv3x3s2LnGeluArgs args;
  int Ho, Wo, M;  // M = batch * Ho * Wo output pixels
};

// A stage kernel's block GEMM: BM output pixels (its row tile, chosen per GPU by plan_stage) x all COUT
// channels (LayerNorm needs the whole row), 8 warps. k tiles cover one tap of BK channels: 16 for
// stage 3 (CIN 16); 32 for stage 4's 16-bit types and 16 for its fp32, whose 32-row tile then fits
// a T4's 64 KiB of shared memory.
template <typename T, int COUT, int BM>
struct ConvTile {
  static constexpr int BK = COUT == 64 || sizeof(T) == 4 ? 16 : 32;
  static constexpr int kWarpsN = COUT == 64 ? 2 : (BM >= 32 ? 4 : 8);
  using Gemm = BlockGemm<T, BM, COUT, BK, 8 / kWarpsN, kWarpsN>;
};

// The row tiles each stage's kernel is built with, largest first.
template <int... BMs>
struct RowTiles {};
template <int COUT>
struct StageRowTiles;
template <>
struct StageRowTiles<64> {
  using type = RowTiles<128, 64>;
};
template <>
struct StageRowTiles<256> {
  using type = RowTiles<64, 32, 16>;
};

// The weight tile of one k tile (one tap, channels c0 .. c0 + BK) read straight from the conv
// weight (COUT, CIN, 3, 3): tile element (n, c) is weight[n][c0 + c][tap]. The nine taps of a weight
// row are interleaved, so these are scalar loads, consecutive threads reading consecutive channels;
// the k loop takes the nine taps of a channel chunk one after the other, so the sectors one tile
// pulls into L1 serve the next eight.
template <typename T, typename W, int CIN, int BN, int BK, int kThreads>
struct ConvWeightTile {
  static_assert(kThreads % BK == 0 && BN % (kThreads / BK) == 0, "every thread loads whole columns");
  static constexpr int kRowsPerPass = kThreads / BK;
  static constexpr int kSlots = BN / kRowsPerPass;
  const W* column;  // &weight[n][c][0] for this thread's first tile row n and its channel c
  W regs[kSlots];

  // The thread's row and channel are fixed, so every slot is a constant offset from one pointer.
  __device__ __forceinline__ void init(const W* weight) {
    column = weight + static_cast<int64_t>((threadIdx.x / BK) * CIN + threadIdx.x % BK) * 9;
  }

  __device__ __forceinline__ void fetch(int c0, int tap) {
    const W* p = column + c0 * 9 + tap;
    for (int s = 0; s < kSlots; ++s) regs[s] = __ldg(p + s * kRowsPerPass * CIN * 9);
  }

  __device__ __forceinline__ void stash(T* tile, int ldb) const {
    T* p = tile + (threadIdx.x / BK) * ldb + threadIdx.x % BK;
    for (int s = 0; s < kSlots; ++s) p[s * kRowsPerPass * ldb] = as_elem<T>(regs[s]);
  }
};

// Gathers the implicit-GEMM A tile (BM output pixels x BK channels of one tap) and the weight tile.
// K tile kt covers tap kt % 9 of channels (kt / 9) * BK ..: a k tile never straddles two taps.
template <typename T, typename W, int CIN, int COUT, class G, int BM, int BK>
struct ConvLoader {
  static constexpr int kVec = G::kVec;
  static constexpr int kPerRow = BK / kVec;
  static constexpr int kTotal = BM * kPerRow;
  static constexpr int kSlots = (kTotal + G::kThreads - 1) / G::kThreads;
  static_assert(CIN % BK == 0, "a k tile must not straddle two taps");

  const T* in;
  int height, width;
  int64_t image[kSlots];  // element offset of the slot's image, or -1 past the last pixel
  int ih0[kSlots], iw0[kSlots];
  uint4 ra[kSlots];
  ConvWeightTile<T, W, CIN, COUT, BK, G::kThreads> weights;

  __device__ __forceinline__ void init(const StageParams& p, int m0) {
    const Conv3x3s2LnGeluArgs& a = p.args;
    in = static_cast<const T*>(a.x);
    weights.init(static_cast<const W*>(a.weight));
    height = a.height;
    width = a.width;
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * G::kThreads;
      const int pixel = m0 + v / kPerRow;
      image[s] = -1;
      if (v < kTotal && pixel < p.M) {
        const int per_image = p.Ho * p.Wo;
        const int b = pixel / per_image, rem = pixel % per_image;
        image[s] = static_cast<int64_t>(b) * height * width * CIN;
        ih0[s] = 2 * (rem / p.Wo) - 1;
        iw0[s] = 2 * (rem % p.Wo) - 1;
      }
    }
  }

  __device__ __forceinline__ void fetch(int kt) {
    const int tap = kt % 9, c0 = (kt / 9) * BK;
    const int kh = tap / 3, kw = tap % 3;
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * G::kThreads;
      const int ih = ih0[s] + kh, iw = iw0[s] + kw;
      ra[s] = make_uint4(0u, 0u, 0u, 0u);  // zero padding and rows past the last pixel
      if (image[s] >= 0 && ih >= 0 && ih < height && iw >= 0 && iw < width)
        ra[s] = load16(in + image[s] + (static_cast<int64_t>(ih) * width + iw) * CIN + c0 + (v % kPerRow) * kVec);
    }
    weights.fetch(c0, tap);
  }

  __device__ __forceinline__ void stash(T* a_tile, T* b_tile) const {
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * G::kThreads;
      if (kTotal % G::kThreads == 0 || v < kTotal)
        store16(a_tile + (v / kPerRow) * G::kLda + (v % kPerRow) * kVec, ra[s]);
    }
    weights.stash(b_tile, G::kLdb);
  }

  __device__ __forceinline__ bool a_kmajor(int) const { return false; }
};

template <typename T, typename W, int CIN, int COUT, int BM>
__device__ __forceinline__ void conv3x3s2_ln_gelu(const StageParams& p) {
  using G = typename ConvTile<T, COUT, BM>::Gemm;
  constexpr int BK = ConvTile<T, COUT, BM>::BK;
  static_assert(G::kThreads == 256, "launched with 256 threads");
  const Conv3x3s2LnGeluArgs& a = p.args;
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  const int m0 = blockIdx.x * BM;

  ConvLoader<T, W, CIN, COUT, G, BM, BK> loader;
  loader.init(p, m0);
  G gemm;
  gemm.run(loader, 9 * CIN / BK, smem, a.precise != 0);

  float* c = reinterpret_cast<float*>(smem);
  gemm.store(c);
  __syncthreads();

  // Epilogue: one warp per pixel row; lane owns channel pairs 2*lane + 64*q.
  constexpr int kPairs = COUT / 64;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float bias[2 * kPairs], gamma[2 * kPairs], beta[2 * kPairs];
  for (int q = 0; q < kPairs; ++q) {
    const int ch = 2 * lane + 64 * q;
    load_pair(static_cast<const W*>(a.bias) + ch, bias[2 * q], bias[2 * q + 1]);
    load_pair(static_cast<const W*>(a.norm_weight) + ch, gamma[2 * q], gamma[2 * q + 1]);
    load_pair(static_cast<const W*>(a.norm_bias) + ch, beta[2 * q], beta[2 * q + 1]);
  }
  T* out = static_cast<T*>(a.out);
  for (int r = warp; r < BM && m0 + r < p.M; r += G::kThreads / 32) {
    float v[2 * kPairs];
    float sum = 0.f;
    for (int q = 0; q < kPairs; ++q) {
      const float2 acc = *reinterpret_cast<const float2*>(c + r * G::kLdc + 2 * lane + 64 * q);
      v[2 * q] = acc.x + bias[2 * q];
      v[2 * q + 1] = acc.y + bias[2 * q + 1];
      sum += v[2 * q] + v[2 * q + 1];
    }
    const float mean = warp_sum(sum) * (1.0f / COUT);
    float sq = 0.f;
    for (int i = 0; i < 2 * kPairs; ++i) sq += (v[i] - mean) * (v[i] - mean);
    const float rstd = rsqrtf(warp_sum(sq) * (1.0f / COUT) + a.eps);
    T* row = out + static_cast<int64_t>(m0 + r) * COUT;
    for (int q = 0; q < kPairs; ++q) {
      const float y0 = gelu((v[2 * q] - mean) * rstd * gamma[2 * q] + beta[2 * q]);
      const float y1 = gelu((v[2 * q + 1] - mean) * rstd * gamma[2 * q + 1] + beta[2 * q + 1]);
      store_pair(row + 2 * lane + 64 * q, y0, y1);
    }
  }
}

template <typename T, typename W, int CIN, int COUT, int BM>
__global__ void __launch_bounds__(256, 1) conv3x3s2_ln_gelu_kernel(const __grid_constant__ StageParams p) {
  if constexpr (kServedHere<T>) {
    conv3x3s2_ln_gelu<T, W, CIN, COUT, BM>(p);
  } else {
    unserved_kernel();
  }
}

// Mask stage 4 chooses its row tile by its floor rather than by filling a wave. Each block reads the
// whole conv weight (COUT x 9 CIN: 295 KB in bf16) from L2 whatever its tile, so a second block on an
// SM costs a second weight read; on SAM 2's B=1 grid (4096 pixels) one 32-pixel block per SM (128
// blocks, 0.97 of an H100's 132 SMs) beats a wave of 16-pixel blocks two to an SM. A candidate's
// floor is its busiest SM's time: blocks per SM x the longer of a block's math and its weight read,
// both counted in pixels of math. Reading a weight of COUT x K elements takes sizeof(W) F / (2 L)
// pixels' math (2 COUT K FLOPs each) on an SM doing F FLOP and reading L bytes of L2 per clock: 21.6
// sizeof(W) on an A100 (1024 fp16 FMA per SM, 5120 L2 bytes per clock over 108 SMs; the generation
// with published figures); fp32 math takes 6x longer in precise 3xTF32 mode, 2x with one tf32
// product, 8x on the CUDA cores before sm_80. Ties go to more blocks.
template <typename T, typename W, size_t N>
TileChoice stage4_tile(const TileCandidate (&candidates)[N], const GpuTarget& target, bool precise) {
  constexpr double kPixelsPerWeightByte = 21.6;
  double slowdown = 1.0;
  if constexpr (std::is_same<T, float>::value) slowdown = !has_tf32_mma(target.arch) ? 8.0 : precise ? 6.0 : 2.0;
  const double weight_read = kPixelsPerWeightByte * sizeof(W) / slowdown;
  int chosen = -1;
  double best = 0.0;
  for (int i = 0; i < static_cast<int>(N); ++i) {
    if (candidates[i].smem > target.shared_memory_per_block) continue;
    const double floor = static_cast<double>(blocks_per_sm(candidates[i].blocks, target.sm_count)) *
                         (candidates[i].rows > weight_read ? candidates[i].rows : weight_read);
    if (chosen < 0 || floor <= best) {
      chosen = i;
      best = floor;
    }
  }
  if (chosen < 0 || candidates[chosen].blocks >= target.sm_count) return TileChoice{chosen, nullptr};
  if (candidates[most_blocks(candidates, target)].blocks < target.sm_count) return TileChoice{chosen, kSizesBelowAWave};
  return TileChoice{chosen,
                    "every block reads the whole conv weight from L2: a smaller tile would put two blocks, two weight "
                    "reads, on some SM, slower by the floor (blocks per SM x the longer of a block's math and its "
                    "weight read)"};
}

template <typename T, typename W, int CIN, int COUT>
struct StageKernels {
  template <int BM>
  static Plan<StageParams> plan(const StageParams& p, const char* small_grid_reason) {
    using Tile = ConvTile<T, COUT, BM>;
    static const KernelInfo info = kernel_info<T, W, CIN, COUT, BM>("conv3x3s2_ln_gelu_kernel", Tile::Gemm::describe());
    return plan_of<conv3x3s2_ln_gelu_kernel<T, W, CIN, COUT, BM>, StageParams, Tile::Gemm::kSmemBytes>(
        info, ceil_div(p.M, BM), 1, Tile::Gemm::kThreads, small_grid_reason);
  }

  template <int... BMs>
  static cudaError_t choose(const StageParams& p, const GpuTarget& target, Plan<StageParams>* plan, RowTiles<BMs...>) {
    const TileCandidate candidates[] = {
        {ceil_div(p.M, BMs), ConvTile<T, COUT, BMs>::Gemm::kSmemBytes, BMs}...};
    const TileChoice choice = COUT == 256 ? stage4_tile<T, W>(candidates, target, p.args.precise != 0)
                                          : fill_a_wave(candidates, target);
    if (choice.index < 0) return cudaErrorInvalidConfiguration;  // no tile fits this GPU's shared memory
    int index = 0;
    ((index++ == choice.index ? (*plan = StageKernels::plan<BMs>(p, choice.small_grid_reason), true) : false) || ...);
    return cudaSuccess;
  }
};

template <typename T, typename W>
struct StagePlanner {
  static cudaError_t run(const StageParams& p, const GpuTarget& target, Plan<StageParams>* plan) {
    const int cin = p.args.in_channels, cout = p.args.out_channels;
#define MF_STAGE_CASE(CIN, COUT) \
  if (cin == CIN && cout == COUT)  \
    return StageKernels<T, W, CIN, COUT>::choose(p, target, plan, typename StageRowTiles<COUT>::type{});
    MF_MASK_STAGE_CHANNELS(MF_STAGE_CASE)
#undef MF_STAGE_CASE
    return cudaErrorNotSupported;
  }
};

bool stage_pointers_set(const Conv3x3s2LnGeluArgs& a) {
  return all_set(a.x, a.weight, a.bias, a.norm_weight, a.norm_bias, a.out);
}

cudaError_t stage_params(const Conv3x3s2LnGeluArgs& a, StageParams* p) {
  if (a.batch < 1 || a.height < 1 || a.width < 1) return cudaErrorInvalidValue;
  if (!has_stage_kernel(a.in_channels, a.out_channels)) return cudaErrorNotSupported;
  // x in 16-byte vectors (CIN keeps every pixel's channels on a vector boundary), the output and the
  // epilogue's parameters in pairs; the conv weight by element.
  if (!aligned_to(16, a.x) || !aligned_to(2 * dtype_bytes(a.dtype), a.out) ||
      !aligned_to(2 * dtype_bytes(a.weight_dtype), a.bias, a.norm_weight, a.norm_bias)) {
    return cudaErrorInvalidValue;
  }
  p->args = a;
  p->Ho = conv3x3s2_size(a.height);
  p->Wo = conv3x3s2_size(a.width);
  const int64_t pixels = static_cast<int64_t>(a.batch) * p->Ho * p->Wo;
  if (pixels > INT32_MAX) return cudaErrorInvalidValue;
  p->M = static_cast<int>(pixels);
  return cudaSuccess;
}

cudaError_t plan_stage(const StageParams& p, const GpuTarget& target, Plan<StageParams>* plan) {
  return dispatch_types<StagePlanner>(p.args.dtype, p.args.weight_dtype, p, target, plan);
}

const Op<Conv3x3s2LnGeluArgs, StageParams> kStageOp{stage_pointers_set, stage_params, plan_stage};

std::string mask_downsample_kernel_configs() {
  std::string lines = "mask_stem in_channels=1 mid_channels=" + std::to_string(kStemC1) +
                      " out_channels=" + std::to_string(kStemC2) + "\n";
#define MF_STAGE_LINE(CIN, COUT) \
  lines += "conv3x3s2_ln_gelu in_channels=" #CIN " out_channels=" #COUT "\n";
  MF_MASK_STAGE_CHANNELS(MF_STAGE_LINE)
#undef MF_STAGE_LINE
  return lines;
}

}  // namespace mf

using namespace mf;

MF_EXPORT int memenc_fast_mask_stem(const MaskStemArgs* args, int device, void* stream) {
  return launch_op(kStemOp, args, device, stream);
}

MF_EXPORT int memenc_fast_mask_stem_plan(const MaskStemArgs* args, const GpuTarget* target, KernelLaunch* launch) {
  return plan_op(kStemOp, args, target, launch);
}

MF_EXPORT int memenc_fast_conv3x3s2_ln_gelu(const Conv3x3s2LnGeluArgs* args, int device, void* stream) {
  return launch_op(kStageOp, args, device, stream);
}

MF_EXPORT int memenc_fast_conv3x3s2_ln_gelu_plan(const Conv3x3s2LnGeluArgs* args, const GpuTarget* target,
                                                 KernelLaunch* launch) {
  return plan_op(kStageOp, args, target, launch);
}
