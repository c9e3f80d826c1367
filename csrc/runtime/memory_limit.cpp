#include "runtime/memory_limit.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

namespace dgemma {
namespace {

void lower(MemoryLimit& m, uint64_t bytes, const char* source) {
  if (bytes < m.bytes) m.bytes = bytes, m.source = source;
}

bool read_u64(const char* path, uint64_t* out) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word.empty() || word.find_first_not_of("0123456789") != std::string::npos) return false;
  try {
    *out = std::stoull(word);
  } catch (...) {
    return false;
  }
  return true;
}

}  // namespace

MemoryLimit memory_limit() {
  MemoryLimit m;
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) lower(m, static_cast<uint64_t>(pages) * static_cast<uint64_t>(page), "physical memory");
  uint64_t cg = 0;
  if (read_u64("/sys/fs/cgroup/memory.max", &cg)) lower(m, cg, "the cgroup's memory.max");
  else if (read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes", &cg)) lower(m, cg, "the cgroup's memory limit");
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    uint64_t used_pages = 0;
    std::ifstream statm("/proc/self/statm");
    statm >> used_pages;  // total program size, in pages (0 if unreadable)
    const uint64_t used = used_pages * static_cast<uint64_t>(page > 0 ? page : 4096);
    const uint64_t cap = static_cast<uint64_t>(rl.rlim_cur);
    lower(m, cap > used ? cap - used : 0, "the address space left under RLIMIT_AS");
  }
  if (m.source.empty()) m.source = "no limit found";
  return m;
}

std::string format_bytes(double bytes) {
  char buf[64];
  if (bytes >= 1024.0 * 1024 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.2f TiB", bytes / (1024.0 * 1024 * 1024 * 1024));
  else if (bytes >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  else std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024));
  return buf;
}

}  // namespace dgemma
