using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>What the kernels run with on this machine, for diagnostics (a NativeAOT build without AVX-512 shows Vector256).</summary>
public static class KernelInfo
{
    /// <summary>The widest hardware-accelerated vector the kernels use: "Vector512", "Vector256" or "Vector128".</summary>
    public static string VectorWidth => SimdWidths.Best.ToString();
}
