// Block kernels of the fused target losses. Math (per pixel, natural log, L = log C):
//   y_c = x_c - max_j x_j,  p_c = exp(y_c) / sum_j exp(y_j),  lp_c = y_c - log(sum_j exp(y_j))
//   I_c = -p_c lp_c / L (0 where p_c = 0),
//   E = sum_c I_c = (log sum_j exp(y_j) - sum_c p_c y_c) / L
// Backward, with w = dL/dE, g_c = dL/dI_c and h_c from the class prior (dL/dp_c = -h_c):
//   q_c = p_c dL/dp_c = -p_c ((g_c + w) (lp_c + 1) / L + h_c),  dL/dx_c = q_c - p_c sum_j q_j
//
// A block of kBlock pixels x C classes is converted to fp32 in a class-major scratch buffer
// (kBlock consecutive pixels per class), whatever the storage dtype and strides, so that every
// loop below runs over pixels with unit stride and the compiler vectorises it.
#include "target_kernels.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "fast_math.h"

// The extension is compiled for the baseline ISA (the wheel must run on any x86-64); the two
// entry points get AVX2+FMA and AVX-512 clones picked at load time (GCC function multiversioning).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define ADVENT_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ADVENT_ISA_CLONES
#endif

namespace advent_fast {
namespace {

constexpr int64_t kBlock = 64;  // pixels per block: a few C x 64 fp32 buffers stay in L1
static_assert(kChunkPixels % kBlock == 0, "chunks are whole blocks");

// Storage formats: raw element type and conversions to / from fp32.
struct Float32 {
  using Raw = float;
  ADVENT_INLINE static float load(float v) { return v; }
  ADVENT_INLINE static float store(float v) { return v; }
};
struct Float16 {
  using Raw = uint16_t;
  ADVENT_INLINE static float load(uint16_t v) { return half_bits_to_float(v); }
  ADVENT_INLINE static uint16_t store(float v) { return float_to_half_bits(v); }
};
struct BFloat16 {
  using Raw = uint16_t;
  ADVENT_INLINE static float load(uint16_t v) { return bf16_bits_to_float(v); }
  ADVENT_INLINE static uint16_t store(float v) { return float_to_bf16_bits(v); }
};

// Pixel-major fp32 (pixel j's classes at pixels + j * pixel_stride, unit class stride) to
// class-major dst, and back: scalar moves within L1.
ADVENT_INLINE void pixel_to_class_major(const float* pixels, int64_t pixel_stride,
                                        int64_t num_classes, int64_t count, float* dst) {
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t c = 0; c < num_classes; ++c) dst[c * kBlock + j] = pixels[j * pixel_stride + c];
  }
}

ADVENT_INLINE void class_to_pixel_major(const float* src, int64_t num_classes, int64_t count,
                                        float* pixels, int64_t pixel_stride) {
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t c = 0; c < num_classes; ++c) pixels[j * pixel_stride + c] = src[c * kBlock + j];
  }
}

// dst[c * kBlock + j] = src[c * stride_c + j * stride_s] for j < count, for three kinds of
// strides: pixels contiguous (NCHW), classes contiguous (channels_last: a transpose), other.
// 16-bit classes-contiguous data is first converted into `staging` (pixel-major, C floats per
// pixel) so that the conversion runs over contiguous data and vectorises.
template <typename Format>
ADVENT_INLINE void gather_block(const typename Format::Raw* src, int64_t stride_c, int64_t stride_s,
                                int64_t num_classes, int64_t count, float* staging, float* dst) {
  if (stride_s == 1) {
    for (int64_t c = 0; c < num_classes; ++c) {
      const auto* row = src + c * stride_c;
      float* out = dst + c * kBlock;
      for (int64_t j = 0; j < count; ++j) out[j] = Format::load(row[j]);
    }
  } else if (stride_c == 1) {
    if constexpr (std::is_same_v<Format, Float32>) {
      pixel_to_class_major(src, stride_s, num_classes, count, dst);
    } else {
      if (stride_s == num_classes) {  // the block is one contiguous run
        for (int64_t i = 0; i < count * num_classes; ++i) staging[i] = Format::load(src[i]);
      } else {
        for (int64_t j = 0; j < count; ++j) {
          for (int64_t c = 0; c < num_classes; ++c) {
            staging[j * num_classes + c] = Format::load(src[j * stride_s + c]);
          }
        }
      }
      pixel_to_class_major(staging, num_classes, num_classes, count, dst);
    }
  } else {
    for (int64_t c = 0; c < num_classes; ++c) {
      for (int64_t j = 0; j < count; ++j) {
        dst[c * kBlock + j] = Format::load(src[c * stride_c + j * stride_s]);
      }
    }
  }
}

// The inverse of gather_block: dst[c * stride_c + j * stride_s] = src[c * kBlock + j].
template <typename Format>
ADVENT_INLINE void scatter_block(const float* src, int64_t num_classes, int64_t count,
                                 float* staging, typename Format::Raw* dst, int64_t stride_c,
                                 int64_t stride_s) {
  if (stride_s == 1) {
    for (int64_t c = 0; c < num_classes; ++c) {
      auto* row = dst + c * stride_c;
      const float* in = src + c * kBlock;
      for (int64_t j = 0; j < count; ++j) row[j] = Format::store(in[j]);
    }
  } else if (stride_c == 1) {
    if constexpr (std::is_same_v<Format, Float32>) {
      class_to_pixel_major(src, num_classes, count, dst, stride_s);
    } else {
      class_to_pixel_major(src, num_classes, count, staging, num_classes);
      if (stride_s == num_classes) {
        for (int64_t i = 0; i < count * num_classes; ++i) dst[i] = Format::store(staging[i]);
      } else {
        for (int64_t j = 0; j < count; ++j) {
          for (int64_t c = 0; c < num_classes; ++c) {
            dst[j * stride_s + c] = Format::store(staging[j * num_classes + c]);
          }
        }
      }
    }
  } else {
    for (int64_t c = 0; c < num_classes; ++c) {
      for (int64_t j = 0; j < count; ++j) {
        dst[c * stride_c + j * stride_s] = Format::store(src[c * kBlock + j]);
      }
    }
  }
}

// Loads pixels [first, first + count) of image n into dst; lanes past count get logit 0 so that
// every lane of the block computes finite values (they are masked out of sums and never stored).
ADVENT_INLINE void load_block(const StridedView& view, int64_t n, int64_t first,
                              int64_t num_classes, int64_t count, float* staging, float* dst) {
  const int64_t offset = n * view.stride_n + first * view.stride_s;
  switch (view.dtype) {
    case Dtype::kFloat32:
      gather_block<Float32>(static_cast<const float*>(view.data) + offset, view.stride_c,
                            view.stride_s, num_classes, count, staging, dst);
      break;
    case Dtype::kFloat16:
      gather_block<Float16>(static_cast<const uint16_t*>(view.data) + offset, view.stride_c,
                            view.stride_s, num_classes, count, staging, dst);
      break;
    case Dtype::kBFloat16:
      gather_block<BFloat16>(static_cast<const uint16_t*>(view.data) + offset, view.stride_c,
                             view.stride_s, num_classes, count, staging, dst);
      break;
  }
  if (count < kBlock) {
    for (int64_t c = 0; c < num_classes; ++c) {
      std::fill(dst + c * kBlock + count, dst + (c + 1) * kBlock, 0.0f);
    }
  }
}

ADVENT_INLINE void store_block(const float* src, int64_t n, int64_t first, int64_t num_classes,
                               int64_t count, float* staging, const StridedView& view) {
  const int64_t offset = n * view.stride_n + first * view.stride_s;
  switch (view.dtype) {
    case Dtype::kFloat32:
      scatter_block<Float32>(src, num_classes, count, staging,
                             static_cast<float*>(view.data) + offset, view.stride_c, view.stride_s);
      break;
    case Dtype::kFloat16:
      scatter_block<Float16>(src, num_classes, count, staging,
                             static_cast<uint16_t*>(view.data) + offset, view.stride_c,
                             view.stride_s);
      break;
    case Dtype::kBFloat16:
      scatter_block<BFloat16>(src, num_classes, count, staging,
                              static_cast<uint16_t*>(view.data) + offset, view.stride_c,
                              view.stride_s);
      break;
  }
}

// Scratch for one block: class-major C x kBlock buffers and per-pixel lanes.
struct BlockBuffers {
  explicit BlockBuffers(int64_t num_classes)
      : shifted(num_classes * kBlock),
        exps(num_classes * kBlock),
        work(num_classes * kBlock),
        staging(num_classes * kBlock) {}
  std::vector<float> shifted;  // logits in, y_c = max(x_c - max_j x_j, kMinShiftedLogit) out
  std::vector<float> exps;     // exp(y_c)
  std::vector<float> work;     // I_c (forward); dL/dI_c -> q_c -> dL/dx_c (backward)
  std::vector<float> staging;  // 16-bit channels_last data converted to fp32, pixel-major
  float max_logit[kBlock];        // max_c x_c
  float log_sum[kBlock];          // log sum_c exp(y_c): log p_c = y_c - log_sum
  float inv_sum[kBlock];          // 1 / sum_c exp(y_c): p_c = exp(y_c) * inv_sum
  float sum_exp_shifted[kBlock];  // sum_c exp(y_c) y_c
  float pixel[kBlock];            // E (forward), dL/dE (backward)
  float q_sum[kBlock];            // sum_c q_c (backward)
};

// The softmax of a block, left unnormalised: buffers.shifted <- y, buffers.exps <- exp(y), and
// the per-pixel log_sum and inv_sum (and sum_exp_shifted when kWithEntropy).
template <bool kWithEntropy>
ADVENT_INLINE void softmax_block(int64_t num_classes, BlockBuffers& b) {
  for (int64_t j = 0; j < kBlock; ++j) b.max_logit[j] = b.shifted[j];
  for (int64_t c = 1; c < num_classes; ++c) {
    const float* row = b.shifted.data() + c * kBlock;
    // A NaN logit may be skipped here: it still makes its own exp, hence the sum, NaN.
    for (int64_t j = 0; j < kBlock; ++j) {
      b.max_logit[j] = row[j] > b.max_logit[j] ? row[j] : b.max_logit[j];
    }
  }
  float sum_exp[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) sum_exp[j] = 0.0f;
  for (int64_t j = 0; j < kBlock; ++j) b.sum_exp_shifted[j] = 0.0f;
  for (int64_t c = 0; c < num_classes; ++c) {
    float* row = b.shifted.data() + c * kBlock;
    float* erow = b.exps.data() + c * kBlock;
    // -inf - -inf (an all -inf pixel) and +inf - +inf give NaN, as a naive softmax does; the
    // clamp (which keeps NaN) makes a -inf logit's y finite and its exp 0. (A loop of its own:
    // fused with the exp, GCC turns the clamp into masked exp code, which is slower.)
    for (int64_t j = 0; j < kBlock; ++j) {
      const float diff = row[j] - b.max_logit[j];
      row[j] = diff < kMinShiftedLogit ? kMinShiftedLogit : diff;
    }
    for (int64_t j = 0; j < kBlock; ++j) {
      const float y = row[j];
      const float e = exp_nonpositive(y);
      erow[j] = e;
      sum_exp[j] += e;
      if constexpr (kWithEntropy) b.sum_exp_shifted[j] += e * y;
    }
  }
  // sum_exp >= 1 (the max term is exp(0)), so its log and reciprocal are safe.
  for (int64_t j = 0; j < kBlock; ++j) {
    b.log_sum[j] = log_positive(sum_exp[j]);
    b.inv_sum[j] = 1.0f / sum_exp[j];
  }
}

}  // namespace

ADVENT_ISA_CLONES
void forward_chunks(const ForwardArgs& args, int64_t chunk_begin, int64_t chunk_end,
                    double* partials) {
  const Problem& shape = args.shape;
  const int64_t num_classes = shape.num_classes;
  const int64_t width = forward_partials_width(shape);
  const float inv_log_c = static_cast<float>(1.0 / std::log(static_cast<double>(num_classes)));
  const bool want_info = args.info.data != nullptr;
  const bool want_entropy = args.sum_entropy || args.entropy_map != nullptr;
  BlockBuffers b(num_classes);
  // Per-lane running sums over the blocks of a chunk (at most 16 terms each: fp32 is enough),
  // reduced to a double per chunk.
  float entropy_lane_sum[kBlock];
  std::vector<float> class_lane_sum(args.sum_class_probs ? num_classes * kBlock : 0);

  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t n = chunk / shape.chunks_per_image();
    const int64_t chunk_first = (chunk % shape.chunks_per_image()) * kChunkPixels;
    const int64_t chunk_last = std::min(shape.num_pixels, chunk_first + kChunkPixels);
    std::fill(entropy_lane_sum, entropy_lane_sum + kBlock, 0.0f);
    std::fill(class_lane_sum.begin(), class_lane_sum.end(), 0.0f);

    for (int64_t first = chunk_first; first < chunk_last; first += kBlock) {
      const int64_t count = std::min(kBlock, chunk_last - first);
      load_block(args.logits, n, first, num_classes, count, b.staging.data(), b.shifted.data());
      if (want_entropy) {
        softmax_block<true>(num_classes, b);
        // E L = -sum_c p_c (y_c - log_sum) = log_sum - inv_sum sum_c exp(y_c) y_c (sum_c p_c = 1).
        // Both terms are >= 0, so E >= +0 without cancellation (and never -0).
        for (int64_t j = 0; j < kBlock; ++j) {
          b.pixel[j] = (b.log_sum[j] - b.inv_sum[j] * b.sum_exp_shifted[j]) * inv_log_c;
        }
      } else {
        softmax_block<false>(num_classes, b);
      }
      if (want_info || args.sum_class_probs) {
        // I_c = -p_c log p_c / L = exp(y_c) (-inv_sum / L) (y_c - log_sum); p_c = 0 gives
        // 0 * finite (see kMinShiftedLogit).
        float info_scale[kBlock];
        for (int64_t j = 0; j < kBlock; ++j) info_scale[j] = -b.inv_sum[j] * inv_log_c;
        for (int64_t c = 0; c < num_classes; ++c) {
          const float* yrow = b.shifted.data() + c * kBlock;
          const float* erow = b.exps.data() + c * kBlock;
          if (want_info) {
            float* irow = b.work.data() + c * kBlock;
            for (int64_t j = 0; j < kBlock; ++j) {
              irow[j] = erow[j] * info_scale[j] * (yrow[j] - b.log_sum[j]);
            }
          }
          if (args.sum_class_probs) {
            float* sums = class_lane_sum.data() + c * kBlock;
            for (int64_t j = 0; j < count; ++j) sums[j] += erow[j] * b.inv_sum[j];
          }
        }
      }
      if (want_info) {
        store_block(b.work.data(), n, first, num_classes, count, b.staging.data(), args.info);
      }
      if (args.entropy_map != nullptr) {
        std::copy(b.pixel, b.pixel + count, args.entropy_map + n * shape.num_pixels + first);
      }
      if (args.sum_entropy) {
        for (int64_t j = 0; j < count; ++j) entropy_lane_sum[j] += b.pixel[j];
      }
    }

    double* out = partials + (chunk - chunk_begin) * width;
    if (args.sum_entropy) {
      double sum = 0.0;
      for (int64_t j = 0; j < kBlock; ++j) sum += entropy_lane_sum[j];
      out[0] = sum;
    }
    if (args.sum_class_probs) {
      for (int64_t c = 0; c < num_classes; ++c) {
        double sum = 0.0;
        for (int64_t j = 0; j < kBlock; ++j) sum += class_lane_sum[c * kBlock + j];
        out[1 + c] = sum;
      }
    }
  }
}

ADVENT_ISA_CLONES
void backward_chunks(const BackwardArgs& args, int64_t chunk_begin, int64_t chunk_end) {
  const Problem& shape = args.shape;
  const int64_t num_classes = shape.num_classes;
  const float neg_inv_log_c = static_cast<float>(-1.0 / std::log(static_cast<double>(num_classes)));
  const bool has_grad_info = args.grad_info.data != nullptr;
  BlockBuffers b(num_classes);

  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t n = chunk / shape.chunks_per_image();
    const int64_t chunk_first = (chunk % shape.chunks_per_image()) * kChunkPixels;
    const int64_t chunk_last = std::min(shape.num_pixels, chunk_first + kChunkPixels);
    const float* class_grad =
        args.class_prob_grad != nullptr ? args.class_prob_grad + n * num_classes : nullptr;

    for (int64_t first = chunk_first; first < chunk_last; first += kBlock) {
      const int64_t count = std::min(kBlock, chunk_last - first);
      const int64_t pixel_offset = n * shape.num_pixels + first;
      load_block(args.logits, n, first, num_classes, count, b.staging.data(), b.shifted.data());
      softmax_block<false>(num_classes, b);
      if (has_grad_info) load_block(args.grad_info, n, first, num_classes, count, b.staging.data(),
                                    b.work.data());

      // w = dL/dE per pixel (padding lanes: 0).
      float* weight = b.pixel;
      std::fill(weight, weight + kBlock, 0.0f);
      std::fill(weight, weight + count, args.uniform_pixel_weight);
      if (args.grad_entropy_map != nullptr) {
        const float* g = args.grad_entropy_map + pixel_offset;
        for (int64_t j = 0; j < count; ++j) weight[j] += g[j];
      }
      if (args.keep != nullptr) {  // the forward's selection
        const uint8_t* keep = args.keep + pixel_offset;
        const float kept_weight = args.kept_pixel_weight[n];
        for (int64_t j = 0; j < count; ++j) weight[j] += keep[j] ? kept_weight : 0.0f;
      }

      // q_c = p_c a_c with a_c = -(g_c + w) (log p_c + 1) / L - h_c
      //     = exp(y_c) inv_sum ((g_c k + w k) (y_c + 1 - log_sum) - h_c),  k = -1 / L.
      // log p_c is finite even for a masked class (see kMinShiftedLogit), so p_c = 0 gives q_c = 0
      // and an exact zero gradient.
      float scaled_weight[kBlock];
      float one_minus_log_sum[kBlock];
      for (int64_t j = 0; j < kBlock; ++j) {
        scaled_weight[j] = weight[j] * neg_inv_log_c;
        one_minus_log_sum[j] = 1.0f - b.log_sum[j];
      }
      std::fill(b.q_sum, b.q_sum + kBlock, 0.0f);
      for (int64_t c = 0; c < num_classes; ++c) {
        const float* yrow = b.shifted.data() + c * kBlock;
        const float* erow = b.exps.data() + c * kBlock;
        float* grow = b.work.data() + c * kBlock;
        const float h = class_grad != nullptr ? class_grad[c] : 0.0f;
        for (int64_t j = 0; j < kBlock; ++j) {
          const float upstream =
              has_grad_info ? grow[j] * neg_inv_log_c + scaled_weight[j] : scaled_weight[j];
          const float q =
              erow[j] * b.inv_sum[j] * (upstream * (yrow[j] + one_minus_log_sum[j]) - h);
          grow[j] = q;
          b.q_sum[j] += q;
        }
      }
      // dL/dx_c = q_c - p_c sum_j q_j = q_c - exp(y_c) (inv_sum sum_j q_j)
      for (int64_t j = 0; j < kBlock; ++j) b.q_sum[j] *= b.inv_sum[j];
      for (int64_t c = 0; c < num_classes; ++c) {
        const float* erow = b.exps.data() + c * kBlock;
        float* grow = b.work.data() + c * kBlock;
        for (int64_t j = 0; j < kBlock; ++j) grow[j] -= erow[j] * b.q_sum[j];
      }
      store_block(b.work.data(), n, first, num_classes, count, b.staging.data(),
                  args.grad_logits);
    }
  }
}

}  // namespace advent_fast
