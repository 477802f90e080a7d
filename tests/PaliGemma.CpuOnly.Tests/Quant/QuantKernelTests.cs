using System.Runtime.Intrinsics.X86;
using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Quant;

public sealed record QuantRowCase(QuantFormat Format, int K, float Range, int Seed, DType ScaleType);
public sealed record QuantMatMulCase(QuantFormat Format, int Rows, int K, int N, bool Bias, float SoftCap, int Seed, DType ScaleType = DType.F16);

public static class QuantArbitraries
{
    public static Arbitrary<QuantRowCase> Rows() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from k in Gen.Choose(1, 300)
        from range in Gen.Elements(1e-3f, 1f, 40f)
        from seed in Gen.Choose(0, int.MaxValue)
        from scales in Gen.Elements(DType.F16, DType.F32)
        select new QuantRowCase(format, k, range, seed, scales));

    // Odd K (tails inside a block), row counts on both sides of the GEMV / panel switch, odd N.
    public static Arbitrary<QuantMatMulCase> MatMuls() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from rows in Gen.Choose(1, 11)
        from k in Gen.Choose(1, 200)
        from n in Gen.Choose(1, 40)
        from bias in Gen.Elements(true, false)
        from cap in Gen.Elements(0f, 0f, 5f)
        from seed in Gen.Choose(0, int.MaxValue)
        from scales in Gen.Elements(DType.F16, DType.F32)
        select new QuantMatMulCase(format, rows, k, n, bias, cap, seed, scales));

    // The quantized row source in the packed GEMM: K across its 256-element blocks with a partial quant block at the end.
    public static Arbitrary<PackedQuantCase> Packed() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from rows in Gen.Choose(1, 70)
        from k in Gen.OneOf(Gen.Choose(1, 70), Gen.Choose(200, 700))
        from n in Gen.Choose(1, 40)
        from bias in Gen.Elements(true, false)
        from cap in Gen.Elements(0f, 0f, 5f)
        from width in Kernels.KernelTestSupport.Widths
        from seed in Gen.Choose(0, int.MaxValue)
        from scales in Gen.Elements(DType.F16, DType.F32)
        select new PackedQuantCase(new QuantMatMulCase(format, rows, k, n, bias, cap, seed, scales), width));
}

public sealed record PackedQuantCase(QuantMatMulCase Case, Kernels.Width Width);

public sealed unsafe class QuantKernelTests
{
    internal static float[] RandomFloats(Random random, int count, float range)
    {
        var values = new float[count];
        for (int i = 0; i < count; i++) values[i] = (float)((random.NextDouble() * 2 - 1) * range);
        return values;
    }

    internal static QuantizedMatrix QuantizeF32(float[] weights, int n, int k, QuantFormat format, DType scaleType)
    {
        fixed (float* p = weights)
        {
            // A short tail block of tiny weights can refuse fp16 (see QuantizeRow below); fp32 then.
            var q = Quantizer.TryQuantize(new WeightMatrix(p, DType.F32, n, k), format, scaleType)
                ?? Quantizer.TryQuantize(new WeightMatrix(p, DType.F32, n, k), format, DType.F32)!;
            return q;
        }
    }

    /// <summary>
    /// Quantizes a row with <paramref name="c"/>'s scale type. fp16 may refuse a row (a block's scale below
    /// <see cref="Quantizer.MinHalfScale"/>: q8 blocks of weights under ~4e-3): then the refusal is checked and the row
    /// quantized with fp32 scales.
    /// </summary>
    private static void QuantizeRow(QuantRowCase c, float[] row, byte[] codes, float[] scales)
    {
        if (Quantizer.TryQuantizeRow(c.Format, row, codes, scales, c.ScaleType))
        {
            foreach (float scale in scales) Assert.Equal(scale, Quantizer.RoundScale(scale, c.ScaleType));
            return;
        }
        Assert.Equal(DType.F16, c.ScaleType);
        int size = c.Format.BlockSize();
        bool outside = false;
        for (int start = 0; start < c.K; start += size)
        {
            float absMax = 0f;
            for (int i = start; i < Math.Min(c.K, start + size); i++) absMax = Math.Max(absMax, Math.Abs(row[i]));
            float scale = c.Format == QuantFormat.Q8 ? absMax / 127f : absMax;
            outside |= scale != 0f && (scale < Quantizer.MinHalfScale * 1.001f || scale > Quantizer.MaxHalfScale * 0.999f);
        }
        Assert.True(outside, "fp16 refused a row whose block scales all fit it");
        Assert.True(Quantizer.TryQuantizeRow(c.Format, row, codes, scales, DType.F32));
    }

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 200)]
    public void Dequantized_weights_are_within_half_a_step_of_the_originals(QuantRowCase c)
    {
        var random = new Random(c.Seed);
        float[] row = RandomFloats(random, c.K, c.Range);
        // Exact zeros and a lone outlier exercise the code 0 and the absmax rounding.
        if (c.K > 3) { row[1] = 0f; row[c.K / 2] *= 3f; }
        int blocks = c.Format.BlocksPerRow(c.K);
        var codes = new byte[blocks * 32];
        var scales = new float[blocks];
        QuantizeRow(c, row, codes, scales);
        var restored = new float[c.K];
        Quantizer.DequantizeRow(c.Format, codes, scales, restored);

        ReadOnlySpan<float> table = Quantizer.Nf4Codes;
        int size = c.Format.BlockSize();
        for (int i = 0; i < c.K; i++)
        {
            int b = i / size;
            float absMax = 0f;
            for (int j = b * size; j < Math.Min(c.K, (b + 1) * size); j++) absMax = Math.Max(absMax, Math.Abs(row[j]));
            // The stored scale is one of the search's candidates around the block's natural one (q8: never below it), rounded
            // to the scale type (relative error at most 2^-10).
            float natural = c.Format == QuantFormat.Q8 ? absMax / 127f : absMax;
            float lowest = c.Format == QuantFormat.Q8 ? 1f : 0.8f, highest = c.Format == QuantFormat.Q8 ? 1.075f : 1.1f;
            Assert.True(scales[b] >= natural * lowest * (1 - 1f / 1024f) && scales[b] <= natural * highest * (1 + 1f / 1024f),
                $"block {b}: scale {scales[b]}, absmax {absMax}");
            float error = Math.Abs(row[i] - restored[i]);
            if (c.Format == QuantFormat.Q8)
            {
                // Step = the stored scale; rounding to nearest leaves at most half of it (plus fp32 rounding of the product).
                float step = scales[b];
                Assert.True(error <= step * 0.5f * (1 + 1e-5f) + absMax * 1e-6f, $"q8 element {i}: {row[i]} -> {restored[i]}, step {step}");
            }
            else
            {
                // The code chosen is the nearest one: the error is at most half the gap between the code values around
                // it (beyond ±1, when the scale was rounded below absmax, the distance to ±1).
                float scale = scales[b];
                float normalized = scale == 0f ? 0f : row[i] / scale;
                int upper = 1;
                while (upper < 15 && table[upper] < normalized) upper++;
                float halfGap = (table[upper] - table[upper - 1]) * 0.5f * scale;
                float beyond = Math.Max(0f, Math.Abs(normalized) - 1f) * scale;
                Assert.True(error <= Math.Max(halfGap, beyond) * (1 + 1e-5f) + absMax * 1e-6f, $"nf4 element {i}: {row[i]} -> {restored[i]}, half gap {halfGap}");
            }
        }
        // Padding past K dequantizes to exactly 0 (the kernels read whole blocks).
        var padded = new float[blocks * size];
        Quantizer.DequantizeRow(c.Format, codes, scales, padded);
        for (int i = c.K; i < padded.Length; i++) Assert.Equal(0f, padded[i]);
    }

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 100)]
    public void Dequantize_matches_the_documented_block_layout(QuantRowCase c)
    {
        var random = new Random(c.Seed);
        float[] row = RandomFloats(random, c.K, c.Range);
        int blocks = c.Format.BlocksPerRow(c.K);
        var codes = new byte[blocks * 32];
        var scales = new float[blocks];
        QuantizeRow(c, row, codes, scales);
        var restored = new float[c.K];
        Quantizer.DequantizeRow(c.Format, codes, scales, restored);
        for (int i = 0; i < c.K; i++)
        {
            float expected;
            if (c.Format == QuantFormat.Q8)
                expected = (sbyte)codes[i / 32 * 32 + i % 32] * scales[i / 32];
            else
            {
                int b = i / 64, e = i % 64;
                byte packed = codes[b * 32 + e % 32];
                expected = Quantizer.Nf4Codes[e < 32 ? packed & 0xF : packed >> 4] * scales[b];
            }
            Assert.Equal(expected, restored[i]);
        }
    }

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 150)]
    public void Fused_multiply_matches_dequantize_then_reference(QuantMatMulCase c) => Check(c, path: null);

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 60)]
    public void Portable_gemv_matches_dequantize_then_reference(QuantMatMulCase c) => Check(c, QuantMatMul.GemvPath.Scalar);

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 80)]
    public void Avx2_gemv_matches_dequantize_then_reference(QuantMatMulCase c)
    {
        if (Avx2.IsSupported && Fma.IsSupported) Check(c, QuantMatMul.GemvPath.Vector256);
    }

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 80)]
    public void Avx512_gemv_matches_dequantize_then_reference(QuantMatMulCase c)
    {
        if (Avx512F.IsSupported && Avx512BW.IsSupported) Check(c, QuantMatMul.GemvPath.Vector512);
    }

    // One token over several work items whose row counts are not multiples of 4 or 16: the four lanes of each item, the
    // rows left past them (a short last step), and a last short item.
    [Property(MaxTest = 40)]
    public void Avx512_one_token_gemv_covers_uneven_items(bool nf4, bool fp32Scales, bool bias, byte kSeed, ushort nSeed, int seed)
    {
        if (!Avx512F.IsSupported || !Avx512BW.IsSupported)
            return;
        int k = 1 + kSeed % 200, n = 65 + nSeed % 700;
        var c = new QuantMatMulCase(nf4 ? QuantFormat.Nf4 : QuantFormat.Q8, 1, k, n, bias, SoftCap: 0f, seed, fp32Scales ? DType.F32 : DType.F16);
        Assert.True(n > QuantMatMul.OneTokenRowsPerItem(n, k) || KernelThreading.MaxThreads == 1); // several items
        Check(c, QuantMatMul.GemvPath.Vector512);
    }

    // Large enough for the parallel GEMV, several panels and the MatMul K blocks.
    [Theory]
    [InlineData(QuantFormat.Q8, 1, 2100, 300)]
    [InlineData(QuantFormat.Nf4, 3, 2100, 300)]
    [InlineData(QuantFormat.Q8, 70, 1100, 530)]
    [InlineData(QuantFormat.Nf4, 9, 4500, 140)]
    [InlineData(QuantFormat.Nf4, 1, 4500, 140)] // one token: the int16 kernels, an odd last block, lanes and prefetch
    [InlineData(QuantFormat.Q8, 1, 4128, 203)]  // one token: an odd block count, rows left over after the lanes
    public void Fused_multiply_matches_reference_on_parallel_shapes(QuantFormat format, int rows, int k, int n) =>
        Check(new QuantMatMulCase(format, rows, k, n, Bias: true, SoftCap: 0f, Seed: rows * 7 + k), path: null);

    [Fact]
    public void Fp16_scales_widen_exactly_for_every_bit_pattern()
    {
        var bits = new ushort[65536 + 5];
        for (int i = 0; i < bits.Length; i++) bits[i] = (ushort)i;
        var widened = new float[bits.Length];
        fixed (ushort* source = bits)
        fixed (float* destination = widened)
            QuantMatMul.WidenHalves(source, destination, bits.Length); // 5 past a multiple of 16: the scalar tail too
        for (int i = 0; i < bits.Length; i++)
        {
            float expected = (float)BitConverter.UInt16BitsToHalf(bits[i]);
            if (float.IsNaN(expected))
                Assert.True(float.IsNaN(widened[i]), $"0x{bits[i]:X4}: {widened[i]}");
            else
                Assert.True(BitConverter.SingleToUInt32Bits(expected) == BitConverter.SingleToUInt32Bits(widened[i]), $"0x{bits[i]:X4}: {widened[i]}, expected {expected}");
        }
    }

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 60)]
    public void Dequantized_panels_match_dequantize_then_reference(QuantMatMulCase c) =>
        Check(c with { Rows = c.Rows + QuantMatMul.GemvMaxRows }, path: null, panels: true);

    [Property(Arbitrary = [typeof(QuantArbitraries)], MaxTest = 80)]
    public void Quantized_rows_in_the_packed_gemm_match_dequantize_then_reference(PackedQuantCase c) =>
        Check(c.Case, path: null, packedWidth: c.Width);

    private static void Check(QuantMatMulCase c, QuantMatMul.GemvPath? path, bool panels = false, Kernels.Width? packedWidth = null)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, 2f);
        float[] weights = RandomFloats(random, c.N * c.K, 1f);
        float[] bias = c.Bias ? RandomFloats(random, c.N, 3f) : [];
        var q = QuantizeF32(weights, c.N, c.K, c.Format, c.ScaleType);
        var y = new float[(c.Rows + 1) * c.N];
        Array.Fill(y, 12345f);
        if (packedWidth is { } width)
            PackedGemm.Multiply(x, c.Rows, new QuantizedRows(q), c.N, c.K, bias, y, c.SoftCap, Kernels.KernelTestSupport.ToSimd(width));
        else if (panels)
            QuantMatMul.MultiplyPrefill(x, c.Rows, q, bias, y, c.SoftCap, IntegerGemm.Path.None);
        else if (path is { } p)
            QuantMatMul.Multiply(x, c.Rows, q, bias, y, c.SoftCap, p);
        else
            QuantMatMul.Multiply(x, c.Rows, q, bias, y, c.SoftCap);

        // q8 prefill on integer activations (IntegerGemmTests checks it exactly): here, within half an activation step per element.
        var integerPath = panels || packedWidth != null ? IntegerGemm.Path.None : QuantMatMul.PrefillPath(c.Rows, q);
        bool integer = integerPath != IntegerGemm.Path.None;
        double stepFraction = integer ? 0.5 / IntegerGemm.ActivationLimit(integerPath) : 0;
        // One token on AVX-512: x coded to int16 per W block (OneTokenGemvTests checks it exactly), nf4 weights through
        // the int16 table; here within half a code step of each (x's per element, the table's per weight).
        bool oneToken = !panels && packedWidth == null && QuantMatMul.UsesInt16Activations(c.Rows, path ?? QuantMatMul.BestGemvPath);
        int oneTokenBlock = c.Format.BlockSize();
        double oneTokenStep = c.Format == QuantFormat.Q8 ? 0.5 / QuantMatMul.Q8ActivationLimit : 0.5 / QuantMatMul.Nf4ActivationLimit;
        double tableStep = c.Format == QuantFormat.Nf4 ? 0.5 / QuantMatMul.Nf4TableLimit : 0;
        var row = new float[c.K];
        var weightScales = new float[q.BlocksPerRow];
        for (int n = 0; n < c.N; n++)
        {
            q.DequantizeRow(n, row);
            q.ReadScales(n, weightScales);
            for (int m = 0; m < c.Rows; m++)
            {
                double sum = c.Bias ? bias[n] : 0, magnitude = Math.Abs(sum), activationError = 0;
                for (int i = 0; i < c.K; i++)
                {
                    sum += (double)x[m * c.K + i] * row[i];
                    magnitude += Math.Abs((double)x[m * c.K + i] * row[i]);
                }
                for (int b = 0; integer && b * 32 < c.K; b++)
                {
                    double absMax = 0, weightSum = 0;
                    for (int i = b * 32; i < Math.Min(c.K, b * 32 + 32); i++)
                    {
                        absMax = Math.Max(absMax, Math.Abs(x[m * c.K + i]));
                        weightSum += Math.Abs(row[i]);
                    }
                    activationError += absMax * stepFraction * weightSum;
                }
                for (int b = 0; oneToken && b * oneTokenBlock < c.K; b++)
                {
                    double absMax = 0, weightSum = 0, xSum = 0;
                    for (int i = b * oneTokenBlock; i < Math.Min(c.K, (b + 1) * oneTokenBlock); i++)
                    {
                        absMax = Math.Max(absMax, Math.Abs(x[m * c.K + i]));
                        weightSum += Math.Abs(row[i]);
                        xSum += Math.Abs(x[m * c.K + i]);
                    }
                    activationError += absMax * oneTokenStep * weightSum + xSum * Math.Abs(weightScales[b]) * tableStep;
                }
                double expected = c.SoftCap > 0 ? c.SoftCap * Math.Tanh(sum / c.SoftCap) : sum;
                double tolerance = 1e-5 * magnitude + 1e-6 + activationError * (1 + 1e-4);
                Assert.True(Math.Abs(y[m * c.N + n] - expected) <= tolerance, $"y[{m}, {n}] = {y[m * c.N + n]}, expected {expected} (tolerance {tolerance})");
            }
        }
        for (int i = c.Rows * c.N; i < y.Length; i++) Assert.Equal(12345f, y[i]);
    }

}
