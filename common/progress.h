// A one-line progress bar on stderr for long CLI work (compression of long documents, the
// quality harness): "finch  [#######.......]  45%  14336/32000 tokens  52 s, ~63 s left".
// On a terminal it redraws in place at most ~10 times a second; otherwise (CI logs, pipes) it
// prints a line per 10% so logs stay short.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace ctxcache {

class ProgressBar {
 public:
  explicit ProgressBar(std::string unit = "tokens")
      : unit_(std::move(unit)), tty_(isatty(fileno(stderr)) != 0) {}
  ~ProgressBar() { Finish(); }

  void Update(std::string_view stage, int64_t done, int64_t total) {
    using Clock = std::chrono::steady_clock;
    const auto now = Clock::now();
    if (stage != stage_) {
      Finish();
      stage_ = std::string(stage);
      start_ = now;
      last_decile_ = -1;
    }
    const double frac = total > 0 ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
    const bool last = done >= total;
    if (tty_) {
      if (!last && now - last_draw_ < std::chrono::milliseconds(100)) return;
    } else {
      const int decile = static_cast<int>(frac * 10);
      if (decile == last_decile_ && !last) return;
      last_decile_ = decile;
    }
    last_draw_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(filled, '#');
    bar.resize(kWidth, '.');
    char eta[48] = "";
    if (frac > 0 && !last) std::snprintf(eta, sizeof(eta), ", ~%.0f s left", elapsed / frac - elapsed);
    std::fprintf(stderr, "%s%-8s [%s] %3.0f%%  %lld/%lld %s  %.0f s%s%s", tty_ ? "\r" : "",
                 stage_.c_str(), bar.c_str(), 100 * frac, static_cast<long long>(done),
                 static_cast<long long>(total), unit_.c_str(), elapsed, eta,
                 tty_ ? "\033[K" : "\n");
    std::fflush(stderr);
    open_line_ = tty_;
  }

  // Ends the current line (a terminal's bar stays visible).
  void Finish() {
    if (open_line_) std::fputc('\n', stderr);
    open_line_ = false;
  }

 private:
  std::string unit_;
  bool tty_;
  std::string stage_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  int last_decile_ = -1;
  bool open_line_ = false;
};

}  // namespace ctxcache
