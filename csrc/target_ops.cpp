// advent_fast_C::target_forward / target_backward: the fused target losses of
// docs/backend_contract.md for CPU tensors. This file checks shapes, allocates the outputs, runs
// the block kernels of target_kernels.cpp over fixed pixel chunks with at::parallel_for and
// combines their partial sums in chunk order (so results do not depend on the thread count).
// The Python layer (advent_fast/losses.py) adds validation, autograd and torch.compile support.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "target_kernels.h"

namespace advent_fast {
namespace {

using at::Tensor;

Dtype kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "advent_fast_C: ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

StridedView strided_view(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "advent_fast_C: ", name, " must be (N, C, S), got ", t.sizes());
  StridedView view;
  view.data = const_cast<void*>(t.data_ptr());
  view.dtype = kernel_dtype(t, name);
  view.stride_n = t.stride(0);
  view.stride_c = t.stride(1);
  view.stride_s = t.stride(2);
  return view;
}

// A small float32 tensor as contiguous memory (a no-op for what the forward saved).
Tensor contiguous_float(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The value of a one-element tensor (on CPU, reading it is not a device sync).
double read_scalar(const Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "advent_fast_C: ", name, " must have one element, got ", t.sizes());
  return static_cast<double>(contiguous_float(t).data_ptr<float>()[0]);
}

const Tensor* given(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// Chunks per at::parallel_for task: enough work (about 64K values) to pay for a thread.
int64_t chunk_grain(const Problem& shape) {
  return std::max<int64_t>(1, 65536 / (kChunkPixels * shape.num_classes));
}

// Order-preserving map between non-NaN floats and uint32 keys (a larger float, a larger key;
// -0 sorts just below +0, which compare equal: either selects the same pixels).
uint32_t order_key(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

float key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The rank-th largest (1-based) of the keys, exactly, by MSB-first radix selection: per digit
// (11, 11, 10 bits), histogram the candidates, find the digit of the rank-th largest, keep only
// the candidates with that digit. Three passes over shrinking data instead of nth_element's
// branchy partitions. Reorders `keys`.
float kth_largest(std::vector<uint32_t>& keys, int64_t rank) {
  constexpr int kShifts[] = {21, 10, 0};
  constexpr uint32_t kDigitMasks[] = {0x7FF, 0x7FF, 0x3FF};
  uint32_t* candidates = keys.data();
  int64_t count = static_cast<int64_t>(keys.size());
  for (int round = 0; round < 3; ++round) {
    const int shift = kShifts[round];
    const uint32_t mask = kDigitMasks[round];
    int64_t histogram[2048] = {};
    for (int64_t i = 0; i < count; ++i) ++histogram[(candidates[i] >> shift) & mask];
    uint32_t digit = mask;
    while (histogram[digit] < rank) {
      rank -= histogram[digit];
      --digit;
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      if (((candidates[i] >> shift) & mask) == digit) candidates[kept++] = candidates[i];
    }
    count = kept;
  }
  return key_to_float(candidates[0]);  // all remaining candidates hold the same key
}

// Entropy ranking of one image: t = k-th largest E (NaN counts as the largest), the kept pixels
// (E >= t or NaN: written to keep), their count and the sum of their E.
struct RankedImage {
  float threshold;
  int64_t kept;
  double kept_sum;
};

RankedImage rank_image(const float* entropy, int64_t num_pixels, int64_t k, uint8_t* keep,
                       std::vector<uint32_t>& keys) {
  // NaN has no place in an order: count the NaNs, select among the rest.
  keys.clear();
  int64_t nan_count = 0;
  for (int64_t s = 0; s < num_pixels; ++s) {
    if (std::isnan(entropy[s])) {
      ++nan_count;
    } else {
      keys.push_back(order_key(entropy[s]));
    }
  }
  const float threshold =
      k > nan_count ? kth_largest(keys, k - nan_count) : std::numeric_limits<float>::quiet_NaN();
  RankedImage ranked{threshold, 0, 0.0};
  for (int64_t s = 0; s < num_pixels; ++s) {
    keep[s] = entropy[s] >= threshold || std::isnan(entropy[s]);
    if (keep[s]) {
      ++ranked.kept;
      ranked.kept_sum += entropy[s];
    }
  }
  return ranked;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> target_forward_cpu(
    const Tensor& x, const std::optional<Tensor>& prior, int64_t k, double mu, bool want_info,
    bool want_emap, bool want_ent, bool want_cp) {
  const StridedView logits = strided_view(x, "x");
  const Problem shape{x.size(0), x.size(1), x.size(2)};
  const int64_t N = shape.num_images, C = shape.num_classes, S = shape.num_pixels;
  TORCH_CHECK(N >= 1 && C >= 2 && S >= 1, "advent_fast_C: x must have N >= 1, C >= 2, S >= 1, got ",
              x.sizes());
  const bool ranking = want_ent && k > 0;
  TORCH_CHECK(k >= 0 && k <= S, "advent_fast_C: k must be in [0, S], got ", k);
  const Tensor* prior_t = given(prior);
  if (want_cp) {
    TORCH_CHECK(prior_t != nullptr && prior_t->scalar_type() == at::kFloat &&
                    prior_t->is_contiguous() && prior_t->numel() == C,
                "advent_fast_C: want_cp needs a contiguous float32 prior of C = ", C, " values");
  }

  const auto float_options = x.options().dtype(at::kFloat);
  // Each output is its own tensor, even when unused: custom ops may not return aliases.
  const auto unused = [&] { return at::empty({0}, float_options); };
  Tensor info = want_info ? at::empty_like(x) : at::empty({0}, x.options());
  // Ranking needs the map for its selection only: the backward reads the keep mask.
  Tensor emap = (want_emap || ranking) ? at::empty({N, S}, float_options) : unused();

  ForwardArgs args;
  args.shape = shape;
  args.logits = logits;
  if (want_info) args.info = strided_view(info, "info");
  args.entropy_map = emap.numel() > 0 ? emap.data_ptr<float>() : nullptr;
  args.sum_entropy = want_ent && !ranking;
  args.sum_class_probs = want_cp;
  const int64_t width = forward_partials_width(shape);
  std::vector<double> partials(shape.num_chunks() * width, 0.0);
  at::parallel_for(0, shape.num_chunks(), chunk_grain(shape), [&](int64_t begin, int64_t end) {
    forward_chunks(args, begin, end, partials.data() + begin * width);
  });
  const auto chunk_sum = [&](int64_t n, int64_t column) {
    double sum = 0.0;
    for (int64_t i = 0; i < shape.chunks_per_image(); ++i) {
      sum += partials[(n * shape.chunks_per_image() + i) * width + column];
    }
    return sum;
  };

  Tensor ent = unused(), thresh = unused(), kept = unused();
  Tensor keep = at::empty({0}, x.options().dtype(at::kByte));
  if (want_ent && !ranking) {
    double sum = 0.0;
    for (int64_t n = 0; n < N; ++n) sum += chunk_sum(n, 0);
    ent = at::scalar_tensor(sum / static_cast<double>(N * S), float_options);
  } else if (ranking) {
    thresh = at::empty({N}, float_options);
    kept = at::empty({N}, float_options);
    keep = at::empty({N, S}, x.options().dtype(at::kByte));
    uint8_t* keep_ptr = keep.data_ptr<uint8_t>();
    std::vector<double> image_loss(N);
    const float* entropy = emap.data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> scratch;
      scratch.reserve(S);
      for (int64_t n = begin; n < end; ++n) {
        const RankedImage r = rank_image(entropy + n * S, S, k, keep_ptr + n * S, scratch);
        thresh.data_ptr<float>()[n] = r.threshold;
        kept.data_ptr<float>()[n] = static_cast<float>(r.kept);
        image_loss[n] = r.kept_sum / static_cast<double>(r.kept);
      }
    });
    double sum = 0.0;
    for (int64_t n = 0; n < N; ++n) sum += image_loss[n];
    ent = at::scalar_tensor(sum / static_cast<double>(N), float_options);
  }

  Tensor cp = unused(), cmean = unused();
  if (want_cp) {
    // m_nc = mean_s p_c; cp = mean_n sum_c hinge(mu * prior_c - m_nc), hinge(d) = d < 0 ? 0 : d
    // (not max(d, 0), which may drop a NaN). The backward decides d > 0 from the same fp32 m_nc.
    cmean = at::empty({N, C}, float_options);
    float* class_mean = cmean.data_ptr<float>();
    const float* prior_ptr = prior_t->data_ptr<float>();
    double sum = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        class_mean[n * C + c] = static_cast<float>(chunk_sum(n, 1 + c) / static_cast<double>(S));
        const double gap = mu * prior_ptr[c] - class_mean[n * C + c];
        sum += gap < 0.0 ? 0.0 : gap;
      }
    }
    cp = at::scalar_tensor(sum / static_cast<double>(N), float_options);
  }
  if (!want_emap) emap = unused();
  return {info, emap, ent, cp, thresh, kept, cmean, keep};
}

Tensor target_backward_cpu(const Tensor& x, const std::optional<Tensor>& grad_info,
                           const std::optional<Tensor>& grad_emap,
                           const std::optional<Tensor>& grad_ent,
                           const std::optional<Tensor>& grad_cp, const std::optional<Tensor>& keep,
                           const std::optional<Tensor>& kept,
                           const std::optional<Tensor>& cmean, const std::optional<Tensor>& prior,
                           double mu) {
  const Problem shape{x.size(0), x.size(1), x.size(2)};
  const int64_t N = shape.num_images, C = shape.num_classes, S = shape.num_pixels;
  Tensor grad_x = at::empty_like(x);

  BackwardArgs args;
  args.shape = shape;
  args.logits = strided_view(x, "x");
  args.grad_logits = strided_view(grad_x, "grad_x");

  if (const Tensor* g = given(grad_info)) {
    TORCH_CHECK(g->sizes() == x.sizes(), "advent_fast_C: grad_info must match x, got ", g->sizes());
    args.grad_info = strided_view(*g, "grad_info");
  }
  Tensor grad_emap_f;
  if (const Tensor* g = given(grad_emap)) {
    TORCH_CHECK(g->numel() == N * S, "advent_fast_C: grad_emap must be (N, S), got ", g->sizes());
    grad_emap_f = contiguous_float(*g);
    args.grad_entropy_map = grad_emap_f.data_ptr<float>();
  }

  // Entropy loss: dL/dE_ns = g / (N S) for the plain mean; with ranking g / (N K_n) on kept pixels.
  Tensor keep_u8;
  std::vector<float> kept_weight;
  if (const Tensor* g = given(grad_ent)) {
    const double grad = read_scalar(*g, "grad_ent");
    if (const Tensor* keep_t = given(keep)) {
      const Tensor* kept_t = given(kept);
      TORCH_CHECK(kept_t != nullptr && keep_t->numel() == N * S && keep_t->scalar_type() == at::kByte &&
                      kept_t->numel() == N,
                  "advent_fast_C: ranking needs the saved keep mask (N, S) uint8 and kept (N,)");
      keep_u8 = keep_t->contiguous();
      const Tensor kept_f = contiguous_float(*kept_t);
      kept_weight.resize(N);
      for (int64_t n = 0; n < N; ++n) {
        const double kept_count = kept_f.data_ptr<float>()[n];
        kept_weight[n] = static_cast<float>(grad / (static_cast<double>(N) * kept_count));
      }
      args.keep = keep_u8.data_ptr<uint8_t>();
      args.kept_pixel_weight = kept_weight.data();
    } else {
      args.uniform_pixel_weight = static_cast<float>(grad / static_cast<double>(N * S));
    }
  }

  // Class prior: dL/dp_c(n, s) = -h_nc, h_nc = g / (N S) where the hinge is active (d > 0).
  std::vector<float> class_prob_grad;
  if (const Tensor* g = given(grad_cp)) {
    const Tensor* m = given(cmean);
    const Tensor* p = given(prior);
    TORCH_CHECK(m != nullptr && p != nullptr && m->numel() == N * C && p->numel() == C,
                "advent_fast_C: grad_cp needs the saved cmean (N, C) and the prior (C,)");
    const double h = read_scalar(*g, "grad_cp") / static_cast<double>(N * S);
    const Tensor mean_f = contiguous_float(*m);
    const Tensor prior_f = contiguous_float(*p);
    const float* class_mean = mean_f.data_ptr<float>();
    const float* prior_ptr = prior_f.data_ptr<float>();
    class_prob_grad.resize(N * C);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const double gap = mu * prior_ptr[c] - class_mean[n * C + c];  // as in the forward
        class_prob_grad[n * C + c] = gap > 0.0 ? static_cast<float>(h) : 0.0f;
      }
    }
    args.class_prob_grad = class_prob_grad.data();
  }

  at::parallel_for(0, shape.num_chunks(), chunk_grain(shape), [&](int64_t begin, int64_t end) {
    backward_chunks(args, begin, end);
  });
  return grad_x;
}

}  // namespace
}  // namespace advent_fast

TORCH_LIBRARY(advent_fast_C, m) {
  m.def(
      "target_forward(Tensor x, Tensor? prior, int k, float mu, bool want_info, bool want_emap, "
      "bool want_ent, bool want_cp) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "target_backward(Tensor x, Tensor? grad_info, Tensor? grad_emap, Tensor? grad_ent, "
      "Tensor? grad_cp, Tensor? keep, Tensor? kept, Tensor? cmean, Tensor? prior, "
      "float mu) -> Tensor");
}

TORCH_LIBRARY_IMPL(advent_fast_C, CPU, m) {
  m.impl("target_forward", &advent_fast::target_forward_cpu);
  m.impl("target_backward", &advent_fast::target_backward_cpu);
}

extern "C" {
// `import advent_fast._C` loads this library, whose static initialisers above register the ops
// (the pytorch/extension-cpp pattern); the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
