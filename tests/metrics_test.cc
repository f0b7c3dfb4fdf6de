// The metrics registry (common/metrics.h): exact text exposition, escaping, histogram
// bucketing, exact totals under concurrent updates, the label cardinality cap, name checks.
#include "common/metrics.h"

#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace ctxcache::metrics {
namespace {

TEST(MetricsTest, ExpositionIsExact) {
  Registry r;
  CounterFamily& requests =
      r.AddCounter("app_requests_total", "Requests served.", {"rpc", "code"});
  requests.WithLabels({"Generate", "OK"}).Add(3);
  requests.WithLabels({"Compress", "INVALID_ARGUMENT"}).Inc();
  r.AddGauge("app_queue_depth", "Waiting requests.").Get().Set(2.5);
  HistogramFamily& latency =
      r.AddHistogram("app_latency_seconds", "Latency.", {"rpc"}, {0.125, 1, 10});
  Histogram& h = latency.WithLabels({"Generate"});
  h.Observe(0.0625);
  h.Observe(0.125);  // le is inclusive
  h.Observe(3);
  h.Observe(100);
  r.AddCounter("app_unused_total", "Never touched: no series, not rendered.", {"x"});

  EXPECT_EQ(r.Render(),
            "# HELP app_latency_seconds Latency.\n"
            "# TYPE app_latency_seconds histogram\n"
            "app_latency_seconds_bucket{rpc=\"Generate\",le=\"0.125\"} 2\n"
            "app_latency_seconds_bucket{rpc=\"Generate\",le=\"1\"} 2\n"
            "app_latency_seconds_bucket{rpc=\"Generate\",le=\"10\"} 3\n"
            "app_latency_seconds_bucket{rpc=\"Generate\",le=\"+Inf\"} 4\n"
            "app_latency_seconds_sum{rpc=\"Generate\"} 103.1875\n"
            "app_latency_seconds_count{rpc=\"Generate\"} 4\n"
            "# HELP app_queue_depth Waiting requests.\n"
            "# TYPE app_queue_depth gauge\n"
            "app_queue_depth 2.5\n"
            "# HELP app_requests_total Requests served.\n"
            "# TYPE app_requests_total counter\n"
            "app_requests_total{rpc=\"Compress\",code=\"INVALID_ARGUMENT\"} 1\n"
            "app_requests_total{rpc=\"Generate\",code=\"OK\"} 3\n");
}

TEST(MetricsTest, EscapesLabelValuesAndHelp) {
  EXPECT_EQ(EscapeLabelValue("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
  EXPECT_EQ(EscapeHelp("a\\b\"c\nd"), "a\\\\b\"c\\nd");  // quotes stay in HELP
  Registry r;
  r.AddCounter("t_total", "Line one\nline \\two \"q\"", {"tenant"})
      .WithLabels({"x\"y\\z\nw"})
      .Inc();
  EXPECT_EQ(r.Render(),
            "# HELP t_total Line one\\nline \\\\two \"q\"\n"
            "# TYPE t_total counter\n"
            "t_total{tenant=\"x\\\"y\\\\z\\nw\"} 1\n");
}

TEST(MetricsTest, FormatsValues) {
  EXPECT_EQ(FormatValue(0), "0");
  EXPECT_EQ(FormatValue(-0.0), "0");
  EXPECT_EQ(FormatValue(1), "1");
  EXPECT_EQ(FormatValue(0.25), "0.25");
  EXPECT_EQ(FormatValue(65536), "65536");
  EXPECT_EQ(FormatValue(4294967296.0), "4294967296");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatValue(std::nan("")), "NaN");
}

TEST(MetricsTest, HistogramBucketing) {
  Registry r;
  Histogram& h = r.AddHistogram("h_bytes", "Bytes.", {}, ExponentialBuckets(65536, 4, 9)).Get();
  EXPECT_EQ(h.bounds().front(), 65536);
  EXPECT_EQ(h.bounds().back(), 4294967296.0);
  h.Observe(0);              // first bucket
  h.Observe(65536);          // first bucket (inclusive)
  h.Observe(65537);          // second
  h.Observe(1 << 20);        // 1 MiB = 4^10: bound index 2 (262144 < x <= 1048576)
  h.Observe(5e9);            // +Inf only
  h.Observe(std::nan(""));  // ignored
  const Histogram::Snapshot s = h.Snap();
  ASSERT_EQ(s.cumulative.size(), 10u);
  EXPECT_EQ(s.cumulative[0], 2u);
  EXPECT_EQ(s.cumulative[1], 3u);
  EXPECT_EQ(s.cumulative[2], 4u);
  EXPECT_EQ(s.cumulative[8], 4u);
  EXPECT_EQ(s.cumulative[9], 5u);
  EXPECT_EQ(s.count, 5u);
  EXPECT_DOUBLE_EQ(s.sum, 0 + 65536 + 65537 + (1 << 20) + 5e9);
  const std::string text = r.Render();
  EXPECT_NE(text.find("h_bytes_bucket{le=\"65536\"} 2\n"), std::string::npos) << text;
  EXPECT_NE(text.find("h_bytes_bucket{le=\"4294967296\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("h_bytes_bucket{le=\"+Inf\"} 5\n"), std::string::npos) << text;
  EXPECT_NE(text.find("h_bytes_count 5\n"), std::string::npos) << text;
}

TEST(MetricsTest, CountersIgnoreNegativeAmounts) {
  Registry r;
  Counter& c = r.AddCounter("c_total", "C.").Get();
  c.Add(2);
  c.Add(-1);
  c.Add(std::nan(""));
  EXPECT_EQ(c.Value(), 2);
}

TEST(MetricsTest, ConcurrentUpdatesAreExact) {
  Registry r;
  CounterFamily& family = r.AddCounter("ops_total", "Ops.", {"worker"});
  Histogram& h = r.AddHistogram("op_seconds", "Op time.", {}, {0.5, 1.5}).Get();
  Gauge& g = r.AddGauge("level", "Level.").Get();
  constexpr int kThreads = 8, kIters = 100000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Counter& mine = family.WithLabels({t % 2 == 0 ? "even" : "odd"});
      Counter& shared = family.WithLabels({"all"});
      for (int i = 0; i < kIters; ++i) {
        mine.Inc();
        shared.Add(2);
        h.Observe(i % 2);  // 0 -> first bucket, 1 -> second
        g.Add(1);
        g.Add(-1);
        if (i % 10000 == 0) (void)r.Render();  // scrapes while updating
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(family.WithLabels({"even"}).Value(), kThreads / 2 * kIters);
  EXPECT_EQ(family.WithLabels({"odd"}).Value(), kThreads / 2 * kIters);
  EXPECT_EQ(family.WithLabels({"all"}).Value(), 2.0 * kThreads * kIters);
  const Histogram::Snapshot s = h.Snap();
  EXPECT_EQ(s.count, uint64_t{kThreads} * kIters);
  EXPECT_EQ(s.cumulative[0], uint64_t{kThreads} * kIters / 2);
  EXPECT_EQ(s.sum, kThreads * kIters / 2.0);
  EXPECT_EQ(g.Value(), 0);
}

TEST(MetricsTest, CardinalityCapFoldsIntoOther) {
  Registry r;
  CounterFamily& f = r.AddCounter("tenant_bytes_total", "Per tenant.", {"tenant"}, 3);
  f.WithLabels({"a"}).Add(1);
  f.WithLabels({"b"}).Add(1);
  f.WithLabels({"c"}).Add(1);
  EXPECT_EQ(f.size(), 3u);
  Counter& d = f.WithLabels({"d"});
  Counter& e = f.WithLabels({"e"});
  EXPECT_EQ(&d, &e);  // both folded
  EXPECT_EQ(&d, &f.WithLabels({kOtherLabelValue}));
  d.Add(5);
  e.Add(7);
  f.WithLabels({"a"}).Add(1);  // existing series keep their own
  EXPECT_EQ(f.size(), 4u);     // the cap plus "other"
  for (int i = 0; i < 100; ++i) f.WithLabels({std::to_string(i)}).Inc();
  EXPECT_EQ(f.size(), 4u);
  const std::string text = r.Render();
  EXPECT_NE(text.find("tenant_bytes_total{tenant=\"a\"} 2\n"), std::string::npos) << text;
  EXPECT_NE(text.find("tenant_bytes_total{tenant=\"other\"} 112\n"), std::string::npos) << text;
}

TEST(MetricsTest, CollectorsRunBeforeRendering) {
  Registry r;
  Gauge& g = r.AddGauge("scraped", "Set at scrape time.").Get();
  int calls = 0;
  r.AddCollector([&] { g.Set(++calls); });
  EXPECT_NE(r.Render().find("scraped 1\n"), std::string::npos);
  EXPECT_NE(r.Render().find("scraped 2\n"), std::string::npos);
}

TEST(MetricsTest, SameFamilyTwiceIsTheSameFamily) {
  Registry r;
  CounterFamily& a = r.AddCounter("x_total", "X.", {"l"});
  CounterFamily& b = r.AddCounter("x_total", "X.", {"l"});
  EXPECT_EQ(&a, &b);
}

TEST(MetricsTest, Names) {
  EXPECT_TRUE(IsValidMetricName("ctxcache_requests_total"));
  EXPECT_TRUE(IsValidMetricName("a:b_c9"));
  EXPECT_FALSE(IsValidMetricName("9a"));
  EXPECT_FALSE(IsValidMetricName("a-b"));
  EXPECT_FALSE(IsValidMetricName(""));
  EXPECT_TRUE(IsValidLabelName("tenant"));
  EXPECT_FALSE(IsValidLabelName("__name"));
  EXPECT_FALSE(IsValidLabelName("a:b"));
}

TEST(MetricsDeathTest, ProgrammingErrorsAbort) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        Registry r;
        r.AddCounter("requests", "Counter without _total.");
      },
      "end in _total");
  EXPECT_DEATH(
      {
        Registry r;
        r.AddCounter("x_total", "X.", {"a"});
        r.AddGauge("x_total", "X.", {"a"});
      },
      "registered twice");
  EXPECT_DEATH(
      {
        Registry r;
        r.AddHistogram("h", "H.", {"le"}, {1});
      },
      "invalid label name");
  EXPECT_DEATH(
      {
        Registry r;
        r.AddHistogram("h", "H.", {}, {2, 1});
      },
      "strictly increasing");
  EXPECT_DEATH(
      {
        Registry r;
        r.AddCounter("y_total", "Y.", {"a", "b"}).WithLabels({"only one"});
      },
      "1 label values for 2 labels");
}

}  // namespace
}  // namespace ctxcache::metrics
