#!/usr/bin/env bash
# Builds the crx guest kernel (vmlinux for PVH direct boot, bzImage as fallback) from
# Debian's linux-source-6.1 with crx-guest.config on top of tinyconfig, and caches it.
#
# Usage: kernel-config/build.sh [--config-only]
#   Progress goes to stderr; the last stdout line is the cache directory holding
#   vmlinux, bzImage and config. --config-only stops after the config is resolved and
#   verified (prints the resolved .config path instead).
#
# Environment: CRX_CACHE_DIR (default /var/cache/crx), CRX_KERNEL_VERBOSE=1 streams
# every line of make's output instead of a periodic summary.
set -euo pipefail
exec </dev/null

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/crx-guest.config"
patch_dir="$here/patches"
cache_root="${CRX_CACHE_DIR:-/var/cache/crx}/kernel"
src_pkg=linux-source-6.1
src_tar=/usr/src/linux-source-6.1.tar.xz
arch=x86_64
config_only=0

case "${1:-}" in
    "") ;;
    --config-only) config_only=1 ;;
    *) echo "usage: $0 [--config-only]" >&2; exit 2 ;;
esac

log() { printf '[kernel %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[kernel] ERROR: %s\n' "$*" >&2; exit 1; }

apt_install() {
    # apt's package lists may be missing on a fresh machine or CI image: update once, retry.
    log "installing: $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; then
        DEBIAN_FRONTEND=noninteractive apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 \
            || die "could not install $* (run as root with Debian apt sources reachable)"
    fi
}

ensure_source() {
    if ! dpkg -s "$src_pkg" >/dev/null 2>&1 || [[ ! -f $src_tar ]]; then
        apt_install "$src_pkg"
    fi
    [[ -f $src_tar ]] || die "$src_pkg is installed but $src_tar is missing (apt-get install --reinstall $src_pkg)"
}

patches() {
    if [[ -d $patch_dir ]]; then
        find "$patch_dir" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort
    fi
}

# The cache key covers everything that changes the output: fragment, patches, this
# script and the exact source package version.
compute_key() {
    local version=$1 p
    {
        printf 'fragment\n'; cat "$fragment"
        printf 'build.sh\n'; cat "$self"
        while IFS= read -r p; do
            printf 'patch %s\n' "$(basename "$p")"; cat "$p"
        done < <(patches)
        printf 'source %s %s\n' "$src_pkg" "$version"
    } | sha256sum | cut -d' ' -f1
}

[[ -f $fragment ]] || die "config fragment $fragment is missing"
ensure_source
version=$(dpkg-query -W -f='${Version}' "$src_pkg")
key=$(compute_key "$version")
key_dir="$cache_root/$key"

if [[ $config_only == 0 && -f $key_dir/vmlinux && -f $key_dir/bzImage ]]; then
    log "cached: $key_dir/vmlinux"
    log "cached: $key_dir/bzImage"
    echo "$key_dir"
    exit 0
fi

# ---- slow path: build ----
missing=()
for p in build-essential flex bison bc libelf-dev libssl-dev xz-utils lz4 patch; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then apt_install "${missing[@]}"; fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
log "waiting for the build lock $cache_root/.lock"
flock 9
if [[ $config_only == 0 && -f $key_dir/vmlinux && -f $key_dir/bzImage ]]; then
    log "built by a concurrent run: $key_dir"
    echo "$key_dir"
    exit 0
fi

# One unpacked tree per source version + patch set; config changes rebuild incrementally
# inside it (kbuild tracks each CONFIG_ symbol a file depends on).
patch_sum=$(patches | while IFS= read -r p; do sha256sum "$p"; done | sha256sum | cut -c1-16)
tree="$cache_root/work/src-$version-$patch_sum"
if [[ ! -f $tree/.crx-ready ]]; then
    log "unpacking $src_tar ($src_pkg $version) into $tree"
    rm -rf "$tree" "$tree.unpack"
    mkdir -p "$tree.unpack"
    tar -xf "$src_tar" -C "$tree.unpack"
    mv "$tree.unpack/linux-source-6.1" "$tree"
    rmdir "$tree.unpack"
    while IFS= read -r p; do
        log "applying patch $(basename "$p")"
        patch -d "$tree" -p1 --forward --batch <"$p" >&2 || die "patch $(basename "$p") does not apply"
    done < <(patches)
    touch "$tree/.crx-ready"
fi

# Fixed build identity so the same inputs give the same image.
export KBUILD_BUILD_TIMESTAMP="1970-01-01 00:00:00 UTC" KBUILD_BUILD_USER=crx \
    KBUILD_BUILD_HOST=crx KBUILD_BUILD_VERSION=1
mk() { make -C "$tree" ARCH="$arch" "$@"; }

log "configuring: tinyconfig + $(basename "$fragment")"
config_log="$tree/.crx-config.log"
# tinyconfig and merge_config.sh chatter about every value they override; keep that in a
# log and show it only when something fails.
if ! { mk -s tinyconfig \
        && (cd "$tree" && ARCH="$arch" scripts/kconfig/merge_config.sh -m .config "$fragment") \
        && mk -s olddefconfig; } >"$config_log" 2>&1; then
    cat "$config_log" >&2
    die "kernel configuration failed (log: $config_log)"
fi

# Every line of the fragment must survive olddefconfig; kconfig silently drops a symbol
# whose dependencies are unmet, which would give a kernel that boots but lacks a feature.
dropped=()
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF -- "$line" "$tree/.config" \
            || dropped+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$tree/.config" || echo 'absent'))")
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        ! grep -qE "^${BASH_REMATCH[1]}=" "$tree/.config" \
            || dropped+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$tree/.config"))")
    fi
done <"$fragment"
if ((${#dropped[@]})); then
    printf '[kernel] ERROR: %d option(s) of %s did not survive olddefconfig (unmet dependencies?):\n' \
        "${#dropped[@]}" "$(basename "$fragment")" >&2
    printf '  %s\n' "${dropped[@]}" >&2
    exit 1
fi
log "config verified: all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$fragment") fragment lines present"

if [[ $config_only == 1 ]]; then
    echo "$tree/.config"
    exit 0
fi

jobs=$(nproc)
build_log="$tree/.crx-build.log"
log "building vmlinux + bzImage with make -j$jobs (log: $build_log)"
start=$SECONDS
summarize() {
    # One line per 100 build steps (every line with CRX_KERNEL_VERBOSE=1) so a CI log
    # visibly moves without drowning in ~2000 CC lines; errors and warnings always show.
    local n=0 line
    while IFS= read -r line; do
        n=$((n + 1))
        if [[ ${CRX_KERNEL_VERBOSE:-0} == 1 || $line == *error:* || $line == *warning:* ]]; then
            printf '%s\n' "$line" >&2
        elif ((n % 100 == 0)); then
            printf '[kernel] %d build steps, %ds, at:%s\n' "$n" "$((SECONDS - start))" "$line" >&2
        fi
    done
}
if ! mk -j"$jobs" vmlinux bzImage 2>&1 | tee "$build_log" | summarize; then
    echo "[kernel] ERROR: kernel build failed; last lines of $build_log:" >&2
    tail -n 40 "$build_log" >&2
    exit 1
fi
log "build finished in $((SECONDS - start))s"

tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
strip --strip-debug -o "$tmp/vmlinux" "$tree/vmlinux"
cp "$tree/arch/x86/boot/bzImage" "$tmp/bzImage"
cp "$tree/.config" "$tmp/config"
printf 'source=%s %s\nkey=%s\n' "$src_pkg" "$version" "$key" >"$tmp/build-info"
chmod 0755 "$tmp"
rm -rf "$key_dir"
mv -T "$tmp" "$key_dir"
trap - EXIT
log "vmlinux: $key_dir/vmlinux ($(stat -c %s "$key_dir/vmlinux") bytes)"
log "bzImage: $key_dir/bzImage ($(stat -c %s "$key_dir/bzImage") bytes)"
echo "$key_dir"
