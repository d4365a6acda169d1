/* Decode attention over a KV cache in host memory (zeroinf's "cpu" KV tier).
 *
 * One query token per row: out[b, h*D:(h+1)*D] = softmax(scale * q[b,h] . K[b,hk,:end]) V[b,hk,:end]
 * with hk = h / (H / Hkv) (GQA), masked positions skipped. A decode step reads every cached key
 * and value once, so the kernel is bound by host memory bandwidth: each (row, kv head) pair is
 * one task, threads (pthreads, created per call: ~0.1 ms against tens of ms of work) take tasks from
 * an atomic counter, and a task streams its keys and values once (in one pass, key t beside
 * value t, the softmax online), converting 16-bit elements to float32 in registers (F16C/AVX2 where
 * the CPU has them, chosen at run time; portable C otherwise). torch's CPU SDPA converts 16-bit
 * inputs far more slowly than memory delivers them (models/host_attention.py has the figures).
 * An int8 cache (kernels/kv_quant.py's layout: one float32 scale per token and kv head) is read
 * as int8 and dequantized in registers: a key's score is (q . k) * its scale, a value's weight
 * p * its scale; this step's k and v are quantized as they are written, bit for bit as the
 * reference quantizes them.
 *
 * Arithmetic: float32 throughout (scores, softmax, sum of values), rounded once to the output
 * dtype: the float32 reference's, as torch's SDPA computes 16-bit inputs.
 *
 * Python: decode(q, k, v, out, mask, k_new, v_new, dims, strides, dtype, scale, threads[,
 * portable, ahead, kv_dtype, (k_scale, v_scale, ks_sb, ks_sh, vs_sb, vs_sh)]),
 * addresses as ints (torch's data_ptr()), the GIL released while it runs; portable=True takes
 * the portable path on any CPU (tests check both paths); ahead: software prefetch distance in
 * rows (default 8; 0 turns it off; tools/bench_host_attention.py compares); kv_dtype: the
 * cache's (-1: dtype's; 3: int8, with the scales' addresses and element strides).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ZI_X86 1
#endif

enum { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 }; /* I8: a cache's storage only, never q's or out's */

typedef struct {
    const char *q, *k, *v, *mask; /* mask: bool [B, end] with row stride mask_sb, or NULL */
    const char *k_new, *v_new;    /* this step's [B, Hkv, D] for cache index end - 1, or NULL */
    char *out;
    int64_t B, H, Hkv, D, end;
    int64_t q_sb, q_sh;           /* element strides of q [B, H, D] */
    int64_t k_sb, k_sh, k_st;     /* of k and v [B, Hkv, T, D] (D contiguous) */
    int64_t v_sb, v_sh, v_st;
    int64_t o_sb, mask_sb;        /* out [B, H * D]; mask [B, end] */
    int64_t kn_sb, kn_sh, vn_sb, vn_sh; /* of k_new and v_new */
    int dtype;                    /* of q, out, k_new, v_new, and of the cache unless kv_dtype */
    int kv_dtype;                 /* the cache's: dtype, or I8 with per-token scales below */
    const char *ks, *vs;          /* I8: float32 scales [B, Hkv, T] (T contiguous), x ~= q * s */
    int64_t ks_sb, ks_sh, vs_sb, vs_sh;
    float scale;
    int64_t next;                 /* the next task: atomic */
    int simd;
    int64_t ahead;                /* software prefetch: rows ahead of the one in use (0: none) */
    int threads;
} Job;

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
    if (exp == 0) {
        if (man == 0) {
            f = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            f = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        f = sign | 0x7f800000 | (man << 13);
    } else {
        f = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float r;
    memcpy(&r, &f, 4);
    return r;
}

static inline uint16_t float_to_half(float x) { /* round to nearest even */
    uint32_t f;
    memcpy(&f, &x, 4);
    uint32_t sign = (f >> 16) & 0x8000, exp = (f >> 23) & 0xff, man = f & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e), h = man >> shift, rem = man & ((1u << shift) - 1),
                 half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* may carry into the exponent: right */
    return (uint16_t)(sign | h);
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t f = (uint32_t)b << 16;
    float r;
    memcpy(&r, &f, 4);
    return r;
}

static inline uint16_t float_to_bf16(float x) {
    uint32_t f;
    memcpy(&f, &x, 4);
    if ((f & 0x7f800000) == 0x7f800000 && (f & 0x7fffff)) return (uint16_t)((f >> 16) | 0x40);
    f += 0x7fff + ((f >> 16) & 1);
    return (uint16_t)(f >> 16);
}

static inline float load(const char *p, int64_t i, int dtype) {
    if (dtype == F32) return ((const float *)p)[i];
    if (dtype == I8) return (float)((const int8_t *)p)[i];
    uint16_t x = ((const uint16_t *)p)[i];
    return dtype == F16 ? half_to_float(x) : bf16_to_float(x);
}

static inline void store(char *p, int64_t i, float x, int dtype) {
    if (dtype == F32)
        ((float *)p)[i] = x;
    else
        ((uint16_t *)p)[i] = dtype == F16 ? float_to_half(x) : float_to_bf16(x);
}

static inline int64_t elem_size(int dtype) { return dtype == F32 ? 4 : dtype == I8 ? 1 : 2; }

/* x [D] in `dtype` -> int8 q [D] and its scale, as kernels/kv_quant.py's reference (bit for bit):
 * absmax over D in float32 (exact), scale = absmax / 127, q = round half to even of
 * clamp(x / s, -127, 127) with s = scale (1 for an all-zero row, whose scale stays 0); both
 * divisions correctly rounded float32 (no -ffast-math here), rintf in the default rounding mode
 * rounds half to even. */
static void quantize_row(const char *x, int dtype, int64_t D, int8_t *q, float *scale) {
    float am = 0.f;
    for (int64_t d = 0; d < D; d++) {
        float a = fabsf(load(x, d, dtype));
        am = a > am ? a : am;
    }
    float sc = am / 127.f, s = sc > 0.f ? sc : 1.f;
    for (int64_t d = 0; d < D; d++) {
        float t = load(x, d, dtype) / s;
        t = t < -127.f ? -127.f : t > 127.f ? 127.f : t;
        q[d] = (int8_t)rintf(t);
    }
    *scale = sc;
}

/* Portable: score of one key, and acc += p * value, for D elements. */
static float dot_scalar(const float *q, const char *k, int64_t D, int dtype) {
    float s = 0.f;
    for (int64_t d = 0; d < D; d++) s += q[d] * load(k, d, dtype);
    return s;
}

static void axpy_scalar(float *acc, float p, const char *v, int64_t D, int dtype) {
    for (int64_t d = 0; d < D; d++) acc[d] += p * load(v, d, dtype);
}

#ifdef ZI_X86
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256 load8(const char *p, int64_t i,
                                                                     int dtype) {
    if (dtype == F32) return _mm256_loadu_ps((const float *)p + i);
    if (dtype == I8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + i))));
    __m128i x = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dtype == F16) return _mm256_cvtph_ps(x);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}

#endif

/* Ask for the cache lines of row `t + ahead` of a [T, D] block with row stride `st` bytes: a
 * task's block is a few hundred KB, crossing a page boundary every 4 KiB (16 rows of 128 fp16),
 * where the hardware's stream prefetcher stops and starts again. */
static inline void prefetch_row(const Job *j, const char *base, int64_t t, int64_t st,
                                int64_t row) {
#if defined(__GNUC__)
    if (j->ahead && t + j->ahead < j->end)
        for (int64_t b = 0; b < row; b += 64) __builtin_prefetch(base + (t + j->ahead) * st + b);
#endif
}

/* A row's sums times c, where its running max grew. */
static void rescale(float *acc, int64_t D, float c) {
    for (int64_t d = 0; d < D; d++) acc[d] *= c;
}

/* The portable path: key by key, the softmax online. mx, sum: [n_rep] running max and sum. */
static void attend_portable(const Job *j, const char *kc, const char *vc, const float *ksc,
                            const float *vsc, const char *m, const float *qf, float *acc,
                            float *mx, float *sum) {
    int kd = j->kv_dtype;
    int64_t size = elem_size(kd), n_rep = j->H / j->Hkv, D = j->D, row = D * size;
    for (int64_t t = 0; t < j->end; t++) {
        prefetch_row(j, kc, t, j->k_st * size, row);
        prefetch_row(j, vc, t, j->v_st * size, row);
        if (m && !m[t]) continue;
        for (int64_t r = 0; r < n_rep; r++) {
            float s = dot_scalar(qf + r * D, kc + t * j->k_st * size, D, kd);
            if (ksc) s *= ksc[t]; /* q . (k * scale) = (q . k) * scale */
            if (s > mx[r]) {
                float c = expf(mx[r] - s); /* 0 at the first visible position */
                sum[r] *= c;
                rescale(acc + r * D, D, c);
                mx[r] = s;
            }
            float p = expf(s - mx[r]);
            sum[r] += p;
            axpy_scalar(acc + r * D, vsc ? p * vsc[t] : p, vc + t * j->v_st * size, D, kd);
        }
    }
}

#ifdef ZI_X86
enum { BLOCK = 16 }; /* keys per block: 4 KiB of keys and 4 KiB of values at D = 128, fp16 */

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline float dot_avx2(const float *q,
                                                                      const char *k, int64_t D,
                                                                      int dtype) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k, d, dtype), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k, d + 8, dtype), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 16), load8(k, d + 16, dtype), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 24), load8(k, d + 24, dtype), a3);
    }
    for (; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k, d, dtype), a0);
    a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* e^x for 8 floats x <= 0 (softmax weights), Cephes' expf: x = n ln 2 + r with |r| <= ln 2 / 2,
 * e^r by a degree-6 polynomial, 2^n into the exponent bits; within 2 ulp of expf. Below -87.3
 * (e^x under float's smallest normal, and -inf) it gives 0; NaN stays NaN. libm's expf, one
 * call per key, took a fifth of a cache-resident block's time. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256 exp_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 xc = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    p = _mm256_andnot_ps(tiny, p);
    return _mm256_blendv_ps(p, x, nan);
}

/* acc[0:D] += sum_i p[i] * rows[i][0:D]: 64 sums at a time in eight registers, so that eight
 * FMA chains run side by side and acc is loaded and stored once per block, not once per key. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void axpy_block_avx2(float *acc, const float *p,
                                                                     const char *const *rows,
                                                                     int n, int64_t D,
                                                                     int dtype) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_loadu_ps(acc + d + 8 * u);
        for (int i = 0; i < n; i++) {
            __m256 pp = _mm256_set1_ps(p[i]);
            for (int u = 0; u < 8; u++)
                a[u] = _mm256_fmadd_ps(pp, load8(rows[i], d + 8 * u, dtype), a[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(acc + d + 8 * u, a[u]);
    }
    for (; d < D; d += 8) {
        __m256 a = _mm256_loadu_ps(acc + d);
        for (int i = 0; i < n; i++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), load8(rows[i], d, dtype), a);
        _mm256_storeu_ps(acc + d, a);
    }
}

/* The AVX2 path (D a multiple of 8): BLOCK keys at a time, as flash attention tiles them: the
 * block's scores (independent dot products, which the core overlaps), one rescale of the sums
 * where the block raised the max, then its values into the sums. Key by key (the portable
 * path's order) each key waited for the one before (score, max, exp, then 128 sums loaded and
 * stored): ~16 GB/s per core on a cache-resident block, where the H100 machine's 16 cores must
 * each read ~8 GB/s from memory for the whole step; blocked, the arithmetic is a smaller share
 * of a key's time. Masked keys are left out of the block (neither read nor summed: a masked
 * slot may never have been written). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void attend_avx2_typed(
    const Job *j, const char *kc, const char *vc, const float *ksc, const float *vsc,
    const char *m, const float *qf, float *acc, float *mx, float *sum, const int dtype) {
    int64_t size = elem_size(dtype), n_rep = j->H / j->Hkv, D = j->D, row = D * size;
    int64_t kst = j->k_st * size, vst = j->v_st * size;
    const char *keys[BLOCK], *values[BLOCK];
    float s[BLOCK] __attribute__((aligned(32))), ks[BLOCK], vs[BLOCK]; /* vs: I8 only */
    for (int64_t t0 = 0; t0 < j->end; t0 += BLOCK) {
        int64_t t1 = t0 + BLOCK < j->end ? t0 + BLOCK : j->end;
        int n = 0;
        for (int64_t t = t0; t < t1; t++) {
            prefetch_row(j, kc, t, kst, row);
            prefetch_row(j, vc, t, vst, row);
            if (m && !m[t]) continue;
            if (dtype == I8) {
                ks[n] = ksc[t];
                vs[n] = vsc[t];
            }
            keys[n] = kc + t * kst;
            values[n++] = vc + t * vst;
        }
        for (int64_t r = 0; r < n_rep && n; r++) {
            float top = mx[r];
            for (int i = 0; i < n; i++) {
                s[i] = dot_avx2(qf + r * D, keys[i], D, dtype);
                if (dtype == I8) s[i] *= ks[i]; /* q . (k * scale) = (q . k) * scale */
                top = s[i] > top ? s[i] : top;
            }
            if (top > mx[r]) {
                float c = expf(mx[r] - top); /* 0 at the first visible position */
                sum[r] *= c;
                rescale(acc + r * D, D, c);
                mx[r] = top;
            }
            for (int i = n; i < BLOCK; i++) s[i] = -INFINITY; /* e^-inf = 0: no weight */
            __m256 total = _mm256_setzero_ps(), t8 = _mm256_set1_ps(top);
            for (int i = 0; i < n; i += 8) {
                __m256 p = exp_avx2(_mm256_sub_ps(_mm256_load_ps(s + i), t8));
                _mm256_store_ps(s + i, p);
                total = _mm256_add_ps(total, p);
            }
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
            h = _mm_hadd_ps(h, h);
            sum[r] += _mm_cvtss_f32(_mm_hadd_ps(h, h));
            if (dtype == I8)
                for (int i = 0; i < n; i++) s[i] *= vs[i]; /* p (v * scale) = (p * scale) v */
            axpy_block_avx2(acc + r * D, s, values, n, D, dtype);
        }
    }
}

/* attend_avx2_typed with the dtype a constant in each copy (no branch per load). */
__attribute__((target("avx2,fma,f16c"))) static void attend_avx2(
    const Job *j, const char *kc, const char *vc, const float *ksc, const float *vsc,
    const char *m, const float *qf, float *acc, float *mx, float *sum) {
    if (j->kv_dtype == F16)
        attend_avx2_typed(j, kc, vc, ksc, vsc, m, qf, acc, mx, sum, F16);
    else if (j->kv_dtype == BF16)
        attend_avx2_typed(j, kc, vc, ksc, vsc, m, qf, acc, mx, sum, BF16);
    else if (j->kv_dtype == I8)
        attend_avx2_typed(j, kc, vc, ksc, vsc, m, qf, acc, mx, sum, I8);
    else
        attend_avx2_typed(j, kc, vc, ksc, vsc, m, qf, acc, mx, sum, F32);
}
#endif

/* One (row, kv head): first this step's key and value into the cache at index end - 1 (when
 * given: the cache write and the attention in one pass, so that no torch CPU op runs just
 * before the kernel; torch's OpenMP threads spin for milliseconds after each parallel op and
 * would take the cores this kernel's threads need), then the attention of its n_rep query
 * heads, which share each key and value read. One pass: key t and value t are read close
 * together and the softmax is online (a row's sums are rescaled when its running max grows), so
 * each thread keeps two memory streams in flight; scores first and values in a second pass read
 * 20-28% slower on the H100 machine (tools/bench_host_attention.py --sweep, 2026-11-24).
 * Scratch: the scaled queries and the sums [n_rep, D] each. */
static void task(const Job *j, int64_t b, int64_t hk, float *qf, float *acc) {
    int64_t size = elem_size(j->dtype), n_rep = j->H / j->Hkv, end = j->end, D = j->D;
    int64_t cs = elem_size(j->kv_dtype); /* the cache's element size */
    char *kc = (char *)j->k + (b * j->k_sb + hk * j->k_sh) * cs;
    char *vc = (char *)j->v + (b * j->v_sb + hk * j->v_sh) * cs;
    float *ksc = NULL, *vsc = NULL;
    if (j->kv_dtype == I8) {
        ksc = (float *)j->ks + b * j->ks_sb + hk * j->ks_sh;
        vsc = (float *)j->vs + b * j->vs_sb + hk * j->vs_sh;
    }
    if (j->k_new) {
        const char *kn = j->k_new + (b * j->kn_sb + hk * j->kn_sh) * size;
        const char *vn = j->v_new + (b * j->vn_sb + hk * j->vn_sh) * size;
        char *kd = kc + (end - 1) * j->k_st * cs, *vd = vc + (end - 1) * j->v_st * cs;
        if (ksc) { /* quantized as written, as write_kv does */
            quantize_row(kn, j->dtype, D, (int8_t *)kd, ksc + end - 1);
            quantize_row(vn, j->dtype, D, (int8_t *)vd, vsc + end - 1);
        } else {
            memcpy(kd, kn, (size_t)(D * size));
            memcpy(vd, vn, (size_t)(D * size));
        }
    }
    const char *m = j->mask ? j->mask + b * j->mask_sb : NULL;
    for (int64_t r = 0; r < n_rep; r++) {
        const char *q = j->q + (b * j->q_sb + (hk * n_rep + r) * j->q_sh) * size;
        for (int64_t d = 0; d < D; d++) qf[r * D + d] = load(q, d, j->dtype) * j->scale;
    }
    memset(acc, 0, (size_t)(n_rep * D) * sizeof(float));
    float mx[n_rep], sum[n_rep];
    for (int64_t r = 0; r < n_rep; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0.f;
    }
#ifdef ZI_X86
    if (j->simd)
        attend_avx2(j, kc, vc, ksc, vsc, m, qf, acc, mx, sum);
    else
#endif
        attend_portable(j, kc, vc, ksc, vsc, m, qf, acc, mx, sum);
    for (int64_t r = 0; r < n_rep; r++) {
        char *o = j->out + (b * j->o_sb + (hk * n_rep + r) * D) * size;
        float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
        for (int64_t d = 0; d < D; d++) store(o, d, acc[r * D + d] * inv, j->dtype);
    }
}

static void *worker(void *arg) {
    Job *j = (Job *)arg;
    int64_t n_rep = j->H / j->Hkv, n = j->B * j->Hkv;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(2 * n_rep * j->D));
    if (!buf) return (void *)1;
    for (;;) {
        int64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (i >= n) break;
        task(j, i / j->Hkv, i % j->Hkv, buf, buf + n_rep * j->D);
    }
    free(buf);
    return NULL;
}

/* Whether this CPU takes the AVX2 path (AVX2, FMA and F16C, asked at run time). */
static int cpu_has_avx2(void) {
#ifdef ZI_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* decode()'s arguments into `j` (and its thread count); 0 with a Python error set on failure. */
static int parse_job(PyObject *args, Job *j) {
    unsigned long long q, k, v, out, mask, k_new, v_new;
    unsigned long long ks = 0, vs = 0;
    int portable = 0;
    memset(j, 0, sizeof *j);
    j->ahead = 8;
    j->kv_dtype = -1;
    if (!PyArg_ParseTuple(args, "KKKKKKK(LLLLL)(LLLLLLLLLLLLLL)ifi|pLi(KKLLLL)", &q, &k, &v, &out, &mask,
                          &k_new, &v_new, &j->B, &j->H, &j->Hkv, &j->D, &j->end, &j->q_sb,
                          &j->q_sh, &j->k_sb, &j->k_sh, &j->k_st, &j->v_sb, &j->v_sh, &j->v_st,
                          &j->o_sb, &j->mask_sb, &j->kn_sb, &j->kn_sh, &j->vn_sb, &j->vn_sh,
                          &j->dtype, &j->scale, &j->threads, &portable, &j->ahead,
                          &j->kv_dtype, &ks, &vs, &j->ks_sb, &j->ks_sh, &j->vs_sb, &j->vs_sh))
        return 0;
    if (j->kv_dtype < 0) j->kv_dtype = j->dtype;
    j->ks = (const char *)(uintptr_t)ks;
    j->vs = (const char *)(uintptr_t)vs;
    if (j->dtype < F32 || j->dtype > BF16 || (j->kv_dtype != j->dtype && j->kv_dtype != I8) ||
        (j->kv_dtype == I8 && (!j->ks || !j->vs)) || j->B < 0 || j->H <= 0 || j->Hkv <= 0 ||
        j->H % j->Hkv || j->D <= 0 || j->end <= 0 || j->ahead < 0 || !k_new != !v_new) {
        PyErr_SetString(PyExc_ValueError, "host_attn.decode: bad dtype, dimensions or new k/v");
        return 0;
    }
    j->q = (const char *)(uintptr_t)q;
    j->k = (const char *)(uintptr_t)k;
    j->v = (const char *)(uintptr_t)v;
    j->out = (char *)(uintptr_t)out;
    j->mask = (const char *)(uintptr_t)mask;
    j->k_new = (const char *)(uintptr_t)k_new;
    j->v_new = (const char *)(uintptr_t)v_new;
    j->simd = !portable && j->D % 8 == 0 && cpu_has_avx2();
    if (j->threads < 1) j->threads = 1;
    if (j->threads > j->B * j->Hkv) j->threads = (int)(j->B * j->Hkv > 0 ? j->B * j->Hkv : 1);
    return 1;
}

/* Kernel calls and their wall time since stats() last read them: the benchmark divides a
 * step's cache bytes by this time (the kernel's own rate inside a run) and sets it against the
 * step's time (the rest is the device's work between attentions and waits for weights). */
static int64_t stat_calls, stat_ns;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Every task of `j` on its threads (this one included); nonzero when memory ran out. */
static int run_job(Job *j) {
    int64_t t0 = now_ns();
    pthread_t *ids = (pthread_t *)calloc((size_t)j->threads, sizeof(pthread_t));
    if (!ids) return 1;
    int failed = 0, started = 0;
    for (; started < j->threads - 1; started++)
        if (pthread_create(&ids[started], NULL, worker, j)) break;
    if (worker(j)) failed = 1;
    for (int i = 0; i < started; i++) {
        void *r;
        pthread_join(ids[i], &r);
        if (r) failed = 1;
    }
    free(ids);
    __atomic_add_fetch(&stat_calls, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&stat_ns, now_ns() - t0, __ATOMIC_RELAXED);
    return failed;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    (void)self;
    Job j;
    if (!parse_job(args, &j)) return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = run_job(&j);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The same work as a host function in a CUDA stream (the driver's cuLaunchHostFunc, found in
 * libcuda at the first call): it runs on the driver's thread once the stream's earlier work
 * (the copies of q, k, v to the host) is done, and the stream's later work (the output's copy
 * back, the layer's rest) waits for it. The caller's thread queues the next layers meanwhile:
 * no host sync per layer, and the device's work between two attentions is all that separates
 * them. The caller keeps every buffer alive until an event after the function has completed.
 * A failure (memory) cannot raise there: it is counted, and failures() reports it. */
typedef int (*LaunchHostFunc)(void *stream, void (*fn)(void *), void *data);
static LaunchHostFunc launch_host_func;
static int async_failures;

static void host_func(void *data) {
    Job *j = (Job *)data;
    if (run_job(j)) __atomic_add_fetch(&async_failures, 1, __ATOMIC_RELAXED);
    free(j);
}

static PyObject *decode_async(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long stream;
    PyObject *inner;
    if (!PyArg_ParseTuple(args, "KO!", &stream, &PyTuple_Type, &inner)) return NULL;
    if (!launch_host_func) {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
        if (lib) launch_host_func = (LaunchHostFunc)dlsym(lib, "cuLaunchHostFunc");
        if (!launch_host_func) {
            PyErr_SetString(PyExc_RuntimeError, "host_attn.decode_async: no cuLaunchHostFunc in "
                                                "libcuda.so.1");
            return NULL;
        }
    }
    Job *j = (Job *)malloc(sizeof(Job));
    if (!j) return PyErr_NoMemory();
    if (!parse_job(inner, j)) {
        free(j);
        return NULL;
    }
    int rc = launch_host_func((void *)(uintptr_t)stream, host_func, j);
    if (rc) {
        free(j);
        PyErr_Format(PyExc_RuntimeError, "host_attn.decode_async: cuLaunchHostFunc failed (%d)", rc);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *failures(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(__atomic_exchange_n(&async_failures, 0, __ATOMIC_RELAXED));
}

static PyObject *stats(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    int64_t calls = __atomic_exchange_n(&stat_calls, 0, __ATOMIC_RELAXED);
    int64_t ns = __atomic_exchange_n(&stat_ns, 0, __ATOMIC_RELAXED);
    return Py_BuildValue("(Ld)", (long long)calls, (double)ns / 1e9);
}

static PyObject *simd(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(cpu_has_avx2() ? "avx2" : "portable");
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(q, k, v, out, mask, k_new, v_new, (B, H, Hkv, D, end), (q_sb, q_sh, k_sb, k_sh, k_st, "
     "v_sb, v_sh, v_st, o_sb, mask_sb, kn_sb, kn_sh, vn_sb, vn_sh), dtype, scale, threads[, "
     "portable, ahead, kv_dtype, scales]): write this step's k, v (0: none) at end - 1, then one-token attention over a host KV cache"},
    {"decode_async", decode_async, METH_VARARGS,
     "decode_async(stream, args): decode(*args) as a host function queued in a CUDA stream"},
    {"failures", failures, METH_NOARGS,
     "how many queued decodes ran out of memory since the last call (and reset the count)"},
    {"stats", stats, METH_NOARGS,
     "(calls, seconds) of the kernel since the last call (and reset them)"},
    {"simd", simd, METH_NOARGS, "the vector path this CPU takes: 'avx2' or 'portable'"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native_attn",
                                    "Decode attention over a host KV cache", -1, methods};

PyMODINIT_FUNC PyInit__native_attn(void) { return PyModule_Create(&module); }
