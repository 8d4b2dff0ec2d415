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
void parse_text(const std::string& text, const std::string& source,
                google::protobuf::Message* message);

// Reads a .pbtxt file into `message`; a missing or unreadable file is a kIO error naming the path.
void load_text_file(const std::string& path, google::protobuf::Message* message);

// Applies one override "a.b.c=value". Scalars take their text form, enums their name, bools
// true/false/1/0, repeated fields a comma list (optionally in [...]) that replaces the old values.
void apply_override(const std::string& assignment, google::protobuf::Message* message);

// Prints `message` as text format (every set field), e.g. to log the effective config.
std::string to_text(const google::protobuf::Message& message);

// The job config: file (optional, "" for defaults), then overrides in order, then validate().
JobConfig load_job_config(const std::string& path, const std::vector<std::string>& overrides);

// A field whose value differs between two configs: its dotted path and both values as text.
struct FieldChange {
  std::string path, before, after;
};

// The fields under each dotted path of `paths` ("model" compares every field of the model section,
// "train.seq_len" one field) whose values differ between `before` and `after` (an unset field
// counts as its default; repeated fields are compared whole), except those under a path of
// `except`. A path that names no field is a kConfig error.
std::vector<FieldChange> differences(const google::protobuf::Message& before,
                                     const google::protobuf::Message& after,
                                     const std::vector<std::string>& paths,
                                     const std::vector<std::string>& except = {});

// [Note: resume config check]
// A checkpoint stores the config that wrote it. Resuming with a config that changes what the
// saved state means (any model field but the recomputation and initialisation ones, the optimizer
// and its schedule, the data and its order, the seeds, the sequence length and batch) would run on
// silently with a different model or data (train.steps too: the schedule's horizon when
// optim.decay_steps is 0, and the data's epoch count and so its order, follow it), so it is refused
// with every changed field named, unless
// each is listed in train.allow_config_changes (a field path, or a section such as "optim") for a
// change made on purpose. The layout (parallel), comm, logging and the rest of train may change.
// Throws kConfig naming `checkpoint` and the fields.
void check_resume_config(const JobConfig& saved, const JobConfig& now,
                         const std::string& checkpoint);

// Whether train.allow_config_changes of `job` lists `path` or a section above it.
bool change_allowed(const JobConfig& job, const std::string& path);

// Field-level checks of a JobConfig (sizes >= 1, known names); throws kConfig naming the field.
// Cross-field checks that need the world size live with their layer (mesh::ParallelDims).
void validate(const JobConfig& config);

}  // namespace loom::config
