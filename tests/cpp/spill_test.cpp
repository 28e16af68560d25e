// Codes spilled to a scratch file while a big tensor is encoded (TensorJob::spill_codes): the same
// bytes and statistics as in memory for every scheme and thread count, nothing left on disk, and
// a write that fails names the folder and the tensor.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "engine/tensor_job.h"
#include "io/spill_file.h"
#include "quant/ggml_types.h"
#include "test_util.h"

namespace aq {
namespace {

// Runs a job to the end, on the pool or inline; the spilled run writes into `dir`.
Result<EncodedTensor> run_job(const RowSource& src, const QuantScheme& scheme, ThreadPool* pool,
                              const std::string& dir) {
  TensorJob job(src, scheme);
  if (!dir.empty()) job.spill_codes(dir, 0);
  job.run(pool);
  AQ_RETURN_IF_ERROR(job.status());
  return job.take();
}

// A float32 matrix held in `bytes` as the job's source.
RowSource f32_rows(const std::vector<uint8_t>& bytes, uint64_t rows, uint64_t cols, const std::string& name) {
  RowSource src;
  src.data = bytes.data();
  src.rows = rows;
  src.cols = cols;
  src.name = name;
  return src;
}

size_t entries(const testing::TempDir& dir) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++n;
  return n;
}

TEST(Spill, spilled_codes_equal_the_codes_held_in_memory_for_every_scheme_and_thread_count) {
  const size_t rows = 700, cols = 512;  // blocks of 128 rows: six blocks, the last one short
  const std::vector<float> w = testing::student_t4(rows * cols, 7, 0.02f);
  const std::vector<uint8_t> bytes = testing::f32_bytes(w);
  const RowSource src = f32_rows(bytes, rows, cols, "blocks.0.ff.weight");
  std::vector<QuantScheme> schemes;
  for (int bits : {2, 3, 4, 8}) {
    QuantScheme s;
    s.bits = bits;
    s.group_size = bits == 3 ? 0 : 128;
    schemes.push_back(s);
  }
  for (GgmlType t : {GgmlType::kQ8_0, GgmlType::kQ4_K, GgmlType::kQ2_K, GgmlType::kIQ4_NL}) {
    QuantScheme s;
    s.kind = SchemeKind::kGgml;
    s.ggml = t;
    s.bits = ggml_traits(t).nominal_bits;
    schemes.push_back(s);
  }
  for (bool rotate : {false, true}) {
    QuantScheme s;
    s.kind = SchemeKind::kEntropy;
    s.rotate = rotate;
    schemes.push_back(s);
  }
  ThreadPool p1(1), p2(2), p4(4);
  testing::TempDir dir;
  for (const QuantScheme& s : schemes) {
    ASSERT_OK_AND_ASSIGN(EncodedTensor memory, run_job(src, s, nullptr, ""));
    ASSERT_FALSE(memory.spill);
    for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p1, &p2, &p4}) {
      const std::string what = scheme_name(s) + " threads=" + std::to_string(pool ? pool->size() : 0);
      ASSERT_OK_AND_ASSIGN(EncodedTensor spilled, run_job(src, s, pool, dir.str()));
      ASSERT_TRUE(spilled.spill) << what;
      EXPECT_TRUE(spilled.codes.empty()) << what;
      const auto c = spilled.code_bytes();
      EXPECT_TRUE(std::vector<uint8_t>(c.begin(), c.end()) == memory.codes) << what;
      EXPECT_EQ(spilled.scales, memory.scales) << what;
      EXPECT_EQ(spilled.zero_points, memory.zero_points) << what;
      EXPECT_EQ(spilled.stored_bytes(), memory.stored_bytes()) << what;
      EXPECT_EQ(spilled.stats.sum_ee, memory.stats.sum_ee) << what;
      EXPECT_EQ(spilled.stats.max_abs_err, memory.stats.max_abs_err) << what;
      if (s.kind == SchemeKind::kEntropy) {
        EXPECT_EQ(spilled.entropy->chunk_offsets, memory.entropy->chunk_offsets) << what;
      }
      // the pages read can be handed back; the bytes stay
      spilled.spill->release(0, c.size());
      EXPECT_TRUE(std::vector<uint8_t>(c.begin(), c.end()) == memory.codes) << what;
    }
  }
  EXPECT_EQ(entries(dir), 0u) << "scratch files are unnamed: nothing is left in the folder";
}

TEST(Spill, a_small_entropy_tensor_is_stored_as_the_better_scheme_whether_spilled_or_not) {
  // Uniform weights (a fresh layer's initialization): the rANS codes save nothing, and the plain
  // affine codes of the same budget are stored instead. piece_bytes (where the codes wait) must
  // not change that choice.
  const size_t rows = 256, cols = 64;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-0.125f, 0.125f);
  std::vector<float> w(rows * cols);
  for (float& x : w) x = u(rng);
  const std::vector<uint8_t> bytes = testing::f32_bytes(w);
  const RowSource src = f32_rows(bytes, rows, cols, "context_embedder.weight");
  QuantScheme s;
  s.kind = SchemeKind::kEntropy;
  testing::TempDir dir;
  ASSERT_OK_AND_ASSIGN(EncodedTensor memory, run_job(src, s, nullptr, ""));
  ASSERT_EQ(memory.scheme.kind, SchemeKind::kAffine) << "the test needs a tensor the affine codes win";
  ThreadPool p2(2);
  for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2}) {
    ASSERT_OK_AND_ASSIGN(EncodedTensor spilled, run_job(src, s, pool, dir.str()));
    EXPECT_EQ(scheme_name(spilled.scheme), scheme_name(memory.scheme));
    EXPECT_FALSE(spilled.spill);
    EXPECT_EQ(spilled.codes, memory.codes);
    EXPECT_EQ(spilled.scales, memory.scales);
    EXPECT_EQ(spilled.zero_points, memory.zero_points);
    EXPECT_EQ(spilled.stats.sum_ee, memory.stats.sum_ee);
  }
  EXPECT_EQ(entries(dir), 0u);
}

TEST(Spill, a_job_below_the_threshold_keeps_its_codes_in_memory) {
  const std::vector<float> w = testing::gaussian(64 * 256, 3);
  const std::vector<uint8_t> bytes = testing::f32_bytes(w);
  const RowSource src = f32_rows(bytes, 64, 256, "small");
  testing::TempDir dir;
  TensorJob job(src, QuantScheme{});
  job.spill_codes(dir.str(), 64 * 256 / 2);  // exactly the 4-bit codes' size: not more
  job.run_inline();
  ASSERT_OK(job.status());
  EncodedTensor e = job.take();
  EXPECT_FALSE(e.spill);
  EXPECT_EQ(e.codes.size(), 64u * 256 / 2);
}

TEST(Spill, scratch_file_reads_back_what_was_written_in_any_order) {
  testing::TempDir dir;
  ASSERT_OK_AND_ASSIGN(auto f, SpillFile::Create(dir.str(), "tensor 't'"));
  std::vector<uint8_t> a(10000, 1), b(5000, 2);
  ASSERT_OK(f->Write(10000, b.data(), b.size()));
  ASSERT_OK(f->Write(0, a.data(), a.size()));
  std::vector<uint8_t> back(3);
  ASSERT_OK(f->Read(9999, back.data(), 3));
  EXPECT_EQ(back, (std::vector<uint8_t>{1, 2, 2}));
  ASSERT_OK(f->Map(20000));  // the 5000 bytes never written read as zeros
  ASSERT_EQ(f->bytes().size(), 20000u);
  EXPECT_EQ(f->bytes()[0], 1);
  EXPECT_EQ(f->bytes()[14999], 2);
  EXPECT_EQ(f->bytes()[19999], 0);
  f->release(0, 20000);
  EXPECT_EQ(f->bytes()[12345], 2);
  EXPECT_EQ(entries(dir), 0u);
  back.resize(3000);
  auto r = f->Read(19000, back.data(), back.size());  // past the end
  ASSERT_FALSE(r.ok());
  EXPECT_CONTAINS(r.message(), dir.str());
  EXPECT_CONTAINS(r.message(), "tensor 't'");
}

TEST(Spill, a_write_that_fails_names_the_folder_the_tensor_and_the_reason) {
  const size_t rows = 512, cols = 1024;  // 256 KiB of 4-bit codes, past the limit below
  const std::vector<float> w = testing::gaussian(rows * cols, 9);
  const std::vector<uint8_t> bytes = testing::f32_bytes(w);
  const RowSource src = f32_rows(bytes, rows, cols, "blocks.3.proj.weight");
  testing::TempDir dir;
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto* previous = ::signal(SIGXFSZ, SIG_IGN);  // past the limit, writes fail with EFBIG
  struct rlimit small = old;
  small.rlim_cur = 64 << 10;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  ThreadPool pool(2);
  auto r = run_job(src, QuantScheme{}, &pool, dir.str());
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, previous);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIoError);
  EXPECT_CONTAINS(r.status().message(), dir.str());
  EXPECT_CONTAINS(r.status().message(), "blocks.3.proj.weight");
  EXPECT_CONTAINS(r.status().message(), "File too large");
  EXPECT_EQ(entries(dir), 0u);
}

}  // namespace
}  // namespace aq
