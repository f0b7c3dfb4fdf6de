#!/usr/bin/env python3
"""The OpenAI-compatible HTTP API (server/http_api.h) end to end: a ctxcache-server binary with
the fast model (SmolLM2), driven by the official `openai` Python client (streaming and not,
ctxcache's `contexts` through extra_body) and by raw HTTP for what a client library would not
send (malformed bodies, wrong types, oversized bodies, a client that leaves mid-stream).

  tests/http_api_test.py CTXCACHE_SERVER_BIN   (ctest passes it)

Greedy decoding (temperature 0) makes answers reproducible, so a streamed answer must equal the
same request answered in one body, token for token.
"""
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

try:
    import openai
except ImportError:  # tools/setup.sh installs it; without it this test cannot say anything
    print("http_api_test: the openai package is missing (tools/setup.sh installs it)")
    sys.exit(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.environ.get("CTXCACHE_MODEL") or os.path.join(
    ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
SERVER_BIN = None
DOC = ("Ada's notes, page 3. The vault code is 4417. The courier arrives on Tuesdays. "
       "The garden gate is painted green. ") * 12


class Server:
    """ctxcache-server on free ports, with two tenants' tokens; the HTTP and metrics ports from
    its log."""

    def __init__(self, *extra):
        self.dir = tempfile.TemporaryDirectory()
        tokens = os.path.join(self.dir.name, "tokens")
        with open(tokens, "w") as f:
            f.write("alice-token-0001 alice\nbob-token-0002 bob\n")
        self.log_path = os.path.join(self.dir.name, "server.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [SERVER_BIN, "--model", MODEL, "--listen", "127.0.0.1:0", "--http-listen",
             "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--auth-tokens", tokens,
             "--workers", "1", "--threads-per-worker", "2", *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        self.http_port = self.metrics_port = None
        while time.time() < deadline:
            with open(self.log_path) as f:
                text = f.read()
            m = re.search(r"OpenAI-compatible HTTP API on http://[\d.]+:(\d+)/v1", text)
            n = re.search(r"Prometheus metrics on http://[\d.]+:(\d+)/metrics", text)
            if m and n and self.healthy(int(m.group(1))):
                self.http_port, self.metrics_port = int(m.group(1)), int(n.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError("ctxcache-server exited:\n" + text[-3000:])
            time.sleep(0.2)
        if self.http_port is None:
            with open(self.log_path) as f:
                raise RuntimeError("ctxcache-server did not start:\n" + f.read())
        self.base = f"http://127.0.0.1:{self.http_port}"

    @staticmethod
    def healthy(port):
        """GET /health answers 200 once the model has loaded (503 before)."""
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
        except OSError:
            return False

    def client(self, token="alice-token-0001"):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=token, max_retries=0,
                             timeout=120)

    def raw(self, method, path, body=None, token="alice-token-0001", headers=None):
        """(status, parsed JSON or text) of one request, body given as bytes or JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=120)
        h = {"Authorization": f"Bearer {token}"} if token else {}
        h.update(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read().decode()
        conn.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data

    def metric(self, name):
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        m = re.search(rf"^{name} ([\d.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else None

    def stop(self):
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=60)
        finally:
            self.log.close()
        return code


class HttpApiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server("--max-message-bytes", "262144")
        cls.client = cls.server.client()
        cls.model = cls.client.models.list().data[0].id

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        assert code == 0, f"ctxcache-server exited {code} on SIGTERM"

    def ask(self, content, **kw):
        return dict(model=self.model, messages=[{"role": "user", "content": content}],
                    temperature=0, **kw)

    def test_health_and_models(self):
        self.assertEqual(self.server.raw("GET", "/health", token=None), (200, {"status": "serving"}))
        models = self.client.models.list().data
        self.assertEqual(len(models), 1)
        self.assertRegex(models[0].id, r"^[a-z0-9._-]+$")
        self.assertEqual(models[0].model_extra["ctxcache"]["devices"], ["cpu"])

    def test_streaming_equals_one_body_and_reports_usage(self):
        whole = self.client.chat.completions.create(**self.ask("Name three colours.",
                                                              max_tokens=24))
        self.assertEqual(whole.object, "chat.completion")
        self.assertEqual(whole.choices[0].message.role, "assistant")
        self.assertEqual(whole.choices[0].finish_reason, "length")
        self.assertEqual(whole.usage.completion_tokens, 24)
        self.assertGreater(whole.usage.prompt_tokens, 5)
        self.assertEqual(whole.usage.total_tokens,
                         whole.usage.prompt_tokens + whole.usage.completion_tokens)
        chunks = list(self.client.chat.completions.create(
            **self.ask("Name three colours.", max_tokens=24), stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, whole.choices[0].message.content)
        self.assertGreater(len([c for c in chunks if c.choices]), 3, "streamed in pieces")
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "length")
        self.assertIsNotNone(chunks[-1].usage, "include_usage: the last chunk carries usage")
        self.assertEqual(chunks[-1].usage.completion_tokens, 24)
        self.assertEqual(chunks[-1].choices, [])
        # Without include_usage there is no usage chunk.
        plain = list(self.client.chat.completions.create(
            **self.ask("Name three colours.", max_tokens=4), stream=True))
        self.assertTrue(all(c.usage is None for c in plain))

    def test_text_completions(self):
        r = self.client.completions.create(model=self.model, prompt="Once upon a time",
                                           max_tokens=8, temperature=0)
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(r.usage.completion_tokens, 8)
        streamed = "".join(c.choices[0].text for c in self.client.completions.create(
            model=self.model, prompt="Once upon a time", max_tokens=8, temperature=0,
            stream=True) if c.choices)
        self.assertEqual(streamed, r.choices[0].text)

    def test_stop_and_seeded_sampling(self):
        base = self.client.chat.completions.create(**self.ask("Count: one, two,", max_tokens=16))
        words = base.choices[0].message.content.split()
        self.assertGreater(len(words), 2)
        cut = self.client.chat.completions.create(**self.ask("Count: one, two,", max_tokens=16),
                                                  stop=[words[1]])
        self.assertEqual(cut.choices[0].finish_reason, "stop")
        self.assertNotIn(words[1], cut.choices[0].message.content)
        a, b = (self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": "Tell me a word."}],
            temperature=1.0, seed=7, max_tokens=10) for _ in range(2))
        self.assertEqual(a.choices[0].message.content, b.choices[0].message.content)

    def test_compress_once_then_ask_with_savings(self):
        ctx = self.client.post("/contexts", cast_to=object, body={
            "document": DOC, "compression": {"method": "snapkv", "ratio": 4},
            "question": "What is the vault code?"})
        self.assertRegex(ctx["id"], r"^[0-9a-f]{64}$")
        self.assertEqual(ctx["method"], "snapkv")
        self.assertLess(ctx["kv_bytes"], ctx["full_kv_bytes"] / 2)
        self.assertIn("memory", ctx["retained_in"])
        got = self.client.get(f"/contexts/{ctx['id']}", cast_to=object)
        self.assertEqual((got["id"], got["kv_bytes"], got["tier"]),
                         (ctx["id"], ctx["kv_bytes"], "memory"))
        r = self.client.chat.completions.create(
            **self.ask("What is the vault code?", max_tokens=12),
            extra_body={"contexts": [{"context_id": ctx["id"]}]})
        saved = r.model_extra["ctxcache"]
        self.assertEqual(saved["contexts"][0]["context_id"], ctx["id"])
        self.assertEqual(saved["contexts"][0]["tier"], "memory")
        self.assertEqual(saved["kv_bytes_saved"], saved["kv_bytes_full"] - saved["kv_bytes_used"])
        self.assertGreater(saved["kv_bytes_saved"], 0)
        # The context's tokens are not the prompt's: usage counts the prompt only.
        self.assertLess(r.usage.prompt_tokens, ctx["original_tokens"])
        # Streaming with the same context: the same answer, the savings in the usage chunk.
        chunks = list(self.client.chat.completions.create(
            **self.ask("What is the vault code?", max_tokens=12), stream=True,
            stream_options={"include_usage": True},
            extra_body={"contexts": [{"context_id": ctx["id"]}]}))
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                         r.choices[0].message.content)
        self.assertEqual(chunks[-1].model_extra["ctxcache"]["kv_bytes_saved"],
                         saved["kv_bytes_saved"])
        # Delete: gone for good (404 in OpenAI's shape).
        self.assertEqual(self.server.raw("DELETE", f"/v1/contexts/{ctx['id']}")[0], 200)
        with self.assertRaises(openai.NotFoundError):
            self.client.get(f"/contexts/{ctx['id']}", cast_to=object)
        with self.assertRaises(openai.NotFoundError):
            self.client.chat.completions.create(
                **self.ask("x", max_tokens=2), extra_body={"contexts": [{"context_id": ctx["id"]}]})

    def test_inline_document_is_compressed_then_served_from_memory(self):
        inline = {"contexts": [{"document": DOC[:600],
                                "compression": {"method": "streaming", "ratio": 2}}]}
        first = self.client.chat.completions.create(**self.ask("What colour is the gate?",
                                                               max_tokens=6), extra_body=inline)
        second = self.client.chat.completions.create(**self.ask("What colour is the gate?",
                                                                max_tokens=6), extra_body=inline)
        tiers = [x.model_extra["ctxcache"]["contexts"][0]["tier"] for x in (first, second)]
        self.assertEqual(tiers, ["computed", "memory"])
        self.assertEqual(first.choices[0].message.content, second.choices[0].message.content)

    def test_langchain_chat_model_over_the_api(self):
        try:
            from langchain_openai import ChatOpenAI
        except ImportError:
            self.fail("langchain-openai is missing (tools/setup.sh installs it)")
        ctx = self.client.post("/contexts", cast_to=object, body={
            "document": DOC, "compression": {"method": "expected_attention", "ratio": 2}})
        contexts = {"contexts": [{"context_id": ctx["id"]}]}
        llm = ChatOpenAI(base_url=self.server.base + "/v1", api_key="alice-token-0001",
                         model=self.model, temperature=0, max_tokens=12, extra_body=contexts)
        answer = llm.invoke("What is the vault code?")
        direct = self.client.chat.completions.create(
            **self.ask("What is the vault code?", max_tokens=12), extra_body=contexts)
        self.assertEqual(answer.content, direct.choices[0].message.content)
        self.assertEqual(answer.response_metadata["token_usage"]["completion_tokens"], 12)
        self.assertEqual("".join(c.content for c in llm.stream("What is the vault code?")),
                         answer.content)

    def test_tenants_and_tokens(self):
        with self.assertRaises(openai.AuthenticationError):
            self.server.client("wrong-token").models.list()
        status, body = self.server.raw("GET", "/v1/models", token=None)
        self.assertEqual(status, 401)
        self.assertEqual(body["error"]["type"], "authentication_error")
        ctx = self.client.post("/contexts", cast_to=object, body={
            "document": DOC[:300], "compression": {"method": "none"}})
        with self.assertRaises(openai.NotFoundError):
            self.server.client("bob-token-0002").get(f"/contexts/{ctx['id']}", cast_to=object)

    def test_bad_input_gets_openai_shaped_errors(self):
        def error(status, body):
            self.assertIn("error", body, body)
            self.assertTrue(body["error"]["message"])
            self.assertIn("type", body["error"])
            return status, body["error"]["type"], body["error"]["message"]

        chat = "/v1/chat/completions"
        s, t, m = error(*self.server.raw("POST", chat, b"{not json"))
        self.assertEqual((s, t), (400, "invalid_request_error"))
        self.assertIn("not valid JSON", m)
        s, t, m = error(*self.server.raw("POST", chat, [1, 2]))
        self.assertEqual(s, 400)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"), "max_tokens": "ten"}))
        self.assertEqual(s, 400)
        self.assertIn("max_tokens must be an integer", m)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"), "temperature": 500}))
        self.assertEqual(s, 400)
        self.assertIn("temperature", m)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"), "model": "gpt-4"}))
        self.assertEqual((s, t), (404, "not_found_error"))
        self.assertIn(self.model, m)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"),
                                                        "contexts": [{"context_id": "0" * 64,
                                                                      "ratio": 2}]}))
        self.assertEqual(s, 400)
        self.assertIn("contexts[0].ratio is not a context field", m)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"), "contexts": [
            {"document": "abc", "compression": {"method": "snapkv", "ratoi": 2}}]}))
        self.assertEqual(s, 400)
        self.assertIn("contexts[0].compression", m)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"), "contexts": [
            {"document": "abc", "compression": {"method": "nope"}}]}))
        self.assertEqual(s, 400)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"), "n": 3}))
        self.assertEqual(s, 400)
        s, t, m = error(*self.server.raw("POST", chat, {"model": self.model, "messages": []}))
        self.assertEqual(s, 400)
        s, t, m = error(*self.server.raw("POST", chat, {"model": self.model, "messages": [
            {"role": "wizard", "content": "x"}]}))
        self.assertEqual(s, 400)
        s, t, m = error(*self.server.raw("POST", chat, {**self.ask("x"), "contexts": [
            {"context_id": "f" * 64}]}))
        self.assertEqual((s, t), (404, "not_found_error"))
        s, t, m = error(*self.server.raw("POST", chat, b"x" * 300000,
                                         headers={"Content-Type": "application/json"}))
        self.assertEqual(s, 413)
        self.assertIn("max_message_bytes", m)
        s, t, m = error(*self.server.raw("GET", "/v1/nothing-here"))
        self.assertEqual(s, 404)
        # The server is still fine.
        self.assertEqual(self.client.chat.completions.create(
            **self.ask("Hi", max_tokens=2)).usage.completion_tokens, 2)

    def test_a_client_that_leaves_mid_stream_frees_its_worker(self):
        body = json.dumps({**self.ask("Write a long story about the sea.", max_tokens=4000,
                                      ignore_eos=True), "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", self.server.http_port), timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer alice-token-0001\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data: ") < 4:
            got += sock.recv(4096)
        self.assertIn(b"text/event-stream", got)
        self.assertEqual(self.server.metric("ctxcache_running_requests"), 1)
        sock.close()
        deadline = time.time() + 10
        while time.time() < deadline and self.server.metric("ctxcache_running_requests") != 0:
            time.sleep(0.1)
        self.assertEqual(self.server.metric("ctxcache_running_requests"), 0,
                         "the abandoned generation still holds its worker")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    SERVER_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
