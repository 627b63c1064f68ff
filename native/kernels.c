/* Hamming distance kernels, one family per SIMD level, and the run-time choice
 * between them. Each level is compiled with its own target attribute, so the module
 * itself needs no -march flag and runs on any x86-64 (or any other CPU, generic only). */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CMH_X86 1
#include <immintrin.h>
#else
#define CMH_X86 0
#endif

/* Advanced SIMD is part of every ARM64 CPU: no run-time check is needed. */
#if defined(__aarch64__)
#define CMH_ARM64 1
#include <arm_neon.h>
#else
#define CMH_ARM64 0
#endif

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The last (nbytes % 8) bytes of a code, zero-extended into one word. */
static inline uint64_t load_tail(const uint8_t *p, size_t len) {
    uint64_t v = 0;
    memcpy(&v, p, len);
    return v;
}

#if defined(__GNUC__) || defined(__clang__)
#define POP64(x) ((unsigned)__builtin_popcountll(x))
#define POP32(x) ((unsigned)__builtin_popcount(x))
#else
static inline unsigned pop64_swar(uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (unsigned)((x * 0x0101010101010101ULL) >> 56);
}
#define POP64(x) pop64_swar(x)
#define POP32(x) pop64_swar((uint64_t)(x))
#endif

/* Scalar kernels: fixed widths of 4, 8, 16 and 32 bytes, and any width. The same body
 * is compiled once plain (generic) and once with the POPCNT instruction enabled. */
#define DEFINE_SCALAR_KERNELS(SUFFIX, ATTR)                                                      \
    ATTR static void dist4_##SUFFIX(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,  \
                                    uint16_t *out) {                                            \
        const uint32_t a = load32(q);                                                           \
        for (size_t j = 0; j < n; j++) out[j] = (uint16_t)POP32(a ^ load32(db + 4 * j));        \
    }                                                                                           \
    ATTR static void dist8_##SUFFIX(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,  \
                                    uint16_t *out) {                                            \
        const uint64_t a = load64(q);                                                           \
        for (size_t j = 0; j < n; j++) out[j] = (uint16_t)POP64(a ^ load64(db + 8 * j));        \
    }                                                                                           \
    ATTR static void dist16_##SUFFIX(const uint8_t *q, const uint8_t *db, size_t n, size_t nb, \
                                     uint16_t *out) {                                           \
        const uint64_t a0 = load64(q), a1 = load64(q + 8);                                      \
        for (size_t j = 0; j < n; j++, db += 16)                                                \
            out[j] = (uint16_t)(POP64(a0 ^ load64(db)) + POP64(a1 ^ load64(db + 8)));           \
    }                                                                                           \
    ATTR static void dist32_##SUFFIX(const uint8_t *q, const uint8_t *db, size_t n, size_t nb, \
                                     uint16_t *out) {                                           \
        const uint64_t a0 = load64(q), a1 = load64(q + 8), a2 = load64(q + 16),                 \
                       a3 = load64(q + 24);                                                     \
        for (size_t j = 0; j < n; j++, db += 32)                                                \
            out[j] = (uint16_t)(POP64(a0 ^ load64(db)) + POP64(a1 ^ load64(db + 8)) +           \
                                POP64(a2 ^ load64(db + 16)) + POP64(a3 ^ load64(db + 24)));     \
    }                                                                                           \
    ATTR static void distany_##SUFFIX(const uint8_t *q, const uint8_t *db, size_t n,           \
                                      size_t nb, uint16_t *out) {                               \
        const size_t words = nb / 8, rest = nb % 8;                                             \
        const uint64_t qtail = load_tail(q + 8 * words, rest);                                  \
        for (size_t j = 0; j < n; j++, db += nb) {                                              \
            unsigned d = 0;                                                                     \
            for (size_t w = 0; w < words; w++) d += POP64(load64(q + 8 * w) ^ load64(db + 8 * w)); \
            if (rest) d += POP64(qtail ^ load_tail(db + 8 * words, rest));                      \
            out[j] = (uint16_t)d;                                                               \
        }                                                                                       \
    }

DEFINE_SCALAR_KERNELS(generic, )
#if CMH_X86
DEFINE_SCALAR_KERNELS(popcnt, __attribute__((target("popcnt"))))
#endif

static cmh_dist_fn pick_scalar(size_t nbytes, cmh_dist_fn d4, cmh_dist_fn d8, cmh_dist_fn d16,
                               cmh_dist_fn d32, cmh_dist_fn dany) {
    switch (nbytes) {
    case 4: return d4;
    case 8: return d8;
    case 16: return d16;
    case 32: return d32;
    default: return dany;
    }
}

#if CMH_X86
/* AVX2 has no vector popcount. Bytes are counted with a nibble lookup (Mula): two
 * vpshufb per vector, the high nibbles moved down by a 16-bit multiply-high (x * 2^12 >> 16)
 * rather than a shift, since shifts compete with vpshufb for the same two vector ports on
 * AMD Zen; vpsadbw then sums 8 bytes per 64-bit lane. */
#define AVX2_ATTR __attribute__((target("avx2,popcnt")))

AVX2_ATTR static inline __m256i byte_counts_avx2(__m256i x) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                         2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(x, low4);
    const __m256i hi = _mm256_and_si256(_mm256_mulhi_epu16(x, _mm256_set1_epi16(0x1000)), low4);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

/* popcount(a XOR the 32 bytes at p), as four partial sums in the 64-bit lanes. */
AVX2_ATTR static inline __m256i lane_counts_avx2(__m256i a, const uint8_t *p) {
    __m256i x = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)p));
    return _mm256_sad_epu8(byte_counts_avx2(x), _mm256_setzero_si256());
}

/* 64-bit codes: 16 per step (four vectors of four), counts packed to uint16 in order. */
AVX2_ATTR static void dist8_avx2(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                 uint16_t *out) {
    const __m256i a = _mm256_set1_epi64x((long long)load64(q));
    /* after the pack, 64-bit chunks hold codes (0,4,1,5) (8,12,9,13) (2,6,3,7) (10,14,11,15) */
    const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const uint8_t *p = db + 8 * j;
        __m256i c0 = lane_counts_avx2(a, p), c1 = lane_counts_avx2(a, p + 32);
        __m256i c2 = lane_counts_avx2(a, p + 64), c3 = lane_counts_avx2(a, p + 96);
        __m256i c01 = _mm256_or_si256(c0, _mm256_slli_epi64(c1, 32));
        __m256i c23 = _mm256_or_si256(c2, _mm256_slli_epi64(c3, 32));
        __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(c01, c23), 0xD8);
        _mm256_storeu_si256((__m256i *)(out + j), _mm256_shuffle_epi8(w, order));
    }
    if (j < n) dist8_popcnt(q, db + 8 * j, n - j, nb, out + j);
}

/* 256-bit codes: per step four codes on the vector units and three on scalar POPCNT, so
 * that both kinds of execution units work (either alone is about 1.3x slower). */
AVX2_ATTR static void dist32_avx2(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                  uint16_t *out) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)q);
    const uint64_t a0 = load64(q), a1 = load64(q + 8), a2 = load64(q + 16), a3 = load64(q + 24);
    size_t j = 0;
    for (; j + 7 <= n; j += 7) {
        const uint8_t *p = db + 32 * j;
        __m256i c0 = lane_counts_avx2(a, p), c1 = lane_counts_avx2(a, p + 32);
        __m256i c2 = lane_counts_avx2(a, p + 64), c3 = lane_counts_avx2(a, p + 96);
        for (int v = 4; v < 7; v++) {
            const uint8_t *r = p + 32 * v;
            out[j + v] = (uint16_t)(POP64(a0 ^ load64(r)) + POP64(a1 ^ load64(r + 8)) +
                                    POP64(a2 ^ load64(r + 16)) + POP64(a3 ^ load64(r + 24)));
        }
        /* codes 0-3: interleave their lane sums as 32-bit words, add the lanes pairwise */
        __m256i c01 = _mm256_or_si256(c0, _mm256_slli_epi64(c1, 32));
        __m256i c23 = _mm256_or_si256(c2, _mm256_slli_epi64(c3, 32));
        __m256i s = _mm256_add_epi32(_mm256_unpacklo_epi64(c01, c23), _mm256_unpackhi_epi64(c01, c23));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        _mm_storel_epi64((__m128i *)(out + j), _mm_packus_epi32(t, t));
    }
    if (j < n) dist32_popcnt(q, db + 32 * j, n - j, nb, out + j);
}

/* Codes of 2, 3, 4... 32-byte blocks (512, 768, 1024... bits): lane sums accumulated over
 * the blocks of one code. */
AVX2_ATTR static void dist_blocks32_avx2(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                         uint16_t *out) {
    const size_t blocks = nb / 32;
    for (size_t j = 0; j < n; j++, db += nb) {
        __m256i acc = _mm256_setzero_si256();
        for (size_t b = 0; b < blocks; b++)
            acc = _mm256_add_epi64(acc, lane_counts_avx2(_mm256_loadu_si256((const __m256i *)(q + 32 * b)),
                                                         db + 32 * b));
        __m128i s = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
        out[j] = (uint16_t)_mm_cvtsi128_si64(s);
    }
}

/* Planar kernels: many queries against one database block. The block is first rewritten
 * ("packed") so that each byte holds one nibble of one code, in groups of 32 codes: for
 * each byte position b of the code, 32 bytes hold the low nibbles of byte b of the 32
 * codes, then 32 bytes their high nibbles. A query becomes two 32-byte tables per byte
 * position: entry v is popcount(v XOR the low, resp. high, nibble of its byte b). One
 * vpshufb then looks up the contributions of 32 codes at once, and the byte sums over the
 * byte positions are the distances of 32 codes in order: no XOR, no nibble split and no
 * horizontal sums per query, about half the vector work of dist8_avx2 per code. Groups
 * whose codes are all at or above the caller's threshold are skipped before anything is
 * widened or stored. Packing costs a few queries' worth of work, so search_core.c uses
 * these kernels only when a thread has many queries. */
AVX2_ATTR static void planar_pack_avx2(const uint8_t *db, size_t n, size_t nb, uint8_t *out) {
    const __m128i pairs = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const size_t padded = (n + CMH_PLANAR_GROUP - 1) / CMH_PLANAR_GROUP * CMH_PLANAR_GROUP;
    for (size_t g = 0; g < padded; g += 16) {
        const size_t in_group = g >= n ? 0 : n - g < 16 ? n - g : 16;
        uint8_t *dst = out + (g / 32) * 64 * nb + 16 * (g / 16 % 2); /* this half of its group */
        for (size_t w = 0; w < nb / 8; w++) {
            /* word w of codes g..g+15 (zeros past n), two per register, then bytes paired:
             * 16-bit element p of x[i] = byte p of codes 2i and 2i+1 */
            __m128i x[8];
            for (size_t i = 0; i < 8; i++) {
                uint64_t a = 2 * i < in_group ? load64(db + (g + 2 * i) * nb + 8 * w) : 0;
                uint64_t b = 2 * i + 1 < in_group ? load64(db + (g + 2 * i + 1) * nb + 8 * w) : 0;
                x[i] = _mm_shuffle_epi8(_mm_set_epi64x((long long)b, (long long)a), pairs);
            }
            /* transpose the 8x8 matrix of 16-bit elements (rows x[i]): y[p] = byte p of the
             * 16 codes; t[2i], t[2i+1]: bytes 0-3 and 4-7 of rows 2i, 2i+1 */
            __m128i t[8], u[8], y[8];
            for (size_t i = 0; i < 4; i++) {
                t[2 * i] = _mm_unpacklo_epi16(x[2 * i], x[2 * i + 1]);
                t[2 * i + 1] = _mm_unpackhi_epi16(x[2 * i], x[2 * i + 1]);
            }
            /* u[4i + m]: bytes 2m, 2m+1 of rows 4i..4i+3 (codes 8i..8i+7) */
            for (size_t i = 0; i < 2; i++) {
                const __m128i *r = t + 4 * i;
                u[4 * i] = _mm_unpacklo_epi32(r[0], r[2]);
                u[4 * i + 1] = _mm_unpackhi_epi32(r[0], r[2]);
                u[4 * i + 2] = _mm_unpacklo_epi32(r[1], r[3]);
                u[4 * i + 3] = _mm_unpackhi_epi32(r[1], r[3]);
            }
            for (size_t m = 0; m < 4; m++) {
                y[2 * m] = _mm_unpacklo_epi64(u[m], u[4 + m]);
                y[2 * m + 1] = _mm_unpackhi_epi64(u[m], u[4 + m]);
            }
            for (size_t p = 0; p < 8; p++) {
                uint8_t *o = dst + 64 * (8 * w + p);
                _mm_storeu_si128((__m128i *)o, _mm_and_si128(y[p], low4));
                _mm_storeu_si128((__m128i *)(o + 32), _mm_and_si128(_mm_srli_epi16(y[p], 4), low4));
            }
        }
    }
}

/* The 64 bytes of tables per byte of the query. */
AVX2_ATTR static void planar_table_avx2(const uint8_t *q, size_t nb, uint8_t *out) {
    const __m256i pop4 = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                          2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i iota = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0,
                                          1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (size_t b = 0; b < nb; b++, out += 64) {
        const __m256i lo = _mm256_set1_epi8((char)(q[b] & 15)), hi = _mm256_set1_epi8((char)(q[b] >> 4));
        _mm256_storeu_si256((__m256i *)out, _mm256_shuffle_epi8(pop4, _mm256_xor_si256(iota, lo)));
        _mm256_storeu_si256((__m256i *)(out + 32), _mm256_shuffle_epi8(pop4, _mm256_xor_si256(iota, hi)));
    }
}

/* Distances of one query (its tables) to packed codes, two groups of 32 per step; the
 * tables are loaded once per step (those of 8-byte codes would fit in registers, but GCC
 * then schedules all lookups first and spills them). Table entries are at most 4, so the
 * byte sums of each nibble half stay below 256 for up to 63 bytes; the halves are added
 * with saturation, which is exact below 255. A step whose 64 sums are all >= limit (where
 * limit <= 255) writes nothing; otherwise exact distances go to out[j..j+64) and j / 64
 * to steps[]. Returns the number of steps listed. */
AVX2_ATTR static size_t planar_dist_avx2(const uint8_t *tables, const uint8_t *packed, size_t n,
                                         size_t nb, uint32_t limit, uint16_t *out, uint32_t *steps) {
    const size_t group = 64 * nb; /* bytes of 32 packed codes */
    const __m256i lim = _mm256_set1_epi8((char)(limit < 255 ? limit : 255));
    const int all_pass = limit > 255;
    size_t listed = 0;
    for (size_t j = 0; j < n; j += 64, packed += 2 * group) {
        __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
        const uint8_t *t = tables, *p = packed;
        for (size_t b = 0; b < nb; b++, t += 64, p += 64) {
            const __m256i tl = _mm256_loadu_si256((const __m256i *)t);
            const __m256i th = _mm256_loadu_si256((const __m256i *)(t + 32));
            lo0 = _mm256_add_epi8(lo0, _mm256_shuffle_epi8(tl, _mm256_loadu_si256((const __m256i *)p)));
            hi0 = _mm256_add_epi8(hi0, _mm256_shuffle_epi8(th, _mm256_loadu_si256((const __m256i *)(p + 32))));
            lo1 = _mm256_add_epi8(lo1, _mm256_shuffle_epi8(tl, _mm256_loadu_si256((const __m256i *)(p + group))));
            hi1 = _mm256_add_epi8(hi1, _mm256_shuffle_epi8(th, _mm256_loadu_si256((const __m256i *)(p + group + 32))));
        }
        if (!all_pass) {
            const __m256i m = _mm256_min_epu8(_mm256_adds_epu8(lo0, hi0), _mm256_adds_epu8(lo1, hi1));
            const __m256i below = _mm256_subs_epu8(lim, m);
            if (_mm256_testz_si256(below, below)) continue;
        }
        /* exact: widen each half to 16 bits before adding (the sum may be 256) */
        const __m256i halves[4] = {lo0, hi0, lo1, hi1};
        for (size_t g = 0; g < 2; g++) {
            const __m256i lo = halves[2 * g], hi = halves[2 * g + 1];
            uint16_t *o = out + j + 32 * g;
            _mm256_storeu_si256((__m256i *)o, _mm256_add_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo)),
                                                               _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi))));
            _mm256_storeu_si256((__m256i *)(o + 16), _mm256_add_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1)),
                                                                      _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1))));
        }
        steps[listed++] = (uint32_t)(j / 64);
    }
    return listed;
}

#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt")))

/* 32-bit codes: 16 per vector. */
AVX512_ATTR static void dist4_avx512(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                     uint16_t *out) {
    const __m512i a = _mm512_set1_epi32((int)load32(q));
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512i c = _mm512_popcnt_epi32(_mm512_xor_si512(a, _mm512_loadu_si512(db + 4 * j)));
        _mm256_storeu_si256((__m256i *)(out + j), _mm512_cvtepi32_epi16(c));
    }
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        __m512i c = _mm512_popcnt_epi32(_mm512_xor_si512(a, _mm512_maskz_loadu_epi32(m, db + 4 * j)));
        _mm512_mask_cvtepi32_storeu_epi16(out + j, m, c);
    }
}

/* 64-bit codes: 8 per vector. */
AVX512_ATTR static void dist8_avx512(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                     uint16_t *out) {
    const __m512i a = _mm512_set1_epi64((long long)load64(q));
    /* 32 codes per step: four vectors of counts (< 2^16) are merged into one by shifts,
     * lane l holding codes l, l+8, l+16, l+24, and one word permute puts them in order
     * (cheaper than four narrowing moves, which all compete for one port) */
    const __m512i order = _mm512_set_epi16(31, 27, 23, 19, 15, 11, 7, 3, 30, 26, 22, 18, 14, 10, 6, 2,
                                           29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
    size_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const uint8_t *p = db + 8 * j;
        __m512i c0 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(p)));
        __m512i c1 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(p + 64)));
        __m512i c2 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(p + 128)));
        __m512i c3 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(p + 192)));
        __m512i m = _mm512_or_si512(_mm512_or_si512(c0, _mm512_slli_epi64(c1, 16)),
                                    _mm512_or_si512(_mm512_slli_epi64(c2, 32), _mm512_slli_epi64(c3, 48)));
        _mm512_storeu_si512(out + j, _mm512_permutexvar_epi16(order, m));
    }
    for (; j < n; j += 8) {
        size_t left = n - j < 8 ? n - j : 8;
        __mmask8 m = (__mmask8)((1u << left) - 1);
        __m512i c = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_maskz_loadu_epi64(m, db + 8 * j)));
        _mm512_mask_cvtepi64_storeu_epi16(out + j, m, c);
    }
}

/* Sum adjacent 64-bit lanes of the 16-lane sequence (x, y): lane t = s[2t] + s[2t+1]. */
AVX512_ATTR static inline __m512i pair_sums(__m512i x, __m512i y) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    return _mm512_add_epi64(_mm512_permutex2var_epi64(x, even, y),
                            _mm512_permutex2var_epi64(x, odd, y));
}

/* 128-bit codes: 8 codes are two vectors of per-word counts, reduced pairwise. */
AVX512_ATTR static void dist16_avx512(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                      uint16_t *out) {
    const __m512i a = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)q));
    size_t j = 0;
    for (; j + 8 <= n; j += 8, db += 128) {
        __m512i c0 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(db)));
        __m512i c1 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(db + 64)));
        _mm_storeu_si128((__m128i *)(out + j), _mm512_cvtepi64_epi16(pair_sums(c0, c1)));
    }
    if (j < n) dist16_popcnt(q, db, n - j, nb, out + j);
}

/* 256-bit codes: 8 codes are four vectors, reduced pairwise twice. */
AVX512_ATTR static void dist32_avx512(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                      uint16_t *out) {
    const __m512i a = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q));
    size_t j = 0;
    for (; j + 8 <= n; j += 8, db += 256) {
        __m512i c0 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(db)));
        __m512i c1 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(db + 64)));
        __m512i c2 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(db + 128)));
        __m512i c3 = _mm512_popcnt_epi64(_mm512_xor_si512(a, _mm512_loadu_si512(db + 192)));
        __m512i s = pair_sums(pair_sums(c0, c1), pair_sums(c2, c3));
        _mm_storeu_si128((__m128i *)(out + j), _mm512_cvtepi64_epi16(s));
    }
    if (j < n) dist32_popcnt(q, db, n - j, nb, out + j);
}

/* Any other length: 64-byte chunks, the last one loaded under a byte mask. */
AVX512_ATTR static void distany_avx512(const uint8_t *q, const uint8_t *db, size_t n, size_t nb,
                                       uint16_t *out) {
    const size_t chunks = nb / 64, rest = nb % 64;
    const __mmask64 tail = rest ? (((__mmask64)1 << rest) - 1) : 0;
    for (size_t j = 0; j < n; j++, db += nb) {
        __m512i acc = _mm512_setzero_si512();
        for (size_t c = 0; c < chunks; c++)
            acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(
                                            _mm512_loadu_si512(q + 64 * c),
                                            _mm512_loadu_si512(db + 64 * c))));
        if (rest)
            acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(
                                            _mm512_maskz_loadu_epi8(tail, q + 64 * chunks),
                                            _mm512_maskz_loadu_epi8(tail, db + 64 * chunks))));
        out[j] = (uint16_t)_mm512_reduce_add_epi64(acc);
    }
}
#endif /* CMH_X86 */

#if CMH_ARM64
/* ARM64 has no scalar popcount: __builtin_popcountll becomes a move to a vector register,
 * vcnt, a horizontal add and a move back for every word. These kernels keep the codes in
 * vector registers, count bits per byte with vcnt and add the byte counts of eight (or
 * sixteen) codes together with a tree of pairwise adds, a few instructions per code. */

/* v[i]: byte counts of code i (each <= 16). Returns the eight codes' totals. */
static inline uint16x8_t sum8_neon(const uint8x16_t v[8]) {
    uint8x16_t a = vpaddq_u8(vpaddq_u8(v[0], v[1]), vpaddq_u8(v[2], v[3])); /* codes 0-3, 4 bytes each */
    uint8x16_t b = vpaddq_u8(vpaddq_u8(v[4], v[5]), vpaddq_u8(v[6], v[7])); /* codes 4-7 */
    return vpaddlq_u8(vpaddq_u8(a, b)); /* two bytes per code (each <= 128), widened and added */
}

/* 64-bit codes: sixteen per step, two per vector. */
static void dist8_neon(const uint8_t *q, const uint8_t *db, size_t n, size_t nb, uint16_t *out) {
    const uint8x16_t a = vreinterpretq_u8_u64(vdupq_n_u64(load64(q)));
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const uint8_t *p = db + 8 * j;
        uint8x16_t v[8];
        for (int i = 0; i < 8; i++) v[i] = vcntq_u8(veorq_u8(a, vld1q_u8(p + 16 * i)));
        uint8x16_t s = vpaddq_u8(vpaddq_u8(vpaddq_u8(v[0], v[1]), vpaddq_u8(v[2], v[3])),
                                 vpaddq_u8(vpaddq_u8(v[4], v[5]), vpaddq_u8(v[6], v[7])));
        vst1q_u16(out + j, vmovl_u8(vget_low_u8(s)));
        vst1q_u16(out + j + 8, vmovl_high_u8(s));
    }
    if (j < n) dist8_generic(q, db + 8 * j, n - j, nb, out + j);
}

/* 128-bit codes: eight per step. */
static void dist16_neon(const uint8_t *q, const uint8_t *db, size_t n, size_t nb, uint16_t *out) {
    const uint8x16_t a = vld1q_u8(q);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        uint8x16_t v[8];
        for (int i = 0; i < 8; i++) v[i] = vcntq_u8(veorq_u8(a, vld1q_u8(db + 16 * (j + i))));
        vst1q_u16(out + j, sum8_neon(v));
    }
    if (j < n) dist16_generic(q, db + 16 * j, n - j, nb, out + j);
}

/* 256-bit codes: eight per step, each code's two halves added first. */
static void dist32_neon(const uint8_t *q, const uint8_t *db, size_t n, size_t nb, uint16_t *out) {
    const uint8x16_t a0 = vld1q_u8(q), a1 = vld1q_u8(q + 16);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        uint8x16_t v[8];
        for (int i = 0; i < 8; i++) {
            const uint8_t *p = db + 32 * (j + i);
            v[i] = vaddq_u8(vcntq_u8(veorq_u8(a0, vld1q_u8(p))), vcntq_u8(veorq_u8(a1, vld1q_u8(p + 16))));
        }
        vst1q_u16(out + j, sum8_neon(v));
    }
    if (j < n) dist32_generic(q, db + 32 * j, n - j, nb, out + j);
}

/* Any other length: 16-byte chunks counted into 16-bit lanes, the rest word by word. */
static void distany_neon(const uint8_t *q, const uint8_t *db, size_t n, size_t nb, uint16_t *out) {
    const size_t chunks = nb / 16, rest = nb % 16;
    for (size_t j = 0; j < n; j++, db += nb) {
        uint16x8_t acc = vdupq_n_u16(0);
        for (size_t c = 0; c < chunks; c++)
            acc = vpadalq_u8(acc, vcntq_u8(veorq_u8(vld1q_u8(q + 16 * c), vld1q_u8(db + 16 * c))));
        unsigned d = vaddvq_u16(acc);
        const uint8_t *qt = q + 16 * chunks, *dt = db + 16 * chunks;
        if (rest >= 8) d += POP64(load64(qt) ^ load64(dt));
        if (rest % 8) d += POP64(load_tail(qt + rest / 8 * 8, rest % 8) ^ load_tail(dt + rest / 8 * 8, rest % 8));
        out[j] = (uint16_t)d;
    }
}
#endif /* CMH_ARM64 */

static const char *const level_names[CMH_SIMD_COUNT] = {"generic", "popcnt", "avx2", "avx512", "neon"};

const char *cmh_simd_name(int level) {
    return (level >= 0 && level < CMH_SIMD_COUNT) ? level_names[level] : "unknown";
}

int cmh_simd_supported(int level) {
    if (level == CMH_SIMD_GENERIC) return 1;
#if CMH_ARM64
    if (level == CMH_SIMD_NEON) return 1;
#endif
#if CMH_X86
    __builtin_cpu_init();
    switch (level) {
    case CMH_SIMD_POPCNT: return __builtin_cpu_supports("popcnt") != 0;
    case CMH_SIMD_AVX2: return __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("avx2");
    case CMH_SIMD_AVX512:
        return __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vpopcntdq");
    }
#endif
    return 0;
}

int cmh_simd_best(void) {
    for (int level = CMH_SIMD_COUNT - 1; level > 0; level--)
        if (cmh_simd_supported(level)) return level;
    return CMH_SIMD_GENERIC;
}

/* -1 until first use; then set once from the CPU (or by cmh_simd_set). Reads and
 * writes of an int are atomic on every platform we build for. */
static volatile int current_level = -1;

int cmh_simd_current(void) {
    int level = current_level;
    if (level < 0) {
        level = cmh_simd_best();
        current_level = level;
    }
    return level;
}

int cmh_simd_set(int level) {
    if (level < 0 || level >= CMH_SIMD_COUNT || !cmh_simd_supported(level)) return -1;
    current_level = level;
    return 0;
}

int cmh_simd_level_named(const char *name) {
    for (int level = 0; level < CMH_SIMD_COUNT; level++)
        if (strcmp(name, cmh_simd_name(level)) == 0) return level;
    return -1;
}

int cmh_simd_from_env(void) {
    const char *env = getenv("CMHASH_SIMD");
    if (!env || !*env) return 0;
    return cmh_simd_set(cmh_simd_level_named(env));
}

cmh_dist_fn cmh_dist_kernel(size_t nbytes) {
    switch (cmh_simd_current()) {
#if CMH_X86
    case CMH_SIMD_AVX512:
        return pick_scalar(nbytes, dist4_avx512, dist8_avx512, dist16_avx512, dist32_avx512,
                           distany_avx512);
    case CMH_SIMD_AVX2:
        if (nbytes % 32 == 0 && nbytes > 32) return dist_blocks32_avx2;
        return pick_scalar(nbytes, dist4_popcnt, dist8_avx2, dist16_popcnt, dist32_avx2,
                           distany_popcnt);
    case CMH_SIMD_POPCNT:
        return pick_scalar(nbytes, dist4_popcnt, dist8_popcnt, dist16_popcnt, dist32_popcnt,
                           distany_popcnt);
#endif
#if CMH_ARM64
    case CMH_SIMD_NEON:
        return pick_scalar(nbytes, dist4_generic, dist8_neon, dist16_neon, dist32_neon, distany_neon);
#endif
    default:
        return pick_scalar(nbytes, dist4_generic, dist8_generic, dist16_generic, dist32_generic,
                           distany_generic);
    }
}

int cmh_planar_kernels(size_t nbytes, cmh_planar *out) {
#if CMH_X86
    if (cmh_simd_current() != CMH_SIMD_AVX2) return 0;
    if (nbytes % 8 != 0 || nbytes > 32) return 0;
    *out = (cmh_planar){planar_pack_avx2, planar_table_avx2, planar_dist_avx2};
    return 1;
#else
    (void)nbytes;
    (void)out;
    return 0;
#endif
}

#if CMH_X86
/* 2-byte label rows (9 to 16 classes, e.g. NUS-WIDE's 10): 32 rows per mask test. */
AVX512_ATTR static void any_common2_avx512(const uint8_t *a, const uint8_t *db, size_t n, uint8_t *out) {
    uint16_t x;
    memcpy(&x, a, 2);
    const __m512i query = _mm512_set1_epi16((short)x);
    const __m256i one = _mm256_set1_epi8(1);
    size_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __mmask32 hit = _mm512_test_epi16_mask(_mm512_loadu_si512(db + 2 * j), query);
        _mm256_storeu_si256((__m256i *)(out + j), _mm256_maskz_mov_epi8(hit, one));
    }
    if (j < n) {
        const __mmask32 tail = (__mmask32)((UINT64_C(1) << (n - j)) - 1);
        const __mmask32 hit = _mm512_mask_test_epi16_mask(tail, _mm512_maskz_loadu_epi16(tail, db + 2 * j), query);
        _mm256_mask_storeu_epi8(out + j, tail, _mm256_maskz_mov_epi8(hit, one));
    }
}
#endif

/* Python pads label rows to 1, 2, 4, 8 or 8m bytes: those widths get loops the compiler
 * vectorises (2 bytes: an AVX-512 mask test where the CPU has it); any width works. */
void cmh_any_common(const uint8_t *a, const uint8_t *db, size_t n, size_t nbytes, uint8_t *out) {
    switch (nbytes) {
    case 1: {
        const uint8_t x = a[0];
        for (size_t j = 0; j < n; j++) out[j] = (x & db[j]) != 0;
        return;
    }
    case 2: {
#if CMH_X86
        if (cmh_simd_current() == CMH_SIMD_AVX512) {
            any_common2_avx512(a, db, n, out);
            return;
        }
#endif
        uint16_t x, y;
        memcpy(&x, a, 2);
        for (size_t j = 0; j < n; j++) {
            memcpy(&y, db + 2 * j, 2);
            out[j] = (x & y) != 0;
        }
        return;
    }
    case 4: {
        const uint32_t x = load32(a);
        for (size_t j = 0; j < n; j++) out[j] = (x & load32(db + 4 * j)) != 0;
        return;
    }
    case 8: {
        const uint64_t x = load64(a);
        for (size_t j = 0; j < n; j++) out[j] = (x & load64(db + 8 * j)) != 0;
        return;
    }
    }
    if (nbytes < 8) { /* up to 64 labels: one word per item */
        const uint64_t x = load_tail(a, nbytes);
        for (size_t j = 0; j < n; j++) out[j] = (x & load_tail(db + j * nbytes, nbytes)) != 0;
        return;
    }
    for (size_t j = 0; j < n; j++, db += nbytes) {
        uint8_t hit = 0;
        for (size_t b = 0; b < nbytes && !hit; b++) hit = (a[b] & db[b]) != 0;
        out[j] = hit;
    }
}
