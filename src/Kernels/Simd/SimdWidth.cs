using System.Runtime.Intrinsics;

namespace PaliGemma.CpuOnly.Kernels.Simd;

/// <summary>The vector width a kernel runs with. Public entry points use <see cref="SimdWidths.Best"/>; tests pick others.</summary>
internal enum SimdWidth
{
    Scalar,
    Vector128,
    Vector256,
    Vector512,
}

internal static class SimdWidths
{
    /// <summary>The widest width the hardware accelerates (Vector128 is the floor: it is correct, if slow, everywhere).</summary>
    public static SimdWidth Best { get; } =
        Vector512.IsHardwareAccelerated ? SimdWidth.Vector512 :
        Vector256.IsHardwareAccelerated ? SimdWidth.Vector256 :
        SimdWidth.Vector128;

    public static int FloatCount(this SimdWidth width) => width switch
    {
        SimdWidth.Vector512 => 16,
        SimdWidth.Vector256 => 8,
        SimdWidth.Vector128 => 4,
        _ => 1,
    };

    /// <summary>Narrows <paramref name="width"/> until one vector fits in <paramref name="length"/> floats (never below Vector128).</summary>
    public static SimdWidth FitTo(this SimdWidth width, long length)
    {
        while (width > SimdWidth.Vector128 && width.FloatCount() > length)
            width--;
        return width;
    }
}
