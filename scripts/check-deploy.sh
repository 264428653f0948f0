#!/usr/bin/env bash
# Validates the deployment files without a container engine: the compose
# file with `docker compose config` (or docker-compose), the proxy configs
# they carry with `rlsproxy check`, and the Kubernetes manifest's YAML.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    if ! command -v docker-compose >/dev/null 2>&1; then
        echo "installing docker-compose (validation only, no engine)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
    fi
    compose=(docker-compose)
fi
"${compose[@]}" -f docker-compose.yml config -q
echo "ok   docker-compose.yml is valid"

cargo build --quiet
BIN=target/debug/rlsproxy
RLSPROXY_UPSTREAM_HOST=postgres RLSPROXY_ISSUER=http://issuer:9931 \
RLSPROXY_AUTHENTICATED_PASSWORD=x RLSPROXY_ANONYMOUS_PASSWORD=y \
    "$BIN" check --config deploy/compose/proxy.toml >/dev/null
echo "ok   deploy/compose/proxy.toml passes rlsproxy check"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/k8s.toml" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open("deploy/kubernetes/rlsproxy.yaml")))
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["ConfigMap", "Deployment", "Secret", "Service"], kinds
deploy = next(d for d in docs if d["kind"] == "Deployment")
probe = deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
assert probe == "/readyz", probe
text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["proxy.toml"]
# Certificates exist only inside the cluster; check the rest.
text = text.split("[tls]")[0] + "\n[pool]" + text.split("[pool]")[1]
open(sys.argv[1], "w").write(text)
PY
RLSPROXY_AUTHENTICATED_PASSWORD=x RLSPROXY_ANONYMOUS_PASSWORD=y "$BIN" check --config "$work/k8s.toml" >/dev/null
echo "ok   deploy/kubernetes/rlsproxy.yaml parses and its proxy.toml passes rlsproxy check"
