// The kernel configurations the library contains, as memenc_fast_kernel_configs() (library.cu)
// reports them to the Python binding, which reads them once when it loads the library and answers
// "is there a kernel for these sizes?" from them (memenc_fast/backends/cuda/library.py).
//
// One line per family of instantiations: `<kernel> <condition> <condition> ...`, each condition on
// a named size:
//   name=a,b,c   the size is one of a, b, c
//   name%m       the size is a positive multiple of m
//   name<=m      the size is at most m
// A kernel runs the sizes that meet every condition of one of its lines, for every (activation,
// parameter) dtype pair dispatch_types serves. Each kernel file builds its lines from the same
// constants its launcher dispatches on, so the two cannot disagree.
#pragma once

#include <string>

namespace mf {

std::string mask_downsample_kernel_configs();
std::string proj_add_kernel_configs();
std::string cxblock_kernel_configs();

}  // namespace mf
