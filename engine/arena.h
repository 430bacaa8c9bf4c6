// Arenas: a few large allocations, sized once from the config and carved into
// tensors. Carving runs twice: once with no memory to measure, once for real.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace prism {

struct Arena {
    std::string name;
    // True where the code reads the zeros allocate() leaves (AdamW's moments
    // start at zero). Elsewhere every element is written before it is read,
    // and PRISM_POISON_ARENAS=1 (the tests set it) fills the arena with 0xff
    // bytes instead, NaN as fp32 and bf16, so that a read of an element no
    // op wrote shows up as a non-finite result rather than a plausible zero.
    bool starts_zeroed = false;
    char* base = nullptr;   // null while measuring
    size_t capacity = 0;
    size_t used = 0;

    // Next `count` elements of type T, 64-byte aligned.
    template <class T>
    T* take(size_t count) {
        used = (used + 63) & ~size_t(63);
        T* p = reinterpret_cast<T*>(base ? base + used : nullptr);
        used += count * sizeof(T);
        if (base && used > capacity) overflow();
        return p;
    }
    // Allocates `used` bytes, zeroed (or poisoned, see starts_zeroed): host
    // memory, or GPU memory when on_device. Throws UserError naming the
    // arena, the bytes it wanted and (GPU) the device's free bytes when the
    // allocation fails.
    void allocate(bool on_device = false);
    bool on_device = false;
    void release();
    void rewind() { used = 0; }
    [[noreturn]] void overflow() const;
};

// "12.3 MiB"
std::string format_bytes(size_t bytes);

}  // namespace prism
