using System.Runtime.Intrinsics.X86;
using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Quant;

public sealed record QuantRowCase(QuantFormat Format, int K, float Range, int Seed);
public sealed record QuantMatMulCase(QuantFormat Format, int Rows, int K, int N, bool Bias, float SoftCap, int Seed);

public static class QuantArbitraries
{
    public static Arbitrary<QuantRowCase> Rows() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from k in Gen.Choose(1, 300)
        from range in Gen.Elements(1e-3f, 1f, 40f)
        from seed in Gen.Choose(0, int.MaxValue)
        select new QuantRowCase(format, k, range, seed));

    // Odd K (tails inside a block), row counts on both sides of the GEMV / panel switch, odd N.
    public static Arbitrary<QuantMatMulCase> MatMuls() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from rows in Gen.Choose(1, 11)
        from k in Gen.Choose(1, 200)
        from n in Gen.Choose(1, 40)
        from bias in Gen.Elements(true, false)
        from cap in Gen.Elements(0f, 0f, 5f)
        from seed in Gen.Choose(0, int.MaxValue)
        select new QuantMatMulCase(format, rows, k, n, bias, cap, seed));

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
        select new PackedQuantCase(new QuantMatMulCase(format, rows, k, n, bias, cap, seed), width));
}

public sealed record PackedQuantCase(QuantMatMulCase Case, Kernels.Width Width);

public sealed unsafe class QuantKernelTests
{
    private static float[] RandomFloats(Random random, int count, float range)
    {
        var values = new float[count];
        for (int i = 0; i < count; i++) values[i] = (float)((random.NextDouble() * 2 - 1) * range);
        return values;
    }

    private static QuantizedMatrix QuantizeF32(float[] weights, int n, int k, QuantFormat format)
    {
        fixed (float* p = weights)
            return Quantizer.Quantize(new WeightMatrix(p, DType.F32, n, k), format);
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
        Quantizer.QuantizeRow(c.Format, row, codes, scales);
        var restored = new float[c.K];
        Quantizer.DequantizeRow(c.Format, codes, scales, restored);

        ReadOnlySpan<float> table = Quantizer.Nf4Codes;
        int size = c.Format.BlockSize();
        for (int i = 0; i < c.K; i++)
        {
            int b = i / size;
            float absMax = 0f;
            for (int j = b * size; j < Math.Min(c.K, (b + 1) * size); j++) absMax = Math.Max(absMax, Math.Abs(row[j]));
            float error = Math.Abs(row[i] - restored[i]);
            if (c.Format == QuantFormat.Q8)
            {
                // Step = absmax / 127; rounding to nearest leaves at most half of it (plus fp32 rounding of the product).
                float step = absMax / 127f;
                Assert.True(error <= step * 0.5f * (1 + 1e-5f) + absMax * 1e-6f, $"q8 element {i}: {row[i]} -> {restored[i]}, step {step}");
            }
            else
            {
                // The code chosen is the nearest one: the error is at most half the gap between the code values around it.
                float normalized = absMax == 0f ? 0f : row[i] / absMax;
                int upper = 1;
                while (upper < 15 && table[upper] < normalized) upper++;
                float halfGap = (table[upper] - table[upper - 1]) * 0.5f * absMax;
                Assert.True(error <= halfGap * (1 + 1e-5f) + absMax * 1e-6f, $"nf4 element {i}: {row[i]} -> {restored[i]}, half gap {halfGap}");
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
        Quantizer.QuantizeRow(c.Format, row, codes, scales);
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

    // Large enough for the parallel GEMV, several panels and the MatMul K blocks.
    [Theory]
    [InlineData(QuantFormat.Q8, 1, 2100, 300)]
    [InlineData(QuantFormat.Nf4, 3, 2100, 300)]
    [InlineData(QuantFormat.Q8, 70, 1100, 530)]
    [InlineData(QuantFormat.Nf4, 9, 4500, 140)]
    public void Fused_multiply_matches_reference_on_parallel_shapes(QuantFormat format, int rows, int k, int n) =>
        Check(new QuantMatMulCase(format, rows, k, n, Bias: true, SoftCap: 0f, Seed: rows * 7 + k), path: null);

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
        var q = QuantizeF32(weights, c.N, c.K, c.Format);
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
        var row = new float[c.K];
        for (int n = 0; n < c.N; n++)
        {
            q.DequantizeRow(n, row);
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
                double expected = c.SoftCap > 0 ? c.SoftCap * Math.Tanh(sum / c.SoftCap) : sum;
                double tolerance = 1e-5 * magnitude + 1e-6 + activationError * (1 + 1e-4);
                Assert.True(Math.Abs(y[m * c.N + n] - expected) <= tolerance, $"y[{m}, {n}] = {y[m * c.N + n]}, expected {expected} (tolerance {tolerance})");
            }
        }
        for (int i = c.Rows * c.N; i < y.Length; i++) Assert.Equal(12345f, y[i]);
    }

}
