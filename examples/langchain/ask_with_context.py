#!/usr/bin/env python3
"""LangChain's OpenAI chat model pointed at ctxcache: the document compressed once, every
question asked over the cached context (extra_body), one of them streamed.

  build/server/ctxcache-server --http-listen 127.0.0.1:8080 &
  python3 examples/langchain/ask_with_context.py [--base-url http://127.0.0.1:8080/v1]
"""
import argparse
import os

import openai
from langchain_openai import ChatOpenAI

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("CTXCACHE_TOKEN", "none"))
    ap.add_argument("--doc", default=os.path.join(HERE, "..", "notes.txt"))
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    ctx = client.post("/contexts", cast_to=object, body={
        "document": open(args.doc).read(), "compression": {"method": "none", "kv_dtype": "int4"}})
    llm = ChatOpenAI(base_url=args.base_url, api_key=args.api_key,
                     model=client.models.list().data[0].id, temperature=0, max_tokens=48,
                     extra_body={"contexts": [{"context_id": ctx["id"]}]})
    print(llm.invoke("How much was the budget for the repairs?").content)
    for chunk in llm.stream("Which date did the regatta move to?"):
        print(chunk.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
