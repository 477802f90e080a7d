using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>How the quantizer chooses each block's scale.</summary>
public enum ScaleSelection
{
    /// <summary>
    /// The scale among 16 candidates near the natural one (each rounded to the scale type first) that leaves the least
    /// squared error in the block's weights (q8 never below absmax/127, so no weight is clipped). What `paligemma quantize`
    /// writes and the default of the Quantizer's methods; load-time quantization defaults to <see cref="AbsMax"/> (faster).
    /// </summary>
    MinimumError,
    /// <summary>The natural scale: q8 absmax/127, nf4 absmax (rounded to the scale type).</summary>
    AbsMax,
}

/// <summary>
/// Block quantization and dequantization of weight rows (see <see cref="QuantFormat"/>). Each block's scale is rounded
/// to the stored scale type (fp16 or fp32) before its codes are chosen, so the codes are the nearest ones for the scale
/// that is actually stored; <see cref="ScaleSelection"/> says which scale.
/// </summary>
public static class Quantizer
{
    /// <summary>The 16 NF4 code values of bitsandbytes, ascending; code 7 is exactly 0.</summary>
    public static ReadOnlySpan<float> Nf4Codes =>
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    ];

    /// <summary>
    /// The smallest nonzero block scale stored as fp16 (2^-15). Below it fp16's subnormal spacing (2^-24) would round a
    /// scale by more than 2^-10 of its value (normal fp16 numbers: at most 2^-11), so a matrix with such a block keeps fp32 scales.
    /// </summary>
    public const float MinHalfScale = 1f / 32768f;

    /// <summary>The largest fp16 value; a matrix with a larger block scale keeps fp32 scales.</summary>
    public const float MaxHalfScale = 65504f;

    // Midpoints between consecutive codes: a normalized value v gets the code of the number of midpoints below it.
    private static readonly float[] s_nf4Midpoints = BuildMidpoints();

    /// <summary>The 15 midpoints between consecutive NF4 codes, ascending.</summary>
    internal static ReadOnlySpan<float> Nf4Midpoints => s_nf4Midpoints;

    private static float[] BuildMidpoints()
    {
        var codes = Nf4Codes;
        var mid = new float[15];
        for (int i = 0; i < 15; i++) mid[i] = (codes[i] + codes[i + 1]) * 0.5f;
        return mid;
    }

    /// <summary>
    /// The nearest value of <paramref name="scaleType"/> (F16 or F32) to a finite, non-negative fp32 scale, as fp32;
    /// +∞ when it is beyond fp16's range. Equals <c>(float)(Half)scale</c> for F16 (round to nearest even), without its cost.
    /// </summary>
    public static float RoundScale(float scale, DType scaleType)
    {
        if (scaleType == DType.F32)
            return scale;
        if (scaleType != DType.F16)
            throw new ArgumentException($"block scales are F16 or F32, not {scaleType}", nameof(scaleType));
        return RoundToHalf(scale);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float RoundToHalf(float scale)
    {
        const float SmallestNormal = 1f / 16384f;
        if (scale < SmallestNormal)
            // Subnormal fp16: multiples of 2^-24 (scaling by a power of two is exact).
            return MathF.Round(scale * 16777216f) * (1f / 16777216f);
        // Normal fp16: 10 fraction bits, i.e. drop 13 of fp32's 23, ties to even.
        uint bits = BitConverter.SingleToUInt32Bits(scale);
        bits = (bits + 0xFFFu + ((bits >> 13) & 1u)) & ~0x1FFFu;
        float rounded = BitConverter.UInt32BitsToSingle(bits);
        return rounded > MaxHalfScale ? float.PositiveInfinity : rounded;
    }

    /// <summary>
    /// True when a block scale (before rounding) may be stored as <paramref name="scaleType"/>: always for F32; for F16
    /// when it is 0 (an all-zero block) or rounds to a value in [<see cref="MinHalfScale"/>, <see cref="MaxHalfScale"/>].
    /// </summary>
    public static bool ScaleFits(float scale, DType scaleType)
    {
        if (scaleType == DType.F32 || scale == 0f)
            return true;
        float rounded = RoundScale(scale, scaleType);
        return rounded >= MinHalfScale && rounded <= MaxHalfScale;
    }

    /// <summary>
    /// Quantizes one row of K weights into <c>BlocksPerRow(K)</c> blocks (<paramref name="blocks"/>, 32 bytes each) and
    /// as many fp32 scales. The padding past K in the last block is encoded as 0.
    /// </summary>
    public static void QuantizeRow(QuantFormat format, ReadOnlySpan<float> row, Span<byte> blocks, Span<float> scales,
        ScaleSelection selection = ScaleSelection.MinimumError) =>
        TryQuantizeRow(format, row, blocks, scales, DType.F32, selection);

    /// <summary>
    /// Quantizes one row as <see cref="QuantizeRow"/> with scales rounded to <paramref name="scaleType"/> (F16 or F32):
    /// <paramref name="scales"/> receives their fp32 values, exactly representable as <paramref name="scaleType"/>.
    /// Returns false, leaving the row incomplete, when a block's scale does not fit (<see cref="ScaleFits"/>; only fp16 can fail).
    /// </summary>
    public static bool TryQuantizeRow(QuantFormat format, ReadOnlySpan<float> row, Span<byte> blocks, Span<float> scales, DType scaleType,
        ScaleSelection selection = ScaleSelection.MinimumError) =>
        TryQuantizeRow(format, row, blocks, scales, scaleType, selection, ScaleSearch.Best(format));

    /// <summary>As the public overload on a chosen search path (tests run each one the CPU has).</summary>
    internal static bool TryQuantizeRow(QuantFormat format, ReadOnlySpan<float> row, Span<byte> blocks, Span<float> scales, DType scaleType,
        ScaleSelection selection, ScaleSearch.Path searchPath)
    {
        if (scaleType is not (DType.F16 or DType.F32))
            throw new ArgumentException($"block scales are F16 or F32, not {scaleType}", nameof(scaleType));
        int blockSize = format.BlockSize();
        int count = format.BlocksPerRow(row.Length);
        if (blocks.Length < count * format.BlockBytes())
            throw new ArgumentException($"{count} {format.Name()} blocks need {count * format.BlockBytes()} bytes; {blocks.Length} given", nameof(blocks));
        if (scales.Length < count)
            throw new ArgumentException($"{count} blocks need {count} scales; {scales.Length} given", nameof(scales));
        Span<float> padded = stackalloc float[64];
        for (int b = 0; b < count; b++)
        {
            int start = b * blockSize;
            scoped ReadOnlySpan<float> values = row.Slice(start, Math.Min(blockSize, row.Length - start));
            if (values.Length < blockSize)
            {
                padded.Clear();
                values.CopyTo(padded);
                values = padded[..blockSize];
            }
            float absMax = MathF.Abs(TensorPrimitives.MaxMagnitude(values));
            if (!float.IsFinite(absMax))
                throw new ArgumentException("weights must be finite to be quantized", nameof(row));
            float natural = format == QuantFormat.Q8 ? absMax / 127f : absMax;
            if (!ScaleFits(natural, scaleType))
                return false;
            float scale = RoundScale(natural, scaleType);
            if (selection == ScaleSelection.MinimumError && scale >= ScaleSearch.MinScale(scaleType))
                scale = ScaleSearch.Choose(format, values, natural, scaleType, searchPath);
            Span<byte> block = blocks.Slice(b * format.BlockBytes(), format.BlockBytes());
            if (format == QuantFormat.Q8)
                EncodeQ8Block(values, scale, block);
            else
                EncodeNf4Block(values, scale, block);
            scales[b] = scale;
        }
        return true;
    }

    /// <summary>The q8 codes of one block of 32 for a given scale: round(w / scale), clamped to ±127.</summary>
    private static void EncodeQ8Block(ReadOnlySpan<float> values, float scale, Span<byte> block)
    {
        if (scale == 0f)
        {
            block.Clear();
            return;
        }
        float inverse = 1f / scale;
        if (!float.IsFinite(inverse))
        {
            // fp32 scales of tiny blocks (below ~3e-39): divide, the inverse would overflow.
            for (int i = 0; i < 32; i++)
                block[i] = (byte)(sbyte)Math.Clamp(MathF.Round(values[i] / scale), -127f, 127f);
            return;
        }
        if (Vector512.IsHardwareAccelerated)
        {
            ref float source = ref MemoryMarshal.GetReference(values);
            var limit = Vector512.Create(127f);
            var s = Vector512.Create(inverse);
            Vector512<int> low = Vector512.ConvertToInt32(Vector512.Clamp(Vector512.Round(Vector512.LoadUnsafe(ref source) * s), -limit, limit));
            Vector512<int> high = Vector512.ConvertToInt32(Vector512.Clamp(Vector512.Round(Vector512.LoadUnsafe(ref source, 16) * s), -limit, limit));
            Vector512<short> words = Vector512.Narrow(low, high);
            Vector256<sbyte> bytes = Vector256.Narrow(words.GetLower(), words.GetUpper());
            bytes.AsByte().StoreUnsafe(ref MemoryMarshal.GetReference(block));
            return;
        }
        for (int i = 0; i < 32; i++)
            block[i] = (byte)(sbyte)Math.Clamp(MathF.Round(values[i] * inverse), -127f, 127f);
    }

    /// <summary>The nf4 codes of one block of 64 for a given absmax: the nearest code value to w / absmax.</summary>
    private static void EncodeNf4Block(ReadOnlySpan<float> values, float scale, Span<byte> block)
    {
        float inverse = scale == 0f ? 0f : 1f / scale;
        bool divide = !float.IsFinite(inverse);
        if (Avx512F.IsSupported && !divide)
        {
            // Elements 0..31 go to the low nibbles of bytes 0..31, elements 32..63 to the high nibbles.
            ref float source = ref MemoryMarshal.GetReference(values);
            var s = Vector512.Create(inverse);
            for (int half = 0; half < 32; half += 16)
            {
                Vector512<int> low = ScaleSearch.Nf4Lookup.Code(Vector512.LoadUnsafe(ref source, (nuint)half) * s);
                Vector512<int> high = ScaleSearch.Nf4Lookup.Code(Vector512.LoadUnsafe(ref source, (nuint)(half + 32)) * s);
                Avx512F.ConvertToVector128Byte(low | (high << 4)).StoreUnsafe(ref MemoryMarshal.GetReference(block), (nuint)half);
            }
            return;
        }
        for (int j = 0; j < 32; j++)
        {
            int low = Nf4Code(divide ? values[j] / scale : values[j] * inverse);
            int high = Nf4Code(divide ? values[j + 32] / scale : values[j + 32] * inverse);
            block[j] = (byte)(low | (high << 4));
        }
    }

    /// <summary>The NF4 code of a normalized value: the count of code midpoints strictly below it (the nearest code).</summary>
    internal static int Nf4Code(float normalized)
    {
        float[] mid = s_nf4Midpoints;
        int code = 0;
        for (int i = 0; i < mid.Length; i++)
            code += normalized > mid[i] ? 1 : 0;
        return code;
    }

    /// <summary>Dequantizes <paramref name="destination"/>.Length weights from a row's blocks and fp32 scales.</summary>
    public static unsafe void DequantizeRow(QuantFormat format, ReadOnlySpan<byte> blocks, ReadOnlySpan<float> scales, Span<float> destination)
    {
        int blockSize = format.BlockSize();
        int count = format.BlocksPerRow(destination.Length);
        if (blocks.Length < count * format.BlockBytes() || scales.Length < count)
            throw new ArgumentException($"{destination.Length} weights need {count} {format.Name()} blocks and scales");
        int whole = destination.Length / blockSize;
        fixed (byte* codes = blocks)
        fixed (float* scale = scales)
        fixed (float* target = destination)
        {
            int b = 0;
            if (Avx512F.IsSupported)
            {
                for (; b < whole; b++)
                    DequantizeBlockVector512(format, codes + b * 32, scale[b], target + b * blockSize);
            }
            Span<float> tail = stackalloc float[64];
            for (; b < count; b++)
            {
                DequantizeBlockScalar(format, codes + b * 32, scale[b], tail);
                int start = b * blockSize;
                tail[..Math.Min(blockSize, destination.Length - start)].CopyTo(destination[start..]);
            }
        }
    }

    internal static unsafe void DequantizeBlockScalar(QuantFormat format, byte* codes, float scale, Span<float> target)
    {
        if (format == QuantFormat.Q8)
        {
            for (int i = 0; i < 32; i++) target[i] = (sbyte)codes[i] * scale;
            return;
        }
        ReadOnlySpan<float> table = Nf4Codes;
        for (int j = 0; j < 32; j++)
        {
            target[j] = table[codes[j] & 0xF] * scale;
            target[j + 32] = table[codes[j] >> 4] * scale;
        }
    }

    internal static unsafe void DequantizeBlockVector512(QuantFormat format, byte* codes, float scale, float* target)
    {
        var s = Vector512.Create(scale);
        if (format == QuantFormat.Q8)
        {
            (Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)codes))) * s).Store(target);
            (Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)codes + 16))) * s).Store(target + 16);
            return;
        }
        Vector512<float> table = Vector512.Create(Nf4Codes);
        Vector512<int> lo = Avx512F.ConvertToVector512Int32(Vector128.Load(codes));
        Vector512<int> hi = Avx512F.ConvertToVector512Int32(Vector128.Load(codes + 16));
        // vpermps reads only the low 4 bits of each index.
        (Avx512F.PermuteVar16x32(table, lo) * s).Store(target);
        (Avx512F.PermuteVar16x32(table, hi) * s).Store(target + 16);
        (Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(lo, 4)) * s).Store(target + 32);
        (Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(hi, 4)) * s).Store(target + 48);
    }

    /// <summary>
    /// Quantizes a whole F32/BF16/F16 matrix into newly allocated pinned storage (rows in parallel), with fp16 scales when
    /// every block's scale fits (<see cref="ScaleFits"/>), else with fp32 scales (see <see cref="QuantizedMatrix.ScaleType"/>).
    /// </summary>
    public static QuantizedMatrix Quantize(in WeightMatrix weight, QuantFormat format, ScaleSelection selection = ScaleSelection.MinimumError) =>
        TryQuantize(weight, format, DType.F16, selection) ?? TryQuantize(weight, format, DType.F32, selection)!;

    /// <summary>Quantizes a matrix with <paramref name="scaleType"/> scales; null when a block's scale does not fit it.</summary>
    public static QuantizedMatrix? TryQuantize(in WeightMatrix weight, QuantFormat format, DType scaleType, ScaleSelection selection = ScaleSelection.MinimumError)
    {
        var result = QuantizedMatrix.Allocate(format, weight.Rows, weight.Cols, scaleType);
        var source = weight;
        int blocks = result.BlocksPerRow;
        var options = new ParallelOptions { MaxDegreeOfParallelism = KernelThreading.MaxThreads };
        // About 256K weights per work item: enough to amortize the scheduling, small enough to balance the threads.
        int rowsPerItem = Math.Clamp((1 << 18) / weight.Cols, 1, 64);
        int items = (weight.Rows + rowsPerItem - 1) / rowsPerItem;
        int failed = 0;
        Parallel.For(0, items, options, () => new float[source.Cols + blocks], (item, state, buffer) =>
        {
            Span<float> row = buffer.AsSpan(0, source.Cols), scales = buffer.AsSpan(source.Cols, blocks);
            int end = Math.Min(source.Rows, (item + 1) * rowsPerItem);
            for (int n = item * rowsPerItem; n < end && Volatile.Read(ref failed) == 0; n++)
            {
                ReadRow(source, n, row);
                if (!TryQuantizeRow(format, row, result.RowBlocks(n), scales, scaleType, selection))
                {
                    Volatile.Write(ref failed, 1);
                    state.Stop();
                    break;
                }
                StoreScales(scales, result.RowScaleBytes(n), scaleType);
            }
            return buffer;
        }, static _ => { });
        return failed == 0 ? result : null;
    }

    /// <summary>Stores fp32 scales (exactly representable as <paramref name="scaleType"/>) as raw <paramref name="scaleType"/> values.</summary>
    public static void StoreScales(ReadOnlySpan<float> scales, Span<byte> destination, DType scaleType)
    {
        if (scaleType == DType.F16)
            TensorPrimitives.ConvertToHalf(scales, MemoryMarshal.Cast<byte, Half>(destination)[..scales.Length]);
        else if (scaleType == DType.F32)
            scales.CopyTo(MemoryMarshal.Cast<byte, float>(destination));
        else
            throw new ArgumentException($"block scales are F16 or F32, not {scaleType}", nameof(scaleType));
    }

    /// <summary>Widens row <paramref name="row"/> of an F32/BF16/F16 matrix into <paramref name="destination"/> (Cols floats).</summary>
    public static unsafe void ReadRow(in WeightMatrix weight, int row, Span<float> destination)
    {
        if ((uint)row >= (uint)weight.Rows)
            throw new ArgumentOutOfRangeException(nameof(row), row, $"the matrix has {weight.Rows} rows");
        int k = weight.Cols;
        byte* start = (byte*)weight.Data + (long)row * k * weight.DType.SizeOf();
        Span<float> target = destination[..k];
        switch (weight.DType)
        {
            case DType.F32:
                new ReadOnlySpan<float>(start, k).CopyTo(target);
                break;
            case DType.F16:
                TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(start, k), target);
                break;
            case DType.BF16:
                var bits = new ReadOnlySpan<ushort>(start, k);
                Span<uint> wide = MemoryMarshal.Cast<float, uint>(target);
                int i = 0;
                if (Vector512.IsHardwareAccelerated)
                    for (; i + 32 <= k; i += 32)
                    {
                        var (lower, upper) = Vector512.Widen(Vector512.Create(bits.Slice(i, 32)));
                        (lower << 16).CopyTo(wide[i..]);
                        (upper << 16).CopyTo(wide[(i + 16)..]);
                    }
                for (; i < k; i++) wide[i] = (uint)bits[i] << 16;
                break;
            default:
                throw new ArgumentException($"weight dtype {weight.DType} cannot be quantized", nameof(weight));
        }
    }
}
