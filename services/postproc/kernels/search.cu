// Corpus search's row selection (search_cuda.py prepends the sizes as macros).
// Order-preserving unsigned keys of floats; -0 is made +0 first (NumPy ranks them as ties).
__device__ __forceinline__ unsigned llf_key(const float x) {
    const unsigned u = __float_as_uint(x + 0.0f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ bool llf_before(unsigned ka, int ra, unsigned kb, int rb) {
    return ka > kb || (ka == kb && ra < rb);
}

// Sorts (key, row) pairs [0, p) by key down, row up; p a power of two.
template <int NT>
__device__ void llf_sort_pairs(unsigned* key, int* row, const int p) {
    for (int k = 2; k <= p; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < p; i += NT) {
                const int o = i ^ j;
                if (o > i) {
                    const bool first = (i & k) == 0;  // this run ends up in order, the other reversed
                    const unsigned ki = key[i], ko = key[o];
                    const int ri = row[i], ro = row[o];
                    if (first ? llf_before(ko, ro, ki, ri) : llf_before(ki, ri, ko, ro)) {
                        key[i] = ko; key[o] = ki; row[i] = ro; row[o] = ri;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// The n values of one selection: scores x[0, n) of rows row0 + j (read as float4 where the
// caller says x is 16-byte aligned), or the (key, row) pairs that chunks listed.
struct LlfScores { const float* x; int row0; };
struct LlfPairs { const unsigned* key; const int* row; };

__device__ __forceinline__ unsigned llf_thread_max(const LlfScores in, const bool vec, const int n, const int nt) {
    unsigned best = 0;
    const int n4 = vec ? n >> 2 : 0;
    #pragma unroll 4
    for (int q = threadIdx.x; q < n4; q += nt) {
        const float4 v = ((const float4*)in.x)[q];
        best = max(best, max(max(llf_key(v.x), llf_key(v.y)), max(llf_key(v.z), llf_key(v.w))));
    }
    for (int j = 4 * n4 + threadIdx.x; j < n; j += nt) best = max(best, llf_key(in.x[j]));
    return best;
}

__device__ __forceinline__ unsigned llf_thread_max(const LlfPairs in, bool, const int n, const int nt) {
    unsigned best = 0;
    for (int j = threadIdx.x; j < n; j += nt) best = max(best, in.key[j]);
    return best;
}

__device__ __forceinline__ void llf_list(unsigned* s_key, int* s_row, unsigned* s_cnt, const int cap,
                                         const unsigned k, const int row) {
    const unsigned slot = atomicAdd(s_cnt, 1u);
    if (slot < cap) { s_key[slot] = k; s_row[slot] = row; }
}

__device__ __forceinline__ void llf_list_at_least(const LlfScores in, const bool vec, const int n, const int nt,
                                                  const unsigned bound, unsigned* s_key, int* s_row, unsigned* s_cnt,
                                                  const int cap) {
    const int n4 = vec ? n >> 2 : 0;
    #pragma unroll 4
    for (int q = threadIdx.x; q < n4; q += nt) {
        const float4 v = ((const float4*)in.x)[q];
        const float f[4] = {v.x, v.y, v.z, v.w};
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            const unsigned k = llf_key(f[e]);
            if (k >= bound) llf_list(s_key, s_row, s_cnt, cap, k, in.row0 + 4 * q + e);
        }
    }
    for (int j = 4 * n4 + threadIdx.x; j < n; j += nt) {
        const unsigned k = llf_key(in.x[j]);
        if (k >= bound) llf_list(s_key, s_row, s_cnt, cap, k, in.row0 + j);
    }
}

__device__ __forceinline__ void llf_list_at_least(const LlfPairs in, bool, const int n, const int nt,
                                                  const unsigned bound, unsigned* s_key, int* s_row, unsigned* s_cnt,
                                                  const int cap) {
    for (int j = threadIdx.x; j < n; j += nt) {
        const unsigned k = in.key[j];
        if (k >= bound) llf_list(s_key, s_row, s_cnt, cap, k, in.row[j]);
    }
}

// The m best of n values (m <= NT / 2) in order: rows to out_row[0, m), and keys to out_key
// unless it is null; (0, NO_ROW) past the values there are.  Sets *overflow when more
// values tie at the bound than CAP holds (the outputs are then not written).
template <int NT, int CAP, typename In>
__device__ void llf_select(const In in, const bool vec, const int n, const int m, unsigned* __restrict__ out_key,
                           int* __restrict__ out_row, int* __restrict__ overflow) {
    static_assert(CAP >= NT, "the thread maxima are sorted in the listing's memory");
    __shared__ unsigned s_key[CAP];
    __shared__ int s_row[CAP];
    __shared__ unsigned s_cnt;
    const int tid = threadIdx.x;
    s_key[tid] = llf_thread_max(in, vec, n, NT);
    s_row[tid] = tid;
    if (tid == 0) s_cnt = 0;
    __syncthreads();
    llf_sort_pairs<NT>(s_key, s_row, NT);
    const unsigned bound = s_key[m - 1];
    __syncthreads();
    llf_list_at_least(in, vec, n, NT, bound, s_key, s_row, &s_cnt, CAP);
    __syncthreads();
    const unsigned cnt = s_cnt;
    if (cnt > CAP) {
        if (tid == 0) *overflow = 1;
        return;
    }
    int p = 1;
    while (p < (int)cnt) p <<= 1;
    for (int i = cnt + tid; i < p; i += NT) { s_key[i] = 0u; s_row[i] = NO_ROW; }
    __syncthreads();
    llf_sort_pairs<NT>(s_key, s_row, p);
    for (int i = tid; i < m; i += NT) {
        const bool real = i < (int)cnt;
        out_row[i] = real ? s_row[i] : NO_ROW;
        if (out_key != nullptr) out_key[i] = real ? s_key[i] : 0u;
    }
}

// One CTA a query over its whole score row: rows [queries, m].
extern "C" __global__ void __launch_bounds__(WHOLE_THREADS) llf_row_select(
    const float* __restrict__ scores, const long long ld, const int size, const int m,
    int* __restrict__ out_rows, int* __restrict__ overflow)
{
    const int qi = blockIdx.x;
    const LlfScores in = {scores + qi * ld, 0};
    llf_select<WHOLE_THREADS, WHOLE_CAP>(in, (ld & 3) == 0, size, m, nullptr, out_rows + (long long)qi * m,
                                         overflow + qi);
}

// One CTA a (query, chunk of CHUNK scores): each chunk's m best pairs, [queries, chunks, m].
template <int NT, int CAP>
__device__ __forceinline__ void llf_chunk(const float* __restrict__ scores, const long long ld, const int size,
                                          const int m, unsigned* __restrict__ out_keys, int* __restrict__ out_rows,
                                          int* __restrict__ overflow) {
    const int qi = blockIdx.x, row0 = blockIdx.y * CHUNK;
    const LlfScores in = {scores + qi * ld + row0, row0};
    const long long at = ((long long)qi * gridDim.y + blockIdx.y) * m;
    llf_select<NT, CAP>(in, (ld & 3) == 0, min(CHUNK, size - row0), m, out_keys + at, out_rows + at, overflow + qi);
}

// Two widths: CHUNK_THREADS for m <= CHUNK_THREADS / 2 (more CTAs an SM), WHOLE_THREADS beyond.
#define LLF_CHUNK_KERNEL(name, nt, cap)                                                                   \
    extern "C" __global__ void __launch_bounds__(nt) name(                                               \
        const float* __restrict__ scores, const long long ld, const int size, const int m,               \
        unsigned* __restrict__ out_keys, int* __restrict__ out_rows, int* __restrict__ overflow) {       \
        llf_chunk<nt, cap>(scores, ld, size, m, out_keys, out_rows, overflow);                           \
    }
LLF_CHUNK_KERNEL(llf_chunk_select, CHUNK_THREADS, CHUNK_CAP)
LLF_CHUNK_KERNEL(llf_chunk_select_wide, WHOLE_THREADS, WHOLE_CAP)

// One CTA a query over the n = chunks * m pairs its chunks listed: rows [queries, m].
extern "C" __global__ void __launch_bounds__(WHOLE_THREADS) llf_merge_select(
    const unsigned* __restrict__ keys, const int* __restrict__ rows, const int n, const int m,
    int* __restrict__ out_rows, int* __restrict__ overflow)
{
    const int qi = blockIdx.x;
    const LlfPairs in = {keys + (long long)qi * n, rows + (long long)qi * n};
    llf_select<WHOLE_THREADS, WHOLE_CAP>(in, false, n, m, nullptr, out_rows + (long long)qi * m, overflow + qi);
}
