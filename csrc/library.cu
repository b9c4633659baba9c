// Entry points of the library itself: what the Python binding checks when it loads the library
// (the launch-args hash, the kernel configurations, the architectures it was built for, whether
// kernels run on the host), what each architecture serves, the CUDA runtime queries it reports
// errors with, and the GPU the launchers plan for (device_target).
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

// The number of CUDA devices this library's runtime sees (0 with an error code when none).
MF_EXPORT int memenc_fast_cuda_device_count(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}

#ifdef MEMENC_EMULATE
// The GPU the emulated launchers plan for (arch 0: the library has no code for it).
MF_EXPORT void memenc_fast_emulate_gpu(const GpuTarget* target) {
  emu::gpu() = emu::Gpu{target->arch, target->sm_count, target->shared_memory_per_block};
}
#endif

namespace mf {

// Compiled like every kernel, for every arch of the build: its PTX version is the arch of the code
// the library runs on a device.
__global__ void arch_probe_kernel() {}

namespace {

cudaError_t query_target(int device, GpuTarget* target) {
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
#ifdef MEMENC_EMULATE
  return query_target(device, target);  // not cached: tests change the emulated GPU
#else
  constexpr int kCachedDevices = 64;
  if (device < 0) return cudaErrorInvalidDevice;
  if (device >= kCachedDevices) return query_target(device, target);
  static std::once_flag once[kCachedDevices];
  static GpuTarget targets[kCachedDevices];
  static cudaError_t errors[kCachedDevices];
  std::call_once(once[device], [device] { errors[device] = query_target(device, &targets[device]); });
  *target = targets[device];
  return errors[device];
#endif
}

}  // namespace mf
