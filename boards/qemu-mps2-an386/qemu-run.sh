#!/bin/sh
# Cargo runner: boots IMAGE under QEMU's mps2-an386 with a LAN9118 on the user network
# and decodes the defmt log with defmt-print. Extra arguments become the semihosting
# command line (settings such as `samples=10`, see boards/app/README.md).
# The image's semihosting exit code is this script's exit code.
set -eu
image="$1"
shift
status=0
{ qemu-system-arm -M mps2-an386 -nographic -monitor none -serial none \
    -semihosting-config enable=on,target=native \
    -netdev user,id=n0 -net nic,netdev=n0,model=lan9118 \
    -kernel "$image" -append "$*" || echo $? > "$image.status"; } | defmt-print -e "$image"
if [ -f "$image.status" ]; then status=$(cat "$image.status"); rm -f "$image.status"; fi
exit "$status"
