// Which backend runs: `--device cpu|cuda|auto`.
#pragma once
#include <string>
#include "engine/common.h"

namespace prism {

// Resolves the flag: "auto" picks CUDA when it is built, a device is present
// and its kernels exist, else the CPU. Throws UserError for an impossible choice.
Device resolve_device(const std::string& flag);
const char* device_label(Device d);

// cudaProfilerStart / cudaProfilerStop: what `nsys profile
// --capture-range=cudaProfilerApi` waits for (`prism train --profile-steps`).
// No-ops in a build without CUDA.
void profiler_start();
void profiler_stop();

}  // namespace prism
