// The arguments of every launcher the CUDA library exports: one plain-C struct per launcher, and the
// records its launch plans are made of.
//
// This header is the only declaration of the launchers' signatures. The .cu files include it, and
// the Python binding (memenc_fast/backends/cuda/library.py) parses it into ctypes.Structure classes
// when it loads the library. The build compiles the header's hash into the library
// (MEMENC_LAUNCH_ARGS_HASH), and the binding refuses a library built from another version of this
// file. Changing a launcher's arguments therefore means changing its struct here and its kernel,
// nothing else.
//
// The format is deliberately small (memenc_fast/backends/cuda/library.py parses it):
// - `#define MEMENC_<NAME> <integer>`: a constant that the binding reads as well.
// - `struct <Name>Args {` ... `};`: the arguments of launcher `memenc_fast_<name>`, where <name> is
//   <Name> in snake_case (Conv3x3s2LnGelu -> conv3x3s2_ln_gelu). The launcher is
//   `int memenc_fast_<name>(const <Name>Args* args, int device, void* stream)` and returns a CUDA
//   error code (it refuses null pointers and sizes it has no kernel for). Each launcher has a plan:
//   `int memenc_fast_<name>_plan(const <Name>Args* args, const GpuTarget* target, KernelLaunch* launch)`
//   fills `launch` with the kernel launch the launcher makes for those sizes and dtypes on a GPU
//   like `target` (pointers are not read), or returns the error code the launcher would return.
//   The launcher runs the same plan for the GPU it runs on, so the two cannot disagree.
// - `struct <Name> {` ... `};` (a name not ending in Args): a record the plans read or fill.
// - One member per line, `<type> <name>;`, <type> one of: int32_t, int64_t, float, const void*,
//   void*, const char* (a NUL-terminated string the library owns and never frees). Pointers are
//   device addresses; sizes and strides count elements.
// - `//` comments, blank lines, `#pragma once` and `#include <stdint.h>`; nothing else.
#pragma once

#include <stdint.h>

// Element types (the `dtype` and `weight_dtype` members). `weight_dtype` is the dtype of every
// parameter a launcher reads: the activations' dtype, or float32 (fp32 parameters with bf16/fp16
// activations, as under autocast).
#define MEMENC_DTYPE_FLOAT32 0
#define MEMENC_DTYPE_BFLOAT16 1
#define MEMENC_DTYPE_FLOAT16 2

// A GPU as launch plans see it (memenc_fast.gpus.GpuSpec).
struct GpuTarget {
  int32_t arch;                     // of the code that runs: major * 10 + minor (86 for sm_86)
  int32_t sm_count;                 // streaming multiprocessors
  int32_t shared_memory_per_block;  // bytes a block may use, opt-in included
};

// One kernel launch, as a plan chooses it.
struct KernelLaunch {
  const char* kernel;  // the instantiation's name as c++filt prints it: mf::proj_add_kernel<__half, float, 64, 64>
  const char* config;  // its tile configuration, in a few words
  int32_t grid_x;
  int32_t grid_y;
  int32_t block;         // threads per block
  int32_t dynamic_smem;  // bytes of dynamic shared memory per block
  const char* small_grid_reason;  // why the grid has fewer blocks than the GPU has SMs; null where it has not
};

// Mask stages 1 and 2, fused: sigmoid (when apply_sigmoid), `* scale + bias`, then twice
// conv3x3 stride 2 padding 1 -> + bias -> LayerNorm over channels -> exact GELU.
// masks (batch, 1, height, width) by element strides -> out (batch, H2, W2, channels2) channels-last.
struct MaskStemArgs {
  int32_t dtype;
  int32_t weight_dtype;
  const void* masks;
  int64_t masks_stride_b;  // 0 broadcasts one mask over the batch
  int64_t masks_stride_h;
  int64_t masks_stride_w;
  int32_t batch;
  int32_t height;
  int32_t width;
  int32_t apply_sigmoid;
  float scale;
  float bias;
  int32_t channels1;
  int32_t channels2;
  const void* conv1_weight;  // (channels1, 1, 3, 3)
  const void* conv1_bias;    // (channels1,)
  const void* norm1_weight;  // (channels1,)
  const void* norm1_bias;    // (channels1,)
  float eps1;
  const void* conv2_weight;  // (channels2, channels1, 3, 3)
  const void* conv2_bias;    // (channels2,)
  const void* norm2_weight;  // (channels2,)
  const void* norm2_bias;    // (channels2,)
  float eps2;
  void* out;
};

// One mask stage on tensor cores: x (batch, height, width, in_channels) channels-last -> conv3x3
// stride 2 padding 1 -> + bias -> LayerNorm over out_channels -> exact GELU -> out (batch, Ho, Wo,
// out_channels) channels-last.
struct Conv3x3s2LnGeluArgs {
  int32_t dtype;
  int32_t weight_dtype;
  const void* x;
  int32_t batch;
  int32_t height;
  int32_t width;
  int32_t in_channels;
  int32_t out_channels;
  const void* weight;       // (out_channels, in_channels, 3, 3), as nn.Conv2d holds it
  const void* bias;         // (out_channels,)
  const void* norm_weight;  // (out_channels,)
  const void* norm_bias;    // (out_channels,)
  float eps;
  int32_t precise;  // float32: three TF32 products per product (about fp32 accuracy) instead of one
  void* out;
};

// Projection + add as one GEMM over the concatenated channels:
// out (batch * pixels, out_channels) = mask_weight . m + mask_bias + pix_weight . p + pix_bias.
// Each source is (batch, channels, pixels) by element strides, either channels-last (channel
// stride 1) or channels-first (pixel stride 1), 16-byte aligned; a batch stride may be 0.
struct ProjAddArgs {
  int32_t dtype;
  int32_t weight_dtype;
  const void* mask_features;
  int64_t mask_stride_b;
  int64_t mask_stride_c;
  int64_t mask_stride_p;
  int32_t mask_channels;
  const void* pix_feat;
  int64_t pix_stride_b;
  int64_t pix_stride_c;
  int64_t pix_stride_p;
  int32_t pix_channels;
  int32_t batch;
  int32_t pixels;
  int32_t out_channels;
  const void* mask_weight;  // (out_channels, mask_channels, 1, 1), contiguous, 16-byte aligned
  const void* mask_bias;    // (out_channels,)
  const void* pix_weight;   // (out_channels, pix_channels, 1, 1), contiguous, 16-byte aligned
  const void* pix_bias;     // (out_channels,)
  int32_t precise;
  void* out;
};

// A CXBlock's depthwise conv ("same" padding) + bias, then LayerNorm over channels with its affine,
// on tokens x (batch, height, width, channels); also writes the residual that the MLP's second GEMM
// accumulates into.
struct DwconvLnArgs {
  int32_t dtype;
  int32_t weight_dtype;
  const void* x;
  int32_t batch;
  int32_t height;
  int32_t width;
  int32_t channels;
  int32_t kernel_size;
  const void* dw_weight;    // (channels, 1, kernel_size, kernel_size)
  const void* dw_bias;      // (channels,)
  const void* norm_weight;  // (channels,)
  const void* norm_bias;    // (channels,)
  float eps;
  const void* b2;     // (channels,): the second Linear's bias
  const void* gamma;  // (channels,): the layer scale, or null for none
  void* normed;       // (batch, height, width, channels): LayerNorm(dwconv(x)) * norm_weight + norm_bias
  void* residual;     // (batch, height, width, channels): x + gamma * b2
};
