#!/usr/bin/env bash
# Publishes both NativeAOT `paligemma` binaries (scripts/publish-aot.sh: out/aot-v4 for AVX-512, out/aot-v3 for AVX2) and
# runs every single-image golden sample through each, comparing the generated and prompt ids with the transformers
# reference in tests/golden/*/cases.json (PaliGemma 1) and tests/golden-pg2/*/cases.json (PaliGemma 2).
# The v4 binary is skipped (with a note) on a CPU without AVX-512, where it cannot start.
# Needs python3 for the JSON comparison (the CI image, Debian, has Python 3.11).
# Usage: scripts/aot-golden-check.sh [out-root] [--no-publish]   (default out-root: out)
set -euo pipefail
cd "$(dirname "$0")/.."
root="out"
publish=1
for arg in "$@"; do
    case "$arg" in
        --no-publish) publish=0 ;;
        *) root="$arg" ;;
    esac
done
command -v python3 >/dev/null || { echo "aot-golden-check: python3 is required to compare the JSON outputs" >&2; exit 1; }
if [[ $publish == 1 ]]; then scripts/publish-aot.sh "$root"; fi

check() {
    local level="$1" expected_width="$2" binary="$root/aot-$1/paligemma" version
    [[ -x "$binary" ]] || { echo "aot-golden-check: $binary missing (run scripts/publish-aot.sh)" >&2; return 1; }
    version="$("$binary" --version)"
    # The instruction set must reach the kernels: a v4 binary that reports Vector256 would silently run at half width.
    if [[ "$version" != *"NativeAOT"* || "$version" != *"$expected_width"* ]]; then
        echo "aot-golden-check: $binary reports '$version', expected NativeAOT with $expected_width" >&2
        return 1
    fi
    echo "== x86-64-$level: $binary ($(stat -c %s "$binary") bytes): $version"
    python3 - "$binary" <<'PY'
import json, subprocess, sys
binary, failures, runs = sys.argv[1], 0, 0
for root, case in [(r, c) for r in ("tests/golden", "tests/golden-pg2") for c in json.load(open(f"{r}/index.json"))["cases"]]:
    folder = f"{root}/{case}"
    for s in json.load(open(f"{folder}/cases.json"))["samples"]:
        if s.get("batch") or s.get("suffix_case"):
            continue
        cmd = [binary, "generate", "--model", folder, "--image", f"{folder}/{s['images'][0]}", "--prompt", s["prompts"][0],
               "--max-new-tokens", str(s["max_new_tokens"]), "--json", "--quiet"]
        got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        ok = got["generated_ids"] == s["generated_ids_list"][0] and got["prompt_ids"] == s["input_ids_list"][0]
        runs += 1
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case}/{s['name']}: {len(got['generated_ids'])} ids, prefill {got['timings_ms']['prefill']} ms")
print(f"{runs - failures} passed, {failures} failed")
sys.exit(1 if failures else 0)
PY
}

if grep -qw avx512f /proc/cpuinfo; then
    check v4 Vector512
else
    echo "== x86-64-v4: skipped, this CPU has no AVX-512 (the v4 binary would refuse to start)"
fi
check v3 Vector256
