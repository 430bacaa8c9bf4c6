#include "engine/state.h"
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include "engine/checkpoint.h"
#include "engine/common.h"
#include "engine/safetensors.h"

namespace prism {

namespace {

constexpr const char* kFormat = "prism-train-state";
// Version 2: the flat tensors are the padded parameter block (model.h,
// kParamAlignElems); version 1's were packed.
constexpr const char* kVersion = "2";

int64_t read_count(const SafetensorsFile& f, const std::string& key) {
    auto it = f.metadata.find(key);
    if (it == f.metadata.end()) throw UserError(f.path + ": no " + key + " in __metadata__");
    const std::string& s = it->second;
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || errno != 0 || v < 0)
        throw UserError(f.path + ": __metadata__." + key + " is not a non-negative integer: " + printable(s));
    return int64_t(v);
}

// The first key, in config order, whose value differs and may not.
void check_resumable(const std::string& path, const Config& saved, const Config& now) {
    const nlohmann::json a = config_to_json(saved), b = config_to_json(now);
    const auto& free = resume_free_keys();
    for (auto sec = a.begin(); sec != a.end(); ++sec)
        for (auto kv = sec.value().begin(); kv != sec.value().end(); ++kv) {
            const std::string name = sec.key() + "." + kv.key();
            if (std::find(free.begin(), free.end(), name) != free.end()) continue;
            const nlohmann::json& other = b[sec.key()][kv.key()];
            if (kv.value() == other) continue;
            std::string allowed;
            for (const auto& k : free) allowed += (allowed.empty() ? "" : ", ") + k;
            throw UserError(path + ": cannot resume: it was written with " + name + "=" +
                            printable(kv.value().dump()) + ", this run has " + printable(other.dump()) +
                            " (a resumed run may change only " + allowed + ")");
        }
}

}  // namespace

const std::vector<std::string>& resume_free_keys() {
    static const std::vector<std::string> keys = {
        "data.train",       "data.val",       "train.steps",         "train.epochs",          "train.eval_every",
        "train.checkpoint_every", "train.log_every", "train.skip_nonfinite", "train.comm_timeout_s",
        "train.stop_after", "data.threads",       "train.overlap_comm", "train.zero",
    };
    return keys;
}

void save_train_state(const std::string& path, Model<float>& model, AdamW<float>& opt, const Config& cfg,
                      const ResumePoint& at, bool write) {
    const std::vector<int64_t> shape = {model.param_elems()};
    std::vector<float> params(model.param_elems()), m(model.param_elems()), v(model.param_elems());
    opt.moments_to_host(m.data(), v.data(), model);  // sharded: collective
    if (!write) return;
    model.params_to_host(params.data());
    const std::vector<TensorOut> tensors = {
        {"params", "F32", shape, params.data()},
        {"adamw.m", "F32", shape, m.data()},
        {"adamw.v", "F32", shape, v.data()},
    };
    write_safetensors(path, tensors,
                      {{"format", kFormat},
                       {"version", kVersion},
                       {"step", std::to_string(at.step)},
                       {"optimizer_steps", std::to_string(opt.steps_taken())},
                       {"skipped_steps", std::to_string(at.skipped_steps)},
                       {"epoch", std::to_string(at.epoch)},
                       {"batch_index", std::to_string(at.batch_index)},
                       {"config", config_to_json(cfg).dump()}});
}

ResumePoint load_train_state(const std::string& path, const Config& cfg, Model<float>& model, AdamW<float>& opt) {
    const SafetensorsFile f = read_safetensors(path);
    auto meta = [&](const std::string& key) {
        auto it = f.metadata.find(key);
        return it == f.metadata.end() ? std::string() : it->second;
    };
    if (meta("format") != kFormat) throw UserError(path + ": not a Prism training state (no format " + kFormat + ")");
    if (meta("version") != kVersion)
        throw UserError(path + ": training state version " + printable(meta("version")) + ", this build reads " +
                        kVersion);
    nlohmann::json j = nlohmann::json::parse(meta("config"), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) throw UserError(path + ": __metadata__.config is not valid JSON");
    check_resumable(path, config_from_json(j, path), cfg);

    ResumePoint at;
    at.step = read_count(f, "step");
    at.skipped_steps = read_count(f, "skipped_steps");
    at.epoch = read_count(f, "epoch");
    at.batch_index = read_count(f, "batch_index");
    const int64_t optimizer_steps = read_count(f, "optimizer_steps");
    if (optimizer_steps > at.step)
        throw UserError(path + ": optimizer_steps " + std::to_string(optimizer_steps) + " exceeds step " +
                        std::to_string(at.step));

    const int64_t n = model.param_elems();
    const char* names[] = {"params", "adamw.m", "adamw.v"};
    for (int i = 0; i < 3; i++) {
        const TensorIn& t = f.at(names[i]);
        if (t.dtype != "F32" || t.shape != std::vector<int64_t>{n})
            throw UserError(path + ": " + names[i] + " is not F32 [" + std::to_string(n) +
                            "], as the model of its config needs");
    }
    // The file's bytes may be unaligned for float: copy them out first, the
    // padding between tensors zeroed whatever the file holds there (model.h).
    std::vector<float> host[3];
    for (int i = 0; i < 3; i++) {
        host[i].assign(size_t(n), 0.0f);
        for (const auto& p : model.layout())
            std::memcpy(host[i].data() + p.offset, f.at(names[i]).data + size_t(p.offset) * sizeof(float),
                        size_t(p.numel) * sizeof(float));
    }
    model.params_from_host(host[0].data());
    opt.moments_from_host(host[1].data(), host[2].data(), model);
    opt.set_steps_taken(optimizer_steps);
    return at;
}

void save_training_checkpoint(const std::string& dir, Model<float>& model, AdamW<float>& opt, const Config& cfg,
                              const ResumePoint& at, bool write) {
    if (write) save_checkpoint(join_path(dir, "model.safetensors"), model, cfg);
    save_train_state(join_path(dir, kTrainStateFile), model, opt, cfg, at, write);
}

}  // namespace prism
