#include "engine/safetensors.h"
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include "engine/common.h"

namespace prism {

namespace {
size_t element_size(const std::string& dtype) {
    if (dtype == "F32" || dtype == "I32") return 4;
    if (dtype == "F64" || dtype == "I64") return 8;
    if (dtype == "F16" || dtype == "BF16") return 2;
    return 0;
}
int64_t numel_of(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
}
}  // namespace

int64_t TensorIn::numel() const { return numel_of(shape); }

void write_safetensors(const std::string& path, const std::vector<TensorOut>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    nlohmann::ordered_json header;
    if (!metadata.empty()) header["__metadata__"] = metadata;
    size_t offset = 0;
    for (const auto& t : tensors) {
        const size_t bytes = numel_of(t.shape) * element_size(t.dtype);
        header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
        offset += bytes;
    }
    std::string text = header.dump();
    while ((text.size() + 8) % 8) text += ' ';  // payload 8-byte aligned, as the format recommends
    const uint64_t len = text.size();
    std::vector<Bytes> parts = {{&len, 8}, {text.data(), text.size()}};
    for (const auto& t : tensors) parts.push_back({t.data, numel_of(t.shape) * element_size(t.dtype)});
    write_file_atomic(path, parts);
}

const TensorIn& SafetensorsFile::at(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw UserError(path + ": no tensor " + name);
    return it->second;
}

SafetensorsFile read_safetensors(const std::string& path) {
    SafetensorsFile out;
    out.path = path;
    uint64_t file_size = 0;
    const int fd = open_regular_file(path, "", &file_size);
    FILE* f = ::fdopen(fd, "rb");
    if (!f) {
        const int err = errno;
        ::close(fd);
        throw UserError(path + ": cannot open: " + std::strerror(err));
    }
    std::fseek(f, 0, SEEK_END);
    const long size = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    uint64_t len = 0;
    if (size < 8 || std::fread(&len, 8, 1, f) != 1 || len > uint64_t(size) - 8) {
        std::fclose(f);
        throw UserError(path + ": not a safetensors file (bad header length)");
    }
    std::string text(len, '\0');
    out.payload.resize(size - 8 - len);
    const bool ok = std::fread(text.data(), 1, len, f) == len &&
                    std::fread(out.payload.data(), 1, out.payload.size(), f) == out.payload.size();
    std::fclose(f);
    if (!ok) throw UserError(path + ": read failed");
    nlohmann::json header;
    try {
        header = nlohmann::json::parse(text);
    } catch (const std::exception& e) {
        throw UserError(path + ": header is not valid JSON");
    }
    if (!header.is_object()) throw UserError(path + ": header is not a JSON object");
    for (auto it = header.begin(); it != header.end(); ++it) {
        if (it.key() == "__metadata__") {
            if (!it.value().is_object()) throw UserError(path + ": __metadata__ is not a JSON object");
            for (auto m = it.value().begin(); m != it.value().end(); ++m)
                if (m.value().is_string()) out.metadata[m.key()] = m.value().get<std::string>();
            continue;
        }
        const auto& v = it.value();
        TensorIn t;
        try {
            t.dtype = v.at("dtype").get<std::string>();
            t.shape = v.at("shape").get<std::vector<int64_t>>();
            const auto offs = v.at("data_offsets").get<std::vector<uint64_t>>();
            if (offs.size() != 2 || offs[0] > offs[1] || offs[1] > out.payload.size())
                throw UserError(path + ": tensor " + it.key() + " lies outside the file");
            t.bytes = offs[1] - offs[0];
            t.data = out.payload.data() + offs[0];
        } catch (const nlohmann::json::exception&) {
            throw UserError(path + ": tensor " + it.key() + " has a malformed entry");
        }
        if (element_size(t.dtype) == 0)
            throw UserError(path + ": tensor " + it.key() + " has unsupported dtype " + t.dtype);
        if (t.bytes != size_t(t.numel()) * element_size(t.dtype))
            throw UserError(path + ": tensor " + it.key() + " size does not match its shape");
        out.tensors[it.key()] = t;
    }
    return out;
}

}  // namespace prism
