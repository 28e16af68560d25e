// Strict validation of .safetensors headers (io/safetensors.h): every malformed file is a
// FormatError whose message names the file and, where one is involved, the tensor.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "io/safetensors.h"
#include "test_util.h"

namespace aq {
namespace {

using testing::json;
using testing::StEntry;

class SafetensorsTest : public ::testing::Test {
 protected:
  std::string path(const std::string& name = "model.safetensors") const { return (dir_ / name).string(); }

  // Writes a header (as given) over `data_size` zero bytes and opens the file.
  Status open_with_header(const json& header, size_t data_size) {
    testing::write_safetensors_raw(path(), header.dump(), std::vector<uint8_t>(data_size, 0));
    return SafetensorsFile::Open(path()).status();
  }

  // Expects a FormatError naming the file and every string in `names`.
  void expect_format_error(const Status& st, const std::vector<std::string>& names) {
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.code(), StatusCode::kFormatError) << st.ToString();
    EXPECT_CONTAINS(st.message(), path());
    for (const auto& n : names) EXPECT_CONTAINS(st.message(), n);
  }

  static json entry(const std::string& dtype, std::vector<int64_t> shape, uint64_t begin, uint64_t end) {
    return {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, end}}};
  }

  testing::TempDir dir_;
};

TEST_F(SafetensorsTest, reads_a_valid_file_with_several_dtypes_in_data_order) {
  // Header keys are sorted (b_ before z_) but the data is laid out z_, a_, b_.
  std::vector<StEntry> entries = {
      {"z_first", "F32", {2, 3}, std::vector<uint8_t>(24, 1)},
      {"a_second", "BF16", {4}, std::vector<uint8_t>(8, 2)},
      {"b_scalar", "F64", {}, std::vector<uint8_t>(8, 3)},
      {"c_empty", "I32", {0, 5}, {}},
      {"d_bytes", "U8", {3}, {7, 8, 9}},
  };
  testing::write_safetensors(path(), entries, {{"format", "pt"}});
  ASSERT_OK_AND_ASSIGN(auto file, SafetensorsFile::Open(path()));
  const auto& ts = file->tensors();
  ASSERT_EQ(ts.size(), entries.size());
  const std::string header = testing::safetensors_header(entries, {{"format", "pt"}}).dump();
  const uint64_t data_start = 8 + header.size();
  // An empty tensor sorts before a non-empty one at the same offset, so the data order is the
  // order of `entries`.
  uint64_t offset = data_start;
  for (size_t i = 0; i < entries.size(); ++i) {
    const TensorInfo& t = ts[i];
    const StEntry& e = entries[i];
    EXPECT_EQ(t.name, e.name);
    EXPECT_EQ(t.offset, offset) << e.name;
    EXPECT_EQ(t.nbytes, e.data.size()) << e.name;
    EXPECT_EQ(t.shape, e.shape) << e.name;
    EXPECT_EQ(dtype_name(t.dtype), e.dtype) << e.name;
    EXPECT_EQ(std::vector<uint8_t>(file->data(t), file->data(t) + t.nbytes), e.data) << e.name;
    offset += e.data.size();
  }
  EXPECT_EQ(ts[0].numel, 6u);
  EXPECT_EQ(ts[2].numel, 1u) << "a scalar holds one element";
  EXPECT_EQ(ts[3].numel, 0u);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  EXPECT_EQ(file->file_size(), data_start + 43);
}

TEST_F(SafetensorsTest, accepts_a_header_without_tensors) {
  testing::write_safetensors_raw(path(), "{}", {});
  ASSERT_OK_AND_ASSIGN(auto file, SafetensorsFile::Open(path()));
  EXPECT_TRUE(file->tensors().empty());
}

TEST_F(SafetensorsTest, rejects_a_file_shorter_than_the_header_length_field) {
  testing::write_bytes(path(), {1, 0, 0});
  expect_format_error(SafetensorsFile::Open(path()).status(), {"8-byte"});
  testing::write_bytes(path(), {});
  expect_format_error(SafetensorsFile::Open(path()).status(), {});
}

TEST_F(SafetensorsTest, rejects_header_length_past_end_of_file) {
  testing::write_safetensors_raw(path(), "{}", {}, /*header_len=*/1000);
  expect_format_error(SafetensorsFile::Open(path()).status(), {"1000", "past the end"});
}

TEST_F(SafetensorsTest, rejects_header_length_over_the_100_mb_cap) {
  testing::write_safetensors_raw(path(), "{}", {}, kMaxSafetensorsHeader + 1);
  expect_format_error(SafetensorsFile::Open(path()).status(), {"100000001"});
  testing::write_safetensors_raw(path(), "{}", {}, UINT64_MAX);
  expect_format_error(SafetensorsFile::Open(path()).status(), {});
}

TEST_F(SafetensorsTest, rejects_a_header_that_is_not_a_json_object) {
  for (const std::string text : {"[1, 2]", " {}", "{\"a\": ", "hello", "", "{}}"}) {
    testing::write_safetensors_raw(path(), text, {});
    expect_format_error(SafetensorsFile::Open(path()).status(), {});
  }
}

TEST_F(SafetensorsTest, accepts_trailing_spaces_after_the_header_object) {
  testing::write_safetensors_raw(path(), "{}      ", {});
  EXPECT_TRUE(SafetensorsFile::Open(path()).ok());
}

TEST_F(SafetensorsTest, rejects_unknown_dtype_naming_the_tensor) {
  expect_format_error(open_with_header({{"w", entry("F17", {2}, 0, 4)}}, 4), {"'w'", "F17"});
}

TEST_F(SafetensorsTest, rejects_negative_or_non_integer_shape_entries) {
  expect_format_error(open_with_header({{"neg", entry("U8", {-1}, 0, 0)}}, 0), {"'neg'", "-1"});
  json frac = entry("U8", {2}, 0, 2);
  frac["shape"] = {1.5};
  expect_format_error(open_with_header({{"frac", frac}}, 2), {"'frac'", "1.5"});
  json str = entry("U8", {2}, 0, 2);
  str["shape"] = {"2"};
  expect_format_error(open_with_header({{"str", str}}, 2), {"'str'"});
  json missing = entry("U8", {2}, 0, 2);
  missing.erase("shape");
  expect_format_error(open_with_header({{"noshape", missing}}, 2), {"'noshape'", "shape"});
}

TEST_F(SafetensorsTest, rejects_shape_times_dtype_size_different_from_the_byte_range) {
  expect_format_error(open_with_header({{"short", entry("F32", {2, 3}, 0, 20)}}, 20), {"'short'", "[2, 3]", "20"});
  expect_format_error(open_with_header({{"long", entry("F16", {3}, 0, 8)}}, 8), {"'long'", "[3]", "8"});
}

TEST_F(SafetensorsTest, rejects_a_shape_whose_element_count_overflows) {
  expect_format_error(
      open_with_header({{"huge", entry("F32", {INT64_C(1) << 40, INT64_C(1) << 40}, 0, 4)}}, 4), {"'huge'"});
}

TEST_F(SafetensorsTest, rejects_data_offsets_past_the_end_of_the_data) {
  expect_format_error(open_with_header({{"w", entry("U8", {8}, 0, 8)}}, 4), {"'w'", "past the end"});
  expect_format_error(open_with_header({{"a", entry("U8", {4}, 0, 4)}, {"b", entry("U8", {4}, 4, 8)}}, 6),
                      {"'b'"});
}

TEST_F(SafetensorsTest, rejects_data_offsets_with_end_before_begin) {
  expect_format_error(open_with_header({{"w", entry("U8", {0}, 4, 2)}}, 4), {"'w'", "end before begin"});
}

TEST_F(SafetensorsTest, rejects_malformed_data_offsets) {
  json neg = entry("U8", {2}, 0, 2);
  neg["data_offsets"] = {-2, 0};
  expect_format_error(open_with_header({{"neg", neg}}, 2), {"'neg'", "data_offsets"});
  json three = entry("U8", {2}, 0, 2);
  three["data_offsets"] = {0, 1, 2};
  expect_format_error(open_with_header({{"three", three}}, 2), {"'three'", "data_offsets"});
}

TEST_F(SafetensorsTest, rejects_overlapping_tensors_naming_both) {
  expect_format_error(open_with_header({{"first", entry("U8", {6}, 0, 6)}, {"second", entry("U8", {6}, 4, 10)}}, 10),
                      {"'first'", "'second'", "overlaps"});
  // the same range twice
  expect_format_error(open_with_header({{"one", entry("U8", {4}, 0, 4)}, {"two", entry("U8", {4}, 0, 4)}}, 4),
                      {"'one'", "'two'"});
}

TEST_F(SafetensorsTest, rejects_a_gap_between_tensors_naming_the_next_tensor) {
  expect_format_error(open_with_header({{"a", entry("U8", {4}, 0, 4)}, {"b", entry("U8", {4}, 6, 10)}}, 10),
                      {"gap", "'b'"});
  expect_format_error(open_with_header({{"late", entry("U8", {4}, 2, 6)}}, 6), {"gap", "'late'"});
}

TEST_F(SafetensorsTest, rejects_a_data_section_longer_than_the_tensors_cover) {
  expect_format_error(open_with_header({{"a", entry("U8", {4}, 0, 4)}, {"last", entry("U8", {2}, 4, 6)}}, 9),
                      {"'last'", "9"});
  expect_format_error(open_with_header(json::object(), 3), {"3"});
}

TEST_F(SafetensorsTest, rejects_metadata_that_is_not_string_to_string) {
  expect_format_error(open_with_header({{"__metadata__", {{"format", 1}}}}, 0), {"__metadata__", "format"});
  expect_format_error(open_with_header({{"__metadata__", {1, 2}}}, 0), {"__metadata__"});
  expect_format_error(open_with_header({{"__metadata__", {{"nested", {{"a", "b"}}}}}}, 0), {"nested"});
}

TEST_F(SafetensorsTest, rejects_entries_that_are_not_objects_or_lack_a_dtype) {
  expect_format_error(open_with_header({{"w", 5}}, 0), {"'w'"});
  json no_dtype = entry("U8", {2}, 0, 2);
  no_dtype.erase("dtype");
  expect_format_error(open_with_header({{"nodtype", no_dtype}}, 2), {"'nodtype'", "dtype"});
}

TEST_F(SafetensorsTest, missing_file_is_not_found) {
  auto r = SafetensorsFile::Open(path("absent.safetensors"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_CONTAINS(r.status().message(), "absent.safetensors");
}

TEST(ShapeNumel, multiplies_and_detects_overflow_and_negatives) {
  EXPECT_EQ(shape_numel({}), 1u);
  EXPECT_EQ(shape_numel({3, 0, 7}), 0u);
  EXPECT_EQ(shape_numel({2, 3, 4}), 24u);
  EXPECT_FALSE(shape_numel({-1, 2}).has_value());
  EXPECT_FALSE(shape_numel({INT64_C(1) << 32, INT64_C(1) << 32}).has_value());
  EXPECT_EQ(shape_numel({INT64_C(1) << 31, INT64_C(1) << 32}), uint64_t{1} << 63);
}

}  // namespace
}  // namespace aq
