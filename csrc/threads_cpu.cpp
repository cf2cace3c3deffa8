// Where the CPU kernels' threads come from (see parallel_for in common_cpu.h).
//
// torch runs its CPU ops (MKL GEMMs included) on an OpenMP team, whose idle threads keep
// spinning for a while after each parallel region. Threads of our own started right after a
// torch op then share the cores with those spinners (measured: knn on 2 cores lost ~15% to
// it). So when an OpenMP runtime is already loaded in the process (torch's bundled
// libgomp, or an LLVM/Intel runtime, which export the same GOMP_parallel entry point), the
// kernels borrow *its* team through GOMP_parallel: the threads torch just used pick the work
// up at once. The runtime is looked up among the loaded libraries, never loaded or linked
// by us (two OpenMP runtimes in one process fight over the cores). Without one (or with
// ENTRODROP_THREADS=std) the kernels start std::threads.
#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

struct Runtime {
  GompParallel fn = nullptr;
  int (*thread_num)() = nullptr;
  std::string path;
};

int find_loaded(struct dl_phdr_info* info, size_t, void* data) {
  auto* rt = static_cast<Runtime*>(data);
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

const Runtime& runtime() {
  static const Runtime rt = [] {
    Runtime r;
    const char* env = std::getenv("ENTRODROP_THREADS");
    if (env && std::strcmp(env, "std") == 0) return r;
    dl_iterate_phdr(find_loaded, &r);
    return r;
  }();
  return rt;
}

}  // namespace

GompParallel omp_parallel() { return runtime().fn; }
int omp_thread_num() { return runtime().thread_num(); }

}  // namespace cpu

std::string thread_pool_cpu() {
  const auto& rt = cpu::runtime();
  return rt.fn ? "openmp team of " + rt.path : std::string("std::thread");
}

}  // namespace entrodrop
