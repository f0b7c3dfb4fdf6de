#!/usr/bin/env bash
# Runs the built images the way a platform would, without a Docker daemon (buildah, chroot
# isolation; the containers share the host's loopback network):
#   tools/image_smoke_test.sh [IMAGE] [REDIS_IMAGE]
#     (default localhost/ctxcache-cpu:VERSION and localhost/ctxcache-redis:7, which
#      tools/build_images.sh makes)
#
#  1. a Redis container from REDIS_IMAGE (its entrypoint, as its user);
#  2. ctxcache-server from IMAGE: the image's entrypoint as the image's user (10001), with
#     --listen / --metrics-listen moved to free loopback ports and --redis-url pointing at (1);
#  3. waits (at most CTXCACHE_SMOKE_TIMEOUT seconds, default 300) for grpc.health.v1 SERVING,
#     then from the host with the CLI (build/server/ctxcache): compress a document, ask a
#     question about it (the default model must answer it), scrape /metrics (the calls, Redis
#     up, the context written to Redis), and checks the context's keys in Redis;
#  4. SIGTERM to the server: it must drain and exit 0.
# Exit 0 when all of it held; otherwise 1 with the server's last log lines.
# CTXCACHE_SMOKE_SERVER_ARGS: more server arguments, appended (e.g. `--model /nonexistent`
# shows the failure path: the server exits before it is healthy, the test fails with its log).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
version="$(sed -n 's/^project(ctxcache VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)"
image="${1:-localhost/ctxcache-cpu:$version}"
redis_image="${2:-localhost/ctxcache-redis:7}"
cli="${CTXCACHE_CLI:-$root/build/server/ctxcache}"
timeout_s="${CTXCACHE_SMOKE_TIMEOUT:-300}"
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot

die() { echo "image_smoke_test: $*" >&2; exit 1; }
command -v buildah >/dev/null || die "buildah not found: install the Debian package buildah"
command -v curl >/dev/null || die "curl not found: install the Debian package curl"
[[ -x "$cli" ]] || die "no CLI at $cli: build it (cmake --build build --target ctxcache)"
[[ $(id -u) -eq 0 ]] || die "run as root (buildah's chroot isolation needs it)"

work="$(mktemp -d /tmp/ctxcache-smoke.XXXXXX)"
server_ctr="" redis_ctr="" server_runner="" redis_runner=""
cleanup() {
  local p i
  for p in "$server_runner" "$redis_runner"; do
    [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null || continue
    kill_inner "$p" KILL
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  for c in "$server_ctr" "$redis_ctr"; do [[ -n "$c" ]] && buildah rm "$c" >/dev/null 2>&1; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "image_smoke_test: FAIL: $*" >&2
  echo "--- ctxcache-server's last log lines ---" >&2
  tail -n 40 "$work/server.log" >&2 || true
  exit 1
}

# The process a `buildah run` started: its descendant whose argv[0] is `name` (the comm of a
# process buildah's chroot runtime starts is "exe", so the command line is what names it).
inner_pid() {
  local parent="$1" name="$2" p argv0
  for p in $(pgrep -P "$parent" 2>/dev/null); do
    argv0="$(tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | head -n 1)"
    argv0="${argv0%% *}"  # redis-server rewrites its title to "/usr/bin/redis-server HOST:PORT"
    if [[ "${argv0##*/}" == "$name" ]]; then echo "$p"; return 0; fi
    inner_pid "$p" "$name" && return 0
  done
  return 1
}
kill_inner() {
  local p
  for name in ctxcache-server redis-server; do
    p="$(inner_pid "$1" "$name" || true)"
    [[ -n "$p" ]] && kill "-$2" "$p" 2>/dev/null
  done
  return 0
}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# The image's configuration as a runtime reads it (buildah inspect's JSON; this buildah's
# --format has no json function). image_config IMAGE EXPR prints the Python expression EXPR
# over `oci` (the OCI config) and `docker` (the Docker config): lists NUL-separated, since an
# argument may be empty.
image_config() {
  buildah inspect --type image "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
oci, docker = d["OCIv1"].get("config", {}), d["Docker"].get("config", {})
v = eval(sys.argv[1])
sys.stdout.write("".join(a + "\0" for a in v) if isinstance(v, list) else str(v or ""))' "$2"
}
entrypoint() { image_config "$1" 'oci.get("Entrypoint") or []'; }
image_user() { image_config "$1" 'oci.get("User")'; }

redis_port="$(free_port)" grpc_port="$(free_port)" metrics_port="$(free_port)"
while [[ "$metrics_port" == "$grpc_port" || "$metrics_port" == "$redis_port" ]]; do
  metrics_port="$(free_port)"
done

# 1. Redis.
redis_ctr="$(buildah from "$redis_image")"
mapfile -d '' -t redis_cmd < <(entrypoint "$redis_image")
((${#redis_cmd[@]})) || die "$redis_image has no entrypoint"
buildah run --user "$(image_user "$redis_image")" "$redis_ctr" -- "${redis_cmd[@]}" \
  --port "$redis_port" --bind 127.0.0.1 >"$work/redis.log" 2>&1 &
redis_runner=$!
for _ in $(seq 100); do
  grep -qs "Ready to accept connections" "$work/redis.log" && break
  kill -0 "$redis_runner" 2>/dev/null || { cat "$work/redis.log" >&2; die "Redis exited"; }
  sleep 0.1
done
grep -qs "Ready to accept connections" "$work/redis.log" || die "Redis not ready in 10 s"
echo "image_smoke_test: Redis from $redis_image on 127.0.0.1:$redis_port" >&2

# 2. ctxcache-server: the image's entrypoint, its user; later flags win over the entrypoint's.
server_ctr="$(buildah from "$image")"
mapfile -d '' -t server_cmd < <(entrypoint "$image")
[[ "${server_cmd[0]:-}" == ctxcache-server ]] || die "$image's entrypoint is not ctxcache-server: ${server_cmd[*]}"
user="$(image_user "$image")"
[[ "$user" == 10001:10001 ]] || die "$image runs as '$user', not 10001:10001"
start=$SECONDS
buildah run --user "$user" "$server_ctr" -- "${server_cmd[@]}" \
  --listen "127.0.0.1:$grpc_port" --metrics-listen "127.0.0.1:$metrics_port" \
  --redis-url "redis://127.0.0.1:$redis_port" ${CTXCACHE_SMOKE_SERVER_ARGS:-} >"$work/server.log" 2>&1 &
server_runner=$!
address="127.0.0.1:$grpc_port"

# 3. Health, then the calls.
until "$cli" health --server "$address" --timeout 2 >/dev/null 2>&1; do
  kill -0 "$server_runner" 2>/dev/null || fail "ctxcache-server exited before it was healthy"
  ((SECONDS - start < timeout_s)) || fail "not SERVING within ${timeout_s}s"
  sleep 1
done
echo "image_smoke_test: SERVING after $((SECONDS - start))s" >&2
# The image's own HEALTHCHECK command (the CLI inside the image) on the moved port.
health_cmd="$(image_config "$image" '" ".join((docker.get("Healthcheck") or {}).get("Test", [])[1:])')"
[[ "$health_cmd" == "ctxcache health --server 127.0.0.1:50051 --timeout 3" ]] ||
  fail "unexpected HEALTHCHECK: $health_cmd"
buildah run --user "$user" "$server_ctr" -- ctxcache health --server "$address" --timeout 3 \
  >"$work/health.out" 2>&1 || fail "the image's health check failed: $(cat "$work/health.out")"
server_pid="$(inner_pid "$server_runner" ctxcache-server)" || fail "cannot find the server process"
uid="$(awk '/^Uid:/ {print $2}' "/proc/$server_pid/status")"
[[ "$uid" == 10001 ]] || fail "the server process runs as uid $uid"

cat >"$work/doc.txt" <<'EOF'
Minutes of the harbour committee. The committee approved the repair of the north pier for
412,000 euros. The work starts on June 28 and should take eleven weeks. The next meeting is on
11 April in the old customs house.
EOF
compressed="$("$cli" compress --server "$address" --timeout 120 --doc "$work/doc.txt" \
  --method kvzip --ratio 2 --json)" || fail "compress: $compressed"
id="$(sed -n 's/.*"context_id":"\([0-9a-f]\{64\}\)".*/\1/p' <<<"$compressed")"
[[ -n "$id" ]] || fail "compress printed no context id: $compressed"
answer="$("$cli" generate --server "$address" --timeout 120 --context "$id" --chat \
  --prompt "When is the next meeting?" --temperature 0 --max-tokens 24 --quiet)" ||
  fail "generate: $answer"
echo "image_smoke_test: answer: $answer" >&2
grep -q "11 April" <<<"$answer" || fail "the answer does not say 11 April: $answer"

scrape() { curl -fsS "http://127.0.0.1:$metrics_port/metrics"; }
metrics="$(scrape)" || fail "GET /metrics failed"
grep -q '^ctxcache_requests_total{rpc="Generate",code="OK"} 1$' <<<"$metrics" ||
  fail "/metrics does not count the Generate call"
grep -q '^ctxcache_redis_up 1$' <<<"$metrics" || fail "/metrics: Redis is not up"
# The context's write to Redis finishes in the background.
written=0
for _ in $(seq 50); do
  if scrape | grep -Eq '^ctxcache_redis_operations_total\{op="put"\} [1-9]'; then
    written=1
    break
  fi
  sleep 0.2
done
((written)) || fail "/metrics shows no write to Redis"
if command -v redis-cli >/dev/null; then
  keys="$(redis-cli -p "$redis_port" --scan --pattern "*$id*" | wc -l)"
  ((keys > 0)) || fail "Redis holds no key of context $id"
  echo "image_smoke_test: Redis holds $keys key(s) of the context" >&2
fi

# 4. SIGTERM: drain, exit 0.
kill -TERM "$server_pid"
status=0
wait "$server_runner" || status=$?
server_runner=""
((status == 0)) || fail "ctxcache-server exited $status after SIGTERM"
grep -q "server stopped" "$work/server.log" || fail "no 'server stopped' in the log"
kill_inner "$redis_runner" TERM
wait "$redis_runner" 2>/dev/null || true
redis_runner=""
echo "image_smoke_test: PASS ($image with $redis_image: healthy, answered, scraped, Redis written, drained on SIGTERM, exit 0)" >&2
