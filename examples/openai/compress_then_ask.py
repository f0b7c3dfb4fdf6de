#!/usr/bin/env python3
"""A RAG backend on the official openai client: compress a document once, then ask questions
that reuse it (ctxcache's `contexts` through extra_body), streaming one of them.

  build/server/ctxcache-server --http-listen 127.0.0.1:8080 &
  python3 examples/openai/compress_then_ask.py [--base-url http://127.0.0.1:8080/v1]

Switching from a full-document prompt: instead of pasting the document into the messages of
every call, POST it once to /v1/contexts and pass {"context_id": ...} in `contexts`; or pass
{"document": ..., "compression": {...}} inline and let the server compress it on first use and
serve it from its cache after.
"""
import argparse
import os

import openai

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("CTXCACHE_TOKEN", "none"),
                    help="a bearer token when the server has --auth-tokens")
    ap.add_argument("--doc", default=os.path.join(HERE, "..", "notes.txt"))
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id

    # Once per document: the compressed context is cached (memory, and Redis when configured).
    ctx = client.post("/contexts", cast_to=object, body={
        "document": open(args.doc).read(),
        "compression": {"method": "none", "kv_dtype": "int4"}})
    print(f"context {ctx['id'][:12]}…: {ctx['original_tokens']} tokens, "
          f"{ctx['full_kv_bytes']} -> {ctx['kv_bytes']} KV bytes")

    for question in ("When is the next meeting?", "How much was the budget for the repairs?"):
        r = client.chat.completions.create(
            model=model, temperature=0, max_tokens=48,
            messages=[{"role": "user", "content": question}],
            extra_body={"contexts": [{"context_id": ctx["id"]}]})
        saved = r.model_extra["ctxcache"]
        print(f"Q: {question}\nA: {r.choices[0].message.content.strip()}\n"
              f"   ({saved['contexts'][0]['tier']}; KV {saved['kv_bytes_used']} bytes used, "
              f"{saved['kv_bytes_saved']} saved)")

    print("Q (streamed): Where is the meeting?\nA: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, temperature=0, max_tokens=48, stream=True,
        messages=[{"role": "user", "content": "Where is the meeting?"}],
        extra_body={"contexts": [{"context_id": ctx["id"]}]})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
