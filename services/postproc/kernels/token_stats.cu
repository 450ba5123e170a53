// Token statistics (services/postproc/token_stats.py defines them; backends.py launches).
// One kernel per batch: a CTA per response and a thread per token (entropy, surprise, the
// confident flag), then the response's sums reduced in the CTA, so the means need neither
// a second launch nor atomics (deterministic).  expf/logf (not the fast intrinsics) keep
// the results within a few ulp of NumPy's.
#define FULL_MASK 0xffffffffu

extern "C" __global__ void llf_token_stats(
    const float* __restrict__ top, const float* __restrict__ chosen, const long long* __restrict__ offsets,
    const long long n_tokens, const int width, const long long n_responses, const float log_threshold,
    float* __restrict__ entropy, float* __restrict__ surprise, unsigned char* __restrict__ confident,
    double* __restrict__ out)
{
    // One CTA per response (grid-stride), one thread per token: per-token entropy, surprise
    // and confident flag, then the response's sums reduced in the CTA.
    // out[4 r + k]: mean_logprob, perplexity, mean_entropy, confident_fraction.
    __shared__ double s_lp[32], s_h[32];
    __shared__ long long s_nh[32], s_nc[32];
    const float neg_inf = __int_as_float(0xff800000);
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (long long r = blockIdx.x; r < n_responses; r += gridDim.x) {
        const long long lo = offsets[r], hi = offsets[r + 1];
        double lp = 0.0, h = 0.0;
        long long nh = 0, nc = 0;
        for (long long t = lo + threadIdx.x; t < hi; t += blockDim.x) {
            const float* row = top + t * width;
            float m = neg_inf;
            for (int j = 0; j < width; j++) m = fmaxf(m, row[j]);
            float z = 0.0f, wd = 0.0f;
            if (m > neg_inf) {
                for (int j = 0; j < width; j++) {
                    const float x = row[j];
                    if (x > neg_inf) {
                        // H = log Z - sum(w d) / Z with d = l - max, w = exp(d): no overflow, no cancellation.
                        const float d = x - m;
                        const float w = expf(d);
                        z += w;
                        wd += w * d;
                    }
                }
            }
            const float e = m > neg_inf ? logf(z) - wd / z : __int_as_float(0x7fc00000);
            const float c = chosen[t];
            const bool conf = c >= log_threshold;
            entropy[t] = e;
            surprise[t] = 0.0f - c;  // +0 rather than -0 for a logprob of 0, as in NumPy
            confident[t] = conf ? 1 : 0;
            lp += (double)c;
            if (e == e) { h += (double)e; nh += 1; }  // NaN: token without top entries
            nc += conf;
        }
        for (int s = 16; s > 0; s >>= 1) {
            lp += __shfl_down_sync(FULL_MASK, lp, s);
            h += __shfl_down_sync(FULL_MASK, h, s);
            nh += __shfl_down_sync(FULL_MASK, nh, s);
            nc += __shfl_down_sync(FULL_MASK, nc, s);
        }
        if (lane == 0) { s_lp[warp] = lp; s_h[warp] = h; s_nh[warp] = nh; s_nc[warp] = nc; }
        __syncthreads();
        if (warp == 0) {
            lp = lane < n_warps ? s_lp[lane] : 0.0;
            h = lane < n_warps ? s_h[lane] : 0.0;
            nh = lane < n_warps ? s_nh[lane] : 0;
            nc = lane < n_warps ? s_nc[lane] : 0;
            for (int s = 16; s > 0; s >>= 1) {
                lp += __shfl_down_sync(FULL_MASK, lp, s);
                h += __shfl_down_sync(FULL_MASK, h, s);
                nh += __shfl_down_sync(FULL_MASK, nh, s);
                nc += __shfl_down_sync(FULL_MASK, nc, s);
            }
            if (lane == 0) {
                const long long n = hi - lo;
                double* o = out + 4 * r;
                if (n > 0) {
                    const double mean = lp / (double)n;
                    o[0] = mean;
                    o[1] = exp(-mean);
                    o[2] = nh > 0 ? h / (double)nh : nan;
                    o[3] = (double)nc / (double)n;
                } else {
                    o[0] = nan; o[1] = nan; o[2] = nan; o[3] = nan;
                }
            }
        }
        __syncthreads();  // the shared slots are reused by the next response
    }
}
