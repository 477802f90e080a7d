#!/usr/bin/env bash
# Packs every src/ project into artifacts/packages, restores samples/PaliGemma.Sample from that folder (through
# samples/nuget.config, into a private package folder so a re-pack is never shadowed by an older copy in the global
# cache) and runs it on the tiny golden checkpoint.
# Usage: scripts/pack-and-run-sample.sh [model folder] [image] [prompt]
set -euo pipefail
cd "$(dirname "$0")/.."
packages=artifacts/packages
restored=artifacts/sample-packages
rm -rf "$packages" "$restored"
for project in src/Tensors/PaliGemma.CpuOnly.Tensors.csproj src/Kernels/PaliGemma.CpuOnly.Kernels.csproj \
               src/Quant/PaliGemma.CpuOnly.Quant.csproj src/Model/PaliGemma.CpuOnly.Model.csproj \
               src/Extensions.AI/PaliGemma.CpuOnly.Extensions.AI.csproj; do
    dotnet pack "$project" -c Release -o "$packages" --nologo -v quiet
done
ls -1 "$packages"
dotnet restore samples/PaliGemma.Sample --packages "$restored" --nologo -v quiet
model="${1:-tests/golden/tiny-mqa-56}"
image="${2:-tests/golden/tiny-mqa-56/rgb_640x480.png}"
prompt="${3:-caption en}"
dotnet run --project samples/PaliGemma.Sample -c Release --no-restore -- "$model" "$image" "$prompt"
