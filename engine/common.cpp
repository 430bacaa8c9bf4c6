// File-system and output helpers declared in engine/common.h.
#include "engine/common.h"

#include <cerrno>
#include <cstring>

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

void write_file_atomic(const std::string& path, const std::string& text) {
    const std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) throw UserError(path + ": cannot write " + tmp + ": " + std::strerror(errno));
    bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0 &&
              ::fsync(fileno(f)) == 0;
    int err = errno;
    if (std::fclose(f) != 0 && ok) ok = false, err = errno;
    if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) ok = false, err = errno;
    if (!ok) {
        std::remove(tmp.c_str());
        throw UserError(path + ": write failed: " + std::strerror(err));
    }
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
