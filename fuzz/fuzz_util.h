// Shared by the fuzz targets and the seed generator: scratch files for readers that take a path,
// and the structured encoding of one stored tensor (scheme fields, shape, codes, scales, zero
// points, entropy side) that fuzz_tensor_decode and fuzz_export_requantize read and make_seeds
// writes from real encoded tensors.
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "quant/entropy_quant.h"
#include "quant/ggml_types.h"
#include "quant/scheme.h"
#include "quant/tensor_codec.h"

namespace aq::fuzz {

// Arrow's default memory pool (jemalloc or mimalloc in the pyarrow wheel) hides allocations from
// AddressSanitizer; the system allocator lets ASan see every buffer. Call before Arrow is used.
inline void use_system_memory_pool() { setenv("ARROW_DEFAULT_MEMORY_POOL", "system", 1); }

// A directory of this process's own under $TMPDIR (or /dev/shm when it exists: no disk writes
// per execution), removed at exit.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    namespace fs = std::filesystem;
    const char* base = std::getenv("TMPDIR");
    fs::path root = base && *base ? fs::path(base) : fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::path("/tmp");
    fs::path d = root / ("aqfuzz-" + std::to_string(::getpid()));
    fs::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return d;
  }();
  return dir;
}

inline std::string write_scratch(const std::string& rel, const uint8_t* data, size_t size) {
  const std::filesystem::path p = scratch_dir() / rel;
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return p.string();
}

// Reads fixed-width little-endian fields off the input; past its end, zeros.
class Reader {
 public:
  Reader(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  uint8_t u8() { return at_ < n_ ? d_[at_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  uint32_t u32() { return static_cast<uint32_t>(u16()) | (static_cast<uint32_t>(u16()) << 16); }
  float f32() {
    const uint32_t b = u32();
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  std::vector<uint8_t> bytes(size_t k) {
    std::vector<uint8_t> v(k, 0);
    const size_t have = at_ < n_ ? std::min(k, n_ - at_) : 0;
    if (have) std::memcpy(v.data(), d_ + at_, have);
    at_ += have;
    return v;
  }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t at_ = 0;
};

class Writer {
 public:
  void u8(uint8_t v) { out.push_back(v); }
  void u16(uint16_t v) { u8(static_cast<uint8_t>(v)), u8(static_cast<uint8_t>(v >> 8)); }
  void u32(uint32_t v) { u16(static_cast<uint16_t>(v)), u16(static_cast<uint16_t>(v >> 16)); }
  void f32(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    u32(b);
  }
  void bytes(const std::vector<uint8_t>& v) { out.insert(out.end(), v.begin(), v.end()); }
  std::vector<uint8_t> out;
};

inline constexpr GgmlType kGgmlTypes[] = {GgmlType::kQ8_0, GgmlType::kQ6_K, GgmlType::kQ5_K,   GgmlType::kQ4_K,
                                          GgmlType::kQ3_K, GgmlType::kQ2_K, GgmlType::kIQ4_XS, GgmlType::kIQ4_NL};
inline constexpr uint64_t kMaxValues = 1 << 12;  // rows x cols decoded per input (speed, not a limit of the code)

// One stored tensor, as the fuzz input describes it. The sizes of codes, scales and zero points
// are the input's own (check_encoded must catch every mismatch).
struct FuzzTensor {
  QuantScheme scheme;
  uint64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes, scales, zero_points;
  bool has_entropy = false;
  EntropySide entropy;
  EncodedView view() const {
    EncodedView v;
    v.codes = codes;
    v.scales = scales;
    v.zero_points = zero_points;
    v.entropy = has_entropy ? &entropy : nullptr;
    return v;
  }
};

// Layout (all little-endian):
//   u8 kind (0 affine, 1 entropy, 2.. ggml type kGgmlTypes[kind - 2]; others: affine), u8 bits
//   (as stored: any value), i32 group_size, u8 flags (1 symmetric, 2 f32 scales, 4 rotate,
//   8 search method), f32 target_bpw, u16 rows, u16 cols, u32 codes bytes, u32 scale bytes,
//   u32 zero point bytes; entropy only: u8 has_side, i32 symbol_min, u16 frequency count, the
//   frequencies (u16 each), i32 escape_symbol, u32 chunk_rows, u16 offset count, the offsets
//   (u32 each), u8 centroid count, the centroids (f32 each); then the codes, scales and zero
//   point bytes (zeros past the input's end). Byte counts are capped at 16 KiB.
inline FuzzTensor parse_tensor(const uint8_t* data, size_t size) {
  Reader r(data, size);
  FuzzTensor t;
  const uint8_t kind = r.u8();
  if (kind == 1) t.scheme.kind = SchemeKind::kEntropy;
  else if (kind >= 2 && kind < 2 + std::size(kGgmlTypes)) t.scheme = ggml_scheme(kGgmlTypes[kind - 2]);
  else t.scheme.kind = SchemeKind::kAffine;
  t.scheme.bits = static_cast<int8_t>(r.u8());
  t.scheme.group_size = static_cast<int32_t>(r.u32());
  const uint8_t flags = r.u8();
  t.scheme.symmetric = flags & 1;
  t.scheme.scale_type = flags & 2 ? ScaleType::kF32 : ScaleType::kF16;
  t.scheme.rotate = flags & 4;
  t.scheme.method = flags & 8 ? ScaleMethod::kSearch : ScaleMethod::kMinMax;
  t.scheme.target_bpw = r.f32();
  t.rows = r.u16();
  t.cols = r.u16();
  constexpr uint32_t kCap = 1u << 14;  // 4096 values need at most 4 KiB of codes (8 bits) and 16 KiB of scales
  const uint32_t ncodes = std::min(r.u32(), kCap), nscales = std::min(r.u32(), kCap), nzp = std::min(r.u32(), kCap);
  if (t.scheme.kind == SchemeKind::kEntropy && r.u8()) {
    t.has_entropy = true;
    t.entropy.symbol_min = static_cast<int32_t>(r.u32());
    t.entropy.frequencies.resize(r.u16());
    for (auto& f : t.entropy.frequencies) f = r.u16();
    t.entropy.escape_symbol = static_cast<int32_t>(r.u32());
    t.entropy.chunk_rows = r.u32();
    t.entropy.chunk_offsets.resize(r.u16());
    for (auto& o : t.entropy.chunk_offsets) o = r.u32();
    t.entropy.centroids.resize(r.u8());
    for (auto& c : t.entropy.centroids) c = r.f32();
  }
  t.codes = r.bytes(ncodes);
  t.scales = r.bytes(nscales);
  t.zero_points = r.bytes(nzp);
  return t;
}

inline std::vector<uint8_t> serialize_tensor(const FuzzTensor& t) {
  Writer w;
  uint8_t kind = 0;
  if (t.scheme.kind == SchemeKind::kEntropy) kind = 1;
  if (t.scheme.kind == SchemeKind::kGgml)
    for (size_t i = 0; i < std::size(kGgmlTypes); ++i)
      if (kGgmlTypes[i] == t.scheme.ggml) kind = static_cast<uint8_t>(2 + i);
  w.u8(kind);
  w.u8(static_cast<uint8_t>(t.scheme.bits));
  w.u32(static_cast<uint32_t>(t.scheme.group_size));
  w.u8(static_cast<uint8_t>((t.scheme.symmetric ? 1 : 0) | (t.scheme.scale_type == ScaleType::kF32 ? 2 : 0) |
                            (t.scheme.rotate ? 4 : 0) | (t.scheme.method == ScaleMethod::kSearch ? 8 : 0)));
  w.f32(static_cast<float>(t.scheme.target_bpw));
  w.u16(static_cast<uint16_t>(t.rows));
  w.u16(static_cast<uint16_t>(t.cols));
  w.u32(static_cast<uint32_t>(t.codes.size()));
  w.u32(static_cast<uint32_t>(t.scales.size()));
  w.u32(static_cast<uint32_t>(t.zero_points.size()));
  if (t.scheme.kind == SchemeKind::kEntropy) {
    w.u8(t.has_entropy ? 1 : 0);
    if (t.has_entropy) {
      const EntropySide& e = t.entropy;
      w.u32(static_cast<uint32_t>(e.symbol_min));
      w.u16(static_cast<uint16_t>(e.frequencies.size()));
      for (uint16_t f : e.frequencies) w.u16(f);
      w.u32(static_cast<uint32_t>(e.escape_symbol));
      w.u32(e.chunk_rows);
      w.u16(static_cast<uint16_t>(e.chunk_offsets.size()));
      for (uint32_t o : e.chunk_offsets) w.u32(o);
      w.u8(static_cast<uint8_t>(e.centroids.size()));
      for (float c : e.centroids) w.f32(c);
    }
  }
  w.bytes(t.codes);
  w.bytes(t.scales);
  w.bytes(t.zero_points);
  return w.out;
}

// Bit-for-bit equality of two decodes (NaNs of any payload count as equal).
inline bool same_floats(const float* a, const float* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!(std::isnan(a[i]) && std::isnan(b[i])) && std::memcmp(a + i, b + i, 4) != 0) return false;
  return true;
}

}  // namespace aq::fuzz
