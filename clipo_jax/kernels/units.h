// Shares `units` independent pieces of work out over XLA's intra-op thread pool: `helpers` pool
// threads and the calling thread claim units until none is left; the call returns when every
// unit has run. The caller works too, so it only ever waits for units already running. A unit that
// throws (std::bad_alloc from its scratch) is counted as done and reported by the return value, so
// no exception unwinds the caller's stack while helpers still use it, or crosses the FFI boundary.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace clipo_kernels {

struct UnitQueue {
  int64_t units = 0;
  std::function<void(int64_t)> run;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::condition_variable cv;
};

// Claims units until none is left, then adds how many it ran to `done` (the last one wakes the caller).
inline void Drain(UnitQueue& q) {
  int64_t ran = 0;
  for (int64_t u; (u = q.next.fetch_add(1)) < q.units; ++ran) {
    try {
      q.run(u);
    } catch (...) {
      q.failed = true;
    }
  }
  if (ran && q.done.fetch_add(ran) + ran == q.units) {
    std::lock_guard<std::mutex> lock(q.mu);
    q.cv.notify_all();
  }
}

// run(u) for u in [0, units); false if a unit threw. A helper that starts after every unit is done
// finds none and returns without calling run, so run may refer to the caller's stack.
inline bool RunUnits(xla::ffi::ThreadPool& pool, int64_t units, int64_t helpers, std::function<void(int64_t)> run) {
  if (units <= 0) return true;
  auto q = std::make_shared<UnitQueue>();  // helpers hold it: one may start after we returned
  q->units = units;
  q->run = std::move(run);
  helpers = std::max<int64_t>(0, std::min<int64_t>(helpers, std::min<int64_t>(pool.num_threads() - 1, units - 1)));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([q] { Drain(*q); });
  Drain(*q);
  std::unique_lock<std::mutex> lock(q->mu);
  q->cv.wait(lock, [&] { return q->done.load() == q->units; });
  return !q->failed;
}

}  // namespace clipo_kernels
