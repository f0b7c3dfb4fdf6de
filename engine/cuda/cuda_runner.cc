// The CUDA forward pass (cuda_runner.h). Host code: it uploads, launches the kernels of
// kernels.cuh and cuBLAS on one stream, and syncs with the host twice a pass (observed
// attention aside): the new K/V and the logits come back at the end.
#include "engine/cuda/cuda_runner.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "common/status.h"
#include "engine/cpu/attention.h"
#include "engine/cpu/quant.h"
#include "engine/cuda/kernels.cuh"
#include "engine/model.h"

namespace ctxcache::cuda {
namespace {

absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  if (e == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": out of GPU memory (", cudaGetErrorString(e), ")"));
  }
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

absl::Status CublasStatus(cublasStatus_t e, absl::string_view what) {
  if (e == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  if (e == CUBLAS_STATUS_ALLOC_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": cuBLAS is out of GPU memory"));
  }
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(e)));
}

#define CUDA_RETURN_IF_ERROR(expr, what) RETURN_IF_ERROR(CudaStatus((expr), (what)))

double MiB(int64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

// A device allocation that frees itself; Reserve grows it (contents not kept).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  ~DeviceMemory() { Free(); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  DeviceMemory(DeviceMemory&& o) noexcept : p_(o.p_), bytes_(o.bytes_) {
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    if (this != &o) {
      Free();
      p_ = o.p_;
      bytes_ = o.bytes_;
      o.p_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }

  absl::Status Allocate(int64_t bytes, absl::string_view what) {
    Free();
    if (bytes <= 0) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(cudaMalloc(&p_, static_cast<size_t>(bytes)), what);
    bytes_ = bytes;
    return absl::OkStatus();
  }
  // At least `bytes`, growing by half again so a slowly growing pass does not reallocate
  // every time.
  absl::Status Reserve(int64_t bytes, absl::string_view what) {
    if (bytes <= bytes_) return absl::OkStatus();
    return Allocate(std::max(bytes, bytes_ + bytes_ / 2), what);
  }
  void Free() {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  int64_t bytes_ = 0;
};

template <typename T>
absl::Status Upload(DeviceMemory& dst, const T* src, int64_t n, absl::string_view what) {
  RETURN_IF_ERROR(dst.Allocate(n * static_cast<int64_t>(sizeof(T)), what));
  if (n == 0) return absl::OkStatus();
  return CudaStatus(cudaMemcpy(dst.as<void>(), src, n * sizeof(T), cudaMemcpyHostToDevice), what);
}

// A weight matrix as fp16 [n_out, n_in].
struct DeviceMatrix {
  DeviceMemory w;
  int64_t n_in = 0, n_out = 0;
};

struct DeviceLayer {
  DeviceMemory attn_norm, ffn_norm, bq, bk, bv;
  DeviceMatrix wq, wk, wv, wo, gate, up, down;
};

// A cache's entries on the device: per (layer, KV head) lh, fp16 K and V rows and positions,
// room for `cap` entries each, in one allocation: K [LH, cap, hd], V [LH, cap, hd], pos
// [LH, cap].
struct Mirror {
  uint64_t generation = 0;
  int64_t cap = 0;
  std::vector<int64_t> n;  // [LH] entries present
  DeviceMemory mem;
  uint64_t last_use = 0;

  __half* k(int64_t lh, int hd) const { return mem.as<__half>() + lh * cap * hd; }
  __half* v(int64_t lh, int hd) const {
    return mem.as<__half>() + (static_cast<int64_t>(n.size()) + lh) * cap * hd;
  }
  int32_t* pos(int64_t lh, int hd) const {
    return reinterpret_cast<int32_t*>(mem.as<__half>() +
                                      2 * static_cast<int64_t>(n.size()) * cap * hd) +
           lh * cap;
  }
  static int64_t BytesFor(int64_t lh_count, int64_t cap, int hd) {
    return lh_count * cap * (2 * hd * static_cast<int64_t>(sizeof(__half)) + 4);
  }
};

class CudaForward final : public DeviceForward {
 public:
  CudaForward(const Model& model, DeviceInfo info, const CudaForwardOptions& options)
      : model_(model), info_(std::move(info)), options_(options) {}
  ~CudaForward() override {
    cudaSetDevice(info_.index);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    mirrors_.clear();
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status Load();

  std::string name() const override {
    return absl::StrCat("cuda:", info_.index, " (", info_.name, ")");
  }
  bool Supports(const ForwardOptions& options) const override {
    // Recycled Attention's decode steps keep their policy's state on the host (the top-K
    // choice reads each full step's probabilities): they run on the CPU.
    return options.recycled == nullptr;
  }
  absl::Status Run(const float* x, int64_t n, absl::Span<const Sequence> seqs,
                   const StopFn& stop) override;
  int64_t DeviceBytes() const override {
    int64_t bytes = weight_bytes_;
    for (const auto& [uid, m] : mirrors_) bytes += m.mem.bytes();
    for (const DeviceMemory* d : ScratchBuffers()) bytes += d->bytes();
    return bytes;
  }

 private:
  absl::Status UploadMatrix(const WeightMatrix& w, DeviceMatrix& out, absl::string_view name);
  absl::Status UploadVector(const float* v, int64_t n, DeviceMemory& out, absl::string_view name);
  // y[m, w.n_out] = xh[m, w.n_in] * w^T.
  absl::Status Gemm(const DeviceMatrix& w, const __half* xh, int64_t m, float* y);
  // Brings seq's mirror up to date and makes room for `rows` more entries per head.
  absl::StatusOr<Mirror*> Sync(const KvCache& cache, int64_t rows,
                               const std::vector<uint64_t>& in_pass);
  // A head's entries [b, e) into the device rows k, v ([*, head_dim] fp16, entry i at row i).
  absl::Status UploadRows(const KvHead& h, int64_t b, int64_t e, __half* k, __half* v);
  // Frees least recently used mirrors outside the pass until `bytes` more fit the budget;
  // false when even that is not enough.
  bool MakeRoom(int64_t bytes, const std::vector<uint64_t>& in_pass);
  absl::Status RunLayers(const float* x, int64_t n, absl::Span<const Sequence> seqs,
                         const std::vector<Mirror*>& mirrors, const StopFn& stop);
  std::vector<const DeviceMemory*> ScratchBuffers() const {
    const Scratch& s = scratch_;
    return {&s.x,      &s.xn,       &s.q,     &s.k,         &s.v,      &s.attn,   &s.tmp, &s.gate,
            &s.up,     &s.xh,       &s.pos,   &s.row_seq,   &s.append, &s.heads,  &s.lse, &s.work,
            &s.kv_out, &s.obs_rows, &s.probs, &s.logits_in, &s.logits, &s.segment};
  }

  const Model& model_;
  const DeviceInfo info_;
  const CudaForwardOptions options_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  int64_t weight_bytes_ = 0;
  int64_t mirror_budget_ = 0;

  std::vector<DeviceLayer> layers_;
  DeviceMemory output_norm_;
  DeviceMatrix output_;

  std::unordered_map<uint64_t, Mirror> mirrors_;  // by KvCache::uid
  uint64_t tick_ = 0;

  struct Scratch {
    DeviceMemory x, xn, q, k, v, attn, tmp, gate, up, xh;  // activations
    DeviceMemory pos, row_seq, append, heads;              // the pass's rows and tables
    DeviceMemory lse, work;                                // attention
    DeviceMemory kv_out;                                   // [L, 2, n, dkv] new K/V for the host
    DeviceMemory obs_rows, probs;                          // observed attention
    DeviceMemory logits_in, logits;                        // output head rows
    DeviceMemory segment;  // a stored int8 / int4 segment's codes and scales on their way in
  } scratch_;
  // Host staging.
  std::vector<float> host_rows_;
  std::vector<uint16_t> host_half_;
  std::vector<float> host_kv_;
  std::vector<float> host_probs_;
};

absl::Status CudaForward::UploadMatrix(const WeightMatrix& w, DeviceMatrix& out,
                                       absl::string_view name) {
  out.n_in = w.n_in;
  out.n_out = w.n_out;
  RETURN_IF_ERROR(out.w.Allocate(w.n_in * w.n_out * 2, absl::StrCat("allocating ", name)));
  weight_bytes_ += out.w.bytes();
  // Dequantized on the host in slabs of rows (bounded host memory), uploaded as fp16.
  const int64_t slab = std::max<int64_t>(1, (int64_t{8} << 20) / std::max<int64_t>(1, w.n_in));
  for (int64_t r0 = 0; r0 < w.n_out; r0 += slab) {
    const int64_t rows = std::min(slab, w.n_out - r0);
    host_rows_.resize(rows * w.n_in);
    host_half_.resize(rows * w.n_in);
    for (int64_t r = 0; r < rows; ++r) {
      RETURN_IF_ERROR(DequantizeRow(w.type, w.data + (r0 + r) * w.row_bytes,
                                    host_rows_.data() + r * w.n_in, w.n_in));
    }
    Fp32ToFp16Row(host_rows_.data(), host_half_.data(), rows * w.n_in);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(out.w.as<__half>() + r0 * w.n_in, host_half_.data(),
                                    rows * w.n_in * 2, cudaMemcpyHostToDevice),
                         absl::StrCat("uploading ", name));
  }
  return absl::OkStatus();
}

absl::Status CudaForward::UploadVector(const float* v, int64_t n, DeviceMemory& out,
                                       absl::string_view name) {
  RETURN_IF_ERROR(Upload(out, v, n, absl::StrCat("uploading ", name)));
  weight_bytes_ += out.bytes();
  return absl::OkStatus();
}

absl::Status CudaForward::Load() {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(info_.index), absl::StrCat("selecting cuda:", info_.index));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                       "creating a CUDA stream");
  RETURN_IF_ERROR(CublasStatus(cublasCreate(&cublas_), "creating a cuBLAS handle"));
  RETURN_IF_ERROR(CublasStatus(cublasSetStream(cublas_, stream_), "cublasSetStream"));

  const ModelConfig& c = model_.config();
  // fp16 weights: 2 bytes a parameter; refuse before allocating when they cannot fit.
  int64_t need = model_.output().n_in * model_.output().n_out * 2;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = model_.layer(l);
    for (const WeightMatrix* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down})
      need += w->n_in * w->n_out * 2;
  }
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  if (need > static_cast<int64_t>(free_bytes)) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cuda:%d (%s): the model's weights need %.0f MiB as fp16 and only %.0f MiB of %.0f MiB "
        "are free",
        info_.index, info_.name, MiB(need), MiB(free_bytes), MiB(total_bytes)));
  }
  layers_.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = model_.layer(l);
    DeviceLayer& D = layers_[l];
    const std::string p = absl::StrCat("blk.", l, ".");
    RETURN_IF_ERROR(UploadVector(L.attn_norm, c.d_model, D.attn_norm, p + "attn_norm"));
    RETURN_IF_ERROR(UploadVector(L.ffn_norm, c.d_model, D.ffn_norm, p + "ffn_norm"));
    RETURN_IF_ERROR(UploadVector(L.bq.data(), static_cast<int64_t>(L.bq.size()), D.bq, p + "bq"));
    RETURN_IF_ERROR(UploadVector(L.bk.data(), static_cast<int64_t>(L.bk.size()), D.bk, p + "bk"));
    RETURN_IF_ERROR(UploadVector(L.bv.data(), static_cast<int64_t>(L.bv.size()), D.bv, p + "bv"));
    RETURN_IF_ERROR(UploadMatrix(L.wq, D.wq, p + "attn_q"));
    RETURN_IF_ERROR(UploadMatrix(L.wk, D.wk, p + "attn_k"));
    RETURN_IF_ERROR(UploadMatrix(L.wv, D.wv, p + "attn_v"));
    RETURN_IF_ERROR(UploadMatrix(L.wo, D.wo, p + "attn_output"));
    RETURN_IF_ERROR(UploadMatrix(L.w_gate, D.gate, p + "ffn_gate"));
    RETURN_IF_ERROR(UploadMatrix(L.w_up, D.up, p + "ffn_up"));
    RETURN_IF_ERROR(UploadMatrix(L.w_down, D.down, p + "ffn_down"));
  }
  RETURN_IF_ERROR(UploadVector(model_.output_norm(), c.d_model, output_norm_, "output_norm"));
  RETURN_IF_ERROR(UploadMatrix(model_.output(), output_, "output"));
  std::vector<float>().swap(host_rows_);
  std::vector<uint16_t>().swap(host_half_);
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  mirror_budget_ =
      static_cast<int64_t>(options_.mirror_memory_fraction * static_cast<double>(free_bytes));
  return absl::OkStatus();
}

absl::Status CudaForward::Gemm(const DeviceMatrix& w, const __half* xh, int64_t m, float* y) {
  // Row-major y[m, n_out] = x[m, n_in] w[n_out, n_in]^T is column-major
  // y^T[n_out, m] = w^T... : cuBLAS sees w as column-major [n_in, n_out], so op T.
  const float alpha = 1.f, beta = 0.f;
  return CublasStatus(
      cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.n_out),
                   static_cast<int>(m), static_cast<int>(w.n_in), &alpha, w.w.as<__half>(),
                   CUDA_R_16F, static_cast<int>(w.n_in), xh, CUDA_R_16F, static_cast<int>(w.n_in),
                   &beta, y, CUDA_R_32F, static_cast<int>(w.n_out), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

bool CudaForward::MakeRoom(int64_t bytes, const std::vector<uint64_t>& in_pass) {
  auto used = [&] {
    int64_t b = 0;
    for (const auto& [uid, m] : mirrors_) b += m.mem.bytes();
    return b;
  };
  while (used() + bytes > mirror_budget_) {
    auto victim = mirrors_.end();
    for (auto it = mirrors_.begin(); it != mirrors_.end(); ++it) {
      if (std::find(in_pass.begin(), in_pass.end(), it->first) != in_pass.end()) continue;
      if (victim == mirrors_.end() || it->second.last_use < victim->second.last_use) victim = it;
    }
    if (victim == mirrors_.end()) return false;
    mirrors_.erase(victim);
  }
  return true;
}

absl::StatusOr<Mirror*> CudaForward::Sync(const KvCache& cache, int64_t rows,
                                          const std::vector<uint64_t>& in_pass) {
  const ModelConfig& c = model_.config();
  const int hd = c.head_dim;
  const int64_t lh_count = int64_t{c.n_layers} * c.n_kv_heads;
  Mirror& m = mirrors_[cache.uid()];
  m.last_use = ++tick_;
  bool stale = m.n.empty() || m.generation != cache.generation();
  int64_t need = 0;
  for (int64_t lh = 0; lh < lh_count; ++lh) {
    const KvHead& h =
        cache.head(static_cast<int>(lh / c.n_kv_heads), static_cast<int>(lh % c.n_kv_heads));
    if (!m.n.empty() && h.n() < m.n[lh]) stale = true;  // removed without a rewrite count
    need = std::max(need, h.n() + rows);
  }
  if (stale) {
    m.n.assign(lh_count, 0);
    m.generation = cache.generation();
  }
  if (need > m.cap) {
    // Grow: a new allocation with room to spare, the present entries copied over.
    const int64_t cap = std::max(need + 256, m.cap + m.cap / 2);
    const int64_t bytes = Mirror::BytesFor(lh_count, cap, hd);
    if (!MakeRoom(bytes - m.mem.bytes(), in_pass)) {
      mirrors_.erase(cache.uid());
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s: a context of %d entries per head does not fit the GPU memory left for contexts "
          "(%.0f MiB)",
          name(), need, MiB(mirror_budget_)));
    }
    Mirror grown;
    grown.generation = m.generation;
    grown.cap = cap;
    grown.n = m.n;
    grown.last_use = m.last_use;
    absl::Status st = grown.mem.Allocate(bytes, "allocating a context on the GPU");
    if (!st.ok()) {
      mirrors_.erase(cache.uid());
      return st;
    }
    for (int64_t lh = 0; lh < lh_count && m.cap > 0; ++lh) {
      const int64_t e = m.n[lh];
      if (e == 0) continue;
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(grown.k(lh, hd), m.k(lh, hd), e * hd * 2,
                                           cudaMemcpyDeviceToDevice, stream_),
                           "growing a mirror");
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(grown.v(lh, hd), m.v(lh, hd), e * hd * 2,
                                           cudaMemcpyDeviceToDevice, stream_),
                           "growing a mirror");
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(grown.pos(lh, hd), m.pos(lh, hd), e * 4,
                                           cudaMemcpyDeviceToDevice, stream_),
                           "growing a mirror");
    }
    // The old allocation is freed below (m's move assignment); its copies are queued on the
    // stream before, and cudaFree waits for the device.
    m = std::move(grown);
  }
  // Entries the host has and the mirror not: a stored context on first use, or what a CPU
  // pass appended. They travel in the form the host keeps them: fp16 rows as they are, int8 /
  // int4 segments as codes, scales and minima (a quarter to a half of the fp16 bytes), expanded
  // to fp16 on the device (DequantizeSegment, bitwise the CPU's dequantization).
  for (int64_t lh = 0; lh < lh_count; ++lh) {
    const KvHead& h =
        cache.head(static_cast<int>(lh / c.n_kv_heads), static_cast<int>(lh % c.n_kv_heads));
    const int64_t b = m.n[lh], e = h.n();
    if (e <= b) continue;
    RETURN_IF_ERROR(UploadRows(h, b, e, m.k(lh, hd), m.v(lh, hd)));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.pos(lh, hd) + b, h.pos.data() + b, (e - b) * 4,
                                         cudaMemcpyHostToDevice, stream_),
                         "uploading a context");
    m.n[lh] = e;
  }
  return &m;
}

absl::Status CudaForward::UploadRows(const KvHead& h, int64_t b, int64_t e, __half* k, __half* v) {
  const int hd = model_.config().head_dim;
  const char* what = "uploading a context";
  // Host-to-device copies from pageable memory on stream_: ordered with the kernels on it, and
  // the host buffer is free again when the call returns (the driver stages it).
  auto copy = [&](void* dst, const void* src, int64_t bytes) {
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), what);
  };
  int64_t s0 = 0;  // the segment's first entry
  for (const std::shared_ptr<const KvSegment>& seg_ptr : h.segments) {
    const KvSegment& seg = *seg_ptr;
    const int64_t x0 = std::max(b, s0), x1 = std::min(e, s0 + seg.n);
    if (x0 < x1 && seg.dtype == KvDtype::kF16) {
      RETURN_IF_ERROR(copy(k + x0 * hd, seg.k16.data() + (x0 - s0) * hd, (x1 - x0) * hd * 2));
      RETURN_IF_ERROR(copy(v + x0 * hd, seg.v16.data() + (x0 - s0) * hd, (x1 - x0) * hd * 2));
    } else if (x0 < x1) {
      // The whole segment's codes and scales (key groups count from its first row), then the
      // rows wanted expanded in place. The staging is reused only after the kernel ran (the
      // copies of the next segment follow it on the stream).
      const size_t parts[] = {seg.kq.size(),        seg.vq.size(),          seg.k_scale.size() * 2,
                              seg.k_min.size() * 2, seg.v_scale.size() * 2, seg.v_min.size() * 2};
      int64_t total = 0;
      for (size_t p : parts) total += static_cast<int64_t>((p + 255) / 256 * 256);
      RETURN_IF_ERROR(scratch_.segment.Reserve(total, "allocating GPU scratch"));
      uint8_t* at = scratch_.segment.as<uint8_t>();
      const void* srcs[] = {seg.kq.data(),    seg.vq.data(),      seg.k_scale.data(),
                            seg.k_min.data(), seg.v_scale.data(), seg.v_min.data()};
      uint8_t* dsts[6];
      for (int i = 0; i < 6; ++i) {
        dsts[i] = at;
        if (parts[i] > 0) RETURN_IF_ERROR(copy(at, srcs[i], static_cast<int64_t>(parts[i])));
        at += (parts[i] + 255) / 256 * 256;
      }
      QuantSegmentView view;
      view.dtype = static_cast<int>(seg.dtype);
      view.n = seg.n;
      view.head_dim = seg.head_dim;
      view.kq = dsts[0];
      view.vq = dsts[1];
      view.k_scale = reinterpret_cast<const __half*>(dsts[2]);
      view.k_min = reinterpret_cast<const __half*>(dsts[3]);
      view.v_scale = reinterpret_cast<const __half*>(dsts[4]);
      view.v_min = reinterpret_cast<const __half*>(dsts[5]);
      CUDA_RETURN_IF_ERROR(
          DequantizeSegment(view, x0 - s0, x1 - s0, k + x0 * hd, v + x0 * hd, stream_), what);
    }
    s0 += seg.n;
  }
  // The fp16 rows after the segments (what forward passes appended).
  const int64_t x0 = std::max(b, s0);
  if (x0 < e) {
    RETURN_IF_ERROR(copy(k + x0 * hd, h.k.data() + (x0 - s0) * hd, (e - x0) * hd * 2));
    RETURN_IF_ERROR(copy(v + x0 * hd, h.v.data() + (x0 - s0) * hd, (e - x0) * hd * 2));
  }
  return absl::OkStatus();
}

absl::Status CudaForward::Run(const float* x, int64_t n, absl::Span<const Sequence> seqs,
                              const StopFn& stop) {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(info_.index), name());
  int n_observing = 0;
  for (const Sequence& q : seqs) {
    if (q.options != nullptr && !q.options->observe_rows.empty()) ++n_observing;
  }
  if (n_observing > 0 && seqs.size() > 1) {
    return absl::InvalidArgumentError("observed attention needs a pass of one sequence");
  }
  std::vector<uint64_t> in_pass;
  for (const Sequence& q : seqs) in_pass.push_back(q.cache->uid());
  std::vector<Mirror*> mirrors;
  absl::Status st;
  for (const Sequence& q : seqs) {
    absl::StatusOr<Mirror*> m = Sync(*q.cache, q.n, in_pass);
    if (!m.ok()) {
      st = m.status();
      break;
    }
    mirrors.push_back(*m);
  }
  if (st.ok()) st = RunLayers(x, n, seqs, mirrors, stop);
  if (!st.ok()) {
    // The pass stopped part way: the mirrors may hold rows the host caches do not.
    cudaStreamSynchronize(stream_);
    for (uint64_t uid : in_pass) mirrors_.erase(uid);
  }
  return st;
}

absl::Status CudaForward::RunLayers(const float* x, int64_t n, absl::Span<const Sequence> seqs,
                                    const std::vector<Mirror*>& mirrors, const StopFn& stop) {
  const ModelConfig& c = model_.config();
  Scratch& s = scratch_;
  const int hd = c.head_dim;
  const int G = c.n_kv_heads;
  const int64_t d = c.d_model, dq = int64_t{c.n_heads} * hd, dkv = int64_t{G} * hd;
  const int64_t n_seqs = static_cast<int64_t>(seqs.size());
  const int64_t widest = std::max({d, dq, int64_t{c.d_ff}});
  const char* what = "allocating GPU scratch";
  RETURN_IF_ERROR(s.x.Reserve(n * d * 4, what));
  RETURN_IF_ERROR(s.xn.Reserve(n * d * 4, what));
  RETURN_IF_ERROR(s.q.Reserve(n * dq * 4, what));
  RETURN_IF_ERROR(s.k.Reserve(n * dkv * 4, what));
  RETURN_IF_ERROR(s.v.Reserve(n * dkv * 4, what));
  RETURN_IF_ERROR(s.attn.Reserve(n * dq * 4, what));
  RETURN_IF_ERROR(s.tmp.Reserve(n * d * 4, what));
  RETURN_IF_ERROR(s.gate.Reserve(n * c.d_ff * 4, what));
  RETURN_IF_ERROR(s.up.Reserve(n * c.d_ff * 4, what));
  RETURN_IF_ERROR(s.xh.Reserve(n * widest * 2, what));
  RETURN_IF_ERROR(s.pos.Reserve(n * 4, what));
  RETURN_IF_ERROR(s.row_seq.Reserve(n * 4, what));
  RETURN_IF_ERROR(s.lse.Reserve(n * c.n_heads * 4, what));
  RETURN_IF_ERROR(s.kv_out.Reserve(int64_t{c.n_layers} * 2 * n * dkv * 4, what));
  const int64_t table = n_seqs * G;
  RETURN_IF_ERROR(
      s.append.Reserve(int64_t{c.n_layers} * table * int64_t{sizeof(KvAppendEntry)}, what));
  RETURN_IF_ERROR(s.heads.Reserve(int64_t{c.n_layers} * table * int64_t{sizeof(KvHeadView)}, what));

  // The rows' positions and sequences, each layer's append and attention tables.
  std::vector<int32_t> pos(n), row_seq(n);
  int64_t max_rows = 0, max_keys = 0;
  for (int64_t i = 0; i < n_seqs; ++i) {
    const Sequence& q = seqs[i];
    max_rows = std::max(max_rows, q.n);
    for (int64_t r = 0; r < q.n; ++r) {
      pos[q.row0 + r] = q.cache->next_position + static_cast<int32_t>(r);
      row_seq[q.row0 + r] = static_cast<int32_t>(i);
    }
  }
  std::vector<KvAppendEntry> appends(c.n_layers * table);
  std::vector<KvHeadView> views(c.n_layers * table);
  std::vector<int64_t> layer_keys(c.n_layers, 0);  // the most entries a head of the layer has
  for (int l = 0; l < c.n_layers; ++l) {
    for (int64_t i = 0; i < n_seqs; ++i) {
      for (int g = 0; g < G; ++g) {
        const Mirror& m = *mirrors[i];
        const int64_t lh = int64_t{l} * G + g;
        KvHeadView h{m.k(lh, hd), m.v(lh, hd), m.pos(lh, hd), m.n[lh]};
        appends[l * table + i * G + g] = KvAppendEntry{h, seqs[i].row0, seqs[i].n};
        h.n += seqs[i].n;
        views[l * table + i * G + g] = h;
        layer_keys[l] = std::max(layer_keys[l], h.n);
        max_keys = std::max(max_keys, h.n);
      }
    }
  }
  RETURN_IF_ERROR(s.work.Reserve(AttentionWorkspaceFloats(n, c.n_heads, hd, max_keys) * 4, what));
  const char* up = "uploading a pass";
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(s.x.as<float>(), x, n * d * 4, cudaMemcpyHostToDevice, stream_), up);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(s.pos.as<int32_t>(), pos.data(), n * 4, cudaMemcpyHostToDevice, stream_), up);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s.row_seq.as<int32_t>(), row_seq.data(), n * 4,
                                       cudaMemcpyHostToDevice, stream_),
                       up);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(s.append.as<KvAppendEntry>(), appends.data(),
                      appends.size() * sizeof(KvAppendEntry), cudaMemcpyHostToDevice, stream_),
      up);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(s.heads.as<KvHeadView>(), views.data(), views.size() * sizeof(KvHeadView),
                      cudaMemcpyHostToDevice, stream_),
      up);
  // The host vectors above must live until the copies ran: pageable copies are staged by the
  // driver before cudaMemcpyAsync returns, so they may go out of scope after.

  const Sequence* observed = nullptr;
  for (const Sequence& q : seqs) {
    if (q.options != nullptr && !q.options->observe_rows.empty()) observed = &q;
  }
  int n_obs = 0;
  if (observed != nullptr) {
    const std::vector<int>& rows = observed->options->observe_rows;
    n_obs = static_cast<int>(rows.size());
    std::vector<int32_t> obs(rows.begin(), rows.end());
    for (int32_t& r : obs) r += static_cast<int32_t>(observed->row0);
    RETURN_IF_ERROR(s.obs_rows.Reserve(n_obs * 4, what));
    RETURN_IF_ERROR(s.probs.Reserve(int64_t{c.n_heads} * n_obs * max_keys * 4, what));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s.obs_rows.as<int32_t>(), obs.data(), n_obs * 4,
                                         cudaMemcpyHostToDevice, stream_),
                         up);
  }

  RopeArgs rope;
  rope.head_dim = hd;
  rope.rope_dim = c.rope_dim;
  rope.theta_scale = std::pow(c.rope_freq_base, -2.0f / static_cast<float>(c.rope_dim));
  rope.freq_scale = c.rope_freq_scale;
  rope.neox = c.rope_style == RopeStyle::kNeox;
  float* const X = s.x.as<float>();
  float* const XN = s.xn.as<float>();
  __half* const XH = s.xh.as<__half>();
  const char* k = "a CUDA kernel";
  for (int l = 0; l < c.n_layers; ++l) {
    RETURN_IF_ERROR(CheckStop(stop));
    const DeviceLayer& L = layers_[l];
    CUDA_RETURN_IF_ERROR(
        RmsNormRows(X, L.attn_norm.as<float>(), n, static_cast<int>(d), c.rms_eps, XN, stream_), k);
    CUDA_RETURN_IF_ERROR(ToHalf(XN, XH, n * d, stream_), k);
    RETURN_IF_ERROR(Gemm(L.wq, XH, n, s.q.as<float>()));
    RETURN_IF_ERROR(Gemm(L.wk, XH, n, s.k.as<float>()));
    RETURN_IF_ERROR(Gemm(L.wv, XH, n, s.v.as<float>()));
    if (L.bq.bytes() > 0) {
      CUDA_RETURN_IF_ERROR(
          AddBias(s.q.as<float>(), L.bq.as<float>(), n, static_cast<int>(dq), stream_), k);
    }
    if (L.bk.bytes() > 0) {
      CUDA_RETURN_IF_ERROR(
          AddBias(s.k.as<float>(), L.bk.as<float>(), n, static_cast<int>(dkv), stream_), k);
    }
    if (L.bv.bytes() > 0) {
      CUDA_RETURN_IF_ERROR(
          AddBias(s.v.as<float>(), L.bv.as<float>(), n, static_cast<int>(dkv), stream_), k);
    }
    CUDA_RETURN_IF_ERROR(Rope(s.q.as<float>(), s.pos.as<int32_t>(), n, c.n_heads, rope, stream_),
                         k);
    CUDA_RETURN_IF_ERROR(Rope(s.k.as<float>(), s.pos.as<int32_t>(), n, G, rope, stream_), k);
    CUDA_RETURN_IF_ERROR(AppendKv(s.k.as<float>(), s.v.as<float>(), s.pos.as<int32_t>(), G, hd,
                                  s.append.as<KvAppendEntry>() + l * table, static_cast<int>(table),
                                  max_rows, stream_),
                         k);
    // The new K/V rows for the host cache, fetched once at the end of the pass.
    float* kv_l = s.kv_out.as<float>() + int64_t{l} * 2 * n * dkv;
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(kv_l, s.k.as<float>(), n * dkv * 4, cudaMemcpyDeviceToDevice, stream_), k);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(kv_l + n * dkv, s.v.as<float>(), n * dkv * 4,
                                         cudaMemcpyDeviceToDevice, stream_),
                         k);
    RETURN_IF_ERROR(CheckStop(stop));
    AttentionArgs a;
    a.q = s.q.as<float>();
    a.q_pos = s.pos.as<int32_t>();
    a.row_seq = s.row_seq.as<int32_t>();
    a.heads = s.heads.as<KvHeadView>() + l * table;
    a.n_rows = n;
    a.n_heads = c.n_heads;
    a.n_kv_heads = G;
    a.head_dim = hd;
    a.max_keys = layer_keys[l];  // the workspace is sized for the largest layer
    a.scale = 1.0f / std::sqrt(static_cast<float>(hd));
    a.out = s.attn.as<float>();
    a.lse = s.lse.as<float>();
    a.workspace = s.work.as<float>();
    CUDA_RETURN_IF_ERROR(Attention(a, stream_), k);
    if (observed != nullptr) {
      // The observer's keys: the most any of the layer's heads holds, as on the CPU (the pass
      // has this one sequence).
      CUDA_RETURN_IF_ERROR(
          AttentionProbs(a, s.obs_rows.as<int32_t>(), n_obs, s.probs.as<float>(), stream_), k);
      host_probs_.resize(int64_t{c.n_heads} * n_obs * layer_keys[l]);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_probs_.data(), s.probs.as<float>(),
                                           host_probs_.size() * 4, cudaMemcpyDeviceToHost, stream_),
                           "downloading attention");
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_), "downloading attention");
      observed->options->observer(l, host_probs_.data(), n_obs, layer_keys[l]);
    }
    RETURN_IF_ERROR(CheckStop(stop));
    CUDA_RETURN_IF_ERROR(ToHalf(s.attn.as<float>(), XH, n * dq, stream_), k);
    RETURN_IF_ERROR(Gemm(L.wo, XH, n, s.tmp.as<float>()));
    CUDA_RETURN_IF_ERROR(AddInPlace(X, s.tmp.as<float>(), n * d, stream_), k);
    CUDA_RETURN_IF_ERROR(
        RmsNormRows(X, L.ffn_norm.as<float>(), n, static_cast<int>(d), c.rms_eps, XN, stream_), k);
    CUDA_RETURN_IF_ERROR(ToHalf(XN, XH, n * d, stream_), k);
    RETURN_IF_ERROR(Gemm(L.gate, XH, n, s.gate.as<float>()));
    RETURN_IF_ERROR(Gemm(L.up, XH, n, s.up.as<float>()));
    CUDA_RETURN_IF_ERROR(SwiGluInPlace(s.gate.as<float>(), s.up.as<float>(), n * c.d_ff, stream_),
                         k);
    CUDA_RETURN_IF_ERROR(ToHalf(s.gate.as<float>(), XH, n * c.d_ff, stream_), k);
    RETURN_IF_ERROR(Gemm(L.down, XH, n, s.tmp.as<float>()));
    CUDA_RETURN_IF_ERROR(AddInPlace(X, s.tmp.as<float>(), n * d, stream_), k);
  }

  // The output head over the rows whose logits are wanted.
  std::vector<int64_t> out_rows;
  for (const Sequence& q : seqs) {
    if (q.logits == nullptr) continue;
    const bool all = q.options != nullptr && q.options->all_logits;
    for (int64_t r = all ? 0 : q.n - 1; r < q.n; ++r) out_rows.push_back(q.row0 + r);
  }
  const int64_t n_out = static_cast<int64_t>(out_rows.size());
  std::vector<float> logits_host;
  if (n_out > 0) {
    RETURN_IF_ERROR(s.logits_in.Reserve(n_out * d * 4, what));
    RETURN_IF_ERROR(s.logits.Reserve(n_out * c.n_vocab * 4, what));
    for (int64_t i = 0; i < n_out; ++i) {
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s.logits_in.as<float>() + i * d, X + out_rows[i] * d,
                                           d * 4, cudaMemcpyDeviceToDevice, stream_),
                           k);
    }
    CUDA_RETURN_IF_ERROR(RmsNormRows(s.logits_in.as<float>(), output_norm_.as<float>(), n_out,
                                     static_cast<int>(d), c.rms_eps, XN, stream_),
                         k);
    CUDA_RETURN_IF_ERROR(ToHalf(XN, XH, n_out * d, stream_), k);
    RETURN_IF_ERROR(Gemm(output_, XH, n_out, s.logits.as<float>()));
    logits_host.resize(n_out * c.n_vocab);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(logits_host.data(), s.logits.as<float>(),
                                         n_out * c.n_vocab * 4, cudaMemcpyDeviceToHost, stream_),
                         "downloading logits");
  }
  host_kv_.resize(int64_t{c.n_layers} * 2 * n * dkv);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_kv_.data(), s.kv_out.as<float>(), host_kv_.size() * 4,
                                       cudaMemcpyDeviceToHost, stream_),
                       "downloading K/V");
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_), "finishing a pass");

  // The host caches get what the mirrors got (KvCache::Append rounds to fp16 as AppendKv
  // did), so both hold the same entries and the mirrors stay current.
  int64_t o = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& q = seqs[i];
    for (int l = 0; l < c.n_layers; ++l) {
      const float* kv_l = host_kv_.data() + int64_t{l} * 2 * n * dkv;
      q.cache->Append(l, kv_l + q.row0 * dkv, kv_l + n * dkv + q.row0 * dkv, pos.data() + q.row0,
                      q.n);
    }
    q.cache->next_position += static_cast<int32_t>(q.n);
    Mirror& m = *mirrors[i];
    for (int64_t& e : m.n) e += q.n;
    m.generation = q.cache->generation();
    if (q.logits != nullptr) {
      const bool all = q.options != nullptr && q.options->all_logits;
      const int64_t rows = all ? q.n : 1;
      q.logits->assign(logits_host.begin() + o * c.n_vocab,
                       logits_host.begin() + (o + rows) * c.n_vocab);
      o += rows;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<DeviceInfo>> ListDevices() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    return absl::FailedPreconditionError(
        absl::StrCat("no usable CUDA device: ", cudaGetErrorString(e)));
  }
  if (count == 0) return absl::FailedPreconditionError("no CUDA device present");
  std::vector<DeviceInfo> out;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, i),
                         absl::StrCat("reading cuda:", i, "'s properties"));
    DeviceInfo info;
    info.index = i;
    info.name = prop.name;
    info.cc_major = prop.major;
    info.cc_minor = prop.minor;
    info.total_bytes = static_cast<int64_t>(prop.totalGlobalMem);
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess)
      info.free_bytes = static_cast<int64_t>(free_bytes);
    out.push_back(std::move(info));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<DeviceForward>> NewCudaForward(const Model& model, int index,
                                                              const CudaForwardOptions& options) {
  absl::StatusOr<std::vector<DeviceInfo>> devices = ListDevices();
  if (!devices.ok()) return devices.status();
  if (index < 0 || index >= static_cast<int>(devices->size())) {
    std::string there;
    for (const DeviceInfo& d : *devices) {
      absl::StrAppend(&there, there.empty() ? "" : ", ", "cuda:", d.index, " (", d.name, ")");
    }
    return absl::FailedPreconditionError(absl::StrCat("cuda:", index,
                                                      " does not exist; this machine has ",
                                                      devices->size(), " CUDA device(s): ", there));
  }
  if (model.config().head_dim > kMaxHeadDim) {
    return absl::FailedPreconditionError(
        absl::StrCat("the CUDA attention kernel supports head_dim up to ", kMaxHeadDim,
                     ", the model has ", model.config().head_dim));
  }
  auto forward = std::make_unique<CudaForward>(model, (*devices)[index], options);
  RETURN_IF_ERROR(forward->Load());
  return std::unique_ptr<DeviceForward>(std::move(forward));
}

absl::StatusOr<double> GemmTflops(int index, int64_t m, int64_t n, int64_t k, int reps) {
  ASSIGN_OR_RETURN(std::vector<DeviceInfo> devices, ListDevices());
  if (index < 0 || index >= static_cast<int>(devices.size())) {
    return absl::FailedPreconditionError(absl::StrCat("cuda:", index, " does not exist"));
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(index), "cudaSetDevice");
  DeviceMemory x, w, y;
  RETURN_IF_ERROR(x.Allocate(m * k * 2, "GEMM input"));
  RETURN_IF_ERROR(w.Allocate(n * k * 2, "GEMM weights"));
  RETURN_IF_ERROR(y.Allocate(m * n * 4, "GEMM output"));
  // Zeros are as fast as any values for the tensor cores; initialised so nothing reads garbage.
  CUDA_RETURN_IF_ERROR(cudaMemset(x.as<void>(), 0, m * k * 2), "cudaMemset");
  CUDA_RETURN_IF_ERROR(cudaMemset(w.as<void>(), 0, n * k * 2), "cudaMemset");
  cublasHandle_t handle = nullptr;
  RETURN_IF_ERROR(CublasStatus(cublasCreate(&handle), "cublasCreate"));
  cudaEvent_t start = nullptr, stop = nullptr;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const float alpha = 1.f, beta = 0.f;
  double best = 0;
  absl::Status st;
  for (int r = 0; r <= reps && st.ok(); ++r) {
    cudaEventRecord(start);
    st = CublasStatus(
        cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                     static_cast<int>(k), &alpha, w.as<__half>(), CUDA_R_16F, static_cast<int>(k),
                     x.as<__half>(), CUDA_R_16F, static_cast<int>(k), &beta, y.as<float>(),
                     CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
    cudaEventRecord(stop);
    if (st.ok()) st = CudaStatus(cudaEventSynchronize(stop), "GEMM timing");
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (r > 0 && ms > 0) best = std::max(best, 2.0 * m * n * k / (ms * 1e-3) / 1e12);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cublasDestroy(handle);
  if (!st.ok()) return st;
  return best;
}

}  // namespace ctxcache::cuda
