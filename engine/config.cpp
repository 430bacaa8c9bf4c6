// Config files: JSON in, typed structs out, with one-line errors that name
// the file (or the --set) and the key. The key names are a user contract
// (DESIGN.md §4), so one table below lists every key exactly once; parsing,
// --set and config_to_json all walk that table and cannot drift apart.
#include "engine/config.h"
#include "engine/common.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <set>
#include <limits>

namespace prism {

using nlohmann::json;

int ModelConfig::hidden() const { return (int)std::lround(dim * mlp_ratio); }

// ----------------------------------------------------------------------------
// the key table

enum class Kind { i32, i64, u64, f64, boolean, str };

struct FieldRef {
    Kind kind;
    void* ptr;
};
// Overloads pick the kind from the member's C++ type, so a table entry can
// never claim the wrong type for its field.
static FieldRef ref(int* p) { return {Kind::i32, p}; }
static FieldRef ref(int64_t* p) { return {Kind::i64, p}; }
static FieldRef ref(uint64_t* p) { return {Kind::u64, p}; }
static FieldRef ref(double* p) { return {Kind::f64, p}; }
static FieldRef ref(bool* p) { return {Kind::boolean, p}; }
static FieldRef ref(std::string* p) { return {Kind::str, p}; }

struct Field {
    const char* section;
    const char* key;
    FieldRef (*get)(Config& c);
};

#define FIELD(sec, name) {#sec, #name, [](Config& c) { return ref(&c.sec.name); }}
static const Field kFields[] = {
    FIELD(model, arch),
    FIELD(model, image),
    FIELD(model, channels),
    FIELD(model, patch),
    FIELD(model, dim),
    FIELD(model, depth),
    FIELD(model, heads),
    FIELD(model, mlp_ratio),
    FIELD(model, num_classes),
    FIELD(model, top_k),
    FIELD(model, combine),
    FIELD(model, aux),
    FIELD(model, aux_coef),
    FIELD(model, z_loss_coef),
    FIELD(model, drop_path),
    FIELD(model, channel_embed_std),
    FIELD(data, train),
    FIELD(data, val),
    FIELD(data, augment),
    FIELD(data, threads),
    FIELD(data, device_input),
    FIELD(train, batch),
    FIELD(train, steps),
    FIELD(train, epochs),
    FIELD(train, lr),
    FIELD(train, min_lr),
    FIELD(train, weight_decay),
    FIELD(train, beta1),
    FIELD(train, beta2),
    FIELD(train, eps),
    FIELD(train, warmup_steps),
    FIELD(train, warmup_epochs),
    FIELD(train, grad_clip),
    FIELD(train, seed),
    FIELD(train, hcs),
    FIELD(train, precision),
    FIELD(train, eval_every),
    FIELD(train, checkpoint_every),
    FIELD(train, log_every),
    FIELD(train, stop_after),
    FIELD(train, skip_nonfinite),
    FIELD(train, comm_timeout_s),
    FIELD(train, overlap_comm),
    FIELD(train, zero),
};
#undef FIELD

static const char* kSections[] = {"model", "data", "train"};

static bool is_section(const std::string& s) {
    for (const char* name : kSections)
        if (s == name) return true;
    return false;
}

static const Field* find_field(const std::string& section, const std::string& key) {
    for (const Field& f : kFields)
        if (section == f.section && key == f.key) return &f;
    return nullptr;
}

// ----------------------------------------------------------------------------
// typed reads

// Integers must be integral JSON numbers; 1e3 is accepted because JSON
// writers (and people) produce it for step counts, 2.5 is not.
static bool integral_value(const json& v, long double* out) {
    if (v.is_number_unsigned()) { *out = (long double)v.get<uint64_t>(); return true; }
    if (v.is_number_integer()) { *out = (long double)v.get<int64_t>(); return true; }
    if (v.is_number_float()) {
        double d = v.get<double>();
        if (!std::isfinite(d) || std::floor(d) != d) return false;
        *out = d;
        return true;
    }
    return false;
}

// A value quoted in an error message: a scalar as JSON, cut short; an array
// or object by its kind alone, since dumping one would echo a whole file, or
// recurse through a deeply nested one until the stack runs out.
static std::string excerpt(const json& v) {
    if (v.is_array()) return "an array";
    if (v.is_object()) return "an object";
    // replace: a --set value that is no JSON is kept as raw text, which
    // need not be UTF-8; dump() would throw on it.
    return printable(v.dump(-1, ' ', false, json::error_handler_t::replace), 60);
}

static void read_field(const Field& f, Config& c, const json& v, const std::string& origin) {
    std::string name = std::string(f.section) + "." + f.key;
    auto fail = [&](const char* what) {
        throw UserError(origin + ": " + name + " must be " + what + ", got " + excerpt(v));
    };
    auto out_of_range = [&]() {
        throw UserError(origin + ": " + name + " " + excerpt(v) + " is out of range");
    };
    FieldRef r = f.get(c);
    long double x = 0;
    switch (r.kind) {
    case Kind::i32:
        if (!integral_value(v, &x)) fail("an integer");
        if (x < INT_MIN || x > INT_MAX) out_of_range();
        *(int*)r.ptr = (int)x;
        break;
    case Kind::i64:
        if (!integral_value(v, &x)) fail("an integer");
        if (v.is_number_unsigned()) {
            if (v.get<uint64_t>() > (uint64_t)INT64_MAX) out_of_range();
            *(int64_t*)r.ptr = (int64_t)v.get<uint64_t>();
        } else if (v.is_number_integer()) {
            *(int64_t*)r.ptr = v.get<int64_t>();
        } else {
            // 2^63 is exactly representable, so >= catches the first bad value
            if (x < -9223372036854775808.0L || x >= 9223372036854775808.0L) out_of_range();
            *(int64_t*)r.ptr = (int64_t)x;
        }
        break;
    case Kind::u64:
        if (!integral_value(v, &x)) fail("a non-negative integer");
        if (x < 0) fail("a non-negative integer");
        if (v.is_number_unsigned()) {
            *(uint64_t*)r.ptr = v.get<uint64_t>();
        } else if (v.is_number_integer()) {
            *(uint64_t*)r.ptr = (uint64_t)v.get<int64_t>();
        } else {
            if (x >= 18446744073709551616.0L) out_of_range();
            *(uint64_t*)r.ptr = (uint64_t)x;
        }
        break;
    case Kind::f64:
        if (!v.is_number() || !std::isfinite(v.get<double>())) fail("a finite number");
        *(double*)r.ptr = v.get<double>();
        break;
    case Kind::boolean:
        if (!v.is_boolean()) fail("true or false");
        *(bool*)r.ptr = v.get<bool>();
        break;
    case Kind::str:
        if (!v.is_string()) fail("a string");
        *(std::string*)r.ptr = v.get<std::string>();
        break;
    }
}

static json write_field(const Field& f, const Config& c) {
    // get() wants a mutable Config only to share one accessor with read_field;
    // nothing is written here.
    FieldRef r = f.get(const_cast<Config&>(c));
    switch (r.kind) {
    case Kind::i32: return *(const int*)r.ptr;
    case Kind::i64: return *(const int64_t*)r.ptr;
    case Kind::u64: return *(const uint64_t*)r.ptr;
    case Kind::f64: return *(const double*)r.ptr;
    case Kind::boolean: return *(const bool*)r.ptr;
    case Kind::str: return *(const std::string*)r.ptr;
    }
    PRISM_ASSERT(false);
}

// Structure and types only, no value checks: load_config uses this to blame
// the file and each --set separately before validate() sees the result.
static Config parse_json(const json& j, const std::string& origin) {
    if (!j.is_object())
        throw UserError(origin + ": a config must be a JSON object, got " + j.type_name());
    Config c;
    for (auto sec = j.begin(); sec != j.end(); ++sec) {
        if (!is_section(sec.key()))
            throw UserError(origin + ": unknown section " + sec.key() +
                            " (expected model, data or train)");
        if (!sec.value().is_object())
            throw UserError(origin + ": section " + sec.key() + " must be a JSON object, got " +
                            excerpt(sec.value()));
        for (auto kv = sec.value().begin(); kv != sec.value().end(); ++kv) {
            const Field* f = find_field(sec.key(), kv.key());
            if (!f) throw UserError(origin + ": unknown key " + sec.key() + "." + kv.key());
            read_field(*f, c, kv.value(), origin);
        }
    }
    return c;
}

// ----------------------------------------------------------------------------
// public interface

Config config_from_json(const json& j, const std::string& origin) {
    Config c = parse_json(j, origin);
    validate(c, origin);
    return c;
}

json config_to_json(const Config& c) {
    json j = json::object();
    for (const char* s : kSections) j[s] = json::object();
    for (const Field& f : kFields) j[f.section][f.key] = write_field(f, c);
    return j;
}

void apply_set(json& j, const std::string& assignment) {
    std::string where = "--set " + printable(assignment, 100);
    size_t eq = assignment.find('=');
    if (eq == std::string::npos)
        throw UserError(where + ": expected section.key=value, e.g. model.top_k=2");
    std::string name = assignment.substr(0, eq);
    std::string text = assignment.substr(eq + 1);
    // tolerate "model.top_k = 2" from shell scripts
    size_t b = name.find_first_not_of(" \t"), e = name.find_last_not_of(" \t");
    name = b == std::string::npos ? "" : name.substr(b, e - b + 1);
    size_t dot = name.find('.');
    std::string section = dot == std::string::npos ? name : name.substr(0, dot);
    std::string key = dot == std::string::npos ? "" : name.substr(dot + 1);
    if (!find_field(section, key)) throw UserError(where + ": unknown key " + name);
    if (!j.is_object()) j = json::object();
    if (j.contains(section) && !j[section].is_object())
        throw UserError(where + ": section " + section + " is not a JSON object");
    // Numbers and booleans arrive as JSON; anything that does not parse
    // (a glob, a bare word like moevit) is meant as a string.
    json v = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (v.is_discarded()) v = text;
    j[section][key] = v;
}

static std::string read_file(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw UserError(path + ": cannot open: " + std::strerror(errno));
    std::string text;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
    bool bad = std::ferror(f);
    int err = errno;
    std::fclose(f);
    if (bad) throw UserError(path + ": cannot read: " + std::strerror(err));
    return text;
}

Config load_config(const std::string& path, const std::vector<std::string>& sets) {
    std::string text = read_file(path);
    json j;
    // JSON lets an object repeat a key and keeps the last: {"lr": -1, "lr": 1e-3}
    // is one edit left half done. The parser's callback sees every key.
    std::vector<std::set<std::string>> keys;  // one set per open object
    std::string repeated;
    auto note_keys = [&](int, json::parse_event_t event, json& parsed) {
        if (event == json::parse_event_t::object_start) keys.emplace_back();
        if (event == json::parse_event_t::object_end) keys.pop_back();
        if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second &&
            repeated.empty())
            repeated = parsed.get<std::string>();
        return true;
    };
    try {
        j = json::parse(text, note_keys);
    } catch (const json::parse_error& e) {
        // drop nlohmann's "[json.exception.parse_error.101] " prefix
        std::string msg = e.what();
        size_t p = msg.find("] ");
        if (msg.rfind("[json.exception", 0) == 0 && p != std::string::npos) msg = msg.substr(p + 2);
        throw UserError(path + ": invalid JSON: " + msg);
    }
    if (!repeated.empty())
        throw UserError(path + ": key \"" + printable(repeated, 60) + "\" appears twice in one object");
    parse_json(j, path);
    for (const std::string& s : sets) {
        apply_set(j, s);
        parse_json(j, "--set " + printable(s, 100));  // the file already passed, so any type error is this value's
    }
    return config_from_json(j, config_origin(path, sets));
}

std::string config_origin(const std::string& path, const std::vector<std::string>& sets) {
    std::string origin = path;
    for (const std::string& s : sets) origin += (origin == path ? " with --set " : ", --set ") + printable(s, 100);
    return origin;
}

// ----------------------------------------------------------------------------
// value checks

static void check(bool ok, const std::string& origin, const std::string& what) {
    if (!ok) throw UserError(origin + ": " + what);
}

static std::string num(double x) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", x);
    return buf;
}

static void check_one_of(const std::string& v, const char* name,
                         std::initializer_list<const char*> allowed, const std::string& origin) {
    std::string list;
    for (const char* a : allowed) {
        if (v == a) return;
        list += list.empty() ? a : std::string("|") + a;
    }
    throw UserError(origin + ": " + name + " must be one of " + list + ", got \"" + printable(v, 60) + "\"");
}

void validate(const Config& c, const std::string& origin) {
    const ModelConfig& m = c.model;
    check_one_of(m.arch, "model.arch", {"vit", "chvit", "moevit"}, origin);
    struct { const char* name; int v; } positive[] = {
        {"model.image", m.image},   {"model.channels", m.channels}, {"model.patch", m.patch},
        {"model.dim", m.dim},       {"model.depth", m.depth},       {"model.heads", m.heads},
        {"model.num_classes", m.num_classes},
    };
    for (auto& p : positive)
        check(p.v >= 1, origin, std::string(p.name) + " must be >= 1, got " + std::to_string(p.v));
    // The parameter layout is built per block before anything is allocated:
    // an absurd depth would exhaust host memory there, not in an arena.
    check(m.depth <= 1024, origin, "model.depth must be <= 1024, got " + std::to_string(m.depth));
    check(m.image % m.patch == 0, origin,
          "model.image " + std::to_string(m.image) + " is not divisible by model.patch " +
              std::to_string(m.patch));
    check(m.dim % m.heads == 0, origin,
          "model.dim " + std::to_string(m.dim) + " is not divisible by model.heads " +
              std::to_string(m.heads));
    // Token counts are kept in int throughout the engine.
    int64_t side = m.image / m.patch;
    check(side * side * m.channels + 1 <= INT_MAX, origin,
          "model.image/model.patch and model.channels give too many tokens");
    check(m.mlp_ratio > 0, origin, "model.mlp_ratio must be > 0, got " + num(m.mlp_ratio));
    check(m.dim * m.mlp_ratio < (double)INT_MAX, origin, "model.dim * model.mlp_ratio is too large");
    check(m.hidden() >= 1, origin, "model.dim * model.mlp_ratio rounds to an empty MLP");
    if (m.arch == "moevit")
        check(m.top_k >= 1 && m.top_k <= m.channels, origin,
              "model.top_k " + std::to_string(m.top_k) + " is outside [1, model.channels = " +
                  std::to_string(m.channels) + "]");
    check_one_of(m.combine, "model.combine", {"softmax", "renorm"}, origin);
    check_one_of(m.aux, "model.aux", {"switch", "importance", "none"}, origin);
    check(m.aux_coef >= 0, origin, "model.aux_coef must be >= 0, got " + num(m.aux_coef));
    check(m.z_loss_coef >= 0, origin, "model.z_loss_coef must be >= 0, got " + num(m.z_loss_coef));
    check(m.drop_path >= 0 && m.drop_path < 1, origin,
          "model.drop_path must be in [0, 1), got " + num(m.drop_path));
    check(m.channel_embed_std >= 0, origin,
          "model.channel_embed_std must be >= 0, got " + num(m.channel_embed_std));

    check_one_of(c.data.augment, "data.augment", {"none", "so2sat", "jumpcp"}, origin);
    check(c.data.threads >= 0 && c.data.threads <= 256, origin,
          "data.threads must be in [0, 256] (0 = default), got " + std::to_string(c.data.threads));

    const TrainConfig& t = c.train;
    check(t.batch >= 1, origin, "train.batch must be >= 1, got " + std::to_string(t.batch));
    check(t.steps >= 0, origin, "train.steps must be >= 0, got " + std::to_string(t.steps));
    // Epochs become a step count (int64) once the data set's size is known.
    check(t.epochs >= 0 && t.epochs <= 1e6, origin, "train.epochs must be in [0, 1e6], got " + num(t.epochs));
    check(t.lr > 0, origin, "train.lr must be > 0, got " + num(t.lr));
    check(t.min_lr >= 0 && t.min_lr <= t.lr, origin,
          "train.min_lr must be in [0, train.lr], got " + num(t.min_lr));
    check(t.weight_decay >= 0, origin, "train.weight_decay must be >= 0, got " + num(t.weight_decay));
    check(t.beta1 >= 0 && t.beta1 < 1, origin, "train.beta1 must be in [0, 1), got " + num(t.beta1));
    check(t.beta2 >= 0 && t.beta2 < 1, origin, "train.beta2 must be in [0, 1), got " + num(t.beta2));
    check(t.eps > 0, origin, "train.eps must be > 0, got " + num(t.eps));
    check(t.warmup_steps >= 0, origin,
          "train.warmup_steps must be >= 0, got " + std::to_string(t.warmup_steps));
    check(t.warmup_epochs >= 0 && t.warmup_epochs <= 1e6, origin,
          "train.warmup_epochs must be in [0, 1e6], got " + num(t.warmup_epochs));
    check(t.grad_clip >= 0, origin, "train.grad_clip must be >= 0, got " + num(t.grad_clip));
    check_one_of(t.precision, "train.precision", {"auto", "fp32", "bf16"}, origin);
    check(t.eval_every >= 0, origin,
          "train.eval_every must be >= 0, got " + std::to_string(t.eval_every));
    check(t.checkpoint_every >= 0, origin,
          "train.checkpoint_every must be >= 0, got " + std::to_string(t.checkpoint_every));
    // the trainer takes step % log_every, so 0 is not "off" but a division by zero
    check(t.log_every >= 1, origin, "train.log_every must be >= 1, got " + std::to_string(t.log_every));
    check(t.stop_after >= 0, origin, "train.stop_after must be >= 0, got " + std::to_string(t.stop_after));
    check(t.comm_timeout_s > 0, origin, "train.comm_timeout_s must be > 0, got " + num(t.comm_timeout_s));
    check(t.zero == 0 || t.zero == 1, origin,
          "train.zero must be 0 (off) or 1 (ZeRO-1: shard AdamW's moments over the ranks), got " +
              std::to_string(t.zero));
}

}  // namespace prism
