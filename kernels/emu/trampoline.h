// Calls a kernel with its arguments given as `void**` (the CUDA launch convention): argument i
// is read from the object args[i] points to, with the kernel's own parameter type.
#pragma once

#include <cstring>
#include <utility>

struct ApparateEmuKernel {
    const char* name;
    void (*entry)(void**);
};

template <typename F, F f>
struct ApparateEmuTrampoline;

template <typename... A, void (*f)(A...)>
struct ApparateEmuTrampoline<void (*)(A...), f> {
    template <size_t... I>
    static void call(void** args, std::index_sequence<I...>) {
        f(*static_cast<std::decay_t<A>*>(args[I])...);
    }
    static void entry(void** args) { call(args, std::index_sequence_for<A...>{}); }
};

#define APPARATE_EMU_ENTRY(k) \
    ApparateEmuKernel { #k, &ApparateEmuTrampoline<decltype(&k), &k>::entry }

// Defined in the generated registry (build.rs).
void (*apparate_emu_find(const char* name))(void**);
