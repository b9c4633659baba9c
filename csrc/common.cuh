// What every kernel file shares: element types, exact GELU, warp reductions, the tensor-core
// instructions, the launch helper, and the argument checks, device guard and dtype dispatch of the
// extern "C" launchers (whose arguments launch_args.h declares).
//
// Compiles with plain nvcc (no torch headers). With -DMEMENC_EMULATE it compiles with a host C++
// compiler against emulation.h instead, which is how the CPU tests run these kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include "launch_args.h"

#ifdef MEMENC_EMULATE
#include "emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#endif

#define MF_EXPORT extern "C" __attribute__((visibility("default")))

namespace mf {

// ---- element types ----------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half(x); }
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return Elem<T>::to_float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return Elem<T>::from_float(x);
}

// A parameter of type W as the activation type T (the identity when they are the same).
template <typename T, typename W>
__device__ __forceinline__ T as_elem(W x) {
  if constexpr (std::is_same<T, W>::value) {
    return x;
  } else {
    return from_float<T>(to_float(x));
  }
}

// Two adjacent elements c, c+1 of a row (c even), loaded or stored as one access.
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T x, y;
};

template <typename T>
__device__ __forceinline__ void load_pair(const T* p, float& a, float& b) {
  const Pair<T> pair = *reinterpret_cast<const Pair<T>*>(p);
  a = to_float(pair.x);
  b = to_float(pair.y);
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  Pair<T> pair;
  pair.x = from_float<T>(a);
  pair.y = from_float<T>(b);
  *reinterpret_cast<Pair<T>*>(p) = pair;
}

// ---- math ---------------------------------------------------------------------------------------

// Exact (erf) GELU, as nn.GELU(): the only activation the fused path accepts.
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Output size of a 3x3, stride 2, padding 1 convolution.
__host__ __device__ __forceinline__ int conv3x3s2_size(int n) { return (n - 1) / 2 + 1; }

// ---- tensor cores -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t pack_pair_bits(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// D += A * B for one 16x8 tile, bf16/fp16 operands, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef MEMENC_EMULATE
  emu::mma_m16n8k16<T>(d, a, b);
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// D += A * B for one 16x8 tile with k = 8, tf32 operands (fp32 bit patterns), fp32 accumulators.
__device__ __forceinline__ void mma_1688_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef MEMENC_EMULATE
  emu::mma_m16n8k8_tf32(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// fp32 -> tf32, rounded to nearest (ties away), as the fp32 bit pattern the mma reads.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef MEMENC_EMULATE
  return emu::cvt_rna_tf32(x);
#else
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return bits;
#endif
}

__device__ __forceinline__ float tf32_value(uint32_t bits) {
#ifdef MEMENC_EMULATE
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#else
  return __uint_as_float(bits);
#endif
}

// ---- launching ----------------------------------------------------------------------------------

// The dynamic shared memory of a kernel launch, 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef MEMENC_EMULATE
  return static_cast<unsigned char*>(emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char mf_dynamic_smem[];
  return mf_dynamic_smem;
#endif
}

// Launches `kernel` on `stream` and returns the launch's error (cudaGetLastError). A kernel that
// asks for more than 48 KiB of dynamic shared memory gets the opt-in attribute set first, once per
// device.
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   int device, Args... args) {
#ifdef MEMENC_EMULATE
  (void)stream;
  (void)device;
  return emu::launch(kernel, grid, block, smem, args...);
#else
  if (smem > 48 * 1024) {
    static std::atomic<uint64_t> configured{0};  // one bit per device index below 64
    const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
    if (bit == 0 || !(configured.load() & bit)) {
      const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
      configured.fetch_or(bit);
    }
  }
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// Makes `device` current for the launcher's lifetime and restores the caller's device after: the
// library has its own (static) CUDA runtime, whose current device is not torch's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device_) status_ = cudaSetDevice(device_);
  }
  ~DeviceGuard() {
    if (status_ == cudaSuccess && previous_ != device_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int device_;
  int previous_ = -1;
  cudaError_t status_;
};

// True when no pointer is null: the launchers refuse null arguments with cudaErrorInvalidValue.
template <typename... Pointers>
bool all_set(Pointers... pointers) {
  return ((pointers != nullptr) && ...);
}

// Runs `Fn<T, W>::run(args...)` for the activation type T and the parameter type W that the dtype
// codes (MEMENC_DTYPE_*) name; W is T or float (fp32 parameters with 16-bit activations).
template <template <typename, typename> class Fn, typename... Args>
cudaError_t dispatch_types(int dtype, int weight_dtype, Args&&... args) {
  const bool fp32_weights = weight_dtype == MEMENC_DTYPE_FLOAT32;
  if (!fp32_weights && weight_dtype != dtype) return cudaErrorNotSupported;
  switch (dtype) {
    case MEMENC_DTYPE_FLOAT32:
      return Fn<float, float>::run(args...);
    case MEMENC_DTYPE_BFLOAT16:
      return fp32_weights ? Fn<__nv_bfloat16, float>::run(args...) : Fn<__nv_bfloat16, __nv_bfloat16>::run(args...);
    case MEMENC_DTYPE_FLOAT16:
      return fp32_weights ? Fn<__half, float>::run(args...) : Fn<__half, __half>::run(args...);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace mf
