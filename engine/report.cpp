#include "engine/report.h"
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include "engine/common.h"
#include "engine/config.h"
#include "engine/flops.h"

namespace prism {

namespace {

using nlohmann::json;

// One training run as its directory holds it.
struct Run {
    std::string dir, name;            // name: unique label, also used in file names
    Config config;
    std::vector<json> train, eval;    // metrics.jsonl lines by type
    json routing;                     // routing.json, or null
    double attention_gflops = 0;
};

json read_json_file(const std::string& path) {
    std::ifstream f(path);
    if (!f) throw UserError(path + ": cannot read (is this a `prism train --out` directory?)");
    try {
        return json::parse(f);
    } catch (const json::exception& e) {
        throw UserError(path + ": not valid JSON: " + printable(e.what()));
    }
}

void require_numbers(const json& j, std::initializer_list<const char*> keys, const std::string& where) {
    for (const char* k : keys)
        if (!j.contains(k) || !j[k].is_number()) throw UserError(where + ": no number \"" + k + "\"");
}

// A logging window with a skipped (non-finite) step has a null loss and
// accuracy: a gap in the curves, not a broken file.
void require_numbers_or_null(const json& j, std::initializer_list<const char*> keys, const std::string& where) {
    for (const char* k : keys)
        if (!j.contains(k) || !(j[k].is_number() || j[k].is_null()))
            throw UserError(where + ": \"" + k + "\" is neither a number nor null");
}

// Whether v is an array of n arrays, each holding m numbers.
bool is_matrix(const json& v, size_t n, size_t m) {
    if (!v.is_array() || v.size() != n) return false;
    for (const json& row : v) {
        if (!row.is_array() || row.size() != m) return false;
        for (const json& x : row)
            if (!x.is_number()) return false;
    }
    return true;
}

Run load_run(const std::string& dir) {
    Run r;
    r.dir = dir;
    const std::string config_path = join_path(dir, "config.json");
    r.config = config_from_json(read_json_file(config_path), config_path);
    r.attention_gflops = count_flops(r.config.model).attention_gflops;

    const std::string metrics_path = join_path(dir, "metrics.jsonl");
    std::ifstream f(metrics_path);
    if (!f) throw UserError(metrics_path + ": cannot read (is this a `prism train --out` directory?)");
    std::string line;
    for (int n = 1; std::getline(f, line); n++) {
        if (line.empty()) continue;
        const std::string where = metrics_path + ": line " + std::to_string(n);
        json j;
        try {
            j = json::parse(line);
        } catch (const json::exception&) {
            throw UserError(where + " is not JSON");
        }
        if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
            throw UserError(where + ": not an object with a \"type\"");
        require_numbers(j, {"step"}, where);
        require_numbers_or_null(j, {"loss", "accuracy"}, where);
        // What the plots index, checked here against the run's config.
        const size_t depth = size_t(r.config.model.depth), C = size_t(r.config.model.channels);
        if (j.contains("routing_shares") && !is_matrix(j["routing_shares"], depth, C))
            throw UserError(where + ": routing_shares is not [" + std::to_string(depth) + " blocks][" +
                            std::to_string(C) + " channels] of numbers");
        if (j["type"] == "train") r.train.push_back(j);
        else if (j["type"] == "eval") r.eval.push_back(j);
    }

    if (r.train.empty()) throw UserError(metrics_path + ": no train lines yet (the run has not logged a step)");

    const std::string routing_path = join_path(dir, "routing.json");
    struct stat st;
    if (::stat(routing_path.c_str(), &st) == 0) {
        r.routing = read_json_file(routing_path);
        const ModelConfig& m = r.config.model;
        const json& s = r.routing.is_object() && r.routing.contains("slots") ? r.routing["slots"] : json();
        bool ok = s.is_array() && s.size() == size_t(m.depth);
        for (size_t i = 0; ok && i < s.size(); i++) ok = is_matrix(s[i], size_t(m.num_classes), size_t(m.channels));
        if (!ok || (r.routing.contains("step") && !r.routing["step"].is_number()))
            throw UserError(routing_path + ": no \"slots\" [" + std::to_string(m.depth) + " blocks][" +
                            std::to_string(m.num_classes) + " classes][" + std::to_string(m.channels) +
                            " channels] of numbers");
    }
    return r;
}

// File-name-safe label from the run directory's last component.
std::string run_label(const std::string& dir) {
    std::string d = dir;
    while (d.size() > 1 && d.back() == '/') d.pop_back();
    std::string base = d.substr(d.find_last_of('/') == std::string::npos ? 0 : d.find_last_of('/') + 1);
    if (base.empty() || base == "." || base == "..") base = "run";
    for (char& ch : base)
        if (!std::isalnum((unsigned char)ch) && ch != '-' && ch != '_' && ch != '.') ch = '_';
    return base;
}

// A gnuplot single-quoted string.
std::string q(const std::string& s) {
    std::string out = "'";
    for (char ch : s) out += ch == '\'' ? std::string("''") : std::string(1, ch);
    return out + "'";
}

// A POSIX shell single-quoted word.
std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
    return out + "'";
}

std::string fmt(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    return buf;
}

// A metrics value for gnuplot: null (a window with a skipped step) is NaN, a gap.
std::string fmt(const json& v) { return v.is_number() ? fmt(v.get<double>()) : "NaN"; }

const char* kPalette =
    "set palette defined (0 '#440154', 0.25 '#3b528b', 0.5 '#21918c', 0.75 '#5ec962', 1 '#fde725')\n";

std::string terminal(const std::string& png, int width, int height) {
    return "reset\nset terminal pngcairo noenhanced size " + std::to_string(width) + "," + std::to_string(height) +
           " font 'sans,10'\nset output " + q(png) + "\n";
}

// Grid of heatmap panels, one per block.
void panel_layout(int depth, int& rows, int& cols) {
    cols = std::min(depth, 4);
    rows = (depth + cols - 1) / cols;
}

// ytics/xtics with names, when there are few enough to read.
std::string named_tics(const char* axis, const std::vector<std::string>& names) {
    if (names.empty() || names.size() > 24) return "";
    std::string s = std::string("set ") + axis + "tics (";
    for (size_t i = 0; i < names.size(); i++) s += (i ? ", " : "") + q(names[i]) + " " + std::to_string(i);
    return s + ")\n";
}

std::vector<std::string> channel_names(const Run& r) {
    std::vector<std::string> names;
    if (!r.routing.is_null() && r.routing.contains("channel_names") && r.routing["channel_names"].is_array())
        for (const auto& n : r.routing["channel_names"]) names.push_back(n.is_string() ? n.get<std::string>() : "");
    if (int(names.size()) != r.config.model.channels) {
        names.clear();
        for (int c = 0; c < r.config.model.channels; c++) names.push_back(std::to_string(c));
    }
    return names;
}

// Loss and accuracy of every run: train lines, val points.
std::string curves_plot(const std::vector<Run>& runs, std::string& data) {
    std::string loss, acc;
    for (size_t i = 0; i < runs.size(); i++) {
        const Run& r = runs[i];
        const std::string lc = " lc " + std::to_string(i + 1);
        for (const char* type : {"train", "eval"}) {
            const auto& lines = std::string(type) == "train" ? r.train : r.eval;
            if (lines.empty()) continue;
            const std::string block = "$" + std::string(type) + std::to_string(i);
            data += block + " << EOD\n";
            bool any_loss = false, any_acc = false;
            for (const json& j : lines) {
                data += fmt(j["step"]) + " " + fmt(j["loss"]) + " " + fmt(j["accuracy"]) + "\n";
                any_loss = any_loss || j["loss"].is_number();
                any_acc = any_acc || j["accuracy"].is_number();
            }
            data += "EOD\n";
            const std::string style = std::string(type) == "train" ? " with lines lw 2" : " with linespoints pt 7 dt 2";
            const std::string title = " title " + q(r.name + (std::string(type) == "train" ? " train" : " val"));
            // gnuplot refuses a series with no defined point (a run whose every window skipped a step).
            if (any_loss) loss += (loss.empty() ? "plot " : ", ") + block + " using 1:2" + style + lc + title;
            if (any_acc) acc += (acc.empty() ? "plot " : ", ") + block + " using 1:3" + style + lc + title;
        }
    }
    const std::string nothing = "set label 'no finite values' at graph 0.5, graph 0.5 center\n"
                                "plot [0:1] [0:1] -1 notitle\nunset label\n";
    return terminal("curves.png", 1200, 480) +
           "set multiplot layout 1,2\nset grid\nset xlabel 'step'\nset key top right\n"
           "set title 'loss (train: window mean of the total loss; val: cross-entropy)'\nset ylabel 'loss'\n" +
           (loss.empty() ? nothing : loss + "\n") +
           "set title 'accuracy'\nset ylabel 'accuracy'\nset yrange [0:1]\nset key bottom right\n" +
           (acc.empty() ? nothing : acc + "\n") + "unset multiplot\n";
}

// Final val accuracy against attention GFLOPs, with the Pareto front.
std::string pareto_plot(const std::vector<Run>& runs, std::string& data) {
    std::vector<std::pair<double, double>> points;  // (gflops, accuracy)
    data += "$points << EOD\n";
    for (const Run& r : runs) {
        if (r.eval.empty() || !r.eval.back()["accuracy"].is_number()) continue;
        const double acc = r.eval.back()["accuracy"].get<double>();
        points.push_back({r.attention_gflops, acc});
        std::string label = r.name;
        std::replace(label.begin(), label.end(), '"', '\'');
        data += fmt(r.attention_gflops) + " " + fmt(acc) + " \"" + label + "\"\n";
    }
    data += "EOD\n";
    if (points.empty()) return "";
    // The front: each run that no cheaper-or-equal run beats in accuracy.
    std::sort(points.begin(), points.end(),
              [](const auto& a, const auto& b) { return a.first < b.first || (a.first == b.first && a.second > b.second); });
    data += "$front << EOD\n";
    double best = -1;
    for (const auto& p : points)
        if (p.second > best) {
            data += fmt(p.first) + " " + fmt(p.second) + "\n";
            best = p.second;
        }
    data += "EOD\n";
    return terminal("accuracy_vs_gflops.png", 800, 560) +
           "set grid\nset offsets graph 0.15, graph 0.15, graph 0.1, graph 0.1\n"
           "set title 'final val accuracy vs attention GFLOPs per image (one block, all channels)'\n"
           "set xlabel 'attention GFLOPs per image (prism flops)'\nset ylabel 'val accuracy'\nset key bottom right\n"
           "plot $front using 1:2 with lines dt 2 lc rgb 'gray40' title 'Pareto front', "
           "$points using 1:2 with points pt 7 ps 1.5 lc 1 notitle, "
           "$points using 1:2:3 with labels offset char 0,1 notitle\n";
}

// Per block: each channel's share of the token-slots in every logging window.
std::string channel_load_plot(const Run& r, std::string& data, std::string& png) {
    std::vector<const json*> lines;
    for (const json& j : r.train)
        if (j.contains("routing_shares") && j["routing_shares"].is_array()) lines.push_back(&j);
    if (lines.empty()) return "";
    const int depth = int((*lines[0])["routing_shares"].size()), C = r.config.model.channels;
    double top = 0;
    std::string panels;
    for (int i = 0; i < depth; i++) {
        const std::string block = "$load_" + std::to_string(i);
        data += block + " << EOD\n";
        double prev = 0;
        for (const json* j : lines) {
            const double step = (*j)["step"].get<double>();
            const json& shares = (*j)["routing_shares"];
            if (int(shares.size()) != depth || !shares[i].is_array() || int(shares[i].size()) != C)
                throw UserError(join_path(r.dir, "metrics.jsonl") + ": step " + fmt(step) +
                                ": routing_shares is not [blocks][channels]");
            for (int c = 0; c < C; c++) {
                const double share = shares[i][c].get<double>();
                top = std::max(top, share);
                data += fmt((prev + step) / 2) + " " + std::to_string(c) + " " + fmt((step - prev) / 2) + " 0.5 " +
                        fmt(share) + "\n";
            }
            prev = step;
        }
        data += "EOD\n";
        panels += "set title 'block " + std::to_string(i) + "'\nplot " + block +
                  " using 1:2:3:4:5 with boxxyerror fs solid 1.0 noborder lc palette notitle\n";
    }
    int rows, cols;
    panel_layout(depth, rows, cols);
    png = r.name + "_channel_load.png";
    return terminal(png, 80 + 420 * cols, 60 + 320 * rows) + kPalette +
           "set multiplot layout " + std::to_string(rows) + "," + std::to_string(cols) + " title " +
           q(r.name + ": share of each block's token-slots per channel, per logging window") + "\n" +
           "set xlabel 'step'\nset ylabel 'channel'\nset yrange [-0.5:" + std::to_string(C) + "-0.5]\n" +
           "set xrange [0:" + fmt((*lines.back())["step"].get<double>()) + "]\nset cbrange [0:" + fmt(top) + "]\n" +
           named_tics("y", channel_names(r)) + panels + "unset multiplot\n";
}

// Per block: for each class, the share of its patches' token-slots on each channel.
std::string class_routing_plot(const Run& r, std::string& data, std::string& png) {
    if (r.routing.is_null()) return "";
    const json& slots = r.routing["slots"];
    const int depth = int(slots.size()), K = int(slots[0].size()), C = int(slots[0][0].size());
    std::string panels;
    double top = 0;
    for (int i = 0; i < depth; i++) {
        const std::string block = "$classes_" + std::to_string(i);
        data += block + " << EOD\n";
        for (int y = 0; y < K; y++) {
            const json& row = slots[i][y];
            if (!row.is_array() || int(row.size()) != C)
                throw UserError(join_path(r.dir, "routing.json") + ": slots is not [blocks][classes][channels]");
            double total = 0;
            for (const auto& v : row) total += v.get<double>();
            for (int c = 0; c < C; c++) {
                const double share = total > 0 ? row[c].get<double>() / total : 0;
                top = std::max(top, share);
                data += (c ? " " : "") + fmt(share);
            }
            data += "\n";
        }
        data += "EOD\n";
        panels += "set title 'block " + std::to_string(i) + "'\nplot " + block + " matrix with image notitle\n";
    }
    std::vector<std::string> classes;
    for (int y = 0; y < K; y++) classes.push_back(std::to_string(y));
    int rows, cols;
    panel_layout(depth, rows, cols);
    png = r.name + "_class_routing.png";
    return terminal(png, 80 + 380 * cols, 60 + std::max(320, 12 * K) * rows) + kPalette +
           "set multiplot layout " + std::to_string(rows) + "," + std::to_string(cols) + " title " +
           q(r.name + ": share of each class's token-slots per channel (eval at step " +
             fmt(r.routing.value("step", 0.0)) + ")") + "\n" +
           "set xlabel 'channel'\nset ylabel 'class'\nset xrange [-0.5:" + std::to_string(C) + "-0.5]\n" +
           "set yrange [-0.5:" + std::to_string(K) + "-0.5]\nset cbrange [0:" + fmt(top) + "]\n" +
           named_tics("x", channel_names(r)) + named_tics("y", classes) + panels + "unset multiplot\n";
}

std::string summary_markdown(const std::vector<Run>& runs, const std::vector<std::string>& pngs) {
    std::ostringstream s;
    s << "# Prism report\n\n| run | arch | top_k | steps | final val acc | attention GFLOPs |\n"
         "| --- | --- | --- | --- | --- | --- |\n";
    for (const Run& r : runs) {
        char acc[32] = "-", gflops[32];
        if (!r.eval.empty() && r.eval.back()["accuracy"].is_number())
            std::snprintf(acc, sizeof acc, "%.4f", r.eval.back()["accuracy"].get<double>());
        std::snprintf(gflops, sizeof gflops, "%.4g", r.attention_gflops);
        s << "| " << r.name << " | " << r.config.model.arch << " | "
          << (r.config.model.arch == "moevit" ? std::to_string(r.config.model.top_k) : std::string("-")) << " | "
          << (r.train.empty() ? "0" : fmt(r.train.back()["step"])) << " | " << acc << " | " << gflops << " |\n";
    }
    s << "\nAttention GFLOPs: one block's attention per image with all channels (DESIGN.md §5, `prism flops`). "
         "Final val acc: the run's last evaluation.\n\nRuns:\n\n";
    for (const Run& r : runs) s << "- " << r.name << ": `" << r.dir << "`\n";
    s << "\n";
    for (const auto& png : pngs) s << "![" << png << "](" << png << ")\n\n";
    return s.str();
}

// Runs gnuplot on DIR/report.gp; throws with its first lines of output on failure.
// Runs gnuplot on dir/report.gp; errors name `report`, the directory the
// user asked for.
void run_gnuplot(const std::string& dir, const std::string& report) {
    const char* env = std::getenv("PRISM_GNUPLOT");
    const std::string program = env && *env ? env : "gnuplot";
    const std::string cmd = "cd " + shell_quote(dir) + " && " + shell_quote(program) + " report.gp 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) throw UserError("report: cannot start " + program);
    std::string output;
    char buf[512];
    while (std::fgets(buf, sizeof buf, p)) output += buf;
    const int status = pclose(p);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
        throw UserError(program + ": not found; prism report needs gnuplot (Debian: apt-get install gnuplot-nox, "
                                  "or make deps)");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        throw UserError(report + ": gnuplot failed on the report's script: " +
                        printable(output.empty() ? "exit status " + std::to_string(WEXITSTATUS(status)) : output, 300));
}

}  // namespace

bool gnuplot_available() {
    const char* env = std::getenv("PRISM_GNUPLOT");
    const std::string program = env && *env ? env : "gnuplot";
    return std::system((shell_quote(program) + " --version >/dev/null 2>&1").c_str()) == 0;
}

ReportOutput write_report(const std::vector<std::string>& run_dirs, const std::string& out_dir) {
    if (run_dirs.empty()) throw UserError("report: name at least one run directory");
    std::vector<Run> runs;
    for (const auto& d : run_dirs) {
        runs.push_back(load_run(d));
        // Unique labels: a second "moevit" becomes "moevit-2".
        const std::string base = run_label(d);
        std::string name = base;
        for (int n = 2; std::any_of(runs.begin(), runs.end() - 1, [&](const Run& r) { return r.name == name; }); n++)
            name = base + "-" + std::to_string(n);
        runs.back().name = name;
    }
    ReportOutput out;
    out.dir = out_dir.empty() ? join_path(run_dirs[0], "report") : out_dir;
    make_dirs(out.dir);

    std::string data, plots, png;
    std::vector<std::string> pngs;
    plots += curves_plot(runs, data);
    pngs.push_back("curves.png");
    if (std::string p = pareto_plot(runs, data); !p.empty()) {
        plots += p;
        pngs.push_back("accuracy_vs_gflops.png");
    }
    for (const Run& r : runs) {
        if (std::string p = channel_load_plot(r, data, png); !p.empty()) {
            plots += p;
            pngs.push_back(png);
        }
        if (std::string p = class_routing_plot(r, data, png); !p.empty()) {
            plots += p;
            pngs.push_back(png);
        }
    }
    // gnuplot renders into a staging directory; the images replace the
    // previous report's only once all are drawn, so a failed rerun (no
    // gnuplot, a bad routing.json) leaves that report whole and no half image.
    const std::string script = "# Written by prism report; re-render with: cd " + out.dir +
                               " && gnuplot report.gp\n" + data + plots;
    const std::string staging = join_path(out.dir, ".rendering");
    auto clear_staging = [&] {  // best effort: what is left there is never read
        for (const auto& p : pngs) std::remove(join_path(staging, p).c_str());
        std::remove(join_path(staging, "report.gp").c_str());
        ::rmdir(staging.c_str());
    };
    clear_staging();
    make_dirs(staging);
    try {
        write_file_atomic(join_path(staging, "report.gp"), script);
        run_gnuplot(staging, out.dir);
        for (const auto& p : pngs) {
            struct stat st;
            if (::stat(join_path(staging, p).c_str(), &st) != 0 || st.st_size == 0)
                throw UserError(join_path(out.dir, p) + ": gnuplot wrote no image");
        }
        for (const auto& p : pngs) {
            const std::string path = join_path(out.dir, p);
            if (std::rename(join_path(staging, p).c_str(), path.c_str()) != 0)
                throw UserError(path + ": cannot move the new image into place: " + std::strerror(errno));
            out.files.push_back(path);
        }
    } catch (...) {
        clear_staging();
        throw;
    }
    clear_staging();
    write_file_atomic(join_path(out.dir, "report.gp"), script);
    const std::string summary = join_path(out.dir, "summary.md");
    write_file_atomic(summary, summary_markdown(runs, pngs));
    out.files.push_back(summary);
    return out;
}

}  // namespace prism
