#!/usr/bin/env bash
# Tests the quiver-kzero kernel module in a VM: fetches Debian's cloud kernel and the qemu it
# needs (unpacked into a cache, never installed, so the machine's own qemu-utils stays), installs
# the matching kernel headers, builds the module and static test binaries, boots qemu under TCG
# (no KVM needed) with a busybox initramfs, loads the module, runs the tests and prints one
# `PASS name` / `FAIL name` line per test. Exits non-zero on any failure or timeout.
#
# Without root or network it skips with a reason, or fails when CI=true.
# Environment: QUIVER_VM_CACHE (default /var/tmp/quiver-vm), QUIVER_VM_TIMEOUT (seconds, 1200),
# QUIVER_VM_RUST=0 to leave the Rust tests out.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CACHE=${QUIVER_VM_CACHE:-/var/tmp/quiver-vm}
TIMEOUT=${QUIVER_VM_TIMEOUT:-1200}

skip_or_fail() {
	if [ "${CI:-}" = true ]; then
		echo "FAIL vm_setup: $1"
		exit 1
	fi
	echo "SKIP vm: $1"
	exit 0
}

log() { echo "vm: $*" >&2; }

[ "$(id -u)" = 0 ] || skip_or_fail "needs root (installs kernel headers with apt-get)"
command -v apt-get >/dev/null || skip_or_fail "needs a Debian system (apt-get)"
[ "$(uname -m)" = x86_64 ] || skip_or_fail "needs an x86_64 host"

export DEBIAN_FRONTEND=noninteractive
mkdir -p "$CACHE/debs" "$CACHE/root"
chmod 755 "$CACHE" "$CACHE/debs"

cloud_abi() {
	apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		sed -n 's/^ *Depends: linux-image-\(.*-cloud-amd64\)$/\1/p' | head -n1
}
# Package lists older than a day may name a kernel the mirror no longer has.
if ! find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 | grep -q . ||
	[ -z "$(cloud_abi)" ]; then
	apt-get update -qq || skip_or_fail "apt-get update failed (offline?)"
fi
FLAVOUR=$(cloud_abi)
[ -n "$FLAVOUR" ] || skip_or_fail "no linux-image-cloud-amd64 in the apt sources"
log "kernel $FLAVOUR"

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

# Downloads packages into the cache unless a .deb of theirs is there already.
fetch() {
	local want=() p
	for p in "$@"; do
		compgen -G "$CACHE/debs/${p}_*.deb" >/dev/null || want+=("$p")
	done
	[ ${#want[@]} -eq 0 ] && return 0
	log "downloading ${want[*]}"
	(cd "$CACHE/debs" && apt-get download -q "${want[@]}" 2>&1 | grep -v unsandboxed >&2) ||
		true
	for p in "${want[@]}"; do
		compgen -G "$CACHE/debs/${p}_*.deb" >/dev/null ||
			skip_or_fail "could not download $p (offline?)"
	done
}

# The library packages a .deb depends on that this machine does not have (first alternative).
missing_libs() {
	local d p
	for d in "$@"; do
		dpkg-deb -f "$d" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//; s/ //g'
	done | sort -u | while read -r p; do
		case "$p" in lib*) installed "$p" || echo "$p" ;; esac
	done
}

fetch qemu-system-x86 qemu-system-common qemu-system-data seabios busybox-static \
	"linux-image-$FLAVOUR"
for _ in 1 2 3 4; do
	mapfile -t libs < <(missing_libs "$CACHE"/debs/*.deb)
	[ ${#libs[@]} -eq 0 ] && break
	fetch "${libs[@]}"
done

# Unpack once per set of packages.
stamp=$(ls "$CACHE/debs" | sha256sum | cut -c1-16)
if [ ! -e "$CACHE/root/.stamp-$stamp" ]; then
	rm -rf "$CACHE/root" && mkdir -p "$CACHE/root"
	for d in "$CACHE"/debs/*.deb; do dpkg -x "$d" "$CACHE/root"; done
	touch "$CACHE/root/.stamp-$stamp"
fi
R=$CACHE/root
export LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu
export QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu
QEMU=$R/usr/bin/qemu-system-x86_64
"$QEMU" --version >/dev/null || skip_or_fail "the unpacked qemu does not start"

HDR=/usr/src/linux-headers-$FLAVOUR
if [ ! -e "$HDR/Module.symvers" ]; then
	log "installing linux-headers-$FLAVOUR"
	apt-get install -y -q --no-install-recommends "linux-headers-$FLAVOUR" >&2 ||
		skip_or_fail "could not install linux-headers-$FLAVOUR"
fi
for tool in make gcc; do
	command -v $tool >/dev/null || apt-get install -y -q --no-install-recommends make gcc libc6-dev >&2
done

BUILD=$CACHE/build
rm -rf "$BUILD" && mkdir -p "$BUILD/initramfs"/{bin,dev,proc,sys,tmp,rust}
cp -r "$REPO/kmod" "$BUILD/kmod"
log "building the module against $HDR"
make -C "$HDR" M="$BUILD/kmod" QUIVER_KZERO_WERROR=y modules >"$BUILD/kmod.log" 2>&1 || {
	cat "$BUILD/kmod.log"
	echo "FAIL kzero_build"
	exit 1
}
if grep -q 'warning:' "$BUILD/kmod.log"; then
	cat "$BUILD/kmod.log"
	echo "FAIL kzero_build: warnings"
	exit 1
fi
echo "PASS kzero_build"

gcc -static -O2 -Wall -Wextra -Werror -pthread -o "$BUILD/initramfs/kzero_test" \
	"$REPO/tests/vm/kzero_test.c"

if [ "${QUIVER_VM_RUST:-1}" != 0 ]; then
	log "building static quiver-shm test binaries"
	CARGO_TARGET_DIR=$CACHE/target RUSTFLAGS='-C target-feature=+crt-static' \
		cargo test -p quiver-shm --features kzero-vm --test kzero --target x86_64-unknown-linux-gnu --no-run \
		--message-format=json 2>"$BUILD/cargo.log" >"$BUILD/cargo.json" || {
		tail -50 "$BUILD/cargo.log"
		echo "FAIL rust_build"
		exit 1
	}
	# The integration tests that exercise the module (their names start with kzero).
	python3 - "$BUILD/cargo.json" "$BUILD/initramfs/rust" <<'EOF'
import json, shutil, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["kind"] == ["test"] and m["target"]["name"].startswith("kzero"):
        shutil.copy(m["executable"], f"{sys.argv[2]}/{m['target']['name']}")
EOF
fi

cp "$BUILD/kmod/quiver_kzero.ko" "$BUILD/initramfs/"
# zram and what it needs, from the same kernel package: the swap device of the swap test.
mkdir -p "$BUILD/initramfs/modules"
for m in mm/zsmalloc crypto/lzo-rle drivers/block/zram/zram; do
	cp "$R/lib/modules/$FLAVOUR/kernel/$m.ko" "$BUILD/initramfs/modules/"
done
cp "$R/bin/busybox" "$BUILD/initramfs/bin/busybox"
cat >"$BUILD/initramfs/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
# Swap on zram, so the swap test has swapped-out pages to move.
for m in zsmalloc lzo-rle zram; do insmod /modules/$m.ko; done
echo 256M >/sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0 ||
	echo "# no swap: zram setup failed"
echo "== tests"
if insmod /quiver_kzero.ko mode=0666; then
	echo "PASS kzero_insmod"
	[ "$(stat -c %a /dev/quiver-kzero)" = 666 ] && echo "PASS kzero_mode_param" ||
		echo "FAIL kzero_mode_param: $(stat -c %a /dev/quiver-kzero)"
	/kzero_test
	for t in /rust/*; do
		[ -x "$t" ] || continue
		cd /tmp
		"$t" --test-threads=1 --show-output >/tmp/rust.out 2>&1
		cat /tmp/rust.out
		sed -n 's/^test \(.*\) \.\.\. ok$/PASS rust_\1/p; s/^test \(.*\) \.\.\. FAILED$/FAIL rust_\1/p' \
			/tmp/rust.out
		grep -q '^test result: ok' /tmp/rust.out || echo "FAIL rust_$(basename "$t"): exit"
	done
	echo "# counters: $(for c in pages_moved pages_copied pages_zeroed pages_live files_live deanon_calls; do
		printf '%s=%s ' $c "$(cat /sys/class/misc/quiver-kzero/$c)"; done)"
	[ "$(cat /sys/class/misc/quiver-kzero/pages_live)" = 0 ] &&
		[ "$(cat /sys/class/misc/quiver-kzero/files_live)" = 0 ] &&
		echo "PASS kzero_nothing_live" || echo "FAIL kzero_nothing_live"
	rmmod quiver_kzero && echo "PASS kzero_rmmod" || echo "FAIL kzero_rmmod"
else
	echo "FAIL kzero_insmod"
fi
if dmesg | grep -E 'WARNING:|BUG:|Oops|general protection|Call Trace|refcount_t|list_del corruption'; then
	echo "FAIL kzero_dmesg_clean"
else
	echo "PASS kzero_dmesg_clean"
fi
echo "== dmesg"
dmesg | tail -n 40
echo "== end"
poweroff -f
EOF
chmod +x "$BUILD/initramfs/init"
(cd "$BUILD/initramfs" && find . | "$R/bin/busybox" cpio -o -H newc 2>/dev/null) |
	gzip -1 >"$BUILD/initramfs.cpio.gz"

log "booting $FLAVOUR under qemu TCG (timeout ${TIMEOUT}s)"
set +e
timeout "$TIMEOUT" "$QEMU" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" \
	-machine q35 -accel tcg -cpu max -smp 2 -m 3584 -no-reboot -nic none \
	-display none -monitor none -serial "file:$BUILD/console.raw" \
	-kernel "$R/boot/vmlinuz-$FLAVOUR" -initrd "$BUILD/initramfs.cpio.gz" \
	-append "console=ttyS0 panic=-1 transparent_hugepage=always" </dev/null
rc=$?
set -e
tr -d '\r' <"$BUILD/console.raw" >"$BUILD/console.log"
sed -n '/^== tests/,/^== end/p' "$BUILD/console.log" | grep -E '^(PASS|FAIL|#) ' || true
fails=$(grep -c '^FAIL ' "$BUILD/console.log" || true)
if [ "$rc" = 124 ]; then
	echo "FAIL vm_boot: timed out after ${TIMEOUT}s (console: $BUILD/console.log)"
	exit 1
fi
if ! grep -q '^== end' "$BUILD/console.log"; then
	tail -n 60 "$BUILD/console.log"
	echo "FAIL vm_boot: the guest did not finish (qemu exit $rc, console: $BUILD/console.log)"
	exit 1
fi
if [ "$fails" != 0 ]; then
	sed -n '/^== dmesg/,/^== end/p' "$BUILD/console.log"
	echo "vm: $fails failed (console: $BUILD/console.log)"
	exit 1
fi
echo "vm: all passed (console: $BUILD/console.log)"
