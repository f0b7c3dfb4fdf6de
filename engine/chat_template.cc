// Chat prompt formatting without a Jinja engine: the GGUF's tokenizer.chat_template is
// recognised by its markers (as llama.cpp's llm_chat_detect_template does) and rendered
// natively. What the Jinja would add beyond the bare format is read from the template text:
// SmolLM2's and Qwen2's templates insert a default system turn when the conversation has
// none, and we extract that literal rather than hard-coding it.
//
// BOS: templates never render it. Llama 3's Jinja starts with {{ bos_token }}; we leave it
// out and the caller tokenizes the prompt with Tokenizer::add_bos_default() (true for Llama 3
// vocabularies), so BOS comes from exactly one place, as in llama.cpp's server.
#include "engine/chat_template.h"

#include <cctype>
#include <string_view>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace ctxcache {
namespace {

bool Contains(std::string_view text, std::string_view what) {
  return text.find(what) != std::string_view::npos;
}

// Undoes the escapes of a Jinja string literal (\n, \t, \', \", \\).
std::string UnescapeJinja(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out.push_back(s[i]);
      continue;
    }
    const char c = s[++i];
    out.push_back(c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c);
  }
  return out;
}

// The literal system prompt of a ChatML template's "no system message" branch, e.g. SmolLM2's
//   {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n' }}
// Empty when the template has none (the system header is only followed by message content).
std::string ExtractDefaultSystem(std::string_view tmpl) {
  static constexpr std::string_view kHeader = "<|im_start|>system";
  for (size_t pos = tmpl.find(kHeader); pos != std::string_view::npos;
       pos = tmpl.find(kHeader, pos + 1)) {
    size_t begin = pos + kHeader.size();
    // The newline after the role: a real one, or an escaped one inside the Jinja literal.
    if (tmpl.substr(begin, 1) == "\n") {
      begin += 1;
    } else if (tmpl.substr(begin, 2) == "\\n") {
      begin += 2;
    } else {
      continue;
    }
    const size_t end = tmpl.find("<|im_end|>", begin);
    if (end == std::string_view::npos) continue;
    const std::string_view body = tmpl.substr(begin, end - begin);
    // It must sit in a string literal ('...' or "...") that runs on to <|im_end|> without
    // closing or entering an expression.
    const size_t q = tmpl.find_last_of("'\"", pos);
    if (q == std::string_view::npos || body.empty()) continue;
    const char quote = tmpl[q];
    bool literal = !Contains(body, "{{") && !Contains(body, "{%");
    for (size_t i = 0; literal && i < body.size(); ++i) {
      if (body[i] == '\\') {
        ++i;
      } else if (body[i] == quote) {
        literal = false;
      }
    }
    if (literal) return UnescapeJinja(body);
  }
  return {};
}

constexpr const char* kRoles[] = {"system", "user", "assistant"};

// llama.cpp trims Llama 3 message content (the Jinja does `| trim`): C isspace at both ends.
std::string_view Trim(std::string_view s) {
  auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

absl::Span<const char* const> ChatRoles() { return kRoles; }

bool IsChatRole(std::string_view role) {
  for (const char* r : kRoles) {
    if (role == r) return true;
  }
  return false;
}

absl::StatusOr<ChatTemplate> DetectChatTemplate(const std::string& template_text, bool allow_raw) {
  ChatTemplate t;
  const std::string_view s = template_text;
  if (s == "chatml") {
    t.kind = ChatTemplateKind::kChatML;
    return t;
  }
  if (s == "llama3") {
    t.kind = ChatTemplateKind::kLlama3;
    return t;
  }
  if (Contains(s, "<|im_start|>")) {
    // Same exclusions as llama.cpp: these use <|im_start|> but are not ChatML.
    if (Contains(s, "<|im_sep|>") || Contains(s, "<end_of_utterance>")) {
      if (allow_raw) return ChatTemplate{};
      return absl::InvalidArgumentError(
          "chat template uses <|im_start|> with <|im_sep|> (Phi-4) or <end_of_utterance> "
          "(SmolVLM); only plain ChatML and Llama 3 templates are supported");
    }
    t.kind = ChatTemplateKind::kChatML;
    t.default_system = ExtractDefaultSystem(s);
    return t;
  }
  if (Contains(s, "<|start_header_id|>") && Contains(s, "<|end_header_id|>")) {
    t.kind = ChatTemplateKind::kLlama3;
    return t;
  }
  if (allow_raw) return ChatTemplate{};
  if (s.empty()) {
    return absl::InvalidArgumentError(
        "the model has no chat template (tokenizer.chat_template is empty or missing)");
  }
  const std::string start(s.substr(0, 80));
  return absl::InvalidArgumentError(
      absl::StrCat("unrecognised chat template (supported: ChatML, Llama 3); it starts with \"",
                   absl::CHexEscape(start), s.size() > start.size() ? "..." : "", "\""));
}

absl::StatusOr<std::string> ApplyChatTemplate(const ChatTemplate& tmpl,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt,
                                              std::vector<Tokenizer::Span>* contents) {
  if (messages.empty()) return absl::InvalidArgumentError("no messages to format");
  for (size_t i = 0; i < messages.size(); ++i) {
    if (!IsChatRole(messages[i].role)) {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, " has role '",
                                                     absl::CHexEscape(messages[i].role),
                                                     "'; expected system, user or assistant"));
    }
  }
  std::string out;
  std::vector<Tokenizer::Span> spans;
  auto append_content = [&](std::string_view content) {
    if (!content.empty()) spans.push_back({out.size(), out.size() + content.size()});
    out.append(content.data(), content.size());
  };
  auto done = [&]() -> absl::StatusOr<std::string> {
    if (contents != nullptr) *contents = std::move(spans);
    return out;
  };
  switch (tmpl.kind) {
    case ChatTemplateKind::kChatML:
      if (!tmpl.default_system.empty() && messages.front().role != "system") {
        absl::StrAppend(&out, "<|im_start|>system\n", tmpl.default_system, "<|im_end|>\n");
      }
      for (const ChatMessage& m : messages) {
        absl::StrAppend(&out, "<|im_start|>", m.role, "\n");
        append_content(m.content);
        out += "<|im_end|>\n";
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      return done();
    case ChatTemplateKind::kLlama3:
      for (const ChatMessage& m : messages) {
        const std::string_view content = Trim(m.content);
        absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n");
        append_content(content);
        out += "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return done();
    case ChatTemplateKind::kRaw: {
      std::vector<std::string_view> parts;
      for (const ChatMessage& m : messages) parts.push_back(m.content);
      for (size_t i = 0; i < parts.size(); ++i) {
        if (i > 0) out += '\n';
        append_content(parts[i]);
      }
      return done();
    }
  }
  return absl::InternalError("unknown chat template kind");
}

}  // namespace ctxcache
