#include "store/activation_params.h"

#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/writer.h>

#include "store/arrow_status.h"
#include "store/format.h"

namespace aq {

Status write_activation_params(const std::string& path, const std::vector<ActivationRow>& rows,
                               const std::string& step_kind) {
  arrow::StringBuilder component, layer;
  arrow::Int32Builder group, bits, zero_point;
  arrow::DoubleBuilder step_lo, step_hi;
  arrow::FloatBuilder scale, clip_lo, clip_hi;
  for (const auto& r : rows) {
    AQ_ARROW_RETURN(component.Append(r.component), path);
    AQ_ARROW_RETURN(layer.Append(r.layer), path);
    AQ_ARROW_RETURN(group.Append(r.group), path);
    AQ_ARROW_RETURN(step_lo.Append(r.step_lo), path);
    AQ_ARROW_RETURN(step_hi.Append(r.step_hi), path);
    AQ_ARROW_RETURN(bits.Append(r.params.bits), path);
    AQ_ARROW_RETURN(scale.Append(r.params.scale), path);
    AQ_ARROW_RETURN(zero_point.Append(r.params.zero_point), path);
    AQ_ARROW_RETURN(clip_lo.Append(r.params.clip_lo), path);
    AQ_ARROW_RETURN(clip_hi.Append(r.params.clip_hi), path);
  }
  std::vector<std::shared_ptr<arrow::Array>> arrays(10);
  AQ_ARROW_RETURN(component.Finish(&arrays[0]), path);
  AQ_ARROW_RETURN(layer.Finish(&arrays[1]), path);
  AQ_ARROW_RETURN(group.Finish(&arrays[2]), path);
  AQ_ARROW_RETURN(step_lo.Finish(&arrays[3]), path);
  AQ_ARROW_RETURN(step_hi.Finish(&arrays[4]), path);
  AQ_ARROW_RETURN(bits.Finish(&arrays[5]), path);
  AQ_ARROW_RETURN(scale.Finish(&arrays[6]), path);
  AQ_ARROW_RETURN(zero_point.Finish(&arrays[7]), path);
  AQ_ARROW_RETURN(clip_lo.Finish(&arrays[8]), path);
  AQ_ARROW_RETURN(clip_hi.Finish(&arrays[9]), path);
  auto schema = arrow::schema({arrow::field("component", arrow::utf8(), false), arrow::field("layer", arrow::utf8(), false),
                               arrow::field("group", arrow::int32(), false), arrow::field("step_lo", arrow::float64(), false),
                               arrow::field("step_hi", arrow::float64(), false), arrow::field("bits", arrow::int32(), false),
                               arrow::field("scale", arrow::float32(), false), arrow::field("zero_point", arrow::int32(), false),
                               arrow::field("clip_lo", arrow::float32(), false), arrow::field("clip_hi", arrow::float32(), false)})
                    ->WithMetadata(arrow::key_value_metadata({"arrowquant.format", "arrowquant.format_version", "arrowquant.step_kind"},
                                                             {kFormatName, std::to_string(kFormatVersion), step_kind}));
  auto table = arrow::Table::Make(schema, arrays);
  std::shared_ptr<arrow::io::FileOutputStream> out;
  AQ_ARROW_ASSIGN(out, arrow::io::FileOutputStream::Open(path), path);
  AQ_ARROW_RETURN(parquet::arrow::WriteTable(*table, arrow::default_memory_pool(), out, 1 << 20), path);
  AQ_ARROW_RETURN(out->Close(), path);
  return Status::OK();
}

}  // namespace aq
