// CUDA's block model on the CPU, for logic tests of block-level kernels without a GPU: each
// launch runs its CTAs one after another, one std::thread per CUDA thread; __syncthreads is a
// barrier and __shared__ storage is static (one CTA runs at a time).  Warp intrinsics,
// clusters and grid dependencies are not emulated: kernels using them do not compile here.
#pragma once
#include <atomic>
#include <barrier>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim3 threadIdx;
inline EmuDim3 blockIdx, gridDim, blockDim;
inline std::barrier<>* emu_barrier = nullptr;

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
#define __device__
#define __global__
#define __forceinline__
#define __restrict__
#define __shared__ static
#define __launch_bounds__(...)

struct float4 { float x, y, z, w; };
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, sizeof u); return u; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// Calls kernel k with its arguments read from slots, as cuLaunchKernel's kernelParams.
template <typename... A, std::size_t... I>
void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<A*>(args[I])...);
}

template <typename... A>
void emu_launch(void (*k)(A...), unsigned gx, unsigned gy, unsigned nt, void** args) {
    gridDim = {gx, gy, 1};
    blockDim = {nt, 1, 1};
    std::barrier<> bar(nt);
    emu_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; t++)
        threads.emplace_back([=, &bar] {
            threadIdx = {t, 0, 0};
            for (unsigned by = 0; by < gy; by++)
                for (unsigned bx = 0; bx < gx; bx++) {
                    if (t == 0) blockIdx = {bx, by, 0};
                    bar.arrive_and_wait();  // the CTA starts once every thread sees its index
                    emu_call(k, args, std::index_sequence_for<A...>{});
                    bar.arrive_and_wait();  // and ends before the next one starts
                }
        });
    for (auto& t : threads) t.join();
}

// extern "C" entry run_<kernel>(gx, gy, threads, args) for ctypes.
#define EMU_EXPORT(kernel)                                                                    \
    extern "C" void run_##kernel(unsigned gx, unsigned gy, unsigned nt, void** args) {        \
        emu_launch(kernel, gx, gy, nt, args);                                                 \
    }
