// What every kernel file shares: what each GPU generation runs, element types, exact GELU, warp
// reductions, the tensor-core instructions per architecture, launch plans, the kernels' preparation
// per device and the launch helper, the launch-configuration choosers, and the argument checks
// (alignment included), device guard and dtype dispatch of the extern "C" launchers (whose arguments
// launch_args.h declares).
//
// Compiles with plain nvcc (no torch headers). With -DMEMENC_EMULATE it compiles with a host C++
// compiler against emulation.h instead, which is how the CPU tests run these kernels
// (-DMEMENC_EMULATE_ARCH=75 runs sm_75's code paths).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "launch_args.h"

// Architectures are compute capabilities as major * 10 + minor (75 for sm_75), the unit of a
// kernel's ptxVersion. MF_CODE_ARCH is the architecture the device code being compiled is for:
// __CUDA_ARCH__ / 10 in nvcc's device passes, MEMENC_EMULATE_ARCH under the host emulation (90 unless
// a test builds another generation's code path), 0 in nvcc's host pass, which compiles no kernel body.
#if defined(MEMENC_EMULATE)
#ifndef MEMENC_EMULATE_ARCH
#define MEMENC_EMULATE_ARCH 90
#endif
#define MF_CODE_ARCH MEMENC_EMULATE_ARCH
#elif defined(__CUDA_ARCH__)
#define MF_CODE_ARCH (__CUDA_ARCH__ / 10)
#else
#define MF_CODE_ARCH 0
#endif

#ifdef MEMENC_EMULATE
#include "emulation.h"
#else
#include <cuda.h>  // the driver's types (CUcontext) only: the library does not link the driver
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#define MF_EXPORT extern "C" __attribute__((visibility("default")))

namespace mf {

// ---- what each GPU generation runs --------------------------------------------------------------

// The oldest architecture whose code serves each dtype: bf16 needs sm_80 (bf16 tensor cores and
// conversions in hardware); fp16 needs sm_75's mma.m16n8k8, and fp32 runs on CUDA cores before
// sm_80, so both start at sm_75, also the oldest target nvcc 13 builds.
__host__ __device__ constexpr int min_arch(int dtype) { return dtype == MEMENC_DTYPE_BFLOAT16 ? 80 : 75; }

// mma.m16n8k16 (bf16/fp16) and tf32 mma came with sm_80; sm_75 has mma.m16n8k8 for fp16 only.
__host__ __device__ constexpr bool has_mma_k16(int arch) { return arch >= 80; }
__host__ __device__ constexpr bool has_tf32_mma(int arch) { return arch >= 80; }

template <typename T>
constexpr int kDtypeCode = MEMENC_DTYPE_FLOAT32;
template <>
constexpr int kDtypeCode<__nv_bfloat16> = MEMENC_DTYPE_BFLOAT16;
template <>
constexpr int kDtypeCode<__half> = MEMENC_DTYPE_FLOAT16;

// Whether the code being compiled serves activations of type T. A kernel's instantiation for a dtype
// its arch does not serve compiles to a trap: the launchers refuse that dtype on that code first.
template <typename T>
constexpr bool kServedHere = MF_CODE_ARCH >= min_arch(kDtypeCode<T>);

// The body of a kernel instantiation this arch does not serve.
__device__ __forceinline__ void unserved_kernel() { __trap(); }

// The element types' names as c++filt prints them in a kernel's template arguments.
template <typename T>
const char* type_name() {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return "__nv_bfloat16";
  } else if constexpr (std::is_same<T, __half>::value) {
    return "__half";
  } else {
    static_assert(std::is_same<T, float>::value, "element types are float, __nv_bfloat16 and __half");
    return "float";
  }
}

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
#ifdef MEMENC_EMULATE
  emu::check_aligned(p, sizeof(Pair<T>));
#endif
  const Pair<T> pair = *reinterpret_cast<const Pair<T>*>(p);
  a = to_float(pair.x);
  b = to_float(pair.y);
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
#ifdef MEMENC_EMULATE
  emu::check_aligned(p, sizeof(Pair<T>));
#endif
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
//
// One function per instruction (emulated under MEMENC_EMULATE), then mma_16816, which is what the
// GEMMs call, built from them per architecture.

__device__ __forceinline__ uint32_t pack_pair_bits(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// mma.sync.aligned.m16n8k16: D += A * B for one 16x8 tile, bf16/fp16 operands, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
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

// mma.sync.aligned.m16n8k8 (sm_75): D += A * B for one 16x8 tile with k = 8, fp16 operands, fp32
// accumulators.
__device__ __forceinline__ void mma_m16n8k8_f16(float d[4], const uint32_t a[2], const uint32_t b[1]) {
#ifdef MEMENC_EMULATE
  emu::mma_m16n8k8_f16(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b[0]));
#endif
}

// mma.sync.aligned.m16n8k8 .tf32 (sm_80): D += A * B for one 16x8 tile with k = 8, tf32 operands
// (fp32 bit patterns), fp32 accumulators.
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
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

// fp32 -> tf32, rounded to nearest (ties away), as the fp32 bit pattern the mma reads (sm_80).
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

// D += A * B for one 16x8 tile with k = 16: bf16/fp16 operands in mma.m16n8k16's fragment layout,
// fp32 accumulators. Before sm_80 (fp16 only) it is two mma.m16n8k8 on the same registers: k 0-7 are
// A registers 0-1 and B register 0, k 8-15 are A registers 2-3 and B register 1.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (has_mma_k16(MF_CODE_ARCH)) {
    mma_m16n8k16<T>(d, a, b);
  } else {
    static_assert(std::is_same<T, __half>::value, "before sm_80 only fp16 runs on tensor cores");
    mma_m16n8k8_f16(d, a, b);
    mma_m16n8k8_f16(d, a + 2, b + 1);
  }
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

// What a block may use without opting in to more dynamic shared memory.
constexpr int kSmemWithoutOptIn = 48 * 1024;

// The name of one kernel instantiation as c++filt prints it (namespace and template arguments, which
// the kernel report and csrc/kernels.json key on) and its launch configuration in a few words.
struct KernelInfo {
  std::string name;
  std::string config;
};

// The KernelInfo of mf::<kernel><T, W, Ints...>.
template <typename T, typename W, int... Ints>
KernelInfo kernel_info(const char* kernel, std::string config) {
  std::string name = std::string("mf::") + kernel + "<" + type_name<T>() + ", " + type_name<W>();
  ((name += ", " + std::to_string(Ints)), ...);
  return KernelInfo{name + ">", std::move(config)};
}

// A launcher's choice: the launch as the binding reads it (launch_args.h's KernelLaunch) and the
// function that makes it with the launcher's parameters.
template <typename Params>
struct Plan {
  KernelLaunch launch;
  cudaError_t (*run)(const KernelLaunch& launch, const Params& params, cudaStream_t stream, int device);
};

// Relaxed stream-capture mode on the calling thread for the object's lifetime. Loading a kernel's
// module and setting its attributes are calls CUDA forbids during a global-mode capture (what
// torch.cuda.graph begins, on any thread): they would fail and invalidate a user's capture; relaxed,
// they are allowed and leave the capture intact.
class RelaxedCapture {
 public:
  RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// Makes `Kernel` ready to launch on `device`: loads it there (lazy module loading, CUDA's default,
// would load it at its first launch) and, where it takes more than 48 KiB of dynamic shared memory,
// gives it that opt-in. Once per device (index below 64; above, every time), in relaxed capture mode.
template <auto Kernel, int kDynamicSmem>
cudaError_t prepare_kernel(int device) {
  static std::atomic<uint64_t> prepared{0};  // this kernel's: one bit per device
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (prepared.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  RelaxedCapture relaxed;
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaFuncGetAttributes(&attributes, Kernel);
  if (err == cudaSuccess && kDynamicSmem > kSmemWithoutOptIn) {
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kDynamicSmem);
  }
  if (err == cudaSuccess) prepared.fetch_or(bit, std::memory_order_release);
  return err;
}

// A kernel instantiation some plan can launch: its dynamic shared memory and its prepare_kernel.
struct LaunchableKernel {
  int dynamic_smem;
  cudaError_t (*prepare)(int device);
};

// Every kernel instantiation a plan can launch, registered while the library loads (Launchable), so
// that memenc_fast_prepare_device prepares them all before any launch.
inline std::vector<LaunchableKernel>& launchable_kernels() {
  static std::vector<LaunchableKernel> kernels;
  return kernels;
}

// Registers `Kernel` in launchable_kernels(): plan_of names `registered`, which instantiates it for
// every kernel a plan can choose, and its initialization runs when the library loads.
template <auto Kernel, int kDynamicSmem>
struct Launchable {
  static const bool registered;
};
template <auto Kernel, int kDynamicSmem>
const bool Launchable<Kernel, kDynamicSmem>::registered =
    (launchable_kernels().push_back(LaunchableKernel{kDynamicSmem, &prepare_kernel<Kernel, kDynamicSmem>}), true);

// Launches `Kernel` as `launch` says, with `kDynamicSmem` bytes of dynamic shared memory, on `stream`,
// after preparing it on `device` (a no-op once done), and returns the launch's own error:
// cudaGetLastError would also return an earlier failure of any runtime call on this thread.
template <auto Kernel, typename Params, int kDynamicSmem>
cudaError_t run_kernel(const KernelLaunch& launch, const Params& params, cudaStream_t stream, int device) {
  const cudaError_t err = prepare_kernel<Kernel, kDynamicSmem>(device);
  if (err != cudaSuccess) return err;
  // Members in order, unnamed: the host emulation defines gridDim and blockDim as the kernels' built-ins.
  const cudaLaunchConfig_t config{dim3(static_cast<unsigned>(launch.grid_x), static_cast<unsigned>(launch.grid_y)),
                                  dim3(static_cast<unsigned>(launch.block)), kDynamicSmem, stream, nullptr, 0};
  return cudaLaunchKernelEx(&config, Kernel, params);
}

// The plan that launches `Kernel` (described by `info`, which must outlive it) over `grid` blocks with
// `kDynamicSmem` bytes of dynamic shared memory; `small_grid_reason` as its chooser says.
template <auto Kernel, typename Params, int kDynamicSmem>
Plan<Params> plan_of(const KernelInfo& info, int64_t grid_x, int grid_y, int block, const char* small_grid_reason) {
  static_cast<void>(Launchable<Kernel, kDynamicSmem>::registered);
  Plan<Params> plan{};
  plan.launch.kernel = info.name.c_str();
  plan.launch.config = info.config.c_str();
  plan.launch.grid_x = static_cast<int32_t>(grid_x);
  plan.launch.grid_y = grid_y;
  plan.launch.block = block;
  plan.launch.dynamic_smem = kDynamicSmem;
  plan.launch.small_grid_reason = small_grid_reason;
  plan.run = &run_kernel<Kernel, Params, kDynamicSmem>;
  return plan;
}

// The driver's cuCtxGetCurrent and cuCtxSetCurrent, through the runtime's driver entry points (the
// library does not link the driver); null where the driver does not give them. Looked up once.
// (library.cu)
struct DriverContextCalls {
  CUresult (*get_current)(CUcontext* context);
  CUresult (*set_current)(CUcontext context);
};
const DriverContextCalls& driver_context_calls();

// Makes `device` current for the launcher's lifetime, then leaves the thread as it found it: the
// library has its own (static) CUDA runtime, whose current device is not torch's. It restores the
// driver's current context itself (none, where there was none), not the device cudaGetDevice named:
// with no context current that is device 0 by default, and cudaSetDevice(0) would create GPU 0's
// primary context (hundreds of MB) in a process that uses another GPU only. Only where the driver
// does not give its context calls does it restore the device instead.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    const DriverContextCalls& driver = driver_context_calls();
    known_context_ = driver.get_current != nullptr && driver.set_current != nullptr &&
                     driver.get_current(&context_) == CUDA_SUCCESS;
    status_ = cudaGetDevice(&previous_);
    if (status_ != cudaSuccess) return;
    if (previous_ == device && (!known_context_ || context_ != nullptr)) return;  // current already
    status_ = cudaSetDevice(device);
    switched_ = status_ == cudaSuccess;
  }
  ~DeviceGuard() {
    if (!switched_) return;
    if (known_context_) {
      driver_context_calls().set_current(context_);
    } else {
      cudaSetDevice(previous_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t status() const { return status_; }

 private:
  CUcontext context_ = nullptr;  // the driver's current context on entry
  bool known_context_ = false;
  int previous_ = -1;
  bool switched_ = false;
  cudaError_t status_;
};

// The GPU `device` as plans see it (launch_args.h's GpuTarget): the arch of the code the library runs
// there (its kernels' PTX version: the GPU's own for native code, older for JIT-compiled PTX), its SM
// count and its shared memory per block. Read once per device, which must be current. Fails with
// cudaErrorNoKernelImageForDevice where the library has no code for the device. (library.cu)
cudaError_t device_target(int device, GpuTarget* target);

// Runs `plan_for(target)` for the current `device` and launches what it chose on `stream`.
template <typename Params, typename PlanFor>
cudaError_t plan_and_run(const Params& params, int device, cudaStream_t stream, PlanFor plan_for) {
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  GpuTarget target{};
  cudaError_t err = device_target(device, &target);
  if (err != cudaSuccess) return err;
  Plan<Params> plan{};
  err = plan_for(target, &plan);
  if (err != cudaSuccess) return err;
  return plan.run(plan.launch, params, stream, device);
}

// Bytes per element of a MEMENC_DTYPE_* dtype.
inline int dtype_bytes(int dtype) { return dtype == MEMENC_DTYPE_FLOAT32 ? 4 : 2; }

// Whether every pointer is a multiple of `bytes`, the widest access the kernels make through it (16
// for a 16-byte vector, two elements for a pair): a misaligned vector access is a sticky error that
// ends the CUDA context. Null pointers are (the plans read none).
template <typename... Pointers>
bool aligned_to(int bytes, Pointers... pointers) {
  return ((reinterpret_cast<uintptr_t>(pointers) % static_cast<uintptr_t>(bytes) == 0) && ...);
}

// What a launcher and its plan entry point share: whether its pointer arguments are all set, its
// kernels' parameters from its arguments (cudaErrorNotSupported for sizes without a kernel,
// cudaErrorInvalidValue for sizes it cannot take and pointers misaligned for its accesses), and its
// plan for a GPU.
template <typename Args, typename Params>
struct Op {
  bool (*pointers_set)(const Args& args);
  cudaError_t (*params_of)(const Args& args, Params* params);
  cudaError_t (*plan)(const Params& params, const GpuTarget& target, Plan<Params>* plan);
};

// An op's plan for `target`, where the arch of its code serves the activations' dtype; else
// cudaErrorNoKernelImageForDevice: that GPU has no kernel for that dtype (only a trap).
template <typename Args, typename Params>
cudaError_t plan_if_served(const Op<Args, Params>& op, const Args& args, const Params& params,
                           const GpuTarget& target, Plan<Params>* plan) {
  if (target.arch < min_arch(args.dtype)) return cudaErrorNoKernelImageForDevice;
  return op.plan(params, target, plan);
}

// memenc_fast_<op>: checks the arguments, then plans for the GPU it runs on and launches.
template <typename Args, typename Params>
int launch_op(const Op<Args, Params>& op, const Args* args, int device, void* stream) {
  if (args == nullptr || !op.pointers_set(*args)) return cudaErrorInvalidValue;
  Params params{};
  const cudaError_t err = op.params_of(*args, &params);
  if (err != cudaSuccess) return err;
  return plan_and_run(params, device, static_cast<cudaStream_t>(stream),
                      [&](const GpuTarget& target, Plan<Params>* plan) {
                        return plan_if_served(op, *args, params, target, plan);
                      });
}

// memenc_fast_<op>_plan: the launch memenc_fast_<op> makes for these sizes on a GPU like `target`.
template <typename Args, typename Params>
int plan_op(const Op<Args, Params>& op, const Args* args, const GpuTarget* target, KernelLaunch* launch) {
  if (args == nullptr || target == nullptr || launch == nullptr) return cudaErrorInvalidValue;
  Params params{};
  cudaError_t err = op.params_of(*args, &params);
  if (err != cudaSuccess) return err;
  Plan<Params> plan{};
  err = plan_if_served(op, *args, params, *target, &plan);
  if (err == cudaSuccess) *launch = plan.launch;
  return err;
}

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

// ---- choosing launch configurations -------------------------------------------------------------
//
// A plan picks one of a kernel's tile configurations for the GPU it runs on. At B=1 (SAM 2's video
// predictor calls the module once per object) a grid under one block per SM leaves SMs idle, so the
// usual rule is fill_a_wave; a kernel whose blocks each read a whole weight chooses by its floor
// instead (the conv of mask stage 4, see mask_downsample.cu).

// One tile configuration of a kernel for the launch at hand.
struct TileCandidate {
  int64_t blocks;  // its grid; 0 where the tile does not divide the sizes (never chosen)
  int smem;        // its dynamic shared memory per block
  int rows;        // the output rows (pixels, tokens) one block computes
};

// A chooser's answer: the candidate to launch, and why its grid has fewer blocks than SMs.
struct TileChoice {
  int index;                      // -1: no candidate fits the GPU's shared memory
  const char* small_grid_reason;  // null where the grid has a block per SM
};

constexpr const char* kSizesBelowAWave = "these sizes give fewer blocks than SMs even in the smallest tile";

// The blocks the busiest of `sm_count` SMs runs.
inline int64_t blocks_per_sm(int64_t blocks, int sm_count) { return (blocks + sm_count - 1) / sm_count; }

// The index of the candidate of most blocks that fits the GPU's shared memory, or -1.
template <size_t N>
int most_blocks(const TileCandidate (&candidates)[N], const GpuTarget& target) {
  int chosen = -1;
  for (int i = 0; i < static_cast<int>(N); ++i) {
    if (candidates[i].blocks == 0 || candidates[i].smem > target.shared_memory_per_block) continue;
    if (chosen < 0 || candidates[i].blocks > candidates[chosen].blocks) chosen = i;
  }
  return chosen;
}

// The candidate to launch, candidates ordered from the largest tile to the smallest: the largest
// that fits the GPU's shared memory and launches at least one block per SM; where none does, the
// one of most blocks that fits.
template <size_t N>
TileChoice fill_a_wave(const TileCandidate (&candidates)[N], const GpuTarget& target) {
  for (int i = 0; i < static_cast<int>(N); ++i) {
    if (candidates[i].blocks >= target.sm_count && candidates[i].smem <= target.shared_memory_per_block) {
      return TileChoice{i, nullptr};
    }
  }
  const int chosen = most_blocks(candidates, target);
  return TileChoice{chosen, chosen < 0 ? nullptr : kSizesBelowAWave};
}

}  // namespace mf
