// Helpers shared by the tests that write files: a temporary directory,
// whole-file reads and writes, the one-line UserError check, and a child
// process for what may crash or change the process's limits.
#pragma once
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "engine/common.h"

namespace prism::testing {

// A fresh directory under the test temporary directory, removed afterwards by
// the process that made it: a forked child that exits through exit() runs
// static destructors too, and must not take its parent's files with it.
struct TmpDir {
    std::string path;
    pid_t owner = getpid();
    TmpDir() {
        std::string tmpl = ::testing::TempDir() + "prism_test_XXXXXX";
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
        path = buf.data();
    }
    TmpDir(const TmpDir&) = delete;
    TmpDir& operator=(const TmpDir&) = delete;
    ~TmpDir() {
        if (getpid() != owner) return;
        std::error_code ec;
        std::filesystem::permissions(path, std::filesystem::perms::owner_all, std::filesystem::perm_options::add, ec);
        std::filesystem::remove_all(path, ec);
    }
    std::string operator/(const std::string& name) const { return path + "/" + name; }
};

inline std::string read_bytes(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    EXPECT_TRUE(f.good()) << path;
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    ASSERT_TRUE(f.good()) << path;
}

inline bool exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

// Runs fn, which must throw a UserError naming `path` that contains `what`,
// in one line.
inline void expect_error(const std::function<void()>& fn, const std::string& path, const std::string& what) {
    try {
        fn();
        ADD_FAILURE() << "no error; expected '" << what << "'";
    } catch (const UserError& e) {
        std::string m = e.what();
        EXPECT_EQ(m.rfind(path + ": ", 0), 0u) << "message does not start with the path: " << m;
        EXPECT_NE(m.find(what), std::string::npos) << "message lacks '" << what << "': " << m;
        EXPECT_EQ(m.find('\n'), std::string::npos) << "message is not one line: " << m;
    }
}

// Runs fn in a child process (no core dump) and returns its wait status;
// fn may _exit with its own code. kill_after_ms >= 0: SIGKILL it then.
template <class Fn>
int in_child(Fn fn, int kill_after_ms = -1) {
    const pid_t pid = fork();
    if (pid == 0) {
        rlimit no_core = {0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        fn();
        _exit(0);
    }
    if (kill_after_ms >= 0) {
        timespec ts{kill_after_ms / 1000, (kill_after_ms % 1000) * 1000000L};
        nanosleep(&ts, nullptr);
        kill(pid, SIGKILL);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
}

}  // namespace prism::testing
