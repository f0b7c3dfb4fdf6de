// Prometheus registry and text exposition (see metrics.h).
#include "common/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace ctxcache::metrics {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "metrics: %s\n", message.c_str());
  std::abort();
}

const char* TypeName(Type type) {
  switch (type) {
    case Type::kCounter:
      return "counter";
    case Type::kGauge:
      return "gauge";
    case Type::kHistogram:
      return "histogram";
  }
  return "untyped";
}

void AppendSample(std::string* out, std::string_view name, std::string_view suffix,
                  const std::string& labels, double value) {
  out->append(name);
  out->append(suffix);
  out->append(labels);
  out->push_back(' ');
  out->append(FormatValue(value));
  out->push_back('\n');
}

}  // namespace

// ---- text format helpers ----------------------------------------------------------------

std::string EscapeLabelValue(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

std::string EscapeHelp(std::string_view help) {
  std::string out;
  out.reserve(help.size());
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string FormatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == 0) return "0";  // also -0
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), value);
  return std::string(buf, r.ptr);
}

bool IsValidMetricName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool IsValidLabelName(std::string_view name) {
  if (name.empty() || name.substr(0, 2) == "__") return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

std::vector<double> LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
          1,     2.5,    5,     10,   30,    60,   120};
}

// ---- Histogram ----------------------------------------------------------------------------

Histogram::Histogram(const std::vector<double>* bounds)
    : bounds_(bounds), buckets_(new std::atomic<uint64_t>[bounds->size() + 1]) {
  for (size_t i = 0; i <= bounds_->size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double value) {
  if (std::isnan(value)) return;
  // The first bound >= value: Prometheus buckets are "less than or equal".
  const size_t i = static_cast<size_t>(
      std::lower_bound(bounds_->begin(), bounds_->end(), value) - bounds_->begin());
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Snap() const {
  Snapshot s;
  s.cumulative.resize(bounds_->size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_->size(); ++i) {
    total += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = total;
  }
  s.count = total;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

// ---- families -----------------------------------------------------------------------------

FamilyBase::FamilyBase(Type type, std::string name, std::string help,
                       std::vector<std::string> label_names, size_t max_series)
    : type_(type), name_(std::move(name)), help_(std::move(help)),
      label_names_(std::move(label_names)), max_series_(max_series) {}

size_t FamilyBase::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  switch (type_) {
    case Type::kCounter:
      return static_cast<const CounterFamily*>(this)->series_.size();
    case Type::kGauge:
      return static_cast<const GaugeFamily*>(this)->series_.size();
    case Type::kHistogram:
      return static_cast<const HistogramFamily*>(this)->series_.size();
  }
  return 0;
}

std::vector<std::string> FamilyBase::Resolve(const std::vector<std::string>& values) const {
  if (values.size() != label_names_.size()) {
    Die(name_ + ": " + std::to_string(values.size()) + " label values for " +
        std::to_string(label_names_.size()) + " labels");
  }
  return values;
}

void FamilyBase::AppendLabels(const std::vector<std::string>& names,
                              const std::vector<std::string>& values,
                              std::string_view extra_name, std::string_view extra_value,
                              std::string* out) {
  if (names.empty() && extra_name.empty()) return;
  out->push_back('{');
  bool first = true;
  for (size_t i = 0; i < names.size(); ++i) {
    if (!first) out->push_back(',');
    first = false;
    out->append(names[i]);
    out->append("=\"");
    out->append(EscapeLabelValue(values[i]));
    out->push_back('"');
  }
  if (!extra_name.empty()) {
    if (!first) out->push_back(',');
    out->append(extra_name);
    out->append("=\"");
    out->append(extra_value);
    out->push_back('"');
  }
  out->push_back('}');
}

template <typename T>
std::unique_ptr<T> Family<T>::Make() const {
  if constexpr (std::is_same_v<T, Histogram>) {
    return std::make_unique<Histogram>(&bounds_);
  } else {
    return std::make_unique<T>();
  }
}

template <typename T>
T& Family<T>::WithLabels(const std::vector<std::string>& values) {
  std::vector<std::string> key = Resolve(values);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = series_.find(key);
  if (it != series_.end()) return *it->second;
  if (max_series_ > 0 && series_.size() >= max_series_) {
    for (std::string& v : key) v = kOtherLabelValue;
    it = series_.find(key);
    if (it != series_.end()) return *it->second;
  }
  auto [pos, inserted] = series_.emplace(std::move(key), Make());
  return *pos->second;
}

template <typename T>
void Family<T>::Render(std::string* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (series_.empty()) return;
  out->append("# HELP ").append(name_).append(" ").append(EscapeHelp(help_)).append("\n");
  out->append("# TYPE ").append(name_).append(" ").append(TypeName(type_)).append("\n");
  for (const auto& [values, series] : series_) {
    std::string labels;
    AppendLabels(label_names_, values, "", "", &labels);
    if constexpr (std::is_same_v<T, Histogram>) {
      const Histogram::Snapshot s = series->Snap();
      for (size_t i = 0; i <= bounds_.size(); ++i) {
        std::string le_labels;
        AppendLabels(label_names_, values, "le",
                     i < bounds_.size() ? FormatValue(bounds_[i]) : "+Inf", &le_labels);
        AppendSample(out, name_, "_bucket", le_labels, static_cast<double>(s.cumulative[i]));
      }
      AppendSample(out, name_, "_sum", labels, s.sum);
      AppendSample(out, name_, "_count", labels, static_cast<double>(s.count));
    } else {
      AppendSample(out, name_, "", labels, series->Value());
    }
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// ---- Registry -----------------------------------------------------------------------------

FamilyBase& Registry::Add(std::unique_ptr<FamilyBase> family, const std::vector<double>* bounds) {
  const std::string& name = family->name();
  if (!IsValidMetricName(name)) Die("invalid metric name \"" + name + "\"");
  const bool total = name.size() > 6 && name.compare(name.size() - 6, 6, "_total") == 0;
  if (family->type() == Type::kCounter && !total) {
    Die("counter " + name + ": counter names end in _total");
  }
  for (const std::string& l : family->label_names()) {
    if (!IsValidLabelName(l) || (family->type() == Type::kHistogram && l == "le")) {
      Die(name + ": invalid label name \"" + l + "\"");
    }
  }
  if (bounds != nullptr) {
    if (bounds->empty()) Die(name + ": a histogram needs at least one bucket");
    for (size_t i = 0; i < bounds->size(); ++i) {
      if (!std::isfinite((*bounds)[i]) || (i > 0 && (*bounds)[i] <= (*bounds)[i - 1])) {
        Die(name + ": bucket bounds must be finite and strictly increasing");
      }
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = families_.find(name);
  if (it != families_.end()) {
    if (it->second->type() != family->type() ||
        it->second->label_names() != family->label_names()) {
      Die(name + " registered twice with different types or labels");
    }
    return *it->second;
  }
  return *families_.emplace(name, std::move(family)).first->second;
}

CounterFamily& Registry::AddCounter(const std::string& name, const std::string& help,
                                    const std::vector<std::string>& label_names,
                                    size_t max_series) {
  std::unique_ptr<CounterFamily> f(
      new CounterFamily(Type::kCounter, name, help, label_names, max_series));
  return static_cast<CounterFamily&>(Add(std::move(f), nullptr));
}

GaugeFamily& Registry::AddGauge(const std::string& name, const std::string& help,
                                const std::vector<std::string>& label_names, size_t max_series) {
  std::unique_ptr<GaugeFamily> f(
      new GaugeFamily(Type::kGauge, name, help, label_names, max_series));
  return static_cast<GaugeFamily&>(Add(std::move(f), nullptr));
}

HistogramFamily& Registry::AddHistogram(const std::string& name, const std::string& help,
                                        const std::vector<std::string>& label_names,
                                        std::vector<double> bounds, size_t max_series) {
  std::unique_ptr<HistogramFamily> f(
      new HistogramFamily(Type::kHistogram, name, help, label_names, max_series, bounds));
  return static_cast<HistogramFamily&>(Add(std::move(f), &bounds));
}

void Registry::AddCollector(std::function<void()> collector) {
  std::lock_guard<std::mutex> lock(mu_);
  collectors_.push_back(std::move(collector));
}

std::string Registry::Render() const {
  std::lock_guard<std::mutex> collect_lock(collect_mu_);
  std::vector<std::function<void()>> collectors;
  std::vector<const FamilyBase*> families;
  {
    std::lock_guard<std::mutex> lock(mu_);
    collectors = collectors_;
    for (const auto& [name, f] : families_) families.push_back(f.get());
  }
  for (const auto& c : collectors) c();
  std::string out;
  for (const FamilyBase* f : families) f->Render(&out);
  return out;
}

}  // namespace ctxcache::metrics
