// Fused minibatch step for biased MF with the MSE loss and row-wise SGD or lazy Adam.
//
// It computes exactly what the autograd path computes (recsys_torch.tasks.RatingTask.loss on an
// MFModel, then recsys_torch.optim.RowSGD / RowAdam): gradients of the whole batch are taken at the
// parameters before the step, summed per touched row, and only touched rows are updated. Only the
// summation order differs, so results agree to float32 rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kAhead = 6;  // ratings of look-ahead for the row prefetch

inline void prefetch_row(const float* row, int64_t d) {
  for (int64_t k = 0; k < d; k += 16) __builtin_prefetch(row + k, 1, 1);
}

struct Table {
  float* w;      // [n, d] parameters
  float* g;      // [n, d] gradient accumulator (kept zero outside a step)
  float* m;      // Adam first moment (nullptr for SGD)
  float* v;      // Adam second moment
  int64_t d;
};

inline void update_row(const Table& t, int64_t row, int adam, float lr, float b1, float b2,
                       float bc1, float bc2, float eps) {
  float* w = t.w + row * t.d;
  float* g = t.g + row * t.d;
  if (!adam) {
#pragma omp simd
    for (int64_t k = 0; k < t.d; ++k) { w[k] -= lr * g[k]; g[k] = 0.f; }
    return;
  }
  float* m = t.m + row * t.d;
  float* v = t.v + row * t.d;
#pragma omp simd
  for (int64_t k = 0; k < t.d; ++k) {
    m[k] = b1 * m[k] + (1.f - b1) * g[k];
    v[k] = b2 * v[k] + (1.f - b2) * g[k] * g[k];
    w[k] -= lr * (m[k] / (std::sqrt(v[k]) + eps)) * (std::sqrt(bc2) / bc1);
    g[k] = 0.f;
  }
}

}  // namespace

// Returns the batch loss (mean squared error + mean penalty), as in the autograd path.
double mf_step(torch::Tensor P, torch::Tensor Q, torch::Tensor bu, torch::Tensor bi,
               torch::Tensor gP, torch::Tensor gQ, torch::Tensor gbu, torch::Tensor gbi,
               std::vector<torch::Tensor> moments,  // empty (SGD) or [mP, vP, mQ, vQ, mbu, vbu, mbi, vbi]
               torch::Tensor user_scale, torch::Tensor item_scale,
               torch::Tensor users, torch::Tensor items, torch::Tensor ratings,
               torch::Tensor touched_users, torch::Tensor touched_items,  // uint8 [n] scratch, zero
               double mu, double reg, double reg_bias, double lr, int64_t step,
               double beta1, double beta2, double eps) {
  const int64_t B = users.size(0);
  const int64_t d = P.size(1);
  const int adam = moments.empty() ? 0 : 1;
  auto* u_ptr = users.data_ptr<int64_t>();
  auto* i_ptr = items.data_ptr<int64_t>();
  auto* r_ptr = ratings.data_ptr<float>();
  auto* su = user_scale.data_ptr<float>();
  auto* si = item_scale.data_ptr<float>();
  auto* tu = touched_users.data_ptr<uint8_t>();
  auto* ti = touched_items.data_ptr<uint8_t>();
  Table tP{P.data_ptr<float>(), gP.data_ptr<float>(), adam ? moments[0].data_ptr<float>() : nullptr,
           adam ? moments[1].data_ptr<float>() : nullptr, d};
  Table tQ{Q.data_ptr<float>(), gQ.data_ptr<float>(), adam ? moments[2].data_ptr<float>() : nullptr,
           adam ? moments[3].data_ptr<float>() : nullptr, d};
  Table tbu{bu.data_ptr<float>(), gbu.data_ptr<float>(), adam ? moments[4].data_ptr<float>() : nullptr,
            adam ? moments[5].data_ptr<float>() : nullptr, 1};
  Table tbi{bi.data_ptr<float>(), gbi.data_ptr<float>(), adam ? moments[6].data_ptr<float>() : nullptr,
            adam ? moments[7].data_ptr<float>() : nullptr, 1};
  const float inv_b = 1.f / static_cast<float>(B);
  const float regf = static_cast<float>(reg), regb = static_cast<float>(reg_bias);
  std::vector<int64_t> rows_u, rows_i;
  rows_u.reserve(B);
  rows_i.reserve(B);
  double loss = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t u = u_ptr[b], i = i_ptr[b];
    const float* p = tP.w + u * d;
    const float* q = tQ.w + i * d;
    float dot = 0.f, pp = 0.f, qq = 0.f;
#pragma omp simd reduction(+ : dot, pp, qq)
    for (int64_t k = 0; k < d; ++k) { dot += p[k] * q[k]; pp += p[k] * p[k]; qq += q[k] * q[k]; }
    const float bu_v = tbu.w[u], bi_v = tbi.w[i];
    const float err = static_cast<float>(mu) + bu_v + bi_v + dot - r_ptr[b];
    // float32 terms, as the autograd path computes them (an overflow must show as inf there too)
    const float term = err * err + su[u] * (regf * pp + regb * bu_v * bu_v) + si[i] * (regf * qq + regb * bi_v * bi_v);
    loss += term;
    const float g = 2.f * err * inv_b;
    const float cu = 2.f * su[u] * inv_b, ci = 2.f * si[i] * inv_b;
    float* gp = tP.g + u * d;
    float* gq = tQ.g + i * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      gp[k] += g * q[k] + cu * regf * p[k];
      gq[k] += g * p[k] + ci * regf * q[k];
    }
    tbu.g[u] += g + cu * regb * bu_v;
    tbi.g[i] += g + ci * regb * bi_v;
    if (!tu[u]) { tu[u] = 1; rows_u.push_back(u); }
    if (!ti[i]) { ti[i] = 1; rows_i.push_back(i); }
  }
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float bc1 = adam ? 1.f - static_cast<float>(std::pow(beta1, static_cast<double>(step))) : 1.f;
  const float bc2 = adam ? 1.f - static_cast<float>(std::pow(beta2, static_cast<double>(step))) : 1.f;
  const float lrf = static_cast<float>(lr), epsf = static_cast<float>(eps);
  // rows are distinct, so the updates are independent and can run in parallel
  at::parallel_for(0, static_cast<int64_t>(rows_u.size()), 256, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      update_row(tP, rows_u[k], adam, lrf, b1, b2, bc1, bc2, epsf);
      update_row(tbu, rows_u[k], adam, lrf, b1, b2, bc1, bc2, epsf);
      tu[rows_u[k]] = 0;
    }
  });
  at::parallel_for(0, static_cast<int64_t>(rows_i.size()), 256, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      update_row(tQ, rows_i[k], adam, lrf, b1, b2, bc1, bc2, epsf);
      update_row(tbi, rows_i[k], adam, lrf, b1, b2, bc1, bc2, epsf);
      ti[rows_i[k]] = 0;
    }
  });
  return loss / static_cast<double>(B);
}

// Per-rating SGD (batch size 1), in place: the classic Funk/Surprise/cornac loop. With one thread it
// equals the pure path with batch_size=1 and RowSGD; with more threads the chunk is split into
// contiguous parts updated concurrently without locks (Hogwild!, Niu et al. 2011), so results vary
// with scheduling. Returns the loss of each rating in ``losses``.
void mf_sgd_online(torch::Tensor P, torch::Tensor Q, torch::Tensor bu, torch::Tensor bi,
                   torch::Tensor user_scale, torch::Tensor item_scale,
                   torch::Tensor users, torch::Tensor items, torch::Tensor ratings, torch::Tensor losses,
                   double mu, double reg, double reg_bias, double lr, int64_t n_threads) {
  const int64_t n = users.size(0);
  const int64_t d = P.size(1);
  auto* u_ptr = users.data_ptr<int64_t>();
  auto* i_ptr = items.data_ptr<int64_t>();
  auto* r_ptr = ratings.data_ptr<float>();
  auto* l_ptr = losses.data_ptr<float>();
  auto* su = user_scale.data_ptr<float>();
  auto* si = item_scale.data_ptr<float>();
  float* Pw = P.data_ptr<float>();
  float* Qw = Q.data_ptr<float>();
  float* buw = bu.data_ptr<float>();
  float* biw = bi.data_ptr<float>();
  const float muf = static_cast<float>(mu), regf = static_cast<float>(reg);
  const float regb = static_cast<float>(reg_bias), lrf = static_cast<float>(lr);
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      if (b + kAhead < hi) {  // shuffled ratings hit random rows: fetch a later rating's rows early
        prefetch_row(Pw + u_ptr[b + kAhead] * d, d);
        prefetch_row(Qw + i_ptr[b + kAhead] * d, d);
      }
      const int64_t u = u_ptr[b], i = i_ptr[b];
      float* p = Pw + u * d;
      float* q = Qw + i * d;
      float dot = 0.f, pp = 0.f, qq = 0.f;
#pragma omp simd reduction(+ : dot, pp, qq)
      for (int64_t k = 0; k < d; ++k) { dot += p[k] * q[k]; pp += p[k] * p[k]; qq += q[k] * q[k]; }
      const float bu_v = buw[u], bi_v = biw[i];
      const float err = muf + bu_v + bi_v + dot - r_ptr[b];
      l_ptr[b] = err * err + su[u] * (regf * pp + regb * bu_v * bu_v) + si[i] * (regf * qq + regb * bi_v * bi_v);
      const float g = 2.f * err, cu = 2.f * su[u], ci = 2.f * si[i];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) {
        const float pk = p[k], qk = q[k];
        p[k] = pk - lrf * (g * qk + cu * regf * pk);
        q[k] = qk - lrf * (g * pk + ci * regf * qk);
      }
      buw[u] = bu_v - lrf * (g + cu * regb * bu_v);
      biw[i] = bi_v - lrf * (g + ci * regb * bi_v);
    }
  };
  if (n_threads <= 1) {
    run(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t part = (n + n_threads - 1) / n_threads;
  for (int64_t t = 0; t < n_threads; ++t) {
    const int64_t lo = t * part, hi = std::min(n, lo + part);
    if (lo < hi) pool.emplace_back(run, lo, hi);
  }
  for (auto& th : pool) th.join();
}

// ALS's conjugate-gradient product over a CSR pattern: out[r] = sum_j w_j <v[r], other[col_j]> other[col_j]
// for the cells j of row r. One pass per cell reads other[col_j] once for the dot product and the
// update (the sparse-tensor path reads it twice: a sampled product, then a CSR x dense product).
// Rows are independent and each is summed in cell order by one thread: the result does not depend on
// the thread count.
torch::Tensor gram_apply(torch::Tensor crow, torch::Tensor col, torch::Tensor weight, torch::Tensor v,
                         torch::Tensor other) {
  TORCH_CHECK(crow.dtype() == torch::kInt64 && col.dtype() == torch::kInt64, "gram_apply: int64 indices");
  TORCH_CHECK(v.dtype() == torch::kFloat32 && other.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32,
              "gram_apply: float32 values");
  TORCH_CHECK(v.size(1) == other.size(1) && crow.size(0) == v.size(0) + 1 && col.size(0) == weight.size(0),
              "gram_apply: shapes");
  auto out = torch::zeros_like(v);
  const int64_t n = v.size(0), d = v.size(1);
  const int64_t* cp = crow.data_ptr<int64_t>();
  const int64_t* cl = col.data_ptr<int64_t>();
  const float* wp = weight.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* op = other.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  // rows cut into chunks of about equal cell counts (popular items hold most cells), several per thread
  const int64_t n_chunks = n == 0 ? 0 : std::min<int64_t>(n, 8 * static_cast<int64_t>(at::get_num_threads()));
  std::vector<int64_t> bounds(n_chunks + 1, n);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t target = cp[0] + (cp[n] - cp[0]) * c / n_chunks;
    bounds[c] = std::lower_bound(cp, cp + n, target) - cp;
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t r = bounds[c0]; r < bounds[c1]; ++r) {
      const float* vr = vp + r * d;
      float* o = outp + r * d;
      const int64_t end = cp[r + 1];
      for (int64_t j = cp[r]; j < end; ++j) {
        if (j + kAhead < end) prefetch_row(op + cl[j + kAhead] * d, d);
        const float* q = op + cl[j] * d;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < d; ++k) s += vr[k] * q[k];
        s *= wp[j];
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) o[k] += s * q[k];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mf_step", &mf_step, "fused biased-MF minibatch step (MSE, row-wise SGD or lazy Adam)");
  m.def("mf_sgd_online", &mf_sgd_online, "per-rating SGD over a chunk (Hogwild with several threads)");
  m.def("gram_apply", &gram_apply, "ALS's CSR product: sum_j w_j <v[r], other[col_j]> other[col_j] per row");
}
