// Projection + add: out = [W_m | W_p] . [m ; p] + (b_m + b_p), one GEMM over the concatenated
// input channels (K = C_m + C_p), the bias in the epilogue, tokens (B, H, W, N) out. The mask
// features and pix_feat are read where they lie, each in either layout:
//   channels-last (channel stride 1: the mask path's output, or channels_last pix_feat): A tiles
//     are filled m-major, 16-byte vectors along channels;
//   channels-first (pixel stride 1: NCHW pix_feat, as SAM 2 passes it): A tiles are filled
//     k-major, 16-byte vectors along pixels, and the GEMM reads them transposed;
// so neither input is copied or transposed in memory first. A k tile never straddles the two.
#include "common.cuh"
#include "gemm.cuh"

namespace mf {

constexpr int kProjBM = 64;
constexpr int kProjBN = 128;
constexpr int kProjBK = 32;

template <typename T>
using ProjGemm = BlockGemm<T, kProjBM, kProjBN, kProjBK, 2, 4>;

struct ProjSource {
  const void* ptr;
  int64_t stride_b, stride_c, stride_p;  // elements; pixels are flattened (h * W + w)
  int channels;
  int kmajor;  // 1: channels-first (stride_p == 1), 0: channels-last (stride_c == 1)
};

struct ProjArgs {
  ProjSource src[2];  // mask features, pix_feat
  const void* w;      // (N, K) row-major, K = src[0].channels + src[1].channels
  const void* bias;   // (N,)
  int K, HW, M;       // M = B * HW tokens
  int precise;
  void* out;  // (M, N)
};

template <typename T>
struct ProjLoader {
  using G = ProjGemm<T>;
  static constexpr int kVec = G::kVec;
  static constexpr int kTotal = kProjBM * kProjBK / kVec;  // 16-byte vectors per A tile, either layout
  static constexpr int kSlots = (kTotal + G::kThreads - 1) / G::kThreads;
  static_assert(kTotal % G::kThreads == 0, "every thread loads whole vectors");

  const ProjArgs* a;
  int m0, first_tiles;
  int fetched_kmajor;
  uint4 ra[kSlots];
  WeightRows<T, kProjBN, kProjBK, G::kThreads> wrows;
  const T* w;

  __device__ __forceinline__ void fetch(int kt) {
    const int s = kt < first_tiles ? 0 : 1;
    const ProjSource& src = a->src[s];
    const int k0 = (kt - (s ? first_tiles : 0)) * kProjBK;
    const T* base = static_cast<const T*>(src.ptr);
    fetched_kmajor = src.kmajor;
    for (int i = 0; i < kSlots; ++i) {
      const int v = threadIdx.x + i * G::kThreads;
      int p, offset_c;
      if (src.kmajor) {  // vector v: channel k0 + v / (BM / kVec), pixels (v % (BM / kVec)) * kVec ..
        p = m0 + (v % (kProjBM / kVec)) * kVec;
        offset_c = k0 + v / (kProjBM / kVec);
      } else {  // vector v: pixel v / (BK / kVec), channels k0 + (v % (BK / kVec)) * kVec ..
        p = m0 + v / (kProjBK / kVec);
        offset_c = k0 + (v % (kProjBK / kVec)) * kVec;
      }
      ra[i] = make_uint4(0u, 0u, 0u, 0u);
      if (p < a->M)
        ra[i] = load16(base + (p / a->HW) * src.stride_b + static_cast<int64_t>(offset_c) * src.stride_c +
                       static_cast<int64_t>(p % a->HW) * src.stride_p);
    }
    wrows.fetch(w, a->K, kt);
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

  __device__ __forceinline__ bool a_kmajor(int kt) const { return a->src[kt < first_tiles ? 0 : 1].kmajor != 0; }
};

// __grid_constant__: the loader keeps a pointer to the arguments (which source a k tile reads is
// known only at run time) without a local copy of them.
template <typename T>
__global__ void __launch_bounds__(256) proj_add_kernel(const __grid_constant__ ProjArgs a) {
  using G = ProjGemm<T>;
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  const int m0 = blockIdx.x * kProjBM, n0 = blockIdx.y * kProjBN;

  ProjLoader<T> loader;
  loader.a = &a;
  loader.m0 = m0;
  loader.first_tiles = a.src[0].channels / kProjBK;
  loader.w = static_cast<const T*>(a.w) + static_cast<int64_t>(n0) * a.K;
  G gemm;
  gemm.run(loader, a.K / kProjBK, smem, a.precise != 0);

  float* c = reinterpret_cast<float*>(smem);
  gemm.store(c);
  __syncthreads();

  constexpr int kPairs = kProjBN / 64;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int N = static_cast<int>(gridDim.y) * kProjBN;
  float bias[2 * kPairs];
  for (int q = 0; q < kPairs; ++q)
    load_pair(static_cast<const T*>(a.bias) + n0 + 2 * lane + 64 * q, bias[2 * q], bias[2 * q + 1]);
  for (int r = warp; r < kProjBM && m0 + r < a.M; r += G::kThreads / 32) {
    T* row = static_cast<T*>(a.out) + static_cast<int64_t>(m0 + r) * N + n0;
    for (int q = 0; q < kPairs; ++q) {
      const float2 acc = *reinterpret_cast<const float2*>(c + r * G::kLdc + 2 * lane + 64 * q);
      store_pair(row + 2 * lane + 64 * q, acc.x + bias[2 * q], acc.y + bias[2 * q + 1]);
    }
  }
}

template <typename T>
struct ProjLaunch {
  static cudaError_t run(ProjArgs a, int n, cudaStream_t stream, int device) {
    constexpr int kVec = ProjGemm<T>::kVec;
    for (const ProjSource& s : a.src) {
      // Every 16-byte vector must be aligned and, channels-first, inside one image.
      const bool aligned = reinterpret_cast<uintptr_t>(s.ptr) % 16 == 0 && s.stride_b % kVec == 0 &&
                           (s.kmajor ? (s.stride_p == 1 && s.stride_c % kVec == 0 && a.HW % kVec == 0)
                                     : (s.stride_c == 1 && s.stride_p % kVec == 0));
      if (!aligned) return cudaErrorInvalidValue;
    }
    return launch(proj_add_kernel<T>, dim3(ceil_div(a.M, kProjBM), n / kProjBN), dim3(ProjGemm<T>::kThreads),
                  ProjGemm<T>::kSmemBytes, stream, device, a);
  }
};

}  // namespace mf

using namespace mf;

// Whether memenc_fast_proj_add has a kernel for these channel counts.
MF_EXPORT int memenc_fast_proj_add_supported(int mask_channels, int pix_channels, int out_channels) {
  return mask_channels > 0 && pix_channels > 0 && mask_channels % kProjBK == 0 && pix_channels % kProjBK == 0 &&
         out_channels > 0 && out_channels % kProjBN == 0;
}

// out (B * HW, N) = [W_m | W_p] . [m ; p] + bias. Each source is (B, C, HW) by element strides
// (batch, channel, flattened pixel), channels-last (channel stride 1) or channels-first (pixel
// stride 1), 16-byte aligned; the batch stride may be 0.
MF_EXPORT int memenc_fast_proj_add(int dtype, const void* m, int64_t m_stride_b, int64_t m_stride_c,
                                   int64_t m_stride_p, int mask_channels, const void* p, int64_t p_stride_b,
                                   int64_t p_stride_c, int64_t p_stride_p, int pix_channels, int batch, int HW,
                                   const void* w, const void* bias, int out_channels, int precise, void* out,
                                   int device, void* stream) {
  if (!m || !p || !w || !bias || !out || batch < 1 || HW < 1) return cudaErrorInvalidValue;
  if (!memenc_fast_proj_add_supported(mask_channels, pix_channels, out_channels)) return cudaErrorNotSupported;
  ProjArgs a{};
  a.src[0] = ProjSource{m, m_stride_b, m_stride_c, m_stride_p, mask_channels, m_stride_c != 1};
  a.src[1] = ProjSource{p, p_stride_b, p_stride_c, p_stride_p, pix_channels, p_stride_c != 1};
  a.w = w;
  a.bias = bias;
  a.K = mask_channels + pix_channels;
  a.HW = HW;
  const int64_t tokens = static_cast<int64_t>(batch) * HW;
  if (tokens > INT32_MAX) return cudaErrorInvalidValue;
  a.M = static_cast<int>(tokens);
  a.precise = precise;
  a.out = out;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  return dispatch_dtype<ProjLaunch>(dtype, a, out_channels, static_cast<cudaStream_t>(stream), device);
}
