// Helpers for tests that run programs: a shell command's exit status, output
// and time, the build folder, and whether mpirun can start ranks here.
#pragma once
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <limits.h>
#include <sys/wait.h>
#include <unistd.h>

namespace prism::testing {

struct ShellRun {
    int status = -1;  // as from waitpid / pclose
    std::string output;
    double seconds = 0;
};

inline ShellRun run_shell(const std::string& cmd) {
    ShellRun r;
    const auto start = std::chrono::steady_clock::now();
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return r;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
    r.status = pclose(p);
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return r;
}

inline bool exited_ok(const ShellRun& r) { return WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0; }

// Open MPI refuses to run as root unless told; CI runs as root.
inline const char* kMpirun =
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 60 mpirun --oversubscribe";

// Why mpirun cannot run two processes here ("" when it can), probed once.
inline const std::string& why_no_mpirun() {
    static const std::string why = [] {
#ifndef PRISM_MPI
        return std::string("this build has no MPI (mpicxx was not found when it was built)");
#endif
        if (!exited_ok(run_shell("command -v mpirun"))) return std::string("mpirun is not on PATH");
        const ShellRun probe = run_shell(std::string(kMpirun) + " -np 2 true");
        return exited_ok(probe) ? std::string() : "mpirun cannot start two processes here: " + probe.output;
    }();
    return why;
}

// The folder of this test binary (build/), with a trailing slash.
inline std::string build_dir() {
    char exe[PATH_MAX];
    const ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    const std::string self(exe, size_t(len > 0 ? len : 0));
    return self.substr(0, self.find_last_of('/') + 1);
}


// How a data-parallel job ended after one of its ranks was signalled.
struct DeadRankRun {
    std::string output;   // the shell's report, "rc=R waited=S"
    bool found = false;   // the report is there
    int rc = 0;           // the job's exit code
    int waited = 0;       // seconds from the signal to the job's end
    std::string log;      // the job's output
};

// Starts `job` (an mpirun command line, itself under a timeout, whose ranks
// run in `dir`) in the background with its output in dir/log (and d.log), waits until
// it has logged step 2, sends SIG`signal` (KILL, STOP) to the newest process
// whose command line holds `prism train` (or `prism_emulated train`) and
// `dir`: a rank, started after mpirun. Waits for the job, then SIGKILLs that
// rank in case it is stopped and outlived the job.
inline DeadRankRun signal_a_rank_mid_run(const std::string& signal, const std::string& job, const std::string& dir) {
    DeadRankRun d;
    const std::string log = dir + "/log";
    d.output = run_shell("(" + job + " > " + log + " 2>&1 & job=$!; "
                         "for i in $(seq 600); do grep -q 'step *2/' " + log + " && break; sleep 0.1; done; "
                         "rank=$(pgrep -n -f 'prism(_emulated)? train.*" + dir + "'); kill -" + signal + " $rank; "
                         "start=$(date +%s); wait $job; rc=$?; echo rc=$rc waited=$(( $(date +%s) - start )); "
                         "kill -KILL $rank 2>/dev/null)")
                   .output;
    const size_t at = d.output.find("rc=");
    d.found = at != std::string::npos;
    if (d.found) {
        d.output = d.output.substr(at);
        d.rc = std::atoi(d.output.c_str() + 3);
        const size_t w = d.output.find("waited=");
        d.waited = w == std::string::npos ? -1 : std::atoi(d.output.c_str() + w + 7);
    }
    std::ifstream in(log, std::ios::binary);
    d.log.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return d;
}

}  // namespace prism::testing
