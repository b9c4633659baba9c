// Entry points of the library itself: what the Python binding checks when it loads the library
// (the launch-args hash, the kernel configurations, the architectures it was built for, whether
// kernels run on the host), what each architecture serves, the CUDA runtime queries it reports
// errors with, whether its runtime can serve this machine and each device (memenc_fast_cuda_runtime,
// memenc_fast_prepare_device, which also prepares every kernel there), the GPU the launchers plan for
// (device_target) and the driver's context calls the device guard restores the thread with.
#include <mutex>
#include <string>

#include "common.cuh"
#include "kernel_configs.h"

// The build passes the hash of launch_args.h (build_tools/cuda_build.py); a compile without it,
// such as the kernel report's per-file cubins, reports 0, which the binding refuses.
#ifndef MEMENC_LAUNCH_ARGS_HASH
#define MEMENC_LAUNCH_ARGS_HASH 0ULL
#endif

// The digest of the csrc/ sources the build compiled (build_tools/cuda_build.py's sources_digest),
// which tells whether the library's ptxas report describes the sources at hand; 0 without it.
#ifndef MEMENC_SOURCES_DIGEST
#define MEMENC_SOURCES_DIGEST 0ULL
#endif

// The code the build embeds, as nvcc's -gencode code= values separated by slashes
// (sm_80/sm_90a/compute_90), tokens the build passes and this file stringifies; under the host
// emulation, the one arch it emulates.
#define MF_TEXT(...) #__VA_ARGS__
#define MF_EXPANDED_TEXT(...) MF_TEXT(__VA_ARGS__)
#if defined(MEMENC_CUDA_ARCHS)
#define MF_CUDA_ARCHS_TEXT MF_EXPANDED_TEXT(MEMENC_CUDA_ARCHS)
#elif defined(MEMENC_EMULATE)
#define MF_CUDA_ARCHS_TEXT "sm_" MF_EXPANDED_TEXT(MEMENC_EMULATE_ARCH)
#else
#define MF_CUDA_ARCHS_TEXT ""
#endif

MF_EXPORT uint64_t memenc_fast_launch_args_hash() { return MEMENC_LAUNCH_ARGS_HASH; }

MF_EXPORT uint64_t memenc_fast_sources_digest() { return MEMENC_SOURCES_DIGEST; }

// Every kernel configuration, in the format of kernel_configs.h.
MF_EXPORT const char* memenc_fast_kernel_configs() {
  static const std::string configs =
      mf::mask_downsample_kernel_configs() + mf::proj_add_kernel_configs() + mf::cxblock_kernel_configs();
  return configs.c_str();
}

// The code the library holds, SASS ("sm_86", "sm_90a") and PTX ("compute_120"), separated by slashes.
MF_EXPORT const char* memenc_fast_cuda_archs() { return MF_CUDA_ARCHS_TEXT; }

// The oldest arch (major * 10 + minor) whose code serves activations of `dtype` (MEMENC_DTYPE_*).
MF_EXPORT int memenc_fast_min_arch(int dtype) { return mf::min_arch(dtype); }

// How code for `arch` runs the matrix math (the GEMMs and convs) of activations of `dtype`, or null
// where it does not serve that dtype. The other kernels (mask stem, dwconv) run on CUDA cores.
MF_EXPORT const char* memenc_fast_matrix_math(int arch, int dtype) {
  if (arch < mf::min_arch(dtype)) return nullptr;
  switch (dtype) {
    case MEMENC_DTYPE_BFLOAT16:
      return "tensor cores, mma.m16n8k16 bf16";
    case MEMENC_DTYPE_FLOAT16:
      return mf::has_mma_k16(arch) ? "tensor cores, mma.m16n8k16 f16" : "tensor cores, two mma.m16n8k8 f16 per k16";
    case MEMENC_DTYPE_FLOAT32:
      return mf::has_tf32_mma(arch) ? "tensor cores, mma.m16n8k8 tf32 (3xTF32; 1xTF32 where torch allows TF32)"
                                    : "CUDA cores, fp32 FMA";
    default:
      return nullptr;
  }
}

// 1 when built against emulation.h: the kernels then run on the host and take host pointers.
MF_EXPORT int memenc_fast_runs_on_host() {
#ifdef MEMENC_EMULATE
  return 1;
#else
  return 0;
#endif
}

// The CUDA runtime's text for an error code a launcher returned.
MF_EXPORT const char* memenc_fast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

namespace {

struct RuntimeProbe {
  int runtime_version = 0;
  int driver_version = 0;
  int device_count = 0;
  cudaError_t error = cudaSuccess;
};

// None of these calls creates a context on any device.
RuntimeProbe probe_runtime() {
  RuntimeProbe probe;
  cudaRuntimeGetVersion(&probe.runtime_version);
  cudaDriverGetVersion(&probe.driver_version);
  probe.error = cudaGetDeviceCount(&probe.device_count);
  if (probe.error != cudaSuccess) probe.device_count = 0;
  return probe;
}

}  // namespace

// Whether this library's CUDA runtime can serve this machine, asked once per process: its version and
// the newest CUDA version the driver supports (1000 * major + 10 * minor; the driver's is 0 without a
// driver), the devices it sees, and the error of its initialization, which is what every call of
// the library would meet (cudaErrorInsufficientDriver with a driver older than the runtime). Creates
// no context.
MF_EXPORT int memenc_fast_cuda_runtime(int* runtime_version, int* driver_version, int* device_count) {
#ifdef MEMENC_EMULATE
  const RuntimeProbe probe = probe_runtime();  // not cached: tests change the emulated runtime
#else
  static const RuntimeProbe probe = probe_runtime();
#endif
  *runtime_version = probe.runtime_version;
  *driver_version = probe.driver_version;
  *device_count = probe.device_count;
  return probe.error;
}

// Makes the library ready to launch on `device`, outside the rules of any stream capture in progress
// (relaxed capture mode): reads the GPU its plans are for (device_target), then loads every kernel a
// plan can launch there and gives those that need it their shared-memory opt-in, each once per device.
// Returns the first error, which says this library cannot serve the device (no code for it, PTX its
// driver cannot compile, a device in another process's exclusive use). Uses `device`'s primary
// context, created if it has none: call it for a device the caller's tensors are on.
MF_EXPORT int memenc_fast_prepare_device(int device) {
  mf::DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return guard.status();
  GpuTarget target{};
  const cudaError_t err = mf::device_target(device, &target);
  if (err != cudaSuccess) return err;
  for (const mf::LaunchableKernel& kernel : mf::launchable_kernels()) {
    if (kernel.dynamic_smem > target.shared_memory_per_block) continue;  // no plan launches it there
    const cudaError_t prepared = kernel.prepare(device);
    if (prepared != cudaSuccess) return prepared;
  }
  return cudaSuccess;
}

#ifdef MEMENC_EMULATE
// The GPU the emulated launchers plan for (arch 0: the library has no code for it).
MF_EXPORT void memenc_fast_emulate_gpu(const GpuTarget* target) {
  emu::gpu() = emu::Gpu{target->arch, target->sm_count, target->shared_memory_per_block};
  ++emu::generation();
}

// A fresh emulated runtime: its and the driver's CUDA versions, the error its initialization gives
// (0: none), `device_count` devices, no context but `current_device`'s (-1: none), which is current
// (as torch leaves the device it last used), no capture in progress, no last error.
MF_EXPORT void memenc_fast_emulate_runtime(int runtime_version, int driver_version, int init_error, int device_count,
                                           int current_device) {
  emu::Runtime& r = emu::runtime();
  r = emu::Runtime{};
  ++emu::generation();
  r.runtime_version = runtime_version;
  r.driver_version = driver_version;
  r.init_error = static_cast<cudaError_t>(init_error);
  r.device_count = device_count;
  if (current_device >= 0) {
    r.contexts = uint64_t{1} << current_device;
    r.current_context = r.selected_device = current_device;
  }
}

// Begins (1) or ends (0) an emulated global-mode stream capture; returns how many module loads and
// kernel attribute calls were made during captures since the runtime was made.
MF_EXPORT int memenc_fast_emulate_capture(int capturing) {
  emu::runtime().capturing = capturing != 0;
  return emu::runtime().calls_during_capture;
}

// The emulated contexts: bit d set where device d has a primary context; `*current` the device whose
// context is current on the thread, -1 for none.
MF_EXPORT uint64_t memenc_fast_emulated_contexts(int* current) {
  *current = emu::runtime().current_context;
  return emu::runtime().contexts;
}
#endif

namespace mf {

// Compiled like every kernel, for every arch of the build: its PTX version is the arch of the code
// the library runs on a device.
__global__ void arch_probe_kernel() {}

namespace {

cudaError_t query_target(int device, GpuTarget* target) {
  RelaxedCapture relaxed;  // loads the probe kernel's module
  cudaFuncAttributes probe{};
  cudaError_t err = cudaFuncGetAttributes(&probe, arch_probe_kernel);
  if (err != cudaSuccess) return err;
  target->arch = probe.ptxVersion;
  err = cudaDeviceGetAttribute(&target->sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&target->shared_memory_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

}  // namespace

cudaError_t device_target(int device, GpuTarget* target) {
  constexpr int kCachedDevices = 64;
  if (device < 0) return cudaErrorInvalidDevice;
  if (device >= kCachedDevices) return query_target(device, target);
  static GpuTarget targets[kCachedDevices];
  static cudaError_t errors[kCachedDevices];
#ifdef MEMENC_EMULATE
  // Once per device as on a GPU, and again after a test changes the emulated GPU or runtime.
  static long read_in[kCachedDevices];  // the emulation's generation each was read in; 0: never
  if (read_in[device] != emu::generation()) {
    errors[device] = query_target(device, &targets[device]);
    read_in[device] = emu::generation();
  }
#else
  static std::once_flag once[kCachedDevices];
  std::call_once(once[device], [device] { errors[device] = query_target(device, &targets[device]); });
#endif
  *target = targets[device];
  return errors[device];
}

const DriverContextCalls& driver_context_calls() {
  static const DriverContextCalls calls = [] {
    DriverContextCalls found{};
    void* get_current = nullptr;
    void* set_current = nullptr;
    cudaDriverEntryPointQueryResult get_status = cudaDriverEntryPointSymbolNotFound;
    cudaDriverEntryPointQueryResult set_status = cudaDriverEntryPointSymbolNotFound;
    // Both calls date from CUDA 4.0 and kept their signatures; 12000 asks for them as CUDA 12 has them.
#if defined(MEMENC_EMULATE) || CUDART_VERSION >= 12050
    cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &get_current, 12000, cudaEnableDefault, &get_status);
    cudaGetDriverEntryPointByVersion("cuCtxSetCurrent", &set_current, 12000, cudaEnableDefault, &set_status);
#else
    cudaGetDriverEntryPoint("cuCtxGetCurrent", &get_current, cudaEnableDefault, &get_status);
    cudaGetDriverEntryPoint("cuCtxSetCurrent", &set_current, cudaEnableDefault, &set_status);
#endif
    if (get_status == cudaDriverEntryPointSuccess && set_status == cudaDriverEntryPointSuccess) {
      found.get_current = reinterpret_cast<CUresult (*)(CUcontext*)>(get_current);
      found.set_current = reinterpret_cast<CUresult (*)(CUcontext)>(set_current);
    }
    return found;
  }();
  return calls;
}

}  // namespace mf
