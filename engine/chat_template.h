// Chat prompt formatting. We do not run Jinja: the GGUF's tokenizer.chat_template is
// recognised as one of the known families by its markers, and formatted natively.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/tokenizer.h"

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

// The roles every supported template renders: system, user, assistant.
absl::Span<const char* const> ChatRoles();
bool IsChatRole(std::string_view role);

// Renders messages; with add_generation_prompt, ends with the assistant turn header.
// InvalidArgument on an unknown role or an empty message list. `contents` (optional) receives
// where each non-empty message content lies in the result, in order: text the caller must
// tokenize as plain text (Tokenizer::EncodeWithLiterals), since the template's markers around
// it are the only special tokens a prompt may hold.
absl::StatusOr<std::string> ApplyChatTemplate(const ChatTemplate& tmpl,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt,
                                              std::vector<Tokenizer::Span>* contents = nullptr);

}  // namespace ctxcache
