// Native CPU implementation of deltazip::add_delta_matmul (SGMV over packed deltas).
//
// out[r, :] += x[r, :] · Δ_sᵀ for every row r of every segment on slot s, reading the packed codes of
// deltazip.packed directly (qweight [S,N,W] int32, meta [S,N,K/32] int32 (2:4), scales/zeros [S,N,G] fp16).
// The dense delta is never built for the "direct" and "lut" strategies; "dense" decodes one tile of output
// rows at a time (≤ 4 MiB) and runs a BLAS GEMM on it (large segments: prefill).
//
// Strategies per segment (DELTAZIP_NATIVE_STRATEGY=auto|direct|lut|rowvec|dense):
//   direct  8 output rows per AVX2 register; codes and 2:4 positions decoded in registers once per block
//           and reused by up to 8 activation rows; x[col] of a kept value picked with one permute. Layouts
//           whose scale groups hold whole 16-value chunks (2/4/8-bit) run a fully unrolled loop.
//   rowvec  lanes = activation rows (x transposed per segment, blocks of 8/16/32 rows): each output row's
//           kept values decoded once into a small buffer, then one broadcast + one FMA per kept value and 8
//           rows, the 2:4 column an address (integer ops on the meta word) instead of a permute; K walked in
//           L1-sized chunks. Needs the unrolled layouts and AVX2.
//   lut     2-bit 2:4 only: per activation row, a table of the 96 possible partial sums of each group of 4
//           inputs (pattern x two codes); one table load per group of 4 weights (T-MAC / LUT-GEMM style).
//   dense   decode a tile of output rows to fp32, then at::mm (MKL) for many rows.
// auto = dense for segments of ≥ DELTAZIP_NATIVE_DENSE_ROWS rows (1024), rowvec for ≥
// DELTAZIP_NATIVE_ROWVEC_ROWS (9: a 16-row block; 16 rows on one delta run at ~0.7x the fp32 base GEMM vs
// ~1.3x for direct, one thread, and rowvec still beats dense at 512 rows), else direct; lut only when asked
// or for segments of ≤ DELTAZIP_NATIVE_LUT_ROWS rows (default 0: slower than direct here).
// Defaults from benchmarks/kernel.py on this 2-core AVX2 (Zen 3) machine.
// ISA: AVX2+FMA+F16C chosen at run time (target attributes, one portable build); a scalar path otherwise or
// with DELTAZIP_NATIVE_ISA=scalar. Threads: OpenMP over (segment, block of 64 output rows; a whole segment
// for lut), count = min(torch threads, CPUs this process may use: sched_getaffinity and the cgroup CPU
// quota, the rule of deltazip/threads.py); waiting is OpenMP's (deltazip.threads sets OMP_WAIT_POLICY).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

// ----------------------------------------------------------------------------------------- small helpers

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { man <<= 1; e++; } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

int usable_cpus() {
  static const int cpus = [] {
    int n = 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
    if (n <= 0) n = 1;
    double quota = -1;
    {  // cgroup v2
      std::ifstream f("/sys/fs/cgroup/cpu.max");
      std::string q;
      double period = 0;
      if (f >> q >> period && q != "max" && period > 0) quota = std::stod(q) / period;
    }
    if (quota <= 0) {  // cgroup v1
      std::ifstream fq("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), fp("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
      double q = -1, p = 0;
      if (fq >> q && fp >> p && q > 0 && p > 0) quota = q / p;
    }
    if (quota > 0) n = std::min(n, std::max(1, (int)std::ceil(quota)));
    return n;
  }();
  return cpus;
}

int thread_count(int64_t items) {
  int n = std::min(at::get_num_threads(), usable_cpus());
  return (int)std::max<int64_t>(1, std::min<int64_t>(n, items));
}

enum Strategy { AUTO = 0, DIRECT = 1, LUT = 2, DENSE = 3, ROWVEC = 4 };

Strategy env_strategy() {
  const char* s = std::getenv("DELTAZIP_NATIVE_STRATEGY");
  if (!s || !*s || !std::strcmp(s, "auto")) return AUTO;
  if (!std::strcmp(s, "direct")) return DIRECT;
  if (!std::strcmp(s, "lut")) return LUT;
  if (!std::strcmp(s, "dense")) return DENSE;
  if (!std::strcmp(s, "rowvec")) return ROWVEC;
  TORCH_CHECK_VALUE(false, "DELTAZIP_NATIVE_STRATEGY must be auto, direct, lut, dense or rowvec, not '", s, "'");
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return (s && *s) ? std::atoll(s) : fallback;
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

bool use_avx2() {
  const char* s = std::getenv("DELTAZIP_NATIVE_ISA");
  if (s && !std::strcmp(s, "scalar")) return false;
  return cpu_has_avx2();
}

// --------------------------------------------------------------------------------------------- problem

struct Problem {
  const float* x;  // fp32 [M, K], row stride sx
  int64_t sx;
  float* out;  // fp32 [M, N], row stride so
  int64_t so;
  const int32_t* q;  // [S, N, W]
  const int32_t* m;  // [S, N, K/32] or null
  const uint16_t* sc;  // [S, N, G]
  const uint16_t* ze;
  int64_t N, K, W, G, C, MW;  // MW = meta words per row
  int bits, group;
  bool sparse;
};

struct Seg {
  const int32_t* rows;
  int64_t count;
  int64_t slot;
};

// ------------------------------------------------------------------------------------------ scalar path

void halves_to_floats_scalar(const uint16_t* h, int64_t n, float* f) {
  for (int64_t i = 0; i < n; ++i) f[i] = half_to_float(h[i]);
}

// Calls fn(dense column, value) for every kept value of one delta row (any layout, any group size):
// walks the scale groups when a 2:4 group of 4 never straddles two of them, else divides per value.
template <int BITS, typename Fn>
inline void for_each_kept(const Problem& p, const int32_t* qr, const int32_t* mr, const float* zr,
                          const float* sr, Fn&& fn) {
  constexpr int VPW = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  auto code = [&](int64_t j) { return ((uint32_t)qr[j / VPW] >> ((j % VPW) * BITS)) & MASK; };
  auto column = [&](int64_t j) {
    return p.sparse ? (j / 2) * 4 + (int64_t)(((uint32_t)mr[j / 16] >> ((j % 16) * 2)) & 3) : j;
  };
  if (!p.sparse || p.group % 4 == 0) {
    const int64_t kept_per_group = p.sparse ? p.group / 2 : p.group;
    int64_t j = 0;
    for (int64_t g = 0; g < p.G; ++g) {
      const float s = sr[g], z = zr[g];
      for (const int64_t end = j + kept_per_group; j < end; ++j) fn(column(j), ((float)code(j) - z) * s);
    }
  } else {
    for (int64_t j = 0; j < p.C; ++j) {
      const int64_t col = column(j), g = col / p.group;
      fn(col, ((float)code(j) - zr[g]) * sr[g]);
    }
  }
}

// out rows [n0, n1) of one segment, every row of the segment (any layout, any group size).
template <int BITS>
void scalar_block_t(const Problem& p, const Seg& seg, int64_t n0, int64_t n1) {
  std::vector<float> acc(seg.count), sz(2 * p.G);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = seg.slot * p.N + n;
    halves_to_floats_scalar(p.ze + row * p.G, p.G, sz.data());
    halves_to_floats_scalar(p.sc + row * p.G, p.G, sz.data() + p.G);
    std::fill(acc.begin(), acc.end(), 0.f);
    for_each_kept<BITS>(p, p.q + row * p.W, p.sparse ? p.m + row * p.MW : nullptr, sz.data(),
                        sz.data() + p.G, [&](int64_t col, float v) {
                          for (int64_t r = 0; r < seg.count; ++r) acc[r] += v * p.x[seg.rows[r] * p.sx + col];
                        });
    for (int64_t r = 0; r < seg.count; ++r) p.out[seg.rows[r] * p.so + n] += acc[r];
  }
}

// Dense fp32 rows [n0, n1) of the slot into buf [n1 - n0, K].
template <int BITS>
void decode_rows_t(const Problem& p, int64_t slot, int64_t n0, int64_t n1, float* buf) {
  std::vector<float> sz(2 * p.G);
  for (int64_t n = n0; n < n1; ++n) {
    float* d = buf + (n - n0) * p.K;
    std::memset(d, 0, sizeof(float) * p.K);
    const int64_t row = slot * p.N + n;
    halves_to_floats_scalar(p.ze + row * p.G, p.G, sz.data());
    halves_to_floats_scalar(p.sc + row * p.G, p.G, sz.data() + p.G);
    for_each_kept<BITS>(p, p.q + row * p.W, p.sparse ? p.m + row * p.MW : nullptr, sz.data(),
                        sz.data() + p.G, [&](int64_t col, float v) { d[col] = v; });
  }
}

void scalar_block(const Problem& p, const Seg& seg, int64_t n0, int64_t n1) {
  switch (p.bits) {
    case 2: return scalar_block_t<2>(p, seg, n0, n1);
    case 3: return scalar_block_t<3>(p, seg, n0, n1);
    case 4: return scalar_block_t<4>(p, seg, n0, n1);
    default: return scalar_block_t<8>(p, seg, n0, n1);
  }
}

void decode_rows(const Problem& p, int64_t slot, int64_t n0, int64_t n1, float* buf) {
  switch (p.bits) {
    case 2: return decode_rows_t<2>(p, slot, n0, n1, buf);
    case 3: return decode_rows_t<3>(p, slot, n0, n1, buf);
    case 4: return decode_rows_t<4>(p, slot, n0, n1, buf);
    default: return decode_rows_t<8>(p, slot, n0, n1, buf);
  }
}

// ------------------------------------------------------------------------------------------ AVX2 path

#define DZ_AVX2 __attribute__((target("avx2,fma,f16c")))

DZ_AVX2 inline __m256 load_halves(const uint16_t* base, int64_t stride, int lanes) {
  alignas(16) uint16_t h[8];
  for (int l = 0; l < 8; ++l) h[l] = base[std::min(l, lanes - 1) * stride];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}

// 8 output rows (lanes) [nb, nb + lanes) x RB activation rows; codes decoded once per kept value.
// Needs: dense layout, or 2:4 with group % 4 == 0 (a group of 4 never straddles two scale groups).
template <int BITS, bool SPARSE, int RB>
DZ_AVX2 void direct_block(const Problem& p, int64_t slot, int64_t nb, int lanes, const int32_t* rows) {
  constexpr int VPW = 32 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const int64_t row0 = slot * p.N + nb;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i clamped = _mm256_min_epi32(lane, _mm256_set1_epi32(lanes - 1));
  const __m256i qoff = _mm256_mullo_epi32(clamped, _mm256_set1_epi32((int)p.W));
  const __m256i moff = _mm256_mullo_epi32(clamped, _mm256_set1_epi32((int)p.MW));
  const int32_t* qbase = p.q + row0 * p.W;
  const int32_t* mbase = SPARSE ? p.m + row0 * p.MW : nullptr;
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = p.x + rows[r] * p.sx;
  __m256 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t kept_per_group = SPARSE ? p.group / 2 : p.group;
  __m256i Q = _mm256_setzero_si256(), M = _mm256_setzero_si256();
  int64_t j = 0;
  for (int64_t g = 0; g < p.G; ++g) {
    const __m256 s = load_halves(p.sc + row0 * p.G + g, p.G, lanes);
    const __m256 z = load_halves(p.ze + row0 * p.G + g, p.G, lanes);
    const int64_t jend = j + kept_per_group;
    for (; j < jend; ++j) {
      const int jq = (int)(j % VPW);
      if (jq == 0 || j == jend - kept_per_group)
        Q = _mm256_srl_epi32(_mm256_i32gather_epi32(qbase + j / VPW, qoff, 4), _mm_cvtsi32_si128(jq * BITS));
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(Q, mask)), z), s);
      Q = _mm256_srli_epi32(Q, BITS);
      if (SPARSE) {
        const int jm = (int)(j & 15);
        if (jm == 0 || j == jend - kept_per_group)
          M = _mm256_srl_epi32(_mm256_i32gather_epi32(mbase + j / 16, moff, 4), _mm_cvtsi32_si128(jm * 2));
        // permutevar8x32 reads the low 3 bits; x[4g..4g+3] is broadcast to both halves, so bit 2 is moot
        const int64_t col = (j >> 1) * 4;
        for (int r = 0; r < RB; ++r) {
          const __m256 x4 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr[r] + col));
          acc[r] = _mm256_fmadd_ps(v, _mm256_permutevar8x32_ps(x4, M), acc[r]);
        }
        M = _mm256_srli_epi32(M, 2);
      } else {
        for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(xr[r] + j), acc[r]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    float* o = p.out + rows[r] * p.so + nb;
    if (lanes == 8) {
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[r]));
    } else {
      alignas(32) float t[8];
      _mm256_store_ps(t, acc[r]);
      for (int l = 0; l < lanes; ++l) o[l] += t[l];
    }
  }
}

// The same product when every scale group holds a whole number of 16-kept-value chunks (2/4/8-bit): each
// chunk's q words and meta word are gathered once and its 16 kept values fully unrolled (immediate shifts),
// with 4 / 2 independent accumulators for 1 / 2 rows so the FMA latency chain does not bound one row.
template <int BITS, bool SPARSE, int RB>
DZ_AVX2 void direct_block_fast(const Problem& p, int64_t slot, int64_t nb, int lanes, const int32_t* rows) {
  constexpr int VPW = 32 / BITS;
  constexpr int QW = 16 / VPW;  // q words per chunk of 16 kept values
  constexpr int NACC = RB == 1 ? 4 : (RB == 2 ? 2 : 1);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const int64_t row0 = slot * p.N + nb;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i clamped = _mm256_min_epi32(lane, _mm256_set1_epi32(lanes - 1));
  const __m256i qoff = _mm256_mullo_epi32(clamped, _mm256_set1_epi32((int)p.W));
  const __m256i moff = _mm256_mullo_epi32(clamped, _mm256_set1_epi32((int)p.MW));
  const int32_t* qbase = p.q + row0 * p.W;
  const int32_t* mbase = SPARSE ? p.m + row0 * p.MW : nullptr;
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = p.x + rows[r] * p.sx;
  __m256 acc[RB][NACC];
  for (int r = 0; r < RB; ++r)
    for (int a = 0; a < NACC; ++a) acc[r][a] = _mm256_setzero_ps();
  const int64_t chunks = (SPARSE ? p.group / 2 : p.group) / 16;
  int64_t j0 = 0;
  for (int64_t g = 0; g < p.G; ++g) {
    const __m256 s = load_halves(p.sc + row0 * p.G + g, p.G, lanes);
    const __m256 z = load_halves(p.ze + row0 * p.G + g, p.G, lanes);
    for (int64_t ch = 0; ch < chunks; ++ch, j0 += 16) {
      __m256i Qw[QW];
      for (int w = 0; w < QW; ++w) Qw[w] = _mm256_i32gather_epi32(qbase + j0 / VPW + w, qoff, 4);
      __m256i Mw = SPARSE ? _mm256_i32gather_epi32(mbase + j0 / 16, moff, 4) : _mm256_setzero_si256();
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj) {
        const __m256i c = _mm256_and_si256(_mm256_srli_epi32(Qw[jj / VPW], (jj % VPW) * BITS), mask);
        const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), z), s);
        if (SPARSE) {
          const __m256i idx = _mm256_srli_epi32(Mw, 2 * jj);  // low 3 bits used; x4 holds x twice
          const int64_t col = ((j0 + jj) >> 1) * 4;
          for (int r = 0; r < RB; ++r) {
            const __m256 x4 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xr[r] + col));
            acc[r][jj % NACC] = _mm256_fmadd_ps(v, _mm256_permutevar8x32_ps(x4, idx), acc[r][jj % NACC]);
          }
        } else {
          for (int r = 0; r < RB; ++r)
            acc[r][jj % NACC] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(xr[r] + j0 + jj), acc[r][jj % NACC]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    __m256 total = acc[r][0];
    for (int a = 1; a < NACC; ++a) total = _mm256_add_ps(total, acc[r][a]);
    float* o = p.out + rows[r] * p.so + nb;
    if (lanes == 8) {
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), total));
    } else {
      alignas(32) float t[8];
      _mm256_store_ps(t, total);
      for (int l = 0; l < lanes; ++l) o[l] += t[l];
    }
  }
}

template <int BITS, bool SPARSE, bool FAST>
DZ_AVX2 void direct_rows_impl(const Problem& p, const Seg& seg, int64_t n0, int64_t n1) {
  for (int64_t nb = n0; nb < n1; nb += 8) {
    const int lanes = (int)std::min<int64_t>(8, n1 - nb);
    int64_t r = 0;
    if constexpr (FAST) {
      for (; r + 8 <= seg.count; r += 8) direct_block_fast<BITS, SPARSE, 8>(p, seg.slot, nb, lanes, seg.rows + r);
      if (r + 4 <= seg.count) { direct_block_fast<BITS, SPARSE, 4>(p, seg.slot, nb, lanes, seg.rows + r); r += 4; }
      if (r + 2 <= seg.count) { direct_block_fast<BITS, SPARSE, 2>(p, seg.slot, nb, lanes, seg.rows + r); r += 2; }
      if (r < seg.count) direct_block_fast<BITS, SPARSE, 1>(p, seg.slot, nb, lanes, seg.rows + r);
    } else {
      for (; r + 8 <= seg.count; r += 8) direct_block<BITS, SPARSE, 8>(p, seg.slot, nb, lanes, seg.rows + r);
      if (r + 4 <= seg.count) { direct_block<BITS, SPARSE, 4>(p, seg.slot, nb, lanes, seg.rows + r); r += 4; }
      if (r + 2 <= seg.count) { direct_block<BITS, SPARSE, 2>(p, seg.slot, nb, lanes, seg.rows + r); r += 2; }
      if (r < seg.count) direct_block<BITS, SPARSE, 1>(p, seg.slot, nb, lanes, seg.rows + r);
    }
  }
}

bool fast_ok(const Problem& p) {
  const int64_t kept_per_group = p.sparse ? p.group / 2 : p.group;
  return p.bits != 3 && kept_per_group % 16 == 0 && std::getenv("DELTAZIP_NATIVE_NOFAST") == nullptr;
}

template <int BITS, bool SPARSE>
DZ_AVX2 void direct_rows(const Problem& p, const Seg& seg, int64_t n0, int64_t n1) {
  if constexpr (BITS != 3) {
    if (fast_ok(p)) return direct_rows_impl<BITS, SPARSE, true>(p, seg, n0, n1);
  }
  direct_rows_impl<BITS, SPARSE, false>(p, seg, n0, n1);
}

// Row-vector strategy (several rows on one delta): lanes = activation rows. x is transposed per segment into
// blocks of 32 / 16 / 8 rows, each xT [K][RW] (RW = 8 * NB rows, zero padded, 64-byte aligned).
// Per output row and K chunk the kept values are decoded once (16 at a time, vectorised) into a small buffer;
// then each kept value costs one broadcast load, NB loads of its xT column and NB FMAs for all RW rows: no
// permute, the 2:4 column is an address computed with integer ops from the meta word (which run beside the
// FMAs). K is walked in chunks whose xT part stays in L1 (partial sums kept per output row). Fast layouts only
// (whole 16-value chunks per scale group).
constexpr int64_t RV_CHUNK_FLOATS = 4096;  // xT floats per K chunk (16 KiB)
constexpr int64_t RV_AHEAD = 6;  // output rows prefetched ahead

// R output rows [n, n + R) over one K chunk, interleaved (independent work hides the address -> load -> FMA
// latency; measured 4% faster than one row at a time here); their decoded values at vb + r * jn, partial sums
// at rn + r * RW (read back when `carry`: not the first chunk).
template <bool SPARSE, int NB, int R>
DZ_AVX2 inline void rowvec_rows_acc(const Problem& p, int64_t slot, const float* xc, int64_t n, int64_t jbase,
                                    int64_t jn, bool carry, const float* vb, float* rn) {
  constexpr int RW = 8 * NB;
  constexpr int NS = R == 2 ? (NB == 4 ? 1 : 2) : (NB == 4 ? 2 : 4);  // accumulator sets: 8+ FMA chains
  const int32_t* mr = SPARSE ? p.m + (slot * p.N + n) * p.MW + jbase / 16 : nullptr;
  __m256 acc[R][NS][NB];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < NS; ++a)
      for (int b = 0; b < NB; ++b)
        acc[r][a][b] = a == 0 && carry ? _mm256_loadu_ps(rn + r * RW + 8 * b) : _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < jn; j0 += 16) {
    if (SPARSE) {  // kept value j0 + jj sits in column 2 * j0 + 4 * (jj / 2) + position (of this chunk)
      uint32_t mw[R];
      for (int r = 0; r < R; ++r) mw[r] = (uint32_t)mr[r * p.MW + j0 / 16];
      const float* xb = xc + 2 * j0 * RW;
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj)
        for (int r = 0; r < R; ++r) {
          const __m256 v = _mm256_broadcast_ss(vb + r * jn + j0 + jj);
          const float* xp = xb + (jj >> 1) * 4 * RW + ((mw[r] >> (2 * jj)) & 3) * RW;
          for (int b = 0; b < NB; ++b)
            acc[r][jj % NS][b] = _mm256_fmadd_ps(v, _mm256_load_ps(xp + 8 * b), acc[r][jj % NS][b]);
        }
    } else {
      const float* xb = xc + j0 * RW;
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj)
        for (int r = 0; r < R; ++r) {
          const __m256 v = _mm256_broadcast_ss(vb + r * jn + j0 + jj);
          for (int b = 0; b < NB; ++b)
            acc[r][jj % NS][b] = _mm256_fmadd_ps(v, _mm256_load_ps(xb + jj * RW + 8 * b), acc[r][jj % NS][b]);
        }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      __m256 t = acc[r][0][b];
      for (int a = 1; a < NS; ++a) t = _mm256_add_ps(t, acc[r][a][b]);
      _mm256_storeu_ps(rn + r * RW + 8 * b, t);
    }
}

template <int BITS, bool SPARSE, int NB>
DZ_AVX2 void rowvec_block(const Problem& p, int64_t slot, const float* xT, int64_t n0, int64_t n1, float* res,
                          float* vbuf) {
  constexpr int VPW = 32 / BITS;
  constexpr int QW = 16 / VPW;  // q words per 16 kept values
  constexpr int RW = 8 * NB;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  __m256i sh_lo, sh_hi, wi_lo, wi_hi;
  {
    alignas(32) int32_t a[16], b[16];
    for (int jj = 0; jj < 16; ++jj) { a[jj] = (jj % VPW) * BITS; b[jj] = jj / VPW; }
    sh_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(a));
    sh_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(a + 8));
    wi_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
    wi_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 8));
  }
  const __m256i wmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(QW), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const int64_t kpg = SPARSE ? p.group / 2 : p.group;  // kept values per scale group (a multiple of 16)
  const int64_t gpc = std::max<int64_t>(1, RV_CHUNK_FLOATS / RW / p.group);  // scale groups per K chunk
  for (int64_t g0 = 0; g0 < p.G; g0 += gpc) {
    const int64_t g1 = std::min(p.G, g0 + gpc), jbase = g0 * kpg, jn = (g1 - g0) * kpg;
    const float* xc = xT + g0 * p.group * RW;
    // rows [n, e) of the chunk into buf (row r at buf + (r - n) * jn)
    auto decode = [&](int64_t n, int64_t e, float* buf) DZ_AVX2 {
      for (; n < e; ++n, buf += jn) {
        const int64_t row = slot * p.N + n;
        const int32_t* qr = p.q + row * p.W;
        for (int64_t g = g0; g < g1; ++g) {
          const __m256 s = _mm256_set1_ps(_cvtsh_ss(p.sc[row * p.G + g]));
          const __m256 z = _mm256_set1_ps(_cvtsh_ss(p.ze[row * p.G + g]));
          for (int64_t j = g * kpg; j < (g + 1) * kpg; j += 16) {
            const __m256i words = _mm256_maskload_epi32(qr + j / VPW, wmask);
            const __m256i c_lo =
                _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(words, wi_lo), sh_lo), mask);
            const __m256i c_hi =
                _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(words, wi_hi), sh_hi), mask);
            _mm256_storeu_ps(buf + j - jbase, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c_lo), z), s));
            _mm256_storeu_ps(buf + j - jbase + 8, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c_hi), z), s));
          }
        }
      }
    };
    // pairs of output rows; the next pair is decoded (into the other half of vbuf) before this one
    // accumulates, so the broadcast loads never wait on fresh stores
    decode(n0, std::min(n1, n0 + 2), vbuf);
    for (int64_t n = n0; n < n1; n += 2) {
      const float* vcur = vbuf + ((n - n0) / 2 & 1) * 2 * jn;
      if (n + 2 < n1) decode(n + 2, std::min(n1, n + 4), vbuf + ((n + 2 - n0) / 2 & 1) * 2 * jn);
      for (int64_t a = n + RV_AHEAD; a < std::min(n1, n + RV_AHEAD + 2); ++a) {  // DRAM rows: ask ahead
        const int64_t ahead = slot * p.N + a;
        _mm_prefetch(reinterpret_cast<const char*>(p.q + ahead * p.W + jbase / VPW), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p.q + ahead * p.W + (jbase + jn) / VPW) - 1, _MM_HINT_T0);
        if (SPARSE) {
          _mm_prefetch(reinterpret_cast<const char*>(p.m + ahead * p.MW + jbase / 16), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p.m + ahead * p.MW + (jbase + jn) / 16) - 1, _MM_HINT_T0);
        }
        _mm_prefetch(reinterpret_cast<const char*>(p.sc + ahead * p.G + g0), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p.ze + ahead * p.G + g0), _MM_HINT_T0);
      }
      float* rn = res + (n - n0) * RW;
      if (n + 2 <= n1) rowvec_rows_acc<SPARSE, NB, 2>(p, slot, xc, n, jbase, jn, g0 > 0, vcur, rn);
      else rowvec_rows_acc<SPARSE, NB, 1>(p, slot, xc, n, jbase, jn, g0 > 0, vcur, rn);
    }
  }
}

// xT blocks of one segment: 32 rows while more than 24 remain, then 16 while more than 8, then 8; block b
// (rows first[b] .. of the segment, width[b] lanes) at data + off[b].
struct RowvecX {
  const float* data = nullptr;  // 64-byte aligned
  std::vector<int64_t> off, first, width;
  int64_t floats = 0;
};

RowvecX rowvec_layout(const Problem& p, const Seg& seg) {
  RowvecX t;
  for (int64_t r = 0; r < seg.count;) {
    const int64_t w = seg.count - r > 24 ? 32 : (seg.count - r > 8 ? 16 : 8);
    t.off.push_back(t.floats);
    t.first.push_back(r);
    t.width.push_back(w);
    t.floats += p.K * w;
    r += std::min<int64_t>(w, seg.count - r);
  }
  return t;
}

// Scratch for the transposed rows of one call: reused by the calling thread while small (a decode step calls
// the op once per linear layer), a fresh allocation for a large prefill segment.
float* rowvec_scratch(int64_t floats, at::Tensor& owner) {
  constexpr int64_t KEEP = 1 << 20;  // floats (4 MiB) kept per thread at most
  thread_local at::Tensor kept;
  if (floats > KEEP) {
    owner = at::empty({floats}, at::kFloat);  // the CPU allocator aligns to 64 bytes
    return owner.data_ptr<float>();
  }
  if (!kept.defined() || kept.numel() < floats) kept = at::empty({std::max<int64_t>(floats, 1 << 16)}, at::kFloat);
  return kept.data_ptr<float>();
}

// x rows of the segment into its xT blocks (8 x 8 register transposes; padding lanes zero). K % 16 == 0 here.
DZ_AVX2 void rowvec_transpose(const Problem& p, const Seg& seg, RowvecX& t, float* data) {
  t.data = data;
  for (size_t b = 0; b < t.off.size(); ++b) {
    const int64_t width = t.width[b], rows = std::min<int64_t>(width, seg.count - t.first[b]);
    for (int64_t r0 = 0; r0 < width; r0 += 8) {
      const float* xr[8];
      for (int i = 0; i < 8; ++i)
        xr[i] = r0 + i < rows ? p.x + seg.rows[t.first[b] + r0 + i] * p.sx : nullptr;
      float* o = data + t.off[b] + r0;
      for (int64_t k = 0; k < p.K; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = xr[i] ? _mm256_loadu_ps(xr[i] + k) : _mm256_setzero_ps();
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        const __m256 c[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                             _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                             _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                             _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
        for (int i = 0; i < 8; ++i) _mm256_store_ps(o + (k + i) * width, c[i]);
      }
    }
  }
}

template <int BITS, bool SPARSE>
DZ_AVX2 void rowvec_rows(const Problem& p, const Seg& seg, const RowvecX& t, int64_t n0, int64_t n1,
                         std::vector<float>& res, std::vector<float>& vbuf) {
  res.resize((n1 - n0) * 32);
  vbuf.resize(4 * p.C);
  const float* d = t.data;
  for (size_t b = 0; b < t.off.size(); ++b) {
    const float* xb = d + t.off[b];
    if (t.width[b] == 32) rowvec_block<BITS, SPARSE, 4>(p, seg.slot, xb, n0, n1, res.data(), vbuf.data());
    else if (t.width[b] == 16) rowvec_block<BITS, SPARSE, 2>(p, seg.slot, xb, n0, n1, res.data(), vbuf.data());
    else rowvec_block<BITS, SPARSE, 1>(p, seg.slot, xb, n0, n1, res.data(), vbuf.data());
    const int64_t rows = std::min<int64_t>(t.width[b], seg.count - t.first[b]);
    for (int64_t r = 0; r < rows; ++r) {
      float* o = p.out + seg.rows[t.first[b] + r] * p.so;
      for (int64_t n = n0; n < n1; ++n) o[n] += res[(n - n0) * t.width[b] + r];
    }
  }
}

DZ_AVX2 void rowvec_dispatch(const Problem& p, const Seg& seg, const RowvecX& t, int64_t n0, int64_t n1,
                             std::vector<float>& res, std::vector<float>& vbuf) {
  switch (p.bits * 2 + (p.sparse ? 1 : 0)) {
    case 4: return rowvec_rows<2, false>(p, seg, t, n0, n1, res, vbuf);
    case 5: return rowvec_rows<2, true>(p, seg, t, n0, n1, res, vbuf);
    case 8: return rowvec_rows<4, false>(p, seg, t, n0, n1, res, vbuf);
    case 9: return rowvec_rows<4, true>(p, seg, t, n0, n1, res, vbuf);
    case 16: return rowvec_rows<8, false>(p, seg, t, n0, n1, res, vbuf);
    case 17: return rowvec_rows<8, true>(p, seg, t, n0, n1, res, vbuf);
  }
}

DZ_AVX2 void direct_dispatch(const Problem& p, const Seg& seg, int64_t n0, int64_t n1) {
  switch (p.bits * 2 + (p.sparse ? 1 : 0)) {
    case 4: return direct_rows<2, false>(p, seg, n0, n1);
    case 5: return direct_rows<2, true>(p, seg, n0, n1);
    case 6: return direct_rows<3, false>(p, seg, n0, n1);
    case 7: return direct_rows<3, true>(p, seg, n0, n1);
    case 8: return direct_rows<4, false>(p, seg, n0, n1);
    case 9: return direct_rows<4, true>(p, seg, n0, n1);
    case 16: return direct_rows<8, false>(p, seg, n0, n1);
    case 17: return direct_rows<8, true>(p, seg, n0, n1);
  }
}

// ------------------------------------------------------------------------------- LUT path (2-bit 2:4)

// The 6 patterns of 2 kept positions out of 4 (ascending); a positions nibble p0 + 4*p1 maps to one.
constexpr int PAT_P0[6] = {0, 0, 0, 1, 1, 2};
constexpr int PAT_P1[6] = {1, 2, 3, 2, 3, 3};
constexpr int LUT_STRIDE = 96;  // entries per group of 4 inputs: pattern * 16 + (c0 + 4 * c1)

// PAT.v[nibble] = pattern * 16 (twice, for the two 128-bit lanes of vpshufb); an invalid nibble, which
// no writer produces, reads pattern 0.
struct PatTable {
  alignas(32) uint8_t v[32];
  PatTable() {
    std::memset(v, 0, sizeof(v));
    for (int t = 0; t < 6; ++t) v[PAT_P0[t] + 4 * PAT_P1[t]] = v[16 + PAT_P0[t] + 4 * PAT_P1[t]] = (uint8_t)(16 * t);
  }
};
const PatTable PAT;

// Per activation row: table[g*96 + pat*16 + c0 + 4*c1] = (c0 - z)*x[4g+p0] + (c1 - z)*x[4g+p1] with the
// segment's reference zero z; psum[g*6 + pat] = x[4g+p0] + x[4g+p1] corrects rows whose zero differs.
void build_lut(const float* x, int64_t K, float z, float* table, float* psum) {
  for (int64_t g = 0; g < K / 4; ++g) {
    const float* xg = x + 4 * g;
    float* t = table + g * LUT_STRIDE;
    for (int pat = 0; pat < 6; ++pat) {
      const float a = xg[PAT_P0[pat]], b = xg[PAT_P1[pat]];
      psum[g * 6 + pat] = a + b;
      float ca[4], cb[4];
      for (int c = 0; c < 4; ++c) { ca[c] = ((float)c - z) * a; cb[c] = ((float)c - z) * b; }
      for (int c1 = 0; c1 < 4; ++c1)
        for (int c0 = 0; c0 < 4; ++c0) t[pat * 16 + c0 + 4 * c1] = ca[c0] + cb[c1];
    }
  }
}

// Table index of every group of one delta row: idx[g] = pattern * 16 + codes nibble (groups in order).
// Byte b of the codes words holds the codes nibbles of groups 2b (low) and 2b+1 (high); same for meta.
void lut_index_scalar(const uint8_t* q, const uint8_t* m, int64_t bytes, uint8_t* idx) {
  for (int64_t b = 0; b < bytes; ++b) {
    idx[2 * b] = (uint8_t)(PAT.v[m[b] & 15] | (q[b] & 15));
    idx[2 * b + 1] = (uint8_t)(PAT.v[m[b] >> 4] | (q[b] >> 4));
  }
}

DZ_AVX2 void lut_index_avx2(const uint8_t* q, const uint8_t* m, int64_t bytes, uint8_t* idx) {
  const __m256i lo = _mm256_set1_epi8(15);
  const __m256i pat = _mm256_load_si256(reinterpret_cast<const __m256i*>(PAT.v));
  int64_t b = 0;
  for (; b + 32 <= bytes; b += 32) {
    const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b));
    const __m256i mv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + b));
    const __m256i even = _mm256_or_si256(_mm256_shuffle_epi8(pat, _mm256_and_si256(mv, lo)),
                                         _mm256_and_si256(qv, lo));
    const __m256i odd = _mm256_or_si256(_mm256_shuffle_epi8(pat, _mm256_and_si256(_mm256_srli_epi16(mv, 4), lo)),
                                        _mm256_and_si256(_mm256_srli_epi16(qv, 4), lo));
    // interleave even/odd bytes back into group order (unpack works per 128-bit lane: fix the lane order)
    const __m256i a = _mm256_unpacklo_epi8(even, odd), c = _mm256_unpackhi_epi8(even, odd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + 2 * b), _mm256_permute2x128_si256(a, c, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + 2 * b + 32), _mm256_permute2x128_si256(a, c, 0x31));
  }
  lut_index_scalar(q + b, m + b, bytes - b, idx + 2 * b);
}

DZ_AVX2 void halves_to_floats_avx2(const uint16_t* h, int64_t n, float* f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) f[i] = _cvtsh_ss(h[i]);
}

// One whole segment (all output rows) on the calling thread: its rows' tables stay in this core's cache.
void lut_segment(const Problem& p, const Seg& seg, bool avx2, std::vector<float>& tables,
                 std::vector<float>& psums, std::vector<uint8_t>& idx) {
  const int64_t groups = p.K / 4, per_scale = p.group / 4;
  const float z = half_to_float(p.ze[seg.slot * p.N * p.G]);
  tables.resize(seg.count * groups * LUT_STRIDE);
  psums.resize(seg.count * groups * 6);
  idx.resize(groups + 64);
  std::vector<float> sz(2 * p.G);
  for (int64_t r = 0; r < seg.count; ++r)
    build_lut(p.x + seg.rows[r] * p.sx, p.K, z, tables.data() + r * groups * LUT_STRIDE,
              psums.data() + r * groups * 6);
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t row = seg.slot * p.N + n;
    const uint8_t* qb = reinterpret_cast<const uint8_t*>(p.q + row * p.W);
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(p.m + row * p.MW);
    if (avx2) lut_index_avx2(qb, mb, groups / 2, idx.data());
    else lut_index_scalar(qb, mb, groups / 2, idx.data());
    float* zr = sz.data();
    float* sr = sz.data() + p.G;
    if (avx2) {
      halves_to_floats_avx2(p.ze + row * p.G, p.G, zr);
      halves_to_floats_avx2(p.sc + row * p.G, p.G, sr);
    } else {
      halves_to_floats_scalar(p.ze + row * p.G, p.G, zr);
      halves_to_floats_scalar(p.sc + row * p.G, p.G, sr);
    }
    bool uniform = true;
    for (int64_t g = 0; g < p.G; ++g) uniform &= zr[g] == z;
    for (int64_t r = 0; r < seg.count; ++r) {
      const float* table = tables.data() + r * groups * LUT_STRIDE;
      const uint8_t* ix = idx.data();
      float total = 0.f;
      for (int64_t sg = 0; sg < p.G; ++sg) {
        const int64_t g0 = sg * per_scale, g1 = g0 + per_scale;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int64_t g = g0;
        for (; g + 4 <= g1; g += 4) {
          a0 += table[g * LUT_STRIDE + ix[g]];
          a1 += table[(g + 1) * LUT_STRIDE + ix[g + 1]];
          a2 += table[(g + 2) * LUT_STRIDE + ix[g + 2]];
          a3 += table[(g + 3) * LUT_STRIDE + ix[g + 3]];
        }
        for (; g < g1; ++g) a0 += table[g * LUT_STRIDE + ix[g]];
        float sum = (a0 + a1) + (a2 + a3);
        if (!uniform) {  // (c - z_row) = (c - z) - (z_row - z): subtract (z_row - z) * Σ x at kept positions
          const float* ps = psums.data() + r * groups * 6;
          float c = 0.f;
          for (g = g0; g < g1; ++g) c += ps[g * 6 + (ix[g] >> 4)];
          sum -= (zr[sg] - z) * c;
        }
        total += sum * sr[sg];
      }
      p.out[seg.rows[r] * p.so + n] += total;
    }
  }
}

// -------------------------------------------------------------------------------------------- driver

bool direct_ok(const Problem& p) { return !p.sparse || p.group % 4 == 0; }
bool lut_ok(const Problem& p) { return p.sparse && p.bits == 2 && p.group % 4 == 0; }

void run_segments(const Problem& p, const std::vector<Seg>& segs, Strategy forced) {
  const bool avx2 = use_avx2();
  const int64_t dense_rows = env_int("DELTAZIP_NATIVE_DENSE_ROWS", 1024);  // benchmarks/kernel.py
  const int64_t lut_rows_max = env_int("DELTAZIP_NATIVE_LUT_ROWS", 0);
  const int64_t rowvec_rows_min = env_int("DELTAZIP_NATIVE_ROWVEC_ROWS", 9);
  // Work items: (segment, block of output rows) for direct/scalar, a whole segment for LUT; each item
  // writes its own part of out.
  constexpr int64_t BLOCK_N = 64;
  struct Item { int64_t seg, n0, n1; };
  std::vector<Item> items;
  std::vector<Strategy> strategy(segs.size());
  for (size_t i = 0; i < segs.size(); ++i) {
    Strategy st = forced;
    if (st == AUTO) {
      st = segs[i].count >= dense_rows ? DENSE : DIRECT;
      if (st == DIRECT && segs[i].count <= lut_rows_max && lut_ok(p)) st = LUT;
    }
    if (st == LUT && !lut_ok(p)) st = DIRECT;
    if (st == DIRECT && forced == AUTO && segs[i].count >= rowvec_rows_min && avx2 && fast_ok(p)) st = ROWVEC;
    if (st == ROWVEC && !(avx2 && fast_ok(p))) st = DIRECT;
    strategy[i] = st;
    if (st == DENSE) continue;  // run below, one tile at a time, BLAS-parallel
    if (st == LUT) { items.push_back({(int64_t)i, 0, p.N}); continue; }
    for (int64_t n0 = 0; n0 < p.N; n0 += BLOCK_N) items.push_back({(int64_t)i, n0, std::min(p.N, n0 + BLOCK_N)});
  }
  std::vector<RowvecX> xts(segs.size());  // transposed rows of ROWVEC segments
  int64_t xt_floats = 0;
  for (size_t i = 0; i < segs.size(); ++i)
    if (strategy[i] == ROWVEC) xts[i] = rowvec_layout(p, segs[i]), xt_floats += xts[i].floats;
  at::Tensor xt_owner;
  if (xt_floats > 0) {
    float* scratch = rowvec_scratch(xt_floats, xt_owner);
    for (size_t i = 0; i < segs.size(); ++i)
      if (strategy[i] == ROWVEC) rowvec_transpose(p, segs[i], xts[i], scratch), scratch += xts[i].floats;
  }
  const int nt = thread_count((int64_t)items.size());
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> tables, psums;
    std::vector<uint8_t> idx;
    std::vector<float> res, vbuf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < (int64_t)items.size(); ++it) {
      const Item& item = items[it];
      const Seg& seg = segs[item.seg];
      if (strategy[item.seg] == LUT) {
        lut_segment(p, seg, avx2, tables, psums, idx);
      } else if (strategy[item.seg] == ROWVEC) {
        rowvec_dispatch(p, seg, xts[item.seg], item.n0, item.n1, res, vbuf);
      } else if (avx2 && direct_ok(p)) {
        direct_dispatch(p, seg, item.n0, item.n1);
      } else {
        scalar_block(p, seg, item.n0, item.n1);
      }
    }
  }
  // Dense strategy: decode tiles of output rows (parallel), then one BLAS GEMM per tile.
  for (size_t i = 0; i < segs.size(); ++i) {
    if (strategy[i] != DENSE) continue;
    const Seg& seg = segs[i];
    const int64_t tile = std::max<int64_t>(8, std::min<int64_t>(p.N, (1 << 20) / std::max<int64_t>(1, p.K)));
    std::vector<float> xrows(seg.count * p.K);
    for (int64_t r = 0; r < seg.count; ++r)
      std::memcpy(xrows.data() + r * p.K, p.x + seg.rows[r] * p.sx, sizeof(float) * p.K);
    auto xt = at::from_blob(xrows.data(), {seg.count, p.K}, at::kFloat);
    std::vector<float> buf(tile * p.K), res(seg.count * tile);
    for (int64_t n0 = 0; n0 < p.N; n0 += tile) {
      const int64_t n1 = std::min(p.N, n0 + tile), nn = n1 - n0;
      const int ntd = thread_count(nn / 8 + 1);
#pragma omp parallel for num_threads(ntd) schedule(static) if (ntd > 1)
      for (int64_t a = n0; a < n1; a += 8) decode_rows(p, seg.slot, a, std::min(n1, a + 8), buf.data() + (a - n0) * p.K);
      auto w = at::from_blob(buf.data(), {nn, p.K}, at::kFloat);
      auto r = at::from_blob(res.data(), {seg.count, nn}, at::kFloat);
      at::mm_out(r, xt, w.t());
      for (int64_t k = 0; k < seg.count; ++k) {
        float* o = p.out + seg.rows[k] * p.so + n0;
        const float* s = res.data() + k * nn;
        for (int64_t c = 0; c < nn; ++c) o[c] += s[c];
      }
    }
  }
}

// ------------------------------------------------------------------------------------ op entry point

void add_delta_matmul_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                          const std::optional<at::Tensor>& meta, const at::Tensor& scales, const at::Tensor& zeros,
                          const at::Tensor& seg_rows, const at::Tensor& seg_start, const at::Tensor& seg_slot,
                          int64_t bits, int64_t group_size) {
  // ---- checks: every index the kernels use is validated here (never an out-of-bounds read or write)
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, not ", bits);
  TORCH_CHECK_VALUE(x.dim() == 2 && out.dim() == 2, "x and out must be 2-D, got ", x.sizes(), " and ",
                    out.sizes());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &x, &qweight, &scales, &zeros, &seg_rows, &seg_start, &seg_slot})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "add_delta_matmul (CPU): every tensor must be on the CPU");
  const auto fdt = {at::kFloat, at::kHalf, at::kBFloat16};
  TORCH_CHECK_VALUE(std::find(fdt.begin(), fdt.end(), x.scalar_type()) != fdt.end() &&
                        std::find(fdt.begin(), fdt.end(), out.scalar_type()) != fdt.end(),
                    "x and out must be float32, float16 or bfloat16, got ", x.scalar_type(), " and ",
                    out.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(qweight.dim() == 3 && qweight.scalar_type() == at::kInt,
                    "qweight must be an int32 tensor [S, N, W], got ", qweight.scalar_type(), " ", qweight.sizes());
  const int64_t S = qweight.size(0), N = qweight.size(1);
  TORCH_CHECK_VALUE(out.size(0) == M && out.size(1) == N, "out must be [", M, ", ", N, "], got ", out.sizes());
  TORCH_CHECK_VALUE(group_size >= 1 && K % group_size == 0, "group_size ", group_size,
                    " does not divide in_features ", K);
  const bool sparse = meta.has_value();
  TORCH_CHECK_VALUE(!sparse || K % 32 == 0, "2:4 deltas need in_features % 32 == 0 (in_features=", K, ")");
  const int64_t C = sparse ? K / 2 : K, vpw = 32 / bits, W = (C + vpw - 1) / vpw, G = K / group_size;
  TORCH_CHECK_VALUE(qweight.size(2) == W, "qweight has shape ", qweight.sizes(), ", expected [", S, ", ", N,
                    ", ", W, "] for ", bits, "-bit codes of in_features ", K);
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kHalf && t->dim() == 3 && t->size(0) == S && t->size(1) == N &&
                          t->size(2) == G,
                      "scales and zeros must be float16 [", S, ", ", N, ", ", G, "], got ", t->scalar_type(),
                      " ", t->sizes());
  if (sparse)
    TORCH_CHECK_VALUE(meta->scalar_type() == at::kInt && meta->dim() == 3 && meta->size(0) == S &&
                          meta->size(1) == N && meta->size(2) == K / 32,
                      "meta must be int32 [", S, ", ", N, ", ", K / 32, "], got ", meta->scalar_type(), " ",
                      meta->sizes());
  for (const at::Tensor* t : {&seg_rows, &seg_start, &seg_slot})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && t->dim() == 1,
                      "seg_rows, seg_start and seg_slot must be 1-D int32 tensors");
  const int64_t R = seg_rows.size(0), NS = seg_slot.size(0);
  TORCH_CHECK_VALUE(seg_start.size(0) == NS + 1, "seg_start must have len(seg_slot) + 1 = ", NS + 1,
                    " entries, got ", seg_start.size(0));
  auto rows_c = seg_rows.contiguous(), start_c = seg_start.contiguous(), slot_c = seg_slot.contiguous();
  const int32_t* rows = rows_c.data_ptr<int32_t>();
  const int32_t* start = start_c.data_ptr<int32_t>();
  const int32_t* slot = slot_c.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(start[0] == 0 && start[NS] == R, "segments must cover seg_rows exactly: seg_start[0] = ",
                    start[0], " (must be 0), seg_start[-1] = ", start[NS], " (must be len(seg_rows) = ", R, ")");
  std::vector<uint8_t> seen(M, 0);
  std::vector<Seg> segs;
  for (int64_t i = 0; i < NS; ++i) {
    TORCH_CHECK_VALUE(start[i + 1] >= start[i], "seg_start must be non-decreasing (segment ", i, ")");
    TORCH_CHECK_INDEX(slot[i] >= -1 && slot[i] < S, "segment ", i, " is on slot ", slot[i],
                      ", out of range [-1, ", S, ")");
    for (int64_t r = start[i]; r < start[i + 1]; ++r) {
      TORCH_CHECK_INDEX(rows[r] >= 0 && rows[r] < M, "seg_rows[", r, "] = ", rows[r],
                        " is not a row of the batch [0, ", M, ")");
      TORCH_CHECK_VALUE(!seen[rows[r]], "row ", rows[r], " appears in more than one segment position");
      seen[rows[r]] = 1;
    }
    if (slot[i] >= 0 && start[i + 1] > start[i])
      segs.push_back({rows + start[i], (int64_t)(start[i + 1] - start[i]), (int64_t)slot[i]});
  }
  if (segs.empty() || N == 0 || K == 0) return;
  const Strategy forced = env_strategy();

  // ---- fp32 views (a copy only when dtype or layout needs it)
  at::Tensor xf = x.scalar_type() == at::kFloat && x.stride(1) == 1 ? x : x.to(at::kFloat).contiguous();
  const bool out_direct = out.scalar_type() == at::kFloat && out.stride(1) == 1;
  at::Tensor of = out_direct ? out : out.to(at::kFloat).contiguous();
  auto q = qweight.contiguous(), sc = scales.contiguous(), ze = zeros.contiguous();
  at::Tensor m = sparse ? meta->contiguous() : at::Tensor();
  Problem p{xf.data_ptr<float>(), xf.stride(0), of.data_ptr<float>(), of.stride(0), q.data_ptr<int32_t>(),
            sparse ? m.data_ptr<int32_t>() : nullptr,
            reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()),
            reinterpret_cast<const uint16_t*>(ze.data_ptr<at::Half>()), N, K, W, G, C, K / 32, (int)bits,
            (int)group_size, sparse};
  run_segments(p, segs, forced);
  if (!out_direct) {  // copy back the touched rows only (rows on no delta stay bit-for-bit untouched)
    std::vector<int64_t> touched;
    for (const Seg& s : segs) for (int64_t r = 0; r < s.count; ++r) touched.push_back(s.rows[r]);
    auto idx = at::from_blob(touched.data(), {(int64_t)touched.size()}, at::kLong);
    out.index_copy_(0, idx, of.index_select(0, idx).to(out.scalar_type()));
  }
}

int64_t native_info(int64_t what) {
  switch (what) {
    case 0: return usable_cpus();
    case 1: return cpu_has_avx2() ? 1 : 0;
    default: return -1;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deltazip_native, m) {
  m.def("info(int what) -> int", &native_info);
}

TORCH_LIBRARY_IMPL(deltazip, CPU, m) {
  m.impl("add_delta_matmul", &add_delta_matmul_cpu);
}
