// Entry points of the library itself: its ABI version, CUDA error strings and the device count,
// so that the Python binding can report why the backend cannot run without importing anything
// that needs a GPU.
#include "common.cuh"

// Bumped whenever an exported signature changes; the Python binding refuses a library whose
// version it does not know.
MF_EXPORT int memenc_fast_cuda_abi_version() { return 1; }

// The CUDA runtime's text for an error code a launcher returned.
MF_EXPORT const char* memenc_fast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

// The number of CUDA devices this library's runtime sees (0 with an error code when none).
MF_EXPORT int memenc_fast_cuda_device_count(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}
