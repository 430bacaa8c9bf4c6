#include "engine/checkpoint.h"
#include <cmath>
#include <cstring>
#include "engine/common.h"
#include "engine/safetensors.h"

namespace prism {

template <class T>
void save_checkpoint(const std::string& path, Model<T>& model, const Config& cfg) {
    std::vector<T> host(model.param_elems());
    model.params_to_host(host.data());
    std::vector<float> fp32(host.begin(), host.end());
    std::vector<TensorOut> tensors;
    for (const auto& p : model.layout())
        tensors.push_back({p.name, "F32", p.shape, fp32.data() + p.offset});
    write_safetensors(path, tensors, {{"config", config_to_json(cfg).dump()}, {"format", "pt"}});
}
template void save_checkpoint(const std::string&, Model<float>&, const Config&);
template void save_checkpoint(const std::string&, Model<double>&, const Config&);

Checkpoint load_checkpoint(const std::string& path) {
    const SafetensorsFile file = read_safetensors(path);
    auto it = file.metadata.find("config");
    if (it == file.metadata.end()) throw UserError(path + ": no config in __metadata__");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(it->second);
    } catch (const std::exception&) {
        throw UserError(path + ": __metadata__.config is not valid JSON");
    }
    Checkpoint ck;
    ck.config = config_from_json(j, path);
    const auto layout = param_layout(ck.config.model);
    ck.params.assign(size_t(param_block_elems(layout)), 0.0f);  // the padding zero
    for (const auto& p : layout) {
        const TensorIn& t = file.at(p.name);
        if (t.dtype != "F32") throw UserError(path + ": " + p.name + " is " + t.dtype + ", expected F32");
        if (t.shape != p.shape) throw UserError(path + ": " + p.name + " has the wrong shape for its config");
        std::memcpy(ck.params.data() + p.offset, t.data, t.bytes);
        // A non-finite weight (a damaged file, or an update that overflowed
        // before the next step's guard saw it) would make every logit NaN:
        // say so now rather than print an accuracy of chance.
        for (int64_t i = 0; i < p.numel; i++)
            if (!std::isfinite(ck.params[size_t(p.offset + i)]))
                throw UserError(path + ": " + p.name + " holds a non-finite value (element " + std::to_string(i) +
                                ")");
    }
    return ck;
}

template <class T>
void load_weights(Model<T>& model, const Checkpoint& ckpt) {
    PRISM_ASSERT(int64_t(ckpt.params.size()) == model.param_elems());
    const std::vector<T> host(ckpt.params.begin(), ckpt.params.end());
    model.params_from_host(host.data());
}
template void load_weights(Model<float>&, const Checkpoint&);
template void load_weights(Model<double>&, const Checkpoint&);

}  // namespace prism
