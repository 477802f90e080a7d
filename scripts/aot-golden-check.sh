#!/usr/bin/env bash
# Publishes the NativeAOT `paligemma` binary and runs it on every single-image golden sample, comparing the
# generated ids with the transformers reference in tests/golden/*/cases.json (PaliGemma 1) and tests/golden-pg2/*/cases.json
# (PaliGemma 2). Usage: scripts/aot-golden-check.sh [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/aot}"
dotnet publish tools/PaliGemma.Cli -c Release -r linux-x64 -p:PublishAot=true -o "$out" >/dev/null
echo "binary: $out/paligemma ($(stat -c %s "$out/paligemma") bytes)"
python3 - "$out/paligemma" <<'PY'
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
