#!/usr/bin/env bash
# Builds the real control-plane programs (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok), helm (install tests, kas's rendering), kustomize (kas's
# rendering), promtool for the monitoring test, the distribution registry (kas's oci:// charts)
# and the peers' GitOps engines the benchmark runs (bench/engines), from Go modules at the
# versions pinned in versions.env (the engines: in their go.mod), into a cache outside the
# repository. Each program lives in a folder keyed by its version, so a build happens only
# when a binary is missing or a pin changed. Prints the bin directory on stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${TETHER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tether}
bin="$cache/bin"
mkdir -p "$bin"

log() { echo "testenv/build: $*" >&2; }

command -v go >/dev/null || { log "Go is required (go1.26 or newer)"; exit 1; }
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false

# Kubernetes: `go install k8s.io/kubernetes/...@v` cannot work because its go.mod replaces every
# staging module with a local path. A wrapper module of our own requires k8s.io/kubernetes and
# maps each staging module (required there at the v0.0.0 placeholder) to its published v0.X.Y.
build_k8s() {
  local v=$K8S_VERSION out="$bin/k8s-$K8S_VERSION"
  if [ -f "$out/.complete" ]; then return; fi
  log "building Kubernetes $v (cold builds take 10-25 minutes on 2 cores)"
  local staging="v0.${v#v1.}" minor
  minor=$(echo "$v" | cut -d. -f2)
  local work="$cache/work/k8s-$v"
  rm -rf "$work" && mkdir -p "$work" "$out"
  local gomod
  gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$v" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module tether.local/testenv/k8s"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    grep -E '^[[:space:]]*k8s\.io/[A-Za-z0-9._/-]+ v0\.0\.0([[:space:]]*(//.*)?)?$' "$gomod" | awk -v s="$staging" '{print "replace " $1 " => " $1 " " s}' | sort -u
    echo
    echo "tool ("
    for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
      echo "	k8s.io/kubernetes/cmd/$c"
    done
    echo ")"
  } >"$work/go.mod"
  (cd "$work" && go mod tidy >&2)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  (cd "$work" && go build -trimpath -ldflags "$ld" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl >&2)
  touch "$out/.complete"
}

# etcd: also carries replace directives of its own, so it gets a separate wrapper module
# (dependency modules' replaces are ignored, the published siblings are used instead).
build_etcd() {
  local v=$ETCD_VERSION out="$bin/etcd-$ETCD_VERSION"
  if [ -f "$out/.complete" ]; then return; fi
  log "building etcd $v"
  local work="$cache/work/etcd-$v"
  rm -rf "$work" && mkdir -p "$work" "$out"
  printf 'module tether.local/testenv/etcd\n\ngo 1.26.0\n' >"$work/go.mod"
  (cd "$work" && go get -tool "go.etcd.io/etcd/server/v3@$v" >&2 \
    && go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3 >&2)
  touch "$out/.complete"
}

# kwok plays the kubelet for fake Nodes; it refuses to start without Stage definitions, so the
# default stages shipped inside the module are gathered into one config file beside the binary.
build_kwok() {
  local v=$KWOK_VERSION out="$bin/kwok-$KWOK_VERSION"
  if [ -f "$out/.complete" ]; then return; fi
  log "building kwok $v"
  mkdir -p "$out"
  GOBIN="$out" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$v" >&2
  local dir
  dir=$(cd "$out" && go mod download -json "sigs.k8s.io/kwok@$v" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  local s="$dir/kustomize/stage"
  {
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      [ -f "$s/$f" ] || { log "kwok stage $f not found in $s"; exit 1; }
      echo "---"
      cat "$s/$f"
    done
  } >"$out/stages.yaml"
  touch "$out/.complete"
}

# A Go program installed into its own versioned folder: go_install NAME VERSION VERSION_VAR PACKAGE,
# where VERSION_VAR is the variable the program reports its version from (set with -X).
go_install() {
  local name=$1 v=$2 var=$3 pkg=$4 out="$bin/$1-$2"
  if [ -f "$out/.complete" ]; then return; fi
  log "building $name $v"
  mkdir -p "$out"
  GOBIN="$out" go install -trimpath -ldflags "-s -w -X $var=$v" "$pkg@$v" >&2
  touch "$out/.complete"
}

# helm: the install tests use it as a real client of the charts under deploy/helm, and kas
# renders Helm charts with it. Without the version ldflag, `helm version` reports only the
# minor version.
build_helm() {
  go_install helm "$HELM_VERSION" helm.sh/helm/v3/internal/version.version helm.sh/helm/v3/cmd/helm
}

# kustomize: kas renders Kustomize directories with it (v5.8.3 needs go1.27; v5.8.2 builds with
# the machine's go1.26).
build_kustomize() {
  go_install kustomize "$KUSTOMIZE_VERSION" sigs.k8s.io/kustomize/api/provenance.version \
    sigs.k8s.io/kustomize/kustomize/v5
}

# registry: the CNCF distribution registry, a real OCI registry the rendering tests push charts to
# (with the real helm) and kas reads `oci://` charts from: anonymous, behind htpasswd or tokens,
# blobs on the filesystem or moved elsewhere by the redirect middleware. Its cmd/registry links
# every storage driver (S3, Azure, GCS: 1.2 GB of modules, about 4.5 minutes cold on 2 shared
# cores); a main of our own links only what the tests use (about 350 MB, 2.5 minutes cold).
build_registry() {
  local v=$DISTRIBUTION_VERSION out="$bin/registry-$DISTRIBUTION_VERSION"
  if [ -f "$out/.complete" ]; then return; fi
  log "building the distribution registry $v"
  local work="$cache/work/registry-$v" m=github.com/distribution/distribution/v3
  rm -rf "$work" && mkdir -p "$work" "$out"
  printf 'module tether.local/testenv/registry\n\ngo 1.26.0\n' >"$work/go.mod"
  cat >"$work/main.go" <<EOF
// The distribution registry with the auth and storage the tests use.
package main

import (
	"$m/registry"
	_ "$m/registry/auth/htpasswd"
	_ "$m/registry/auth/token"
	_ "$m/registry/storage/driver/filesystem"
	_ "$m/registry/storage/driver/middleware/redirect"
)

func main() {
	if err := registry.RootCmd.Execute(); err != nil {
		panic(err)
	}
}
EOF
  (cd "$work" && go get "$m@$v" >&2 && go mod tidy >&2 \
    && go build -trimpath -ldflags "-s -w -X $m/version.version=$v" -o "$out/registry" . >&2)
  touch "$out/.complete"
}

# promtool: the monitoring test checks deploy/monitoring's alert rules (syntax and unit tests)
# and the metrics both binaries export (Prometheus naming conventions) with it.
build_promtool() {
  local v=$PROMETHEUS_VERSION out="$bin/promtool-$PROMETHEUS_VERSION"
  if [ -f "$out/.complete" ]; then return; fi
  log "building promtool $v"
  mkdir -p "$out"
  GOBIN="$out" go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$v" >&2
  touch "$out/.complete"
}

# The peers' GitOps engines the benchmark compares agentk with (bench/engines: Flux's
# fluxcd/pkg/ssa and sigs.k8s.io/cli-utils, pinned by their go.mod/go.sum). Keyed by a hash of
# the programs' source, so an edit rebuilds and an unchanged tree reuses the cached binaries.
build_engine() {
  local name=$1 module=$2 src="$here/../bench/engines/$1"
  local key
  key=$(cd "$here/../bench/engines" && cat common/* "$name"/* | sha256sum | cut -c1-12)
  local out="$bin/engine-$name-$key"
  if [ -f "$out/.complete" ]; then
    ln -sfn "$out/$name" "$bin/current/$name"
    return
  fi
  local v
  v=$(awk -v m="$module" '$1 == m {print $2; exit} $1 == "require" && $2 == m {print $3; exit}' "$src/go.mod")
  [ -n "$v" ] || { log "$module is not required in $src/go.mod"; exit 1; }
  log "building the $name engine ($module $v)"
  # Builds of older source are of no use any more.
  rm -rf "$bin/engine-$name-"*
  mkdir -p "$out"
  (cd "$src" && go build -mod=readonly -trimpath -ldflags "-s -w -X main.version=$v" -o "$out/$name" . >&2)
  touch "$out/.complete"
  ln -sfn "$out/$name" "$bin/current/$name"
}

build_etcd
build_kwok
build_k8s
build_helm
build_kustomize
build_promtool
build_registry

# A stable folder of links, so callers need one path whatever the versions are.
cur="$bin/current"
mkdir -p "$cur"
build_engine flux-ssa github.com/fluxcd/pkg/ssa
build_engine cli-utils sigs.k8s.io/cli-utils
ln -sfn "$bin/etcd-$ETCD_VERSION/etcd" "$cur/etcd"
ln -sfn "$bin/kwok-$KWOK_VERSION/kwok" "$cur/kwok"
ln -sfn "$bin/kwok-$KWOK_VERSION/stages.yaml" "$cur/kwok-stages.yaml"
ln -sfn "$bin/helm-$HELM_VERSION/helm" "$cur/helm"
ln -sfn "$bin/kustomize-$KUSTOMIZE_VERSION/kustomize" "$cur/kustomize"
ln -sfn "$bin/promtool-$PROMETHEUS_VERSION/promtool" "$cur/promtool"
ln -sfn "$bin/registry-$DISTRIBUTION_VERSION/registry" "$cur/registry"
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  ln -sfn "$bin/k8s-$K8S_VERSION/$c" "$cur/$c"
done
echo "$cur"
