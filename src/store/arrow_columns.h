// A whole column of a table as one typed array, with errors that name the file and the column.
#pragma once

#include <arrow/api.h>

#include <memory>
#include <string>

#include "common/status.h"
#include "common/strcat.h"

namespace aq {

template <typename ArrayT>
Result<std::shared_ptr<ArrayT>> column_as(const arrow::Table& t, const char* name, const std::string& path) {
  auto col = t.GetColumnByName(name);
  if (!col) return FormatError(StrCat(path, ": no column '", name, "'"));
  auto merged = arrow::Concatenate(col->chunks());
  if (!merged.ok()) return FormatError(StrCat(path, ": column '", name, "': ", merged.status().ToString()));
  auto typed = std::dynamic_pointer_cast<ArrayT>(*merged);
  if (!typed) return FormatError(StrCat(path, ": column '", name, "' has type ", col->type()->ToString()));
  return typed;
}

}  // namespace aq
