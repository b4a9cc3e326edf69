// The per-pixel work of the fused target losses (docs/backend_contract.md), free of ATen so that
// target_kernels.cpp can be compiled for several ISAs. target_ops.cpp allocates, splits the work
// over threads and combines the partial sums.
#pragma once

#include <cstdint>

namespace advent_fast {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

// An (N, C, S) tensor: base pointer and element strides. data == nullptr means "not given".
struct StridedView {
  void* data = nullptr;
  Dtype dtype = Dtype::kFloat32;
  int64_t stride_n = 0;
  int64_t stride_c = 0;
  int64_t stride_s = 0;
};

// The pixels of each image are cut into fixed chunks, the unit of work for a thread and of the
// partial sums: sums combined chunk by chunk in order do not depend on the number of threads.
constexpr int64_t kChunkPixels = 1024;

struct Problem {
  int64_t num_images = 0;
  int64_t num_classes = 0;
  int64_t num_pixels = 0;

  int64_t chunks_per_image() const { return (num_pixels + kChunkPixels - 1) / kChunkPixels; }
  int64_t num_chunks() const { return num_images * chunks_per_image(); }
};

struct ForwardArgs {
  Problem shape;
  StridedView logits;
  StridedView info;              // I (N, C, S) to write, or data == nullptr
  float* entropy_map = nullptr;  // E (N, S) contiguous to write, or nullptr
  bool sum_entropy = false;      // partials[0] = sum of E over the chunk
  bool sum_class_probs = false;  // partials[1 + c] = sum of p_c over the chunk
};

// Per chunk, 1 + C doubles of partial sums (entries not asked for are left untouched).
inline int64_t forward_partials_width(const Problem& shape) { return 1 + shape.num_classes; }

// Chunks [chunk_begin, chunk_end): writes info / entropy_map and the partial sums of chunk i at
// partials[(i - chunk_begin) * forward_partials_width(shape)].
void forward_chunks(const ForwardArgs& args, int64_t chunk_begin, int64_t chunk_end,
                    double* partials);

struct BackwardArgs {
  Problem shape;
  StridedView logits;
  StridedView grad_info;                    // dL/dI (N, C, S), or data == nullptr
  StridedView grad_logits;                  // dL/dx (N, C, S), written
  const float* grad_entropy_map = nullptr;  // dL/dE (N, S) contiguous, or nullptr
  float uniform_pixel_weight = 0.0f;        // dL/dE_ns of every pixel (the plain MinEnt mean)
  // Entropy ranking: pixel (n, s) gets kept_pixel_weight[n] where the forward's keep[n, s] is set.
  // Both (N, S) / (N,) contiguous, or both nullptr.
  const uint8_t* keep = nullptr;
  const float* kept_pixel_weight = nullptr;
  // h (N, C): dL/dp_c = -h_nc from the class prior, or nullptr.
  const float* class_prob_grad = nullptr;
};

// Chunks [chunk_begin, chunk_end): writes grad_logits.
void backward_chunks(const BackwardArgs& args, int64_t chunk_begin, int64_t chunk_end);

}  // namespace advent_fast
