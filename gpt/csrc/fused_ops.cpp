// The model's elementwise steps fused into one pass each, for CPU inference: RMSNorm,
// SiLU(gate) * up, and rotary embedding of queries and keys in place.
//
// Unfused, each is a chain of PyTorch ops (RMSNorm in bf16 is seven: to float, square,
// mean, add, rsqrt, multiply, to bf16 and multiply by the weight), and every op reads and
// writes the whole activation and, in bf16, converts it to float and back. A fused pass
// reads it once. The results round where the unfused ops rounded (every bf16 intermediate
// is rounded to bf16 here too), so they equal the reference up to float32 summation order
// and the exp polynomial (gpt/csrc/scalar_math.h).
//
// Rows are spread over PyTorch's intra-op thread pool (at::parallel_for); a few rows (a
// small decode step) stay on the calling thread.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "scalar_math.h"

#include <vector>

namespace {

using sol::from_float;
using sol::to_float;

// Rows per parallel chunk: about 16k elements, so a chunk is worth a thread's wake-up.
int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)); }

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": a CPU tensor is expected");
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, name, ": the last dimension must be contiguous");
}

template <typename T>
void rms_norm_rows(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int64_t rows,
                   int64_t width, float eps) {
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ xr = x + r * width;
      T* __restrict__ o = out + r * width;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < width; ++i) {
        const float v = to_float(xr[i]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        // (x * inv) is rounded to the activation dtype before the weight multiplies it.
        const float normed = to_float(from_float<T>(to_float(xr[i]) * inv));
        o[i] = from_float<T>(to_float(w[i]) * normed);
      }
    }
  });
}

template <typename T>
void silu_mul_rows(const T* __restrict__ in, T* __restrict__ out, int64_t rows, int64_t half) {
  at::parallel_for(0, rows, grain(2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ g = in + r * 2 * half;
      const T* __restrict__ u = g + half;
      T* __restrict__ o = out + r * half;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        // silu(gate) is rounded to the dtype before up multiplies it, as F.silu's output was.
        const float s = to_float(from_float<T>(sol::silu(to_float(g[i]))));
        o[i] = from_float<T>(s * to_float(u[i]));
      }
    }
  });
}

template <typename T>
void rope_rows(T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin, int64_t rows,
               int64_t stride, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, rows, grain(heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict__ c = cos + r * head_dim;
      const T* __restrict__ s = sin + r * head_dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* __restrict__ v = x + r * stride + h * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float lo = to_float(v[i]), hi = to_float(v[i + half]);
          // lo' = lo * cos - hi * sin; hi' = hi * cos + lo * sin (rotate_half negates the
          // upper half before its product); each product and the sum rounded to the dtype.
          const float lo_c = to_float(from_float<T>(lo * to_float(c[i])));
          const float hi_s = to_float(from_float<T>(-hi * to_float(s[i])));
          const float hi_c = to_float(from_float<T>(hi * to_float(c[i + half])));
          const float lo_s = to_float(from_float<T>(lo * to_float(s[i + half])));
          v[i] = from_float<T>(lo_c + hi_s);
          v[i + half] = from_float<T>(hi_c + lo_s);
        }
      }
    }
  });
}

// RMSNorm over the last dimension: weight * (x / sqrt(mean(x^2) + eps)), in float.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_rows(x_in, "rms_norm");
  const at::Tensor x = x_in.contiguous();
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width && weight.is_contiguous(),
              "rms_norm: the weight must be a contiguous vector of the last dimension's size");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and input dtypes differ");
  at::Tensor out = at::empty_like(x);
  const int64_t rows = width ? x.numel() / width : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows,
                            width, static_cast<float>(eps));
  });
  return out;
}

// silu(gate) * up for gate_up = [gate | up] on the last dimension (the fused projection's
// output), into a tensor half as wide.
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  check_rows(gate_up_in, "silu_mul");
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t width = gate_up.size(-1);
  TORCH_CHECK(width % 2 == 0, "silu_mul: the last dimension must be even (gate and up side by side)");
  const int64_t half = width / 2;
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = half;
  at::Tensor out = at::empty(shape, gate_up.options());
  const int64_t rows = width ? gate_up.numel() / width : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, half);
  });
  return out;
}

// Rotary embedding, half-split layout, in place on the first `heads` heads of each row of
// x (rows, >= heads * head_dim): x * cos + rotate_half(x) * sin, with cos and sin (rows,
// head_dim) per row's position.
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t head_dim) {
  check_rows(x, "rope_");
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= heads * head_dim && head_dim % 2 == 0,
              "rope_: x must be (rows, >= heads * head_dim) with an even head_dim");
  const int64_t rows = x.size(0);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == rows &&
                  cos.size(1) == head_dim && sin.sizes() == cos.sizes(),
              "rope_: cos and sin must be contiguous (rows, head_dim)");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope_: cos, sin and x dtypes differ");
  const int64_t stride = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), rows, stride, heads,
                        head_dim);
  });
}

}  // namespace

TORCH_LIBRARY(sol_fused, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, int heads, int head_dim) -> ()");
}

TORCH_LIBRARY_IMPL(sol_fused, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_", &rope_);
}
