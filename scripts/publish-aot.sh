#!/usr/bin/env bash
# Publishes the single-file NativeAOT `paligemma` binary twice: out/aot-v4 for x86-64-v4 (AVX-512, the csproj default)
# and out/aot-v3 for x86-64-v3 (AVX2 + FMA, for machines without AVX-512). Fails on any publish warning other than the two
# known SixLabors.ImageSharp ones (IL2104/IL3053 summaries, see README "NativeAOT binary"). Prints sizes and timings.
# Usage: scripts/publish-aot.sh [out-root]   (default: out; writes out-root/aot-v4 and out-root/aot-v3)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-out}"

publish() {
    local level="$1" dir="$root/aot-$1" log start
    log="$(mktemp)"
    start=$(date +%s)
    # The ILC response file records the instruction set, so switching levels recompiles instead of reusing the other build.
    if ! dotnet publish tools/PaliGemma.Cli -c Release -r linux-x64 -p:PublishAot=true -p:IlcInstructionSet="x86-64-$level" \
            -o "$dir" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "publish-aot: x86-64-$level publish failed" >&2
        return 1
    fi
    local unexpected
    unexpected="$(grep -E ': warning [A-Z]+[0-9]+' "$log" | grep -vE "SixLabors\.ImageSharp\.dll : warning IL(2104|3053):" | sort -u || true)"
    rm -f "$log"
    if [[ -n "$unexpected" ]]; then
        echo "$unexpected" >&2
        echo "publish-aot: x86-64-$level publish has warnings beyond ImageSharp's two known ones" >&2
        return 1
    fi
    local bytes
    bytes=$(stat -c %s "$dir/paligemma")
    printf 'x86-64-%s: %s/paligemma  %d bytes (%.1f MB)  published in %d s  [%s]\n' "$level" "$dir" "$bytes" \
        "$(awk "BEGIN { print $bytes / 1048576 }")" "$(( $(date +%s) - start ))" "$("$dir/paligemma" --version)"
}

publish v4
publish v3
