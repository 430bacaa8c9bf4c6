// safetensors files (https://huggingface.co/docs/safetensors): an 8-byte
// little-endian header length, a JSON header, then raw little-endian tensors.
// Used for checkpoints (DESIGN.md §2) and the oracle test's exchange files.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace prism {

struct TensorOut {
    std::string name;
    std::string dtype;            // "F32", "F64", "I32", "I64"
    std::vector<int64_t> shape;
    const void* data;             // numel * element size bytes
};

// Writes atomically: PATH.tmp, fsync, rename, fsync of the directory; a
// reader sees the previous file or the new one, never a partial one.
// Throws UserError on I/O failure.
void write_safetensors(const std::string& path, const std::vector<TensorOut>& tensors,
                       const std::map<std::string, std::string>& metadata);

struct TensorIn {
    std::string dtype;
    std::vector<int64_t> shape;
    const char* data = nullptr;
    size_t bytes = 0;
    int64_t numel() const;
};

struct SafetensorsFile {
    std::string path;
    std::map<std::string, std::string> metadata;
    std::map<std::string, TensorIn> tensors;
    std::vector<char> payload;
    // Throws UserError("<path>: no tensor <name>") when absent.
    const TensorIn& at(const std::string& name) const;
};

// Reads and checks the whole file (header JSON, offsets inside the payload,
// sizes matching shapes). Throws UserError("<path>: <problem>").
SafetensorsFile read_safetensors(const std::string& path);

}  // namespace prism
