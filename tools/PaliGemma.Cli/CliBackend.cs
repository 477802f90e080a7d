using PaliGemma.CpuOnly.Kernels.Backends;

namespace PaliGemma.Cli;

/// <summary>
/// Where every command's models compute: null (the default) is the CPU backend. A host that embeds this CLI (paligemma-gpu,
/// which opens an ILGPU device in a JIT process) sets it before calling <see cref="Program.Main"/>; this binary itself never
/// references a device library, so it stays NativeAOT-clean.
/// </summary>
public static class CliBackend
{
    public static IComputeBackend? Current { get; set; }
}
