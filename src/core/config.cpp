#include "loom/core/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>

#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/core/trace.h"

namespace loom::config {
namespace pb = google::protobuf;

namespace {

// Collects the parser's first error with its position.
class FirstErrorCollector : public pb::io::ErrorCollector {
 public:
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (error.empty()) {
      error = fmt::format("{}:{}: {}", line + 1, column + 1, message);
      this->line = line;
    }
  }
  void AddWarning(int line, pb::io::ColumnNumber column, const std::string& message) override {}
  std::string error;
  int line = -1;  // 0-based line of the first error
};

std::string field_names(const pb::Descriptor* d) {
  std::string names;
  for (int i = 0; i < d->field_count(); ++i) {
    if (i) names += ", ";
    names += d->field(i)->name();
  }
  return names;
}

const char* type_name(const pb::FieldDescriptor* f) {
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32:
      return "an int32";
    case pb::FieldDescriptor::CPPTYPE_INT64:
      return "an int64";
    case pb::FieldDescriptor::CPPTYPE_UINT32:
      return "a uint32";
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      return "a uint64";
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
      return "a double";
    case pb::FieldDescriptor::CPPTYPE_FLOAT:
      return "a float";
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      return "a bool (true/false)";
    case pb::FieldDescriptor::CPPTYPE_ENUM:
      return "an enum name";
    case pb::FieldDescriptor::CPPTYPE_STRING:
      return "a string";
    case pb::FieldDescriptor::CPPTYPE_MESSAGE:
      return "a message";
  }
  return "a value";
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

template <typename T>
bool parse_integer(const std::string& text, T* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  if constexpr (std::is_signed_v<T>) {
    long long v = std::strtoll(text.c_str(), &end, 0);
    if (errno || *end || v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max())
      return false;
    *out = static_cast<T>(v);
  } else {
    if (text[0] == '-') return false;
    unsigned long long v = std::strtoull(text.c_str(), &end, 0);
    if (errno || *end || v > std::numeric_limits<T>::max()) return false;
    *out = static_cast<T>(v);
  }
  return true;
}

bool parse_double(const std::string& text, double* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (errno || *end) return false;
  *out = v;
  return true;
}

// Sets one scalar (or appends one element of a repeated field) from its text form.
void set_scalar(pb::Message* m, const pb::FieldDescriptor* f, const std::string& path,
                const std::string& text) {
  const pb::Reflection* r = m->GetReflection();
  bool rep = f->is_repeated();
  auto bad = [&]() {
    LOOM_THROW(ErrorKind::kConfig, "field '{}' expects {}, got '{}'", path, type_name(f), text);
  };
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32: {
      int32_t v;
      if (!parse_integer(text, &v)) bad();
      rep ? r->AddInt32(m, f, v) : r->SetInt32(m, f, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_INT64: {
      int64_t v;
      if (!parse_integer(text, &v)) bad();
      rep ? r->AddInt64(m, f, v) : r->SetInt64(m, f, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_UINT32: {
      uint32_t v;
      if (!parse_integer(text, &v)) bad();
      rep ? r->AddUInt32(m, f, v) : r->SetUInt32(m, f, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_UINT64: {
      uint64_t v;
      if (!parse_integer(text, &v)) bad();
      rep ? r->AddUInt64(m, f, v) : r->SetUInt64(m, f, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_DOUBLE: {
      double v;
      if (!parse_double(text, &v)) bad();
      rep ? r->AddDouble(m, f, v) : r->SetDouble(m, f, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_FLOAT: {
      double v;
      if (!parse_double(text, &v)) bad();
      rep ? r->AddFloat(m, f, static_cast<float>(v)) : r->SetFloat(m, f, static_cast<float>(v));
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_BOOL: {
      bool v;
      if (text == "true" || text == "1" || text == "True") {
        v = true;
      } else if (text == "false" || text == "0" || text == "False") {
        v = false;
      } else {
        bad();
      }
      rep ? r->AddBool(m, f, v) : r->SetBool(m, f, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_ENUM: {
      const pb::EnumValueDescriptor* ev = f->enum_type()->FindValueByName(text);
      if (!ev) {
        std::string names;
        for (int i = 0; i < f->enum_type()->value_count(); ++i) {
          names += (i ? ", " : "") + f->enum_type()->value(i)->name();
        }
        LOOM_THROW(ErrorKind::kConfig, "field '{}' expects one of {}, got '{}'", path, names, text);
      }
      rep ? r->AddEnum(m, f, ev) : r->SetEnum(m, f, ev);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_STRING: {
      std::string v = text;
      if (v.size() >= 2 && (v.front() == '"' || v.front() == '\'') && v.back() == v.front()) {
        v = v.substr(1, v.size() - 2);
      }
      rep ? r->AddString(m, f, v) : r->SetString(m, f, v);
      break;
    }
    case pb::FieldDescriptor::CPPTYPE_MESSAGE:
      LOOM_THROW(ErrorKind::kConfig, "field '{}' is a message ({}); set one of its fields: {}",
                 path, f->message_type()->full_name(), field_names(f->message_type()));
  }
}

}  // namespace

void parse_text(const std::string& text, const std::string& source, pb::Message* message) {
  pb::TextFormat::Parser parser;
  FirstErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  // Parse (not Merge) refuses a non-repeated field given twice, which would otherwise silently keep
  // the last; the result is then merged over what `message` holds.
  std::unique_ptr<pb::Message> parsed(message->New());
  if (parser.ParseFromString(text, parsed.get())) {
    message->MergeFrom(*parsed);
  } else {
    std::string what = errors.error.empty() ? "malformed text format" : errors.error;
    // The parser says what it expected but not in which field: quote the offending line.
    std::string line_text;
    if (errors.line >= 0) {
      std::stringstream lines(text);
      for (int i = 0; i <= errors.line && std::getline(lines, line_text); ++i) {
      }
      line_text = trim(line_text);
    }
    LOOM_THROW(ErrorKind::kConfig, "{}:{}{}", source, what,
               line_text.empty() ? "" : " (in: " + line_text + ")");
  }
}

void load_text_file(const std::string& path, pb::Message* message) {
  std::ifstream in(path);
  LOOM_CHECK_KIND(ErrorKind::kIO, in.good(), "cannot open config file '{}': {}", path,
                  std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  LOOM_CHECK_KIND(ErrorKind::kIO, !in.bad(), "cannot read config file '{}'", path);
  std::unique_ptr<pb::Message> parsed(message->New());
  parse_text(ss.str(), path, parsed.get());
  // An empty file (or one of comments only) would silently train the built-in defaults.
  LOOM_CHECK_KIND(ErrorKind::kConfig, parsed->ByteSizeLong() > 0,
                  "config file '{}' sets no field (it is empty or holds only comments); pass no "
                  "--config to run the built-in defaults",
                  path);
  message->MergeFrom(*parsed);
}

void apply_override(const std::string& assignment, pb::Message* message) {
  auto eq = assignment.find('=');
  LOOM_CHECK_KIND(ErrorKind::kConfig, eq != std::string::npos && eq > 0,
                  "override '{}' is not of the form a.b.c=value", assignment);
  std::string path = trim(assignment.substr(0, eq));
  std::string value = trim(assignment.substr(eq + 1));

  pb::Message* m = message;
  std::string walked;
  size_t start = 0;
  while (true) {
    size_t dot = path.find('.', start);
    std::string name =
        path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const pb::Descriptor* d = m->GetDescriptor();
    const pb::FieldDescriptor* f = d->FindFieldByName(name);
    std::string here = walked.empty() ? name : walked + "." + name;
    if (!f) {
      LOOM_THROW(ErrorKind::kConfig, "--set {}: no field '{}' in {} (fields: {})", assignment, here,
                 d->full_name(), field_names(d));
    }
    if (dot == std::string::npos) {
      const pb::Reflection* r = m->GetReflection();
      if (f->is_repeated()) {
        std::string list = value;
        if (list.size() >= 2 && list.front() == '[' && list.back() == ']') {
          list = list.substr(1, list.size() - 2);
        }
        r->ClearField(m, f);
        std::stringstream items(list);
        std::string item;
        while (std::getline(items, item, ',')) {
          item = trim(item);
          if (!item.empty()) set_scalar(m, f, here, item);
        }
      } else {
        set_scalar(m, f, here, value);
      }
      return;
    }
    LOOM_CHECK_KIND(ErrorKind::kConfig,
                    f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated(),
                    "--set {}: field '{}' is {}, it has no sub-field '{}'", assignment, here,
                    type_name(f), path.substr(dot + 1));
    m = m->GetReflection()->MutableMessage(m, f);
    walked = here;
    start = dot + 1;
  }
}

std::string to_text(const pb::Message& message) {
  std::string out;
  pb::TextFormat::Printer printer;
  printer.PrintToString(message, &out);
  return out;
}

JobConfig load_job_config(const std::string& path, const std::vector<std::string>& overrides) {
  JobConfig config;
  if (!path.empty()) load_text_file(path, &config);
  for (const auto& o : overrides) apply_override(o, &config);
  validate(config);
  return config;
}

namespace {
// The fields along a dotted path from `d`; a kConfig error when it names none.
std::vector<const pb::FieldDescriptor*> resolve_path(const pb::Descriptor* d,
                                                     const std::string& path) {
  std::vector<const pb::FieldDescriptor*> fields;
  std::stringstream parts(path);
  std::string name;
  while (std::getline(parts, name, '.')) {
    LOOM_CHECK_CONFIG(d != nullptr, "'{}' names no field: '{}' has no sub-fields", path,
                      fields.empty() ? "" : fields.back()->name());
    const pb::FieldDescriptor* f = d->FindFieldByName(name);
    LOOM_CHECK_CONFIG(f != nullptr, "'{}' names no field: no '{}' in {} (fields: {})", path, name,
                      d->full_name(), field_names(d));
    fields.push_back(f);
    d = f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE ? f->message_type() : nullptr;
  }
  LOOM_CHECK_CONFIG(!fields.empty(), "an empty field path");
  return fields;
}

std::string field_text(const pb::Message& m, const pb::FieldDescriptor* f) {
  const pb::Reflection* r = m.GetReflection();
  std::string out, v;
  if (!f->is_repeated()) {
    pb::TextFormat::PrintFieldValueToString(m, f, -1, &out);
    return out;
  }
  for (int i = 0; i < r->FieldSize(m, f); ++i) {
    pb::TextFormat::PrintFieldValueToString(m, f, i, &v);
    out += (i ? ", " : "") + v;
  }
  return "[" + out + "]";
}

bool under(const std::string& path, const std::vector<std::string>& prefixes) {
  for (const auto& p : prefixes) {
    if (path == p ||
        (path.size() > p.size() && path.compare(0, p.size(), p) == 0 && path[p.size()] == '.'))
      return true;
  }
  return false;
}

void diff_message(const pb::Message& a, const pb::Message& b, const std::string& prefix,
                  const std::vector<std::string>& except, std::vector<FieldChange>* out);

void diff_field(const pb::Message& a, const pb::Message& b, const pb::FieldDescriptor* f,
                const std::string& path, const std::vector<std::string>& except,
                std::vector<FieldChange>* out) {
  if (under(path, except)) return;
  if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated()) {
    diff_message(a.GetReflection()->GetMessage(a, f), b.GetReflection()->GetMessage(b, f), path,
                 except, out);
    return;
  }
  std::string x = field_text(a, f), y = field_text(b, f);
  if (x != y) out->push_back({path, std::move(x), std::move(y)});
}

void diff_message(const pb::Message& a, const pb::Message& b, const std::string& prefix,
                  const std::vector<std::string>& except, std::vector<FieldChange>* out) {
  const pb::Descriptor* d = a.GetDescriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    diff_field(a, b, d->field(i), prefix + "." + d->field(i)->name(), except, out);
  }
}
}  // namespace

void validate(const JobConfig& c) {
  constexpr int kSchemaVersion = 1;
  LOOM_CHECK_CONFIG(c.version() >= 1 && c.version() <= kSchemaVersion,
                    "field 'version' is {}, but this build of Loom reads config schema 1..{}",
                    c.version(), kSchemaVersion);
  const auto& p = c.parallel();
  auto positive = [](const char* name, int v) {
    LOOM_CHECK_CONFIG(v >= 1, "field 'parallel.{}' must be >= 1, got {}", name, v);
  };
  positive("tp", p.tp());
  positive("cp", p.cp());
  positive("ep", p.ep());
  positive("pp", p.pp());
  LOOM_CHECK_CONFIG(p.dp() >= 0, "field 'parallel.dp' must be >= 0 (0 = derive), got {}", p.dp());
  LOOM_CHECK_CONFIG(p.expert_tp() >= 0,
                    "field 'parallel.expert_tp' must be >= 0 (0 = same as tp), got {}",
                    p.expert_tp());
  LOOM_CHECK_CONFIG(p.vocab_divisible_by() >= 1,
                    "field 'parallel.vocab_divisible_by' must be >= 1, got {}",
                    p.vocab_divisible_by());
  LOOM_CHECK_CONFIG(p.grad_bucket_mb() > 0, "field 'parallel.grad_bucket_mb' must be > 0, got {}",
                    p.grad_bucket_mb());
  // Packed documents give each step its own number of micro-batches; the interleaved schedule's
  // constraints on that number (at least pp, whole groups) cannot be promised.
  const bool interleaved =
      p.pp_schedule() == "interleaved" || (p.pp_schedule().empty() && p.virtual_pp() > 1);
  LOOM_CHECK_CONFIG(c.data().mode() != DataConfig::DOCUMENTS || p.pp() == 1 || !interleaved,
                    "data.mode DOCUMENTS packs a varying number of micro-batches per step, which "
                    "parallel.pp_schedule = interleaved cannot take; use 1f1b, afab or zb-h1");
  LOOM_CHECK_CONFIG(c.optim().clip_grad() >= 0, "field 'optim.clip_grad' must be >= 0, got {}",
                    c.optim().clip_grad());
  LOOM_CHECK_CONFIG(c.comm().timeout_s() > 0, "field 'comm.timeout_s' must be > 0, got {}",
                    c.comm().timeout_s());
  LOOM_CHECK_CONFIG(c.comm().long_timeout_s() > 0,
                    "field 'comm.long_timeout_s' must be > 0, got {}", c.comm().long_timeout_s());
  // The train section (the model's context bounds train.seq_len).
  {
    const auto& t = c.train();
    const int64_t max_seq_len = c.model().max_seq_len();
    LOOM_CHECK_CONFIG(t.steps() >= 1, "field 'train.steps' must be >= 1, got {}", t.steps());
    LOOM_CHECK_CONFIG(t.seq_len() >= 1 && (t.seq_len() <= max_seq_len || max_seq_len < 1),
                      "field 'train.seq_len' must be in [1, model.max_seq_len = {}], got {}",
                      max_seq_len, t.seq_len());
    LOOM_CHECK_CONFIG(t.micro_batch_size() >= 1,
                      "field 'train.micro_batch_size' must be >= 1, got {}", t.micro_batch_size());
    LOOM_CHECK_CONFIG(
        t.global_batch_size() >= 0,
        "field 'train.global_batch_size' must be >= 0 (0 = micro_batch_size x dp), got {}",
        t.global_batch_size());
    LOOM_CHECK_CONFIG(t.log_every() >= 1, "field 'train.log_every' must be >= 1, got {}",
                      t.log_every());
    LOOM_CHECK_CONFIG(t.eval_every() >= 0 && t.save_every() >= 0,
                      "fields 'train.eval_every' ({}) and 'train.save_every' ({}) must be >= 0",
                      t.eval_every(), t.save_every());
    LOOM_CHECK_CONFIG(t.eval_batches() >= 1, "field 'train.eval_batches' must be >= 1, got {}",
                      t.eval_batches());
    LOOM_CHECK_CONFIG(t.keep_checkpoints() >= 0,
                      "field 'train.keep_checkpoints' must be >= 0, got {}", t.keep_checkpoints());
    LOOM_CHECK_CONFIG(t.peak_tflops() >= 0, "field 'train.peak_tflops' must be >= 0, got {}",
                      t.peak_tflops());
    LOOM_CHECK_CONFIG(t.num_threads() >= 0, "field 'train.num_threads' must be >= 0, got {}",
                      t.num_threads());
    for (const auto& path : t.allow_config_changes()) {
      try {
        resolve_path(JobConfig::descriptor(), path);
      } catch (const Error& e) {
        LOOM_THROW(ErrorKind::kConfig, "field 'train.allow_config_changes': {}", e.message());
      }
    }
    LOOM_CHECK_CONFIG(t.progress() == "auto" || t.progress() == "bar" || t.progress() == "lines" ||
                          t.progress() == "off",
                      "field 'train.progress' must be auto, bar, lines or off, got '{}'",
                      t.progress());
  }
  try {
    log::parse_level(c.logging().level());
  } catch (const Error& e) {
    LOOM_THROW(ErrorKind::kConfig, "field 'logging.level': {}", e.message());
  }
  const auto& l = c.logging();
  const auto traced = trace::parse_steps(l.trace_steps(), "logging.trace_steps");
  LOOM_CHECK_CONFIG(!traced || traced->second <= c.train().steps(),
                    "field 'logging.trace_steps' is '{}', but the run ends at step {} "
                    "(train.steps)",
                    l.trace_steps(), c.train().steps());
  LOOM_CHECK_CONFIG(l.straggler_every() >= 0,
                    "field 'logging.straggler_every' must be >= 0, got {}", l.straggler_every());
  LOOM_CHECK_CONFIG(
      l.straggler_factor() > 1.0,
      "field 'logging.straggler_factor' must be > 1 (a multiple of the median), got {}",
      l.straggler_factor());
}

std::vector<FieldChange> differences(const pb::Message& before, const pb::Message& after,
                                     const std::vector<std::string>& paths,
                                     const std::vector<std::string>& except) {
  LOOM_CHECK(before.GetDescriptor() == after.GetDescriptor(),
             "differences of two different message types");
  std::vector<FieldChange> out;
  for (const auto& path : paths) {
    const auto fields = resolve_path(before.GetDescriptor(), path);
    const pb::Message *a = &before, *b = &after;
    for (size_t k = 0; k + 1 < fields.size(); ++k) {
      a = &a->GetReflection()->GetMessage(*a, fields[k]);
      b = &b->GetReflection()->GetMessage(*b, fields[k]);
    }
    diff_field(*a, *b, fields.back(), path, except, &out);
  }
  return out;
}

bool change_allowed(const JobConfig& job, const std::string& path) {
  const auto& a = job.train().allow_config_changes();
  return under(path, std::vector<std::string>(a.begin(), a.end()));
}

void check_resume_config(const JobConfig& saved, const JobConfig& now,
                         const std::string& checkpoint) {
  // The schedule's horizon (optim.decay_steps 0) and the data's epoch count follow train.steps.
  static const std::vector<std::string> kChecked = {"seed",
                                                    "model",
                                                    "optim",
                                                    "data.source",
                                                    "data.synthetic_branching",
                                                    "data.synthetic_sources",
                                                    "data.seed",
                                                    "data.paths",
                                                    "data.weights",
                                                    "data.split",
                                                    "data.mode",
                                                    "data.outlier_tokens",
                                                    "data.outlier_delay",
                                                    "data.outlier_batch",
                                                    "train.seq_len",
                                                    "train.global_batch_size",
                                                    "train.micro_batch_tokens",
                                                    "train.steps"};
  std::vector<std::string> allowed = {"model.recompute", "model.init_std",
                                      "model.scaled_output_init", "model.moe.router_init_std"};
  for (const auto& a : now.train().allow_config_changes()) allowed.push_back(a);
  const auto changes = differences(saved, now, kChecked, allowed);
  if (changes.empty()) return;
  std::string list;
  for (const auto& c : changes) {
    list += fmt::format("\n  {}: {} in the checkpoint, {} now", c.path, c.before, c.after);
  }
  LOOM_THROW(ErrorKind::kConfig,
             "checkpoint '{}' was written with another config; resuming would silently change "
             "{} field(s):{}\nResume with the checkpoint's values, or list the fields changed on "
             "purpose in train.allow_config_changes (e.g. --set train.allow_config_changes={})",
             checkpoint, changes.size(), list, changes.front().path);
}

}  // namespace loom::config
