// Request parsing that names the field instead of failing the call (see wire.h).
#include "server/wire.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/dynamic_message.h>
#include <google/protobuf/stubs/logging.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/unicode.h"
#include "server/handlers.h"

namespace ctxcache::server {
namespace {

namespace gpb = ::google::protobuf;

// Copies of the request types in their own pool with every `string` field made `bytes`: the
// same wire format, parsed without the UTF-8 check, so that the field can be found and named.
class BytesTwins {
 public:
  static BytesTwins& Get() {
    static BytesTwins* twins = new BytesTwins();  // never destroyed: used from gRPC threads
    return *twins;
  }

  // The twin of `type`; null if it cannot be built (then the caller names no field).
  const gpb::Descriptor* Twin(const gpb::Descriptor* type) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!AddFile(type->file())) return nullptr;
    return pool_.FindMessageTypeByName(type->full_name());
  }
  gpb::MessageFactory* factory() { return &factory_; }

 private:
  bool AddFile(const gpb::FileDescriptor* file) {
    if (pool_.FindFileByName(file->name()) != nullptr) return true;
    for (int i = 0; i < file->dependency_count(); ++i) {
      if (!AddFile(file->dependency(i))) return false;
    }
    gpb::FileDescriptorProto proto;
    file->CopyTo(&proto);
    for (gpb::DescriptorProto& m : *proto.mutable_message_type()) StringsToBytes(&m);
    return pool_.BuildFile(proto) != nullptr;
  }
  static void StringsToBytes(gpb::DescriptorProto* m) {
    for (gpb::FieldDescriptorProto& f : *m->mutable_field()) {
      if (f.type() == gpb::FieldDescriptorProto::TYPE_STRING) {
        f.set_type(gpb::FieldDescriptorProto::TYPE_BYTES);
      }
    }
    for (gpb::DescriptorProto& n : *m->mutable_nested_type()) StringsToBytes(&n);
  }

  std::mutex mu_;
  gpb::DescriptorPool pool_;
  gpb::DynamicMessageFactory factory_{&pool_};
};

// The first field of `twin` (a BytesTwins message) that is a `string` in `original` and does
// not hold UTF-8: its path ("chat.messages[1].role") and the offset of its first bad byte.
bool FindBadString(const gpb::Message& twin, const gpb::Descriptor* original,
                   const std::string& prefix, std::string* path, size_t* offset) {
  const gpb::Reflection* r = twin.GetReflection();
  std::vector<const gpb::FieldDescriptor*> fields;
  r->ListFields(twin, &fields);
  for (const gpb::FieldDescriptor* f : fields) {
    const gpb::FieldDescriptor* of = original->FindFieldByNumber(f->number());
    if (of == nullptr) continue;
    const std::string name = absl::StrCat(prefix, prefix.empty() ? "" : ".", f->name());
    const int n = f->is_repeated() ? r->FieldSize(twin, f) : 1;
    for (int i = 0; i < n; ++i) {
      const std::string at = f->is_repeated() ? absl::StrCat(name, "[", i, "]") : name;
      if (of->type() == gpb::FieldDescriptor::TYPE_STRING) {
        std::string scratch;
        const std::string& v = f->is_repeated()
                                   ? r->GetRepeatedStringReference(twin, f, i, &scratch)
                                   : r->GetStringReference(twin, f, &scratch);
        if (std::optional<size_t> bad = unicode::FirstInvalidUtf8(v)) {
          *path = at;
          *offset = *bad;
          return true;
        }
      } else if (f->cpp_type() == gpb::FieldDescriptor::CPPTYPE_MESSAGE) {
        const gpb::Message& sub =
            f->is_repeated() ? r->GetRepeatedMessage(twin, f, i) : r->GetMessage(twin, f);
        if (FindBadString(sub, of->message_type(), at, path, offset)) return true;
      }
    }
  }
  return false;
}

bool Parse(grpc::ByteBuffer* buffer, gpb::Message* msg) {
  grpc::ProtoBufferReader reader(buffer);
  return reader.status().ok() && msg->ParseFromZeroCopyStream(&reader);
}

}  // namespace

absl::Status ParseRequest(grpc::ByteBuffer* buffer, gpb::Message* msg) {
  if (buffer == nullptr || !buffer->Valid()) {
    return absl::InvalidArgumentError("the call carried no request message");
  }
  if (Parse(buffer, msg)) {
    buffer->Clear();
    return absl::OkStatus();
  }
  msg->Clear();
  const gpb::Descriptor* type = msg->GetDescriptor();
  const std::string malformed = absl::StrCat(
      "the request is not a valid ", type->full_name(),
      " message (malformed protobuf encoding): check that the client uses this server's "
      "ctxcache.proto");
  const gpb::Descriptor* twin_type = BytesTwins::Get().Twin(type);
  if (twin_type == nullptr) {
    buffer->Clear();
    return absl::InvalidArgumentError(malformed);
  }
  std::unique_ptr<gpb::Message> twin(BytesTwins::Get().factory()->GetPrototype(twin_type)->New());
  const bool parsed = Parse(buffer, twin.get());
  buffer->Clear();
  std::string path;
  size_t offset = 0;
  if (parsed && FindBadString(*twin, type, "", &path, &offset)) {
    return absl::InvalidArgumentError(absl::StrCat(path,
                                                   " is not valid UTF-8 (first bad byte at offset ",
                                                   offset, "); string fields must hold UTF-8"));
  }
  return absl::InvalidArgumentError(malformed);
}

void InstallProtobufLogHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    gpb::SetLogHandler(
        [](gpb::LogLevel level, const char* file, int line, const std::string& message) {
          // Reported to the client as INVALID_ARGUMENT and logged with the call: no second line.
          if (absl::StrContains(message, "invalid UTF-8 data when parsing")) {
            spdlog::debug("libprotobuf: {}", message);
            return;
          }
          if (level == gpb::LOGLEVEL_FATAL) {
            spdlog::critical("libprotobuf {}:{}: {}", file, line, message);
            return;
          }
          // Anything else a client can trigger must not flood the log: one line per 10 s.
          using Clock = std::chrono::steady_clock;
          static std::atomic<int64_t> next_ns{0};
          static std::atomic<int64_t> suppressed{0};
          const int64_t now =
              std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
                  .count();
          int64_t next = next_ns.load();
          if (now < next || !next_ns.compare_exchange_strong(next, now + int64_t{10'000'000'000})) {
            suppressed.fetch_add(1);
            return;
          }
          const int64_t left_out = suppressed.exchange(0);
          spdlog::warn("libprotobuf {}:{}: {}{}", file, line, message,
                       left_out > 0 ? absl::StrCat(" (", left_out, " more in the last 10 s)") : "");
        });
  });
}

}  // namespace ctxcache::server
