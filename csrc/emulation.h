// Host emulation of the small part of CUDA the kernels in csrc/ use, so that the CPU tests can
// run the real kernel source (compiled by the host C++ compiler with -DMEMENC_EMULATE) and
// compare it with torch. Never part of the shipped library.
//
// Each CUDA thread of a block is a fiber on one OS thread; blocks run one after the other, so
// `__shared__` variables can be function statics. __syncthreads and the warp collectives
// (shuffles, mma.sync) are barriers over the block or the warp's 32 fibers. The warp-level
// matrix multiplies rebuild the full operands from every lane's fragment registers following the
// PTX ISA's fragment layouts, independently of how the kernels fill those registers: a kernel that
// loads a fragment wrongly computes a wrong product here too.
//
// The "device" is an emulated GPU (emu::gpu(): the arch its code reports, SM count, shared memory
// per block) that the device queries answer from and launches are checked against: more dynamic
// shared memory than 48 KiB without the kernel's opt-in attribute, or than the GPU has, is refused
// as the CUDA runtime refuses it. MEMENC_EMULATE_ARCH picks the generation whose code paths the
// kernels compile (common.cuh). A misaligned vector access (a 16-byte load, a pair of elements) makes
// the launch fail with cudaErrorMisalignedAddress, as the GPU does, instead of reading happily on x86.
//
// The runtime around it is emulated too (emu::runtime()): its and the driver's versions, the error
// its initialization gives (cudaErrorInsufficientDriver with a driver older than the runtime), the
// devices, which of them have a primary context and which context is current (cudaSetDevice creates
// and makes current one, as CUDA 12's runtime does; a launch or module load with none current creates
// the selected device's), the calling thread's last error (cudaGetLastError), and a stream capture in
// progress, during which module loads and kernel attributes fail unless the thread relaxed its
// capture mode. The emulation has one host thread.
#pragma once

#include <cuda.h>  // the driver's types (CUcontext), for the emulated driver entry points
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <vector>

// The CUDA headers give these host-compiler meanings of their own; here they are plain C++.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __grid_constant__

namespace emu {

// Fiber context switch (x86-64 System V): saves the callee-saved registers on the current stack,
// stores the stack pointer in *from and continues on `to`. glibc's swapcontext would make a
// system call per switch, and the kernels switch millions of times.
extern "C" void memenc_emu_switch(void** from, void* to);
asm(R"(
.text
.p2align 4
.weak memenc_emu_switch
.type memenc_emu_switch,@function
memenc_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size memenc_emu_switch,.-memenc_emu_switch
)");

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  void* sp = nullptr;
  dim3 tid;
  int linear = 0;
  bool done = false;
  std::unique_ptr<char[]> stack;
};

struct Barrier {
  int arrived = 0;
  long generation = 0;
};

struct Block {
  dim3 grid_dim, block_dim, block_idx;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::function<void()> body;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint32_t> exchange;  // per warp: 32 lanes x kExchangeWords
  long progress = 0;               // bumped whenever a fiber gets past a barrier or finishes
  std::vector<unsigned char> dynamic_smem;
  bool misaligned = false;  // a thread of this launch made a misaligned vector access
};

constexpr int kExchangeWords = 16;

inline Block& state() {
  static Block block;
  return block;
}

// Flags the launch in progress when `p` is not a multiple of `bytes`, the access's width.
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) state().misaligned = true;
}

inline void yield() {
  Block& b = state();
  memenc_emu_switch(&b.current->sp, b.scheduler_sp);
}

inline void wait_at(Barrier& barrier, int participants) {
  Block& b = state();
  const long generation = barrier.generation;
  if (++barrier.arrived == participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    ++b.progress;
    return;
  }
  while (barrier.generation == generation) yield();
}

inline void syncthreads() {
  Block& b = state();
  wait_at(b.block_barrier, static_cast<int>(b.fibers.size()));
}

inline int lane_id() { return state().current->linear % 32; }
inline int warp_id() { return state().current->linear / 32; }

inline void syncwarp() { wait_at(state().warp_barriers[warp_id()], 32); }

inline uint32_t* exchange_slot(int lane) {
  return &state().exchange[(static_cast<size_t>(warp_id()) * 32 + lane) * kExchangeWords];
}

template <typename V>
V shfl_xor(V value, int mask) {
  static_assert(sizeof(V) <= 4 * kExchangeWords, "value too large for the exchange slot");
  std::memcpy(exchange_slot(lane_id()), &value, sizeof(V));
  syncwarp();
  V result;
  std::memcpy(&result, exchange_slot(lane_id() ^ mask), sizeof(V));
  syncwarp();
  return result;
}

extern "C" inline void memenc_emu_fiber_entry() {
  Block& b = state();
  b.body();
  b.current->done = true;
  ++b.progress;
  memenc_emu_switch(&b.current->sp, b.scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

inline void run_block() {
  Block& b = state();
  const int threads = static_cast<int>(b.block_dim.x * b.block_dim.y * b.block_dim.z);
  if (threads % 32 != 0) {
    std::fprintf(stderr, "emulation: block of %d threads is not whole warps\n", threads);
    std::abort();
  }
  b.fibers.resize(threads);
  b.warp_barriers.assign(threads / 32, Barrier{});
  b.exchange.assign(static_cast<size_t>(threads) * kExchangeWords, 0u);
  b.block_barrier = Barrier{};
  for (int i = 0; i < threads; ++i) {
    Fiber& f = b.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.linear = i;
    f.tid = dim3(i % b.block_dim.x, (i / b.block_dim.x) % b.block_dim.y,
                 i / (b.block_dim.x * b.block_dim.y));
    f.done = false;
    // Initial frame for memenc_emu_switch: six callee-saved registers, then the entry point as
    // the return address, then a slot that leaves the stack 16-byte aligned as after a call.
    auto top = reinterpret_cast<uintptr_t>(f.stack.get() + kStackBytes) & ~uintptr_t(15);
    auto* frame = reinterpret_cast<void**>(top) - 8;
    std::memset(frame, 0, 8 * sizeof(void*));
    frame[6] = reinterpret_cast<void*>(&memenc_emu_fiber_entry);
    f.sp = frame;
  }
  for (;;) {
    bool all_done = true;
    const long before = b.progress;
    for (Fiber& f : b.fibers) {
      if (f.done) continue;
      all_done = false;
      b.current = &f;
      memenc_emu_switch(&b.scheduler_sp, f.sp);
    }
    if (all_done) break;
    if (b.progress == before) {
      std::fprintf(stderr, "emulation: deadlock (a barrier that not every thread reaches)\n");
      std::abort();
    }
  }
  b.current = nullptr;
}

// The emulated runtime and driver (see the top of this file).
struct Runtime {
  int runtime_version = 13000;  // CUDA 13.0, as 1000 * major + 10 * minor
  int driver_version = 13000;   // the newest CUDA version the driver supports; 0: no driver
  cudaError_t init_error = cudaSuccess;
  int device_count = 1;
  uint64_t contexts = 0;      // bit d: device d's primary context exists
  int current_context = -1;   // the device whose primary context is current on the thread; -1: none
  int selected_device = 0;    // the runtime's device for the thread, where no context is current
  bool capturing = false;     // a stream capture (global mode) is in progress
  int calls_during_capture = 0;  // module loads and kernel attribute calls made while capturing
  cudaStreamCaptureMode capture_mode = cudaStreamCaptureModeGlobal;  // the thread's
  cudaError_t last_error = cudaSuccess;
};

inline Runtime& runtime() {
  static Runtime current;
  return current;
}

// `error`, also recorded as the thread's last error where it is one (as every runtime call does).
inline cudaError_t fail(cudaError_t error) {
  if (error != cudaSuccess) runtime().last_error = error;
  return error;
}

// What a call that needs a context does where none is current: creates (or retains) the selected
// device's primary context and makes it current.
inline void need_context() {
  Runtime& r = runtime();
  if (r.current_context >= 0) return;
  r.contexts |= uint64_t{1} << r.selected_device;
  r.current_context = r.selected_device;
}

// A module load or a kernel attribute call: counted while a capture is in progress, and refused then
// unless the thread relaxed its capture mode.
inline cudaError_t capture_check() {
  Runtime& r = runtime();
  if (!r.capturing) return cudaSuccess;
  ++r.calls_during_capture;
  return r.capture_mode == cudaStreamCaptureModeRelaxed ? cudaSuccess : cudaErrorStreamCaptureUnsupported;
}

// The emulated GPU: `arch` is what its kernels' ptxVersion reports (0: the library has no code for
// it), then its SM count and its shared memory per block, opt-in included. An H100 by default.
struct Gpu {
  int arch = MEMENC_EMULATE_ARCH;
  int sm_count = 132;
  int shared_memory_per_block = 232448;
};

inline Gpu& gpu() {
  static Gpu current;
  return current;
}

// Bumped whenever a test changes the emulated GPU or runtime: what the library reads once per device
// on a GPU, it reads again then.
inline long& generation() {
  static long current = 1;
  return current;
}

// Each kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, as cudaFuncSetAttribute set it.
inline std::map<const void*, int>& dynamic_smem_limits() {
  static std::map<const void*, int> limits;
  return limits;
}

constexpr size_t kSmemWithoutOptIn = 48 * 1024;

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  if (runtime().init_error != cudaSuccess) return runtime().init_error;
  need_context();
  if (gpu().arch == 0) return cudaErrorNoKernelImageForDevice;
  const auto limit = dynamic_smem_limits().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = limit == dynamic_smem_limits().end() ? kSmemWithoutOptIn : limit->second;
  if (smem > allowed || smem > static_cast<size_t>(gpu().shared_memory_per_block)) return cudaErrorInvalidValue;
  if (block.x * block.y * block.z > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    return cudaErrorInvalidConfiguration;
  }
  Block& b = state();
  b.grid_dim = grid;
  b.block_dim = block;
  b.dynamic_smem.assign(smem + 16, 0xff);  // garbage-filled like real shared memory
  b.misaligned = false;
  b.body = [&]() { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        run_block();
      }
  return b.misaligned ? cudaErrorMisalignedAddress : cudaSuccess;
}

inline void* dynamic_smem() {
  auto p = reinterpret_cast<uintptr_t>(state().dynamic_smem.data());
  return reinterpret_cast<void*>((p + 15) & ~uintptr_t(15));
}

// ---- tensor-core instructions -----------------------------------------------------------------

inline float tf32_bits_to_float(uint32_t bits) {
  bits &= 0xffffe000u;  // the tensor core reads the 19 bits of a tf32 operand and ignores the rest
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t cvt_rna_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x1000u;  // round half away from zero
  return bits & 0xffffe000u;
}

template <typename T>
float half_bits_to_float(uint16_t bits) {
  T value;
  std::memcpy(&value, &bits, 2);
  return static_cast<float>(value);
}

// Every lane's A (4 registers) and B (2 registers) fragments in its exchange slot, so each lane
// can rebuild the whole warp's matrices (the mma emulations below).
inline void publish_mma_fragments(int lane, const uint32_t a[4], const uint32_t b[2]) {
  uint32_t* slot = exchange_slot(lane);
  for (int i = 0; i < 4; ++i) slot[i] = a[i];
  slot[4] = b[0];
  slot[5] = b[1];
  syncwarp();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: A 16x16, B 16x8, C/D 16x8, per PTX ISA
// "Matrix Fragments for mma.m16n8k16 with floating point type".
template <typename T>
void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  const int lane = lane_id();
  publish_mma_fragments(lane, a, b);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* s = exchange_slot(l);
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 8; ++i) {  // a0..a7: two 16-bit elements per register
      const uint16_t bits = static_cast<uint16_t>(s[i / 2] >> (16 * (i % 2)));
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half_bits_to_float<T>(bits);
    }
    for (int i = 0; i < 4; ++i) {  // b0..b3
      const uint16_t bits = static_cast<uint16_t>(s[4 + i / 2] >> (16 * (i % 2)));
      const int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][g] = half_bits_to_float<T>(bits);
    }
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {  // c0..c3
    const int row = i < 2 ? g : g + 8;
    const int col = t * 2 + (i & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    d[i] += sum;
  }
  syncwarp();
}

// mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 (sm_75), per "Matrix Fragments for mma.m16n8k8"
// (.f16): a0,a1 (g, 2t..2t+1), a2,a3 (g+8, 2t..2t+1); b0,b1 (k 2t..2t+1, n g).
inline void mma_m16n8k8_f16(float d[4], const uint32_t a[2], const uint32_t b[1]) {
  const int lane = lane_id();
  const uint32_t a_regs[4] = {a[0], a[1], 0u, 0u}, b_regs[2] = {b[0], 0u};
  publish_mma_fragments(lane, a_regs, b_regs);
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* s = exchange_slot(l);
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = half_bits_to_float<__half>(static_cast<uint16_t>(s[0] >> (16 * e)));
      A[g + 8][2 * t + e] = half_bits_to_float<__half>(static_cast<uint16_t>(s[1] >> (16 * e)));
      B[2 * t + e][g] = half_bits_to_float<__half>(static_cast<uint16_t>(s[4] >> (16 * e)));
    }
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8;
    const int col = t * 2 + (i & 1);
    float sum = 0.f;
    for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];
    d[i] += sum;
  }
  syncwarp();
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, per "Matrix Fragments for mma.m16n8k8"
// (.tf32): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (k t, n g), b1 (k t+4, n g).
inline void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  const int lane = lane_id();
  publish_mma_fragments(lane, a, b);
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* s = exchange_slot(l);
    const int g = l / 4, t = l % 4;
    A[g][t] = tf32_bits_to_float(s[0]);
    A[g + 8][t] = tf32_bits_to_float(s[1]);
    A[g][t + 4] = tf32_bits_to_float(s[2]);
    A[g + 8][t + 4] = tf32_bits_to_float(s[3]);
    B[t][g] = tf32_bits_to_float(s[4]);
    B[t + 4][g] = tf32_bits_to_float(s[5]);
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8;
    const int col = t * 2 + (i & 1);
    float sum = 0.f;
    for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];
    d[i] += sum;
  }
  syncwarp();
}

}  // namespace emu

// (Before the kernel built-ins below: gridDim and blockDim are also the launch configuration's members.)
template <typename... KArgs, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(KArgs...), Args&&... args) {
  return emu::fail(emu::launch(kernel, config->gridDim, config->blockDim, config->dynamicSmemBytes, args...));
}

#define threadIdx (::emu::state().current->tid)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) ::emu::shfl_xor((value), (lane_mask))

template <typename T>
inline T __ldg(const T* p) {
  emu::check_aligned(p, alignof(T));
  return *p;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// A kernel instantiation its arch does not serve: the launchers never launch one.
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "emulation: a kernel trapped (an instantiation this arch does not serve was launched)\n");
  std::abort();
}

// The runtime calls the library makes; the emulated "device" is the host, as emu::gpu() describes it,
// in the emulated runtime (emu::runtime()).
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = emu::runtime().last_error;
  emu::runtime().last_error = cudaSuccess;
  return error;
}
inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = emu::runtime().runtime_version;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = emu::runtime().driver_version;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 0;
  if (emu::runtime().init_error != cudaSuccess) return emu::fail(emu::runtime().init_error);
  *count = emu::runtime().device_count;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  const emu::Runtime& r = emu::runtime();
  if (r.init_error != cudaSuccess) return emu::fail(r.init_error);
  *device = r.current_context >= 0 ? r.current_context : r.selected_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  emu::Runtime& r = emu::runtime();
  if (r.init_error != cudaSuccess) return emu::fail(r.init_error);
  if (device < 0 || device >= r.device_count) return emu::fail(cudaErrorInvalidDevice);
  r.selected_device = device;
  r.contexts |= uint64_t{1} << device;
  r.current_context = device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  if (emu::runtime().init_error != cudaSuccess) return emu::fail(emu::runtime().init_error);
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = emu::gpu().sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = emu::gpu().shared_memory_per_block;
      return cudaSuccess;
    default:
      return emu::fail(cudaErrorInvalidValue);
  }
}
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*) {
  if (emu::runtime().init_error != cudaSuccess) return emu::fail(emu::runtime().init_error);
  emu::need_context();
  const cudaError_t capture = emu::capture_check();
  if (capture != cudaSuccess) return emu::fail(capture);
  if (emu::gpu().arch == 0) return emu::fail(cudaErrorNoKernelImageForDevice);
  *attributes = cudaFuncAttributes{};
  attributes->ptxVersion = emu::gpu().arch;
  attributes->binaryVersion = emu::gpu().arch;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  emu::need_context();
  const cudaError_t capture = emu::capture_check();
  if (capture != cudaSuccess) return emu::fail(capture);
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value > emu::gpu().shared_memory_per_block) {
    return emu::fail(cudaErrorInvalidValue);
  }
  emu::dynamic_smem_limits()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  std::swap(*mode, emu::runtime().capture_mode);
  return cudaSuccess;
}

namespace emu {

// The driver's current-context calls, on the emulated contexts: a context is the address one past
// its device's index (never dereferenced), null none.
inline CUresult ctx_get_current(CUcontext* context) {
  *context = reinterpret_cast<CUcontext>(static_cast<uintptr_t>(runtime().current_context + 1));
  return CUDA_SUCCESS;
}
inline CUresult ctx_set_current(CUcontext context) {
  runtime().current_context = static_cast<int>(reinterpret_cast<uintptr_t>(context)) - 1;
  return CUDA_SUCCESS;
}

}  // namespace emu

inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** function, unsigned int,
                                                    unsigned long long, cudaDriverEntryPointQueryResult* status) {
  *function = nullptr;
  if (std::strcmp(symbol, "cuCtxGetCurrent") == 0) *function = reinterpret_cast<void*>(&emu::ctx_get_current);
  if (std::strcmp(symbol, "cuCtxSetCurrent") == 0) *function = reinterpret_cast<void*>(&emu::ctx_set_current);
  *status = *function != nullptr ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}
// The runtime's texts for the errors the launchers return.
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorNoKernelImageForDevice:
      return "no kernel image is available for execution on the device";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInsufficientDriver:
      return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorMisalignedAddress:
      return "misaligned address";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    default:
      return "emulated CUDA error";
  }
}
