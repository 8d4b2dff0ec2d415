// Job configuration: protobuf text format (.pbtxt) plus `--set a.b.c=value` overrides.
//
// Errors name the file, line and column, or the dotted field path, and the reason:
//   configs/x.pbtxt:3:5: config error: no field 'tpp' in loom.config.ParallelConfig
//   --set parallel.tp=two: field 'parallel.tp' expects an int32, got 'two'
#pragma once

#include <google/protobuf/message.h>

#include <string>
#include <vector>

#include "loom/config.pb.h"

namespace loom::config {

// Parses text format into `message`, merging over what it holds. `source` names the text in errors.
void parse_text(const std::string& text, const std::string& source, google::protobuf::Message* message);

// Reads a .pbtxt file into `message`; a missing or unreadable file is a kIO error naming the path.
void load_text_file(const std::string& path, google::protobuf::Message* message);

// Applies one override "a.b.c=value". Scalars take their text form, enums their name, bools
// true/false/1/0, repeated fields a comma list (optionally in [...]) that replaces the old values.
void apply_override(const std::string& assignment, google::protobuf::Message* message);

// Prints `message` as text format (every set field), e.g. to log the effective config.
std::string to_text(const google::protobuf::Message& message);

// The job config: file (optional, "" for defaults), then overrides in order, then validate().
JobConfig load_job_config(const std::string& path, const std::vector<std::string>& overrides);

// Field-level checks of a JobConfig (sizes >= 1, known names); throws kConfig naming the field.
// Cross-field checks that need the world size live with their layer (mesh::ParallelDims).
void validate(const JobConfig& config);

}  // namespace loom::config
