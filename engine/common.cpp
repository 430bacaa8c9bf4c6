// File-system and output helpers declared in engine/common.h.
#include "engine/common.h"

#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

namespace prism {

std::string join_path(const std::string& dir, const std::string& name) {
    if (!dir.empty() && dir.back() == '/') return dir + name;
    return dir + "/" + name;
}

void make_dirs(const std::string& dir) {
    for (size_t i = 1; i <= dir.size(); i++) {
        if (i < dir.size() && dir[i] != '/') continue;
        std::string part = dir.substr(0, i);
        if (::mkdir(part.c_str(), 0777) == 0 || errno == EEXIST) {
            struct stat st;
            if (::stat(part.c_str(), &st) != 0) throw UserError(part + ": cannot stat: " + std::strerror(errno));
            if (!S_ISDIR(st.st_mode)) throw UserError(part + ": exists and is not a directory");
            continue;
        }
        throw UserError(part + ": cannot create directory: " + std::strerror(errno));
    }
}

std::string dir_of(const std::string& path) {
    const size_t slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    if (slash == 0) return "/";
    return path.substr(0, slash);
}

bool same_file(const std::string& a, const std::string& b) {
    struct stat x, y;
    return ::stat(a.c_str(), &x) == 0 && ::stat(b.c_str(), &y) == 0 && x.st_dev == y.st_dev && x.st_ino == y.st_ino;
}

void write_file_atomic(const std::string& path, const std::vector<Bytes>& parts) {
    const std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw UserError(path + ": cannot write " + tmp + ": " + std::strerror(errno));
    bool ok = true;
    for (const Bytes& p : parts) ok = ok && std::fwrite(p.data, 1, p.size, f) == p.size;
    ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
    int err = errno;
    if (std::fclose(f) != 0 && ok) ok = false, err = errno;
    if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) ok = false, err = errno;
    if (!ok) {
        std::remove(tmp.c_str());  // best effort: the error being reported is the useful one
        throw UserError(path + ": write failed: " + std::strerror(err));
    }
    // The rename survives a power loss only once the directory is synced
    // (some file systems cannot sync a directory: EINVAL).
    const std::string dir = dir_of(path);
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    const bool synced = fd >= 0 && (::fsync(fd) == 0 || errno == EINVAL);
    err = errno;
    if (fd >= 0) ::close(fd);
    if (!synced) throw UserError(dir + ": cannot sync the directory after writing " + path + ": " + std::strerror(err));
}

void write_file_atomic(const std::string& path, const std::string& text) {
    write_file_atomic(path, {{text.data(), text.size()}});
}

int open_regular_file(const std::string& path, const std::string& context, uint64_t* size) {
    // O_NONBLOCK makes open() return at once on a FIFO; it is cleared again
    // for the regular file, whose reads should not see it (FUSE passes open
    // flags on to its daemon).
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        throw UserError(path + ": cannot open: " + std::strerror(errno) + context +
                        (errno == EMFILE ? " (raise the limit on open files: ulimit -n)" : ""));
    struct stat st = {};
    std::string problem;
    if (::fstat(fd, &st) != 0) problem = std::string("cannot stat: ") + std::strerror(errno);
    else if (S_ISDIR(st.st_mode)) problem = "is a directory, not a regular file";
    else if (!S_ISREG(st.st_mode)) problem = "not a regular file";
    else if (::fcntl(fd, F_SETFL, 0) != 0) problem = std::string("cannot clear O_NONBLOCK: ") + std::strerror(errno);
    if (!problem.empty()) {
        ::close(fd);
        throw UserError(path + ": " + problem + context);
    }
    *size = uint64_t(st.st_size);
    return fd;
}

std::string printable(const std::string& s, size_t max_len) {
    std::string out;
    for (size_t i = 0; i < s.size() && i < max_len; i++) {
        unsigned char ch = (unsigned char)s[i];
        out += (ch < 0x20 || ch == 0x7f) ? '?' : char(ch);
    }
    if (s.size() > max_len) out += "...";
    return out;
}

void progress(const std::string& line) {
    if (std::printf("%s\n", line.c_str()) < 0 || std::fflush(stdout) != 0)
        throw UserError("stdout: write failed: " + std::string(std::strerror(errno)));
}

}  // namespace prism
