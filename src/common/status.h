// Errors as values across module boundaries (in the manner of Arrow's Status/Result):
// every function that can fail on user input returns a Status or Result<T> whose message
// names the file, the tensor and the offending value. Exceptions appear only at the Python
// edge (src/bindings), where each StatusCode maps to one Python exception class.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <utility>
#include <variant>

#include "common/strcat.h"


namespace aq {

enum class StatusCode {
  kOk = 0,
  kInvalidConfig,   // a configuration value outside what is allowed -> ConfigurationError
  kNotFound,        // a path that does not exist -> ModelNotFoundError
  kIoError,         // the OS refused a read/write/rename
  kFormatError,     // a file that is not what it claims (bad header, bad offsets)
  kNonFinite,       // NaN/Inf in a weight that policy says must be quantized
  kQuantization,    // a tensor that cannot be quantized as asked
  kValidation,      // the quality check could not be carried out -> ValidationError
  kNotImplemented,  // a feature that does not exist yet, said plainly
  kCancelled,       // the caller asked to stop (Ctrl-C)
  kInternal,        // a bug: an invariant of ours that did not hold
};

const char* status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status OK() { return {}; }
  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

  // Adds context in front of the message ("file.safetensors: " + message).
  Status WithPrefix(const std::string& prefix) const {
    if (ok()) return *this;
    return Status(code_, prefix + message_);
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidConfig(std::string m) { return {StatusCode::kInvalidConfig, std::move(m)}; }
inline Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status IoError(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
inline Status FormatError(std::string m) { return {StatusCode::kFormatError, std::move(m)}; }
inline Status NonFinite(std::string m) { return {StatusCode::kNonFinite, std::move(m)}; }
inline Status QuantizationFailure(std::string m) { return {StatusCode::kQuantization, std::move(m)}; }
inline Status ValidationFailure(std::string m) { return {StatusCode::kValidation, std::move(m)}; }
inline Status NotImplemented(std::string m) { return {StatusCode::kNotImplemented, std::move(m)}; }
inline Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
inline Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    assert(!std::get<Status>(v_).ok() && "Result built from an OK status carries no value");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status::OK() : std::get<Status>(v_); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace aq

#define AQ_CONCAT_INNER(a, b) a##b
#define AQ_CONCAT(a, b) AQ_CONCAT_INNER(a, b)

#define AQ_RETURN_IF_ERROR(expr)            \
  do {                                      \
    ::aq::Status _aq_st = (expr);           \
    if (!_aq_st.ok()) return _aq_st;        \
  } while (0)

#define AQ_ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                             \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

#define AQ_ASSIGN_OR_RETURN(lhs, rexpr) \
  AQ_ASSIGN_OR_RETURN_IMPL(AQ_CONCAT(_aq_result_, __LINE__), lhs, rexpr)

