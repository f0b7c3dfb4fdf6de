// expected_attention — Expected Attention (Devoto, Jeblick, Jégou, arXiv 2510.00636; kvpress
// ExpectedAttentionPress): query-agnostic. Model the queries of future tokens as a Gaussian
// per query head: mean mu and covariance Sigma of the pre-RoPE queries, moved to the future by
// the RoPE rotation averaged over the next n_future positions (R̄ mu, R̄ Sigma R̄ᵀ). A key k
// then gets the expected logit z = mu'.k/sqrt(d) + kᵀ Sigma' k / (2d) (the Gaussian moment
// generating function); softmax over the non-sink keys, mean over the GQA group, times ||v||.
// Sinks are always kept (kvpress pads them with the max score).
//
// Deviation, documented: kvpress computes the statistics from all prefill hidden states
// (minus the sinks) projected by W_q. The Runner does not expose hidden states or queries, so
// we recover the actual queries of the document's last kStatsRows tokens from their observed
// attention probabilities (RecoverQueries: log p is linear in q), un-rotate them to pre-RoPE
// and take their mean and full covariance. The statistics therefore describe the end of the
// document (closest to the queries that follow it) rather than its whole length.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/status.h"
#include "engine/compress/scorer.h"
#include "engine/cpu/attention.h"
#include "engine/cpu/ops.h"

namespace ctxcache {
namespace {

constexpr int64_t kStatsRows = 128;  // observed rows whose queries give the statistics
constexpr int64_t kFitKeys = 256;    // keys used to recover each query (>= head_dim + 1)

// Solves (G + ridge) x = b for one symmetric positive definite G [m, m] (Cholesky, in place).
bool Cholesky(std::vector<double>& a, int m) {
  for (int j = 0; j < m; ++j) {
    double d = a[j * m + j];
    for (int k = 0; k < j; ++k) d -= a[j * m + k] * a[j * m + k];
    if (d <= 0) return false;
    a[j * m + j] = std::sqrt(d);
    for (int i = j + 1; i < m; ++i) {
      double s = a[i * m + j];
      for (int k = 0; k < j; ++k) s -= a[i * m + k] * a[j * m + k];
      a[i * m + j] = s / a[j * m + j];
    }
  }
  return true;
}

void CholeskySolve(const std::vector<double>& l, int m, std::vector<double>& x) {
  for (int i = 0; i < m; ++i) {
    double s = x[i];
    for (int k = 0; k < i; ++k) s -= l[i * m + k] * x[k];
    x[i] = s / l[i * m + i];
  }
  for (int i = m - 1; i >= 0; --i) {
    double s = x[i];
    for (int k = i + 1; k < m; ++k) s -= l[k * m + i] * x[k];
    x[i] = s / l[i * m + i];
  }
}

// R̄ [d, d] (row-major): the RoPE rotation averaged over positions [from, from + count).
// ~27 µs per position: n_future in the thousands is long enough to need the stop check.
absl::StatusOr<std::vector<float>> MeanRotation(int32_t from, int count, const RopeParams& rope,
                                                const Runner& runner) {
  const int d = rope.head_dim;
  std::vector<double> acc(static_cast<size_t>(d) * d, 0.0);
  std::vector<float> eye(static_cast<size_t>(d) * d);
  std::vector<int32_t> pos(d);
  for (int t = 0; t < count; ++t) {
    if (t % 256 == 0) RETURN_IF_ERROR(runner.CheckStop());
    std::fill(eye.begin(), eye.end(), 0.f);
    for (int j = 0; j < d; ++j) eye[j * d + j] = 1.f;
    std::fill(pos.begin(), pos.end(), from + t);
    ApplyRope(eye.data(), pos.data(), d, 1, rope);  // row j becomes R(t) e_j = column j of R
    for (int j = 0; j < d; ++j) {
      for (int i = 0; i < d; ++i) acc[i * d + j] += eye[j * d + i];
    }
  }
  std::vector<float> r(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) r[i] = static_cast<float>(acc[i] / count);
  return r;
}

class ExpectedAttentionScorer : public Scorer {
 public:
  absl::StatusOr<HeadScores> Score(Runner& runner, absl::Span<const int32_t> doc,
                                   const CompressionSpec& spec, KvCache& cache) override {
    const ModelConfig& c = runner.model().config();
    const RopeParams rope = RopeParamsFor(c);
    const int d = c.head_dim, group = c.n_heads / c.n_kv_heads;
    const int64_t n = static_cast<int64_t>(doc.size());
    // Leave at least head_dim + 1 keys before the first observed row to fit queries on.
    const int64_t rows = std::clamp<int64_t>(n - (d + 1) - spec.n_sink, 1, kStatsRows);
    const int64_t first_row = n - rows;
    const int64_t fit_end = first_row;  // keys every observed row sees
    const int64_t fit_begin = std::max<int64_t>(0, fit_end - kFitKeys);
    ASSIGN_OR_RETURN(const std::vector<float> rbar,
                     MeanRotation(static_cast<int32_t>(n), spec.n_future, rope, runner));
    const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
    const int64_t skip = std::min<int64_t>(spec.n_sink, n);

    HeadScores scores;
    ForwardOptions options;
    options.observe_rows.resize(rows);
    std::iota(options.observe_rows.begin(), options.observe_rows.end(), 0);
    options.observer = [&](int layer, const float* probs, int n_rows, int64_t max_keys) {
      std::vector<float> q(static_cast<size_t>(group) * n_rows * d);
      std::vector<float> mu(d), sigma(static_cast<size_t>(d) * d), tmp(static_cast<size_t>(d) * d);
      std::vector<float> mu_r(d), sigma_r(static_cast<size_t>(d) * d);
      std::vector<float> kf, vf;  // the head's fp16 K/V as fp32, for BLAS
      for (int g = 0; g < c.n_kv_heads; ++g) {
        const KvHead& kh = cache.head(layer, g);
        const int64_t nk = kh.n();
        kf.resize(kh.k.size());
        vf.resize(kh.v.size());
        Fp16ToFp32Row(kh.k.data(), kf.data(), static_cast<int64_t>(kh.k.size()));
        Fp16ToFp32Row(kh.v.data(), vf.data(), static_cast<int64_t>(kh.v.size()));
        // 1. Queries of the group's heads, recovered and un-rotated to pre-RoPE.
        std::vector<const float*> row_ptrs;
        for (int hh = 0; hh < group; ++hh) {
          const int h = g * group + hh;
          for (int r = 0; r < n_rows; ++r) {
            row_ptrs.push_back(probs + (static_cast<int64_t>(h) * n_rows + r) * max_keys +
                               fit_begin);
          }
        }
        RecoverQueries(kf.data() + fit_begin * d, fit_end - fit_begin, d, row_ptrs, inv_sqrt_d,
                       q.data());
        for (int hh = 0; hh < group; ++hh) {
          for (int r = 0; r < n_rows; ++r) {
            ShiftRope(q.data() + (static_cast<int64_t>(hh) * n_rows + r) * d, 1, 1,
                      -static_cast<int32_t>(first_row + r), rope);
          }
        }
        std::vector<float> group_score(nk, 0.f);
        std::vector<float> z(nk), ks(static_cast<size_t>(nk) * d);
        for (int hh = 0; hh < group; ++hh) {
          const float* qh = q.data() + static_cast<int64_t>(hh) * n_rows * d;
          // 2. Mean and covariance (population, as kvpress) of this head's queries.
          std::fill(mu.begin(), mu.end(), 0.f);
          for (int r = 0; r < n_rows; ++r) {
            for (int i = 0; i < d; ++i) mu[i] += qh[r * d + i] / static_cast<float>(n_rows);
          }
          std::fill(sigma.begin(), sigma.end(), 0.f);
          for (int r = 0; r < n_rows; ++r) {
            for (int i = 0; i < d; ++i) {
              const float ci = qh[r * d + i] - mu[i];
              for (int j = 0; j < d; ++j) {
                sigma[i * d + j] += ci * (qh[r * d + j] - mu[j]) / static_cast<float>(n_rows);
              }
            }
          }
          // 3. Move them to the future: mu' = R̄ mu, Sigma' = R̄ Sigma R̄ᵀ.
          cblas_sgemv(CblasRowMajor, CblasNoTrans, d, d, 1.f, rbar.data(), d, mu.data(), 1, 0.f,
                      mu_r.data(), 1);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, d, d, 1.f, rbar.data(), d,
                      sigma.data(), d, 0.f, tmp.data(), d);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d, d, d, 1.f, tmp.data(), d,
                      rbar.data(), d, 0.f, sigma_r.data(), d);
          // 4. Expected logits of the non-sink keys, softmax, GQA mean.
          const int64_t m = nk - skip;
          if (m <= 0) continue;
          const float* kp = kf.data() + skip * d;
          cblas_sgemv(CblasRowMajor, CblasNoTrans, m, d, inv_sqrt_d, kp, d, mu_r.data(), 1, 0.f,
                      z.data(), 1);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, d, d, 1.f, kp, d,
                      sigma_r.data(), d, 0.f, ks.data(), d);
          for (int64_t j = 0; j < m; ++j) {
            float quad = 0.f;
            for (int i = 0; i < d; ++i) quad += ks[j * d + i] * kp[j * d + i];
            z[j] += quad / (2.0f * static_cast<float>(d));
          }
          Softmax(z.data(), m);
          for (int64_t j = 0; j < m; ++j) group_score[skip + j] += z[j] / static_cast<float>(group);
        }
        // 5. Times the value norm (use_vnorm, epsilon 0).
        std::vector<float>& out = scores[static_cast<size_t>(layer) * c.n_kv_heads + g];
        out.assign(nk, 0.f);
        for (int64_t j = 0; j < nk; ++j) {
          float v2 = 0.f;
          for (int i = 0; i < d; ++i) v2 += vf[j * d + i] * vf[j * d + i];
          out[j] = group_score[j] * std::sqrt(v2);
        }
      }
    };
    scores.resize(static_cast<size_t>(c.n_layers) * c.n_kv_heads);
    // The statistics come from the last rows' attention: drop their entries from the prefill
    // and run them again, observed. The recomputed entries equal the dropped ones only up to
    // rounding (the rows now form other GEMM blocks), so the originals are put back after:
    // the caller's prefill is left exactly as it was (Scorer's contract).
    std::vector<KvHead> tail;
    tail.reserve(static_cast<size_t>(c.n_layers) * c.n_kv_heads);
    for (int l = 0; l < c.n_layers; ++l) {
      for (int g = 0; g < c.n_kv_heads; ++g) {
        const KvHead& kh = cache.head(l, g);
        KvHead& t = tail.emplace_back();
        t.k.assign(kh.k.begin() + first_row * d, kh.k.end());
        t.v.assign(kh.v.begin() + first_row * d, kh.v.end());
        t.pos.assign(kh.pos.begin() + first_row, kh.pos.end());
      }
    }
    const int32_t next_position = cache.next_position;
    cache.Truncate(first_row);
    cache.next_position = static_cast<int32_t>(first_row);
    const absl::Status forward = runner.Forward(doc.subspan(first_row), cache, options, nullptr);
    cache.Truncate(first_row);
    for (int l = 0; l < c.n_layers; ++l) {
      for (int g = 0; g < c.n_kv_heads; ++g) {
        KvHead& kh = cache.head(l, g);
        const KvHead& t = tail[static_cast<size_t>(l) * c.n_kv_heads + g];
        kh.k.insert(kh.k.end(), t.k.begin(), t.k.end());
        kh.v.insert(kh.v.end(), t.v.begin(), t.v.end());
        kh.pos.insert(kh.pos.end(), t.pos.begin(), t.pos.end());
      }
    }
    cache.next_position = next_position;
    RETURN_IF_ERROR(forward);
    return scores;
  }
};

}  // namespace

void RecoverQueries(const float* keys, int64_t n_keys, int head_dim,
                    absl::Span<const float* const> rows, float scale, float* q_out) {
  const int m = head_dim + 1;  // q * scale, then the row constant
  // The keys are centred first: q.(k_j - k̄) differs from q.k_j by q.k̄, the same for every
  // key, which the row constant absorbs, so the solution for q is unchanged. Without it a
  // large shared offset (Qwen2.5's K biases reach |145-211|) dominates the Gram matrix's
  // trace, and the relative ridge below then outweighs its smallest eigenvalues and biases
  // q: attention re-predicted from the fit was off by 5e-2 instead of 1e-5.
  std::vector<double> mean(head_dim, 0.0);
  for (int64_t j = 0; j < n_keys; ++j) {
    for (int a = 0; a < head_dim; ++a) mean[a] += keys[j * head_dim + a];
  }
  for (double& v : mean) v /= static_cast<double>(std::max<int64_t>(n_keys, 1));
  std::vector<double> centred(static_cast<size_t>(n_keys) * head_dim);
  for (int64_t j = 0; j < n_keys; ++j) {
    for (int a = 0; a < head_dim; ++a) {
      centred[j * head_dim + a] = keys[j * head_dim + a] - mean[a];
    }
  }
  std::vector<double> gram(static_cast<size_t>(m) * m, 0.0);
  for (int64_t j = 0; j < n_keys; ++j) {
    const double* k = centred.data() + j * head_dim;
    for (int a = 0; a < m; ++a) {
      const double ka = a < head_dim ? k[a] : 1.0;
      for (int b = 0; b <= a; ++b) gram[a * m + b] += ka * (b < head_dim ? k[b] : 1.0);
    }
  }
  double trace = 0;
  for (int a = 0; a < m; ++a) {
    for (int b = 0; b < a; ++b) gram[b * m + a] = gram[a * m + b];
    trace += gram[a * m + a];
  }
  // A relative ridge: negligible where the keys have support, decisive where they have none.
  for (int a = 0; a < m; ++a) gram[a * m + a] += 1e-9 * trace / m + 1e-12;
  if (!Cholesky(gram, m)) {
    std::fill(q_out, q_out + rows.size() * head_dim, 0.f);
    return;
  }
  std::vector<double> x(m);
  for (size_t r = 0; r < rows.size(); ++r) {
    std::fill(x.begin(), x.end(), 0.0);
    for (int64_t j = 0; j < n_keys; ++j) {
      // Probabilities that underflowed to 0 would give -inf; clamp to the fp32 floor.
      const double y = std::log(std::max(rows[r][j], 1e-38f));
      const double* k = centred.data() + j * head_dim;
      for (int a = 0; a < head_dim; ++a) x[a] += k[a] * y;
      x[head_dim] += y;
    }
    CholeskySolve(gram, m, x);
    for (int a = 0; a < head_dim; ++a) q_out[r * head_dim + a] = static_cast<float>(x[a] / scale);
  }
}

std::unique_ptr<Scorer> MakeExpectedAttentionScorer() {
  return std::make_unique<ExpectedAttentionScorer>();
}

}  // namespace ctxcache
