// prism: the one command-line entry point (DESIGN.md §4).
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#include <sys/stat.h>
#include <unistd.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>
#include "bench/bench.h"
#include "bench/step.h"
#include "data/convert.h"
#include "data/loader.h"
#include "data/shard.h"
#include "data/synth.h"
#include "engine/checkpoint.h"
#include "engine/comm.h"
#include "engine/nccl.h"
#include "engine/config.h"
#include "engine/device.h"
#include "engine/eval_report.h"
#include "engine/flops.h"
#include "engine/report.h"
#include "engine/state.h"
#include "engine/train.h"

using namespace prism;

namespace {

const char* kUsage =
    "usage: prism <command> [options]\n"
    "  train   --config FILE [--device cpu|cuda|auto] [--out DIR] [--set key=value]... [--profile-steps A:B]\n"
    "  train   --resume DIR [--set train.steps=M]...   (continues DIR's run; mpirun -np N for N ranks)\n"
    "  eval    --checkpoint DIR/model.safetensors --data GLOB [--device ...] [--save-logits F.npy]\n"
    "          [--report] [--channels 0,3,5 | --all-subsets]\n"
    "  report  RUN [RUN...] [--out DIR]\n"
    "  convert so2sat --in FILE.h5 --out DIR [--dtype float32|float16] [--shard-size N] [--prefix NAME] [--stats-from GLOB]\n"
    "  convert npy    --list FILE.csv --out DIR [--shard-size N] [--prefix NAME] [--num-classes K]\n"
    "                 [--stats-from GLOB]\n"
    "  synth   --preset tiny|so2sat|jumpcp --out DIR [--count N] [--seed S]\n"
    "  shards  verify GLOB\n"
    "  flops   --config FILE [--set key=value]... [--json]\n"
    "  bench   loader --data GLOB [--batch N] [--threads T] [--seconds S] [--augment none|so2sat|jumpcp]\n"
    "                 [--device-input]\n"
    "  bench   attention --config FILE [--set key=value]... [--batch N] [--iters N] [--warmup N] [--k 1,2,4,C]\n"
    "                    [--impl bf16|reference]\n"
    "  bench   step --config FILE [--set key=value]... [--device D] [--batch N] [--warmup N] [--iters N]\n"
    "               [--pixels float|uint8|uint16|float16|float32]\n"
    "Run 'prism <command> --help' for a command's options.\n";

// "train" of "prism train": main() prefixes errors with "prism: ".
std::string command_of(const cxxopts::Options& opts) {
    const std::string& p = opts.program();
    return p.rfind("prism ", 0) == 0 ? p.substr(6) : p;
}

// cxxopts's "Argument 'x' failed to parse" says neither whose argument it
// was nor what would do: find the option in argv, and its kind and default in
// the help. Where several options were given that text, it cannot tell which
// of them refused it, and names them all.
std::string name_the_bad_value(const cxxopts::Options& opts, const std::string& what, int argc, char** argv) {
    const std::string head = "Argument " + cxxopts::LQUOTE, tail = cxxopts::RQUOTE + " failed to parse";
    if (what.size() < head.size() + tail.size() || what.compare(0, head.size(), head) != 0 ||
        what.compare(what.size() - tail.size(), tail.size(), tail) != 0)
        return what;
    const std::string value = what.substr(head.size(), what.size() - head.size() - tail.size());
    std::vector<std::string> given_it;
    for (int i = 1; i < argc; i++) {
        const std::string arg = argv[i];
        if (arg.rfind("--", 0) != 0) continue;
        const size_t eq = arg.find('=');
        const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
        const std::string given = eq != std::string::npos ? arg.substr(eq + 1) : i + 1 < argc ? argv[i + 1] : "";
        if (given == value && std::find(given_it.begin(), given_it.end(), name) == given_it.end())
            given_it.push_back(name);
    }
    if (given_it.empty()) return what;
    if (given_it.size() > 1) {
        std::string names;
        for (const std::string& n : given_it) names += (names.empty() ? "--" : " or --") + n;
        return "'" + printable(value) + "': not a valid value for " + names;
    }
    std::string hint = "a number in range";
    for (const auto& o : opts.group_help("").options)
        if (std::find(o.l.begin(), o.l.end(), given_it[0]) != o.l.end()) {
            if (o.is_boolean) hint = "true or false";
            else if (o.has_default) hint += ", like its default " + o.default_value;
        }
    return "--" + given_it[0] + " '" + printable(value) + "': not a valid value (" + hint + ")";
}

cxxopts::ParseResult parse(cxxopts::Options& opts, int argc, char** argv) {
    opts.add_options()("h,help", "show this help");
    cxxopts::ParseResult r;
    try {
        r = opts.parse(argc, argv);
    } catch (const cxxopts::exceptions::incorrect_argument_type& e) {
        throw UserError(command_of(opts) + ": " + name_the_bad_value(opts, e.what(), argc, argv));
    }
    if (r.count("help")) {
        std::printf("%s\n", opts.help().c_str());
        std::exit(0);
    }
    // cxxopts keeps the last of a repeated option: `--in a.h5 --in b.h5`
    // would silently convert b.h5 alone. Only lists may repeat.
    for (const auto& kv : r.arguments())
        if (kv.key() != "set" && kv.key() != "runs" && r.count(kv.key()) > 1)
            throw UserError(command_of(opts) + ": --" + kv.key() + " is given more than once");
    // A word no option takes (`--set a=1 b=2`: b=2 is no --set) would
    // otherwise be dropped without a word.
    if (!r.unmatched().empty()) {
        const std::string& word = r.unmatched().front();
        throw UserError(command_of(opts) + ": unexpected argument '" + printable(word) + "'" +
                        (word.find('=') != std::string::npos ? " (each --set takes one key=value)" : ""));
    }
    return r;
}

std::string required(const cxxopts::ParseResult& r, const char* name, const char* cmd) {
    if (!r.count(name)) throw UserError(std::string(cmd) + ": --" + name + " is required");
    return r[name].as<std::string>();
}

bool file_exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

// A file an option will write at the end of long work (an evaluation), checked
// first so that a typo costs nothing: not a directory, in a directory that exists.
void check_output_file(const std::string& path, const char* option) {
    if (path.empty()) throw UserError(std::string(option) + ": empty file name");
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) throw UserError(path + ": is a directory");
    const std::string dir = dir_of(path);
    if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw UserError(path + ": " + option + " needs an existing directory " + dir);
    if (::access(dir.c_str(), W_OK) != 0)
        throw UserError(path + ": cannot write in " + dir + ": " + std::strerror(errno));
}

// --shard-size: unset is 0, the converters' default (4096 images, fewer for large images).
int64_t shard_size_of(const cxxopts::ParseResult& r) {
    if (!r.count("shard-size")) return 0;
    const int64_t n = r["shard-size"].as<int64_t>();
    if (n < 1) throw UserError("--shard-size " + std::to_string(n) + ": must be at least 1");
    return n;
}

std::vector<std::string> sets_of(const cxxopts::ParseResult& r) {
    return r.count("set") ? r["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
}

// float32 [rows, cols] as a NumPy .npy (format 1.0), written atomically.
void write_npy(const std::string& path, const std::vector<float>& data, int64_t rows, int64_t cols) {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) +
                         ", " + std::to_string(cols) + "), }";
    while ((10 + header.size() + 1) % 64) header += ' ';
    header += '\n';
    const uint16_t len = uint16_t(header.size());
    write_file_atomic(path, {{"\x93NUMPY\x01\x00", 8}, {&len, 2}, {header.data(), header.size()},
                             {data.data(), data.size() * sizeof(float)}});
}

int cmd_train(int argc, char** argv) {
    cxxopts::Options opts("prism train", "Train a model from a JSON config.");
    opts.add_options()
        ("config", "config file (JSON)", cxxopts::value<std::string>())
        ("device", "cpu, cuda or auto", cxxopts::value<std::string>()->default_value("auto"))
        ("out", "run directory (model.safetensors, metrics.jsonl, config.json)", cxxopts::value<std::string>())
        ("set", "override a config key: section.key=value", cxxopts::value<std::vector<std::string>>())
        ("resume", "continue the run in DIR (its config.json and train_state.safetensors)",
         cxxopts::value<std::string>())
        ("profile-steps", "CUDA: run steps A..B (1-based) between cudaProfilerStart/Stop, for nsys",
         cxxopts::value<std::string>());
    auto r = parse(opts, argc, argv);
    TrainOptions topts;
    std::string out = r.count("out") ? r["out"].as<std::string>() : "";
    std::string config_file;
    if (r.count("resume")) {
        // The run's own resolved config; --set may change what resume allows (engine/state.h).
        topts.resume_dir = r["resume"].as<std::string>();
        config_file = r.count("config") ? r["config"].as<std::string>() : join_path(topts.resume_dir, "config.json");
        if (out.empty()) out = topts.resume_dir;
    } else {
        config_file = required(r, "config", "train");
    }
    // A new run would truncate the old one's metrics and then overwrite its
    // checkpoint: refuse, so that a repeated command loses nothing.
    for (const char* file : {kTrainStateFile, "model.safetensors"})
        if (!out.empty() && !(r.count("resume") && same_file(out, topts.resume_dir)) &&
            file_exists(join_path(out, file)))
            throw UserError("--out " + out + ": holds a run already (" + file + "); continue it with --resume " + out +
                            ", or remove it or choose another --out");
    const Config cfg = load_config(config_file, sets_of(r));
    topts.config_origin = config_origin(config_file, sets_of(r));
    const Device dev = resolve_device(r["device"].as<std::string>());
    if (r.count("profile-steps")) {
        const std::string range = r["profile-steps"].as<std::string>();
        long long a = 0, b = 0;
        char rest = 0;
        if (std::sscanf(range.c_str(), "%lld:%lld%c", &a, &b, &rest) != 2 || a < 1 || b < a)
            throw UserError("--profile-steps " + printable(range) + ": expected A:B with 1 <= A <= B, like 10:20");
        if (dev == Device::cuda) {
            topts.profile_first = a;
            topts.profile_last = b;
        } else {
            std::fprintf(stderr, "prism train: --profile-steps only applies to CUDA runs; ignored on the CPU\n");
        }
    }
    // mpirun starts one process per rank; without it this is a world of one.
    Comm comm = comm_init();
    comm.timeout_s = cfg.train.comm_timeout_s;
    topts.comm = &comm;
    TrainResult res;
    try {
        // GPU ranks: one GPU each and an NCCL communicator, even in a world
        // of one under mpirun (so the NCCL path can be checked on one GPU).
        if (dev == Device::cuda && comm.mpi) comm_init_nccl(comm);
        res = train(cfg, dev, out, true, topts);
    } catch (const std::exception& e) {
        if (comm.size > 1) comm_abort(comm, e.what());  // ends every rank, not just this one
        throw;
    }
    if (comm.rank == 0) {
        // No validation set, or a stop before the final evaluation: null, not a perfect 0 loss.
        const bool evaluated = res.val.count > 0;
        progress(nlohmann::json{{"arch", cfg.model.arch},
                                {"val_accuracy", evaluated ? nlohmann::json(res.val.accuracy) : nullptr},
                                {"val_loss", evaluated ? nlohmann::json(res.val.loss) : nullptr},
                                {"val_count", res.val.count}, {"steps", res.steps}, {"seconds", res.seconds},
                                {"ranks", comm.size}}.dump());
    }
    comm_finalize(comm);
    return res.stop_signal ? 128 + res.stop_signal : 0;
}

int cmd_eval(int argc, char** argv) {
    cxxopts::Options opts("prism eval", "Evaluate a checkpoint on shards; prints one JSON line.");
    opts.add_options()
        ("checkpoint", "DIR/model.safetensors", cxxopts::value<std::string>())
        ("data", "glob of shards", cxxopts::value<std::string>())
        ("device", "cpu, cuda or auto", cxxopts::value<std::string>()->default_value("auto"))
        ("batch", "images per forward pass", cxxopts::value<int>()->default_value("64"))
        ("save-logits", "write float32 [count, classes] logits (.npy) in shard order",
         cxxopts::value<std::string>())
        ("report", "add per-class accuracy and the confusion matrix")
        ("channels", "evaluate on this channel subset, e.g. 0,3,5", cxxopts::value<std::string>())
        ("all-subsets", "also average accuracy over every channel-subset size");
    auto r = parse(opts, argc, argv);
    if (r.count("channels") && r.count("all-subsets"))
        throw UserError("eval: --channels and --all-subsets exclude each other");
    const std::string glob = required(r, "data", "eval");
    const bool want_logits = r.count("save-logits") > 0;
    if (want_logits) check_output_file(r["save-logits"].as<std::string>(), "--save-logits");
    const Checkpoint ck = load_checkpoint(required(r, "checkpoint", "eval"));
    const Device dev = resolve_device(r["device"].as<std::string>());
    const int batch = r["batch"].as<int>();
    if (batch < 1) throw UserError("--batch must be at least 1");
    Loader data(eval_loader_options(glob, batch, ck.config.data.threads, stored_input(ck.config.data, dev)));
    check_data_matches(data.shape(), ck.config.model, glob);
    Model<float> model(ck.config.model, batch, false, dev, bf16_mode(ck.config.train.precision, dev));
    load_weights(model, ck);
    const int K = ck.config.model.num_classes;
    EvalOptions eopts;
    if (r.count("channels")) eopts.channels = parse_channel_list(r["channels"].as<std::string>(), ck.config.model.channels);
    // Progress on stderr (stdout is the one JSON line), every few seconds.
    Every every(5);
    eopts.on_batch = [&](int64_t done) {
        if (every.due()) std::fprintf(stderr, "eval: %lld/%lld images\n", (long long)done, (long long)data.count());
    };
    const EvalResult res = evaluate(model, data, want_logits, eopts);
    if (want_logits) write_npy(r["save-logits"].as<std::string>(), res.logits, res.count, K);
    nlohmann::json j{{"accuracy", res.accuracy}, {"loss", res.loss}, {"count", res.count}};
    if (!eopts.channels.empty()) j["channels"] = eopts.channels;
    if (r.count("report")) add_report(j, res, K);
    if (r.count("all-subsets")) {
        // Hyperspectral sets make this long (100 channels: over 6,000 passes): say so up front.
        const int C = ck.config.model.channels;
        size_t passes = 0;
        for (int m = 1; m <= C; m++) passes += channel_subsets(C, m).size();
        std::fprintf(stderr, "all-subsets: %zu passes over the data (every subset of each size 1..%d, at most 64 per "
                             "size)\n", passes, C);
        j["subsets"] = subsets_json(evaluate_all_subsets(model, data, [](const SubsetSweep::Size& s) {
            std::fprintf(stderr, "subsets of size %d: %d evaluated, mean accuracy %.4f\n", s.size, s.subsets, s.accuracy);
        }));
    }
    progress(j.dump());  // checked: a result that cannot be written is no success
    return 0;
}

int cmd_report(int argc, char** argv) {
    cxxopts::Options opts("prism report", "Plots (gnuplot PNGs) and a summary table of training runs.");
    opts.add_options()
        ("out", "output directory (default: the first RUN/report)", cxxopts::value<std::string>())
        ("runs", "run directories (prism train --out)", cxxopts::value<std::vector<std::string>>());
    opts.parse_positional({"runs"});
    opts.positional_help("RUN [RUN...]");
    auto r = parse(opts, argc, argv);
    if (!r.count("runs")) throw UserError("usage: prism report RUN [RUN...] [--out DIR]");
    const ReportOutput out =
        write_report(r["runs"].as<std::vector<std::string>>(), r.count("out") ? r["out"].as<std::string>() : "");
    for (const auto& f : out.files) progress("wrote " + f);
    progress("report: " + out.dir);
    return 0;
}

int cmd_synth(int argc, char** argv) {
    cxxopts::Options opts("prism synth", "Write a synthetic data set as shards.");
    opts.add_options()
        ("preset", "tiny, so2sat or jumpcp", cxxopts::value<std::string>())
        ("out", "output directory", cxxopts::value<std::string>())
        ("count", "training images (validation gets a quarter)", cxxopts::value<int64_t>()->default_value("4096"))
        ("seed", "random seed", cxxopts::value<uint64_t>()->default_value("0"));
    auto r = parse(opts, argc, argv);
    const int64_t count = r["count"].as<int64_t>();
    if (count < 1) throw UserError("--count must be at least 1");
    synthesize(required(r, "preset", "synth"), required(r, "out", "synth"), count, r["seed"].as<uint64_t>(), true);
    return 0;
}

int cmd_convert(int argc, char** argv) {
    const std::string what = argc >= 2 ? argv[1] : "";
    if (what == "so2sat") {
        cxxopts::Options opts("prism convert so2sat", "Convert a So2Sat LCZ42 HDF5 file (training.h5, ...) to shards.");
        opts.add_options()
            ("in", "So2Sat LCZ42 .h5 file", cxxopts::value<std::string>())
            ("out", "output directory", cxxopts::value<std::string>())
            ("dtype", "float32 or float16", cxxopts::value<std::string>()->default_value("float32"))
            ("shard-size", "images per shard (default 4096, fewer where a shard would pass 1 GiB)",
             cxxopts::value<int64_t>())
            ("prefix", "shard names PREFIX-NNNNN.shard", cxxopts::value<std::string>()->default_value("train"))
            ("stats-from", "normalize with these shards' mean/std (the training split's)", cxxopts::value<std::string>());
        auto r = parse(opts, argc - 1, argv + 1);
        So2SatOptions o;
        if (r.count("stats-from")) o.stats_from = r["stats-from"].as<std::string>();
        o.in = required(r, "in", "convert so2sat");
        o.out = required(r, "out", "convert so2sat");
        const std::string dt = r["dtype"].as<std::string>();
        if (dt != "float32" && dt != "float16") throw UserError("--dtype " + dt + ": expected float32 or float16");
        o.dtype = dtype_from_name(dt, "--dtype");
        o.shard_size = shard_size_of(r);
        o.prefix = r["prefix"].as<std::string>();
        convert_so2sat(o);
        return 0;
    }
    if (what == "npy") {
        cxxopts::Options opts("prism convert npy", "Convert .npy images [C,H,W] listed in a path,label CSV to shards.");
        opts.add_options()
            ("list", "CSV with the header path,label; paths relative to its directory", cxxopts::value<std::string>())
            ("out", "output directory", cxxopts::value<std::string>())
            ("shard-size", "images per shard (default 4096, fewer where a shard would pass 1 GiB)",
             cxxopts::value<int64_t>())
            ("prefix", "shard names PREFIX-NNNNN.shard", cxxopts::value<std::string>()->default_value("train"))
            ("num-classes", "number of classes (default: --stats-from's, else largest label + 1)", cxxopts::value<int>())
            ("stats-from", "normalize with these shards' mean/std (the training split's)", cxxopts::value<std::string>());
        auto r = parse(opts, argc - 1, argv + 1);
        NpyOptions o;
        if (r.count("stats-from")) o.stats_from = r["stats-from"].as<std::string>();
        o.list = required(r, "list", "convert npy");
        o.out = required(r, "out", "convert npy");
        o.shard_size = shard_size_of(r);
        o.prefix = r["prefix"].as<std::string>();
        if (r.count("num-classes")) {
            o.num_classes = r["num-classes"].as<int>();
            if (o.num_classes < 1) throw UserError("--num-classes must be at least 1");
        }
        convert_npy(o);
        return 0;
    }
    throw UserError("usage: prism convert so2sat --in FILE.h5 --out DIR | prism convert npy --list FILE.csv --out DIR");
}

int cmd_shards(int argc, char** argv) {
    if (argc >= 2 && (!std::strcmp(argv[argc - 1], "--help") || !std::strcmp(argv[argc - 1], "-h"))) {
        std::printf("usage: prism shards verify GLOB\n  checks every shard's header, labels and crc32c\n");
        return 0;
    }
    if (argc != 3 || std::strcmp(argv[1], "verify") != 0)
        throw UserError("usage: prism shards verify GLOB");
    const auto files = expand_glob(argv[2]);
    ShardHeader first;
    bool one_shape = true;
    for (const auto& f : files) {
        verify_shard(f);
        const ShardHeader h = read_shard_header(f);
        if (&f == &files[0]) first = h;
        one_shape = one_shape && h.same_shape(first);
        std::printf("ok %s: %lld images %dx%dx%d %s, %d classes\n", f.c_str(), (long long)h.count,
                    h.channels, h.height, h.width, dtype_name(h.dtype), h.num_classes);
    }
    std::printf("%zu shard(s) verified\n", files.size());
    // Sound files of several shapes (a training and a validation split
    // converted apart, say) are no error here, but train and eval take one
    // shape per glob.
    if (!one_shape)
        std::printf("note: these shards have more than one shape (above); a glob for train or eval must have one\n");
    return 0;
}

int cmd_flops(int argc, char** argv) {
    cxxopts::Options opts("prism flops", "FLOPs per image (DESIGN.md §5).");
    opts.add_options()
        ("config", "config file (JSON)", cxxopts::value<std::string>())
        ("set", "override a config key", cxxopts::value<std::vector<std::string>>())
        ("json", "print one JSON object");
    auto r = parse(opts, argc, argv);
    const Config cfg = load_config(required(r, "config", "flops"), sets_of(r));
    const FlopCount f = count_flops(cfg.model);
    const auto params = param_count(param_layout(cfg.model));
    if (r.count("json")) {
        std::printf("%s\n", nlohmann::json{{"arch", cfg.model.arch}, {"attention_gflops", f.attention_gflops},
                                           {"block_gflops", f.block_gflops}, {"forward_gflops", f.forward_gflops},
                                           {"train_step_gflops_per_image", f.train_step_gflops_per_image},
                                           {"params", params}}.dump().c_str());
    } else {
        std::printf("%s: attention %.2f GFLOPs per block, block %.2f, forward %.2f GFLOPs per image, %.2fM parameters\n",
                    cfg.model.arch.c_str(), f.attention_gflops, f.block_gflops, f.forward_gflops, params / 1e6);
    }
    return 0;
}

int cmd_bench(int argc, char** argv) {
    const std::string what = argc >= 2 ? argv[1] : "";
    if (what == "loader") {
        cxxopts::Options opts("prism bench loader",
                              "Images/s and MB/s through the training loader: read, shuffle, batch, normalize/augment.");
        opts.add_options()
            ("data", "glob of shards", cxxopts::value<std::string>())
            ("batch", "global batch", cxxopts::value<int>()->default_value("256"))
            ("threads", "reader threads (0 = min(cores, 4))", cxxopts::value<int>()->default_value("0"))
            ("seconds", "how long to measure", cxxopts::value<double>()->default_value("10"))
            ("augment", "none, so2sat or jumpcp", cxxopts::value<std::string>()->default_value("none"))
            ("device-input", "hand on stored pixels as prism train does on CUDA (data.device_input); "
                             "the device's input step is not run");
        auto r = parse(opts, argc - 1, argv + 1);
        LoaderBenchOptions o;
        o.data = required(r, "data", "bench loader");
        o.batch = r["batch"].as<int>();
        o.threads = r["threads"].as<int>();
        o.seconds = r["seconds"].as<double>();
        o.augment = augment_from_name(r["augment"].as<std::string>());
        o.device_input = r.count("device-input") > 0;
        const LoaderBenchResult res = bench_loader(o, true);
        std::printf("%s\n", loader_bench_json(o, res).dump().c_str());
        return 0;
    }
    if (what == "attention") {
        cxxopts::Options opts("prism bench attention",
                              "Forward + backward of one attention sublayer on the CUDA ops: the chvit (dense) block "
                              "and moevit blocks at each k, all channels present, at the config's shapes.");
        opts.add_options()
            ("config", "config file (JSON): image, channels, patch, dim, heads, combine, aux...",
             cxxopts::value<std::string>())
            ("set", "override a config key: section.key=value", cxxopts::value<std::vector<std::string>>())
            ("batch", "images per iteration (0: the largest up to 256 whose buffers fit in 8 GiB)",
             cxxopts::value<int>()->default_value("0"))
            ("iters", "timed iterations (the median is reported)", cxxopts::value<int>()->default_value("50"))
            ("warmup", "untimed iterations first", cxxopts::value<int>()->default_value("10"))
            ("k,top-k", "moevit top-k values (--k LIST also works); C = model.channels",
             cxxopts::value<std::string>()->default_value(kDefaultAttentionKs))
            ("impl", "the block as train.precision runs it: bf16 (bf16 products and storage; the flash kernels at "
                     "head dim 64) or reference (fp32: fp32 products, the fused fp32 attention kernels)",
             cxxopts::value<std::string>()->default_value("bf16"));
        // cxxopts takes no one-letter long option, and the documented spelling is --k.
        std::vector<std::string> args(argv + 1, argv + argc);
        for (auto& a : args)
            if (a == "--k" || a.rfind("--k=", 0) == 0) a = "--top-k" + a.substr(3);
        std::vector<char*> arg_ptrs;
        for (auto& a : args) arg_ptrs.push_back(a.data());
        auto r = parse(opts, int(arg_ptrs.size()), arg_ptrs.data());
        AttentionBenchOptions o;
        o.model = load_config(required(r, "config", "bench attention"), sets_of(r)).model;
        o.ks = parse_k_list(r["k"].as<std::string>(), o.model.channels);
        o.batch = r["batch"].as<int>();
        o.iters = r["iters"].as<int>();
        o.warmup = r["warmup"].as<int>();
        o.impl = r["impl"].as<std::string>();
        if (o.impl != "reference" && o.impl != "bf16")
            throw UserError("bench attention: --impl " + printable(o.impl) + ": expected bf16 or reference");
        if (o.batch < 0) throw UserError("bench attention: --batch must be at least 0 (0: automatic)");
        if (o.iters < 1) throw UserError("bench attention: --iters must be at least 1");
        if (o.warmup < 0) throw UserError("bench attention: --warmup must be at least 0");
        // Checked after the options, so that their errors show on any machine.
        if (!attention_bench_has_device()) {
            std::fprintf(stderr, "prism bench attention: no CUDA device\n");
            return 1;
        }
        std::vector<AttentionBenchRow> rows;
        try {
            rows = bench_attention(o, true);
        } catch (const UserError&) {
            throw;
        } catch (const std::runtime_error& e) {  // the CUDA ops' errors, out of device memory included
            throw UserError(std::string("bench attention: ") + e.what());
        }
        std::printf("%s", attention_bench_table(rows).c_str());
        for (const auto& row : rows) std::printf("%s\n", attention_bench_json(o, row).dump().c_str());
        return 0;
    }
    if (what == "step") {
        cxxopts::Options opts("prism bench step",
                              "Whole training steps per second (upload, forward, backward, AdamW) of one config.");
        opts.add_options()
            ("config", "config file", cxxopts::value<std::string>())
            ("set", "override a config key", cxxopts::value<std::vector<std::string>>())
            ("device", "cpu, cuda or auto", cxxopts::value<std::string>()->default_value("auto"))
            ("batch", "images per step (0: the config's train.batch)", cxxopts::value<int>()->default_value("0"))
            ("warmup", "untimed steps first", cxxopts::value<int>()->default_value("5"))
            ("iters", "timed steps (the median is reported)", cxxopts::value<int>()->default_value("20"))
            ("pixels", "float (normalized float32 uploaded), or uint8, uint16, float16, float32: stored pixels "
                       "through the model's input step, as prism train passes them on CUDA",
             cxxopts::value<std::string>()->default_value("float"));
        auto r = parse(opts, argc - 1, argv + 1);
        const Config cfg = load_config(required(r, "config", "bench step"), sets_of(r));
        StepBenchOptions o;
        o.device = resolve_device(r["device"].as<std::string>());
        o.batch = r["batch"].as<int>();
        o.warmup = r["warmup"].as<int>();
        o.iters = r["iters"].as<int>();
        o.pixels = r["pixels"].as<std::string>();
        const StepBenchResult res = bench_step(cfg, o, true);
        std::printf("\n%s\n", step_bench_json(cfg, res).dump().c_str());
        return 0;
    }
    throw UserError("usage: prism bench loader --data GLOB [--batch N] [--threads T] [--seconds S] [--augment A]"
                    " [--device-input] | prism bench attention --config FILE [...]"
                    " | prism bench step --config FILE [...]");
}

}  // namespace

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines appear as they happen, also in logs
    if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
        std::fputs(kUsage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    const std::string cmd = argv[1];
    try {
        if (cmd == "train") return cmd_train(argc - 1, argv + 1);
        if (cmd == "eval") return cmd_eval(argc - 1, argv + 1);
        if (cmd == "synth") return cmd_synth(argc - 1, argv + 1);
        if (cmd == "shards") return cmd_shards(argc - 1, argv + 1);
        if (cmd == "flops") return cmd_flops(argc - 1, argv + 1);
        if (cmd == "report") return cmd_report(argc - 1, argv + 1);
        if (cmd == "convert") return cmd_convert(argc - 1, argv + 1);
        if (cmd == "bench") return cmd_bench(argc - 1, argv + 1);
        std::fprintf(stderr, "prism: unknown command '%s'\n%s", cmd.c_str(), kUsage);
        return 1;
    } catch (const UserError& e) {
        std::fprintf(stderr, "prism: %s\n", e.what());
    } catch (const cxxopts::exceptions::exception& e) {
        std::fprintf(stderr, "prism %s: %s\n", cmd.c_str(), e.what());
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "prism: out of host memory\n");
    } catch (const std::exception& e) {
        // A check missing somewhere: still one line and exit 1, not an abort.
        std::fprintf(stderr, "prism %s: unexpected error: %s\n", cmd.c_str(), printable(e.what(), 300).c_str());
    }
    return 1;
}
