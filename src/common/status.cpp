#include "common/status.h"

namespace aq {

const char* status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidConfig: return "InvalidConfig";
    case StatusCode::kNotFound: return "NotFound";
    case StatusCode::kIoError: return "IOError";
    case StatusCode::kFormatError: return "FormatError";
    case StatusCode::kNonFinite: return "NonFinite";
    case StatusCode::kQuantization: return "QuantizationError";
    case StatusCode::kValidation: return "ValidationError";
    case StatusCode::kNotImplemented: return "NotImplemented";
    case StatusCode::kCancelled: return "Cancelled";
    case StatusCode::kInternal: return "Internal";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return std::string(status_code_name(code_)) + ": " + message_;
}

}  // namespace aq
