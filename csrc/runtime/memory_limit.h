// How much memory this process may still allocate: what the engine checks the KV pools and step
// workspaces that a config and the engine options imply against, before allocating them.
#pragma once

#include <cstdint>
#include <string>

namespace dgemma {

struct MemoryLimit {
  uint64_t bytes = UINT64_MAX;
  std::string source;  // which limit it is, for messages ("physical memory", "RLIMIT_AS", ...)
};

// The smallest of: physical memory, the cgroup's memory.max (containers), and the address space
// left under RLIMIT_AS (ulimit -v).
MemoryLimit memory_limit();

// "1.50 GiB"
std::string format_bytes(double bytes);

}  // namespace dgemma
