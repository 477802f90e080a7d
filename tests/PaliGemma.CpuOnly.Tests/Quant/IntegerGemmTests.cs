using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Quant;

public sealed record IntegerGemmCase(int Rows, int K, int N, bool Bias, float SoftCap, float Range, int Seed);

public static class IntegerGemmArbitraries
{
    // Odd K (tails inside a block), row counts around the 4- and 8-row micro-kernels, N around the 8/16/32-row groups
    // and the 64-row tiles, activations from tiny to large.
    public static Arbitrary<IntegerGemmCase> Cases() => Arb.From(
        from rows in Gen.Choose(1, 37)
        from k in Gen.Choose(1, 300)
        from n in Gen.Choose(1, 140)
        from bias in Gen.Elements(true, false)
        from cap in Gen.Elements(0f, 0f, 0f, 4f)
        from range in Gen.Elements(1e-3f, 1f, 30f)
        from seed in Gen.Choose(0, int.MaxValue)
        select new IntegerGemmCase(rows, k, n, bias, cap, range, seed));

    // Several K chunks (32 blocks each), several 64-row W tiles, rows past one or two 32-row micro-kernels.
    public static Arbitrary<IntegerGemmCase> TallCases() => Arb.From(
        from rows in Gen.Choose(17, 75)
        from k in Gen.Choose(1000, 2200)
        from n in Gen.Choose(60, 150)
        from bias in Gen.Elements(true, false)
        from cap in Gen.Elements(0f, 0f, 5f)
        from seed in Gen.Choose(0, int.MaxValue)
        select new IntegerGemmCase(rows, k, n, bias, cap, 2f, seed));
}

public static class TallIntegerGemmArbitraries
{
    public static Arbitrary<IntegerGemmCase> Cases() => IntegerGemmArbitraries.TallCases();
}

public sealed record ParallelIntegerGemmCase(int Rows, int K, int N, int Threads, int Seed);

public static class ParallelIntegerGemmArbitraries
{
    // Enough work to go parallel, several W row ranges per thread (claimed ahead while the last chunk runs), K from one
    // block to several chunks, and row counts whose last 32-row unit holds one group of real rows or two.
    public static Arbitrary<ParallelIntegerGemmCase> Cases() => Arb.From(
        from rows in Gen.Choose(17, 90)
        from k in Gen.Choose(20, 1400)
        from n in Gen.Choose(150, 700)
        from threads in Gen.Choose(2, 4)
        from seed in Gen.Choose(0, int.MaxValue)
        select new ParallelIntegerGemmCase(rows, k, n, threads, seed));
}

/// <summary>
/// The int8-activation GEMM against a scalar model of the same math (block codes and scales, exact integer block sums,
/// fp32 fused multiply-add in block order): bit-equal on every integer path this CPU has, and within the analytic
/// error of rounding the activations when compared with the fp64 product of the dequantized weights.
/// </summary>
public sealed unsafe class IntegerGemmTests
{
    internal static IEnumerable<IntegerGemm.Path> SupportedPaths() =>
        new[] { IntegerGemm.Path.Vnni256, IntegerGemm.Path.Vector512, IntegerGemm.Path.Vector256, IntegerGemm.Path.Vector128 }.Where(IntegerGemm.IsSupported);

    internal static float[] RandomFloats(Random random, int count, float range)
    {
        var values = new float[count];
        for (int i = 0; i < count; i++) values[i] = (float)((random.NextDouble() * 2 - 1) * range);
        return values;
    }

    private static QuantizedMatrix QuantizeF32(float[] weights, int n, int k)
    {
        fixed (float* p = weights)
            return Quantizer.Quantize(new WeightMatrix(p, DType.F32, n, k), QuantFormat.Q8);
    }

    /// <summary>The documented activation quantization, one block of 32 at a time (the last one zero-padded).</summary>
    internal static (int[] Codes, float[] Scales) QuantizeActivations(float[] x, int rows, int k, int limit)
    {
        int blocks = (k + 31) / 32;
        var codes = new int[rows * blocks * 32];
        var scales = new float[rows * blocks];
        for (int m = 0; m < rows; m++)
        {
            for (int b = 0; b < blocks; b++)
            {
                float absMax = 0f;
                bool finite = true;
                for (int i = b * 32; i < Math.Min(k, b * 32 + 32); i++)
                {
                    finite &= float.IsFinite(x[m * k + i]);
                    absMax = Math.Max(absMax, Math.Abs(x[m * k + i]));
                }
                if (!finite) { scales[m * blocks + b] = float.NaN; continue; }
                if (absMax < IntegerGemm.MinAbsMax) continue;
                float inverse = limit / absMax;
                for (int i = b * 32; i < Math.Min(k, b * 32 + 32); i++)
                    codes[(m * blocks + b) * 32 + i - b * 32] = Math.Clamp((int)MathF.Round(x[m * k + i] * inverse), -limit, limit);
                scales[m * blocks + b] = absMax / limit;
            }
        }
        return (codes, scales);
    }

    private static float[] ScalarReference(IntegerGemm.Path path, float[] x, int rows, int k, QuantizedMatrix w, float[] bias, float softCap)
    {
        int n = w.Rows, blocks = w.BlocksPerRow;
        var (codes, scales) = QuantizeActivations(x, rows, k, IntegerGemm.ActivationLimit(path));
        var y = new float[rows * n];
        for (int r = 0; r < n; r++)
        {
            ReadOnlySpan<byte> wCodes = w.RowBlocks(r);
            var wScales = new float[blocks];
            w.ReadScales(r, wScales);
            for (int m = 0; m < rows; m++)
            {
                float sum = 0f;
                for (int b = 0; b < blocks; b++)
                {
                    int dot = 0;
                    for (int i = 0; i < 32; i++) dot += codes[(m * blocks + b) * 32 + i] * (sbyte)wCodes[b * 32 + i];
                    sum = MathF.FusedMultiplyAdd(dot, wScales[b] * scales[m * blocks + b], sum);
                }
                if (bias.Length > 0) sum += bias[r];
                y[m * n + r] = softCap > 0f ? softCap * MathF.Tanh(sum / softCap) : sum;
            }
        }
        return y;
    }

    internal static float[] Run(IntegerGemm.Path path, float[] x, int rows, QuantizedMatrix w, float[] bias, float softCap)
    {
        // One spare row of y must stay untouched.
        var y = new float[(rows + 1) * w.Rows];
        Array.Fill(y, 12345f);
        QuantMatMul.MultiplyPrefill(x, rows, w, bias, y, softCap, path);
        for (int i = rows * w.Rows; i < y.Length; i++) Assert.Equal(12345f, y[i]);
        return y.AsSpan(0, rows * w.Rows).ToArray();
    }

    [Property(Arbitrary = [typeof(IntegerGemmArbitraries)], MaxTest = 120)]
    public void Every_integer_path_equals_the_scalar_model_of_the_same_math(IntegerGemmCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, c.Range);
        if (x.Length > 40) x[37] = 0f;
        var w = QuantizeF32(RandomFloats(random, c.N * c.K, 1f), c.N, c.K);
        float[] bias = c.Bias ? RandomFloats(random, c.N, 2f) : [];
        foreach (var path in SupportedPaths())
        {
            float[] expected = ScalarReference(path, x, c.Rows, c.K, w, bias, c.SoftCap);
            float[] actual = Run(path, x, c.Rows, w, bias, c.SoftCap);
            for (int i = 0; i < expected.Length; i++)
            {
                // Integer sums and the fp32 accumulation order are the model's: bit-equal, except the soft-cap's vector tanh.
                if (c.SoftCap == 0f)
                    Assert.True(expected[i] == actual[i], $"{path}: y[{i / c.N}, {i % c.N}] = {actual[i]}, model {expected[i]}");
                else
                    Assert.True(Math.Abs(expected[i] - actual[i]) <= 2e-6f * c.SoftCap, $"{path}: y[{i / c.N}, {i % c.N}] = {actual[i]}, model {expected[i]}");
            }
        }
    }

    [Property(Arbitrary = [typeof(TallIntegerGemmArbitraries)], MaxTest = 8)]
    public void Tall_shapes_with_several_chunks_and_tiles_equal_the_scalar_model(IntegerGemmCase c) =>
        Every_integer_path_equals_the_scalar_model_of_the_same_math(c);

    /// <summary>
    /// The int32 bound: one block sums 32 products of |x code| ≤ 32767 (int16 paths; 127 for VNNI) and |W code| ≤ 128
    /// (a q8 file may hold -128 even though the quantizer writes ±127), so |dot| ≤ 32 · 32767 · 128 = 134,213,632
    /// &lt; 2^31 - 1, and every vpmaddwd pair sum ≤ 2 · 32767 · 128 fits too (only -32768 · -32768 pairs could
    /// overflow it, and x codes stop at ±32767). Each block's sum is converted to fp32 before the next block starts, so
    /// no int32 holds more than one block. Here every code sits at its extreme with one sign per row, over 20 blocks:
    /// an int32 kept across 16 or more of them would wrap, and the result must be the exact product.
    /// </summary>
    [Fact]
    public void Extreme_codes_do_not_overflow_the_int32_block_sums()
    {
        int rows = 40, k = 640, n = 70;
        var w = QuantizedMatrix.Allocate(QuantFormat.Q8, n, k, DType.F32);
        var codeOfRow = new int[n];
        for (int r = 0; r < n; r++)
        {
            codeOfRow[r] = (r % 3) switch { 0 => -128, 1 => 127, _ => -127 };
            w.RowBlocks(r).Fill((byte)(sbyte)codeOfRow[r]);
            Span<byte> scaleBytes = w.RowScaleBytes(r);
            for (int b = 0; b < w.BlocksPerRow; b++) BitConverter.TryWriteBytes(scaleBytes[(b * 4)..], 1f);
        }
        // Each x row is +1 or -1 throughout: all codes ±L with scale 1/L.
        var x = new float[rows * k];
        for (int m = 0; m < rows; m++) Array.Fill(x, m % 2 == 0 ? 1f : -1f, m * k, k);
        foreach (var path in SupportedPaths())
        {
            float[] y = Run(path, x, rows, w, [], 0f);
            for (int m = 0; m < rows; m++)
                for (int r = 0; r < n; r++)
                {
                    double exact = (m % 2 == 0 ? 1.0 : -1.0) * k * codeOfRow[r];
                    Assert.True(Math.Abs(y[m * n + r] - exact) <= 1e-5 * Math.Abs(exact), $"{path}: y[{m}, {r}] = {y[m * n + r]}, exact {exact}");
                }
            Assert.Equal(ScalarReference(path, x, rows, k, w, [], 0f), y);
        }
    }

    [Property(Arbitrary = [typeof(IntegerGemmArbitraries)], MaxTest = 60)]
    public void Error_against_the_float_product_stays_within_half_an_activation_step(IntegerGemmCase c)
    {
        foreach (var path in SupportedPaths())
            CheckErrorBound(c, path);
    }

    private static void CheckErrorBound(IntegerGemmCase c, IntegerGemm.Path path)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, c.Range);
        var w = QuantizeF32(RandomFloats(random, c.N * c.K, 1f), c.N, c.K);
        float[] actual = Run(path, x, c.Rows, w, [], 0f);
        int limit = IntegerGemm.ActivationLimit(path);
        var row = new float[c.K];
        for (int r = 0; r < c.N; r++)
        {
            w.DequantizeRow(r, row);
            for (int m = 0; m < c.Rows; m++)
            {
                double sum = 0, magnitude = 0, bound = 0;
                for (int b = 0; b * 32 < c.K; b++)
                {
                    double absMax = 0, weights = 0;
                    for (int i = b * 32; i < Math.Min(c.K, b * 32 + 32); i++)
                    {
                        absMax = Math.Max(absMax, Math.Abs(x[m * c.K + i]));
                        weights += Math.Abs(row[i]);
                        sum += (double)x[m * c.K + i] * row[i];
                        magnitude += Math.Abs((double)x[m * c.K + i] * row[i]);
                    }
                    // Each activation moves by at most half its block's step absmax / L.
                    bound += absMax / limit / 2 * weights;
                }
                double tolerance = bound * (1 + 1e-4) + 1e-5 * magnitude + 1e-30;
                Assert.True(Math.Abs(actual[m * c.N + r] - sum) <= tolerance, $"{path}: y[{m}, {r}] = {actual[m * c.N + r]}, float product {sum}, bound {tolerance}");
            }
        }
    }

    // Large enough for parallel tiles, row slices, several K chunks and partial groups; q8 and nf4 (fp16 absmax) weights,
    // each against its own scalar model.
    [Theory]
    [InlineData(QuantFormat.Q8, 70, 1100, 530)]
    [InlineData(QuantFormat.Q8, 9, 2100, 300)]
    [InlineData(QuantFormat.Q8, 300, 130, 70)]
    [InlineData(QuantFormat.Q8, 5, 33, 1)]
    [InlineData(QuantFormat.Nf4, 70, 1100, 530)]
    [InlineData(QuantFormat.Nf4, 9, 2100, 300)]
    [InlineData(QuantFormat.Nf4, 300, 130, 70)]
    [InlineData(QuantFormat.Nf4, 5, 33, 1)]
    public void Parallel_shapes_equal_the_scalar_model(QuantFormat format, int rows, int k, int n)
    {
        var random = new Random(rows * 31 + k);
        float[] x = RandomFloats(random, rows * k, 3f);
        float[] weights = RandomFloats(random, n * k, 1f);
        var w = format == QuantFormat.Q8 ? QuantizeF32(weights, n, k) : IntegerGemmNf4Tests.QuantizeNf4(weights, n, k, DType.F16);
        float[] bias = RandomFloats(random, n, 1f);
        int saved = KernelThreading.MaxThreads;
        try
        {
            KernelThreading.MaxThreads = 3;
            foreach (var path in SupportedPaths())
            {
                float[] expected = format == QuantFormat.Q8
                    ? ScalarReference(path, x, rows, k, w, bias, 0f)
                    : IntegerGemmNf4Tests.ScalarReference(path, x, rows, k, w, bias, 0f);
                Assert.Equal(expected, Run(path, x, rows, w, bias, 0f));
            }
        }
        finally
        {
            KernelThreading.MaxThreads = saved;
        }
    }

    [Property(Arbitrary = [typeof(ParallelIntegerGemmArbitraries)], MaxTest = 10)]
    public void Parallel_work_items_claimed_ahead_equal_the_scalar_model(ParallelIntegerGemmCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, 3f);
        var w = QuantizeF32(RandomFloats(random, c.N * c.K, 1f), c.N, c.K);
        float[] bias = RandomFloats(random, c.N, 1f);
        int saved = KernelThreading.MaxThreads;
        try
        {
            KernelThreading.MaxThreads = c.Threads;
            foreach (var path in SupportedPaths())
                Assert.Equal(ScalarReference(path, x, c.Rows, c.K, w, bias, 0f), Run(path, x, c.Rows, w, bias, 0f));
        }
        finally
        {
            KernelThreading.MaxThreads = saved;
        }
    }

    [Fact]
    public void Non_finite_activations_give_nan_rows_and_leave_the_others_alone()
    {
        int rows = 9, k = 70, n = 20;
        var random = new Random(5);
        float[] x = RandomFloats(random, rows * k, 1f);
        x[2 * k + 40] = float.NaN;
        x[6 * k + 3] = float.PositiveInfinity;
        var w = QuantizeF32(RandomFloats(random, n * k, 1f), n, k);
        foreach (var path in SupportedPaths())
        {
            float[] expected = ScalarReference(path, x, rows, k, w, [], 0f);
            float[] y = Run(path, x, rows, w, [], 0f);
            for (int m = 0; m < rows; m++)
                for (int r = 0; r < n; r++)
                {
                    if (m is 2 or 6) Assert.True(float.IsNaN(y[m * n + r]), $"{path}: y[{m}, {r}] = {y[m * n + r]}");
                    else Assert.Equal(expected[m * n + r], y[m * n + r]);
                }
        }
    }

    [Fact]
    public void Prefill_kernel_setting_picks_the_kernel()
    {
        var w = QuantizeF32(RandomFloats(new Random(1), 8 * 40, 1f), 8, 40);
        var saved = QuantMatMul.PrefillKernel;
        try
        {
            QuantMatMul.PrefillKernel = QuantPrefillKernel.Auto;
            Assert.Equal(IntegerGemm.BestInt16, QuantMatMul.PrefillPath(QuantMatMul.IntegerMinRows, w));
            Assert.Equal(IntegerGemm.Path.None, QuantMatMul.PrefillPath(QuantMatMul.IntegerMinRows - 1, w));
            QuantMatMul.PrefillKernel = QuantPrefillKernel.DequantizedPanels;
            Assert.Equal(IntegerGemm.Path.None, QuantMatMul.PrefillPath(64, w));
            QuantMatMul.PrefillKernel = QuantPrefillKernel.Int16Activations;
            Assert.Equal(IntegerGemm.BestInt16, QuantMatMul.PrefillPath(64, w));
            Assert.Equal(IntegerGemm.BestInt16, QuantMatMul.PrefillPath(QuantMatMul.GemvMaxRows + 1, w));
            QuantMatMul.PrefillKernel = QuantPrefillKernel.Int8Activations;
            Assert.Equal(IntegerGemm.BestInt8 != IntegerGemm.Path.None ? IntegerGemm.BestInt8 : IntegerGemm.BestInt16, QuantMatMul.PrefillPath(64, w));
            Assert.Equal(IntegerGemm.Path.None, QuantMatMul.PrefillPath(QuantMatMul.GemvMaxRows, w));
            // nf4 weights follow the same rules.
            fixed (float* zeros = new float[8 * 64])
            {
                var nf4 = Quantizer.Quantize(new WeightMatrix(zeros, DType.F32, 8, 64), QuantFormat.Nf4);
                Assert.Equal(IntegerGemm.BestInt8 != IntegerGemm.Path.None ? IntegerGemm.BestInt8 : IntegerGemm.BestInt16, QuantMatMul.PrefillPath(64, nf4));
                Assert.Equal(IntegerGemm.Path.None, QuantMatMul.PrefillPath(QuantMatMul.GemvMaxRows, nf4));
                QuantMatMul.PrefillKernel = QuantPrefillKernel.Auto;
                Assert.Equal(IntegerGemm.BestInt16, QuantMatMul.PrefillPath(QuantMatMul.IntegerMinRows, nf4));
                Assert.Equal(IntegerGemm.Path.None, QuantMatMul.PrefillPath(QuantMatMul.IntegerMinRows - 1, nf4));
                QuantMatMul.PrefillKernel = QuantPrefillKernel.DequantizedPanels;
                Assert.Equal(IntegerGemm.Path.None, QuantMatMul.PrefillPath(64, nf4));
            }
        }
        finally
        {
            QuantMatMul.PrefillKernel = saved;
        }
    }
}
