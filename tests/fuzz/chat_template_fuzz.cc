// Fuzz target for chat templates (engine/chat_template.h): recognising a GGUF's template text
// (from the model file) and rendering messages (from the client) with each built-in format.
// Invariants: detection is consistent between its strict and lenient modes and a default
// system prompt only comes from a ChatML system header in the text; rendering equals a
// reference renderer written from the formats' definitions, and refuses exactly the inputs
// it must (no messages, an unknown role).
//
// Input: fields separated by NUL. Field 0: a flags byte (bit 0 add_generation_prompt) then
// the template text. Each further field is a message: its first byte picks the role (system,
// user, assistant, or an unknown one), the rest is the content.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/chat_template.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using ctxcache::ChatMessage;
using ctxcache::ChatTemplate;
using ctxcache::ChatTemplateKind;

std::string_view TrimCSpace(std::string_view s) {
  constexpr std::string_view kSpace = " \t\n\v\f\r";
  const size_t b = s.find_first_not_of(kSpace);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(kSpace) - b + 1);
}

// The formats as documented: ChatML's <|im_start|>role\n...<|im_end|>\n turns (after the
// template's default system turn when the conversation opens without one), Llama 3's header
// blocks with trimmed content, and raw contents joined by newlines.
std::string Reference(const ChatTemplate& t, const std::vector<ChatMessage>& msgs, bool gen) {
  std::string out;
  switch (t.kind) {
    case ChatTemplateKind::kChatML:
      if (!t.default_system.empty() && msgs[0].role != "system") {
        out += "<|im_start|>system\n" + t.default_system + "<|im_end|>\n";
      }
      for (const auto& m : msgs) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (gen) out += "<|im_start|>assistant\n";
      break;
    case ChatTemplateKind::kLlama3:
      for (const auto& m : msgs) {
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" +
               std::string(TrimCSpace(m.content)) + "<|eot_id|>";
      }
      if (gen) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatTemplateKind::kRaw:
      for (size_t i = 0; i < msgs.size(); ++i) out += (i ? "\n" : "") + msgs[i].content;
      break;
  }
  return out;
}

void CheckRender(const ChatTemplate& t, const std::vector<ChatMessage>& msgs, bool gen) {
  const auto got = ctxcache::ApplyChatTemplate(t, msgs, gen);
  bool known = !msgs.empty();
  for (const auto& m : msgs) {
    known = known && (m.role == "system" || m.role == "user" || m.role == "assistant");
  }
  if (!known) {
    FUZZ_CHECK(!got.ok() && got.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  FUZZ_CHECK(got.ok());
  FUZZ_CHECK(*got == Reference(t, msgs, gen));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string_view> fields = ctxcache::fuzz::SplitFields(data, size);
  const bool gen = !fields[0].empty() && (fields[0][0] & 1);
  const std::string text(fields[0].empty() ? fields[0] : fields[0].substr(1));

  const auto lenient = ctxcache::DetectChatTemplate(text, /*allow_raw=*/true);
  const auto strict = ctxcache::DetectChatTemplate(text, /*allow_raw=*/false);
  FUZZ_CHECK(lenient.ok());
  if (strict.ok()) {
    FUZZ_CHECK(strict->kind != ChatTemplateKind::kRaw);
    FUZZ_CHECK(strict->kind == lenient->kind && strict->default_system == lenient->default_system);
  } else {
    FUZZ_CHECK(strict.status().code() == absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(lenient->kind == ChatTemplateKind::kRaw);
  }
  if (!lenient->default_system.empty()) {
    FUZZ_CHECK(lenient->kind == ChatTemplateKind::kChatML);
    FUZZ_CHECK(text.find("<|im_start|>system") != std::string::npos);
  }

  std::vector<ChatMessage> msgs;
  static const char* const kRoles[] = {"system", "user", "assistant", "tool", "User", ""};
  for (size_t i = 1; i < fields.size(); ++i) {
    const std::string_view f = fields[i];
    ChatMessage m;
    m.role = f.empty() ? "user" : kRoles[static_cast<uint8_t>(f[0]) % 6];
    if (!f.empty()) m.content = std::string(f.substr(1));
    msgs.push_back(std::move(m));
  }
  CheckRender(*lenient, msgs, gen);
  ChatTemplate chatml{ChatTemplateKind::kChatML, ""}, llama3{ChatTemplateKind::kLlama3, ""};
  ChatTemplate raw{ChatTemplateKind::kRaw, ""};
  ChatTemplate with_system{ChatTemplateKind::kChatML, "You are a helpful assistant."};
  for (const ChatTemplate& t : {chatml, llama3, raw, with_system}) CheckRender(t, msgs, gen);
  return 0;
}
