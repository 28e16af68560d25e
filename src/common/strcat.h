// StrCat: builds error messages from mixed parts without iostream boilerplate at call sites.
#pragma once

#include <sstream>
#include <string>

namespace aq {

template <typename... Parts>
std::string StrCat(Parts&&... parts) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}

}  // namespace aq
