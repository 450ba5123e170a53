// Sampling kernels (services/postproc/sampling_cuda.py describes them and prepends its sizes
// and the exp_ref constants of services/postproc/sampling.py as macros).
#define NT 512
#define NW (NT / 32)
#define FULL 0xffffffffu
#define MAX_TOP 32
#define CAND_CAP 256
#define NEG_INF __int_as_float(0xff800000)
#define INT_MAX_ 0x7fffffff

// ---- cluster primitives (PTX, as CUTLASS writes them) ------------------------------------
__device__ __forceinline__ unsigned llf_rank() {
    unsigned r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r;
}
__device__ __forceinline__ unsigned llf_nranks() {
    unsigned r; asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r)); return r;
}
__device__ __forceinline__ void llf_cluster_sync() {
    // Also a CTA barrier: every thread of every CTA of the cluster arrives.
    asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned llf_map(const void* p, unsigned rank) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    unsigned r; asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank)); return r;
}
__device__ __forceinline__ double llf_ld_f64(unsigned a) {
    double v; asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(a) : "memory"); return v;
}
__device__ __forceinline__ unsigned llf_ld_u32(unsigned a) {
    unsigned v; asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory"); return v;
}
__device__ __forceinline__ float llf_ld_f32(unsigned a) {
    float v; asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(a) : "memory"); return v;
}
__device__ __forceinline__ float llf_h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short llf_f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}

// ---- the shared definitions of services/postproc/sampling.py -----------------------------
__device__ __forceinline__ float llf_exp_ref(float d) {
    // Only correctly rounded float32 operations (no FMA contraction): NumPy gets the same bits.
    const float t = __fmul_rn(d, __int_as_float(0x3fb8aa3b));  // log2(e)
    if (!(t >= LLF_EXP2_MIN)) return 0.0f;
    const float k = rintf(t);
    const float f = __fsub_rn(t, k);
    float p = LLF_EXP2_C0;
    p = __fadd_rn(__fmul_rn(p, f), LLF_EXP2_C1);
    p = __fadd_rn(__fmul_rn(p, f), LLF_EXP2_C2);
    p = __fadd_rn(__fmul_rn(p, f), LLF_EXP2_C3);
    p = __fadd_rn(__fmul_rn(p, f), LLF_EXP2_C4);
    p = __fadd_rn(__fmul_rn(p, f), LLF_EXP2_C5);
    p = __fadd_rn(__fmul_rn(p, f), LLF_EXP2_C6);
    return __fmul_rn(p, __int_as_float(((int)k + 127) << 23));
}

__device__ __forceinline__ double llf_uniform(unsigned long long seed, unsigned long long draw) {
    unsigned long long z = seed + (draw + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ldexp((double)(z >> 11), -53);
}

__device__ __forceinline__ void llf_better(float& v, int& i, const float v2, const int i2) {
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

__device__ __forceinline__ double llf_warp_sum(double v) {
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(FULL, v, s);
    return v;
}

// Order-preserving unsigned keys of floats (+0 and -0 are made equal at load).
__device__ __forceinline__ unsigned llf_key(const float x) {
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---- per-CTA shared state ------------------------------------------------------------------
// Published words are double-buffered by the parity of the exchange counter: a CTA writes
// slot p for exchange e only after barrier e - 1, which every reader of e - 2 has passed.
__shared__ double s_pubd[2][4];
__shared__ unsigned s_pubu[2][4];
__shared__ unsigned s_hist[2][256];
__shared__ unsigned s_lhist[256];  // CTA-local selections
__shared__ double s_gd[8][4];      // everyone's published doubles after an exchange
__shared__ unsigned s_gu[8][4];
__shared__ unsigned s_gh[256];     // cluster-wide histogram
__shared__ unsigned s_tkey[NT];    // each thread's largest logit, as a key
__shared__ double s_wm[NW];        // per-warp mass
__shared__ double s_wm2[NW];
__shared__ unsigned s_wc[NW];      // per-warp counts
__shared__ unsigned s_wc2[NW];
__shared__ float s_rf[NW];
__shared__ float s_rz[NW];
__shared__ int s_ri[NW];
__shared__ unsigned s_ru[NW];
__shared__ double s_bd[4];         // CTA-wide broadcast
__shared__ unsigned s_bu[4];
__shared__ unsigned s_ckey[2][CAND_CAP];  // this CTA's selection candidates, by exchange parity
__shared__ unsigned s_all[8 * CAND_CAP];  // the cluster's candidates
__shared__ unsigned s_cnt;
__shared__ unsigned s_cand_n;
__shared__ int s_cand_i[MAX_TOP];
__shared__ float s_cand_x[MAX_TOP];

__device__ __forceinline__ void llf_exchange(unsigned& ex, const unsigned C) {
    // Callers wrote s_pubd/s_pubu[ex & 1] (thread 0) before this.
    llf_cluster_sync();
    const int t = threadIdx.x;
    if (t < (int)C * 8) {
        const unsigned c = t >> 3, k = t & 7;
        if (k < 4) s_gd[c][k] = llf_ld_f64(llf_map(&s_pubd[ex & 1][k], c));
        else s_gu[c][k - 4] = llf_ld_u32(llf_map(&s_pubu[ex & 1][k - 4], c));
    }
    __syncthreads();
    ex++;
}

// Warp 0: the digit holding the kk-th largest (1-based) of a 256-bin histogram, into
// s_bu[2], and the count above it, into s_bu[3].  Lane l holds bins 255 - 8l .. 248 - 8l.
__device__ __forceinline__ void llf_find_digit(const unsigned* hist, const unsigned kk) {
    const int lane = threadIdx.x & 31;
    unsigned cnt[8], sum = 0;
    #pragma unroll
    for (int j = 0; j < 8; j++) { cnt[j] = hist[255 - 8 * lane - j]; sum += cnt[j]; }
    unsigned incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned t = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += t;
    }
    unsigned above = incl - sum;
    if (above < kk && kk <= incl) {
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            if (above + cnt[j] >= kk) { s_bu[2] = 255 - 8 * lane - j; s_bu[3] = above; break; }
            above += cnt[j];
        }
    }
}

// One warp-aggregated histogram increment: lanes with the same bin add once (keys of a
// row crowd into a few bins, and same-address shared atomics serialise).  Warp-uniform call.
__device__ __forceinline__ void llf_hist_add(unsigned* hist, const bool take, const unsigned bin) {
    const unsigned peers = __match_any_sync(FULL, take ? bin : 256u);
    if (take && (int)(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
}

// The kk-th largest of this CTA's keys[0..count).
__device__ unsigned llf_cta_select(const unsigned* keys, const int count, unsigned kk) {
    const int tid = threadIdx.x;
    unsigned prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += NT) s_lhist[b] = 0;
        __syncthreads();
        for (int b = 0; b < count; b += NT) {
            const int i = b + tid;
            const unsigned key = i < count ? keys[i] : 0u;
            llf_hist_add(s_lhist, i < count && (key & mask) == prefix, (key >> shift) & 255u);
        }
        __syncthreads();
        if (tid < 32) llf_find_digit(s_lhist, kk);
        __syncthreads();
        kk -= s_bu[3];
        prefix |= s_bu[2] << shift;
        mask |= 255u << shift;
        __syncthreads();  // s_bu and s_lhist are rewritten next round
    }
    return prefix;
}

// The kk-th largest logit key of the row: 4 rounds of 8-bit digits over the cluster.
// Only keys >= lower take part (lower is a bound known to leave at least kk of them),
// which keeps the shared-memory atomics few.
__device__ unsigned llf_radix_select(const float* s_x, const int n, unsigned kk, const unsigned lower,
                                     unsigned& ex, const unsigned C) {
    const int tid = threadIdx.x;
    unsigned prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        unsigned* h = s_hist[ex & 1];
        for (int b = tid; b < 256; b += NT) h[b] = 0;
        __syncthreads();
        for (int b = 0; b < n; b += NT) {
            const int i = b + tid;
            const unsigned key = i < n ? llf_key(s_x[i]) : 0u;
            llf_hist_add(h, i < n && key >= lower && (key & mask) == prefix, (key >> shift) & 255u);
        }
        llf_cluster_sync();
        if (tid < 256) {
            unsigned g = 0;
            for (unsigned c = 0; c < C; c++) g += llf_ld_u32(llf_map(&h[tid], c));
            s_gh[tid] = g;
        }
        __syncthreads();
        if (tid < 32) llf_find_digit(s_gh, kk);
        __syncthreads();
        kk -= s_bu[3];
        prefix |= s_bu[2] << shift;
        mask |= 255u << shift;
        ex++;
    }
    return prefix;
}

// Warp ranges: warp w owns [w R, (w + 1) R) of the slice, so a warp scans in vocabulary order.
__device__ __forceinline__ int llf_warp_len(const int n) { return ((n + NW - 1) / NW + 31) & ~31; }

// The kk-th largest logit key of the row, given a bound `lower` that leaves at least kk keys
// above it.  Usually few keys pass the bound: each CTA lists its own, one exchange makes
// every list visible, and each CTA selects from all of them locally.  When a list
// overflows, the cluster-wide radix select does it in four exchanges instead.
__device__ unsigned llf_select(const float* s_x, const int n, const unsigned kk, const unsigned lower, unsigned& ex,
                               const unsigned C) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int R = llf_warp_len(n), begin = warp * R, end = min(begin + R, n);
    unsigned* mine = s_ckey[ex & 1];
    if (tid == 0) s_cnt = 0;
    __syncthreads();
    for (int b = begin; b < end; b += 32) {
        const int i = b + lane;
        const unsigned key = i < end ? llf_key(s_x[i]) : 0u;
        const bool take = i < end && key >= lower;
        const unsigned hits = __ballot_sync(FULL, take);
        if (!hits) continue;
        unsigned first = 0;
        if (lane == 0) first = atomicAdd(&s_cnt, __popc(hits));
        first = __shfl_sync(FULL, first, 0);
        const unsigned slot = first + __popc(hits & ((1u << lane) - 1u));
        if (take && slot < CAND_CAP) mine[slot] = key;
    }
    __syncthreads();
    if (tid == 0) s_pubu[ex & 1][0] = s_cnt;
    const unsigned parity = ex & 1;
    llf_exchange(ex, C);
    unsigned total = 0;
    bool overflow = false;
    for (unsigned c = 0; c < C; c++) {
        total += s_gu[c][0];
        overflow |= s_gu[c][0] > CAND_CAP;
    }
    if (overflow) return llf_radix_select(s_x, n, kk, lower, ex, C);
    for (unsigned j = tid; j < total; j += NT) {
        unsigned c = 0, at = j;
        while (at >= s_gu[c][0]) { at -= s_gu[c][0]; c++; }
        s_all[j] = llf_ld_u32(llf_map(&s_ckey[parity][at], c));
    }
    __syncthreads();
    return llf_cta_select(s_all, (int)total, kk);
}

// How the weights of a row are read: either stored (s holds exact weights, every token in
// the top-k set) or computed from the logits for the top-k set {key >= tau_k} only.
struct LlfWeights {
    const float* s;
    bool stored;
    unsigned tau_k;
    float m, inv_t;
    __device__ __forceinline__ float top_set(const int i) const {  // 0 outside the top-k set
        if (stored) return s[i];
        const float x = s[i];
        if (llf_key(x) < tau_k) return 0.0f;
        return llf_exp_ref(__fmul_rn(__fsub_rn(x, m), inv_t));
    }
};

// The draw set: top-k set, w >= min_p, and w > piv when strict.
__device__ __forceinline__ float llf_in_draw_set(const float w, const float min_p, const float piv, const bool strict) {
    return (w >= min_p && (!strict || w > piv)) ? w : 0.0f;
}

// Mass of the draw set per warp (into s_wm) and of the whole top-k set (s_wm2); publishes
// the CTA's two masses.
__device__ void llf_mass_pass(const LlfWeights& W, const int n, const float min_p, const float piv, const bool strict,
                              unsigned& ex, const unsigned C) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int R = llf_warp_len(n), begin = warp * R, end = min(begin + R, n);
    float acc = 0.0f, acc2 = 0.0f;
    for (int i = begin + lane; i < end; i += 32) {
        const float w = W.top_set(i);
        acc += llf_in_draw_set(w, min_p, piv, strict);
        acc2 += w;
    }
    const double a = llf_warp_sum((double)acc), a2 = llf_warp_sum((double)acc2);
    if (lane == 0) { s_wm[warp] = a; s_wm2[warp] = a2; }
    __syncthreads();
    if (tid == 0) {
        double m = 0.0, m2 = 0.0;
        for (int w = 0; w < NW; w++) { m += s_wm[w]; m2 += s_wm2[w]; }
        s_pubd[ex & 1][0] = m;
        s_pubd[ex & 1][1] = m2;
    }
    llf_exchange(ex, C);
}

// Inverse CDF after llf_mass_pass: the first element (vocabulary order) of the draw set
// whose cumulative mass exceeds u * total.  Returns (index, weight) to all CTAs.
__device__ void llf_draw(const LlfWeights& W, const int n, const long long lo, const float min_p, const float piv,
                         const bool strict, const double u, const unsigned rank, unsigned& ex, const unsigned C,
                         int& out_idx, float& out_w) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) {
        double total = 0.0;
        for (unsigned c = 0; c < C; c++) total += s_gd[c][0];
        double t = u * total, run = 0.0;
        unsigned owner = C, last = 0;
        for (unsigned c = 0; c < C; c++) {
            const double m = s_gd[c][0];
            if (m > 0.0) {
                last = c;
                if (owner == C && run + m > t) { owner = c; t -= run; }
            }
            run += m;
        }
        if (owner == C) {  // rounding overshoot: the last CTA with mass, at its end
            owner = last;
            t = s_gd[last][0];
        }
        s_bu[0] = owner;
        s_bd[0] = t;
    }
    __syncthreads();
    const unsigned owner = s_bu[0];
    if (rank == owner) {
        if (tid == 0) {
            double t = s_bd[0], run = 0.0;
            int w_owner = -1, w_last = 0;
            for (int w = 0; w < NW; w++) {
                const double m = s_wm[w];
                if (m > 0.0) {
                    w_last = w;
                    if (w_owner < 0 && run + m > t) { w_owner = w; t -= run; }
                }
                run += m;
            }
            if (w_owner < 0) { w_owner = w_last; t = s_wm[w_last]; }
            s_bu[1] = (unsigned)w_owner;
            s_bd[1] = t;
        }
        __syncthreads();
        if (warp == (int)s_bu[1]) {
            const double t = s_bd[1];
            const int R = llf_warp_len(n), begin = warp * R, end = min(begin + R, n);
            double run = 0.0;
            int found = -1, last_pos = -1;
            float found_w = 0.0f, last_w = 0.0f;
            for (int base = begin; base < end; base += 32) {
                const int i = base + lane;
                const float v = i < end ? llf_in_draw_set(W.top_set(i), min_p, piv, strict) : 0.0f;
                const unsigned nz = __ballot_sync(FULL, v > 0.0f);
                if (!nz) continue;
                float incl = v;  // float scan within 32 elements, double across steps
                for (int o = 1; o < 32; o <<= 1) {
                    const float y = __shfl_up_sync(FULL, incl, o);
                    if (lane >= o) incl += y;
                }
                const unsigned hit = __ballot_sync(FULL, v > 0.0f && run + (double)incl > t);
                const int last_lane = 31 - __clz(nz);
                last_pos = base + last_lane;
                last_w = __shfl_sync(FULL, v, last_lane);
                if (hit) {
                    const int first = __ffs(hit) - 1;
                    found = base + first;
                    found_w = __shfl_sync(FULL, v, first);
                    break;
                }
                run += (double)__shfl_sync(FULL, incl, 31);
            }
            if (lane == 0) {
                s_bu[2] = (unsigned)(found >= 0 ? found : last_pos);
                s_bd[2] = (double)(found >= 0 ? found_w : last_w);
            }
        }
        __syncthreads();
        if (tid == 0) {
            s_pubu[ex & 1][0] = (unsigned)(lo + (int)s_bu[2]);
            s_pubd[ex & 1][0] = s_bd[2];
        }
    }
    llf_exchange(ex, C);
    out_idx = (int)s_gu[owner][0];
    out_w = (float)s_gd[owner][0];
}

__device__ __forceinline__ float llf_logit(const void* logits, const int is_half, const long long at) {
    return is_half ? llf_h2f(((const unsigned short*)logits)[at]) : ((const float*)logits)[at];
}

// Keeps x in shared memory and folds it into this thread's max, first argmax and
// softmax sum (relative to the running max, rescaled when the max moves).
__device__ __forceinline__ void llf_take(float* s_x, const int i, float x, const long long lo, const float inv_t,
                                         float& tm, int& ti, float& tz, unsigned& bad) {
    x = x + 0.0f;  // -0 -> +0 (and subnormals -> 0 under flush-to-zero)
    s_x[i] = x;
    bad |= !(fabsf(x) <= 3.402823466e38f);
    if (x > tm) {
        tz = tz * __expf((tm - x) * inv_t) + 1.0f;
        tm = x;
        ti = (int)(lo + i);
    } else {
        tz += __expf((x - tm) * inv_t);
    }
}

// (m, i, z) of two parts merged: max, first argmax, and the sum rescaled to the new max.
__device__ __forceinline__ void llf_merge(float& m, int& i, float& z, const float m2, const int i2, const float z2,
                                          const float inv_t) {
    const float mm = fmaxf(m, m2);
    const float a = m == NEG_INF ? 0.0f : z * __expf((m - mm) * inv_t);
    const float b = m2 == NEG_INF ? 0.0f : z2 * __expf((m2 - mm) * inv_t);
    if (m2 > m || (m2 == m && i2 < i)) i = i2;
    m = mm;
    z = a + b;
}

__device__ __forceinline__ int llf_n_top(const int* __restrict__ n_top_arr, const long long row, const long long vocab,
                                         const int top_stride) {
    return min(n_top_arr[row], min(MAX_TOP, (int)min(vocab, (long long)top_stride)));
}

// (m, i, z) of the whole warp, in every lane.
__device__ __forceinline__ void llf_warp_merge(float& m, int& i, float& z, const float inv_t) {
    for (int s = 16; s > 0; s >>= 1) {
        const float m2 = __shfl_xor_sync(FULL, m, s);
        const int i2 = __shfl_xor_sync(FULL, i, s);
        const float z2 = __shfl_xor_sync(FULL, z, s);
        llf_merge(m, i, z, m2, i2, z2, inv_t);
    }
}

__device__ void llf_sample_body(
    const void* __restrict__ logits, const int is_half, const long long vocab, const int slice, const long long row,
    const float* __restrict__ inv_t_arr, const int* __restrict__ top_k_arr, const float* __restrict__ top_p_arr,
    const float* __restrict__ min_p_arr, const unsigned long long* __restrict__ seed_arr,
    const int* __restrict__ n_top_arr, int* __restrict__ out_token, float* __restrict__ out_logprob,
    int* __restrict__ out_top_ids, float* __restrict__ out_top_lp, const int top_stride)
{
    extern __shared__ float s_x[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned C = llf_nranks(), rank = llf_rank();
    const long long lo = (long long)rank * slice;
    const int n = (int)max(0LL, min((long long)slice, vocab - lo));
    const long long base = row * vocab;
    unsigned ex = 0;

    const float inv_t_row = inv_t_arr[row];
    const bool greedy = !(inv_t_row > 0.0f);
    const float inv_t = greedy ? 1.0f : inv_t_row;
    const int top_k = greedy ? 0 : top_k_arr[row];
    const int n_top = llf_n_top(n_top_arr, row, vocab, top_stride);

    // 1. One read of the slice into shared memory: max, first argmax, softmax sum, finite check.
    float tm = NEG_INF, tz = 0.0f;
    int ti = INT_MAX_;
    unsigned bad = 0;
    if (is_half) {
        const unsigned short* src = (const unsigned short*)logits + base + lo;
        int done = 0;
        if ((vocab & 7) == 0) {
            const uint4* s8 = (const uint4*)src;
            const int n8 = n >> 3;
            #pragma unroll 4
            for (int q = tid; q < n8; q += NT) {
                const uint4 u = s8[q];
                const unsigned words[4] = {u.x, u.y, u.z, u.w};
                #pragma unroll
                for (int j = 0; j < 4; j++) {
                    llf_take(s_x, 8 * q + 2 * j, llf_h2f((unsigned short)(words[j] & 0xffffu)), lo, inv_t, tm, ti, tz, bad);
                    llf_take(s_x, 8 * q + 2 * j + 1, llf_h2f((unsigned short)(words[j] >> 16)), lo, inv_t, tm, ti, tz, bad);
                }
            }
            done = n8 << 3;
        }
        for (int i = done + tid; i < n; i += NT) llf_take(s_x, i, llf_h2f(src[i]), lo, inv_t, tm, ti, tz, bad);
    } else {
        const float* src = (const float*)logits + base + lo;
        int done = 0;
        if ((vocab & 3) == 0) {
            const float4* s4 = (const float4*)src;
            const int n4 = n >> 2;
            #pragma unroll 4
            for (int q = tid; q < n4; q += NT) {
                const float4 v = s4[q];
                llf_take(s_x, 4 * q, v.x, lo, inv_t, tm, ti, tz, bad);
                llf_take(s_x, 4 * q + 1, v.y, lo, inv_t, tm, ti, tz, bad);
                llf_take(s_x, 4 * q + 2, v.z, lo, inv_t, tm, ti, tz, bad);
                llf_take(s_x, 4 * q + 3, v.w, lo, inv_t, tm, ti, tz, bad);
            }
            done = n4 << 2;
        }
        for (int i = done + tid; i < n; i += NT) llf_take(s_x, i, src[i], lo, inv_t, tm, ti, tz, bad);
    }
    s_tkey[tid] = llf_key(tm);
    llf_warp_merge(tm, ti, tz, inv_t);
    bad = __reduce_or_sync(FULL, bad);
    if (lane == 0) { s_rf[warp] = tm; s_ri[warp] = ti; s_rz[warp] = tz; s_ru[warp] = bad; }
    __syncthreads();
    // Lower bounds for the selections: the k-th largest thread maximum leaves k logits above it.
    const unsigned lower_k = (top_k > 0 && top_k <= NT) ? llf_cta_select(s_tkey, NT, (unsigned)top_k) : 0u;
    const unsigned lower_n = (n_top > 0) ? llf_cta_select(s_tkey, NT, (unsigned)n_top) : 0u;
    if (tid == 0) {
        for (int w = 1; w < NW; w++) { llf_merge(tm, ti, tz, s_rf[w], s_ri[w], s_rz[w], inv_t); bad |= s_ru[w]; }
        s_pubd[ex & 1][0] = (double)tm;
        s_pubd[ex & 1][1] = (double)tz;
        s_pubu[ex & 1][0] = (unsigned)ti;
        s_pubu[ex & 1][1] = bad;
        s_pubu[ex & 1][2] = lower_k;
        s_pubu[ex & 1][3] = lower_n;
    }
    llf_exchange(ex, C);
    float m = NEG_INF;
    int argmax = INT_MAX_;
    unsigned lk = 0, ln = 0;
    bad = 0;
    for (unsigned c = 0; c < C; c++) {
        const float mc = (float)s_gd[c][0];
        if (mc > m || (mc == m && (int)s_gu[c][0] < argmax)) { m = mc; argmax = (int)s_gu[c][0]; }
        bad |= s_gu[c][1];
        lk = max(lk, s_gu[c][2]);
        ln = max(ln, s_gu[c][3]);
    }
    if (bad) {
        if (rank == 0 && tid == 0) {
            out_token[row] = -1;
            out_logprob[row] = 0.0f;
        }
        if (rank == 0 && tid < top_stride) { out_top_ids[row * top_stride + tid] = -1; out_top_lp[row * top_stride + tid] = 0.0f; }
        llf_cluster_sync();
        return;
    }
    double z_total = 0.0;
    for (unsigned c = 0; c < C; c++) {
        const float mc = (float)s_gd[c][0];
        if (mc != NEG_INF) z_total += s_gd[c][1] * exp((double)(mc - m) * (double)inv_t);
    }
    const double log_z = log(z_total);

    // 2. Top-n logprobs: every logit above the n-th largest, then the lowest-index ties.
    if (n_top > 0) {
        const unsigned tau = llf_select(s_x, n, (unsigned)n_top, ln, ex, C);
        const int R = llf_warp_len(n), begin = warp * R, end = min(begin + R, n);
        unsigned gt = 0, eq = 0;
        for (int i = begin + lane; i < end; i += 32) {
            const unsigned key = llf_key(s_x[i]);
            gt += key > tau;
            eq += key == tau;
        }
        gt = __reduce_add_sync(FULL, gt);
        eq = __reduce_add_sync(FULL, eq);
        if (lane == 0) { s_wc[warp] = gt; s_wc2[warp] = eq; }
        if (tid == 0) s_cand_n = 0;
        __syncthreads();
        if (tid == 0) {
            unsigned g = 0, e = 0;
            for (int w = 0; w < NW; w++) { g += s_wc[w]; e += s_wc2[w]; }
            s_pubu[ex & 1][0] = g;
            s_pubu[ex & 1][1] = e;
        }
        llf_exchange(ex, C);
        unsigned gt_all = 0, eq_before = 0;
        for (unsigned c = 0; c < C; c++) {
            gt_all += s_gu[c][0];
            if (c < rank) eq_before += s_gu[c][1];
        }
        const unsigned need = (unsigned)n_top - gt_all;
        const unsigned take = need > eq_before ? need - eq_before : 0u;
        unsigned eq_run = 0;
        for (int w = 0; w < warp; w++) eq_run += s_wc2[w];
        for (int b = begin; b < end; b += 32) {
            const int i = b + lane;
            const unsigned key = i < end ? llf_key(s_x[i]) : 0u;
            const bool is_eq = i < end && key == tau;
            const unsigned eqs = __ballot_sync(FULL, is_eq);
            const unsigned my_rank = eq_run + __popc(eqs & ((1u << lane) - 1u));
            if ((i < end && key > tau) || (is_eq && my_rank < take)) {
                const unsigned slot = atomicAdd(&s_cand_n, 1u);
                if (slot < MAX_TOP) { s_cand_i[slot] = (int)(lo + i); s_cand_x[slot] = s_x[i]; }
            }
            eq_run += __popc(eqs);
        }
        __syncthreads();
        if (tid == 0) s_pubu[ex & 1][0] = min(s_cand_n, (unsigned)MAX_TOP);
        llf_exchange(ex, C);
        if (rank == 0 && tid == 0) {
            int ids[MAX_TOP];
            float xs[MAX_TOP];
            int k = 0;
            for (unsigned c = 0; c < C; c++) {
                const unsigned cnt = s_gu[c][0];
                for (unsigned j = 0; j < cnt && k < MAX_TOP; j++, k++) {
                    ids[k] = (int)llf_ld_u32(llf_map(&s_cand_i[j], c));
                    xs[k] = llf_ld_f32(llf_map(&s_cand_x[j], c));
                }
            }
            for (int a = 1; a < k; a++) {  // insertion sort: logit down, index up
                const int ia = ids[a];
                const float xa = xs[a];
                int b = a - 1;
                while (b >= 0 && (xs[b] < xa || (xs[b] == xa && ids[b] > ia))) { ids[b + 1] = ids[b]; xs[b + 1] = xs[b]; b--; }
                ids[b + 1] = ia;
                xs[b + 1] = xa;
            }
            for (int j = 0; j < top_stride; j++) {
                const bool has = j < k && j < n_top;
                out_top_ids[row * top_stride + j] = has ? ids[j] : -1;
                out_top_lp[row * top_stride + j] =
                    has ? (float)((double)__fmul_rn(__fsub_rn(xs[j], m), inv_t) - log_z) : 0.0f;
            }
        }
    } else if (rank == 0 && tid < top_stride) {
        out_top_ids[row * top_stride + tid] = -1;
        out_top_lp[row * top_stride + tid] = 0.0f;
    }

    // 3. Top-k set, then draws until one passes top-p.
    int token = argmax;
    if (!greedy) {
        LlfWeights W;
        W.s = s_x;
        W.m = m;
        W.inv_t = inv_t;
        W.stored = top_k == 0;
        W.tau_k = 0u;
        if (top_k > 0) {
            W.tau_k = llf_select(s_x, n, (unsigned)top_k, lk, ex, C);
        } else {
            // Every token is in play: compute the exact weights once, in place.
            for (int i = tid; i < n; i += NT) s_x[i] = llf_exp_ref(__fmul_rn(__fsub_rn(s_x[i], m), inv_t));
            __syncthreads();
        }
        const float top_p = top_p_arr[row];
        const float min_p = min_p_arr[row];
        const unsigned long long seed = seed_arr[row];
        llf_mass_pass(W, n, min_p, 0.0f, false, ex, C);
        double z_k = 0.0;
        for (unsigned c = 0; c < C; c++) z_k += s_gd[c][1];
        const double limit = (double)top_p * z_k;
        float piv = 0.0f;
        bool strict = false;
        for (unsigned long long draw = 0;; draw++) {
            float w_j;
            llf_draw(W, n, lo, min_p, piv, strict, llf_uniform(seed, draw), rank, ex, C, token, w_j);
            if (top_p >= 1.0f) break;
            piv = w_j;
            strict = true;
            llf_mass_pass(W, n, min_p, piv, true, ex, C);
            double above = 0.0;
            for (unsigned c = 0; c < C; c++) above += s_gd[c][0];
            if (above < limit) break;
        }
    }
    if (rank == 0 && tid == 0) {
        const float d = __fmul_rn(__fsub_rn(llf_logit(logits, is_half, base + token) + 0.0f, m), inv_t);
        out_token[row] = token;
        out_logprob[row] = (float)((double)d - log_z);
    }
    llf_cluster_sync();  // no CTA leaves while another may still read its shared memory
}

extern "C" __global__ void llf_penalties(
    void* __restrict__ logits, const int is_half, const long long vocab, const int* __restrict__ rows,
    const int* __restrict__ tokens, const int* __restrict__ counts, const int n_entries,
    const float* __restrict__ rep, const float* __restrict__ presence, const float* __restrict__ frequency)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_entries) return;
    const int r = rows[e];
    const long long at = (long long)r * vocab + tokens[e];
    float x = llf_logit(logits, is_half, at);
    const float p = rep[r];
    x = x > 0.0f ? x / p : __fmul_rn(x, p);
    x = __fsub_rn(x, __fadd_rn(__fmul_rn((float)counts[e], frequency[r]), presence[r]));
    if (is_half) ((unsigned short*)logits)[at] = llf_f2h(x);
    else ((float*)logits)[at] = x;
}
// ---- fast path: a streaming scan of every row, then one small CTA per row -------------------
// The fused kernel above chains ~20 dependent steps after its one read of a slice, so a CTA
// spends ~90 % of its life waiting and the GPU never nears its memory bandwidth.  Here the
// pass over the logits does only what streams: each scan CTA reads 8192 logits into
// registers, keeps its max, first argmax and softmax sum, and lists its own `need` largest
// logits and a few more (need = max(top-k, top-n)).  A second kernel, one CTA per row,
// merges the statistics, keeps the listed logits at or above the row's need-th largest
// (ranking all the lists costs quadratic time: 40-90 us at 16-32 slices), and does top-k,
// top-n, top-p, min-p and the draws on those few dozen.  Rows it cannot finish (no top-k,
// top-k over FAST_MAX_K, a list that overflowed: heavy ties) are given back (listed), and the
// fused kernel does them.
#define SNW (SNT / 32)
#define SSLICE (SNT * SV)
#define FCAP 2048             // candidates a finishing CTA holds
#define GATHER_LOADS 8        // loads a finishing thread has in flight in that pass
#define TAU_REGS 8            // candidates a lane of the top-k/top-n searches keeps in registers

// How many of a row's largest logits the fast path needs, or -1 when it cannot do the row.
__device__ __forceinline__ int llf_fast_need(const float inv_t, const int top_k, const int n_top) {
    if (!(inv_t > 0.0f)) return n_top;  // greedy: the argmax comes from the statistics
    if (top_k < 1 || top_k > FAST_MAX_K) return -1;
    return max(top_k, n_top);
}

__device__ __forceinline__ float llf_unkey(const unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Keys in [kmin, kmax] share the bits above the highest bit where kmin and kmax differ: a
// bitwise search among them starts from that prefix (zeros below, at most every key) and
// from that bit (returned; -1 when kmin == kmax), not from bit 31.
__device__ __forceinline__ int llf_key_prefix(const unsigned kmin, const unsigned kmax, unsigned& prefix) {
    const unsigned diff = kmin ^ kmax;
    prefix = diff ? kmin & ~(0xffffffffu >> __clz(diff)) : kmin;
    return diff ? 31 - __clz(diff) : -1;
}

// Warp-uniform: the first of `cnt` consecutive slots for each lane, from one atomicAdd on
// *counter for the whole warp (slots may pass a cap).
__device__ __forceinline__ unsigned llf_warp_slots(unsigned* counter, const unsigned cnt) {
    const int lane = threadIdx.x & 31;
    unsigned incl = cnt;  // inclusive scan of the lanes' counts
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += y;
    }
    unsigned first = 0;
    if (lane == 31 && incl) first = atomicAdd(counter, incl);
    return __shfl_sync(FULL, first, 31) + incl - cnt;
}

// A scan thread's SV logits of slice [lo, lo + n) of a row, straight from device memory.
__device__ __forceinline__ void llf_scan_load(float (&v)[SV], const void* __restrict__ logits, const int is_half,
                                              const long long vocab, const long long row, const long long lo,
                                              const int n) {
    const int tid = threadIdx.x;
    if (is_half) {
        const unsigned short* src = (const unsigned short*)logits + row * vocab + lo;
        const bool vec = (vocab & 7) == 0;
        #pragma unroll
        for (int j = 0; j < SV / 8; j++) {
            const int i0 = 8 * (j * SNT + tid);
            if (vec && i0 + 8 <= n) {
                const uint4 u = ((const uint4*)src)[j * SNT + tid];
                const unsigned words[4] = {u.x, u.y, u.z, u.w};
                #pragma unroll
                for (int e = 0; e < 4; e++) {
                    v[8 * j + 2 * e] = llf_h2f((unsigned short)(words[e] & 0xffffu));
                    v[8 * j + 2 * e + 1] = llf_h2f((unsigned short)(words[e] >> 16));
                }
            } else {
                #pragma unroll
                for (int e = 0; e < 8; e++) v[8 * j + e] = i0 + e < n ? llf_h2f(src[i0 + e]) : NEG_INF;
            }
        }
    } else {
        const float* src = (const float*)logits + row * vocab + lo;
        const bool vec = (vocab & 3) == 0;
        #pragma unroll
        for (int j = 0; j < SV / 4; j++) {
            const int i0 = 4 * (j * SNT + tid);
            if (vec && i0 + 4 <= n) {
                const float4 f = ((const float4*)src)[j * SNT + tid];
                v[4 * j] = f.x; v[4 * j + 1] = f.y; v[4 * j + 2] = f.z; v[4 * j + 3] = f.w;
            } else {
                #pragma unroll
                for (int e = 0; e < 4; e++) v[4 * j + e] = i0 + e < n ? src[i0 + e] : NEG_INF;
            }
        }
    }
}

// Position in the slice of register k of this thread: 16-byte vectors (4 floats or 8
// halves) strided by the CTA, so each load instruction of a warp reads 512 contiguous bytes.
template <bool HALF>
__device__ __forceinline__ int llf_scan_pos(const int k) {
    const int t = threadIdx.x;
    return HALF ? 8 * ((k >> 3) * SNT + t) + (k & 7) : 4 * ((k >> 2) * SNT + t) + (k & 3);
}

__device__ __forceinline__ float llf_ex2(const float x) {
    float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}

struct LlfScanShared {
    unsigned tk[SNT];  // each thread's largest logit, as a key
    float wz[SNW];
    unsigned wi[SNW];
    unsigned bound, count;
    float4 stash[SNW][SV / 4 * 32];  // each warp's listing lanes' logits, [vector][lane]
};

// The scan of one slice once its logits are in registers.  HALF and WHOLE (all SSLICE
// logits present) are compile-time, so the loops carry no per-logit position checks.  The
// scan is bound by instruction issue more than by memory, so the per-logit work is kept to
// a max, a finite check, an FMA, an EX2, an add and a compare; the argmax is looked up
// afterwards, by the few threads holding the slice max.  After the first barrier every warp
// reads all thread maxima, so the softmax sum is taken against the slice max at once
// (nothing to rescale), while warp 0 searches the bound.
template <bool HALF, bool WHOLE>
__device__ __forceinline__ void llf_scan_body(float (&v)[SV], LlfScanShared& sh, const int n, const long long lo,
                                              const float inv_t, const int need, unsigned* __restrict__ st,
                                              int2* __restrict__ mine)
{
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float tmq[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF};  // four chains, for latency
    bool bad = false;
    #pragma unroll
    for (int k = 0; k < SV; k++) {
        if (WHOLE || llf_scan_pos<HALF>(k) < n) {
            tmq[k & 3] = fmaxf(tmq[k & 3], v[k]);
            bad |= !(fabsf(v[k]) <= 3.402823466e38f);
        }
    }
    // fmaxf skips NaN (flagged bad above); + 0.0f makes a -0 max +0, as the fused kernel does.
    const float tm = fmaxf(fmaxf(tmq[0], tmq[1]), fmaxf(tmq[2], tmq[3])) + 0.0f;
    sh.tk[tid] = llf_key(tm);
    if (tid == 0) sh.count = 0;
    __syncthreads();
    unsigned keys[SNT / 32];
    #pragma unroll
    for (int j = 0; j < SNT / 32; j++) keys[j] = sh.tk[lane * (SNT / 32) + j];
    unsigned kmin = keys[0], kmax = keys[0];
    #pragma unroll
    for (int j = 1; j < SNT / 32; j++) { kmin = min(kmin, keys[j]); kmax = max(kmax, keys[j]); }
    kmax = __reduce_max_sync(FULL, kmax);
    const float m = llf_unkey(kmax);  // the slice max (a key is a bijection of non-NaN floats)
    // A bound with at least `need` thread maxima, hence `need` logits, at or above it: bit by
    // bit, the largest key with `need` maxima at or above it.  The maxima share the bits above
    // their highest differing one, and the search stops SCAN_LOW_BITS short of exact: a
    // smaller bound only lists a few more logits.
    if (warp == 0) {
        kmin = __reduce_min_sync(FULL, kmin);
        unsigned res = 0xffffffffu;  // need == 0: list nothing
        if (need > 0) {
            for (int b = llf_key_prefix(kmin, kmax, res); b >= SCAN_LOW_BITS; b--) {
                const unsigned cand = res | (1u << b);
                unsigned c = 0;
                #pragma unroll
                for (int j = 0; j < SNT / 32; j++) c += keys[j] >= cand;
                if (__reduce_add_sync(FULL, c) >= (unsigned)need) res = cand;
            }
        }
        if (lane == 0) sh.bound = res;
    }
    // The sum against the slice max, one FMA and one EX2 a logit; absent logits are -inf and add 0.
    float tz = 0.0f;
    if (m != NEG_INF) {
        const float c = inv_t * 1.4426950408889634f, off = m * c;
        #pragma unroll
        for (int k = 0; k < SV; k++) tz += llf_ex2(fmaf(v[k], c, -off));
    }
    // The first argmax: the smallest position holding the max, over the CTA (INT_MAX_: none).
    unsigned ti = (unsigned)INT_MAX_;
    if (__any_sync(FULL, tm == m) && tm == m) {  // warp-uniform first, so other warps branch past it
        #pragma unroll
        for (int k = SV - 1; k >= 0; k--)
            if ((WHOLE || llf_scan_pos<HALF>(k) < n) && v[k] == m) ti = (unsigned)(lo + llf_scan_pos<HALF>(k));
    }
    __syncthreads();
    const unsigned bound = sh.bound;
    // As a float: keys up to -inf's (NaN patterns) list every logit present.
    const float bf = bound <= 0x007fffffu ? NEG_INF : llf_unkey(bound);
    if (need > 0 && __any_sync(FULL, tm >= bf || !WHOLE)) {
        // Two instructions a logit: a compare to all-ones or zero, then a masked OR.
        unsigned mask = 0;
        #pragma unroll
        for (int k = 0; k < SV; k++) {
            unsigned ge;
            asm("set.ge.u32.f32 %0, %1, %2;" : "=r"(ge) : "f"(v[k]), "f"(bf));
            if (WHOLE || llf_scan_pos<HALF>(k) < n) mask |= ge & (1u << k);
        }
        unsigned slot = llf_warp_slots(&sh.count, __popc(mask));
        if (mask) {
            // A lane lists its few set bits only, not all SV registers: its logits go to its
            // own shared stash, which it then reads by position (no other lane reads it).
            float4* stash = sh.stash[warp];
            #pragma unroll
            for (int j = 0; j < SV / 4; j++) stash[j * 32 + lane] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
            for (; mask && slot < SCAP; mask &= mask - 1, slot++) {
                const int k = __ffs(mask) - 1;
                const float x = ((const float*)&stash[(k >> 2) * 32 + lane])[k & 3];
                mine[slot] = make_int2((int)(lo + llf_scan_pos<HALF>(k)), __float_as_int(x + 0.0f));
            }
        }
    }
    const unsigned wi = __reduce_min_sync(FULL, ti);
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) tz += __shfl_xor_sync(FULL, tz, o);
    if (lane == 0) { sh.wz[warp] = tz; sh.wi[warp] = wi; }
    // Past its lists and statistics but for thread 0's last stores: once every scan CTA is
    // here, the finishing kernel (a programmatic dependent launch) may start launching; it
    // waits for the scan's end before it reads anything the scan writes.  H100: ~1 us a call,
    // where a trigger at the scan's start let finishing CTAs crowd its last wave (slower).
    asm volatile("griddepcontrol.launch_dependents;");
    const int any_bad = __syncthreads_or(bad);
    if (tid == 0) {
        float z = sh.wz[0];
        unsigned i = sh.wi[0];
        #pragma unroll
        for (int w = 1; w < SNW; w++) { z += sh.wz[w]; i = min(i, sh.wi[w]); }
        st[0] = __float_as_uint(m);
        st[1] = __float_as_uint(z);
        st[2] = i;
        st[3] = (unsigned)any_bad;
        st[4] = sh.count;
        st[5] = bound;
    }
}

// Everything after the loads: statistics, the bound, the list.  Whole-CTA: every thread calls it.
__device__ __forceinline__ void llf_scan_slice(
    float (&v)[SV], const int is_half, const long long vocab, const long long row, const int slice,
    const int slices, const float* __restrict__ inv_t_arr, const int* __restrict__ top_k_arr,
    const int* __restrict__ n_top_arr, const int top_stride, unsigned* __restrict__ stats, int2* __restrict__ cands)
{
    __shared__ LlfScanShared sh;
    const long long lo = (long long)slice * SSLICE;
    const int n = (int)min((long long)SSLICE, vocab - lo);
    const float inv_t_row = inv_t_arr[row];
    const int need = llf_fast_need(inv_t_row, top_k_arr[row], llf_n_top(n_top_arr, row, vocab, top_stride));
    if (need < 0) return;
    const float inv_t = inv_t_row > 0.0f ? inv_t_row : 1.0f;
    unsigned* st = stats + (row * slices + slice) * ST_WORDS;
    int2* mine = cands + (row * slices + slice) * SCAP;
    if (is_half) {
        if (n == SSLICE) llf_scan_body<true, true>(v, sh, n, lo, inv_t, need, st, mine);
        else llf_scan_body<true, false>(v, sh, n, lo, inv_t, need, st, mine);
    } else {
        if (n == SSLICE) llf_scan_body<false, true>(v, sh, n, lo, inv_t, need, st, mine);
        else llf_scan_body<false, false>(v, sh, n, lo, inv_t, need, st, mine);
    }
}

extern "C" __global__ void __launch_bounds__(SNT, SCAN_CTAS) llf_scan(
    const void* __restrict__ logits, const int is_half, const long long vocab, const long long row0,
    const int slices, const float* __restrict__ inv_t_arr, const int* __restrict__ top_k_arr,
    const int* __restrict__ n_top_arr, const int top_stride, unsigned* __restrict__ stats, int2* __restrict__ cands,
    int* __restrict__ given_back)
{
    const long long row = row0 + blockIdx.x / slices;
    const int slice = blockIdx.x % slices;
    const long long lo = (long long)slice * SSLICE;
    if (blockIdx.x == 0 && threadIdx.x == 0) given_back[0] = 0;  // the finishing kernel, next, lists rows there
    float v[SV];
    // The logits are loaded before the row's parameters are looked at, so both reads overlap.
    llf_scan_load(v, logits, is_half, vocab, row, lo, (int)min((long long)SSLICE, vocab - lo));
    llf_scan_slice(v, is_half, vocab, row, slice, slices, inv_t_arr, top_k_arr, n_top_arr, top_stride, stats, cands);
}

// How many of the first nc candidates (keys, indices in shared memory) satisfy pred(key,
// index): four a load, so the loop's shared-memory round trips overlap.
template <typename P>
__device__ __forceinline__ unsigned llf_count_candidates(const unsigned* keys, const int* idx, const unsigned nc,
                                                         const P pred) {
    unsigned n = 0, d = 0;
    #pragma unroll 2
    for (; d + 4 <= nc; d += 4) {
        const uint4 k = *(const uint4*)&keys[d];
        const int4 i = *(const int4*)&idx[d];
        n += (unsigned)pred(k.x, i.x) + (unsigned)pred(k.y, i.y) + (unsigned)pred(k.z, i.z) + (unsigned)pred(k.w, i.w);
    }
    for (; d < nc; d++) n += (unsigned)pred(keys[d], idx[d]);
    return n;
}

// The rank of candidate (kc, ic) among the first nc: larger keys first, then smaller indices.
__device__ __forceinline__ unsigned llf_candidate_rank(const unsigned* keys, const int* idx, const unsigned nc,
                                                       const unsigned kc, const int ic) {
    return llf_count_candidates(keys, idx, nc, [&](const unsigned k, const int i) { return k > kc || (k == kc && i < ic); });
}

// A row for the fused kernel: appended to the list after given_back[0], its length (the scan
// zeroes it; a finishing kernel run again without the scan, as a profiler does, stops at the
// grid's rows).
__device__ __forceinline__ void llf_give_back(int* given_back, const long long row) {
    const int q = atomicAdd(given_back, 1);
    if (q < (int)gridDim.x) given_back[1 + q] = (int)row;
}

extern "C" __global__ void __launch_bounds__(FNT) llf_finish(
    const long long vocab, const long long row0, const int slices, const float* __restrict__ inv_t_arr,
    const int* __restrict__ top_k_arr, const float* __restrict__ top_p_arr, const float* __restrict__ min_p_arr,
    const unsigned long long* __restrict__ seed_arr, const int* __restrict__ n_top_arr,
    const unsigned* __restrict__ stats, const int2* __restrict__ cands, int* __restrict__ out_token,
    float* __restrict__ out_logprob, int* __restrict__ out_top_ids, float* __restrict__ out_top_lp,
    const int top_stride, int* __restrict__ given_back)
{
    __shared__ unsigned s_st[MAX_SLICES][6];
    __shared__ __align__(16) int s_ci[FCAP];  // candidates: vocabulary index, key
    __shared__ __align__(16) unsigned s_ck[FCAP];
    __shared__ int s_ki[FCAP];        // the top-k set in vocabulary order: index, logit, weight
    __shared__ float s_kx[FCAP];
    __shared__ float s_kw[FCAP];
    __shared__ float s_m;
    __shared__ int s_arg;
    __shared__ double s_logz;
    __shared__ unsigned s_lstar, s_flag, s_n, s_nc, s_nk, s_tau[2], s_tau_need, s_hist[FNT], s_rank[FNT];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row = row0 + blockIdx.x;
    // Every global read this CTA needs before its lists is issued here: the parameters, then
    // (past the wait) the slice statistics, whether or not the row turns out to be the fast path's.
    const float inv_t_row = inv_t_arr[row], top_p = top_p_arr[row], min_p = min_p_arr[row];
    const unsigned long long seed = seed_arr[row];
    // Launched as a programmatic dependent of the scan, this kernel starts while the scan's
    // last CTAs finish: the parameters (uploaded before the scan) are read before this wait,
    // everything the scan writes after it.  Launched plainly, the wait returns at once.
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const unsigned* st = stats + row * slices * ST_WORDS;
    unsigned st_words[(MAX_SLICES * 6 + FNT - 1) / FNT];
    #pragma unroll
    for (int j = 0; j < (MAX_SLICES * 6 + FNT - 1) / FNT; j++) {
        const int q = tid + j * FNT;
        st_words[j] = q < slices * 6 ? st[(q / 6) * ST_WORDS + q % 6] : 0u;
    }
    const bool greedy = !(inv_t_row > 0.0f);
    const float inv_t = greedy ? 1.0f : inv_t_row;
    const int top_k = greedy ? 0 : top_k_arr[row];
    const int n_top = llf_n_top(n_top_arr, row, vocab, top_stride);
    if (llf_fast_need(inv_t_row, top_k, n_top) < 0) {
        if (tid == 0) llf_give_back(given_back, row);
        return;
    }
    #pragma unroll
    for (int j = 0; j < (MAX_SLICES * 6 + FNT - 1) / FNT; j++) {
        const int q = tid + j * FNT;
        if (q < slices * 6) s_st[q / 6][q % 6] = st_words[j];
    }
    s_hist[tid] = 0u;
    __syncthreads();
    if (warp == 0) {  // lane l merges slices 2l and 2l + 1 (MAX_SLICES <= 64), then the warp its lanes
        float m = NEG_INF;
        int arg = INT_MAX_;
        unsigned bad = 0, over = 0, lstar = 0;
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const int s = 2 * lane + h;
            if (s < slices) {
                const float mc = __uint_as_float(s_st[s][0]);
                if (mc > m || (mc == m && (int)s_st[s][2] < arg)) { m = mc; arg = (int)s_st[s][2]; }
                bad |= s_st[s][3];
                over |= s_st[s][4] > SCAP;
                lstar = max(lstar, s_st[s][5]);  // every slice holds `need` logits at or above its bound
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(FULL, m, o);
            const int a2 = __shfl_xor_sync(FULL, arg, o);
            if (m2 > m || (m2 == m && a2 < arg)) { m = m2; arg = a2; }
        }
        bad = __reduce_or_sync(FULL, bad);
        over = __reduce_or_sync(FULL, over);
        lstar = __reduce_max_sync(FULL, lstar);
        double z = 0.0;
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const int s = 2 * lane + h;
            const float mc = s < slices ? __uint_as_float(s_st[s][0]) : NEG_INF;
            if (mc != NEG_INF) z += (double)(__uint_as_float(s_st[s][1]) * __expf((mc - m) * inv_t));
        }
        z = llf_warp_sum(z);
        if (lane == 0) {
            s_m = m;
            s_arg = arg;
            s_logz = log(z);
            s_lstar = lstar;
            s_flag = bad ? 1u : over ? 2u : 0u;
            s_n = 0;
            s_nc = 0;
            s_nk = 0;
            s_tau[0] = s_tau[1] = 0u;
        }
    }
    __syncthreads();
    if (s_flag == 1u) {  // NaN or inf: flagged, as the fused kernel does
        if (tid == 0) { out_token[row] = -1; out_logprob[row] = 0.0f; }
        for (int j = tid; j < top_stride; j += FNT) { out_top_ids[row * top_stride + j] = -1; out_top_lp[row * top_stride + j] = 0.0f; }
        return;
    }
    if (s_flag == 2u) {
        if (tid == 0) llf_give_back(given_back, row);
        return;
    }
    // Gather the listed logits at or above the largest bound.  The lists are ~need + a few
    // long: entry j < head of every list is one thread's, and each thread issues all its loads
    // before it keeps any (one round trip to L2, not one per list); the rare entries past the
    // head follow, a warp per list.
    const unsigned lstar = s_lstar;
    const int need = max(top_k, n_top);
    // Every kept key lies in [lstar, the row max's key], so shares their bits above the highest
    // differing one: the 8 bits below those are a monotone histogram digit, counted as kept.
    unsigned hist_prefix;
    const int hist_shift = max(llf_key_prefix(lstar, llf_key(s_m), hist_prefix) - 7, 0);
    const int head_bits = min(32 - __clz(need + need / 4 + 7), 8), head = 1 << head_bits;  // >= need * 1.25 + 8
    const int2* row_lists = cands + row * slices * SCAP;
    const auto takes = [&](const int2 c, const bool present) { return present && llf_key(__int_as_float(c.y)) >= lstar; };
    const auto keep = [&](const int2 c, const unsigned slot) {
        if (slot < FCAP) {
            const unsigned key = llf_key(__int_as_float(c.y));
            s_ci[slot] = c.x;
            s_ck[slot] = key;
            atomicAdd(&s_hist[(key >> hist_shift) & 0xffu], 1u);
        }
    };
    for (int e0 = 0; e0 < slices * head; e0 += FNT * GATHER_LOADS) {
        int2 c[GATHER_LOADS];
        bool present[GATHER_LOADS];
        #pragma unroll
        for (int u = 0; u < GATHER_LOADS; u++) {
            const int e = e0 + u * FNT + tid, sl = e >> head_bits, j = e & (head - 1);
            present[u] = e < slices * head && j < (int)min(s_st[sl][4], (unsigned)SCAP);
            c[u] = present[u] ? row_lists[sl * SCAP + j] : make_int2(0, 0);
        }
        unsigned mask = 0;  // one atomicAdd a warp for all its kept entries of this pass
        #pragma unroll
        for (int u = 0; u < GATHER_LOADS; u++) mask |= (unsigned)takes(c[u], present[u]) << u;
        unsigned slot = llf_warp_slots(&s_n, __popc(mask));
        #pragma unroll
        for (int u = 0; u < GATHER_LOADS; u++)
            if ((mask >> u) & 1u) keep(c[u], slot++);
    }
    for (int sl = warp; sl < slices; sl += FNT / 32) {
        const unsigned count = min(s_st[sl][4], (unsigned)SCAP);
        for (unsigned j0 = head; j0 < count; j0 += 32) {
            const unsigned j = j0 + lane;
            const int2 c = j < count ? row_lists[sl * SCAP + j] : make_int2(0, 0);
            const bool take = takes(c, j < count);
            const unsigned slot = llf_warp_slots(&s_n, take);
            if (take) keep(c, slot);
        }
    }
    __syncthreads();
    const unsigned listed = s_n;
    if (listed > FCAP) {
        if (tid == 0) llf_give_back(given_back, row);
        return;
    }
    // Each slice listed its own ~`need` largest, so the lists hold ~`need` per slice: keep
    // only those at or above the row's need-th largest, to the histogram's digit: warp 0 finds
    // the highest bin with `need` kept keys in it and above (a few more may stay: those in it).
    unsigned mk[FCAP / FNT];
    int mi[FCAP / FNT];
    #pragma unroll
    for (int j = 0; j < FCAP / FNT; j++) {
        const unsigned c = tid + j * FNT;
        mk[j] = c < listed ? s_ck[c] : 0u;
        mi[j] = c < listed ? s_ci[c] : 0;
    }
    if (warp == 0) {
        unsigned h[FNT / 32], sum = 0;  // lane l: bins 8l .. 8l + 7
        #pragma unroll
        for (int j = 0; j < FNT / 32; j++) { h[j] = s_hist[lane * (FNT / 32) + j]; sum += h[j]; }
        unsigned above = sum;  // kept keys in this lane's bins and all higher lanes'
        #pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned y = __shfl_down_sync(FULL, above, o);
            if (lane + o < 32) above += y;
        }
        above -= sum;  // higher lanes' only
        int bin = -1;
        #pragma unroll
        for (int j = FNT / 32 - 1; j >= 0; j--) {
            above += h[j];
            if (bin < 0 && above >= (unsigned)need) bin = lane * (FNT / 32) + j;
        }
        // The highest lane that found a bin holds the highest such bin.
        const unsigned found = __ballot_sync(FULL, bin >= 0);
        const int hi = found ? 31 - __clz(found) : -1;
        bin = __shfl_sync(FULL, bin, hi < 0 ? 0 : hi);
        if (lane == 0) s_tau_need = need > 0 && hi >= 0 ? hist_prefix | ((unsigned)bin << hist_shift) : 0u;
    }
    __syncthreads();  // also: s_ck and s_ci are rewritten below
    const unsigned tau_need = s_tau_need;
    #pragma unroll
    for (int j = 0; j < FCAP / FNT; j++) {
        if (tid + j * FNT < listed && mk[j] >= tau_need) {
            const unsigned slot = atomicAdd(&s_nc, 1u);
            s_ck[slot] = mk[j];
            s_ci[slot] = mi[j];
        }
    }
    __syncthreads();
    const unsigned nc = s_nc;
    // Ranked (up to FNT candidates, and top-n asked or only a few candidates): every
    // candidate's rank at once, by key (larger first) then index (smaller first).  The
    // top-k-th and top-n-th largest keys are those ranked top_k - 1 and n_top - 1, and the
    // top-n logprobs go out by rank.  A rank costs a pass over the candidates, so for top-k
    // alone over more than 32 of them the bitwise search is faster (H100: 0.6 us at ~60).
    const bool ranked = nc <= FNT && (n_top > 0 || nc <= 32);
    if (ranked) {
        if (tid < nc) {
            const unsigned kc = s_ck[tid];
            const int ic = s_ci[tid];
            const unsigned rank = llf_candidate_rank(s_ck, s_ci, nc, kc, ic);
            if (rank + 1 == (unsigned)top_k) s_tau[0] = kc;
            if (rank + 1 == (unsigned)n_top) s_tau[1] = kc;
            s_rank[tid] = rank;
        }
    } else if (warp < 2) {
        // More (heavy ties): warp 0 finds the top-k-th largest key, warp 1 the top-n-th, bit
        // by bit down to bit 0.  A lane keeps its first TAU_REGS candidates in registers (key
        // 0 when absent: below every bit pattern tried); the rest are read from shared memory.
        const unsigned kk = warp == 0 ? (unsigned)top_k : (unsigned)n_top;
        unsigned res = 0;
        if (kk > 0) {
            unsigned kr[TAU_REGS], lo_k = 0xffffffffu, hi_k = 0u;
            #pragma unroll
            for (int j = 0; j < TAU_REGS; j++) {
                const unsigned c = lane + 32 * j;
                kr[j] = c < nc ? s_ck[c] : 0u;
                if (c < nc) { lo_k = min(lo_k, kr[j]); hi_k = max(hi_k, kr[j]); }
            }
            for (unsigned j = 32 * TAU_REGS + lane; j < nc; j += 32) { lo_k = min(lo_k, s_ck[j]); hi_k = max(hi_k, s_ck[j]); }
            for (int b = llf_key_prefix(__reduce_min_sync(FULL, lo_k), __reduce_max_sync(FULL, hi_k), res); b >= 0; b--) {
                const unsigned cand = res | (1u << b);
                unsigned c = 0;
                #pragma unroll
                for (int j = 0; j < TAU_REGS; j++) c += kr[j] >= cand;
                for (unsigned j = 32 * TAU_REGS + lane; j < nc; j += 32) c += s_ck[j] >= cand;
                if (__reduce_add_sync(FULL, c) >= kk) res = cand;
            }
        }
        if (lane == 0) s_tau[warp] = res;
    }
    __syncthreads();
    const float m = s_m;
    const double log_z = s_logz;
    // Top-n logprobs: rank = larger logits, then ties of lower index.
    if (n_top > 0) {
        const unsigned tau = s_tau[1];
        for (unsigned c = tid; c < nc; c += FNT) {
            const unsigned kc = s_ck[c];
            if (kc < tau) continue;
            const int ic = s_ci[c];
            const unsigned rank = ranked ? s_rank[c] : llf_candidate_rank(s_ck, s_ci, nc, kc, ic);
            if (rank < (unsigned)n_top) {
                out_top_ids[row * top_stride + rank] = ic;
                out_top_lp[row * top_stride + rank] =
                    (float)((double)__fmul_rn(__fsub_rn(llf_unkey(kc), m), inv_t) - log_z);
            }
        }
    }
    for (int j = n_top + tid; j < top_stride; j += FNT) {
        out_top_ids[row * top_stride + j] = -1;
        out_top_lp[row * top_stride + j] = 0.0f;
    }
    int token = s_arg;
    float x_token = m;
    if (!greedy) {
        // The top-k set in vocabulary order, with its weights.
        const unsigned tau = s_tau[0];
        for (unsigned c = tid; c < nc; c += FNT) {
            const unsigned kc = s_ck[c];
            if (kc < tau) continue;
            const int ic = s_ci[c];
            const unsigned pos = llf_count_candidates(s_ck, s_ci, nc, [&](const unsigned k, const int i) { return k >= tau && i < ic; });
            const float x = llf_unkey(kc);
            s_ki[pos] = ic;
            s_kx[pos] = x;
            s_kw[pos] = llf_exp_ref(__fmul_rn(__fsub_rn(x, m), inv_t));
            atomicAdd(&s_nk, 1u);
        }
        __syncthreads();
        if (warp == 0) {  // the draws of the sampling module, on the top-k set alone
            const unsigned nk = s_nk;
            double z_k = 0.0, z = 0.0;
            for (unsigned p = lane; p < nk; p += 32) {
                z_k += (double)s_kw[p];
                z += (double)llf_in_draw_set(s_kw[p], min_p, 0.0f, false);
            }
            z_k = llf_warp_sum(z_k);
            z = llf_warp_sum(z);
            const double limit = (double)top_p * z_k;
            float piv = 0.0f;
            bool strict = false;
            for (unsigned long long draw = 0;; draw++) {
                // Inverse CDF: the first member whose cumulative weight exceeds u * z (the
                // last member when rounding overshoots).
                const double t = llf_uniform(seed, draw) * z;
                double run = 0.0;
                int found = -1, last = -1;
                for (unsigned b = 0; b < nk; b += 32) {
                    const unsigned p = b + lane;
                    const double w = p < nk ? (double)llf_in_draw_set(s_kw[p], min_p, piv, strict) : 0.0;
                    double incl = w;
                    for (int o = 1; o < 32; o <<= 1) {
                        const double y = __shfl_up_sync(FULL, incl, o);
                        if (lane >= o) incl += y;
                    }
                    const unsigned nz = __ballot_sync(FULL, w > 0.0);
                    const unsigned hit = __ballot_sync(FULL, w > 0.0 && run + incl > t);
                    if (nz) last = (int)b + 31 - __clz(nz);
                    if (hit) { found = (int)b + __ffs(hit) - 1; break; }
                    run += __shfl_sync(FULL, incl, 31);
                }
                const int j = found >= 0 ? found : last;
                token = s_ki[j];
                x_token = s_kx[j];
                if (top_p >= 1.0f) break;
                piv = s_kw[j];
                strict = true;
                double above = 0.0;
                for (unsigned p = lane; p < nk; p += 32) above += (double)llf_in_draw_set(s_kw[p], min_p, piv, true);
                above = llf_warp_sum(above);
                if (above < limit) break;
                z = above;
            }
        }
    }
    if (tid == 0) {
        out_token[row] = token;
        out_logprob[row] = (float)((double)__fmul_rn(__fsub_rn(x_token, m), inv_t) - log_z);
    }
}

// The per-row body's parameters, the kernels' (a first row and a count, or the list of rows
// the fast path gave back), and the body's arguments.
#define LLF_ROW_PARAMS const void* __restrict__ logits, const int is_half, const long long vocab, const int slice, const long long row, const float* __restrict__ inv_t, const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p, const unsigned long long* __restrict__ seed, const int* __restrict__ n_top, int* __restrict__ out_token, float* __restrict__ out_logprob, int* __restrict__ out_top_ids, float* __restrict__ out_top_lp, const int top_stride
#define LLF_SAMPLE_ARGS const void* __restrict__ logits, const int is_half, const long long vocab, const int slice, const long long row0, const float* __restrict__ inv_t, const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p, const unsigned long long* __restrict__ seed, const int* __restrict__ n_top, int* __restrict__ out_token, float* __restrict__ out_logprob, int* __restrict__ out_top_ids, float* __restrict__ out_top_lp, const int top_stride, const int n_rows, const int* __restrict__ given_back
#define LLF_KERNEL_NAMES logits, is_half, vocab, slice, row0, inv_t, top_k, top_p, min_p, seed, n_top, out_token, out_logprob, out_top_ids, out_top_lp, top_stride, n_rows, given_back
#define LLF_SAMPLE_NAMES logits, is_half, vocab, slice, row, inv_t, top_k, top_p, min_p, seed, n_top, out_token, out_logprob, out_top_ids, out_top_lp, top_stride
// llf_sample_c{C}: a cluster of C CTAs per row, row0 .. row0 + n_rows - 1.  llf_sample_list_c{C}: the
// given_back[0] rows the fast path gave back, listed from given_back[1], by a few clusters
// that leave at once when the list is empty (not a cluster per row that must start and leave).
// The list kernels call the body through llf_sample_row, not inlined: inlined into their
// loop it spilled registers, and the one-row kernels keep it inlined.
__device__ __noinline__ void llf_sample_row(LLF_ROW_PARAMS) {
    llf_sample_body(LLF_SAMPLE_NAMES);
}

template <int C>
__device__ __forceinline__ void llf_sample_rows(LLF_SAMPLE_ARGS) {
    const long long row = row0 + blockIdx.x / C;
    llf_sample_body(LLF_SAMPLE_NAMES);
}

template <int C>
__device__ __forceinline__ void llf_sample_listed(LLF_SAMPLE_ARGS) {
    asm volatile("griddepcontrol.wait;" ::: "memory");  // launched as a dependent of the finish
    const int n = min(given_back[0], n_rows);
    for (int q = blockIdx.x / C; q < n; q += gridDim.x / C) {
        const long long row = given_back[1 + q];
        llf_sample_row(LLF_SAMPLE_NAMES);
    }
}

extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(1, 1, 1) llf_sample_c1(LLF_SAMPLE_ARGS) { llf_sample_rows<1>(LLF_KERNEL_NAMES); }
extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(1, 1, 1) llf_sample_list_c1(LLF_SAMPLE_ARGS) { llf_sample_listed<1>(LLF_KERNEL_NAMES); }
extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(2, 1, 1) llf_sample_c2(LLF_SAMPLE_ARGS) { llf_sample_rows<2>(LLF_KERNEL_NAMES); }
extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(2, 1, 1) llf_sample_list_c2(LLF_SAMPLE_ARGS) { llf_sample_listed<2>(LLF_KERNEL_NAMES); }
extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(4, 1, 1) llf_sample_c4(LLF_SAMPLE_ARGS) { llf_sample_rows<4>(LLF_KERNEL_NAMES); }
extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(4, 1, 1) llf_sample_list_c4(LLF_SAMPLE_ARGS) { llf_sample_listed<4>(LLF_KERNEL_NAMES); }
extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(8, 1, 1) llf_sample_c8(LLF_SAMPLE_ARGS) { llf_sample_rows<8>(LLF_KERNEL_NAMES); }
extern "C" __global__ void __launch_bounds__(NT, 2) __cluster_dims__(8, 1, 1) llf_sample_list_c8(LLF_SAMPLE_ARGS) { llf_sample_listed<8>(LLF_KERNEL_NAMES); }
