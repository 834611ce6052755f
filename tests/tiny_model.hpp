// A small tanh MLP with a scalar head, forward and backward written out, for
// checking the zero3 engine against plain training: the same functions run
// on the engine's gathered params and on a reference's own arrays.
//
//   h[l+1] = tanh(W[l] h[l] + b[l])        W[l]: width x width, b[l]: width
//   y      = v . h[layers]                  v: width
//   loss   = mean over the batch of (y - t)^2 / 2
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace zinf::testing {

struct TinyModelShape {
  int layers = 3;
  int width = 24;
  int batch = 4;  // samples per micro-batch
};

// Deterministic samples: micro-batch `index` of the whole run.
inline void tiny_batch(const TinyModelShape& shape, std::uint64_t index, std::vector<float>& x,
                       std::vector<float>& t) {
  std::mt19937_64 rng(0x5eed0000ull + index);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  x.resize(static_cast<std::size_t>(shape.batch) * shape.width);
  t.resize(shape.batch);
  for (auto& value : x) value = normal(rng);
  for (int s = 0; s < shape.batch; ++s) {
    float sum = 0;
    for (int i = 0; i < shape.width; ++i) sum += x[s * shape.width + i];
    t[s] = std::sin(sum);
  }
}

// Initial values, the same on every rank: param kind 0 = W[l], 1 = b[l], 2 = v.
inline std::vector<float> tiny_initial(const TinyModelShape& shape, int kind, int layer) {
  std::mt19937_64 rng(0xabc0000ull + kind * 1000 + layer);
  std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(static_cast<float>(shape.width)));
  std::vector<float> values(kind == 0 ? shape.width * shape.width : shape.width);
  for (auto& value : values) value = normal(rng);
  return values;
}

// One layer forward for the batch: out = tanh(W in + b).
inline void tiny_layer_forward(const TinyModelShape& shape, const float* W, const float* b,
                               const std::vector<float>& in, std::vector<float>& out) {
  const int n = shape.width;
  out.assign(in.size(), 0.0f);
  for (int s = 0; s < shape.batch; ++s) {
    for (int i = 0; i < n; ++i) {
      float z = b[i];
      for (int j = 0; j < n; ++j) z += W[i * n + j] * in[s * n + j];
      out[s * n + i] = std::tanh(z);
    }
  }
}

// Backward of one layer: given dout (dL/dh[l+1]) and the layer's input and
// output, writes dW, db (assigned) and din (dL/dh[l]).
inline void tiny_layer_backward(const TinyModelShape& shape, const float* W, const std::vector<float>& in,
                                const std::vector<float>& out, const std::vector<float>& dout, float* dW,
                                float* db, std::vector<float>& din) {
  const int n = shape.width;
  std::vector<float> dz(dout.size());
  for (std::size_t k = 0; k < dout.size(); ++k) dz[k] = dout[k] * (1.0f - out[k] * out[k]);
  for (int i = 0; i < n; ++i) {
    db[i] = 0;
    for (int j = 0; j < n; ++j) dW[i * n + j] = 0;
  }
  din.assign(in.size(), 0.0f);
  for (int s = 0; s < shape.batch; ++s) {
    for (int i = 0; i < n; ++i) {
      const float d = dz[s * n + i];
      db[i] += d;
      for (int j = 0; j < n; ++j) {
        dW[i * n + j] += d * in[s * n + j];
        din[s * n + j] += W[i * n + j] * d;
      }
    }
  }
}

// Head forward and backward: the mean loss, dv (assigned) and dh.
inline float tiny_head(const TinyModelShape& shape, const float* v, const std::vector<float>& h,
                       const std::vector<float>& t, float* dv, std::vector<float>& dh) {
  const int n = shape.width;
  float loss = 0;
  dh.assign(h.size(), 0.0f);
  for (int i = 0; i < n; ++i) dv[i] = 0;
  for (int s = 0; s < shape.batch; ++s) {
    float y = 0;
    for (int i = 0; i < n; ++i) y += v[i] * h[s * n + i];
    const float r = y - t[s];
    loss += 0.5f * r * r / shape.batch;
    const float dy = r / shape.batch;
    for (int i = 0; i < n; ++i) {
      dv[i] += dy * h[s * n + i];
      dh[s * n + i] = dy * v[i];
    }
  }
  return loss;
}

}  // namespace zinf::testing
