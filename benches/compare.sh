#!/usr/bin/env bash
# strata vs its peers on the reference workload of the speed issue, side by side.
#
#   bash benches/compare.sh            # everything; writes BENCHMARKS.md at the repo root
#   CASES=all,run bash benches/compare.sh  # also the RUN cases (~20 min more); BENCHMARKS.md too
#   CASES=run bash benches/compare.sh  # only the selected cases; writes target/bench/partial.md
#
# CASES: `all` (default: cold, noop, onefile, pull, gzip, zstd, rss — the speed issue's
# suite — and serve: `strata serve`'s API latency under 200 clients, a release build of the
# load test in tests/integration/serve.rs, SERVE_SECS long, default 30) or a comma/space separated selection of those and `run` (the RUN cases: a
# multi-stage Dockerfile whose build stage compiles C with gcc on a debootstrap base and whose
# runtime stage runs groupadd/useradd/mkdir, cold and no-op rebuild, strata vs buildah; only
# when named, e.g. CASES=all,run). A selection without `all` skips the profile and writes
# target/bench/partial.md, leaving BENCHMARKS.md alone.
# Environment: RUNS (measured runs per case, default 5, after one warm-up), THREADS
# (compression threads, default nproc), RSS_RUNS (default 1), APP_DIR=DIR to benchmark a real
# `dotnet publish` output instead of the generated tree, PROFILE=auto|perf|callgrind|0:
# auto uses `perf record` with the hardware cycles event when `perf stat -e instructions` works
# and the software cpu-clock event otherwise; callgrind counts instructions (~100 s per profile
# here, and valgrind hides SHA-NI, so sha256 shows up as the slow portable code).
#
# One-time set-up (cached under target/bench/): apt packages, the release build, a debootstrap
# minbase bookworm root file system, the seeded app tree and a 1 GB file. Each run starts a
# fresh docker-registry on a free loopback port with a temporary storage directory, pushes the
# "runtime" base image into it with strata, then runs every case for strata and its peer
# alternately (the order flips every iteration), and writes BENCHMARKS.md.
# A peer that cannot run stops the script with an error; nothing is skipped.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=$ROOT/target/bench
RUNS=${RUNS:-5}
THREADS=${THREADS:-$(nproc)}
PROFILE=${PROFILE:-auto}
STRATA=${CARGO_TARGET_DIR:-$ROOT/target}/release/strata
CASES=${CASES:-all}
# `all` is the speed issue's suite (under 10 minutes here); the RUN cases (a gcc build on
# Debian, ~20 minutes with buildah's cold builds) run only when named: CASES=run, or
# CASES=all,run for both.
want() {
    case $1 in
    run) [[ ",${CASES// /,}," == *",run,"* ]] ;;
    *) [[ $CASES == all || ",${CASES// /,}," == *",all,"* || ",${CASES// /,}," == *",$1,"* ]] ;;
    esac
}
want_app() { want cold || want noop || want onefile || want gzip || want zstd; }
# The whole speed suite was asked for (`all`, possibly with `run`): BENCHMARKS.md is written.
full_suite() { [[ ",${CASES// /,}," == *",all,"* ]]; }
SUITE_START=$EPOCHREALTIME

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'compare.sh: %s\n' "$*" >&2; exit 1; }

# --- peers ------------------------------------------------------------------------------------
need_pkgs=()
for pair in buildah:buildah skopeo:skopeo pigz:pigz zstd:zstd debootstrap:debootstrap \
    docker-registry:docker-registry /usr/bin/time:time valgrind:valgrind python3:python3 \
    curl:curl tar:tar; do
    command -v "${pair%%:*}" >/dev/null || need_pkgs+=("${pair#*:}")
done
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}" >&2; } ||
        die "cannot install ${need_pkgs[*]}"
fi
for tool in buildah skopeo pigz zstd; do
    "$tool" --version >/dev/null 2>&1 || die "$tool is installed but does not run"
done

# --- strata -----------------------------------------------------------------------------------
log "cargo build --release --locked"
(cd "$ROOT" && cargo build --release --locked >&2) || die "release build failed"

# --- workload (cached) ------------------------------------------------------------------------
mkdir -p "$B"
if [[ ! -f $B/base/rootfs/.complete ]]; then
    log "debootstrap --variant=minbase bookworm (once)"
    rm -rf "$B/base"
    mkdir -p "$B/base"
    debootstrap --variant=minbase bookworm "$B/base/rootfs" >"$B/debootstrap.log" 2>&1 ||
        die "debootstrap failed, see $B/debootstrap.log"
    # Device nodes and fifos are not image content (runtimes create /dev); strata refuses them.
    find "$B/base/rootfs" -xdev ! -type f ! -type d ! -type l -delete
    touch "$B/base/rootfs/.complete"
fi
printf 'FROM scratch\nCOPY rootfs/ /\n' >"$B/base/Dockerfile"
printf 'rootfs/.complete\n' >"$B/base/.dockerignore"

CTX=$B/ctx
mkdir -p "$CTX"
APP_BYTES=0 APP_FILES=0
if ! want_app; then
    : # the app tree is only for the publish and layer cases
elif [[ -n ${APP_DIR:-} ]]; then
    rm -rf "$CTX"
    mkdir -p "$CTX"
    cp -a "$APP_DIR" "$CTX/app"
    touch "$CTX/app.complete"
elif [[ ! -f $CTX/app.complete ]]; then
    log "generating the app tree (seed 5)"
    rm -rf "$CTX"
    mkdir -p "$CTX"
    python3 "$ROOT/benches/gen_app.py" "$CTX/app" --seed 5
    touch "$CTX/app.complete"
fi
# The one-file case edits this file; every suite run starts from the same content.
CHANGED=$CTX/app/appsettings.json
if want_app; then
    [[ -f $CTX/appsettings.orig ]] || cp "$CHANGED" "$CTX/appsettings.orig"
    cp "$CTX/appsettings.orig" "$CHANGED"
    printf 'Dockerfile*\n*.complete\nappsettings.orig\n' >"$CTX/.dockerignore"
    APP_BYTES=$(du -sb --apparent-size "$CTX/app" | cut -f1)
    APP_FILES=$(find "$CTX/app" -type f | wc -l)
fi

if want rss && [[ ! -f $B/big/blob.bin ]]; then
    log "generating a 1 GB file (once)"
    mkdir -p "$B/big"
    python3 -c '
import random, sys
r = random.Random(1); out = open(sys.argv[1] + ".tmp", "wb")
for _ in range(1024):
    out.write(r.randbytes(1 << 20))
out.close()' "$B/big/blob.bin"
    mv "$B/big/blob.bin.tmp" "$B/big/blob.bin"
fi
mkdir -p "$B/big"
printf 'FROM scratch\nCOPY blob.bin /data/blob.bin\n' >"$B/big/Dockerfile"

# --- registry ---------------------------------------------------------------------------------
RUN=$(mktemp -d "$B/run.XXXXXX")
REG_PID=
cleanup() {
    # Keep the script's own exit status: the killed registry's (143) is not ours.
    local rc=$?
    if [[ -n $REG_PID ]]; then
        kill "$REG_PID" 2>/dev/null
        wait "$REG_PID" 2>/dev/null || true
    fi
    rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
cat >"$RUN/registry.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: '$RUN/registry'
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $REG
  secret: strata-bench-not-a-secret
EOF
docker-registry serve "$RUN/registry.yml" >"$RUN/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do
    curl -fs "http://$REG/v2/" >/dev/null && break
    sleep 0.1
done
curl -fs "http://$REG/v2/" >/dev/null || die "docker-registry did not start: $(tail -5 "$RUN/registry.log")"

if want_app || want pull; then
    log "pushing the runtime base to $REG/runtime"
    STRATA_HOME=$B/home-runtime "$STRATA" build -q --insecure-registry "$REG" --push \
        -t "$REG/runtime:latest" "$B/base" >/dev/null || die "pushing the runtime base failed"
fi

cat >"$CTX/Dockerfile" <<EOF
FROM $REG/runtime:latest
EXPOSE 5005
WORKDIR /App
COPY app .
ENV ASPNETCORE_URLS=
ENV DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=false
USER 1000:3000
ENTRYPOINT ["dotnet", "Altinn.Application.dll"]
EOF
printf 'FROM scratch\nCOPY app /app\n' >"$CTX/Dockerfile.layer"

# --- timing helpers ---------------------------------------------------------------------------
RES=$RUN/results.tsv # case  tool  iteration  wall-seconds  extra (key=value ...)
: >"$RES"
now() { echo "${EPOCHREALTIME/[.,]/}"; } # microseconds

# run_timed CASE TOOL ITER CMD... — time CMD (output to a log), record it unless ITER is 0.
run_timed() {
    local c=$1 t=$2 i=$3
    shift 3
    local logf=$RUN/log.$c.$t.$i t0 t1
    t0=$(now)
    if ! /usr/bin/time -f '%U %S' -o "$logf.cpu" "$@" >"$logf.out" 2>"$logf.err"; then
        cat "$logf.err" >&2
        die "$t failed in case $c (run $i): $*"
    fi
    t1=$(now)
    local s
    s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e6 }')
    local cpu
    cpu=$(awk '{ printf "%.3f", $1 + $2 }' "$logf.cpu")
    printf '   %-10s %-8s run %s: %ss (cpu %ss)\n' "$c" "$t" "$i" "$s" "$cpu" >&2
    ((i == 0)) || printf '%s\t%s\t%s\t%s\tcpu=%s\n' "$c" "$t" "$i" "$s" "$cpu" >>"$RES"
}

# blob_counts LOGFILE — "uploaded=U mounted=M present=P rebuilt=R" from strata's JSON progress.
blob_counts() {
    python3 - "$1" <<'EOF'
import json, sys
up = mo = pr = rebuilt = 0
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("type") == "pushed":
        up += e["uploaded"]; mo += e["mounted"]; pr += e["present"]
    if e.get("type") == "step_done" and e.get("layer") and not e.get("cached"):
        rebuilt += 1
print(f"uploaded={up} mounted={mo} present={pr} rebuilt={rebuilt}")
EOF
}

strata_publish() { # HOME REPO [extra args]
    local home=$1 repo=$2
    shift 2
    STRATA_HOME=$home "$STRATA" build --progress json --insecure-registry "$REG" --push \
        -t "$REG/$repo:latest" "$@" "$CTX"
}
buildah_publish() { # STORAGE REPO
    local st=$1 repo=$2
    local g=(--root "$st/root" --runroot "$st/runroot" --storage-driver vfs)
    buildah "${g[@]}" bud --isolation chroot --layers --tls-verify=false -q \
        -f "$CTX/Dockerfile" -t app-bench "$CTX" &&
        buildah "${g[@]}" push --tls-verify=false -q app-bench "docker://$REG/$repo:latest"
}
# pair CASE ITER 'strata command' 'peer command' — both, order flipped on odd iterations.
pair() {
    local c=$1 i=$2 a=$3 b=$4 peer=$5
    if ((i % 2)); then
        run_timed "$c" "$peer" "$i" bash -c "$b"
        strata_run "$c" "$i" "$a"
    else
        strata_run "$c" "$i" "$a"
        run_timed "$c" "$peer" "$i" bash -c "$b"
    fi
}
strata_run() {
    local c=$1 i=$2 cmd=$3
    run_timed "$c" strata "$i" bash -c "$cmd"
    if grep -q '"type":"pushed"' "$RUN/log.$c.strata.$i.err" 2>/dev/null; then
        local counts
        counts=$(blob_counts "$RUN/log.$c.strata.$i.err")
        printf '   %-10s strata   run %s: %s\n' "$c" "$i" "$counts" >&2
        if ((i != 0)); then
            # attach the counts to the line just recorded
            sed -i "\$s/\$/ $counts/" "$RES"
        fi
    fi
}
export -f strata_publish buildah_publish
export STRATA REG CTX RUN THREADS

# --- cases ------------------------------------------------------------------------------------
if want cold; then
log "case cold: empty caches, base in the registry, build + push to a new repo"
for i in $(seq 0 "$RUNS"); do
    rm -rf "$RUN/cold-home" "$RUN/cold-buildah"
    pair cold "$i" "strata_publish $RUN/cold-home app-strata-cold$i" \
        "buildah_publish $RUN/cold-buildah app-buildah-cold$i" buildah
done
rm -rf "$RUN/cold-home" "$RUN/cold-buildah"
fi

if want noop || want onefile; then
log "case noop: republish, nothing changed (the warm-up run is the first publish)"
for i in $(seq 0 "$RUNS"); do
    pair noop "$i" "strata_publish $RUN/warm-home app-strata" \
        "buildah_publish $RUN/warm-buildah app-buildah" buildah
done

fi
if want onefile; then
log "case onefile: one file of the app tree changed, republish"
for i in $(seq 0 "$RUNS"); do
    printf '{ "benchRun": %d }\n' "$((i + 1))" >>"$CHANGED"
    pair onefile "$i" "strata_publish $RUN/warm-home app-strata" \
        "buildah_publish $RUN/warm-buildah app-buildah" buildah
done
cp "$CTX/appsettings.orig" "$CHANGED"
fi
rm -rf "$RUN/warm-buildah"

if want pull; then
log "case pull: the base into an OCI layout"
for i in $(seq 0 "$RUNS"); do
    rm -rf "$RUN/pull-home" "$RUN/pull-s" "$RUN/pull-k"
    pair pull "$i" \
        "STRATA_HOME=$RUN/pull-home \$STRATA copy --insecure-registry \$REG docker://\$REG/runtime:latest oci:$RUN/pull-s:latest" \
        "skopeo copy -q --src-tls-verify=false docker://\$REG/runtime:latest oci:$RUN/pull-k:latest" skopeo
done
rm -rf "$RUN/pull-home" "$RUN/pull-s" "$RUN/pull-k"
fi

layer_build() { # compression level
    echo "STRATA_HOME=$RUN/layer-home \$STRATA build -q --no-cache --compression $1 --compression-level $2 --threads \$THREADS -f \$CTX/Dockerfile.layer -t layer-$1 \$CTX"
}
if want gzip; then
log "case gzip: layer build of the app tree, level 6, $THREADS threads"
for i in $(seq 0 "$RUNS"); do
    pair gzip "$i" "$(layer_build gzip 6)" \
        "tar -C \$CTX -cf - app | pigz -p \$THREADS -6 > $RUN/app.tar.gz" pigz
done
fi
if want zstd; then
log "case zstd: layer build of the app tree, level 3, $THREADS threads"
for i in $(seq 0 "$RUNS"); do
    pair zstd "$i" "$(layer_build zstd 3)" \
        "tar -C \$CTX -cf - app | zstd -q -T\$THREADS -3 -f -o $RUN/app.tar.zst" zstd
done
fi
rm -rf "$RUN/layer-home" "$RUN/app.tar.gz" "$RUN/app.tar.zst"

if want rss; then
log "case rss: build and push a single 1 GB layer (gzip, $THREADS threads)"
RSS_RUNS=${RSS_RUNS:-1}
for i in $(seq 1 "$RSS_RUNS"); do
    rm -rf "$RUN/big-home"
    run_timed rss strata "$i" /usr/bin/time -v -o "$RUN/rss.$i" env STRATA_HOME="$RUN/big-home" \
        "$STRATA" build --progress json --insecure-registry "$REG" --threads "$THREADS" --push \
        -t "$REG/big$i:latest" "$B/big"
    kb=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$RUN/rss.$i")
    printf '   rss        strata   run %s: %s kB\n' "$i" "$kb" >&2
    sed -i "\$s/\$/ maxrss_kb=$kb/" "$RES"
done
rm -rf "$RUN/big-home"
fi

# --- RUN --------------------------------------------------------------------------------------
if want run; then
    # Bases as the file systems debootstrap made (modes, owners, setuid bits, hard links kept):
    # one GNU tar layer in an OCI layout, copied to the registry by skopeo. The runtime base is
    # the workload's minbase; the SDK base adds gcc (downloaded once; the builds are offline).
    if [[ ! -f $B/sdk/rootfs/.complete ]]; then
        log "debootstrap --variant=minbase --include=gcc,libc6-dev bookworm (once)"
        rm -rf "$B/sdk"
        mkdir -p "$B/sdk"
        debootstrap --variant=minbase --include=gcc,libc6-dev bookworm "$B/sdk/rootfs" \
            >"$B/debootstrap-sdk.log" 2>&1 || die "debootstrap failed, see $B/debootstrap-sdk.log"
        find "$B/sdk/rootfs" -xdev ! -type f ! -type d ! -type l -delete
        touch "$B/sdk/rootfs/.complete"
    fi
    oci_base() { # ROOTFS LAYOUT — once per rootfs
        [[ -f $2/.complete ]] && return
        rm -rf "$2"
        mkdir -p "$2"
        tar --numeric-owner --sort=name --exclude=./.complete -C "$1" -cf "$2/layer.tar" . ||
            die "tar of $1 failed"
        python3 - "$2" <<'PY' || die "writing the OCI layout $2 failed"
import hashlib, json, os, sys
lay = sys.argv[1]
os.makedirs(f"{lay}/blobs/sha256")
def put(path=None, data=None):
    h = hashlib.sha256()
    if path:
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        dest = f"{lay}/blobs/sha256/{h.hexdigest()}"
        os.rename(path, dest)
        return f"sha256:{h.hexdigest()}", os.path.getsize(dest)
    h.update(data)
    open(f"{lay}/blobs/sha256/{h.hexdigest()}", "wb").write(data)
    return f"sha256:{h.hexdigest()}", len(data)
ld, ls = put(path=f"{lay}/layer.tar")
cfg = {"architecture": "amd64", "os": "linux", "config": {},
       "rootfs": {"type": "layers", "diff_ids": [ld]},
       "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "debootstrap"}]}
cd, cs = put(data=json.dumps(cfg).encode())
man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}
md, ms = put(data=json.dumps(man).encode())
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": man["mediaType"], "digest": md, "size": ms,
           "annotations": {"org.opencontainers.image.ref.name": "latest"}}]},
          open(f"{lay}/index.json", "w"))
open(f"{lay}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
        touch "$2/.complete"
    }
    oci_base "$B/base/rootfs" "$B/runtime-oci"
    oci_base "$B/sdk/rootfs" "$B/sdk-oci"
    log "pushing the sdk and runtime bases (as debootstrap made them) to $REG"
    for b in sdk runtime; do
        skopeo copy -q --dest-tls-verify=false "oci:$B/$b-oci:latest" "docker://$REG/$b-fs:latest" ||
            die "pushing the $b base failed"
    done
    RCTX=$B/runctx
    rm -rf "$RCTX"
    mkdir -p "$RCTX"
    # A C program big enough for gcc -O2 to take a moment: 400 small functions.
    python3 - "$RCTX/app.c" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("#include <stdio.h>\n")
    for i in range(400):
        f.write(f"unsigned long f{i}(unsigned long x) {{ for (int k = 0; k < {i % 7 + 3}; k++) "
                f"x = x * {2 * i + 3}UL + (x >> {i % 13 + 1}); return x ^ {i}UL; }}\n")
    f.write("int main(void) {\n  unsigned long x = 1;\n")
    for i in range(400):
        f.write(f"  x = f{i}(x);\n")
    f.write('  printf("%lu\\n", x);\n  return 0;\n}\n')
PY
    cat >"$RCTX/Dockerfile" <<EOF
FROM $REG/sdk-fs:latest AS build
WORKDIR /src
COPY app.c .
RUN gcc -O2 -o app app.c && ./app > result.txt

FROM $REG/runtime-fs:latest
RUN groupadd -g 3000 dotnet && useradd -u 1000 -g dotnet -M -s /bin/false dotnet
COPY --from=build /src/app /usr/local/bin/app
COPY --from=build /src/result.txt /etc/app-result.txt
USER dotnet
RUN mkdir /tmp/logtelemetry && /usr/local/bin/app > /tmp/logtelemetry/first-run
ENTRYPOINT ["/usr/local/bin/app"]
EOF
    export RCTX
    strata_runbuild() { # HOME
        STRATA_HOME=$1 "$STRATA" build --progress json --insecure-registry "$REG" -t run-app "$RCTX"
    }
    buildah_runbuild() { # STORAGE
        buildah --root "$1/root" --runroot "$1/runroot" --storage-driver vfs \
            bud --isolation chroot --layers --tls-verify=false -q -t run-app "$RCTX"
    }
    export -f strata_runbuild buildah_runbuild
    log "case runcold: multi-stage RUN build (gcc in the build stage, useradd/mkdir at runtime), empty caches"
    for i in $(seq 0 "$RUNS"); do
        rm -rf "$RUN/runcold-home" "$RUN/runcold-buildah"
        pair runcold "$i" "strata_runbuild $RUN/runcold-home" \
            "buildah_runbuild $RUN/runcold-buildah" buildah
    done
    rm -rf "$RUN/runcold-home" "$RUN/runcold-buildah"
    log "case runnoop: the same build again, nothing changed (the warm-up run is the first build)"
    for i in $(seq 0 "$RUNS"); do
        pair runnoop "$i" "strata_runbuild $RUN/runwarm-home" \
            "buildah_runbuild $RUN/runwarm-buildah" buildah
    done
    rm -rf "$RUN/runwarm-home" "$RUN/runwarm-buildah"
fi

# --- profile ----------------------------------------------------------------------------------
PROF=$RUN/profile
mkdir -p "$PROF"
PROFILE_TOOL=none
full_suite || PROFILE=0 # the profile needs the publish workload
case $PROFILE in
0 | none) ;;
auto)
    if perf stat -e instructions true 2>&1 | grep -q 'not supported'; then
        PROFILE_TOOL=perf-cpu-clock
    else
        PROFILE_TOOL=perf-cycles
    fi
    ;;
perf) PROFILE_TOOL=perf-cycles ;;
callgrind) PROFILE_TOOL=callgrind ;;
*) die "PROFILE must be auto, perf, callgrind or 0" ;;
esac
if [[ $PROFILE_TOOL != none ]]; then
    log "profile with $PROFILE_TOOL: cold publish and one-file republish"
    profile() { # NAME HOME REPO
        local name=$1 home=$2 repo=$3
        local cmd=("$STRATA" build -q --insecure-registry "$REG" --push -t "$REG/$repo:latest" "$CTX")
        case $PROFILE_TOOL in
        perf-*)
            local ev=cpu-clock
            [[ $PROFILE_TOOL == perf-cycles ]] && ev=cycles
            STRATA_HOME=$home perf record -q -e "$ev" -F 4999 -o "$PROF/$name.data" -- "${cmd[@]}" \
                >/dev/null 2>"$PROF/$name.log" || die "perf record failed: $(tail -3 "$PROF/$name.log")"
            perf report -i "$PROF/$name.data" --no-children --stdio --sort symbol \
                >"$PROF/$name.perf" 2>/dev/null || die "perf report failed"
            ;;
        callgrind)
            STRATA_HOME=$home valgrind --tool=callgrind --callgrind-out-file="$PROF/$name.cg" \
                --dump-instr=no --collect-jumps=no "${cmd[@]}" >/dev/null 2>"$PROF/$name.log" ||
                die "callgrind failed: $(tail -3 "$PROF/$name.log")"
            callgrind_annotate --threshold=99.9 "$PROF/$name.cg" >"$PROF/$name.annot" ||
                die "callgrind_annotate failed"
            ;;
        esac
    }
    profile cold "$RUN/prof-home" app-strata-prof
    printf '{ "benchRun": "profile" }\n' >>"$CHANGED"
    profile onefile "$RUN/prof-home" app-strata-prof
    cp "$CTX/appsettings.orig" "$CHANGED"
fi

if want serve; then
    SERVE_SECS=${SERVE_SECS:-30}
    log "case serve: API latency, 200 clients for $SERVE_SECS s (release build)"
    SERVE_LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
    (cd "$ROOT" && STRATA_SERVE_LOAD_SECS=$SERVE_SECS STRATA_SERVE_LOAD_REPORT=$RUN/serve-load.md \
        cargo test --release --locked --test integration serve::two_hundred -- --nocapture >&2) ||
        die "the serve load test failed"
    export SERVE_REPORT=$RUN/serve-load.md SERVE_SECS SERVE_LOADAVG_BEFORE
    export SERVE_LOADAVG_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
fi

# --- report -----------------------------------------------------------------------------------
if ! full_suite; then
    REPORT=$B/partial.md
    log "writing $REPORT (a selection: BENCHMARKS.md is left alone)"
else
    REPORT=$ROOT/BENCHMARKS.md
    log "writing BENCHMARKS.md"
fi
SUITE_SECONDS=$(awk -v a="${SUITE_START/[.,]/}" -v b="$(now)" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
export RES PROF PROFILE_TOOL RUNS THREADS APP_BYTES APP_FILES SUITE_SECONDS
export BASE_BYTES=$(du -sb --apparent-size "$B/base/rootfs" | cut -f1)
export BASE_FILES=$(find "$B/base/rootfs" | wc -l)
export V_STRATA="$("$STRATA" --version 2>&1 | head -1) ($(git -C "$ROOT" rev-parse --short HEAD))"
export V_BUILDAH=$(buildah --version) V_SKOPEO=$(skopeo --version) V_PIGZ=$(pigz --version 2>&1)
export V_ZSTD=$(zstd --version) V_REGISTRY=$(docker-registry --version 2>&1 | head -1)
export CPU=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo) CORES=$(nproc)
export KERNEL=$(uname -sr) MEM=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
python3 "$ROOT/benches/report.py" >"$REPORT"
cat "$REPORT"
