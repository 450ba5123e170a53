// CUDA's execution model on the CPU, for logic tests of kernels without a GPU: each launch runs
// its CTAs one after another, one std::thread per CUDA thread.  __syncthreads is a barrier,
// __shared__ storage is static (one CTA runs at a time), warp collectives meet at a per-warp
// rendezvous of the lanes in their mask, and float arithmetic flushes subnormals to zero (as
// the GPU runs).  Inline PTX is rewritten by cuda_emu.py; clusters of more than one CTA are
// not emulated.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#include <xmmintrin.h>

struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim3 threadIdx;
inline EmuDim3 blockIdx, gridDim, blockDim;
inline std::barrier<>* emu_barrier = nullptr;
inline std::vector<unsigned char> emu_dynamic_smem;

#define __device__
#define __global__
#define __forceinline__
#define __noinline__
#define __restrict__
#define __shared__ static
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __align__(n) __attribute__((aligned(n)))

[[noreturn]] inline void emu_unsupported(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s is not emulated\n", what);
    std::abort();
}

template <typename To, typename From>
inline To emu_bits(From v) { static_assert(sizeof(To) == sizeof(From)); To t; std::memcpy(&t, &v, sizeof t); return t; }
inline unsigned __float_as_uint(float f) { return emu_bits<unsigned>(f); }
inline int __float_as_int(float f) { return emu_bits<int>(f); }
inline float __int_as_float(int i) { return emu_bits<float>(i); }
inline float __uint_as_float(unsigned u) { return emu_bits<float>(u); }
inline double __longlong_as_double(long long i) { return emu_bits<double>(i); }
inline float __fadd_rn(float a, float b) { return a + b; }  // built with -ffp-contract=off
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __expf(float x) { return std::exp(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
// Shared-memory "addresses" for the cluster loads: a handle a pointer (a cluster of one CTA
// maps every address to its own shared memory).
inline std::mutex emu_window_mu;
inline std::vector<const void*> emu_window;
inline unsigned __cvta_generic_to_shared(const void* p) {
    std::lock_guard<std::mutex> lock(emu_window_mu);
    const auto at = std::find(emu_window.begin(), emu_window.end(), p);
    if (at != emu_window.end()) return static_cast<unsigned>(at - emu_window.begin());
    emu_window.push_back(p);
    return static_cast<unsigned>(emu_window.size() - 1);
}
inline unsigned emu_map(unsigned handle, unsigned rank) {
    if (rank != 0) emu_unsupported("a cluster of more than one CTA");
    return handle;
}
template <typename T>
inline T emu_ld_shared(unsigned handle) {
    std::lock_guard<std::mutex> lock(emu_window_mu);
    return *static_cast<const T*>(emu_window[handle]);
}
using std::isfinite;
using std::isnan;

#define EMU_MINMAX(T)                                          \
    inline T min(T a, T b) { return a < b ? a : b; }           \
    inline T max(T a, T b) { return a > b ? a : b; }
EMU_MINMAX(int)
EMU_MINMAX(unsigned)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)

template <typename T>
inline T atomicAdd(T* p, std::type_identity_t<T> v) { return std::atomic_ref<T>(*p).fetch_add(v); }

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

template <typename T>
T* emu_dynamic_shared() { return reinterpret_cast<T*>(emu_dynamic_smem.data()); }

// ---- warps: the lanes named in a collective's mask meet, exchange one slot each, and go on.
struct EmuWarp {
    std::mutex mu;
    std::condition_variable cv;
    unsigned arrived = 0, generation = 0;
    unsigned long long slot[32];
};
inline std::vector<std::unique_ptr<EmuWarp>> emu_warps;
inline unsigned emu_lane() { return threadIdx.x % 32; }

inline void emu_warp_meet(EmuWarp& w, unsigned mask) {
    std::unique_lock<std::mutex> lock(w.mu);
    const unsigned generation = w.generation;
    if (++w.arrived == static_cast<unsigned>(__builtin_popcount(mask))) {
        w.arrived = 0;
        w.generation++;
        w.cv.notify_all();
    } else if (!w.cv.wait_for(lock, std::chrono::seconds(30), [&] { return w.generation != generation; })) {
        emu_unsupported("a warp collective that not every lane of its mask reached (divergence)");
    }
}

// Every lane of `mask` offers `v`; returns all 32 slots (lanes outside the mask: stale).
template <typename T>
inline void emu_warp_offer(unsigned mask, T v, unsigned long long (&out)[32]) {
    static_assert(sizeof(T) <= sizeof(unsigned long long));
    EmuWarp& w = *emu_warps[threadIdx.x / 32];
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    w.slot[emu_lane()] = bits;
    emu_warp_meet(w, mask);
    std::memcpy(out, w.slot, sizeof out);
    emu_warp_meet(w, mask);  // nobody overwrites a slot before every lane has read them
}

template <typename T>
inline T emu_from_slot(unsigned long long bits) { T t; std::memcpy(&t, &bits, sizeof t); return t; }

template <typename T>
inline T emu_shfl(unsigned mask, T v, unsigned src, int width) {
    unsigned long long s[32];
    emu_warp_offer(mask, v, s);
    const unsigned base = emu_lane() & ~static_cast<unsigned>(width - 1);
    return ((mask >> (base + src)) & 1u) ? emu_from_slot<T>(s[base + src]) : v;
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return emu_shfl(mask, v, static_cast<unsigned>(src) % width, width); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu_shfl(mask, v, (emu_lane() % width) ^ lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned l = emu_lane() % width;
    return emu_shfl(mask, v, l >= delta ? l - delta : l, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned l = emu_lane() % width;
    return emu_shfl(mask, v, l + delta < static_cast<unsigned>(width) ? l + delta : l, width);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned long long s[32];
    emu_warp_offer(mask, pred ? 1u : 0u, s);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; l++)
        if (((mask >> l) & 1u) && s[l]) r |= 1u << l;
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
    unsigned long long s[32];
    emu_warp_offer(mask, v, s);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; l++)
        if (((mask >> l) & 1u) && emu_from_slot<T>(s[l]) == v) r |= 1u << l;
    return r;
}

template <typename T, typename Op>
T emu_reduce(unsigned mask, T v, Op op) {
    unsigned long long s[32];
    emu_warp_offer(mask, v, s);
    bool first = true;
    T r{};
    for (unsigned l = 0; l < 32; l++)
        if ((mask >> l) & 1u) {
            const T x = emu_from_slot<T>(s[l]);
            r = first ? x : op(r, x);
            first = false;
        }
    return r;
}
#define EMU_REDUCE(name, op)                                                                        \
    inline unsigned name(unsigned mask, unsigned v) { return emu_reduce(mask, v, [](unsigned a, unsigned b) { return op; }); } \
    inline int name(unsigned mask, int v) { return emu_reduce(mask, v, [](int a, int b) { return op; }); }
EMU_REDUCE(__reduce_add_sync, a + b)
EMU_REDUCE(__reduce_min_sync, a < b ? a : b)
EMU_REDUCE(__reduce_max_sync, a > b ? a : b)
EMU_REDUCE(__reduce_or_sync, a | b)

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline std::atomic<int> emu_block_or{0};
inline int __syncthreads_or(int pred) {
    emu_barrier->arrive_and_wait();
    if (pred) emu_block_or.fetch_or(1);
    emu_barrier->arrive_and_wait();
    const int r = emu_block_or.load();
    emu_barrier->arrive_and_wait();
    if (threadIdx.x == 0) emu_block_or.store(0);
    emu_barrier->arrive_and_wait();
    return r;
}

// Calls kernel k with its arguments read from slots, as cuLaunchKernel's kernelParams.
template <typename... A, std::size_t... I>
void emu_call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<A*>(args[I])...);
}

template <typename... A>
void emu_launch(void (*k)(A...), unsigned gx, unsigned gy, unsigned nt, unsigned shared_bytes, void** args) {
    gridDim = {gx, gy, 1};
    blockDim = {nt, 1, 1};
    emu_dynamic_smem.assign(shared_bytes + 16, 0);
    std::barrier<> bar(nt);
    emu_barrier = &bar;
    emu_warps.clear();
    for (unsigned w = 0; w < (nt + 31) / 32; w++) emu_warps.push_back(std::make_unique<EmuWarp>());
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; t++)
        threads.emplace_back([=, &bar] {
            threadIdx = {t, 0, 0};
            _mm_setcsr(_mm_getcsr() | 0x8040);  // flush-to-zero and denormals-are-zero, as the GPU runs
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

// extern "C" entry run_<kernel>(gx, gy, threads, dynamic shared bytes, args) for ctypes.
#define EMU_EXPORT(kernel)                                                                           \
    extern "C" void run_##kernel(unsigned gx, unsigned gy, unsigned nt, unsigned shared, void** args) { \
        emu_launch(kernel, gx, gy, nt, shared, args);                                                \
    }
