// Converting arrow::Status into ours at the store boundary, with the file named.
#pragma once

#include <arrow/status.h>

#include "common/status.h"

namespace aq {

inline Status from_arrow(const arrow::Status& st, const std::string& context) {
  if (st.ok()) return Status::OK();
  // the detail carries the system's reason (e.g. "[errno 28] No space left on device")
  if (st.IsIOError())
    return IoError(StrCat(context, ": ", st.message(), st.detail() ? StrCat(" (", st.detail()->ToString(), ")") : ""));
  return FormatError(StrCat(context, ": ", st.ToString()));
}

}  // namespace aq

#define AQ_ARROW_RETURN(expr, context)                     \
  do {                                                     \
    ::arrow::Status _aq_ast = (expr);                      \
    if (!_aq_ast.ok()) return ::aq::from_arrow(_aq_ast, context); \
  } while (0)

#define AQ_ARROW_ASSIGN_IMPL(tmp, lhs, rexpr, context)              \
  auto tmp = (rexpr);                                               \
  if (!tmp.ok()) return ::aq::from_arrow(tmp.status(), context);    \
  lhs = std::move(tmp).ValueUnsafe()

#define AQ_ARROW_ASSIGN(lhs, rexpr, context) \
  AQ_ARROW_ASSIGN_IMPL(AQ_CONCAT(_aq_arrow_result_, __LINE__), lhs, rexpr, context)
