// The IoU threshold in the box dtype, shared by the CPU and CUDA NMS kernels.
#pragma once

#include <cmath>
#include <limits>

namespace fastbb {

// The largest T not above `threshold`: a T value x is > threshold (compared in double, as torchvision
// compares) exactly when x > threshold_below<T>(threshold).
template <typename T>
inline T threshold_below(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) > threshold) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

}  // namespace fastbb
