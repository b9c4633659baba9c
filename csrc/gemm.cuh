// A block-level tensor-core GEMM: C[BM x BN] = A[BM x K] * B[BN x K]^T with fp32 accumulators,
// fed from shared memory in BK-wide k tiles, double-buffered through registers.
//
// bf16/fp16 operands run mma.m16n8k16 (on sm_75, fp16 only, as two mma.m16n8k8). fp32 operands
// run mma.m16n8k8 on tf32 from sm_80 on: "precise" mode splits each operand into a tf32 value and its
// tf32 remainder and sums three products (big*big + big*small + small*big, about fp32 accuracy: what
// the fp32 tolerance needs and what torch gives without TF32); otherwise one tf32 product, as torch
// does when TF32 is allowed. Before sm_80 (no tf32) fp32 runs on the CUDA cores, in full fp32 either
// way, each thread computing the accumulator elements its mma fragments would hold.
//
// Shared-memory tile formats (rows padded so that the fragment loads are bank-conflict free):
//   A m-major: a[m * kLda + k] (channels-last sources), A k-major: a[k * kLdt + m] (channels-first
//   sources), B n-major: b[n * kLdb + k] (weights as (out, in) rows).
#pragma once

#include <string>

#include "common.cuh"

namespace mf {

template <typename T>
__device__ __forceinline__ uint16_t bits16(T x) {
  static_assert(sizeof(T) == 2, "16-bit element expected");
  uint16_t bits;
  memcpy(&bits, &x, 2);
  return bits;
}

template <typename T>
__device__ __forceinline__ uint32_t load_u32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  small = to_tf32(x - tf32_value(big));
}

constexpr int cmax(int a, int b) { return a > b ? a : b; }

template <typename T, int BM, int BN, int BK, int WARPS_M, int WARPS_N>
struct BlockGemm {
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access
  static constexpr int kLda = BK + kVec;
  static constexpr int kLdt = BM + 8;
  static constexpr int kLdb = BK + kVec;
  static constexpr int kATileElems = cmax(BM * kLda, BK * kLdt);
  static constexpr int kStageElems = kATileElems + BN * kLdb;
  static constexpr int kLdc = BN + 8;
  static constexpr int kSmemBytes =
      cmax(2 * kStageElems * static_cast<int>(sizeof(T)), BM * kLdc * static_cast<int>(sizeof(float)));
  static constexpr int kWarpM = BM / WARPS_M;
  static constexpr int kWarpN = BN / WARPS_N;
  static constexpr int MT = kWarpM / 16;
  static constexpr int NT = kWarpN / 8;
  static constexpr bool kHalf = sizeof(T) == 2;
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0, "warp tile must be whole 16x8 mma tiles");
  static_assert(BK % 16 == 0, "k tile must be whole mma k steps");
  static_assert(BM % kVec == 0, "k-major A rows are filled in 16-byte vectors");

  float acc[MT][NT][4];

  // The tile in a few words, for a plan's KernelLaunch.
  __host__ static std::string describe() {
    return std::to_string(BM) + "x" + std::to_string(BN) + " tile, k " + std::to_string(BK) + ", " +
           std::to_string(WARPS_M) + "x" + std::to_string(WARPS_N) + " warps";
  }

  __device__ __forceinline__ static T* a_tile(T* smem, int stage) { return smem + stage * kStageElems; }
  __device__ __forceinline__ static T* b_tile(T* smem, int stage) {
    return smem + stage * kStageElems + kATileElems;
  }

  __device__ __forceinline__ void zero() {
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j)
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  // acc += A_tile * B_tile^T over one BK-wide k tile.
  __device__ __forceinline__ void mma_tile(const T* a, bool a_kmajor, const T* b, bool precise) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int m_base = (warp / WARPS_N) * kWarpM + g;
    const int n_base = (warp % WARPS_N) * kWarpN + g;
    if constexpr (kHalf) {
      (void)precise;
      for (int ks = 0; ks < BK; ks += 16) {
        uint32_t bf[NT][2];
        for (int j = 0; j < NT; ++j) {
          const T* p = b + (n_base + j * 8) * kLdb + ks + 2 * t;
          bf[j][0] = load_u32(p);
          bf[j][1] = load_u32(p + 8);
        }
        for (int i = 0; i < MT; ++i) {
          const int m = m_base + i * 16;
          uint32_t af[4];
          if (!a_kmajor) {
            const T* p = a + m * kLda + ks + 2 * t;
            af[0] = load_u32(p);
            af[1] = load_u32(p + 8 * kLda);
            af[2] = load_u32(p + 8);
            af[3] = load_u32(p + 8 * kLda + 8);
          } else {
            const T* p = a + (ks + 2 * t) * kLdt + m;
            af[0] = pack_pair_bits(bits16(p[0]), bits16(p[kLdt]));
            af[1] = pack_pair_bits(bits16(p[8]), bits16(p[kLdt + 8]));
            af[2] = pack_pair_bits(bits16(p[8 * kLdt]), bits16(p[9 * kLdt]));
            af[3] = pack_pair_bits(bits16(p[8 * kLdt + 8]), bits16(p[9 * kLdt + 8]));
          }
          for (int j = 0; j < NT; ++j) mma_16816<T>(acc[i][j], af, bf[j]);
        }
      }
    } else if constexpr (!has_tf32_mma(MF_CODE_ARCH)) {
      (void)precise;
      fma_tile(a, a_kmajor, b);
    } else {
      for (int ks = 0; ks < BK; ks += 8) {
        uint32_t b_big[NT][2], b_small[NT][2];
        for (int j = 0; j < NT; ++j) {
          const float* p = b + (n_base + j * 8) * kLdb + ks + t;
          split_tf32(p[0], b_big[j][0], b_small[j][0]);
          split_tf32(p[4], b_big[j][1], b_small[j][1]);
        }
        for (int i = 0; i < MT; ++i) {
          const int m = m_base + i * 16;
          float av[4];
          if (!a_kmajor) {
            const float* p = a + m * kLda + ks + t;
            av[0] = p[0];
            av[1] = p[8 * kLda];
            av[2] = p[4];
            av[3] = p[8 * kLda + 4];
          } else {
            const float* p = a + (ks + t) * kLdt + m;
            av[0] = p[0];
            av[1] = p[8];
            av[2] = p[4 * kLdt];
            av[3] = p[4 * kLdt + 8];
          }
          uint32_t a_big[4], a_small[4];
          for (int e = 0; e < 4; ++e) split_tf32(av[e], a_big[e], a_small[e]);
          for (int j = 0; j < NT; ++j) {
            if (precise) {
              mma_m16n8k8_tf32(acc[i][j], a_small, b_big[j]);
              mma_m16n8k8_tf32(acc[i][j], a_big, b_small[j]);
            }
            mma_m16n8k8_tf32(acc[i][j], a_big, b_big[j]);
          }
        }
      }
    }
  }

  // acc += A_tile * B_tile^T over one k tile of fp32 operands on the CUDA cores. Element e of
  // acc[i][j] is row m_base + 16 i + 8 (e / 2), column n_base + 8 j + e % 2, as in the mma
  // fragments (the row and column sets a lane reads are bank-conflict free with the padded rows).
  __device__ __forceinline__ void fma_tile(const T* a, bool a_kmajor, const T* b) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int m_base = (warp / WARPS_N) * kWarpM + g;
    const int n_base = (warp % WARPS_N) * kWarpN + 2 * t;
    for (int k = 0; k < BK; ++k) {
      float bv[NT][2];
      for (int j = 0; j < NT; ++j) {
        const T* p = b + (n_base + j * 8) * kLdb + k;
        bv[j][0] = p[0];
        bv[j][1] = p[kLdb];
      }
      for (int i = 0; i < MT; ++i) {
        const int m = m_base + i * 16;
        const float a0 = a_kmajor ? a[k * kLdt + m] : a[m * kLda + k];
        const float a1 = a_kmajor ? a[k * kLdt + m + 8] : a[(m + 8) * kLda + k];
        for (int j = 0; j < NT; ++j) {
          acc[i][j][0] += a0 * bv[j][0];
          acc[i][j][1] += a0 * bv[j][1];
          acc[i][j][2] += a1 * bv[j][0];
          acc[i][j][3] += a1 * bv[j][1];
        }
      }
    }
  }

  // The accumulators into an fp32 tile c[row * kLdc + col] (the epilogue's input).
  __device__ __forceinline__ void store(float* c) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int m_base = (warp / WARPS_N) * kWarpM + g;
    const int n_base = (warp % WARPS_N) * kWarpN + 2 * t;
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NT; ++j) {
        float* p = c + (m_base + i * 16) * kLdc + n_base + j * 8;
        *reinterpret_cast<float2*>(p) = make_float2(acc[i][j][0], acc[i][j][1]);
        *reinterpret_cast<float2*>(p + 8 * kLdc) = make_float2(acc[i][j][2], acc[i][j][3]);
      }
  }

  // Runs the whole k loop. `loader` moves k tile kt from global memory into registers
  // (fetch(kt)) and from there into a stage's shared tiles (stash(a, b)), and says whether that
  // tile's A is k-major (a_kmajor(kt)). Loads of tile kt+1 are in flight while tile kt multiplies;
  // one barrier per k tile. Ends with a barrier, so the caller may reuse the shared memory.
  template <class Loader>
  __device__ __forceinline__ void run(Loader& loader, int k_tiles, T* smem, bool precise) {
    zero();
    loader.fetch(0);
    loader.stash(a_tile(smem, 0), b_tile(smem, 0));
    __syncthreads();
    for (int kt = 0; kt < k_tiles; ++kt) {
      const bool more = kt + 1 < k_tiles;
      if (more) loader.fetch(kt + 1);
      mma_tile(a_tile(smem, kt % 2), loader.a_kmajor(kt), b_tile(smem, kt % 2), precise);
      if (more) loader.stash(a_tile(smem, (kt + 1) % 2), b_tile(smem, (kt + 1) % 2));
      __syncthreads();
    }
  }
};

// 16 bytes from global memory through the read-only cache.
__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ void store16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// The n-major weight tile of one k tile: rows 0 .. BN of a row-major matrix of W (row_stride
// elements apart), columns col0 .. col0 + BK, moved through registers in 16-byte loads and stored to
// shared memory as T. fp32 parameters with 16-bit activations take two loads per store and are
// converted only when stored, so that the loads of the next tile stay in flight during the multiply.
template <typename T, typename W, int BN, int BK, int kThreads>
struct WeightRows {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte store
  static constexpr int kLoads = static_cast<int>(sizeof(W) / sizeof(T));
  static constexpr int kPerRow = BK / kVec;
  static constexpr int kTotal = BN * kPerRow;
  static constexpr int kSlots = (kTotal + kThreads - 1) / kThreads;
  static_assert(sizeof(W) % sizeof(T) == 0, "parameters are T or float");
  union Vector {
    uint4 raw[kLoads];
    W elems[kVec];
  };
  Vector regs[kSlots];

  __device__ __forceinline__ void fetch(const W* rows, int64_t row_stride, int col0) {
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * kThreads;
      if (kTotal % kThreads == 0 || v < kTotal) {
        const W* p = rows + (v / kPerRow) * row_stride + col0 + (v % kPerRow) * kVec;
        for (int l = 0; l < kLoads; ++l) regs[s].raw[l] = load16(p + l * (kVec / kLoads));
      }
    }
  }

  __device__ __forceinline__ void stash(T* tile, int ldb) const {
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * kThreads;
      if (kTotal % kThreads == 0 || v < kTotal) {
        T* dst = tile + (v / kPerRow) * ldb + (v % kPerRow) * kVec;
        if constexpr (kLoads == 1) {
          store16(dst, regs[s].raw[0]);
        } else {
          union {
            uint4 raw;
            T elems[kVec];
          } packed;
          for (int e = 0; e < kVec; ++e) packed.elems[e] = as_elem<T>(regs[s].elems[e]);
          store16(dst, packed.raw);
        }
      }
    }
  }
};

}  // namespace mf
