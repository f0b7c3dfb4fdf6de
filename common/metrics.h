// Prometheus metrics without a client library: a registry of counter, gauge and histogram
// families with labels, rendered in the text exposition format 0.0.4.
//
// Cost model: a labelled series is looked up (mutex + map) only when a caller asks a family
// for it; the caller keeps the returned reference (series are never freed or moved while the
// registry lives) and every update after that is one or two relaxed atomic operations, with
// no lock and no lookup. Paths that see a label value only per request (a tenant, a method)
// may look the series up each time: that costs a mutex and a map probe, noise next to a
// model call.
//
// Cardinality: a family may cap its number of label sets. Once the cap is reached, a new label
// set has every value replaced by "other" (kOtherLabelValue), so an unbounded label (tenant)
// cannot grow the exposition without bound; the "other" series may exceed the cap by one.
//
// Values that live elsewhere (store and scheduler statistics, process memory) are exported by
// collectors: callbacks that the registry runs before each exposition, which Set() gauges and
// mirrored counters.
//
// Names are checked when a family is registered ([a-zA-Z_:][a-zA-Z0-9_:]*, labels
// [a-zA-Z_][a-zA-Z0-9_]* and not "le" nor "__*"; counter names end in "_total"); a bad name
// or a second registration under the same name with another type or labels is a programming
// error and aborts with a message. Registering the same family again returns the existing one.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace ctxcache::metrics {

inline constexpr char kOtherLabelValue[] = "other";

// A monotonic total. Add() ignores negative and NaN amounts.
class Counter {
 public:
  void Inc() { Add(1); }
  void Add(double amount) {
    if (!(amount > 0)) return;
    value_.fetch_add(amount, std::memory_order_relaxed);
  }
  // For collectors mirroring a total kept elsewhere (it must itself be monotonic).
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Gauge {
 public:
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Add(double amount) { value_.fetch_add(amount, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// Buckets are upper bounds (strictly increasing, finite); +Inf is implicit. An observation
// adds to one bucket (binary search over the bounds), to the sum, and nothing else: _count and
// the cumulative bucket values are computed when rendering, so _count always equals the +Inf
// bucket. NaN observations are ignored.
class Histogram {
 public:
  explicit Histogram(const std::vector<double>* bounds);
  void Observe(double value);

  struct Snapshot {
    std::vector<uint64_t> cumulative;  // one per bound, then +Inf (== count)
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot Snap() const;
  const std::vector<double>& bounds() const { return *bounds_; }

 private:
  const std::vector<double>* bounds_;  // owned by the family
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_->size() + 1 (the last: +Inf)
  std::atomic<double> sum_{0};
};

// Bucket helpers.
std::vector<double> ExponentialBuckets(double start, double factor, int count);
// Seconds from 1 ms to 2 minutes (request and phase latencies).
std::vector<double> LatencyBuckets();

enum class Type { kCounter, kGauge, kHistogram };

// A metric name and its labelled series.
class FamilyBase {
 public:
  virtual ~FamilyBase() = default;
  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  Type type() const { return type_; }
  size_t max_series() const { return max_series_; }
  // Label sets in use (including a folded "other" one).
  size_t size() const;
  // Appends HELP, TYPE and the samples.
  virtual void Render(std::string* out) const = 0;

 protected:
  FamilyBase(Type type, std::string name, std::string help, std::vector<std::string> label_names,
             size_t max_series);
  // The label values to use for `values` (folded to "other" past the cap); aborts on a wrong
  // number of values.
  std::vector<std::string> Resolve(const std::vector<std::string>& values) const;
  static void AppendLabels(const std::vector<std::string>& names,
                           const std::vector<std::string>& values, std::string_view extra_name,
                           std::string_view extra_value, std::string* out);

  const Type type_;
  const std::string name_, help_;
  const std::vector<std::string> label_names_;
  const size_t max_series_;  // 0 = no cap
  mutable std::mutex mu_;
};

template <typename T>
class Family : public FamilyBase {
 public:
  // The series for these label values (in label_names() order), created at zero on first use.
  // Keep the reference: it stays valid as long as the registry.
  T& WithLabels(const std::vector<std::string>& values);
  // The family's only series when it has no labels.
  T& Get() { return WithLabels({}); }
  void Render(std::string* out) const override;

 private:
  friend class Registry;
  Family(Type type, std::string name, std::string help, std::vector<std::string> label_names,
         size_t max_series, std::vector<double> bounds = {})
      : FamilyBase(type, std::move(name), std::move(help), std::move(label_names), max_series),
        bounds_(std::move(bounds)) {}
  std::unique_ptr<T> Make() const;

  const std::vector<double> bounds_;  // histograms only
  std::map<std::vector<std::string>, std::unique_ptr<T>> series_;  // guarded by mu_
  friend class FamilyBase;
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // max_series: the cap on label sets (0 = none). See the top for the naming rules.
  CounterFamily& AddCounter(const std::string& name, const std::string& help,
                            const std::vector<std::string>& label_names = {},
                            size_t max_series = 0);
  GaugeFamily& AddGauge(const std::string& name, const std::string& help,
                        const std::vector<std::string>& label_names = {},
                        size_t max_series = 0);
  HistogramFamily& AddHistogram(const std::string& name, const std::string& help,
                                const std::vector<std::string>& label_names,
                                std::vector<double> bounds, size_t max_series = 0);

  // Runs before every exposition (in registration order, under the registry's collect lock,
  // so two scrapes never interleave their collectors).
  void AddCollector(std::function<void()> collector);

  // Runs the collectors, then renders every family, sorted by name, in text format 0.0.4.
  std::string Render() const;

 private:
  FamilyBase& Add(std::unique_ptr<FamilyBase> family, const std::vector<double>* bounds);

  mutable std::mutex mu_;          // families_ and collectors_
  mutable std::mutex collect_mu_;  // one exposition at a time
  std::map<std::string, std::unique_ptr<FamilyBase>> families_;
  std::vector<std::function<void()>> collectors_;
};

// The Content-Type of Render()'s output.
inline constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// Text format helpers (public for tests).
std::string EscapeLabelValue(std::string_view value);  // \ " and newline
std::string EscapeHelp(std::string_view help);         // \ and newline
std::string FormatValue(double value);                 // shortest round trip; +Inf, -Inf, NaN
bool IsValidMetricName(std::string_view name);
bool IsValidLabelName(std::string_view name);

}  // namespace ctxcache::metrics
