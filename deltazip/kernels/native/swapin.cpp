// Native swap-in decode (issue 10): a 2-bit 2:4 delta's `nibbles` stream straight into the slot layout.
//
// deltazip_native::nibbles_to_words(stream, qweight, meta) -> int
//   stream   uint8 [N*K/4]: one byte per group of 4 dense columns, c0 | c1 << 2 | p0 << 4 | p1 << 6 (the two
//            kept codes, then their two positions), groups in row-major order (docs/FORMAT.md, Blob layout)
//   qweight  int32 [N, K/32] (written): 16 two-bit codes per word, lowest bits first (deltazip.packed)
//   meta     int32 [N, K/32] (written): 16 two-bit positions per word, lowest bits first
//   returns  1 when every group's positions are two distinct ascending ones (p0 < p1), else 0 (the caller
//            raises; the outputs are then garbage and must not be used)
//
// One pass over the stream, 8 groups (one uint64) at a time: their low nibbles make one qweight word and
// their high nibbles one meta word (K % 32 == 0, so words never straddle rows). The same bitwise transform
// as the numpy fallback (deltazip/format/codec.py, _nibbles_stream_to_words), so both give identical bytes.
// No threads here: the loader runs one decode per tensor on a thread pool (the op runs without the GIL).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr uint64_t kLowPairs = 0x0303030303030303ULL;
constexpr uint64_t kThrees = 0x0303030303030303ULL;
constexpr uint64_t kFours = 0x0404040404040404ULL;

inline uint64_t swap_bits(uint64_t w, int shift, uint64_t mask) {
  uint64_t t = ((w >> shift) ^ w) & mask;
  return w ^ t ^ (t << shift);
}

int64_t nibbles_to_words(const at::Tensor& stream, const at::Tensor& qweight, const at::Tensor& meta) {
  TORCH_CHECK(stream.scalar_type() == at::kByte && stream.dim() == 1 && stream.is_contiguous(),
              "nibbles_to_words: stream must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && meta.scalar_type() == at::kInt && qweight.is_contiguous() &&
                  meta.is_contiguous() && qweight.sizes() == meta.sizes(),
              "nibbles_to_words: qweight and meta must be contiguous int32 tensors of one shape");
  TORCH_CHECK(stream.device().is_cpu() && qweight.device().is_cpu() && meta.device().is_cpu(),
              "nibbles_to_words: CPU tensors only");
  const int64_t lanes = qweight.numel();
  TORCH_CHECK(stream.numel() == lanes * 8, "nibbles_to_words: stream has ", stream.numel(),
              " bytes, the outputs need ", lanes * 8);
  const uint8_t* src = stream.data_ptr<uint8_t>();
  uint32_t* q = reinterpret_cast<uint32_t*>(qweight.data_ptr<int32_t>());
  uint32_t* m = reinterpret_cast<uint32_t*>(meta.data_ptr<int32_t>());
  uint64_t ok = ~0ULL;
  for (int64_t i = 0; i < lanes; ++i) {
    uint64_t w;
    std::memcpy(&w, src + 8 * i, 8);  // the stream may sit at any byte offset of its buffer
    // 2:4 check of 8 groups at once: p1 + 3 - p0 keeps bit 2 iff p1 > p0 (no borrows between bytes)
    ok &= ((w >> 6) & kLowPairs) + kThrees - ((w >> 4) & kLowPairs);
    // [c0 p0 c1 p1 ... c7 p7] (nibbles, lowest first) → [c0 c1 ... c7 p0 p1 ... p7]
    w = swap_bits(w, 4, 0x00F000F000F000F0ULL);
    w = swap_bits(w, 8, 0x0000FF000000FF00ULL);
    w = swap_bits(w, 16, 0x00000000FFFF0000ULL);
    q[i] = static_cast<uint32_t>(w);
    m[i] = static_cast<uint32_t>(w >> 32);
  }
  return (ok & kFours) == kFours ? 1 : 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deltazip_native, m) {
  m.def("nibbles_to_words(Tensor stream, Tensor(a!) qweight, Tensor(b!) meta) -> int", &nibbles_to_words);
}
