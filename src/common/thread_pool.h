// A fixed set of worker threads fed from one FIFO queue. FIFO order means earlier tensors'
// blocks finish first, which keeps the in-order writer busy and memory bounded. Results never
// depend on which worker ran a task: tasks write to disjoint, pre-assigned places.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace aq {

class ThreadPool {
 public:
  // threads <= 0: one per hardware thread.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()); }
  void submit(std::function<void()> task);

  static int resolve_threads(int requested);

 private:
  void work();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

// Counts outstanding tasks; wait() returns when all are done.
class WaitGroup {
 public:
  void add(int n = 1);
  void done();
  void wait();
  // Waits at most `seconds`; true when all tasks are done.
  bool wait_for(double seconds);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int pending_ = 0;
};

}  // namespace aq
