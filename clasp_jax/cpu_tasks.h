// Shares a kernel's tasks out among XLA's CPU threads: the tasks [0, tasks) are claimed one at
// a time by the calling thread and a helper for each other thread of the pool, and the call
// returns once every task has run. The caller works too, so no task waits for a helper to
// start; a helper that starts late, even after the call has returned, finds nothing left (the
// claim counter it reads is shared with it, and it runs no task).
//
// Used by the CPU kernels (cpu_product.cc, cpu_attention.cc), built together by
// `clasp_jax.cpu_product`.

#ifndef CLASP_JAX_CPU_TASKS_H_
#define CLASP_JAX_CPU_TASKS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace clasp_jax {

template <class Task>
void RunTasks(xla::ffi::ThreadPool& pool, int64_t tasks, Task task) {
  struct Claims {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto claims = std::make_shared<Claims>();
  auto run = [claims, tasks, task] {
    int64_t finished = 0;
    for (int64_t i; (i = claims->next.fetch_add(1, std::memory_order_relaxed)) < tasks;
         ++finished)
      task(i);
    claims->done.fetch_add(finished, std::memory_order_release);
  };
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  for (int64_t i = 1; i < std::min(threads, tasks); ++i) pool.Schedule(decltype(run)(run));
  run();
  while (claims->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

}  // namespace clasp_jax

#endif  // CLASP_JAX_CPU_TASKS_H_
