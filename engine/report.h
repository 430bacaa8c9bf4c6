// `prism report RUN [RUN...] [--out DIR]`: plots and a summary table of
// training runs (directories written by `prism train --out`), rendered by
// gnuplot from one generated script, DIR/report.gp, that holds its data
// inline (re-run it with `cd DIR && gnuplot report.gp` after editing).
//
// DIR/curves.png              loss and accuracy of every run over steps (train: lines; val: points)
// DIR/accuracy_vs_gflops.png  final val accuracy against attention GFLOPs per image
//                             (engine/flops.h on each run's config.json), with the Pareto front
// DIR/NAME_channel_load.png   moevit: per block, each channel's share of token-slots over steps
// DIR/NAME_class_routing.png  moevit: per block, for each class, its slots' shares per channel (routing.json)
// DIR/summary.md              run, arch, top_k, steps, final val acc, attention GFLOPs; links the plots
#pragma once
#include <string>
#include <vector>

namespace prism {

struct ReportOutput {
    std::string dir;
    std::vector<std::string> files;  // the PNGs and summary.md, full paths
};

// out_dir empty: runs[0]/report. Throws UserError naming the file for a run
// that lacks config.json or metrics.jsonl or holds a bad line, and when
// gnuplot is missing or fails (the program is $PRISM_GNUPLOT, else gnuplot).
ReportOutput write_report(const std::vector<std::string>& runs, const std::string& out_dir);

// Whether the gnuplot program runs (`gnuplot --version`).
bool gnuplot_available();

}  // namespace prism
