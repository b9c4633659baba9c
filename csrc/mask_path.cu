// The mask downsampler: sigmoid (or the caller's scale/bias) and the stages
// conv3x3 stride 2 padding 1 -> LayerNorm over channels -> exact GELU, channels 1 -> 4 -> 16 -> 64 -> 256.
//
// Two kernels, three launches (SAM 2 sizes: 1024^2 mask -> 512^2x4 -> 256^2x16 -> 128^2x64 -> 64^2x256):
//
// * mask_stem_kernel: the mask transform and stages 1 and 2 chained per 16x16 tile of stage-2
//   output. The transformed 67x67 input patch and the 33x33x4 stage-1 patch live in shared
//   memory (fp32); only the stage-2 tile (channels-last) is written. CUDA cores: 4 and 16 output
//   channels are too few for tensor-core tiles.
// * conv3x3s2_ln_gelu_kernel<T, CIN, COUT>: one stage as an implicit GEMM on tensor cores
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
// All math is fp32 (accumulation, LayerNorm statistics); I/O in the module's dtype.
#include "common.cuh"
#include "gemm.cuh"

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

struct StemArgs {
  const void* mask;
  int64_t stride_b, stride_h, stride_w;  // elements; the batch stride may be 0 (expanded)
  int H, W, H1, W1, H2, W2;
  int tiles_x, tiles_per_image;
  const void *w1, *b1, *g1, *be1;  // stage 1: conv (4,1,3,3), bias, LayerNorm weight, bias
  const void *w2, *b2, *g2, *be2;  // stage 2: conv (16,4,3,3), ...
  float eps1, eps2;
  int apply_sigmoid;
  float scale, bias;
  void* out;  // (B, H2, W2, 16) channels-last
};

template <typename T>
__global__ void __launch_bounds__(kStemThreads) mask_stem_kernel(StemArgs a) {
  __shared__ __align__(16) float in_patch[kStemIn * kStemInLd];
  __shared__ __align__(16) float4 s1[kStemS1 * kStemS1];
  __shared__ __align__(16) float w2s[kStemC2 * 9 * kStemC1];  // [c_out][tap][c_in]: matches s1
  __shared__ float w1s[kStemC1 * 9];
  __shared__ float p1[3 * kStemC1];  // bias, LayerNorm weight, LayerNorm bias
  __shared__ float p2[3 * kStemC2];

  const int tid = threadIdx.x;
  const int b = blockIdx.x / a.tiles_per_image;
  const int tile = blockIdx.x % a.tiles_per_image;
  const int y2 = (tile / a.tiles_x) * kStemTile, x2 = (tile % a.tiles_x) * kStemTile;
  const int y1 = 2 * y2 - 1, x1 = 2 * x2 - 1;  // stage-1 patch origin
  const int y0 = 2 * y1 - 1, x0 = 2 * x1 - 1;  // input patch origin

  for (int i = tid; i < kStemC1 * 9; i += kStemThreads) w1s[i] = to_float(static_cast<const T*>(a.w1)[i]);
  for (int i = tid; i < kStemC2 * 9 * kStemC1; i += kStemThreads) {
    const int c = i / (9 * kStemC1), tap = (i / kStemC1) % 9, ci = i % kStemC1;
    w2s[i] = to_float(static_cast<const T*>(a.w2)[(c * kStemC1 + ci) * 9 + tap]);
  }
  if (tid < kStemC1) {
    p1[tid] = to_float(static_cast<const T*>(a.b1)[tid]);
    p1[kStemC1 + tid] = to_float(static_cast<const T*>(a.g1)[tid]);
    p1[2 * kStemC1 + tid] = to_float(static_cast<const T*>(a.be1)[tid]);
  }
  if (tid < kStemC2) {
    p2[tid] = to_float(static_cast<const T*>(a.b2)[tid]);
    p2[kStemC2 + tid] = to_float(static_cast<const T*>(a.g2)[tid]);
    p2[2 * kStemC2 + tid] = to_float(static_cast<const T*>(a.be2)[tid]);
  }

  // The transformed input patch; outside the image it is the conv's zero padding (applied after
  // the transform, as the reference pads the transformed mask).
  const T* mask = static_cast<const T*>(a.mask) + static_cast<int64_t>(b) * a.stride_b;
  for (int i = tid; i < kStemIn * kStemIn; i += kStemThreads) {
    const int y = i / kStemIn, x = i % kStemIn;
    const int gy = y0 + y, gx = x0 + x;
    float v = 0.f;
    if (gy >= 0 && gy < a.H && gx >= 0 && gx < a.W) {
      v = to_float(mask[gy * a.stride_h + gx * a.stride_w]);
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
    if (gy >= 0 && gy < a.H1 && gx >= 0 && gx < a.W1) {
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
  if (gy >= a.H2 || gx >= a.W2) return;
  float patch[9 * kStemC1];
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) {
      const float4 q = s1[(2 * ly + kh) * kStemS1 + 2 * lx + kw];
      float* p = patch + (kh * 3 + kw) * kStemC1;
      p[0] = q.x;
      p[1] = q.y;
      p[2] = q.z;
      p[3] = q.w;
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
  T* out = static_cast<T*>(a.out) + ((static_cast<int64_t>(b) * a.H2 + gy) * a.W2 + gx) * kStemC2;
  store_row<T, kStemC2>(out, v);
}

template <typename T>
struct MaskStemLaunch {
  static cudaError_t run(StemArgs a, int batch, cudaStream_t stream, int device) {
    const int64_t blocks = static_cast<int64_t>(batch) * a.tiles_per_image;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    return launch(mask_stem_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kStemThreads), 0, stream,
                  device, a);
  }
};

// ---- one stage on tensor cores ------------------------------------------------------------------

struct ConvArgs {
  const void* in;  // (B, H, W, CIN) channels-last
  const void* w;   // (COUT, 3, 3, CIN): k = tap * CIN + c_in
  const void *bias, *ln_w, *ln_b;
  float eps;
  int H, W, Ho, Wo, M;  // M = B * Ho * Wo output pixels
  int precise;          // fp32 only: 3xTF32 (IEEE-level accuracy) instead of one TF32 product
  void* out;            // (B, Ho, Wo, COUT) channels-last
};

template <typename T, int CIN, int COUT>
struct ConvConfig;
template <typename T>
struct ConvConfig<T, 16, 64> {  // stage 3: 128 pixels x 64 channels per block, one tap per k tile
  static constexpr int BM = 128, BK = 16;
  using Gemm = BlockGemm<T, BM, 64, BK, 4, 2>;
};
template <typename T>
struct ConvConfig<T, 64, 256> {  // stage 4: 64 pixels x all 256 channels (LayerNorm needs the row)
  static constexpr int BM = 64, BK = 32;
  using Gemm = BlockGemm<T, BM, 256, BK, 2, 4>;
};

// Gathers the implicit-GEMM A tile (BM output pixels x BK channels of one tap) and the weight tile.
template <typename T, int CIN, int COUT, class G, int BM, int BK>
struct ConvLoader {
  static constexpr int kVec = G::kVec;
  static constexpr int kPerRow = BK / kVec;
  static constexpr int kTotal = BM * kPerRow;
  static constexpr int kSlots = (kTotal + G::kThreads - 1) / G::kThreads;
  static constexpr int kChunks = CIN / BK;  // k tiles per tap
  static_assert(CIN % BK == 0, "a k tile must not straddle two taps");

  const T* in;
  const T* w;
  int H, W;
  int64_t image[kSlots];  // element offset of the slot's image, or -1 past the last pixel
  int ih0[kSlots], iw0[kSlots];
  uint4 ra[kSlots];
  WeightRows<T, COUT, BK, G::kThreads> wrows;

  __device__ __forceinline__ void init(const ConvArgs& a, int m0) {
    in = static_cast<const T*>(a.in);
    w = static_cast<const T*>(a.w);
    H = a.H;
    W = a.W;
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * G::kThreads;
      const int p = m0 + v / kPerRow;
      image[s] = -1;
      if (v < kTotal && p < a.M) {
        const int per_image = a.Ho * a.Wo;
        const int b = p / per_image, rem = p % per_image;
        image[s] = static_cast<int64_t>(b) * H * W * CIN;
        ih0[s] = 2 * (rem / a.Wo) - 1;
        iw0[s] = 2 * (rem % a.Wo) - 1;
      }
    }
  }

  __device__ __forceinline__ void fetch(int kt) {
    const int tap = kt / kChunks, c0 = (kt % kChunks) * BK;
    const int kh = tap / 3, kw = tap % 3;
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * G::kThreads;
      const int ih = ih0[s] + kh, iw = iw0[s] + kw;
      ra[s] = make_uint4(0u, 0u, 0u, 0u);  // zero padding and rows past the last pixel
      if (image[s] >= 0 && ih >= 0 && ih < H && iw >= 0 && iw < W)
        ra[s] = load16(in + image[s] + (static_cast<int64_t>(ih) * W + iw) * CIN + c0 + (v % kPerRow) * kVec);
    }
    wrows.fetch(w, 9 * CIN, kt);
  }

  __device__ __forceinline__ void stash(T* a_tile, T* b_tile) const {
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * G::kThreads;
      if (kTotal % G::kThreads == 0 || v < kTotal) store16(a_tile + (v / kPerRow) * G::kLda + (v % kPerRow) * kVec, ra[s]);
    }
    wrows.stash(b_tile, G::kLdb);
  }

  __device__ __forceinline__ bool a_kmajor(int) const { return false; }
};

template <typename T, int CIN, int COUT>
__global__ void __launch_bounds__(256) conv3x3s2_ln_gelu_kernel(ConvArgs a) {
  using Config = ConvConfig<T, CIN, COUT>;
  using G = typename Config::Gemm;
  constexpr int BM = Config::BM, BK = Config::BK;
  static_assert(G::kThreads == 256, "launched with 256 threads");
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  const int m0 = blockIdx.x * BM;

  ConvLoader<T, CIN, COUT, G, BM, BK> loader;
  loader.init(a, m0);
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
    load_pair(static_cast<const T*>(a.bias) + ch, bias[2 * q], bias[2 * q + 1]);
    load_pair(static_cast<const T*>(a.ln_w) + ch, gamma[2 * q], gamma[2 * q + 1]);
    load_pair(static_cast<const T*>(a.ln_b) + ch, beta[2 * q], beta[2 * q + 1]);
  }
  T* out = static_cast<T*>(a.out);
  for (int r = warp; r < BM && m0 + r < a.M; r += G::kThreads / 32) {
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

template <typename T>
struct ConvLaunch {
  template <int CIN, int COUT>
  static cudaError_t go(const ConvArgs& a, cudaStream_t stream, int device) {
    using Config = ConvConfig<T, CIN, COUT>;
    return launch(conv3x3s2_ln_gelu_kernel<T, CIN, COUT>, dim3(ceil_div(a.M, Config::BM)),
                  dim3(Config::Gemm::kThreads), Config::Gemm::kSmemBytes, stream, device, a);
  }

  static cudaError_t run(int cin, int cout, ConvArgs a, cudaStream_t stream, int device) {
    if (cin == 16 && cout == 64) return go<16, 64>(a, stream, device);
    if (cin == 64 && cout == 256) return go<64, 256>(a, stream, device);
    return cudaErrorNotSupported;
  }
};

}  // namespace mf

using namespace mf;

// Stages 1 and 2 of the mask path run fused when the channels are 1 -> 4 -> 16.
MF_EXPORT int memenc_fast_mask_stem_supported(int c0, int c1, int c2) {
  return c0 == 1 && c1 == kStemC1 && c2 == kStemC2;
}

// Sigmoid (optional), * scale + bias, then stages 1 and 2 over masks (B, 1, H, W) with any
// element strides; writes (B, H2, W2, 16) channels-last.
MF_EXPORT int memenc_fast_mask_stem(int dtype, const void* mask, int64_t stride_b, int64_t stride_h,
                                    int64_t stride_w, int batch, int H, int W, const void* w1, const void* b1,
                                    const void* g1, const void* be1, float eps1, const void* w2, const void* b2,
                                    const void* g2, const void* be2, float eps2, int apply_sigmoid, float scale,
                                    float bias, void* out, int device, void* stream) {
  if (!mask || !out || !w1 || !b1 || !g1 || !be1 || !w2 || !b2 || !g2 || !be2 || batch < 1 || H < 1 || W < 1)
    return cudaErrorInvalidValue;
  StemArgs a{};
  a.mask = mask;
  a.stride_b = stride_b;
  a.stride_h = stride_h;
  a.stride_w = stride_w;
  a.H = H;
  a.W = W;
  a.H1 = conv3x3s2_size(H);
  a.W1 = conv3x3s2_size(W);
  a.H2 = conv3x3s2_size(a.H1);
  a.W2 = conv3x3s2_size(a.W1);
  a.tiles_x = ceil_div(a.W2, kStemTile);
  a.tiles_per_image = a.tiles_x * ceil_div(a.H2, kStemTile);
  a.w1 = w1;
  a.b1 = b1;
  a.g1 = g1;
  a.be1 = be1;
  a.w2 = w2;
  a.b2 = b2;
  a.g2 = g2;
  a.be2 = be2;
  a.eps1 = eps1;
  a.eps2 = eps2;
  a.apply_sigmoid = apply_sigmoid;
  a.scale = scale;
  a.bias = bias;
  a.out = out;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  return dispatch_dtype<MaskStemLaunch>(dtype, a, batch, static_cast<cudaStream_t>(stream), device);
}

// Whether memenc_fast_conv3x3s2_ln_gelu has a kernel for these channel counts.
MF_EXPORT int memenc_fast_conv3x3s2_ln_gelu_supported(int cin, int cout) {
  return (cin == 16 && cout == 64) || (cin == 64 && cout == 256);
}

// One mask-path stage: (B, H, W, cin) channels-last -> conv3x3 stride 2 padding 1 with weights
// (cout, 3, 3, cin) -> + bias -> LayerNorm over cout -> GELU -> (B, Ho, Wo, cout) channels-last.
MF_EXPORT int memenc_fast_conv3x3s2_ln_gelu(int dtype, int cin, int cout, const void* in, int batch, int H, int W,
                                            const void* w, const void* bias, const void* ln_w, const void* ln_b,
                                            float eps, int precise, void* out, int device, void* stream) {
  if (!in || !out || !w || !bias || !ln_w || !ln_b || batch < 1 || H < 1 || W < 1) return cudaErrorInvalidValue;
  if (!memenc_fast_conv3x3s2_ln_gelu_supported(cin, cout)) return cudaErrorNotSupported;
  ConvArgs a{};
  a.in = in;
  a.w = w;
  a.bias = bias;
  a.ln_w = ln_w;
  a.ln_b = ln_b;
  a.eps = eps;
  a.H = H;
  a.W = W;
  a.Ho = conv3x3s2_size(H);
  a.Wo = conv3x3s2_size(W);
  const int64_t pixels = static_cast<int64_t>(batch) * a.Ho * a.Wo;
  if (pixels > INT32_MAX) return cudaErrorInvalidValue;
  a.M = static_cast<int>(pixels);
  a.precise = precise;
  a.out = out;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  return dispatch_dtype<ConvLaunch>(dtype, cin, cout, a, static_cast<cudaStream_t>(stream), device);
}
