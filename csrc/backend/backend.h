// The one interface between the runtime (scheduler, KV cache) and a compute backend.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/kv_cache.h"

namespace dgemma {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Encoder pass: appends tokens[r] (at positions cache length ...) to caches[r] for every row,
  // causal attention with sliding windows on sliding layers. Commits the caches on success and
  // leaves them untouched if it throws.
  virtual void encode(const std::vector<SeqCache*>& caches, const std::vector<std::vector<int32_t>>& tokens) = 0;

  // Decoder pass over n canvas tokens per row: bidirectional attention over each row's cache and
  // its canvas; the cache is only read. sc_logits: empty, or one pointer per row to that row's
  // previous-step processed logits [n, vocab], null for a row at its first step (its
  // self-conditioning signal is then exactly zero), so rows at different steps share a pass.
  // Writes soft-capped float32 logits [rows, n, vocab].
  virtual void decode(const std::vector<const SeqCache*>& caches, const int32_t* canvas, int n,
                      const std::vector<const float*>& sc_logits, float* logits) = 0;
};

}  // namespace dgemma
