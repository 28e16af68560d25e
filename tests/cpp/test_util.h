// Shared helpers for the C++ tests: writing .safetensors files (with full control over the
// header, so tests can craft malformed files), temporary directories, random tensors, and
// float16 / bfloat16 encodings built on common/half.h.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/status.h"

namespace aq::testing {

namespace fs = std::filesystem;
using nlohmann::json;

// ---- assertions ------------------------------------------------------------------------------

inline ::testing::AssertionResult Contains(const char* hay_expr, const char* needle_expr,
                                           const std::string& hay, const std::string& needle) {
  if (hay.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << hay_expr << " (\"" << hay << "\") does not contain " << needle_expr
                                       << " (\"" << needle << "\")";
}
#define EXPECT_CONTAINS(hay, needle) EXPECT_PRED_FORMAT2(::aq::testing::Contains, hay, needle)
#define ASSERT_OK(expr)                                               \
  do {                                                                \
    const ::aq::Status _st = (expr);                                  \
    ASSERT_TRUE(_st.ok()) << _st.ToString();                          \
  } while (0)

// Unwraps a Result in a test, failing (fatally) with its message when it is an error.
#define ASSERT_OK_AND_ASSIGN(lhs, rexpr)                                       \
  auto AQ_CONCAT(_res_, __LINE__) = (rexpr);                                   \
  ASSERT_TRUE(AQ_CONCAT(_res_, __LINE__).ok()) << AQ_CONCAT(_res_, __LINE__).status().ToString(); \
  lhs = std::move(AQ_CONCAT(_res_, __LINE__)).value()

// ---- files -----------------------------------------------------------------------------------

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/aqtest-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = fs::path(buf.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }
  fs::path operator/(const std::string& rel) const { return path_ / rel; }

 private:
  fs::path path_;
};

inline void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes) {
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

inline void write_text(const fs::path& path, const std::string& text) {
  write_bytes(path, std::vector<uint8_t>(text.begin(), text.end()));
}

inline void write_json(const fs::path& path, const json& j) { write_text(path, j.dump(2)); }

inline std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// ---- safetensors -----------------------------------------------------------------------------

struct StEntry {
  std::string name;
  std::string dtype;  // the safetensors spelling, any string (tests pass unknown ones on purpose)
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

// The header JSON for entries laid out back to back in the given order.
inline json safetensors_header(const std::vector<StEntry>& entries,
                               const std::map<std::string, std::string>& metadata = {}) {
  json h = json::object();
  uint64_t offset = 0;
  for (const auto& e : entries) {
    h[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.data.size()}}};
    offset += e.data.size();
  }
  if (!metadata.empty()) h["__metadata__"] = metadata;
  return h;
}

inline std::vector<uint8_t> concat_data(const std::vector<StEntry>& entries) {
  std::vector<uint8_t> d;
  for (const auto& e : entries) d.insert(d.end(), e.data.begin(), e.data.end());
  return d;
}

// File bytes: 8-byte little-endian length (header_text.size() unless overridden), header, data.
inline std::vector<uint8_t> safetensors_bytes(const std::string& header_text, const std::vector<uint8_t>& data,
                                              std::optional<uint64_t> header_len = std::nullopt) {
  const uint64_t n = header_len.value_or(header_text.size());
  std::vector<uint8_t> out(8);
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(n >> (8 * i));
  out.insert(out.end(), header_text.begin(), header_text.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

inline void write_safetensors_raw(const fs::path& path, const std::string& header_text,
                                  const std::vector<uint8_t>& data,
                                  std::optional<uint64_t> header_len = std::nullopt) {
  write_bytes(path, safetensors_bytes(header_text, data, header_len));
}

inline void write_safetensors(const fs::path& path, const std::vector<StEntry>& entries,
                              const std::map<std::string, std::string>& metadata = {}) {
  write_safetensors_raw(path, safetensors_header(entries, metadata).dump(), concat_data(entries));
}

// ---- element encodings -------------------------------------------------------------------------

template <typename T>
inline void append_le(std::vector<uint8_t>& out, T v) {
  uint8_t b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.insert(out.end(), b, b + sizeof(T));
}

inline std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out;
  out.reserve(v.size() * 4);
  for (float f : v) append_le(out, f);
  return out;
}
inline std::vector<uint8_t> f16_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out;
  out.reserve(v.size() * 2);
  for (float f : v) append_le(out, f32_to_f16(f));
  return out;
}
inline std::vector<uint8_t> bf16_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out;
  out.reserve(v.size() * 2);
  for (float f : v) append_le(out, f32_to_bf16(f));
  return out;
}
// The values a float tensor holds once stored as float16 / bfloat16.
inline std::vector<float> as_f16(std::vector<float> v) {
  for (float& f : v) f = f16_to_f32(f32_to_f16(f));
  return v;
}
inline std::vector<float> as_bf16(std::vector<float> v) {
  for (float& f : v) f = bf16_to_f32(f32_to_bf16(f));
  return v;
}

// A float32 safetensors entry.
inline StEntry f32_entry(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
  return StEntry{name, "F32", std::move(shape), f32_bytes(v)};
}

// ---- random tensors ----------------------------------------------------------------------------

inline std::vector<float> gaussian(size_t n, uint32_t seed, float stddev = 1.0f, float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Heavy-tailed weights: Student's t with 4 degrees of freedom.
inline std::vector<float> student_t4(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::student_t_distribution<float> d(4.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * d(rng);
  return v;
}

// Gaussian rows x cols, with the listed columns multiplied by `factor` (activation-outlier style).
inline std::vector<float> outlier_columns(size_t rows, size_t cols, uint32_t seed,
                                          const std::vector<size_t>& columns, float factor = 50.0f) {
  std::vector<float> v = gaussian(rows * cols, seed);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c : columns) v[r * cols + c] *= factor;
  return v;
}

}  // namespace aq::testing
