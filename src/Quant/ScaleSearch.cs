using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>
/// Chooses each block's scale to minimize the block's squared error. 16 candidates near the block's natural scale
/// (q8: absmax/127 × 1.000, 1.005, …, 1.075, never below it, so no weight is clipped; nf4: absmax × 0.80, 0.82, …, 1.10),
/// each rounded to the stored scale type before its codes are chosen, are scored by Σ (w − dequantized w)², and the
/// lowest score wins (ties: the earlier candidate). Every path computes exactly what the scalar reference computes (the
/// same operations in the same order: the 16 candidates run in vector lanes, element i of the block adding into partial
/// sum i mod 4, combined as (0 + 1) + (2 + 3)), so a checkpoint's bytes do not depend on the CPU that wrote it.
/// (A least-squares refit of the winner's codes lowered the rms weight error by another 1.3 % for q8 and 0.2 % for nf4
/// at a third more time; left out.)
/// </summary>
[SkipLocalsInit]
internal static class ScaleSearch
{
    public const int Candidates = 16;

    internal enum Path { Scalar, Vector256, Vector512 }

    /// <summary>q8: AVX-512 or 256-bit vectors; nf4: AVX-512 (its code lookups use 16- and 32-entry permutes), else scalar.</summary>
    internal static Path Best(QuantFormat format) =>
        Avx512F.IsSupported ? Path.Vector512 :
        format == QuantFormat.Q8 && Vector256.IsHardwareAccelerated ? Path.Vector256 : Path.Scalar;

    // Candidate multipliers of the natural scale; lane 0 of q8 and lane 10 of nf4 are exactly 1.
    private static readonly float[] s_q8Multipliers = Grid(1.0, 0.005);
    private static readonly float[] s_nf4Multipliers = Grid(0.80, 0.02);

    private static float[] Grid(double first, double step)
    {
        var grid = new float[Candidates];
        for (int i = 0; i < Candidates; i++) grid[i] = (float)(first + i * step);
        return grid;
    }

    internal static ReadOnlySpan<float> Multipliers(QuantFormat format) => format == QuantFormat.Q8 ? s_q8Multipliers : s_nf4Multipliers;

    /// <summary>The smallest scale searched (smaller ones keep their natural scale): fp16's accurate range, or for fp32 where 1/scale stays finite.</summary>
    internal static float MinScale(DType scaleType) => scaleType == DType.F16 ? Quantizer.MinHalfScale : 1e-30f;

    private static float MaxScale(DType scaleType) => scaleType == DType.F16 ? Quantizer.MaxHalfScale : float.MaxValue;

    /// <summary>
    /// The chosen scale (a value of <paramref name="scaleType"/>) of one whole block (32 q8 or 64 nf4 weights, padding as
    /// zeros) whose natural scale (absmax/127 or absmax) fits the type and rounds to at least <see cref="MinScale"/>.
    /// </summary>
    public static float Choose(QuantFormat format, ReadOnlySpan<float> block, float natural, DType scaleType, Path path)
    {
        Span<float> scales = stackalloc float[Candidates];
        Span<float> errors = stackalloc float[Candidates];
        switch (path)
        {
            case Path.Vector512 when format == QuantFormat.Q8:
                GridVector512<Q8Rounding>(block, natural, s_q8Multipliers, scaleType, scales, errors);
                break;
            case Path.Vector512:
                GridVector512<Nf4Rounding>(block, natural, s_nf4Multipliers, scaleType, scales, errors);
                break;
            case Path.Vector256 when format == QuantFormat.Q8:
                GridQ8Vector256(block, natural, scaleType, scales, errors);
                break;
            default:
                GridScalar(format, block, natural, scaleType, scales, errors);
                break;
        }
        int bestIndex = 0;
        for (int j = 1; j < Candidates; j++)
            if (errors[j] < errors[bestIndex]) bestIndex = j;
        return scales[bestIndex];
    }

    // ---- The 16-candidate grid: candidate j in lane j, block elements one after another. ----

    internal static void GridScalar(QuantFormat format, ReadOnlySpan<float> block, float natural, DType scaleType, Span<float> scales, Span<float> errors)
    {
        ReadOnlySpan<float> multipliers = Multipliers(format);
        ReadOnlySpan<float> table = Quantizer.Nf4Codes;
        float lo = MinScale(scaleType), hi = MaxScale(scaleType);
        for (int j = 0; j < Candidates; j++)
        {
            float scale = Quantizer.RoundScale(natural * multipliers[j], scaleType);
            float inverse = 1f / scale;
            Span<float> sums = [0f, 0f, 0f, 0f];
            for (int i = 0; i < block.Length; i++)
            {
                float v = block[i] * inverse;
                float value = format == QuantFormat.Q8 ? MathF.Round(v) : table[Quantizer.Nf4Code(v)];
                float e = MathF.FusedMultiplyAdd(-value, scale, block[i]);
                sums[i & 3] = MathF.FusedMultiplyAdd(e, e, sums[i & 3]);
            }
            scales[j] = scale;
            errors[j] = scale >= lo && scale <= hi ? (sums[0] + sums[1]) + (sums[2] + sums[3]) : float.PositiveInfinity;
        }
    }

    private static void GridVector512<TCode>(ReadOnlySpan<float> block, float natural, float[] multipliers, DType scaleType, Span<float> scales, Span<float> errors)
        where TCode : struct, ICodeRounding
    {
        Vector512<float> scale = RoundScale(Vector512.Create(natural) * Vector512.Create(multipliers), scaleType);
        Vector512<float> inverse = Vector512<float>.One / scale, negativeScale = -scale;
        Vector512<float> s0 = Vector512<float>.Zero, s1 = s0, s2 = s0, s3 = s0;
        ref float w = ref MemoryMarshal.GetReference(block);
        // q8: multipliers >= 1 keep |w / scale| below 127.5 (fp16 rounds a scale by at most 2^-10), so no clamping is needed.
        // Four sums (element i into sum i mod 4) keep four FMA chains in flight.
        for (int i = 0; i < block.Length; i += 4)
        {
            s0 = Term<TCode>(Unsafe.Add(ref w, i), inverse, negativeScale, s0);
            s1 = Term<TCode>(Unsafe.Add(ref w, i + 1), inverse, negativeScale, s1);
            s2 = Term<TCode>(Unsafe.Add(ref w, i + 2), inverse, negativeScale, s2);
            s3 = Term<TCode>(Unsafe.Add(ref w, i + 3), inverse, negativeScale, s3);
        }
        Finish(scale, (s0 + s1) + (s2 + s3), scaleType, scales, errors);
    }

    /// <summary>How a weight divided by the block scale becomes the value its code stands for (q8: nearest integer; nf4: nearest table entry).</summary>
    private interface ICodeRounding
    {
        static abstract Vector512<float> Round(Vector512<float> ratio);
    }

    private readonly struct Q8Rounding : ICodeRounding
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Round(Vector512<float> ratio) => Vector512.Round(ratio);
    }

    private readonly struct Nf4Rounding : ICodeRounding
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Round(Vector512<float> ratio) => Nf4Lookup.Value(ratio);
    }

    private static void GridQ8Vector256(ReadOnlySpan<float> block, float natural, DType scaleType, Span<float> scales, Span<float> errors)
    {
        for (int half = 0; half < Candidates; half += 8)
        {
            Vector256<float> scale = RoundScale(Vector256.Create(natural) * Vector256.Create(s_q8Multipliers.AsSpan(half, 8)), scaleType);
            Vector256<float> inverse = Vector256<float>.One / scale, negativeScale = -scale;
            Vector256<float> s0 = Vector256<float>.Zero, s1 = s0, s2 = s0, s3 = s0;
            ref float w = ref MemoryMarshal.GetReference(block);
            for (int i = 0; i < block.Length; i += 4)
            {
                s0 = Q8Term(Unsafe.Add(ref w, i), inverse, negativeScale, s0);
                s1 = Q8Term(Unsafe.Add(ref w, i + 1), inverse, negativeScale, s1);
                s2 = Q8Term(Unsafe.Add(ref w, i + 2), inverse, negativeScale, s2);
                s3 = Q8Term(Unsafe.Add(ref w, i + 3), inverse, negativeScale, s3);
            }
            Vector256<float> sum = (s0 + s1) + (s2 + s3);
            Vector256<float> valid = Vector256.GreaterThanOrEqual(scale, Vector256.Create(MinScale(scaleType))) & Vector256.LessThanOrEqual(scale, Vector256.Create(MaxScale(scaleType)));
            scale.CopyTo(scales[half..]);
            Vector256.ConditionalSelect(valid, sum, Vector256.Create(float.PositiveInfinity)).CopyTo(errors[half..]);
        }
    }

    /// <summary>sum + (w − code(w / scale) · scale)² for 16 candidate scales.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Term<TCode>(float weight, Vector512<float> inverse, Vector512<float> negativeScale, Vector512<float> sum)
        where TCode : struct, ICodeRounding
    {
        var x = Vector512.Create(weight);
        Vector512<float> e = Vector512.FusedMultiplyAdd(TCode.Round(x * inverse), negativeScale, x);
        return Vector512.FusedMultiplyAdd(e, e, sum);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Q8Term(float weight, Vector256<float> inverse, Vector256<float> negativeScale, Vector256<float> sum)
    {
        var x = Vector256.Create(weight);
        Vector256<float> e = Vector256.FusedMultiplyAdd(Vector256.Round(x * inverse), negativeScale, x);
        return Vector256.FusedMultiplyAdd(e, e, sum);
    }

    private static void Finish(Vector512<float> scale, Vector512<float> sum, DType scaleType, Span<float> scales, Span<float> errors)
    {
        Vector512<float> valid = Vector512.GreaterThanOrEqual(scale, Vector512.Create(MinScale(scaleType))) & Vector512.LessThanOrEqual(scale, Vector512.Create(MaxScale(scaleType)));
        scale.CopyTo(scales);
        Vector512.ConditionalSelect(valid, sum, Vector512.Create(float.PositiveInfinity)).CopyTo(errors);
    }

    /// <summary>As <see cref="Quantizer.RoundScale"/> per lane (fp16: subnormal multiples of 2^-24, else ties-to-even on 13 dropped bits).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<float> RoundScale(Vector512<float> scale, DType scaleType)
    {
        if (scaleType == DType.F32) return scale;
        Vector512<uint> bits = scale.AsUInt32();
        Vector512<float> normal = ((bits + Vector512.Create(0xFFFu) + ((bits >> 13) & Vector512<uint>.One)) & Vector512.Create(~0x1FFFu)).AsSingle();
        normal = Vector512.ConditionalSelect(Vector512.GreaterThan(normal, Vector512.Create(Quantizer.MaxHalfScale)), Vector512.Create(float.PositiveInfinity), normal);
        Vector512<float> subnormal = Vector512.Round(scale * 16777216f) * (1f / 16777216f);
        return Vector512.ConditionalSelect(Vector512.LessThan(scale, Vector512.Create(1f / 16384f)), subnormal, normal);
    }

    internal static Vector256<float> RoundScale(Vector256<float> scale, DType scaleType)
    {
        if (scaleType == DType.F32) return scale;
        Vector256<uint> bits = scale.AsUInt32();
        Vector256<float> normal = ((bits + Vector256.Create(0xFFFu) + ((bits >> 13) & Vector256<uint>.One)) & Vector256.Create(~0x1FFFu)).AsSingle();
        normal = Vector256.ConditionalSelect(Vector256.GreaterThan(normal, Vector256.Create(Quantizer.MaxHalfScale)), Vector256.Create(float.PositiveInfinity), normal);
        Vector256<float> subnormal = Vector256.Round(scale * 16777216f) * (1f / 16777216f);
        return Vector256.ConditionalSelect(Vector256.LessThan(scale, Vector256.Create(1f / 16384f)), subnormal, normal);
    }

    /// <summary>
    /// The nf4 code (count of code midpoints strictly below v) of 16 normalized values at once, without 15 comparisons:
    /// v's bin of width 1/16 on [-1, 1) gives the count below the bin's start (a 32-entry table); a bin holds at most one
    /// midpoint (they are ≥ 0.08 apart), so one comparison with the next midpoint finishes it. Every midpoint is ≥ 1.7e-3
    /// from a bin edge, far beyond fp32 rounding, so the bin is exact where it matters (tests compare with the count).
    /// </summary>
    internal static class Nf4Lookup
    {
        public static readonly Vector512<float> Codes = Vector512.Create(Quantizer.Nf4Codes);
        private static readonly Vector512<float> s_midpoints = BuildMidpoints();
        private static readonly Vector512<int> s_belowLow = BuildBelow(0), s_belowHigh = BuildBelow(16);

        private static Vector512<float> BuildMidpoints()
        {
            Span<float> midpoints = stackalloc float[16];
            Quantizer.Nf4Midpoints.CopyTo(midpoints);
            midpoints[15] = float.PositiveInfinity;
            return Vector512.Create((ReadOnlySpan<float>)midpoints);
        }

        private static Vector512<int> BuildBelow(int firstBin)
        {
            Span<int> below = stackalloc int[16];
            below.Clear();
            for (int i = 0; i < 16; i++)
            {
                float start = -1f + (firstBin + i) / 16f;
                foreach (float m in Quantizer.Nf4Midpoints) below[i] += m < start ? 1 : 0;
            }
            return Vector512.Create((ReadOnlySpan<int>)below);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<int> Code(Vector512<float> v)
        {
            Vector512<int> bin = Vector512.ConvertToInt32(Vector512.FusedMultiplyAdd(v, Vector512.Create(16f), Vector512.Create(16f)));
            bin = Vector512.Clamp(bin, Vector512<int>.Zero, Vector512.Create(31));
            Vector512<int> low = Avx512F.PermuteVar16x32x2(s_belowLow, bin, s_belowHigh);
            Vector512<float> next = Avx512F.PermuteVar16x32(s_midpoints, low);
            // GreaterThan is all ones (-1) where v is past the next midpoint.
            return low - Vector512.GreaterThan(v, next).AsInt32();
        }

        /// <summary>The code value of each lane's nearest code.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Value(Vector512<float> v) => Avx512F.PermuteVar16x32(Codes, Code(v));
    }
}
