// Small shared vocabulary: the error type for bad user input and the
// one-line checks used everywhere.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace prism {

// Thrown for anything the user can fix (a bad file, a bad config value).
// main() prints what() as one line and exits with code 1.
struct UserError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Internal invariant violated: a bug in Prism, not in the input.
[[noreturn]] inline void panic(const char* file, int line, const std::string& what) {
    std::fprintf(stderr, "prism: internal error at %s:%d: %s\n", file, line, what.c_str());
    std::fflush(stderr);
    std::abort();
}
#define PRISM_ASSERT(cond) \
    do { if (!(cond)) ::prism::panic(__FILE__, __LINE__, #cond); } while (0)

enum class Device { cpu, cuda };

// File-system helpers shared by the commands that write directories.
std::string join_path(const std::string& dir, const std::string& name);  // dir + "/" + name
void make_dirs(const std::string& dir);  // mkdir -p; throws UserError naming the part that failed
// The directory part of a path: "." for a bare name, "/" for "/name".
std::string dir_of(const std::string& path);
// Whether two paths name one directory (or file): runs/a, ./runs/a/ and its
// absolute path alike; false when either does not exist.
bool same_file(const std::string& a, const std::string& b);
// Writes the concatenation of `parts` to `path` through path.tmp, fsync,
// rename and a sync of the directory, so that a crash leaves the old file or
// the new one, never half of one; throws UserError naming the file and the
// system's reason. The parts are written where they lie (no copy).
struct Bytes {
    const void* data;
    size_t size;
};
void write_file_atomic(const std::string& path, const std::vector<Bytes>& parts);
void write_file_atomic(const std::string& path, const std::string& text);
// Opens a regular file for reading and returns its descriptor (close-on-
// exec) and size. Anything else is refused with UserError "<path>: <problem>
// <context>": a directory, or a FIFO, which a plain open() would wait on
// until a writer came.
int open_regular_file(const std::string& path, const std::string& context, uint64_t* size);
// Text taken from a file (a dtype string, a parser message quoting the
// input) may hold newlines or control bytes: each becomes '?', and text past
// max_len becomes "...", so that one-line messages stay one line.
std::string printable(const std::string& s, size_t max_len = 80);
// Prints one progress line to stdout and flushes; throws UserError if stdout fails.
void progress(const std::string& line);
// Paces the progress lines of long work: due() is true at most once per
// `seconds`, counted from construction or the last true.
class Every {
public:
    explicit Every(double seconds) : period_(seconds), last_(std::chrono::steady_clock::now()) {}
    bool due() {
        const auto now = std::chrono::steady_clock::now();
        if (std::chrono::duration<double>(now - last_).count() < period_) return false;
        last_ = now;
        return true;
    }

private:
    double period_;
    std::chrono::steady_clock::time_point last_;
};

}  // namespace prism
