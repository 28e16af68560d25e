// The bytes and the error figures of an encoded tensor never depend on the thread count, and the
// thread pool runs every task it is given.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "engine/tensor_job.h"
#include "test_util.h"

namespace aq {
namespace {

void expect_identical(const EncodedTensor& a, const EncodedTensor& b, const std::string& what) {
  EXPECT_EQ(a.scheme, b.scheme) << what;
  EXPECT_EQ(a.codes, b.codes) << what;
  EXPECT_EQ(a.scales, b.scales) << what;
  EXPECT_EQ(a.zero_points, b.zero_points) << what;
  EXPECT_EQ(a.stats.count, b.stats.count) << what;
  EXPECT_EQ(a.stats.sum_ww, b.stats.sum_ww) << what;
  EXPECT_EQ(a.stats.sum_dd, b.stats.sum_dd) << what;
  EXPECT_EQ(a.stats.sum_wd, b.stats.sum_wd) << what;
  EXPECT_EQ(a.stats.sum_ee, b.stats.sum_ee) << what;
  EXPECT_EQ(a.stats.max_abs_err, b.stats.max_abs_err) << what;
}

TEST(Determinism, encode_tensor_is_byte_identical_for_any_thread_count) {
  // 203 x 1000: blocks of 64 rows (64, 64, 64, 11), so blocks land on different workers.
  const size_t rows = 203, cols = 1000;
  ASSERT_EQ(rows_per_block(cols), 64u);
  struct Case {
    std::vector<float> w;
    const char* what;
  };
  std::vector<Case> cases;
  cases.push_back({testing::gaussian(rows * cols, 31, 0.02f), "gaussian"});
  cases.push_back({testing::student_t4(rows * cols, 32, 0.02f), "student-t4"});
  std::vector<float> tiny = testing::gaussian(rows * cols, 33, 1e-7f);  // float32 scales
  cases.push_back({tiny, "tiny"});

  ThreadPool p1(1), p2(2), p4(4);
  for (const auto& c : cases) {
    const std::vector<uint8_t> bytes = testing::f32_bytes(c.w);
    RowSource src;
    src.data = bytes.data();
    src.rows = rows;
    src.cols = cols;
    src.name = c.what;
    for (int bits : {2, 3, 4, 8})
      for (bool sym : {false, true}) {
        QuantScheme s;
        s.bits = bits;
        s.group_size = bits == 3 ? 0 : 128;
        s.symmetric = sym;
        const std::string what = std::string(c.what) + " " + scheme_name(s);
        ASSERT_OK_AND_ASSIGN(EncodedTensor inline_run, encode_tensor(src, s, nullptr));
        for (ThreadPool* pool : {&p1, &p2, &p4}) {
          ASSERT_OK_AND_ASSIGN(EncodedTensor threaded, encode_tensor(src, s, pool));
          expect_identical(inline_run, threaded, what + " threads=" + std::to_string(pool->size()));
        }
      }
  }
}

TEST(Determinism, reports_the_first_non_finite_weight_in_row_order_for_any_thread_count) {
  const size_t rows = 300, cols = 1000;  // blocks of 64 rows
  std::vector<float> w = testing::gaussian(rows * cols, 5);
  w[250 * cols + 7] = INFINITY;  // block 3
  w[70 * cols + 3] = NAN;        // block 1: the one reported
  const std::vector<uint8_t> bytes = testing::f32_bytes(w);
  RowSource src;
  src.data = bytes.data();
  src.rows = rows;
  src.cols = cols;
  src.name = "blocks.0.weight";
  src.file = "/models/x.safetensors";
  ThreadPool p4(4);
  for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p4}) {
    auto r = encode_tensor(src, QuantScheme{}, pool);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kNonFinite);
    EXPECT_CONTAINS(r.status().message(), "blocks.0.weight");
    EXPECT_CONTAINS(r.status().message(), "/models/x.safetensors");
    EXPECT_CONTAINS(r.status().message(), "[70, 3]");
    EXPECT_CONTAINS(r.status().message(), "NaN");
  }
}

TEST(ThreadPool, runs_every_submitted_task_before_the_wait_group_releases) {
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    std::atomic<int> sum{0};
    WaitGroup wg;
    wg.add(100);
    for (int i = 1; i <= 100; ++i)
      pool.submit([&, i] {
        sum += i;
        wg.done();
      });
    wg.wait();
    EXPECT_EQ(sum.load(), 5050) << threads;
  }
}

TEST(ThreadPool, one_worker_runs_tasks_in_submission_order) {
  ThreadPool pool(1);
  std::vector<int> order;
  WaitGroup wg;
  wg.add(20);
  for (int i = 0; i < 20; ++i)
    pool.submit([&, i] {
      order.push_back(i);
      wg.done();
    });
  wg.wait();
  for (int i = 0; i < 20; ++i) EXPECT_EQ(order[static_cast<size_t>(i)], i);
}

TEST(ThreadPool, destruction_finishes_queued_tasks) {
  std::atomic<int> ran{0};
  {
    ThreadPool pool(2);
    for (int i = 0; i < 50; ++i) pool.submit([&] { ++ran; });
  }
  EXPECT_EQ(ran.load(), 50);
}

TEST(ThreadPool, wait_for_times_out_while_work_is_pending) {
  WaitGroup wg;
  wg.add(1);
  EXPECT_FALSE(wg.wait_for(0.01));
  wg.done();
  EXPECT_TRUE(wg.wait_for(0.01));
  EXPECT_GE(ThreadPool::resolve_threads(0), 1);
  EXPECT_EQ(ThreadPool::resolve_threads(3), 3);
}

}  // namespace
}  // namespace aq
