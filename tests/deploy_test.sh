#!/usr/bin/env bash
# Offline checks of the deployment files (deploy/, docker/, .yamllint):
#   tests/deploy_test.sh [REPO_ROOT] [CTXCACHE_SERVER_BINARY]
# promtool (config, rules, rule unit tests), the dashboard's and rules' metric names against
# deploy/metrics.txt, kustomize renders of every overlay validated against Kubernetes' JSON
# schemas (and the ServiceMonitor and cert-manager's Certificate and Issuer against
# deploy/k8s/schemas/), policy checks on the rendered manifests (the tls overlay's TLS wiring
# among them), the prometheus-adapter rules the HPA scales on (schema, metric names, their
# PromQL with promtool), yamllint, the compose file's references, the Dockerfiles' shape, the
# server accepting the ConfigMap's settings (and the tls overlay's TLS settings, with
# certificates made here by openssl, when the server has them), and
# tools/render_dashboard_preview.py on synthetic scrapes. Every check runs; the script fails
# if any failed.
# Without one of the tools it skips (exit 77), unless CTXCACHE_REQUIRE_DEPLOY_TOOLS=1
# (tools/test.sh sets it after tools/setup.sh installed them): then it fails.
# KUBECTL=/path/to/kubectl picks the kubectl whose kustomize renders the overlays.
set -uo pipefail
root="$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd)"
server_bin="${2:-}"
cd "$root"
kubectl="${KUBECTL:-kubectl}"

missing=()
command -v promtool >/dev/null || missing+=("promtool (Debian package prometheus)")
command -v yamllint >/dev/null || missing+=("yamllint")
command -v "$kubectl" >/dev/null || missing+=("kubectl (Debian package kubernetes-client)")
python3 -c 'import yaml, jsonschema, kubernetes_validate' 2>/dev/null ||
  missing+=("python modules yaml, jsonschema, kubernetes_validate (pip kubernetes-validate)")
if ((${#missing[@]})); then
  if [[ "${CTXCACHE_REQUIRE_DEPLOY_TOOLS:-0}" == 1 ]]; then
    echo "FAIL: missing ${missing[*]} (CTXCACHE_REQUIRE_DEPLOY_TOOLS=1; tools/setup.sh installs them)"
    exit 1
  fi
  echo "SKIP: missing ${missing[*]} (tools/setup.sh installs them)"
  exit 77
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/ctxcache-deploy-test.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
failures=()
# check NAME CMD...: runs CMD, its output indented; counts it.
check() {
  local name="$1"
  shift
  local out rc
  out="$("$@" 2>&1)"
  rc=$?
  if ((rc == 0)); then
    echo "ok   $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name (exit $rc)"
    failed=$((failed + 1))
    failures+=("$name")
  fi
  [[ -n "$out" ]] && sed 's/^/       /' <<<"$out" | tail -n 40
  return 0
}

echo "== Prometheus"
check "promtool check config deploy/prometheus/prometheus.compose.yml" \
  promtool check config deploy/prometheus/prometheus.compose.yml
# Debian's Prometheus is built without Kubernetes service discovery, so its promtool rejects
# kubernetes_sd_configs. Then the rest of prometheus.yml is checked by promtool with that
# block replaced by a static target, and the block itself by tools below.
k8s_prom_check() {
  local out
  if out="$(promtool check config deploy/prometheus/prometheus.yml 2>&1)"; then
    echo "$out"
    return 0
  fi
  if ! grep -q "field kubernetes_sd_configs not found" <<<"$out"; then
    echo "$out"
    return 1
  fi
  echo "note: this promtool ($(promtool --version 2>&1 | head -n 1)) has no Kubernetes service" \
    "discovery; checking prometheus.yml with kubernetes_sd_configs swapped for a static target"
  mkdir -p "$tmp/prom" && cp deploy/prometheus/rules.yml "$tmp/prom/" &&
    python3 - deploy/prometheus/prometheus.yml "$tmp/prom/prometheus.yml" <<'PY' &&
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
n = 0
for job in cfg["scrape_configs"]:
    sd = job.pop("kubernetes_sd_configs", None)
    if sd is None:
        continue
    n += 1
    assert isinstance(sd, list) and sd, "kubernetes_sd_configs must be a non-empty list"
    for c in sd:
        assert c.get("role") in ("pod", "endpoints", "endpointslice", "service", "node",
                                 "ingress"), f"unknown role {c.get('role')!r}"
        assert set(c) <= {"role", "namespaces", "selectors", "api_server", "kubeconfig_file",
                          "attach_metadata"} | {"tls_config", "authorization", "basic_auth",
                                                "oauth2", "proxy_url", "follow_redirects"}, c
    for r in job.get("relabel_configs", []):
        for lab in r.get("source_labels", []):
            assert not lab.startswith("__meta_") or lab.startswith("__meta_kubernetes_"), lab
    job["static_configs"] = [{"targets": ["placeholder:9464"]}]
assert n, "prometheus.yml has no kubernetes_sd_configs job"
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
print(f"kubernetes_sd_configs of {n} job(s): roles and relabel source labels well-formed")
PY
    promtool check config "$tmp/prom/prometheus.yml"
}
check "promtool check config deploy/prometheus/prometheus.yml" k8s_prom_check
check "promtool check rules deploy/prometheus/rules.yml" \
  promtool check rules deploy/prometheus/rules.yml
check "promtool test rules deploy/prometheus/rules_test.yml" \
  promtool test rules deploy/prometheus/rules_test.yml
check "every alert has for, severity, summary, description, runbook_url (an existing anchor)" \
  python3 - <<'PY'
import re, yaml
doc = yaml.safe_load(open("deploy/prometheus/rules.yml"))
ops = open("docs/operations.md").read()
# GitHub-style anchors of the runbook's headings.
anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.*)$", ops, re.M)}
tested = open("deploy/prometheus/rules_test.yml").read()
bad = []
for g in doc["groups"]:
    for r in g["rules"]:
        a = r.get("alert")
        if not a:
            continue
        if not r.get("for"):
            bad.append(f"{a}: no for:")
        if r.get("labels", {}).get("severity") not in ("warning", "critical"):
            bad.append(f"{a}: severity must be warning or critical")
        ann = r.get("annotations", {})
        for k in ("summary", "description", "runbook_url"):
            if not ann.get(k):
                bad.append(f"{a}: no {k} annotation")
        anchor = ann.get("runbook_url", "").partition("#")[2]
        if anchor not in anchors:
            bad.append(f"{a}: runbook anchor #{anchor} is not a heading of docs/operations.md")
        if f"alertname: {a}" not in tested:
            bad.append(f"{a}: no test in rules_test.yml")
print("\n".join(bad))
raise SystemExit(1 if bad else 0)
PY
check "rules' thresholds agree with deploy/k8s/base/ctxcache.yaml" python3 - <<'PY'
import re, yaml
cfg = yaml.safe_load(open("deploy/k8s/base/ctxcache.yaml"))
rules = {r["alert"]: r["expr"] for g in yaml.safe_load(open("deploy/prometheus/rules.yml"))["groups"]
         for r in g["rules"] if "alert" in r}
def size(v):
    m = re.fullmatch(r"(\d+)\s*([KMGT]i?B)?", str(v))
    mult = {None: 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
            "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[m.group(2)]
    return int(m.group(1)) * mult
q = int(re.search(r"ctxcache_queue_depth\)\s*>\s*(\d+)", rules["CtxcacheQueueSaturated"]).group(1))
b = int(re.search(r'ctxcache_cache_bytes\{tier="memory"\}\)\s*>\s*(\d+)',
                  rules["CtxcacheMemoryTierPressure"]).group(1))
want_q = int(cfg["max_queue_depth"] * 0.75)
want_b = int(size(cfg["memory_cache_bytes"]) * 0.9)
print(f"queue: rule {q}, 75% of max_queue_depth {cfg['max_queue_depth']} = {want_q}; "
      f"memory: rule {b}, 90% of memory_cache_bytes {cfg['memory_cache_bytes']} = {want_b}")
raise SystemExit(0 if (q, b) == (want_q, want_b) else 1)
PY

echo "== Grafana"
check "deploy/grafana/ctxcache.json parses; queries and rules use only deploy/metrics.txt" \
  python3 tools/check_dashboard.py --metrics deploy/metrics.txt
check "dashboard has the headline and required panels" python3 - <<'PY'
import json
d = json.load(open("deploy/grafana/ctxcache.json"))
def walk(ps):
    for p in ps:
        yield p
        yield from walk(p.get("panels", []))
panels = [p for p in walk(d["panels"]) if p.get("type") != "row"]
exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}
head = panels[0]
need = [
    (head["title"] == "KV memory saved per request", "headline panel first"),
    ("histogram_quantile(0.5" in exprs[head["title"]] and "histogram_quantile(0.95" in
     exprs[head["title"]] and "_sum" in exprs[head["title"]] and "_count" in exprs[head["title"]],
     "headline: p50, p95 and rate(_sum)/rate(_count)"),
    (head["fieldConfig"]["defaults"]["unit"] == "bytes", "headline unit bytes"),
]
for metric in ("ctxcache_compression_ratio", "ctxcache_cache_lookups_total",
               "ctxcache_ttft_seconds_bucket", "ctxcache_generated_tokens_total",
               "ctxcache_queue_depth", "ctxcache_worker_busy_seconds_total",
               "ctxcache_redis_errors_total", "ctxcache_redis_operation_duration_seconds_bucket",
               "ctxcache_tenant_kv_bytes_saved_total"):
    need.append((any(metric in e for e in exprs.values()), f"a panel queries {metric}"))
ids = [p["id"] for p in walk(d["panels"])]
need.append((len(ids) == len(set(ids)), "panel ids unique"))
bad = [w for ok, w in need if not ok]
print("\n".join(bad))
raise SystemExit(1 if bad else 0)
PY
check "render_dashboard_preview.py on synthetic scrapes (numbers cross-checked with promtool)" \
  python3 tests/deploy_preview_test.py "$root"

echo "== Kubernetes ($("$kubectl" version --client 2>/dev/null | head -n 1))"
mkdir -p "$tmp/k8s"
render() {
  # Newer kustomize warns that bases/patchesStrategicMerge are deprecated; they are used on
  # purpose (kustomize v2.0.3 of Debian's kubectl needs them), so the warnings are dropped.
  "$kubectl" kustomize "deploy/k8s/$1" >"$tmp/k8s/$2.yaml" 2>"$tmp/k8s/$2.err"
  local rc=$?
  grep -v -E "^# Warning: '(bases|patchesStrategicMerge)' is deprecated" "$tmp/k8s/$2.err"
  return $rc
}
for o in base overlays/cpu overlays/gpu overlays/dev overlays/tls; do
  check "kubectl kustomize deploy/k8s/$o" render "$o" "${o##*/}"
done
# Custom resources (ServiceMonitor; cert-manager's Certificate and Issuer in the tls overlay)
# have no schema there: they are checked against deploy/k8s/schemas/ below.
for o in cpu gpu dev tls; do
  for v in 1.25.0 1.37.0; do
    check "kubernetes-validate --strict -k $v ($o overlay)" \
      bash -c "kubernetes-validate --strict --quiet -k $v '$tmp/k8s/$o.yaml' 2>&1 |
               grep -v -E \"Couldn't find schema for kind (ServiceMonitor|Certificate|Issuer) \"
               exit \${PIPESTATUS[0]}"
  done
done
check "ServiceMonitor (a CRD) against deploy/k8s/schemas/servicemonitor.schema.json" \
  python3 - "$tmp/k8s" <<'PY'
import json, sys, yaml, jsonschema
schema = json.load(open("deploy/k8s/schemas/servicemonitor.schema.json"))
n = 0
for o in ("cpu", "gpu", "dev", "tls"):
    for d in yaml.safe_load_all(open(f"{sys.argv[1]}/{o}.yaml")):
        if d and d["kind"] == "ServiceMonitor":
            jsonschema.validate(d, schema)
            n += 1
print(f"{n} ServiceMonitor(s) valid")
raise SystemExit(0 if n == 3 else 1)  # cpu, gpu and tls; dev has none (no operator there)
PY
check "cert-manager Certificates and Issuers (CRDs) against deploy/k8s/schemas/, issuers resolve" \
  python3 - "$tmp/k8s" <<'PY'
import json, sys, yaml, jsonschema
schemas = {k: json.load(open(f"deploy/k8s/schemas/{k.lower()}.schema.json"))
           for k in ("Certificate", "Issuer")}
bad, n = [], {"Certificate": 0, "Issuer": 0}
for o in ("base", "cpu", "gpu", "dev", "tls"):
    ds = [d for d in yaml.safe_load_all(open(f"{sys.argv[1]}/{o}.yaml")) if d]
    cm = [d for d in ds if d["apiVersion"].startswith("cert-manager.io/")]
    if o != "tls":
        if cm:
            bad.append(f"{o}: cert-manager resources outside the tls overlay")
        continue
    for d in cm:
        try:
            jsonschema.validate(d, schemas[d["kind"]])
            n[d["kind"]] += 1
        except (KeyError, jsonschema.ValidationError) as e:
            bad.append(f"{o}: {d['kind']} {d['metadata']['name']}: "
                       f"{getattr(e, 'message', 'no schema for this kind')}")
    issuers = {d["metadata"]["name"]: d for d in cm if d["kind"] == "Issuer"}
    certs = {d["spec"]["secretName"]: d for d in cm if d["kind"] == "Certificate"}
    for d in cm:
        if d["kind"] != "Certificate":
            continue
        ref = d["spec"]["issuerRef"]
        if ref.get("kind", "Issuer") == "Issuer" and ref["name"] not in issuers:
            bad.append(f"{o}: Certificate {d['metadata']['name']} names no Issuer of the overlay "
                       f"({ref['name']})")
    for name, d in issuers.items():
        ca = d["spec"].get("ca")
        if ca and not certs.get(ca["secretName"], {}).get("spec", {}).get("isCA"):
            bad.append(f"{o}: CA Issuer {name} reads {ca['secretName']}, which no isCA "
                       "Certificate of the overlay writes")
print("\n".join(bad) or f"{n['Certificate']} Certificate(s), {n['Issuer']} Issuer(s) valid")
raise SystemExit(1 if bad or not all(n.values()) else 0)
PY
check "rendered manifests follow the deployment rules" python3 - "$tmp/k8s" <<'PY'
import re, sys, yaml
def docs(o):
    return [d for d in yaml.safe_load_all(open(f"{sys.argv[1]}/{o}.yaml")) if d]
def seconds(v):
    return int(v)
cfg = yaml.safe_load(open("deploy/k8s/base/ctxcache.yaml"))
bad = []
probe_timings = {}
for o in ("cpu", "gpu", "dev", "tls"):
    ds = docs(o)
    kinds = {d["kind"] for d in ds}
    for k in ("Deployment", "ConfigMap", "Service", "HorizontalPodAutoscaler",
              "PodDisruptionBudget", "NetworkPolicy"):
        if k not in kinds:
            bad.append(f"{o}: no {k}")
    if ("ServiceMonitor" in kinds) != (o != "dev"):
        bad.append(f"{o}: ServiceMonitor expected in cpu, gpu and tls only")
    dep = next(d for d in ds if d["kind"] == "Deployment" and d["metadata"]["name"] == "ctxcache")
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "ctxcache")
    for p in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(p, {})
        if o == "tls":  # TLS on every port: GET /health on the metrics port over HTTPS
            if probe.get("httpGet") != {"scheme": "HTTPS", "port": "metrics", "path": "/health"}:
                bad.append(f"{o}: {p} is not an HTTPS GET of /health on the metrics port")
        elif probe.get("grpc", {}).get("port") != 50051:
            bad.append(f"{o}: {p} is not a native gRPC probe on 50051")
        # Same timings in every overlay: only the mechanism differs.
        timing = {k: v for k, v in probe.items() if k not in ("grpc", "httpGet")}
        if probe_timings.setdefault(p, timing) != timing:
            bad.append(f"{o}: {p} timings {timing} differ from {probe_timings[p]}")
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    sleep = int(pre[-1]) if pre[0] == "sleep" else 0
    if not pod["terminationGracePeriodSeconds"] > sleep + int(cfg["drain_timeout_seconds"]):
        bad.append(f"{o}: terminationGracePeriodSeconds <= preStop sleep + drain timeout")
    live = c["livenessProbe"]
    if live["periodSeconds"] * live["failureThreshold"] <= sleep + int(cfg["drain_timeout_seconds"]):
        bad.append(f"{o}: liveness would restart a draining pod")
    sc = pod.get("securityContext", {})
    if not sc.get("runAsNonRoot") or not sc.get("runAsUser"):
        bad.append(f"{o}: pod not non-root")
    for cc in pod["containers"] + pod.get("initContainers", []):
        s = cc.get("securityContext", {})
        if s.get("allowPrivilegeEscalation") is not False or s.get("capabilities", {}).get("drop") != ["ALL"]:
            bad.append(f"{o}: container {cc['name']} may escalate / keeps capabilities")
        r = cc.get("resources", {})
        if not r.get("requests") or not r.get("limits"):
            bad.append(f"{o}: container {cc['name']} lacks requests or limits")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if ports != {"grpc": 50051, "metrics": 9464}:
        bad.append(f"{o}: container ports {ports}")
    svc = next(d for d in ds if d["kind"] == "Service" and d["metadata"]["name"] == "ctxcache")
    if {p["name"] for p in svc["spec"]["ports"]} != {"grpc", "metrics"}:
        bad.append(f"{o}: Service ports")
    if c["args"] != ["--config", "/etc/ctxcache/ctxcache.yaml"]:
        bad.append(f"{o}: args {c['args']}")
    cms = [d for d in ds if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("ctxcache-config")]
    vol = next(v for v in pod["volumes"] if v["name"] == "config")
    if len(cms) != 1 or vol["configMap"]["name"] != cms[0]["metadata"]["name"]:
        bad.append(f"{o}: config volume does not name the generated ConfigMap")
    env = {e["name"]: e for e in c.get("env", [])}
    secrets = [d for d in ds if d["kind"] == "Secret"]
    if o in ("cpu", "gpu", "tls"):
        if secrets:
            bad.append(f"{o}: renders a Secret (values must not be in git)")
        if env["CTXCACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] != "ctxcache-secrets":
            bad.append(f"{o}: Redis URL not from the Secret ctxcache-secrets")
    limits = c["resources"]["limits"]
    if o == "gpu":
        if str(limits.get("nvidia.com/gpu")) != "1":
            bad.append("gpu: no nvidia.com/gpu limit")
        if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
            bad.append("gpu: no nvidia.com/gpu toleration")
        if not pod.get("nodeSelector"):
            bad.append("gpu: no nodeSelector")
        if not re.search(r"cuda", c["image"]):
            bad.append(f"gpu: image {c['image']} is not the CUDA one")
    elif "nvidia.com/gpu" in limits:
        bad.append(f"{o}: asks for a GPU")
    if o == "dev":
        names = {(d["kind"], d["metadata"]["name"]) for d in ds}
        if ("StatefulSet", "ctxcache-redis") not in names or ("Service", "ctxcache-redis") not in names:
            bad.append("dev: no in-cluster Redis StatefulSet + Service")
        ref = env["CTXCACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        sec = next((s for s in secrets if s["metadata"]["name"] == ref["name"]), None)
        import base64
        url = base64.b64decode(sec["data"][ref["key"]]).decode() if sec else ""
        if not url.startswith("redis://ctxcache-redis:6379"):
            bad.append(f"dev: server not pointed at the in-cluster Redis ({url!r})")
print("\n".join(bad))
raise SystemExit(1 if bad else 0)
PY
check "TLS: base mounts Secret ctxcache-tls optionally and serves plaintext; the tls overlay wires it up" \
  python3 - "$tmp/k8s" <<'PY'
import posixpath, re, sys, yaml
def docs(o):
    return [d for d in yaml.safe_load_all(open(f"{sys.argv[1]}/{o}.yaml")) if d]
def server(ds):
    dep = next(d for d in ds if d["kind"] == "Deployment" and d["metadata"]["name"] == "ctxcache")
    pod = dep["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "ctxcache")
def volume_of(pod, c, path):
    """The volume whose mount holds path (a directory mount, so that updates reach the file)."""
    for m in c.get("volumeMounts", []):
        if not m.get("subPath") and path.startswith(m["mountPath"].rstrip("/") + "/"):
            return next(v for v in pod["volumes"] if v["name"] == m["name"]), m
    return None, None
TLS_DIR = "/etc/ctxcache/tls"
WANT_ENV = {"CTXCACHE_TLS_CERT": f"{TLS_DIR}/tls.crt", "CTXCACHE_TLS_KEY": f"{TLS_DIR}/tls.key",
            "CTXCACHE_TLS_CLIENT_CA": f"{TLS_DIR}/ca.crt"}
bad = []
# The ConfigMap names no TLS file: the paths come from the tls overlay's environment, so the
# base (and the config check below) run without TLS files.
cfg = yaml.safe_load(open("deploy/k8s/base/ctxcache.yaml"))
if [k for k in cfg if k.startswith("tls_")]:
    bad.append("base/ctxcache.yaml sets tls_* keys: keep TLS in the tls overlay's environment")
for o in ("base", "cpu", "gpu", "dev", "tls"):
    ds = docs(o)
    pod, c = server(ds)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    vol = next((v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "ctxcache-tls"), None)
    mount = vol and next((m for m in c["volumeMounts"] if m["name"] == vol["name"]), None)
    if not vol or not mount or mount["mountPath"] != TLS_DIR or mount.get("subPath"):
        bad.append(f"{o}: Secret ctxcache-tls is not mounted (whole, no subPath) at {TLS_DIR}")
    if o != "tls":
        if vol and vol["secret"].get("optional") is not True:
            bad.append(f"{o}: the ctxcache-tls volume is not optional (pods would wait for it)")
        tls_env = sorted(k for k in env if k.startswith("CTXCACHE_TLS_"))
        if tls_env:
            bad.append(f"{o}: sets {tls_env}: TLS belongs to the tls overlay")
        continue
    # --- the tls overlay ---
    for k, v in WANT_ENV.items():
        if env.get(k) != v:
            bad.append(f"tls: {k} is {env.get(k)!r}, not {v}")
    for k, v in env.items():
        if k.startswith("CTXCACHE_TLS_") and k != "CTXCACHE_TLS_RELOAD_SECONDS":
            if not v or not volume_of(pod, c, v)[0]:
                bad.append(f"tls: {k}={v!r} is not a file of a mounted volume")
    for cc in pod["containers"]:
        for p in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "grpc" in cc.get(p, {}):
                bad.append(f"tls: {cc['name']} {p} is still a gRPC probe (it cannot speak TLS)")
    # The server Certificate writes the Secret that is mounted.
    certs = [d for d in ds if d["kind"] == "Certificate"]
    server_certs = [d for d in certs if "server auth" in d["spec"].get("usages", [])]
    if len(server_certs) != 1:
        bad.append(f"tls: {len(server_certs)} Certificate(s) with usage 'server auth', want 1")
    mounted = vol["secret"]["secretName"] if vol else None
    for d in server_certs:
        if d["spec"]["secretName"] != mounted:
            bad.append(f"tls: Certificate {d['metadata']['name']} writes Secret "
                       f"{d['spec']['secretName']}, the pod mounts {mounted}")
        services = {s["metadata"]["name"] for s in ds if s["kind"] == "Service"
                    and any(p["name"] == "grpc" for p in s["spec"]["ports"])}
        missing = services - set(d["spec"].get("dnsNames", []))
        if missing:
            bad.append(f"tls: server certificate lacks dnsNames {sorted(missing)}")
    # The ServiceMonitor scrapes over HTTPS and verifies the server with the mounted CA.
    for sm in (d for d in ds if d["kind"] == "ServiceMonitor"):
        for e in sm["spec"]["endpoints"]:
            tc = e.get("tlsConfig", {})
            if e.get("scheme") != "https" or tc.get("ca", {}).get("secret", {}).get("name") != mounted:
                bad.append(f"tls: ServiceMonitor endpoint {e.get('port')} is not https with the CA of {mounted}")
            names = {n for d in server_certs for n in d["spec"].get("dnsNames", [])}
            if tc.get("serverName") not in names or tc.get("insecureSkipVerify"):
                bad.append(f"tls: ServiceMonitor serverName {tc.get('serverName')!r} is not a dnsName "
                           "of the server certificate")
    svc = next(d for d in ds if d["kind"] == "Service" and d["metadata"]["name"] == "ctxcache")
    if any(p["name"] == "metrics" and p.get("appProtocol") != "https" for p in svc["spec"]["ports"]):
        bad.append("tls: Service port metrics is not appProtocol https")
    # The tenants file: a mounted ConfigMap key of "IDENTITY TENANT" lines, naming the client
    # certificates' identities.
    path = env.get("CTXCACHE_TLS_CLIENT_TENANTS")
    v, m = volume_of(pod, c, path or "")
    cm = v and next((d for d in ds if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == v.get("configMap", {}).get("name")), None)
    key = path and posixpath.relpath(path, m["mountPath"]) if m else None
    if not cm or key not in cm.get("data", {}):
        bad.append(f"tls: CTXCACHE_TLS_CLIENT_TENANTS={path!r} is not a key of a mounted ConfigMap")
    else:
        ids = {}
        for n, line in enumerate(cm["data"][key].splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            f = line.split()
            if len(f) != 2 or not re.match(r"^(CN|DNS|URI|email|IP):.+", f[0]):
                bad.append(f"tls: {key}:{n}: not 'CN:|DNS:|URI:|email:|IP:IDENTITY TENANT': {line!r}")
            else:
                ids[f[0]] = f[1]
        for d in certs:
            if "client auth" not in d["spec"].get("usages", []):
                continue
            own = ([f"URI:{u}" for u in d["spec"].get("uris", [])] +
                   [f"DNS:{u}" for u in d["spec"].get("dnsNames", [])] +
                   [f"email:{u}" for u in d["spec"].get("emailAddresses", [])] +
                   ([f"CN:{d['spec']['commonName']}"] if d["spec"].get("commonName") else []))
            if not any(i in ids for i in own):
                bad.append(f"tls: client Certificate {d['metadata']['name']} has no identity in {key}")
print("\n".join(bad))
raise SystemExit(1 if bad else 0)
PY
check "deploy/k8s/secret.example.yaml holds placeholders only" python3 - <<'PY'
import yaml
d = yaml.safe_load(open("deploy/k8s/secret.example.yaml"))
vals = list(d.get("stringData", {}).values()) + list(d.get("data", {}).values())
bad = [v for v in vals if "REPLACE_WITH" not in v]
print("\n".join(f"not a placeholder: {v!r}" for v in bad))
raise SystemExit(1 if bad or not vals else 0)
PY
if [[ -n "$server_bin" ]]; then
  # The server rejects an unknown or malformed setting before it listens (exit 2); with a
  # model path that does not exist it stops right after accepting the settings.
  config_check() {
    local out
    out="$("$server_bin" --config deploy/k8s/base/ctxcache.yaml --listen 127.0.0.1:0 \
      --metrics-listen 127.0.0.1:0 --model "$tmp/no-such-model.gguf" 2>&1)"
    echo "$out" | tail -n 3
    grep -q "listening on" <<<"$out"
  }
  check "ctxcache-server accepts deploy/k8s/base/ctxcache.yaml" config_check
  # The tls overlay's environment (TLS files, tenants file, token file) accepted too, with a
  # CA, server certificate and key made here by openssl as docs/operations.md shows, the
  # ConfigMap's files written out, and the other mounted paths moved under $tmp. Only for a
  # server built with TLS.
  tls_env_check() {
    local d="$tmp/tls-env" out
    mkdir -p "$d" && cd "$d" || return 1
    {
      openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout ca.key -out ca.crt -days 2 -subj "/CN=deploy-test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" &&
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
          -keyout tls.key -out tls.csr -subj "/CN=ctxcache" &&
        printf '%s\n' "subjectAltName=DNS:ctxcache,DNS:localhost" "extendedKeyUsage=serverAuth" >tls.ext &&
        openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
          -extfile tls.ext -out tls.crt
    } >openssl.log 2>&1 || { cat openssl.log; cd "$root"; return 1; }
    cd "$root" || return 1
    local envs
    envs="$(python3 - "$tmp/k8s/tls.yaml" "$d" <<'PY'
import os, sys, yaml
ds = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = sys.argv[2]
dep = next(d for d in ds if d["kind"] == "Deployment" and d["metadata"]["name"] == "ctxcache")
pod = dep["spec"]["template"]["spec"]
c = next(c for c in pod["containers"] if c["name"] == "ctxcache")
vols = {v["name"]: v for v in pod["volumes"]}
for e in c.get("env", []):
    v = e.get("value")
    if v is None or not v.startswith("/etc/ctxcache/"):
        if v is not None:
            print(f"{e['name']}={v}")
        continue
    m = next((m for m in c["volumeMounts"] if v.startswith(m["mountPath"].rstrip("/") + "/")), None)
    assert m, f"{e['name']}={v} is on no mounted volume"
    vol, rel = vols[m["name"]], os.path.relpath(v, m["mountPath"])
    if "configMap" in vol:
        cm = next(d for d in ds if d["kind"] == "ConfigMap" and d["metadata"]["name"] == vol["configMap"]["name"])
        path = os.path.join(out, m["name"], rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write(cm["data"][rel])
    elif vol.get("secret", {}).get("secretName") == "ctxcache-tls":
        path = os.path.join(out, rel)  # made by openssl above
    else:  # ctxcache-secrets: the token file
        path = os.path.join(out, m["name"], rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write("deploy-test-token tenant-a\n")
    assert os.path.isfile(path), path
    print(f"{e['name']}={path}")
PY
)" || { echo "$envs"; return 1; }
    echo "$envs" | sed 's/^/env: /'
    mapfile -t envs <<<"$envs"
    out="$(env "${envs[@]}" "$server_bin" --config deploy/k8s/base/ctxcache.yaml \
      --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --model "$tmp/no-such-model.gguf" 2>&1)"
    echo "$out" | tail -n 4
    grep -q "listening on.*TLS: mutual" <<<"$out" && grep -q "serving Prometheus metrics on https://" <<<"$out"
  }
  if ! grep -q -- "--tls-cert" <<<"$("$server_bin" --help 2>&1)"; then
    echo "skip tls overlay server check: $server_bin has no --tls-cert"
  elif ! command -v openssl >/dev/null; then
    echo "skip tls overlay server check: no openssl"
  else
    check "ctxcache-server accepts the tls overlay's TLS settings (certificates made by openssl)" \
      tls_env_check
  fi
  # Dockerfile.cpu's runtime stage installs named library packages: every shared library the
  # built binaries link must come from one of them or their dependencies.
  runtime_libs_check() {
    local pkgs closure lib real pkg bad=0
    pkgs="$(python3 -c '
import re
s = open("docker/Dockerfile.cpu").read().split("AS runtime", 1)[1]
m = re.search(r"apt-get install -y --no-install-recommends(.*?)(&&|$)", s, re.S)
print(" ".join(w for w in m.group(1).replace("\\", " ").split() if not w.startswith("-")))')"
    closure="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
      --no-breaks --no-replaces --no-enhances $pkgs | grep -v '^ ' | sed 's/:.*//' | sort -u)"
    for bin in "$server_bin" "$(dirname "$server_bin")/ctxcache"; do
      [[ -x "$bin" ]] || continue
      while read -r lib; do
        # The CUDA toolkit's libraries (cudart, cuBLAS): a build with the CUDA backend links
        # them; Dockerfile.cpu builds with -DCTXCACHE_CUDA=OFF, so its binaries do not.
        [[ "$(readlink -f "$lib")" == */cuda* ]] && continue
        # dpkg knows a file by one of its names (usrmerge: /lib is /usr/lib).
        real="$(readlink -f "$lib")"
        pkg="$( (dpkg -S "$real" || dpkg -S "${real#/usr}" || dpkg -S "$lib") 2>/dev/null |
          head -n 1 | cut -d: -f1)"
        if [[ -z "$pkg" ]] || ! grep -qx "$pkg" <<<"$closure"; then
          echo "$(basename "$bin"): $lib (package ${pkg:-unknown}) is not installed by the runtime stage"
          bad=1
        fi
      done < <(ldd "$bin" | awk '$3 ~ /^\// {print $3}')
    done
    echo "runtime packages: $pkgs"
    return $bad
  }
  check "Dockerfile.cpu's runtime packages provide every library the binaries link" \
    runtime_libs_check
else
  echo "skip ctxcache-server config check: no server binary given"
fi

echo "== Prometheus Adapter (the HPA's custom metrics)"
mkdir -p "$tmp/adapter"
# The adapter's rules (Helm values) against their schema; every metric their seriesQuery and
# metricsQuery name is in deploy/metrics.txt (tools/check_dashboard.py's rules, rate() of
# counters only); each rule's series is one its name.matches accepts; its resource labels are
# ones the scrape configs set; every Pods metric of a rendered HPA is served by a rule, and dev
# (no adapter) has none. Writes the metricsQuery templates, filled in as the adapter fills them
# for a pods query, as recording rules for promtool below.
check "prometheus-adapter rules: schema, metric names in deploy/metrics.txt, the HPA's metrics served" \
  python3 - "$tmp" <<'PY'
import json, re, sys, yaml, jsonschema
sys.path.insert(0, "tools")
from check_dashboard import check_expr, load_metrics
tmp = sys.argv[1]
path = "deploy/k8s/monitoring/prometheus-adapter/values.yaml"
values = yaml.safe_load(open(path))
jsonschema.validate(values, json.load(open("deploy/k8s/schemas/prometheus-adapter-values.schema.json")))
families = load_metrics("deploy/metrics.txt")
bad, served, records = [], {}, []
prom = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
scrape_labels = {r["target_label"] for j in prom["scrape_configs"] for r in j.get("relabel_configs", [])
                 if "target_label" in r}
sm = yaml.safe_load(open("deploy/k8s/monitoring/servicemonitor.yaml"))
sm_labels = {"namespace"} | {r["targetLabel"] for e in sm["spec"]["endpoints"]
                             for r in e.get("relabelings", []) if "targetLabel" in r}
# What the adapter puts in for a pods query of namespace ctxcache, pods a, b and c.
matchers = 'namespace="ctxcache",pod=~"ctxcache-a|ctxcache-b|ctxcache-c"'
for i, r in enumerate(values["rules"]["custom"]):
    where = f"{path}: rules.custom[{i}]"
    m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*", r["seriesQuery"])
    if not m:
        bad.append(f"{where}: seriesQuery must select one metric by name: {r['seriesQuery']!r}")
        continue
    series = m.group(1)
    check_expr(r["seriesQuery"], families, f"{where} seriesQuery", bad)
    if not re.search(r["name"]["matches"], series):
        bad.append(f"{where}: name.matches {r['name']['matches']!r} rejects {series}")
    as_ = r["name"]["as"] or series
    if as_ in served:
        bad.append(f"{where}: {as_} served by two rules")
    served[as_] = series
    for label in r["resources"].get("overrides", {}):
        if label not in scrape_labels or label not in sm_labels:
            bad.append(f"{where}: label {label!r} is not set by prometheus.yml and the ServiceMonitor")
    q = r["metricsQuery"]
    q = q.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
    q = q.replace("<<.GroupBy>>", "pod")
    if "<<" in q or ">>" in q:
        bad.append(f"{where}: metricsQuery uses a template field other than Series, LabelMatchers, GroupBy")
        continue
    check_expr(q, families, f"{where} metricsQuery", bad)
    records.append({"record": f"adapter:{as_}", "expr": q})
yaml.safe_dump({"groups": [{"name": "prometheus-adapter", "rules": records}]},
               open(f"{tmp}/adapter/rules.yml", "w"), sort_keys=False)
for o in ("cpu", "gpu", "dev"):
    for d in yaml.safe_load_all(open(f"{tmp}/k8s/{o}.yaml")):
        if not d or d["kind"] != "HorizontalPodAutoscaler":
            continue
        pods = [m["pods"]["metric"]["name"] for m in d["spec"]["metrics"] if m["type"] == "Pods"]
        other = [m["type"] for m in d["spec"]["metrics"] if m["type"] not in ("Pods", "Resource")]
        if other:
            bad.append(f"{o}: HPA uses {other} metrics, which no rule here serves")
        if o == "dev":
            if pods:
                bad.append(f"dev: HPA reads {pods} but dev has no adapter (it would never scale down)")
            continue
        if sorted(pods) != sorted(served):
            bad.append(f"{o}: HPA Pods metrics {pods}, adapter serves {sorted(served)}")
print("\n".join(bad) or f"rules serve {', '.join(f'{k} (from {v})' for k, v in served.items())}")
raise SystemExit(1 if bad else 0)
PY
check "HPA: queue-depth target is a quarter of max_queue_depth; utilisation target 0 to 1" \
  python3 - "$tmp/k8s" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("deploy/k8s/base/ctxcache.yaml"))
hpa = next(d for d in yaml.safe_load_all(open(f"{sys.argv[1]}/base.yaml"))
           if d and d["kind"] == "HorizontalPodAutoscaler")
t = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]
     if m["type"] == "Pods"}
def qty(v):
    v = str(v)
    return int(v[:-1]) / 1000 if v.endswith("m") else float(v)
q, u = t["ctxcache_queue_depth"], t["ctxcache_worker_utilization"]
ok = (q["type"] == u["type"] == "AverageValue" and qty(q["averageValue"]) == cfg["max_queue_depth"] / 4
      and 0 < qty(u["averageValue"]) < 1)
print(f"queue depth {q['averageValue']} per pod (max_queue_depth {cfg['max_queue_depth']}), "
      f"utilisation {u['averageValue']}")
raise SystemExit(0 if ok else 1)
PY
check "promtool check rules: the adapter's metricsQuery, filled in" \
  promtool check rules "$tmp/adapter/rules.yml"
# Synthetic scrapes of three pods and a same-named pod in another namespace: the utilisation is
# busy seconds per second over the pod's workers (a: 1.5/2, b: 0.5/2; c is loading, 0 workers:
# no value), and the other namespace does not leak in through either side of the division.
cat >"$tmp/adapter/rules_test.yml" <<'YML'
rule_files:
  - rules.yml
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'ctxcache_worker_busy_seconds_total{namespace="ctxcache",pod="ctxcache-a"}'
        values: '0+22.5x40'
      - series: 'ctxcache_workers{namespace="ctxcache",pod="ctxcache-a"}'
        values: '2x40'
      - series: 'ctxcache_worker_busy_seconds_total{namespace="ctxcache",pod="ctxcache-b"}'
        values: '0+7.5x40'
      - series: 'ctxcache_workers{namespace="ctxcache",pod="ctxcache-b"}'
        values: '2x40'
      - series: 'ctxcache_worker_busy_seconds_total{namespace="ctxcache",pod="ctxcache-c"}'
        values: '0x40'
      - series: 'ctxcache_workers{namespace="ctxcache",pod="ctxcache-c"}'
        values: '0x40'
      - series: 'ctxcache_worker_busy_seconds_total{namespace="other",pod="ctxcache-a"}'
        values: '0+60x40'
      - series: 'ctxcache_workers{namespace="other",pod="ctxcache-a"}'
        values: '4x40'
      - series: 'ctxcache_queue_depth{namespace="ctxcache",pod="ctxcache-a"}'
        values: '16x40'
      - series: 'ctxcache_queue_depth{namespace="ctxcache",pod="ctxcache-b"}'
        values: '0x30 8x10'
      - series: 'ctxcache_queue_depth{namespace="ctxcache",pod="ctxcache-c"}'
        values: '0x40'
      - series: 'ctxcache_queue_depth{namespace="other",pod="ctxcache-a"}'
        values: '64x40'
    promql_expr_test:
      - expr: adapter:ctxcache_worker_utilization
        eval_time: 10m
        exp_samples:
          - labels: 'adapter:ctxcache_worker_utilization{pod="ctxcache-a"}'
            value: 0.75
          - labels: 'adapter:ctxcache_worker_utilization{pod="ctxcache-b"}'
            value: 0.25
      - expr: adapter:ctxcache_queue_depth
        eval_time: 10m
        exp_samples:
          - labels: 'adapter:ctxcache_queue_depth{pod="ctxcache-a"}'
            value: 16
          - labels: 'adapter:ctxcache_queue_depth{pod="ctxcache-b"}'
            value: 8
          - labels: 'adapter:ctxcache_queue_depth{pod="ctxcache-c"}'
            value: 0
YML
check "promtool test rules: utilisation and queue depth per pod from synthetic series" \
  promtool test rules "$tmp/adapter/rules_test.yml"

echo "== YAML lint"
check "yamllint --strict -c .yamllint deploy docker .yamllint" \
  yamllint --strict -c .yamllint deploy docker .yamllint

echo "== Docker (images are not built here: no Docker; static checks only)"
check "docker/docker-compose.yml parses and its references exist" python3 - <<'PY'
import os, yaml
base = "docker"
c = yaml.safe_load(open(f"{base}/docker-compose.yml"))
bad = []
svcs = c["services"]
for name in ("ctxcache", "redis", "prometheus", "grafana"):
    if name not in svcs:
        bad.append(f"no service {name}")
for name, s in svcs.items():
    b = s.get("build")
    if b:
        ctx = os.path.normpath(os.path.join(base, b["context"]))
        if not os.path.isfile(os.path.join(ctx, b["dockerfile"])):
            bad.append(f"{name}: dockerfile {b['dockerfile']} not in {ctx}")
    for v in s.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            if not os.path.exists(os.path.normpath(os.path.join(base, src))):
                bad.append(f"{name}: volume source {src} does not exist")
    for d in s.get("depends_on", []):
        if d not in svcs:
            bad.append(f"{name}: depends on unknown {d}")
# Prometheus' config file is inside its mounted folder, and names rules.yml beside it.
prom = svcs["prometheus"]
cfg = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
host = next((os.path.join(base, src, os.path.relpath(cfg, dst)) for dst, src in mounts.items()
             if cfg.startswith(dst + "/")), None)
if not host or not os.path.isfile(os.path.normpath(host)):
    bad.append(f"prometheus config {cfg} is not a mounted file")
else:
    pc = yaml.safe_load(open(os.path.normpath(host)))
    if pc["scrape_configs"][0]["static_configs"][0]["targets"] != ["ctxcache:9464"]:
        bad.append("prometheus does not scrape ctxcache:9464")
# Grafana's provider path holds the mounted dashboard.
gv = {v.split(":")[1]: v.split(":")[0] for v in svcs["grafana"]["volumes"]}
prov = yaml.safe_load(open("deploy/grafana/provisioning/dashboards/ctxcache.yml"))
path = prov["providers"][0]["options"]["path"]
if not any(dst.startswith(path + "/") and dst.endswith(".json") for dst in gv):
    bad.append(f"no dashboard JSON mounted under the provider path {path}")
ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))
if ds["datasources"][0]["url"] != "http://prometheus:9090":
    bad.append("data source does not point at the prometheus service")
print("\n".join(bad))
raise SystemExit(1 if bad else 0)
PY
check "Dockerfiles: tools/setup.sh, multi-stage, non-root, ports, entrypoint" python3 - <<'PY'
import re
bad = []
# The base images are build arguments defaulting to the public Debian ones (tools/build_images.sh
# passes locally made ones), the same in both files.
for f, extra in (("docker/Dockerfile.cpu", [r"ARG BASE_IMAGE=debian:12\n",
                                            r"ARG RUNTIME_IMAGE=debian:12-slim\n",
                                            r"FROM \$\{BASE_IMAGE\} AS builder",
                                            r"FROM \$\{RUNTIME_IMAGE\} AS runtime"]),
                 ("docker/Dockerfile.cuda", [r"-DCTXCACHE_CUDA=ON", r"FROM nvidia/cuda:\S+-devel",
                                             r"ARG BASE_IMAGE=debian:12\n",
                                             r"FROM \$\{BASE_IMAGE\} AS builder",
                                             r"FROM nvidia/cuda:\S+-runtime"])):
    s = open(f).read()
    for pat in [r"RUN tools/setup\.sh --image\n", r"USER 10001", r"EXPOSE 50051 9464",
                r'ENTRYPOINT \["ctxcache-server", "--listen", "0\.0\.0\.0:50051", '
                r'"--metrics-listen", "0\.0\.0\.0:9464"\]'] + extra:
        if not re.search(pat, s):
            bad.append(f"{f}: no {pat}")
    if len(re.findall(r"^FROM ", s, re.M)) < 2:
        bad.append(f"{f}: not multi-stage")
    # Every COPY from the build context names something that exists.
    for m in re.finditer(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", s, re.M):
        import os
        if not os.path.exists(m.group(1)):
            bad.append(f"{f}: COPY source {m.group(1)} does not exist")
    # -march is never set: the build must stay portable (runtime dispatch in common/).
    if "-march" in "\n".join(l for l in s.splitlines() if not l.lstrip().startswith("#")):
        bad.append(f"{f}: sets -march")
print("\n".join(bad))
raise SystemExit(1 if bad else 0)
PY

check "docker/last_build.json: the last image build and smoke test, passed" python3 - <<'PY'
import json, re
bad = []
try:
    r = json.load(open("docker/last_build.json"))
except (OSError, ValueError) as e:
    raise SystemExit(f"docker/last_build.json: {e} (tools/build_images.sh --smoke --record)")
for k in ("date", "commit", "image", "image_size", "build_seconds", "smoke_test"):
    if k not in r:
        bad.append(f"no {k}")
if r.get("smoke_test") != "pass":
    bad.append(f"smoke_test is {r.get('smoke_test')!r}, not 'pass'")
if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(r.get("date", ""))):
    bad.append(f"date {r.get('date')!r} is not UTC ISO 8601")
print("\n".join(bad))
raise SystemExit(1 if bad else 0)
PY

echo "deploy_test: $passed passed, $failed failed"
((failed == 0)) || { printf 'failed: %s\n' "${failures[@]}"; exit 1; }
exit 0
