// Where the CPU kernels' threads come from (run_parallel, used by parallel_for in
// common_cpu.h).
//
// Default ("auto"): the OpenMP team torch already runs (GOMP_parallel, looked up among the
// loaded libraries, never loaded or linked by us), or where none is loaded (and in a forked
// child, where an OpenMP team inherited from the parent may not exist) a small pool of our own
// (Pool below). Measured on the 2-core VM (benches/cpu_hotpaths.sh, Nov 30, both modes in
// turn): torch's team keeps spinning after every torch op, on the core a pool of our own would
// need, so the pool lost that core between torch ops -- in the profiler's hooks, and in any
// loop that alternates with torch. knn on one [256, 576] sample in a loop beside cdist: 0.40 ms
// on the team, 0.66 ms on the pool; SmolLM2 tap overhead with four methods 18% against 24%.
// With one core busy (benches/under_load.py) the team's worst case is knn [8, 256, 576] at
// 2.2x its idle time against 1.7x for the pool, at about the same busy time: every job here
// is one parallel region whose items are claimed from a counter (a thread that starts late
// finds no work left), so the region's one barrier is all a preempted thread can delay.
//
// ENTRODROP_THREADS=pool forces the pool: it never waits for a thread that has not started:
// items are claimed one at a time from a shared counter, the caller claims too, and it
// returns as soon as every item is *done* -- a helper that wakes late finds the job gone and
// goes back to sleep. What the caller still waits for (an item a preempted helper holds) it
// waits for passively (futex), so that the helper can run on the core it frees. Idle helpers
// spin briefly after a job (back-to-back calls pick up at once), then sleep on a futex.
// ENTRODROP_THREADS=omp requires the OpenMP team (the pool where none is loaded), and
// ENTRODROP_THREADS=std starts std::threads per call.
#include <dlfcn.h>
#include <linux/futex.h>
#include <link.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

// ----------------------------------------------------------------- OpenMP runtime lookup
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct OmpRuntime {
  GompParallel fn = nullptr;
  int (*thread_num)() = nullptr;
  std::string path;
};

int find_loaded(struct dl_phdr_info* info, size_t, void* data) {
  auto* rt = static_cast<OmpRuntime*>(data);
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libgomp", 7) != 0 && std::strncmp(base, "libiomp5", 8) != 0 &&
      std::strncmp(base, "libomp", 6) != 0)
    return 0;
  void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD);  // already loaded: only a new reference
  if (!h) return 0;
  void* par = dlsym(h, "GOMP_parallel");
  void* num = dlsym(h, "omp_get_thread_num");
  if (par && num) {
    rt->fn = reinterpret_cast<GompParallel>(par);
    rt->thread_num = reinterpret_cast<int (*)()>(num);
    rt->path = name;
    return 1;  // stop at the first runtime that has them
  }
  dlclose(h);
  return 0;
}

enum class Mode { Pool, Omp, Std };

struct Config {
  Mode mode = Mode::Pool;
  OmpRuntime omp;
};

// Set in a child forked after the first kernel call: it runs on a pool of its own (the
// parent's OpenMP team may hold threads the child does not have).
std::atomic<bool> g_forked{false};

const Config& config() {
  static const Config cfg = [] {
    Config c;
    const char* env = std::getenv("ENTRODROP_THREADS");
    if (env && std::strcmp(env, "std") == 0) {
      c.mode = Mode::Std;
    } else if (!(env && std::strcmp(env, "pool") == 0)) {  // auto, omp
      dl_iterate_phdr(find_loaded, &c.omp);
      c.mode = c.omp.fn ? Mode::Omp : Mode::Pool;  // no runtime loaded: the pool
      if (c.mode == Mode::Omp) pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
    }
    return c;
  }();
  return cfg;
}

// ----------------------------------------------------------------- futex, pause
long futex(std::atomic<uint32_t>* addr, int op, uint32_t val) {
  static_assert(sizeof(std::atomic<uint32_t>) == 4, "futex word");
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op | FUTEX_PRIVATE_FLAG, val, nullptr, nullptr,
                 0);
}
void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  futex(addr, FUTEX_WAIT, expected);
}
void futex_wake(std::atomic<uint32_t>* addr, int n) {
  futex(addr, FUTEX_WAKE, uint32_t(n));
}

ED_INLINE void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spin until cond() or about `us` microseconds have passed; returns cond().
template <typename Cond>
bool spin_until(Cond cond, int64_t us) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (;;) {
    for (int i = 0; i < 32; ++i) {
      if (cond()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= end) return cond();
  }
}

// How long a helper spins for the next job, and the caller for the last items, before
// sleeping: long enough to bridge the Python between two kernel calls, short enough to cost
// a busy machine nothing that matters.
constexpr int64_t kIdleSpinUs = 50;
constexpr int64_t kWaitSpinUs = 20;

// ----------------------------------------------------------------- the pool
class Pool {
 public:
  void run(int64_t n_items, int nthreads, ItemFn fn, void* ctx);
  int workers() const { return nworkers_.load(std::memory_order_relaxed); }

 private:
  static constexpr uint64_t kMaxChunks = 0xffff;
  static constexpr int kMaxThreads = 256;
  // state: seq (32 bits) | next chunk to claim (16) | number of chunks (16). A claim is a CAS
  // on the whole word, so it succeeds only while the job it read is the current one.
  alignas(64) std::atomic<uint64_t> state_{0};
  // the current job (written before its state is published, read after a state load)
  alignas(64) std::atomic<ItemFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> width_{0};                  // helpers with tid >= width stay out (per-thread scratch)
  std::atomic<int64_t> per_{1}, total_{0};     // chunk c = items [c * per, (c + 1) * per)
  alignas(64) std::atomic<uint32_t> done_{0};  // chunks finished (futex word of the caller)
  std::atomic<uint32_t> caller_waiting_{0};
  alignas(64) std::atomic<uint32_t> epoch_{0};  // futex word of sleeping helpers
  std::atomic<int> sleepers_{0};
  std::mutex mu_;  // one job at a time; guards seq_ and spawning
  uint32_t seq_ = 0;
  std::atomic<int> nworkers_{0};

  void work(uint64_t s, int tid);
  void helper(int tid);
  bool grow(int want);
};

void Pool::work(uint64_t s, int tid) {
  const uint32_t seq = uint32_t(s >> 32);
  for (;;) {
    const uint32_t next = uint32_t(s >> 16) & 0xffffu, n = uint32_t(s) & 0xffffu;
    if (next >= n) return;
    const ItemFn f = fn_.load(std::memory_order_relaxed);
    void* c = ctx_.load(std::memory_order_relaxed);
    const int w = width_.load(std::memory_order_relaxed);
    const int64_t per = per_.load(std::memory_order_relaxed);
    const int64_t total = total_.load(std::memory_order_relaxed);
    if (tid >= w) return;
    if (!state_.compare_exchange_weak(s, s + (uint64_t(1) << 16), std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      if (uint32_t(s >> 32) != seq) return;  // another job: this one is finished
      continue;
    }
    // The claim succeeded on the job read above: the caller cannot return before this chunk
    // is done, so f, c, per and total are still that job's.
    const int64_t i1 = std::min(total, (int64_t(next) + 1) * per);
    for (int64_t i = int64_t(next) * per; i < i1; ++i) f(c, i, tid);
    if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == n &&
        caller_waiting_.load(std::memory_order_seq_cst))
      futex_wake(&done_, 1);
    s = state_.load(std::memory_order_acquire);
    if (uint32_t(s >> 32) != seq) return;
  }
}

void Pool::helper(int tid) {
  uint32_t seen = uint32_t(state_.load(std::memory_order_acquire) >> 32);
  for (;;) {
    uint64_t s = state_.load(std::memory_order_acquire);
    if (uint32_t(s >> 32) != seen) {
      seen = uint32_t(s >> 32);
      work(s, tid);
      continue;
    }
    auto fresh = [&] { return uint32_t(state_.load(std::memory_order_acquire) >> 32) != seen; };
    if (spin_until(fresh, kIdleSpinUs)) continue;
    const uint32_t e = epoch_.load(std::memory_order_seq_cst);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    if (uint32_t(state_.load(std::memory_order_seq_cst) >> 32) == seen) futex_wait(&epoch_, e);
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }
}

bool Pool::grow(int want) {
  for (int n = nworkers_.load(); n < want; ++n) {
    try {
      std::thread([this, n] {
        pthread_setname_np(pthread_self(), "entrodrop");
        helper(n + 1);
      }).detach();
    } catch (...) {
      return false;  // no more threads: run with those there are
    }
    nworkers_.store(n + 1);
  }
  return true;
}

void Pool::run(int64_t n_items, int nthreads, ItemFn fn, void* ctx) {
  std::unique_lock<std::mutex> lk(mu_, std::try_to_lock);
  nthreads = std::min(nthreads, kMaxThreads);
  if (!lk.owns_lock() || nthreads <= 1) {                 // a job already runs (another caller thread, or
    for (int64_t i = 0; i < n_items; ++i) fn(ctx, i, 0);  // a kernel inside a kernel): inline
    return;
  }
  grow(nthreads - 1);
  const int64_t per = (n_items + int64_t(kMaxChunks) - 1) / int64_t(kMaxChunks);
  const uint32_t chunks = uint32_t((n_items + per - 1) / per);
  fn_.store(fn, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  width_.store(nthreads, std::memory_order_relaxed);
  per_.store(per, std::memory_order_relaxed);
  total_.store(n_items, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  ++seq_;
  const uint64_t s = (uint64_t(seq_) << 32) | chunks;
  state_.store(s, std::memory_order_seq_cst);
  epoch_.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake(&epoch_, INT_MAX);
  work(s, 0);
  auto finished = [&] { return done_.load(std::memory_order_acquire) == chunks; };
  if (spin_until(finished, kWaitSpinUs)) return;
  caller_waiting_.store(1, std::memory_order_seq_cst);
  for (uint32_t d; (d = done_.load(std::memory_order_seq_cst)) != chunks;) futex_wait(&done_, d);
  caller_waiting_.store(0, std::memory_order_relaxed);
}

// The pool, never destroyed (helpers may outlive static destructors). A forked child has
// none of the parent's helpers: it gets a fresh pool (the old one is left as it was).
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  static std::once_flag once;
  std::call_once(once, [] {
    g_pool.store(new Pool, std::memory_order_release);
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(new Pool, std::memory_order_release); });
  });
  return *g_pool.load(std::memory_order_acquire);
}

// ----------------------------------------------------------------- OpenMP team, std::thread
void run_omp(int64_t n_items, int nthreads, ItemFn fn, void* ctx) {
  struct Team {
    ItemFn fn;
    void* ctx;
    int64_t n;
    int size;
    std::atomic<int64_t> next{0};
  } team{fn, ctx, n_items, nthreads};
  // tid = the thread's number in the team, so a persistent team thread keeps the same
  // per-thread scratch from call to call. A team may come smaller than asked (nested
  // region, thread limit): the counter spreads the items over whoever is there.
  config().omp.fn(
      [](void* p) {
        auto* t = static_cast<Team*>(p);
        const int tid = config().omp.thread_num();
        if (tid >= t->size) return;
        for (int64_t i; (i = t->next.fetch_add(1, std::memory_order_relaxed)) < t->n;) t->fn(t->ctx, i, tid);
      },
      &team, unsigned(nthreads), 0);
}

void run_std(int64_t n_items, int nthreads, ItemFn fn, void* ctx) {
  std::atomic<int64_t> next{0};
  auto worker = [&](int tid) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) fn(ctx, i, tid);
  };
  std::vector<std::thread> threads;
  threads.reserve(size_t(nthreads - 1));
  for (int t = 1; t < nthreads; ++t) threads.emplace_back(worker, t);
  worker(0);
  for (auto& th : threads) th.join();
}

}  // namespace

void run_parallel(int64_t n_items, int nthreads, ItemFn fn, void* ctx) {
  if (n_items <= 0) return;
  if (nthreads <= 1 || n_items == 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(ctx, i, 0);
    return;
  }
  switch (config().mode) {
    case Mode::Omp:
      if (!g_forked.load(std::memory_order_relaxed)) return run_omp(n_items, nthreads, fn, ctx);
      return pool().run(n_items, nthreads, fn, ctx);
    case Mode::Std:
      return run_std(n_items, nthreads, fn, ctx);
    default:
      return pool().run(n_items, nthreads, fn, ctx);
  }
}

}  // namespace cpu

std::string thread_pool_cpu() {
  const auto& c = cpu::config();
  if (c.mode == cpu::Mode::Omp && !cpu::g_forked.load()) return "openmp team of " + c.omp.path;
  if (c.mode == cpu::Mode::Std) return "std::thread";
  return "pool";
}

}  // namespace entrodrop
