// Where the CPU kernels' threads come from (run_parallel, used by parallel_for in
// common_cpu.h).
//
// Default ("auto"): the OpenMP team torch already runs (GOMP_parallel, looked up among the
// loaded libraries, never loaded or linked by us) while it keeps up, else a small pool of our
// own (Pool below): where no OpenMP runtime is loaded, in a process forked after this library
// was loaded (the parent's team has no threads there; libgomp would wait for them forever),
// and for a while after a parallel region whose end barrier waited too long.
//
// Why the team: it keeps spinning after every torch op, on the core a pool of our own would
// need, so the pool lost that core between torch ops -- in the profiler's hooks, and in any
// loop that alternates with torch. Measured on the 2-core VM (benches/cpu_hotpaths.sh, Nov 30,
// both in turn): knn on one [256, 576] sample in a loop beside cdist 0.40 ms on the team,
// 0.55 ms on the pool; SmolLM2 tap overhead with four methods 18% against 24%.
// Why not always: a region ends at a barrier that waits for every thread of the team. When
// another process holds a core at a higher priority (this process niced, Nov 30: knn
// [2, 256, 512] 47 ms on the team, 1.2 ms on the pool), the thread that was not scheduled
// holds the caller there for whole time slices. Every region here claims its items from a
// counter, so the caller knows when the work ran out; a region whose barrier then waited
// longer than kStallNs and than the work itself sends the next calls to the pool for a
// back-off that doubles with every stall (up to kMaxBackoffNs) and halves with every region
// that kept up.
//
// ENTRODROP_THREADS=omp: the team always (the pool where none is loaded or after a fork);
// =pool: the pool always; =std: std::threads started per call.
//
// The pool never waits for a thread that has not started: items are claimed one at a time
// from a shared counter, the caller claims too, and it returns as soon as every item is
// *done* -- a helper that wakes late finds the job gone and goes back to sleep. What the
// caller still waits for (an item a preempted helper holds) it waits for passively (futex),
// so that the helper can run on the core it frees. Idle helpers spin briefly after a job
// (back-to-back calls pick up at once), then sleep on a futex.
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
enum class Fallback { Adaptive, Never };

struct Config {
  Mode mode = Mode::Pool;
  Fallback fallback = Fallback::Adaptive;
  OmpRuntime omp;
};

// Set in a child forked after this library was loaded: it runs on a pool of its own (the
// parent's OpenMP team has threads the child does not have). Registered when the library is
// loaded, not at the first kernel call: a parent that ran only torch ops before forking has a
// team too.
std::atomic<bool> g_forked{false};
const int g_atfork = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const Config& config() {
  static const Config cfg = [] {
    Config c;
    const char* env = std::getenv("ENTRODROP_THREADS");
    if (env && std::strcmp(env, "std") == 0) {
      c.mode = Mode::Std;
    } else if (!(env && std::strcmp(env, "pool") == 0)) {  // auto, omp
      dl_iterate_phdr(find_loaded, &c.omp);
      c.mode = c.omp.fn ? Mode::Omp : Mode::Pool;  // no runtime loaded: the pool
      if (env && std::strcmp(env, "omp") == 0) c.fallback = Fallback::Never;
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
// The team's back-off (auto mode): until g_pool_until_ns the kernels run on the pool.
constexpr int64_t kStallNs = 200000;            // a barrier wait this long (0.2 ms) is a stall
constexpr int64_t kMinBackoffNs = 500000000;    // 0.5 s on the pool after a first stall,
constexpr int64_t kMaxBackoffNs = 32000000000;  // doubling up to 32 s while stalls go on
std::atomic<int64_t> g_pool_until_ns{0};
std::atomic<int64_t> g_backoff_ns{0};  // the current back-off; 0: none
std::atomic<int64_t> g_stalls{0};

// Runs the items on the team; returns how long the caller waited at the end barrier after
// the items ran out, and the time until then.
void run_omp(int64_t n_items, int nthreads, ItemFn fn, void* ctx, int64_t* wait_ns, int64_t* work_ns) {
  struct Team {
    ItemFn fn;
    void* ctx;
    int64_t n;
    int size;
    std::atomic<int64_t> next{0};
    int64_t caller_done = 0;
  } team{fn, ctx, n_items, nthreads};
  const int64_t t0 = now_ns();
  // tid = the thread's number in the team, so a persistent team thread keeps the same
  // per-thread scratch from call to call. A team may come smaller than asked (nested
  // region, thread limit): the counter spreads the items over whoever is there.
  config().omp.fn(
      [](void* p) {
        auto* t = static_cast<Team*>(p);
        const int tid = config().omp.thread_num();
        if (tid < t->size)
          for (int64_t i; (i = t->next.fetch_add(1, std::memory_order_relaxed)) < t->n;)
            t->fn(t->ctx, i, tid);
        if (tid == 0) t->caller_done = now_ns();  // the items ran out (the caller is thread 0)
      },
      &team, unsigned(nthreads), 0);
  const int64_t t1 = now_ns();
  *wait_ns = t1 - team.caller_done;
  *work_ns = team.caller_done - t0;
}

// auto mode: the team unless it is backing off; a stalled region starts or doubles the
// back-off, a region that kept up halves it.
void run_team_or_pool(int64_t n_items, int nthreads, ItemFn fn, void* ctx, bool adaptive) {
  if (adaptive && now_ns() < g_pool_until_ns.load(std::memory_order_relaxed))
    return pool().run(n_items, nthreads, fn, ctx);
  int64_t wait = 0, work = 0;
  run_omp(n_items, nthreads, fn, ctx, &wait, &work);
  if (!adaptive) return;
  const int64_t b = g_backoff_ns.load(std::memory_order_relaxed);
  if (wait > kStallNs && wait > work) {
    const int64_t nb = std::min(kMaxBackoffNs, std::max(kMinBackoffNs, 2 * b));
    g_backoff_ns.store(nb);
    g_pool_until_ns.store(now_ns() + nb);
    g_stalls.fetch_add(1);
  } else if (b != 0) {  // one region that kept up halves the back-off, not ends it
    g_backoff_ns.store(b / 2 >= kMinBackoffNs ? b / 2 : 0);
  }
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
      if (!g_forked.load(std::memory_order_relaxed))
        return run_team_or_pool(n_items, nthreads, fn, ctx, config().fallback == Fallback::Adaptive);
      return pool().run(n_items, nthreads, fn, ctx);
    case Mode::Std:
      return run_std(n_items, nthreads, fn, ctx);
    default:
      return pool().run(n_items, nthreads, fn, ctx);
  }
}

}  // namespace cpu

void mark_forked_cpu() {
  cpu::g_forked.store(true);
}

std::string thread_pool_cpu() {
  const auto& c = cpu::config();
  if (c.mode == cpu::Mode::Omp && !cpu::g_forked.load()) {
    std::string r = "openmp team of " + c.omp.path;
    if (c.fallback == cpu::Fallback::Adaptive) {
      r += " (the pool after a stalled region";
      const int64_t n = cpu::g_stalls.load();
      if (n) r += ": " + std::to_string(n) + " so far";
      if (cpu::now_ns() < cpu::g_pool_until_ns.load()) r += ", on the pool now";
      r += ")";
    }
    return r;
  }
  if (c.mode == cpu::Mode::Std) return "std::thread";
  return "pool";
}

}  // namespace entrodrop
