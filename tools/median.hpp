// The median of a benchmark's repeated timings (what every zinf-bench
// sub-command reports on this shared, noisy machine); 0 for none.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

namespace zinf::bench {

inline double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

}  // namespace zinf::bench
