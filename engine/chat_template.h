// Chat prompt formatting. We do not run Jinja: the GGUF's tokenizer.chat_template is
// recognised as one of the known families by its markers, and formatted natively.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ctxcache {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

enum class ChatTemplateKind { kChatML, kLlama3, kRaw };

struct ChatTemplate {
  ChatTemplateKind kind = ChatTemplateKind::kRaw;
  // System prompt inserted when the conversation has none (SmolLM2's template has one).
  std::string default_system;
};

// Recognises a template string (tokenizer.chat_template). Unknown or empty templates are an
// InvalidArgument error naming the template's start, unless allow_raw, which yields kRaw
// (messages' contents joined by newlines).
absl::StatusOr<ChatTemplate> DetectChatTemplate(const std::string& template_text, bool allow_raw);

// Renders messages; with add_generation_prompt, ends with the assistant turn header.
// InvalidArgument on an unknown role or an empty message list.
absl::StatusOr<std::string> ApplyChatTemplate(const ChatTemplate& tmpl,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt);

}  // namespace ctxcache
