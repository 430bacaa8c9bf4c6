// Which backend runs: `--device cpu|cuda|auto`.
#pragma once
#include <string>
#include "engine/common.h"

namespace prism {

// Resolves the flag: "auto" picks CUDA when it is built, a device is present
// and its kernels exist, else the CPU. Throws UserError for an impossible choice.
Device resolve_device(const std::string& flag);
const char* device_label(Device d);

}  // namespace prism
