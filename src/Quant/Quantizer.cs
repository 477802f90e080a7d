using System.Numerics.Tensors;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>Block quantization and dequantization of weight rows (round to nearest; see <see cref="QuantFormat"/>).</summary>
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

    // Midpoints between consecutive codes: a normalized value v gets the code of the number of midpoints below it.
    private static readonly float[] s_nf4Midpoints = BuildMidpoints();

    private static float[] BuildMidpoints()
    {
        var codes = Nf4Codes;
        var mid = new float[15];
        for (int i = 0; i < 15; i++) mid[i] = (codes[i] + codes[i + 1]) * 0.5f;
        return mid;
    }

    /// <summary>
    /// Quantizes one row of K weights into <c>BlocksPerRow(K)</c> blocks (<paramref name="blocks"/>, 32 bytes each) and
    /// as many scales. The padding past K in the last block is encoded as 0.
    /// </summary>
    public static void QuantizeRow(QuantFormat format, ReadOnlySpan<float> row, Span<byte> blocks, Span<float> scales)
    {
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
            Span<byte> block = blocks.Slice(b * format.BlockBytes(), format.BlockBytes());
            scales[b] = format == QuantFormat.Q8 ? QuantizeQ8Block(values, block) : QuantizeNf4Block(values, block);
        }
    }

    private static float QuantizeQ8Block(ReadOnlySpan<float> values, Span<byte> block)
    {
        float absMax = TensorPrimitives.MaxMagnitude(values);
        if (!float.IsFinite(absMax))
            throw new ArgumentException("weights must be finite to be quantized", nameof(values));
        absMax = MathF.Abs(absMax);
        if (absMax == 0f)
        {
            block.Clear();
            return 0f;
        }
        float scale = absMax / 127f;
        float inverse = 127f / absMax;
        for (int i = 0; i < values.Length; i++)
        {
            float q = MathF.Round(values[i] * inverse);
            block[i] = (byte)(sbyte)Math.Clamp(q, -127f, 127f);
        }
        return scale;
    }

    private static float QuantizeNf4Block(ReadOnlySpan<float> values, Span<byte> block)
    {
        float absMax = TensorPrimitives.MaxMagnitude(values);
        if (!float.IsFinite(absMax))
            throw new ArgumentException("weights must be finite to be quantized", nameof(values));
        absMax = MathF.Abs(absMax);
        float inverse = absMax == 0f ? 0f : 1f / absMax;
        float[] mid = s_nf4Midpoints;
        for (int j = 0; j < 32; j++)
        {
            int low = Nf4Code(values[j] * inverse, mid);
            int high = Nf4Code(values[j + 32] * inverse, mid);
            block[j] = (byte)(low | (high << 4));
        }
        return absMax;
    }

    private static int Nf4Code(float normalized, float[] mid)
    {
        int code = 0;
        // 15 comparisons, branch-free enough and exact: the code is the count of midpoints strictly below the value.
        for (int i = 0; i < mid.Length; i++)
            code += normalized > mid[i] ? 1 : 0;
        return code;
    }

    /// <summary>Dequantizes <paramref name="destination"/>.Length weights from a row's blocks and scales.</summary>
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
        Vector512<int> nibble = Vector512.Create(0xF);
        (Avx512F.PermuteVar16x32(table, lo & nibble) * s).Store(target);
        (Avx512F.PermuteVar16x32(table, hi & nibble) * s).Store(target + 16);
        (Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(lo, 4)) * s).Store(target + 32);
        (Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(hi, 4)) * s).Store(target + 48);
    }

    /// <summary>Quantizes a whole F32/BF16/F16 matrix into newly allocated pinned storage (rows in parallel).</summary>
    public static QuantizedMatrix Quantize(in WeightMatrix weight, QuantFormat format)
    {
        var result = QuantizedMatrix.Allocate(format, weight.Rows, weight.Cols);
        var source = weight;
        var options = new ParallelOptions { MaxDegreeOfParallelism = KernelThreading.MaxThreads };
        const int RowsPerItem = 64;
        int items = (weight.Rows + RowsPerItem - 1) / RowsPerItem;
        Parallel.For(0, items, options, () => new float[source.Cols], (item, _, row) =>
        {
            int end = Math.Min(source.Rows, (item + 1) * RowsPerItem);
            for (int n = item * RowsPerItem; n < end; n++)
            {
                ReadRow(source, n, row);
                QuantizeRow(format, row, result.RowBlocks(n), result.RowScales(n));
            }
            return row;
        }, static _ => { });
        return result;
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
                for (int i = 0; i < k; i++) target[i] = BitConverter.UInt32BitsToSingle((uint)bits[i] << 16);
                break;
            default:
                throw new ArgumentException($"weight dtype {weight.DType} cannot be quantized", nameof(weight));
        }
    }
}
