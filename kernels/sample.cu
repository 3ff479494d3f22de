// Next-token sampling on the device with the semantics of the host sampler (src/sampling.rs,
// `Sampler::sample`), so that the decode step never copies the logits to the host:
//
//   1. the token fed this step joins the history ring; every distinct token of the last `last_n`
//      is penalised once: l = l / p where l >= 0, else l * p;
//   2. greedy (temperature 0): the argmax, lowest index on ties;
//   3. else the candidates: the `top_k` largest finite logits (radix select of the k-th largest)
//      that are at least `max + T·ln(min_p)`; sorted descending (ties: lowest index first);
//   4. probabilities exp(l/T − top) in f32, summed and normalised in f64 one after another as
//      the host does; top-p keeps the shortest prefix reaching p; a SplitMix64 draw u (the host's
//      generator, its state kept here) walks r = u·total down the kept probabilities.
//
// One block of SAMPLE_THREADS threads. The host guarantees 1 <= top_k <= SAMPLE_MAX_K when the
// temperature is positive and last_n <= hist_cap (ops::sample::supports). Where the host breaks
// a tie among equal logits at the top-k boundary differently (select_nth_unstable), or its expf
// differs from CUDA's by an ulp at a draw's boundary, the two may pick different tokens: the
// only places the device and the host can disagree (docs/decode.md).
#include "decode.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_MAX_K 1024

// The sampler's settings and running state in device memory; the #[repr(C)] twin is
// ops::sample::SampleState. The host writes it at the start of a generation; the kernel advances
// rng, hist_len, hist_head and draws.
struct SampleState {
    unsigned long long rng;  // SplitMix64 state (src/rng.rs)
    double top_p;            // (0, 1]; 1 = off
    float temperature;       // <= 0: greedy
    float repeat_penalty;    // applied to the last last_n distinct tokens
    float min_p_delta;       // (f32)(T · ln min_p), as the host computes it
    int min_p_on;            // min_p > 0
    int top_k;               // 1..=SAMPLE_MAX_K when temperature > 0
    int last_n;              // penalty window (0: no penalty), <= hist_cap
    int hist_cap;            // ring capacity
    unsigned int hist_len;   // tokens in the ring (saturates at hist_cap)
    unsigned int hist_head;  // next slot to write
    unsigned int draws;      // random draws taken
};

// Order-preserving key of a float: larger float, larger key.
__device__ __forceinline__ unsigned fkey(float x) {
    const unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long splitmix_next(unsigned long long* s) {
    *s += 0x9E3779B97F4A7C15ull;
    unsigned long long z = *s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Block-wide sum of an int; every thread gets it. `sh` holds >= 33 ints.
__device__ __forceinline__ int block_count(int v, int* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int w = 0; w < nw; w++) s += sh[w];
        sh[32] = s;
    }
    __syncthreads();
    return sh[32];
}

// Appends, in index order, the elements i of `logits` with pred(i) to (cv, ci) from *n on, while
// *n < cap. Chunk by chunk of blockDim.x indices: a warp ballot and the warps' offsets give each
// flagged element its slot. `sh` holds >= 33 ints.
template <typename Pred>
__device__ void gather_in_order(const float* logits, int V, Pred pred, float* cv, int* ci, int* n, int cap, int* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int base = 0; base < V; base += blockDim.x) {
        if (*n >= cap) break;  // uniform: *n changes only between the barriers below
        const int i = base + threadIdx.x;
        const bool f = i < V && pred(i);
        const unsigned bal = __ballot_sync(0xffffffffu, f);
        if (lane == 0) sh[warp] = __popc(bal);
        __syncthreads();
        if (threadIdx.x == 0) {
            int acc = 0;
            for (int w = 0; w < nw; w++) {
                const int c = sh[w];
                sh[w] = acc;
                acc += c;
            }
            sh[32] = acc;
        }
        __syncthreads();
        if (f) {
            const int slot = *n + sh[warp] + __popc(bal & ((1u << lane) - 1u));
            if (slot < cap) {
                cv[slot] = logits[i];
                ci[slot] = i;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) *n = min(cap, *n + sh[32]);
        __syncthreads();
    }
}

// Sorts (cv, ci)[0 .. n) by value descending, index ascending on ties (bitonic, padded to a power
// of two with (-inf, INT_MAX)); n <= SAMPLE_MAX_K.
__device__ void sort_desc(float* cv, int* ci, int n) {
    int p = 1;
    while (p < n) p <<= 1;
    for (int i = n + threadIdx.x; i < p; i += blockDim.x) {
        cv[i] = -INFINITY;
        ci[i] = 0x7fffffff;
    }
    __syncthreads();
    for (int k = 2; k <= p; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < p; i += blockDim.x) {
                const int l = i ^ j;
                if (l > i) {
                    // "a before b": a larger, or equal with a lower index
                    const bool desc = (i & k) == 0;
                    const bool l_first = cv[l] > cv[i] || (cv[l] == cv[i] && ci[l] < ci[i]);
                    if (l_first == desc) {
                        const float tv = cv[i];
                        cv[i] = cv[l];
                        cv[l] = tv;
                        const int ti = ci[i];
                        ci[i] = ci[l];
                        ci[l] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// The sampling step of the decoder (after the head wrote `logits`), or of ops::sample alone:
// reads the fed token tok[0], samples the next one into tok[0] and out[0], step[0] += 1; with
// parts, also the telemetry sums of sample_final. logits are penalised in place.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_logits(const SampleLogitsParams p) {
    float* __restrict__ logits = p.logits;
    const int V = p.V, n_layers = p.n_layers, nblk = p.nblk;
    SampleState* __restrict__ st = p.st;
    unsigned* __restrict__ hist = p.hist;
    unsigned int* __restrict__ tok = p.tok;
    unsigned int* __restrict__ step = p.step;
    unsigned int* __restrict__ out = p.out;
    const float* __restrict__ parts = p.parts;
    pdl_wait();
    pdl_trigger();
    __shared__ SampleState s;
    __shared__ float cv[SAMPLE_MAX_K];
    __shared__ int ci[SAMPLE_MAX_K];
    __shared__ double pr[SAMPLE_MAX_K];
    __shared__ unsigned bins[256];
    __shared__ int sh[33];
    __shared__ float shf[33];
    __shared__ int shi[33];
    __shared__ int n_cand;
    __shared__ unsigned thr_key;
    __shared__ int ties;
    __shared__ unsigned sh_prefix;
    __shared__ int sh_want;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    if (tid == 0) {
        s = *st;
        if (s.hist_cap > 0) {  // the token fed this step joins the history
            hist[s.hist_head] = tok[0];
            s.hist_head = (s.hist_head + 1u) % (unsigned)s.hist_cap;
            s.hist_len = min(s.hist_len + 1u, (unsigned)s.hist_cap);
        }
        n_cand = 0;
    }
    if (parts != nullptr) sum_telemetry(out, parts, n_layers, nblk);
    __syncthreads();

    // 1. repetition penalty on each distinct token of the window
    const int w = min(s.last_n, (int)s.hist_len);
    const unsigned cap = (unsigned)max(s.hist_cap, 1);
    for (int i = tid; i < w; i += blockDim.x) {
        const unsigned t = hist[(s.hist_head + cap - 1u - (unsigned)i) % cap];
        bool first = true;
        for (int j = 0; j < i && first; j++) first = hist[(s.hist_head + cap - 1u - (unsigned)j) % cap] != t;
        if (first && t < (unsigned)V) {
            const float x = logits[t];
            logits[t] = x >= 0.0f ? x / s.repeat_penalty : x * s.repeat_penalty;
        }
    }
    __syncthreads();

    // 2. argmax, finite max, finite count
    ArgMax best{-INFINITY, 0x7fffffff};
    float fmax = -INFINITY;
    int nfin = 0;
    for (int i = tid; i < V; i += blockDim.x) {
        const float x = logits[i];
        best = argmax_pick(best, ArgMax{x, i});
        if (isfinite(x)) {
            fmax = fmaxf(fmax, x);
            nfin++;
        }
    }
    best = warp_argmax(best);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) fmax = fmaxf(fmax, __shfl_xor_sync(0xffffffffu, fmax, o));
    if (lane == 0) {
        shf[warp] = best.v;
        shi[warp] = best.i;
        cv[warp] = fmax;  // scratch
    }
    nfin = block_count(nfin, sh);  // has barriers: shf/shi/cv are written
    if (tid == 0) {
        ArgMax b{shf[0], shi[0]};
        float m = cv[0];
        for (int k = 1; k < nw; k++) {
            b = argmax_pick(b, ArgMax{shf[k], shi[k]});
            m = fmaxf(m, cv[k]);
        }
        shi[32] = b.i == 0x7fffffff ? 0 : b.i;
        shf[32] = m;
    }
    __syncthreads();
    const int argmax_i = shi[32];
    fmax = shf[32];
    int token = argmax_i;
    if (s.temperature > 0.0f && nfin > 0) {
        // 3. candidates: the top_k largest finite logits at least at the min-p cut
        const float cut = s.min_p_on ? fmax + s.min_p_delta : -INFINITY;
        int c = 0;
        for (int i = tid; i < V; i += blockDim.x) {
            const float x = logits[i];
            c += (isfinite(x) && x >= cut) ? 1 : 0;
        }
        c = block_count(c, sh);
        const int K = max(1, min(s.top_k, SAMPLE_MAX_K));
        if (c <= K) {
            gather_in_order(logits, V, [&](int i) { const float x = logits[i]; return isfinite(x) && x >= cut; }, cv, ci,
                            &n_cand, K, sh);
        } else {
            // radix select: the key of the K-th largest finite logit, 8 bits at a time
            if (tid == 0) {
                sh_prefix = 0u;
                sh_want = K;
            }
            for (int shift = 24; shift >= 0; shift -= 8) {
                for (int b = tid; b < 256; b += blockDim.x) bins[b] = 0u;
                __syncthreads();
                const unsigned hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
                const unsigned prefix = sh_prefix;
                for (int i = tid; i < V; i += blockDim.x) {
                    const float x = logits[i];
                    if (!isfinite(x)) continue;
                    const unsigned k = fkey(x);
                    if ((k & hi_mask) == prefix) atomicAdd(&bins[(k >> shift) & 255u], 1u);
                }
                __syncthreads();
                if (tid == 0) {
                    int acc = 0, want = sh_want;
                    for (int b = 255; b >= 0; b--) {
                        const int cnt = (int)bins[b];
                        if (acc + cnt >= want) {
                            sh_prefix = prefix | ((unsigned)b << shift);
                            sh_want = want - acc;
                            break;
                        }
                        acc += cnt;
                    }
                }
                __syncthreads();
            }
            if (tid == 0) {
                thr_key = sh_prefix;
                ties = sh_want;  // how many equal to the threshold to take (>= 1)
            }
            __syncthreads();
            const unsigned tk = thr_key;
            // everything above the threshold (fewer than K), then the first `ties` equal to it
            gather_in_order(logits, V, [&](int i) { const float x = logits[i]; return isfinite(x) && fkey(x) > tk; }, cv, ci,
                            &n_cand, K, sh);
            const int upto = min(K, n_cand + ties);
            gather_in_order(logits, V, [&](int i) { const float x = logits[i]; return isfinite(x) && fkey(x) == tk; }, cv, ci,
                            &n_cand, upto, sh);
        }
        const int n = n_cand;
        sort_desc(cv, ci, n);
        // 4. softmax over the candidates, top-p, the draw (one thread, in the host's order)
        if (tid == 0) {
            const float t = s.temperature;
            const float top = cv[0] / t;
            double sum = 0.0;
            for (int j = 0; j < n; j++) {
                pr[j] = (double)expf(cv[j] / t - top);
                sum += pr[j];
            }
            for (int j = 0; j < n; j++) pr[j] /= sum;
            int keep = n;
            if (s.top_p < 1.0) {
                double acc = 0.0;
                for (int j = 0; j < n; j++) {
                    acc += pr[j];
                    if (acc >= s.top_p) {
                        keep = j + 1;
                        break;
                    }
                }
            }
            double total = 0.0;
            for (int j = 0; j < keep; j++) total += pr[j];
            const double u = (double)(splitmix_next(&s.rng) >> 11) * (1.0 / 9007199254740992.0);
            s.draws += 1u;
            double r = u * total;
            int pick = ci[keep - 1];
            for (int j = 0; j < keep; j++) {
                r -= pr[j];
                if (r < 0.0) {
                    pick = ci[j];
                    break;
                }
            }
            shi[32] = pick;
        }
        __syncthreads();
        token = shi[32];
    }
    if (tid == 0) {
        tok[0] = (unsigned)token;
        out[0] = (unsigned)token;
        step[0] += 1u;
        st->rng = s.rng;
        st->hist_len = s.hist_len;
        st->hist_head = s.hist_head;
        st->draws = s.draws;
    }
}
