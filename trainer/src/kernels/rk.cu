// kutta's CUDA kernels for the Runge-Kutta arithmetic on flat f32 parameter buffers.
//
// Semantics: every kernel computes, element by element, exactly what the CPU reference of the
// same name in `reference.rs` computes (and that is what `optim/rk.rs` computes): same formula,
// same order of floating-point operations. `build.rs` compiles this file with `--fmad=false`
// so that no a*b+c is contracted into an FMA, and without fast math, so `sqrtf` and `/` are the
// IEEE correctly-rounded operations: the f32 results then match the CPU bit for bit. The
// reductions accumulate in f64 in a different order (a tree), so their sums agree to ~1e-15
// relative, not bitwise.
//
// Layout: grid-stride loops over n elements. Where every pointer a kernel touches is 16-byte
// aligned (always so for whole cudarc allocations), the body runs over float4 vectors first and
// the last n % 4 elements one by one; otherwise the whole range runs one element at a time.
// The kernels are bandwidth bound, so the only goal is to move each byte once.
//
// Optional buffers are passed as null pointers: `d` (no preconditioner = D is the identity),
// `err` (no embedded pair), `m` (no momentum).

#include <stdint.h>

#define KUTTA_MAX_STAGES 8

// The stage gradients that feed one stage point: k[j] for j < ns, with coefficients a[j].
// Must match `StageTable` in cuda.rs (#[repr(C)], 8 u64 then 8 f32 = 96 bytes).
struct StageTable {
    const float* k[KUTTA_MAX_STAGES];
    float a[KUTTA_MAX_STAGES];
};

// One (pointer, offset in the flat buffer, length) triple for gather/scatter.
// Must match `Segment` in cuda.rs (#[repr(C)], three u64).
struct Segment {
    float* ptr;
    unsigned long long offset;
    unsigned long long len;
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ size_t grid_tid() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ size_t grid_stride() {
    return (size_t)gridDim.x * blockDim.x;
}

__device__ __forceinline__ float4 ld4(const float* p, size_t v) {
    return reinterpret_cast<const float4*>(p)[v];
}

__device__ __forceinline__ void st4(float* p, size_t v, float4 x) {
    reinterpret_cast<float4*>(p)[v] = x;
}

// ---------------------------------------------------------------------------------------------
// 1. Stage point: x = θ − (h·d)·s with s = a_0 k_0 + a_1 k_1 + … (left to right), d = 1 without D.
//    ns = 0 (no earlier stage feeds this one): x = θ.
//    rk.rs: s is built as x = a_0 k_0, then x = x + a_j k_j; descend: x = t − h·d·x, which Rust
//    evaluates as t − ((h·d)·x); without D, t − h·x.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float stage_sum(const StageTable& st, int ns, size_t i) {
    float s = st.a[0] * st.k[0][i];
#pragma unroll
    for (int j = 1; j < KUTTA_MAX_STAGES; ++j) {
        if (j < ns) s = s + st.a[j] * st.k[j][i];
    }
    return s;
}

extern "C" __global__ void kutta_stage_point(
    float* x, const float* theta, const float* d, const StageTable st, int ns, float h,
    unsigned long long n)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    bool vec = aligned16(x) && aligned16(theta) && (d == nullptr || aligned16(d));
#pragma unroll
    for (int j = 0; j < KUTTA_MAX_STAGES; ++j) {
        if (j < ns) vec = vec && aligned16(st.k[j]);
    }
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    for (size_t v = tid; v < nv; v += stride) {
        const float4 t = ld4(theta, v);
        float4 r;
        if (ns == 0) {
            r = t;
        } else {
            float4 s;
            {
                const float4 k = ld4(st.k[0], v);
                const float a = st.a[0];
                s.x = a * k.x; s.y = a * k.y; s.z = a * k.z; s.w = a * k.w;
            }
#pragma unroll
            for (int j = 1; j < KUTTA_MAX_STAGES; ++j) {
                if (j < ns) {
                    const float4 k = ld4(st.k[j], v);
                    const float a = st.a[j];
                    s.x = s.x + a * k.x; s.y = s.y + a * k.y;
                    s.z = s.z + a * k.z; s.w = s.w + a * k.w;
                }
            }
            if (d != nullptr) {
                const float4 dd = ld4(d, v);
                r.x = t.x - (h * dd.x) * s.x; r.y = t.y - (h * dd.y) * s.y;
                r.z = t.z - (h * dd.z) * s.z; r.w = t.w - (h * dd.w) * s.w;
            } else {
                r.x = t.x - h * s.x; r.y = t.y - h * s.y;
                r.z = t.z - h * s.z; r.w = t.w - h * s.w;
            }
        }
        st4(x, v, r);
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) {
        if (ns == 0) {
            x[i] = theta[i];
        } else {
            const float s = stage_sum(st, ns, i);
            x[i] = (d != nullptr) ? theta[i] - (h * d[i]) * s : theta[i] - h * s;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Accumulate stage i: acc = acc + b·k (skipped when b == 0), err = err + e·k with
//    e = b_i − b̂_i (skipped when err is null or e == 0). rk.rs: `axpy`, y = y + a·x.
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void kutta_accumulate(
    float* acc, float* err, const float* k, float b, float e, unsigned long long n)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool do_acc = b != 0.0f;
    const bool do_err = err != nullptr && e != 0.0f;
    if (!do_acc && !do_err) return;
    const bool vec = aligned16(acc) && aligned16(k) && (err == nullptr || aligned16(err));
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    for (size_t v = tid; v < nv; v += stride) {
        const float4 kk = ld4(k, v);
        if (do_acc) {
            float4 y = ld4(acc, v);
            y.x = y.x + b * kk.x; y.y = y.y + b * kk.y; y.z = y.z + b * kk.z; y.w = y.w + b * kk.w;
            st4(acc, v, y);
        }
        if (do_err) {
            float4 y = ld4(err, v);
            y.x = y.x + e * kk.x; y.y = y.y + e * kk.y; y.z = y.z + e * kk.z; y.w = y.w + e * kk.w;
            st4(err, v, y);
        }
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) {
        const float kk = k[i];
        if (do_acc) acc[i] = acc[i] + b * kk;
        if (do_err) err[i] = err[i] + e * kk;
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Final update (rk.rs `form_update`): with momentum acc = β·m + acc (m itself is NOT written:
//    the caller swaps m and acc when the step is accepted); then x = θ − (h·d)·acc.
//    x may equal θ (in-place update): each element is read before it is written by one thread.
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void kutta_final_update(
    float* x, const float* theta, float* acc, const float* m, const float* d, float beta, float h,
    unsigned long long n)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool vec = aligned16(x) && aligned16(theta) && aligned16(acc)
        && (m == nullptr || aligned16(m)) && (d == nullptr || aligned16(d));
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    for (size_t v = tid; v < nv; v += stride) {
        float4 a = ld4(acc, v);
        if (m != nullptr) {
            const float4 mm = ld4(m, v);
            a.x = beta * mm.x + a.x; a.y = beta * mm.y + a.y;
            a.z = beta * mm.z + a.z; a.w = beta * mm.w + a.w;
            st4(acc, v, a);
        }
        const float4 t = ld4(theta, v);
        float4 r;
        if (d != nullptr) {
            const float4 dd = ld4(d, v);
            r.x = t.x - (h * dd.x) * a.x; r.y = t.y - (h * dd.y) * a.y;
            r.z = t.z - (h * dd.z) * a.z; r.w = t.w - (h * dd.w) * a.w;
        } else {
            r.x = t.x - h * a.x; r.y = t.y - h * a.y; r.z = t.z - h * a.z; r.w = t.w - h * a.w;
        }
        st4(x, v, r);
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) {
        float a = acc[i];
        if (m != nullptr) {
            a = beta * m[i] + a;
            acc[i] = a;
        }
        const float t = theta[i];
        x[i] = (d != nullptr) ? t - (h * d[i]) * a : t - h * a;
    }
}

// ---------------------------------------------------------------------------------------------
// 4. AdaGrad. At the step start D = 1/sqrt(ε + (G + k1·k1)) without committing G; at acceptance
//    G = G + k1·k1. rk.rs: `F::one() / (eps + (*g + *k * *k)).sqrt()` and `*g + *k * *k`.
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void kutta_adagrad_d(
    float* d, const float* g, const float* k1, float eps, unsigned long long n)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool vec = aligned16(d) && aligned16(g) && aligned16(k1);
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    for (size_t v = tid; v < nv; v += stride) {
        const float4 gg = ld4(g, v), kk = ld4(k1, v);
        float4 r;
        r.x = 1.0f / sqrtf(eps + (gg.x + kk.x * kk.x));
        r.y = 1.0f / sqrtf(eps + (gg.y + kk.y * kk.y));
        r.z = 1.0f / sqrtf(eps + (gg.z + kk.z * kk.z));
        r.w = 1.0f / sqrtf(eps + (gg.w + kk.w * kk.w));
        st4(d, v, r);
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) {
        const float kk = k1[i];
        d[i] = 1.0f / sqrtf(eps + (g[i] + kk * kk));
    }
}

extern "C" __global__ void kutta_adagrad_commit(float* g, const float* k1, unsigned long long n)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool vec = aligned16(g) && aligned16(k1);
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    for (size_t v = tid; v < nv; v += stride) {
        float4 gg = ld4(g, v);
        const float4 kk = ld4(k1, v);
        gg.x = gg.x + kk.x * kk.x; gg.y = gg.y + kk.y * kk.y;
        gg.z = gg.z + kk.z * kk.z; gg.w = gg.w + kk.w * kk.w;
        st4(g, v, gg);
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) {
        const float kk = k1[i];
        g[i] = g[i] + kk * kk;
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Reductions, two passes. Pass 1: every block writes the f64 sum of its grid-stride share of
//    the terms to partials[blockIdx.x] (per-thread f64 sums, then a warp-shuffle and shared-
//    memory tree). Pass 2 (`kutta_reduce_final`, one block): out[0] = Σ partials[0..m).
//    Terms, in f64, as rk.rs computes them:
//      dnorm2:   (v·d)²           (v² without D)            — ‖D v‖², rk.rs `d_norm` squared
//      ddiff2:   ((a − b)·d)²     (d = 1 without D)         — ‖D(a − b)‖², `d_norm_diff` squared
//      errsum:   ((h·d·e) / (atol + rtol·|θ|))²  (d = 1)    — `error_norm` before the mean/sqrt
//      nonfinite: 1 for each element that is NaN or ±Inf    — `all_finite` is count == 0
//    The float4 path (when aligned) adds the four terms of a vector in order; the sums agree with
//    the sequential CPU sums to f64 rounding. Requires blockDim.x ≤ 1024, a multiple of 32.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// The sum of v over the block, valid in thread 0.
__device__ double block_sum(double v) {
    __shared__ double warp_partials[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) warp_partials[warp] = v;
    __syncthreads();
    v = 0.0;
    if (warp == 0) {
        if (lane < nwarps) v = warp_partials[lane];
        v = warp_sum(v);
    }
    return v;
}

// d[v] as float4, or (1, 1, 1, 1) without D (multiplying by 1 is exact, so the terms equal
// rk.rs's D-free formulas).
__device__ __forceinline__ float4 ld4_or_one(const float* p, size_t v) {
    return p != nullptr ? ld4(p, v) : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
}

__device__ __forceinline__ float ld_or_one(const float* p, size_t i) {
    return p != nullptr ? p[i] : 1.0f;
}

__device__ __forceinline__ double dnorm_term(float v, float d) {
    const double t = (double)v * (double)d;
    return t * t;
}

__device__ __forceinline__ double ddiff_term(float a, float b, float d) {
    const double t = ((double)a - (double)b) * (double)d;
    return t * t;
}

__device__ __forceinline__ double errsum_term(float t, float e, float d, double h, double atol, double rtol) {
    const double ee = h * (double)d * (double)e;
    const double q = ee / (atol + rtol * fabs((double)t));
    return q * q;
}

extern "C" __global__ void kutta_reduce_dnorm2(
    const float* v, const float* d, unsigned long long n, double* partials)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool vec = aligned16(v) && (d == nullptr || aligned16(d));
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    double s = 0.0;
    for (size_t q = tid; q < nv; q += stride) {
        const float4 a = ld4(v, q), dd = ld4_or_one(d, q);
        s += dnorm_term(a.x, dd.x); s += dnorm_term(a.y, dd.y);
        s += dnorm_term(a.z, dd.z); s += dnorm_term(a.w, dd.w);
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) s += dnorm_term(v[i], ld_or_one(d, i));
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void kutta_reduce_ddiff2(
    const float* a, const float* b, const float* d, unsigned long long n, double* partials)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool vec = aligned16(a) && aligned16(b) && (d == nullptr || aligned16(d));
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    double s = 0.0;
    for (size_t q = tid; q < nv; q += stride) {
        const float4 x = ld4(a, q), y = ld4(b, q), dd = ld4_or_one(d, q);
        s += ddiff_term(x.x, y.x, dd.x); s += ddiff_term(x.y, y.y, dd.y);
        s += ddiff_term(x.z, y.z, dd.z); s += ddiff_term(x.w, y.w, dd.w);
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) s += ddiff_term(a[i], b[i], ld_or_one(d, i));
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void kutta_reduce_errsum(
    const float* theta, const float* err, const float* d, double h, double atol, double rtol,
    unsigned long long n, double* partials)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool vec = aligned16(theta) && aligned16(err) && (d == nullptr || aligned16(d));
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    double s = 0.0;
    for (size_t q = tid; q < nv; q += stride) {
        const float4 t = ld4(theta, q), e = ld4(err, q), dd = ld4_or_one(d, q);
        s += errsum_term(t.x, e.x, dd.x, h, atol, rtol); s += errsum_term(t.y, e.y, dd.y, h, atol, rtol);
        s += errsum_term(t.z, e.z, dd.z, h, atol, rtol); s += errsum_term(t.w, e.w, dd.w, h, atol, rtol);
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) {
        s += errsum_term(theta[i], err[i], ld_or_one(d, i), h, atol, rtol);
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void kutta_reduce_nonfinite(
    const float* v, unsigned long long n, double* partials)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    const bool vec = aligned16(v);
    const size_t nv = vec ? (size_t)(n / 4) : 0;
    double s = 0.0;
    for (size_t q = tid; q < nv; q += stride) {
        const float4 a = ld4(v, q);
        s += (double)(!isfinite(a.x) + !isfinite(a.y) + !isfinite(a.z) + !isfinite(a.w));
    }
    for (size_t i = nv * 4 + tid; i < n; i += stride) {
        if (!isfinite(v[i])) s += 1.0;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// Launch with ONE block: out[0] = Σ_{i<m} partials[i].
extern "C" __global__ void kutta_reduce_final(const double* partials, unsigned int m, double* out)
{
    double s = 0.0;
    for (unsigned int i = threadIdx.x; i < m; i += blockDim.x) s += partials[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

// ---------------------------------------------------------------------------------------------
// 6. Gather / scatter between model tensors and the flat buffer. One launch for all tensors:
//    blockIdx.y walks the segments (stride gridDim.y), blockIdx.x/threadIdx.x stride over the
//    elements of a segment.
//      gather:  flat[offset + i] = ptr[i]
//      scatter: ptr[i] = flat[offset + i]
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void kutta_gather(float* flat, const Segment* segs, unsigned int nsegs)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    for (unsigned int s = blockIdx.y; s < nsegs; s += gridDim.y) {
        const Segment seg = segs[s];
        float* dst = flat + seg.offset;
        const float* src = seg.ptr;
        for (size_t i = tid; i < seg.len; i += stride) dst[i] = src[i];
    }
}

extern "C" __global__ void kutta_scatter(const float* flat, const Segment* segs, unsigned int nsegs)
{
    const size_t tid = grid_tid(), stride = grid_stride();
    for (unsigned int s = blockIdx.y; s < nsegs; s += gridDim.y) {
        const Segment seg = segs[s];
        const float* src = flat + seg.offset;
        float* dst = seg.ptr;
        for (size_t i = tid; i < seg.len; i += stride) dst[i] = src[i];
    }
}
