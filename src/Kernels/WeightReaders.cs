using System.Runtime.CompilerServices;
using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Reads weight elements of one storage type as float vectors, widening in registers.</summary>
internal unsafe interface IWeightReader
{
    static abstract int ElementSize { get; }

    /// <summary>True when widening costs about as much as the load (fp32, bf16); false for f16, worth widening once per tile.</summary>
    static abstract bool CheapToWiden { get; }

    static abstract TVec Load<TOps, TVec>(byte* row, nint index)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged;

    static abstract float LoadScalar(byte* row, nint index);
}

internal readonly unsafe struct Float32Reader : IWeightReader
{
    public static int ElementSize => sizeof(float);
    public static bool CheapToWiden => true;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static TVec Load<TOps, TVec>(byte* row, nint index)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged => TOps.Load((float*)row + index);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadScalar(byte* row, nint index) => ((float*)row)[index];
}

internal readonly unsafe struct BFloat16Reader : IWeightReader
{
    public static int ElementSize => sizeof(ushort);
    public static bool CheapToWiden => true;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static TVec Load<TOps, TVec>(byte* row, nint index)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged => TOps.LoadBFloat16((ushort*)row + index);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadScalar(byte* row, nint index) => BitConverter.UInt32BitsToSingle((uint)((ushort*)row)[index] << 16);
}

internal readonly unsafe struct HalfReader : IWeightReader
{
    public static int ElementSize => sizeof(ushort);
    public static bool CheapToWiden => false;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static TVec Load<TOps, TVec>(byte* row, nint index)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged => TOps.LoadHalf((ushort*)row + index);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadScalar(byte* row, nint index) => HalfBits.ToSingle(((ushort*)row)[index]);
}
