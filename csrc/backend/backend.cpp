#include "backend/backend.h"

namespace dgemma {

const char* op_name(Op op) {
  switch (op) {
    case Op::kEmbed: return "embed";
    case Op::kRmsNorm: return "rmsnorm";
    case Op::kLinear: return "linear";
    case Op::kCopy: return "copy";
    case Op::kHeadNormRope: return "head_norm_rope";
    case Op::kKvWrite: return "kv_write";
    case Op::kAttention: return "attention";
    case Op::kResidualNormAdd: return "residual_norm_add";
    case Op::kMlp: return "mlp";
    case Op::kMoeRouter: return "moe_router";
    case Op::kMoeExperts: return "moe_experts";
    case Op::kFfnCombine: return "ffn_combine";
    case Op::kGatherRows: return "gather_rows";
    case Op::kScatterAddRows: return "scatter_add_rows";
    case Op::kLmHeadSample: return "lm_head_sample";
    case Op::kLmHeadLogits: return "lm_head_logits";
    case Op::kSoftEmbedding: return "soft_embedding";
    case Op::kResidualNormAddNorms: return "residual_norm_add_norms";
    case Op::kFfnCombineNorm: return "ffn_combine_norm";
    case Op::kHeadNormRopeQkv: return "head_norm_rope_qkv";
    case Op::kCount: break;
  }
  return "?";
}

void Backend::unsupported(Op op) const {
  DG_THROW(Unsupported, "the " << name() << " backend does not implement the '" << op_name(op) << "' op");
}

void Backend::begin_capture() { DG_THROW(Unsupported, "the " << name() << " backend cannot capture op sequences"); }
void Backend::end_capture(uint64_t) { DG_THROW(Error, "end_capture on the " << name() << " backend, which cannot capture"); }

void Backend::set_profiling(bool on) {
  DG_REQUIRE(!on, Unsupported, "the " << name() << " backend cannot profile its ops");
}

void Backend::embed(const Tensor&, const Tensor&) { unsupported(Op::kEmbed); }
void Backend::rmsnorm(const Tensor&, WeightRef, const Tensor&, float) { unsupported(Op::kRmsNorm); }
void Backend::linear(WeightRef, const Tensor&, const Tensor&) { unsupported(Op::kLinear); }
void Backend::copy(const Tensor&, const Tensor&) { unsupported(Op::kCopy); }
void Backend::head_norm_rope(const Tensor&, WeightRef, const Tensor&, const Tensor&, float) {
  unsupported(Op::kHeadNormRope);
}
void Backend::head_norm_rope_qkv(const HeadNorm& q, const HeadNorm& k, const HeadNorm& v, const Tensor& positions,
                                 const Tensor& inv_freq, float eps) {
  for (const HeadNorm* t : {&q, &k, &v})
    if (t->x.data) head_norm_rope(t->x, t->w, t->rope ? positions : Tensor{}, t->rope ? inv_freq : Tensor{}, eps);
}
void Backend::kv_write(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  unsupported(Op::kKvWrite);
}
void Backend::attention(const AttentionArgs&) { unsupported(Op::kAttention); }
void Backend::residual_norm_add(const Tensor&, const Tensor&, WeightRef, float) { unsupported(Op::kResidualNormAdd); }
void Backend::mlp(WeightRef, const Tensor&, const Tensor&, const Tensor&) { unsupported(Op::kMlp); }
void Backend::moe_router(int, const Tensor&, const Tensor&, const Tensor&, float) { unsupported(Op::kMoeRouter); }
size_t Backend::moe_workspace_bytes(int) const { return 0; }
void Backend::moe_experts(int, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  unsupported(Op::kMoeExperts);
}
void Backend::ffn_combine(int, bool, const Tensor&, const Tensor&, const Tensor&, float) {
  unsupported(Op::kFfnCombine);
}
void Backend::residual_norm_add_norms(const Tensor& x, const Tensor& h, WeightRef w, float eps, const NormOut& a,
                                      const NormOut& b) {
  residual_norm_add(x, h, w, eps);
  for (const NormOut* n : {&a, &b})
    if (n->out.data) rmsnorm(x, n->w, n->out, eps);
}
void Backend::ffn_combine_norm(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                               float eps, const NormOut& next) {
  ffn_combine(layer, encoder, x, dense, moe, eps);
  if (next.out.data) rmsnorm(x, next.w, next.out, eps);
}
void Backend::gather_rows(const Tensor&, const Tensor&, const Tensor&) { unsupported(Op::kGatherRows); }
void Backend::scatter_add_rows(const Tensor&, const Tensor&, const Tensor&) { unsupported(Op::kScatterAddRows); }
void Backend::lm_head_sample(const SampleArgs&) { unsupported(Op::kLmHeadSample); }
void Backend::lm_head_logits(const Tensor&, const Tensor&) { unsupported(Op::kLmHeadLogits); }
void Backend::soft_embedding(const Tensor&, const Tensor&) { unsupported(Op::kSoftEmbedding); }

}  // namespace dgemma
