#!/usr/bin/env bash
# Builds the local control plane's binaries into a cache outside the clone:
#
#   $LLMOP_CACHE_DIR (default ~/.cache/llm-operator)
#     k8s-<v>/bin/   kube-apiserver kube-controller-manager kube-scheduler kubectl
#     etcd-<v>/bin/  etcd
#     kwok-<v>/bin/  kwok
#     helm-<v>/bin/  helm
#
# Each folder is named after its pinned version (versions.env) and carries a
# .stamp with a hash of its build inputs, so a warm run is a few stat calls and
# a version bump or an edited go.mod rebuilds only what changed.
#
# Usage: build.sh [k8s|etcd|kwok|helm ...]   (default: all)
#        build.sh --check                    exit 0 if everything is built
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"

cache="${LLMOP_CACHE_DIR:-$HOME/.cache/llm-operator}"
# Never let a module's toolchain line fetch another Go: build with the one here.
export GOTOOLCHAIN=local
# -trimpath: no local paths in binaries; -mod=readonly: go.sum in the repo is the
# whole truth, a build never rewrites it. GOFLAGS from the caller is replaced on
# purpose (e.g. -mod=vendor would break these wrapper modules).
export GOFLAGS="-trimpath -mod=readonly -buildvcs=false"
export CGO_ENABLED=0
NICE=(nice -n 10)

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# stamp_of <files/strings...>: a hash of the inputs that decide a component.
stamp_of() {
  { for x in "$@"; do if [ -f "$x" ]; then cat "$x"; else printf '%s\n' "$x"; fi; done
    go env GOVERSION; } | sha256sum | cut -d' ' -f1
}

# up_to_date <dir> <stamp> <binaries...>
up_to_date() {
  local dir="$1" stamp="$2"; shift 2
  [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ] || return 1
  for b in "$@"; do [ -x "$dir/$b" ] || return 1; done
}

# install_into <dir> <stamp> <tmpdir>: move freshly built binaries in atomically
# enough that an interrupted build never leaves a stamped, half-built folder.
install_into() {
  local dir="$1" stamp="$2" tmp="$3"
  mkdir -p "$dir"
  rm -f "$dir/.stamp"
  for f in "$tmp"/*; do mv -f "$f" "$dir/"; done
  printf '%s\n' "$stamp" >"$dir/.stamp"
}

build_k8s() {
  local dir="$cache/k8s-$K8S_VERSION/bin"
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local stamp; stamp="$(stamp_of "$K8S_VERSION" "$here/k8s/go.mod" "$here/k8s/go.sum")"
  up_to_date "$dir" "$stamp" "${bins[@]}" && { log "k8s $K8S_VERSION: cached in $dir"; return; }
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w"
  # Both packages carry version info: component-base for servers, client-go for
  # kubectl's client half. This is what hack/lib/version.sh sets for releases.
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  local tmp; tmp="$(mktemp -d "$cache/.build-k8s.XXXXXX")"
  log "k8s $K8S_VERSION: building ${bins[*]} (one go build, shared compilation)"
  # One invocation for the four commands: their common packages compile once.
  (cd "$here/k8s" && "${NICE[@]}" go build -ldflags "$ld" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  install_into "$dir" "$stamp" "$tmp"; rmdir "$tmp"
  log "k8s $K8S_VERSION: done"
}

build_etcd() {
  local dir="$cache/etcd-$ETCD_VERSION/bin"
  local stamp; stamp="$(stamp_of "$ETCD_VERSION" "$here/etcd/go.mod" "$here/etcd/go.sum" "$here/etcd/main.go")"
  up_to_date "$dir" "$stamp" etcd && { log "etcd $ETCD_VERSION: cached in $dir"; return; }
  grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$here/etcd/go.mod" ||
    { log "etcd/go.mod does not require server/v3 $ETCD_VERSION (versions.env)"; exit 1; }
  local tmp; tmp="$(mktemp -d "$cache/.build-etcd.XXXXXX")"
  log "etcd $ETCD_VERSION: building"
  (cd "$here/etcd" && "${NICE[@]}" go build -ldflags "-s -w" -o "$tmp/etcd" .)
  install_into "$dir" "$stamp" "$tmp"; rmdir "$tmp"
  log "etcd $ETCD_VERSION: done"
}

# go_install <name> <dir> <version> <pkg> <ldflags>: `go install pkg@version`
# uses the tool's own go.mod and go.sum (checked against the checksum database),
# so a pinned version is reproducible without a wrapper module.
go_install() {
  local name="$1" dir="$2" version="$3" pkg="$4" ld="$5"
  local stamp; stamp="$(stamp_of "$name" "$version" "$pkg" "$ld")"
  up_to_date "$dir" "$stamp" "$name" && { log "$name $version: cached in $dir"; return; }
  local tmp; tmp="$(mktemp -d "$cache/.build-$name.XXXXXX")"
  log "$name $version: go install $pkg@$version"
  # go install refuses -mod flags outside a module; keep only -trimpath.
  GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp" "${NICE[@]}" go install -ldflags "$ld" "$pkg@$version"
  install_into "$dir" "$stamp" "$tmp"; rmdir "$tmp"
  log "$name $version: done"
}

kwok_ld="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
# The stages kwok plays: the same defaults kwokctl feeds it (node-fast
# initialisation, lease heartbeats, pod-fast ready/complete/delete). kwok only
# embeds them in kwokctl, so they are copied from the pinned module's source.
KWOK_STAGES=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
  pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)

build_kwok() {
  local dir="$cache/kwok-$KWOK_VERSION/bin"
  go_install kwok "$dir" "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok "$kwok_ld"
  [ -s "$dir/../stages.yaml" ] && return
  local src; src="$(cd "$cache" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  { echo "# Generated by e2e/cluster/build.sh from sigs.k8s.io/kwok@$KWOK_VERSION kustomize/stage; do not edit."
    for f in "${KWOK_STAGES[@]}"; do echo "---"; echo "# $f"; cat "$src/kustomize/stage/$f"; done
  } >"$dir/../stages.yaml.tmp"
  mv "$dir/../stages.yaml.tmp" "$dir/../stages.yaml"
}

helm_ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_helm() {
  go_install helm "$cache/helm-$HELM_VERSION/bin" "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$helm_ld"
}

check() {
  up_to_date "$cache/k8s-$K8S_VERSION/bin" "$(stamp_of "$K8S_VERSION" "$here/k8s/go.mod" "$here/k8s/go.sum")" \
    kube-apiserver kube-controller-manager kube-scheduler kubectl &&
  up_to_date "$cache/etcd-$ETCD_VERSION/bin" \
    "$(stamp_of "$ETCD_VERSION" "$here/etcd/go.mod" "$here/etcd/go.sum" "$here/etcd/main.go")" etcd &&
  up_to_date "$cache/kwok-$KWOK_VERSION/bin" \
    "$(stamp_of kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok "$kwok_ld")" kwok &&
  [ -s "$cache/kwok-$KWOK_VERSION/stages.yaml" ] &&
  up_to_date "$cache/helm-$HELM_VERSION/bin" \
    "$(stamp_of helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$helm_ld")" helm
}

# Everything runs from main, parsed whole before it starts: bash reads a script as it
# goes, so an edit to this file during a long build would otherwise derail the run.
main() {
  command -v go >/dev/null || { log "go is not on PATH: install Go >= 1.26 (the wrapper modules say go 1.26.0)"; exit 2; }
  mkdir -p "$cache"
  if [ "${1:-}" = "--check" ]; then check; return $?; fi
  # One build at a time per cache (two test sessions may start together); then the
  # temporary folders of an interrupted build can go.
  exec 9>"$cache/.build.lock"
  flock 9
  rm -rf "$cache"/.build-*.*
  targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(k8s etcd kwok helm)
  start=$SECONDS
  for t in "${targets[@]}"; do
    case "$t" in
      k8s|etcd|kwok|helm) "build_$t" ;;
      *) log "unknown target $t (k8s|etcd|kwok|helm)"; return 2 ;;
    esac
  done
  log "all done in $((SECONDS - start))s"
}

main "$@"
