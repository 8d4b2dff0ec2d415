// loom_spm: the SentencePiece worker process. Linked against libsentencepiece alone (never libloom):
// Debian's libsentencepiece carries protobuf 3.14 generated code that aborts in a process that also
// loads the system libprotobuf 3.21, which libloom needs for its config. libloom's
// SentencePieceTokenizer starts one of these per concurrent caller and talks to it over a socket.
//
//   loom_spm serve MODEL   (stdin = stdout = the socket; the protocol below)
//   loom_spm train ARGS    (SentencePieceTrainer::Train with one flag string; exit status 0 or 1)
//
// Protocol, little-endian. On start the worker writes "LSPM" u32 version(1) i32 vocab i32 eos i32 bos
// i32 unk, or "LSPE" u32 len + message when the model does not load. Then requests:
//   'E' u32 len + text bytes            -> u32 0, u32 n, n x i32 ids   | u32 1, u32 len, message
//   'D' u32 n + n x i32 ids             -> u32 0, u32 len, text bytes   | u32 1, u32 len, message
// End of input ends the worker.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

bool read_all(void* buf, size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::read(0, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void write_all(const void* buf, size_t n) {
  const auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t w = ::write(1, p, n);
    if (w <= 0) _exit(3);  // the parent went away
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void put_u32(std::string* out, uint32_t v) { out->append(reinterpret_cast<const char*>(&v), 4); }

void reply_error(const std::string& message) {
  std::string out;
  put_u32(&out, 1);
  put_u32(&out, static_cast<uint32_t>(message.size()));
  out += message;
  write_all(out.data(), out.size());
}

int serve(const char* model) {
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.Load(model);
  std::string out;
  if (!status.ok()) {
    const std::string msg = status.ToString();
    out = "LSPE";
    put_u32(&out, static_cast<uint32_t>(msg.size()));
    out += msg;
    write_all(out.data(), out.size());
    return 1;
  }
  out = "LSPM";
  put_u32(&out, 1);
  for (int v : {sp.GetPieceSize(), sp.eos_id(), sp.bos_id(), sp.unk_id()}) put_u32(&out, static_cast<uint32_t>(v));
  write_all(out.data(), out.size());
  std::string text;
  std::vector<int> ids;
  for (;;) {
    char op = 0;
    uint32_t n = 0;
    if (!read_all(&op, 1) || !read_all(&n, 4)) return 0;  // the parent closed the socket
    if (op == 'E') {
      text.resize(n);
      if (n > 0 && !read_all(&text[0], n)) return 0;
      ids.clear();
      const auto st = sp.Encode(text, &ids);
      if (!st.ok()) {
        reply_error(st.ToString());
        continue;
      }
      out.clear();
      put_u32(&out, 0);
      put_u32(&out, static_cast<uint32_t>(ids.size()));
      out.append(reinterpret_cast<const char*>(ids.data()), ids.size() * 4);
      write_all(out.data(), out.size());
    } else if (op == 'D') {
      ids.resize(n);
      if (n > 0 && !read_all(ids.data(), static_cast<size_t>(n) * 4)) return 0;
      text.clear();
      const auto st = sp.Decode(ids, &text);
      if (!st.ok()) {
        reply_error(st.ToString());
        continue;
      }
      out.clear();
      put_u32(&out, 0);
      put_u32(&out, static_cast<uint32_t>(text.size()));
      out += text;
      write_all(out.data(), out.size());
    } else {
      std::fprintf(stderr, "loom_spm: unknown request 0x%02x\n", static_cast<unsigned char>(op));
      return 2;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "serve") == 0) return serve(argv[2]);
  if (argc == 3 && std::strcmp(argv[1], "train") == 0) {
    const auto status = sentencepiece::SentencePieceTrainer::Train(argv[2]);
    if (!status.ok()) {
      std::fprintf(stderr, "%s\n", status.ToString().c_str());
      return 1;
    }
    return 0;
  }
  std::fprintf(stderr,
               "usage: loom_spm serve MODEL | loom_spm train 'FLAGS'\n"
               "(a worker of libloom's SentencePiece tokenizer; see tools/loom_spm.cpp)\n");
  return 2;
}
