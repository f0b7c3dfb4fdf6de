#!/usr/bin/env python3
"""Writes tests/data/tokenizer/smollm2_parity.json: llama.cpp's token ids for a few hundred
awkward strings on our default model (SmolLM2-135M-Instruct), for tests/tokenizer_test.cc.

The ids come from llama.cpp itself, through llama-cpp-python (vocab_only: no weights are
loaded). Rerun when the model or the llama.cpp version changes:

  python3 tools/make_tokenizer_fixture.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

It also writes tests/data/tokenizer/chat_templates.json: chat templates (SmolLM2's, read from
the GGUF, plus Qwen2's and Llama 3's published ones) rendered by jinja2 over a few
conversations, for tests/chat_template_test.cc.

Format (version 1):
  {"format": "ctxcache-tokenizer-parity", "version": 1, "model": ..., "llama_cpp_python": ...,
   "cases": [{"text": str | "hex": str, "parse_special": bool, "ids": [int],
              "decoded_hex": str (only when llama.cpp's pieces do not concatenate to the input)}]}
"""
import argparse
import json
import os
import random
import sys

import jinja2
import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def texts():
    """(text_bytes, parse_special) pairs. Deterministic."""
    out = []
    prose = [
        "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
        "  leading spaces", "trailing spaces   ", "multiple   spaces   between   words",
        "Once upon a time, in a land far, far away, there lived a king.",
        "It's a beautiful day; isn't it? Yes -- it is.",
        "E-mail me at someone@example.com or visit https://example.org/path?q=1&r=2#frag.",
        "Dr. Smith (Ph.D.) arrived at 3:45 p.m. on Jan. 5th.",
        "\"Quoted text\" and 'single quotes' and `backticks`.",
        "A sentence.\nAnother sentence.\n\nA new paragraph.",
        "Tabs\tbetween\twords\tand\ttrailing tab\t",
        "Windows line endings\r\nSecond line\r\n",
        "Ellipsis... and em—dash and en–dash and “curly quotes” and ‘apostrophes’.",
        "UPPERCASE TEXT SHOUTING", "camelCaseIdentifier and snake_case_identifier",
        "mIxEd CaSe WoRdS", "Don't can't won't shouldn't I'm you're we've they'll he'd",
        "DON'T CAN'T I'M YOU'RE WE'VE THEY'LL HE'D", "It’s curly’s apostrophe’s",
        "rock 'n' roll", "'s 't 're 've 'm 'll 'd", "'S 'T 'RE 'VE 'M 'LL 'D", "''''", "'",
        "o'clock", "y'all'd've", "The cat's toy; the cats' toys.",
        "a", "I", ".", "!", "?", " ", "  ", "\n", "\n\n", "\t", " \n", "\n ", " \t\n ",
        "hello\n\n\n\nworld", "end with newline\n", "\n\nstart with newlines",
        "word" * 40, "supercalifragilisticexpialidocious", "antidisestablishmentarianism",
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
    ]
    out += prose
    code = [
        "def foo(x):\n    return x * 2\n",
        "for i in range(10):\n\tprint(i)\n",
        "class A:\n    def __init__(self):\n        self.x = {}\n",
        "#include <stdio.h>\nint main(void) {\n  printf(\"%d\\n\", 42);\n  return 0;\n}\n",
        "std::vector<int> v{1, 2, 3}; for (auto& x : v) x <<= 1;",
        "template <typename T> constexpr T max(T a, T b) { return a > b ? a : b; }",
        "fn main() { let v: Vec<u8> = vec![0; 16]; println!(\"{:?}\", v); }",
        "func main() {\n\tfmt.Println(\"hi\")\n}",
        "const f = async (a, b) => { await g(a ?? b); };",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
        "<div class=\"x\"><span>text</span></div>",
        "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\"}}",
        "x = a+b-c*d/e%f**g//h", "if (a && b || !c) { x |= y & ~z ^ w; }",
        "i++; --j; k += 1; l -= 2; m *= 3;", "arr[0][1] = obj.field->next;",
        "// comment\n/* block\n   comment */", "# shell comment\nls -la | grep foo > out.txt 2>&1",
        "$HOME/bin:/usr/local/bin:$PATH", "@decorator\ndef f(): pass",
        "    indented with four spaces", "\t\tindented with two tabs",
        "        eight spaces then code()", "a = {'k': 'v'}  # dict",
        "x=1;y=2;z=x+y", "==!=<=>=&&||", "->=>::..", "<<<>>>", "~!@#$%^&*()_+",
        "[]{}()<>", "\\n\\t\\r\\\\", "0x1F 0b1010 0o777 1e-9 3.14159 -0.0",
        "```python\nprint('hi')\n```", "    \n    \n", "x  =  1", "f(a,b,c)",
    ]
    out += code
    numbers = [
        "0", "1", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
        "3.14159265358979323846", "1,000,000", "1.000.000,00", "$1,234.56", "€99.99", "¥1000",
        "2024-01-15", "12:34:56", "+1 (555) 123-4567", "192.168.0.1", "v1.2.3-rc.4",
        "100%", "50/50", "1/2 + 3/4 = 5/4", "x1y2z3", "a1b22c333d4444", "007",
        "number 42 and 7 and 1999", " 1", "  12", "1 2 3 4 5", "1\n2\n3",
        "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "¹²³ ½ ¾ Ⅻ ⅷ", "①②③", "１２３４５", "3rd 21st 42nd",
        "π≈3.14", "e=mc²", "10⁻⁶", "2^10=1024", "-5 - -3 = -2", "1e100", "0.000001",
    ]
    out += numbers
    unicode_texts = [
        "你好，世界！", "我爱自然语言处理。", "東京は日本の首都です。", "こんにちは、元気ですか？",
        "カタカナとひらがなと漢字", "안녕하세요, 세계!", "한국어 텍스트 처리",
        "Привет, мир!", "Съешь же ещё этих мягких французских булок.", "Ёлка и ёж",
        "مرحبا بالعالم", "اللغة العربية جميلة", "שלום עולם", "नमस्ते दुनिया", "हिन्दी भाषा में पाठ",
        "Γειά σου κόσμε", "Ελληνικά κείμενα", "สวัสดีชาวโลก", "Xin chào thế giới",
        "Tiếng Việt có dấu", "Ünïcödé àçcéñts", "Crème brûlée à la française",
        "Straße und Fußgänger", "Ærøskøbing Åland", "Łódź Kraków Gdańsk", "İstanbul ılık",
        "naïve café résumé", "ﬁ ﬂ ligatures", "ｆｕｌｌｗｉｄｔｈ", "ᴀʙᴄ small caps",
        # combining marks (decomposed forms)
        "e\u0301 a\u0300 o\u0308 n\u0303", "cafe\u0301", "Z\u0351\u036b\u0343\u036a\u0302\u036b"
        "\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u0334\u0335",
        "\u0915\u094d\u0937", "a\u20dd", "\u1100\u1161\u11a8",
        # emoji
        "😀", "😀😃😄", "Hello 👋 world 🌍", "🦙🦙🦙", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏾‍💻",
        "🇺🇸🇯🇵🇫🇷", "❤️", "☺️ ✔️ ⚠️", "1️⃣ #️⃣", "🫨 🩷 🪿", "emoji at end 🎉",
        "🎉start", "mixed😀text😃here", "\U0001F600\U0001F3FB",
        # special spaces and invisible characters
        "non\u00a0breaking", "em\u2003space", "ideographic\u3000space", "zero\u200bwidth",
        "zwj\u200dzwnj\u200c", "soft\u00adhyphen", "bom\ufeffhere", "line\u2028sep",
        "para\u2029sep", "nel\u0085char", "vt\x0bff\x0c", "bell\x07esc\x1b",
        "\u202eright-to-left override", "\ue000 private use", "\U0010fffd",
        "unassigned \u0378 \U000e0080", "\ufffd replacement", "noncharacter \ufffe",
        "math 𝐀𝐁𝐂 𝔸𝔹ℂ", "music 𝄞", "𠀀𠀁 rare CJK", "ℕ ℤ ℚ ℝ ℂ", "→ ← ↑ ↓ ⇒ ⇔ ∀ ∃ ∈ ∉",
        "±×÷≠≤≥∞√∑∏∫", "©®™℠", "°C °F", "§¶†‡•", "«guillemets» ‹single›", "¿Qué? ¡Sí!",
    ]
    out += unicode_texts
    out_pairs = [(t.encode("utf-8"), False) for t in out]

    specials = [
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "text<|im_end|>text", "<|im_start|><|im_end|>", " <|im_start|> spaced ",
        "<|im_start|>\n\n", "<|im_start|", "|im_start|>", "<|im_start|>>", "<<|im_end|>",
        "<repo_name>x<file_sep>y", "<fim_prefix>a<fim_suffix>b<fim_middle>",
        "<filename>main.py\n", "<gh_stars>100", "<issue_start>bug", "<jupyter_code>x=1",
        "<|endoftext|><|endoftext|>", "a<|endoftext|>b", "<|IM_START|>", "< |im_start| >",
    ]
    for s in specials:
        out_pairs.append((s.encode(), True))
        out_pairs.append((s.encode(), False))

    # Invalid UTF-8: llama.cpp replaces malformed bytes with U+FFFD before BPE.
    for raw in [b"\xff", b"abc\x80def", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf",
                b"ok \xf0\x9f\x98", b"\xf8\x88\x80\x80\x80"]:
        out_pairs.append((raw, False))

    # Random mixtures (fixed seed) of the pieces above, to cover their boundaries.
    rng = random.Random(1234)
    pool = prose + code + numbers + unicode_texts
    seps = ["", " ", "  ", "\n", "\t", ", ", ". ", "\n\n", " \n"]
    while len(out_pairs) < 360:
        k = rng.randint(2, 4)
        s = rng.choice(seps).join(rng.choice(pool) for _ in range(k))
        out_pairs.append((s.encode(), rng.random() < 0.2))
    return out_pairs


# Published templates (tokenizer_config.json of Qwen/Qwen2-0.5B-Instruct and
# meta-llama/Meta-Llama-3-8B-Instruct), with their Jinja-escaped newlines.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "Why did the chicken cross the road?"},
     {"role": "user", "content": "  Why?  \n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "multi\nline\n\ntext"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
    [{"role": "user", "content": "unicode: héllo 😀 <b>tags</b> {{ not jinja }}"}],
]


def chat_fixture(model_template, out_path):
    env = jinja2.Environment()
    templates = [("smollm2", model_template), ("qwen2", QWEN2_TEMPLATE),
                 ("llama3", LLAMA3_TEMPLATE)]
    cases = []
    for name, text in templates:
        tmpl = env.from_string(text)
        for conv in CONVERSATIONS:
            for gen in (False, True):
                rendered = tmpl.render(messages=conv, add_generation_prompt=gen,
                                       bos_token="<|begin_of_text|>", eos_token="")
                cases.append({"template": name, "messages": conv,
                              "add_generation_prompt": gen, "expected": rendered})
    doc = {"format": "ctxcache-chat-templates", "version": 1, "jinja2": jinja2.__version__,
           "templates": dict(templates), "cases": cases}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} chat cases to {out_path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models",
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "tokenizer",
                                                  "smollm2_parity.json"))
    ap.add_argument("--chat-out", default=os.path.join(ROOT, "tests", "data", "tokenizer",
                                                       "chat_templates.json"))
    args = ap.parse_args()
    llm = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    chat_fixture(llm.metadata["tokenizer.chat_template"], args.chat_out)
    cases = []
    for raw, special in texts():
        ids = llm.tokenize(raw, add_bos=False, special=special)
        case = {}
        try:
            case["text"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            case["hex"] = raw.hex()
        case["parse_special"] = special
        case["ids"] = ids
        # Pieces as llama.cpp renders them (control tokens as text).
        decoded = llm._model.detokenize(ids, special=True)
        if decoded != raw:
            case["decoded_hex"] = decoded.hex()
        cases.append(case)
    doc = {
        "format": "ctxcache-tokenizer-parity",
        "version": 1,
        "model": os.path.basename(args.model),
        "llama_cpp_python": llama_cpp.__version__,
        "cases": cases,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
