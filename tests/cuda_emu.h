// CUDA's block model on the CPU, for logic tests of block-level kernels without a GPU: each
// launch runs its CTAs one after another, one std::thread per CUDA thread; __syncthreads is a
// barrier and __shared__ storage is static (one CTA runs at a time).  Of the warp intrinsics
// only a full-warp __shfl_down_sync is here; clusters, grid dependencies and inline PTX are
// not emulated: kernels using them do not compile here.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
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
template <typename To, typename From>
inline To emu_bits(From v) { static_assert(sizeof(To) == sizeof(From)); To t; std::memcpy(&t, &v, sizeof t); return t; }
inline unsigned __float_as_uint(float f) { return emu_bits<unsigned>(f); }
inline float __int_as_float(int i) { return emu_bits<float>(i); }
inline double __longlong_as_double(long long i) { return emu_bits<double>(i); }

// A warp's exchange: one slot a lane, and a barrier of its 32 threads around each shuffle.
struct EmuWarp {
    std::barrier<> bar{32};
    unsigned long long slot[32];
};
inline std::vector<std::unique_ptr<EmuWarp>> emu_warps;

template <typename T>
T __shfl_down_sync(unsigned /* full mask only */, T v, unsigned delta) {
    static_assert(sizeof(T) <= sizeof(unsigned long long));
    EmuWarp& w = *emu_warps[threadIdx.x / 32];
    const unsigned lane = threadIdx.x % 32;
    std::memcpy(&w.slot[lane], &v, sizeof v);
    w.bar.arrive_and_wait();
    T r = v;
    if (lane + delta < 32) std::memcpy(&r, &w.slot[lane + delta], sizeof r);
    w.bar.arrive_and_wait();
    return r;
}
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
    emu_warps.clear();
    for (unsigned w = 0; w < nt / 32; w++) emu_warps.push_back(std::make_unique<EmuWarp>());
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
