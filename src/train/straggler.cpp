#include "loom/train/straggler.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>

namespace loom::train {

std::vector<std::string> find_stragglers(const std::vector<RankTimes>& ranks,
                                         const std::vector<std::string>& phase_names, double factor,
                                         double min_excess_s) {
  std::map<int, std::vector<const RankTimes*>> groups;
  for (const auto& r : ranks) groups[r.group].push_back(&r);
  std::vector<std::string> lines;
  for (const auto& [group, members] : groups) {
    if (members.size() < 2) continue;
    for (size_t p = 0; p < phase_names.size(); ++p) {
      std::vector<double> v;
      for (const RankTimes* r : members) v.push_back(p < r->phases.size() ? r->phases[p] : 0.0);
      std::sort(v.begin(), v.end());
      const size_t n = v.size();
      const double median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
      for (const RankTimes* r : members) {
        const double t = p < r->phases.size() ? r->phases[p] : 0.0;
        if (t > factor * median && t - median > min_excess_s) {
          lines.push_back(fmt::format(
              "world rank {} (stage {}): {} {:.3f} s per step, median {:.3f} s ({:.2f}x)",
              r->world_rank, group, phase_names[p], t, median, median > 0 ? t / median : 0.0));
        }
      }
    }
  }
  return lines;
}

}  // namespace loom::train
