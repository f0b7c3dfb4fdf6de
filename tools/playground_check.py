#!/usr/bin/env python3
"""Drives the HTTP API's playground page (GET /) end to end in a real headless Chromium (Debian's
package), over the Chrome DevTools Protocol: loads the page, pastes a document, picks a method,
ratio and storage, clicks Compress, types a question, clicks Ask, waits for the streamed answer,
checks what the page shows against the API, and saves a screenshot.

  tools/playground_check.py --server build/server/ctxcache-server [--model GGUF]
                            [--method kvzip --ratio 2 --dtype int8]
                            [--screenshot docs/img/playground.png]

docs/img/playground.png comes from the default model with --method kvzip (the README's).

Starts its own ctxcache-server (free ports, with a bearer token, which the page is given like a
user would type it). Exit 0: every check passed; 1: a check failed (the reason, the page's
status line and the server's last log lines are printed); 77: Chromium or websocket-client is
missing (tools/setup.sh installs both).
"""
import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = open(os.path.join(ROOT, "examples", "notes.txt")).read()
TOKEN = "playground-token-0001"


def Healthy(port):
    """GET /health answers 200 once the model has loaded (503 before)."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
    except OSError:
        return False


def fail(message, server_log=None, page=None):
    print(f"playground_check: FAIL: {message}")
    if page is not None:
        try:
            print("page status line:", page.eval("document.getElementById('status').textContent"))
        except Exception:  # noqa: BLE001 - the page may be gone; the message says enough
            pass
    if server_log:
        with open(server_log) as f:
            print("server log (last lines):\n" + "".join(f.readlines()[-15:]))
    sys.exit(1)


class Page:
    """One page target over the DevTools websocket: evaluate JavaScript, screenshot."""

    def __init__(self, ws_url):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.eval(expression):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} did not happen within {timeout} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="the ctxcache-server binary")
    ap.add_argument("--model", default=os.environ.get("CTXCACHE_MODEL", ""))
    ap.add_argument("--screenshot", default="")
    ap.add_argument("--question", default="When is the next meeting?")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--ratio", default="2")
    ap.add_argument("--dtype", default="int8", choices=["fp16", "int8", "int4"])
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import websocket  # noqa: F401
    except ImportError:
        chromium = None
    if not chromium:
        print("playground_check: needs chromium and websocket-client (tools/setup.sh)")
        # tools/test.sh has just installed both: missing there is a failure, not a skip.
        sys.exit(1 if os.environ.get("CTXCACHE_REQUIRE_MODEL") == "1" else 77)

    tmp = tempfile.mkdtemp(prefix="playground-")
    tokens = os.path.join(tmp, "tokens")
    with open(tokens, "w") as f:
        f.write(f"{TOKEN} playground\n")
    log = os.path.join(tmp, "server.log")
    cmd = [args.server, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
           "--auth-tokens", tokens]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    browser = None
    try:
        port = None
        deadline = time.time() + 180
        while time.time() < deadline and port is None:
            with open(log) as f:
                text = f.read()
            m = re.search(r"OpenAI-compatible HTTP API on http://[\d.]+:(\d+)/v1", text)
            if m and Healthy(int(m.group(1))):
                port = int(m.group(1))
            elif server.poll() is not None:
                fail("ctxcache-server exited", log)
            else:
                time.sleep(0.2)
        if port is None:
            fail("ctxcache-server did not start", log)
        base = f"http://127.0.0.1:{port}"

        browser = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={tmp}/profile",
             "--window-size=1280,860", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        devtools = None
        deadline = time.time() + 60
        while time.time() < deadline and devtools is None:
            line = browser.stderr.readline()
            m = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
            if m:
                devtools = m.group(1)
            elif not line and browser.poll() is not None:
                fail("chromium exited before its DevTools endpoint was up")
        if devtools is None:
            fail("chromium's DevTools endpoint did not come up")
        targets = json.load(urllib.request.urlopen(f"http://{devtools}/json/list", timeout=10))
        page_target = next(t for t in targets if t["type"] == "page")
        page = Page(page_target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Page.navigate", url=base + "/")
        page.wait("document.readyState === 'complete'", 30, "the page load")

        # Without a token the API refuses the page's first call, and the page says so.
        page.wait("document.getElementById('status').textContent.includes('token')", 30,
                  "the missing-token message")
        page.eval(f"""(() => {{
            const t = document.getElementById('token');
            t.value = {json.dumps(TOKEN)};
            t.dispatchEvent(new Event('change'));
        }})()""")
        page.wait("document.getElementById('method').options.length > 1", 30,
                  "the method list (GET /v1/models with the token)")
        methods = page.eval("[...document.getElementById('method').options].map(o => o.value)")
        if "snapkv" not in methods or "none" not in methods:
            fail(f"the method list is {methods}", log, page)

        page.eval(f"""(() => {{
            document.getElementById('doc').value = {json.dumps(DOC)};
            document.getElementById('method').value = {json.dumps(args.method)};
            document.getElementById('ratio').value = {json.dumps(args.ratio)};
            document.getElementById('dtype').value = {json.dumps(args.dtype)};
            document.getElementById('compress').click();
        }})()""")
        page.wait("['compressed', 'error'].includes(document.body.dataset.state)", 120,
                  "the compression")
        if page.eval("document.body.dataset.state") != "compressed":
            fail("compressing failed", log, page)
        shown_id = page.eval("document.getElementById('ctx-id').title")
        # The page shows what the API stored: check against GET /v1/contexts/{id}.
        req = urllib.request.Request(f"{base}/v1/contexts/{shown_id}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        ctx = json.load(urllib.request.urlopen(req, timeout=30))
        if ctx["method"] != args.method or ctx["kv_bytes"] >= ctx["full_kv_bytes"]:
            fail(f"the stored context is {ctx}", log, page)
        bar = float(page.eval("parseFloat(document.getElementById('kept-bar').style.width)"))
        if abs(bar - 100 * ctx["kv_bytes"] / ctx["full_kv_bytes"]) > 0.1:
            fail(f"the bar shows {bar}% for {ctx['kv_bytes']} of {ctx['full_kv_bytes']} bytes",
                 log, page)
        if page.eval("document.getElementById('ctx-tokens').textContent") != str(
                ctx["original_tokens"]):
            fail("the document token count differs from the API's", log, page)

        page.eval(f"""(() => {{
            document.getElementById('question').value = {json.dumps(args.question)};
            document.getElementById('ask').click();
        }})()""")
        page.wait("['done', 'error'].includes(document.body.dataset.state)", 300, "the answer")
        if page.eval("document.body.dataset.state") != "done":
            fail("asking failed", log, page)
        answer = page.eval("document.getElementById('answer').textContent")
        usage = page.eval("document.getElementById('usage').textContent")
        if not answer.strip():
            fail("the answer is empty", log, page)
        if "memory" not in usage or "KV saved" not in usage:
            fail(f"the usage panel shows {usage!r}", log, page)
        # The streamed answer is the API's answer (greedy: the same request gives the same text).
        body = json.dumps({"model": page.eval("modelId"), "temperature": 0, "max_tokens": 200,
                           "messages": [{"role": "user", "content": args.question}],
                           "contexts": [{"context_id": shown_id}]}).encode()
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        direct = json.load(urllib.request.urlopen(req, timeout=300))
        if direct["choices"][0]["message"]["content"] != answer:
            fail(f"the page shows {answer!r}, the API answers "
                 f"{direct['choices'][0]['message']['content']!r}", log, page)

        if args.screenshot:
            shot = page.call("Page.captureScreenshot", format="png")
            os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
            with open(args.screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            print(f"playground_check: screenshot {args.screenshot}")
        print(f"playground_check: ok: {ctx['original_tokens']} tokens -> "
              f"{ctx['kv_bytes']} of {ctx['full_kv_bytes']} KV bytes; "
              f"answer {answer.strip()[:80]!r}")
    finally:
        if browser is not None:
            browser.kill()
            browser.wait()
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
