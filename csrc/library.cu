// Entry points of the library itself: what the Python binding checks when it loads the library
// (the launch-args hash, the kernel configurations, whether kernels run on the host) and the CUDA
// runtime queries it reports errors with.
#include <string>

#include "common.cuh"
#include "kernel_configs.h"

// The build passes the hash of launch_args.h (build_tools/cuda_build.py); a compile without it,
// such as the kernel report's per-file cubins, reports 0, which the binding refuses.
#ifndef MEMENC_LAUNCH_ARGS_HASH
#define MEMENC_LAUNCH_ARGS_HASH 0ULL
#endif

MF_EXPORT uint64_t memenc_fast_launch_args_hash() { return MEMENC_LAUNCH_ARGS_HASH; }

// Every kernel configuration, in the format of kernel_configs.h.
MF_EXPORT const char* memenc_fast_kernel_configs() {
  static const std::string configs =
      mf::mask_downsample_kernel_configs() + mf::proj_add_kernel_configs() + mf::cxblock_kernel_configs();
  return configs.c_str();
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
