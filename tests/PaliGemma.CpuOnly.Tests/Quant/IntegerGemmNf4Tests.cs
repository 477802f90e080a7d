using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Quant.IntegerGemmTests;

namespace PaliGemma.CpuOnly.Tests.Quant;

/// <summary>
/// nf4 weights on the integer-activation GEMM: each block of 64 is two blocks of 32 whose codes are the integers
/// round(NF4[code] · level) and whose scale is absmax · (1 / level). Against a scalar model of that math (bit-equal on every
/// path this CPU has, fp16 and fp32 scales, K with tails inside either half of a block), and against the fp64 product
/// of the dequantized weights within the analytic bound of the activation and table rounding.
/// </summary>
public sealed unsafe class IntegerGemmNf4Tests
{
    internal static QuantizedMatrix QuantizeNf4(float[] weights, int n, int k, DType scaleType)
    {
        fixed (float* p = weights)
            return Quantizer.TryQuantize(new WeightMatrix(p, DType.F32, n, k), QuantFormat.Nf4, scaleType, ScaleSelection.AbsMax)
                ?? throw new InvalidOperationException($"the weights do not fit {scaleType} scales");
    }

    /// <summary>The integer of one code, computed here from the documented rule rather than taken from the kernel's tables.</summary>
    private static int CodeInteger(int code, int level) => (int)MathF.Round(Quantizer.Nf4Codes[code] * level);

    internal static float[] ScalarReference(IntegerGemm.Path path, float[] x, int rows, int k, QuantizedMatrix w, float[] bias, float softCap)
    {
        int n = w.Rows, blocks = (k + 31) / 32, level = IntegerGemm.Nf4Level(path);
        var (codes, scales) = QuantizeActivations(x, rows, k, IntegerGemm.ActivationLimit(path));
        var y = new float[rows * n];
        var absMax = new float[w.BlocksPerRow];
        for (int r = 0; r < n; r++)
        {
            ReadOnlySpan<byte> packed = w.RowBlocks(r);
            w.ReadScales(r, absMax);
            // Block b of 32: the low (even b) or high (odd b) nibbles of stored block b / 2.
            var wCodes = new int[blocks * 32];
            for (int b = 0; b < blocks; b++)
                for (int i = 0; i < 32; i++)
                    wCodes[b * 32 + i] = CodeInteger((packed[b / 2 * 32 + i] >> (4 * (b % 2))) & 0xF, level);
            for (int m = 0; m < rows; m++)
            {
                float sum = 0f;
                for (int b = 0; b < blocks; b++)
                {
                    int dot = 0;
                    for (int i = 0; i < 32; i++) dot += codes[(m * blocks + b) * 32 + i] * wCodes[b * 32 + i];
                    sum = MathF.FusedMultiplyAdd(dot, absMax[b / 2] * (1f / level) * scales[m * blocks + b], sum);
                }
                if (bias.Length > 0) sum += bias[r];
                y[m * n + r] = softCap > 0f ? softCap * MathF.Tanh(sum / softCap) : sum;
            }
        }
        return y;
    }

    private static void AssertModel(IntegerGemm.Path path, float[] expected, float[] actual, int n, float softCap, string label)
    {
        for (int i = 0; i < expected.Length; i++)
        {
            // Integer sums and the fp32 accumulation order are the model's: bit-equal, except the soft-cap's vector tanh.
            bool equal = softCap == 0f ? expected[i] == actual[i] || (float.IsNaN(expected[i]) && float.IsNaN(actual[i]))
                : Math.Abs(expected[i] - actual[i]) <= 2e-6f * softCap;
            Assert.True(equal, $"{path}, {label}: y[{i / n}, {i % n}] = {actual[i]}, model {expected[i]}");
        }
    }

    [Property(Arbitrary = [typeof(IntegerGemmArbitraries)], MaxTest = 80)]
    public void Every_integer_path_equals_the_scalar_model_with_fp16_and_fp32_scales(IntegerGemmCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, c.Range);
        if (x.Length > 40) x[37] = 0f;
        float[] weights = RandomFloats(random, c.N * c.K, 1f);
        float[] bias = c.Bias ? RandomFloats(random, c.N, 2f) : [];
        foreach (var scaleType in new[] { DType.F16, DType.F32 })
        {
            var w = QuantizeNf4(weights, c.N, c.K, scaleType);
            foreach (var path in SupportedPaths())
                AssertModel(path, ScalarReference(path, x, c.Rows, c.K, w, bias, c.SoftCap), Run(path, x, c.Rows, w, bias, c.SoftCap), c.N, c.SoftCap, $"{scaleType} scales");
        }
    }

    [Property(Arbitrary = [typeof(TallIntegerGemmArbitraries)], MaxTest = 6)]
    public void Tall_shapes_with_several_chunks_and_tiles_equal_the_scalar_model(IntegerGemmCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, c.Range);
        var w = QuantizeNf4(RandomFloats(random, c.N * c.K, 1f), c.N, c.K, c.Seed % 2 == 0 ? DType.F16 : DType.F32);
        float[] bias = c.Bias ? RandomFloats(random, c.N, 2f) : [];
        foreach (var path in SupportedPaths())
            AssertModel(path, ScalarReference(path, x, c.Rows, c.K, w, bias, c.SoftCap), Run(path, x, c.Rows, w, bias, c.SoftCap), c.N, c.SoftCap, w.ScaleType.ToString());
    }

    /// <summary>
    /// Every byte value in every position, including the padding past K (which must not count), and scales from 2^-14
    /// to 2^10: all 256 nibble pairs go through each path's lookup.
    /// </summary>
    [Theory]
    [InlineData(37, 97, 70)]
    [InlineData(33, 160, 9)]
    [InlineData(20, 64, 65)]
    [InlineData(6, 31, 3)]
    public void Arbitrary_code_bytes_equal_the_scalar_model(int rows, int k, int n)
    {
        var random = new Random(rows * 1000 + k);
        float[] x = RandomFloats(random, rows * k, 2f);
        foreach (var scaleType in new[] { DType.F16, DType.F32 })
        {
            var w = QuantizedMatrix.Allocate(QuantFormat.Nf4, n, k, scaleType);
            for (int r = 0; r < n; r++)
            {
                Span<byte> packed = w.RowBlocks(r);
                for (int i = 0; i < packed.Length; i++) packed[i] = (byte)((r * 131 + i * 17 + random.Next(4)) & 0xFF);
                var scales = new float[w.BlocksPerRow];
                for (int b = 0; b < scales.Length; b++) scales[b] = MathF.ScaleB(1f + random.NextSingle(), random.Next(-14, 11));
                Quantizer.StoreScales(scales, w.RowScaleBytes(r), scaleType);
            }
            foreach (var path in SupportedPaths())
                AssertModel(path, ScalarReference(path, x, rows, k, w, [], 0f), Run(path, x, rows, w, [], 0f), n, 0f, $"{scaleType} scales");
        }
    }

    /// <summary>
    /// The int32 bound of <see cref="IntegerGemm.Nf4Level"/>: codes 0 and 15 (NF4 = ∓1, the integers ∓2048 on the int16
    /// paths) in every position against x codes ±32767, 20 blocks of 32 per row. One block sums to ±2,147,418,112, just
    /// inside int32; an int32 kept across two blocks would wrap, and the result must be the exact product.
    /// </summary>
    [Fact]
    public void Extreme_codes_do_not_overflow_the_int32_block_sums()
    {
        int rows = 40, k = 640, n = 70;
        foreach (var scaleType in new[] { DType.F16, DType.F32 })
        {
            var w = QuantizedMatrix.Allocate(QuantFormat.Nf4, n, k, scaleType);
            var valueOfRow = new int[n];
            for (int r = 0; r < n; r++)
            {
                // Both nibbles the same extreme code; row 2 mod 3 mixes them (low -1, high +1).
                (byte packed, valueOfRow[r]) = (r % 3) switch { 0 => ((byte)0x00, -1), 1 => ((byte)0xFF, 1), _ => ((byte)0xF0, 0) };
                w.RowBlocks(r).Fill(packed);
                var ones = new float[w.BlocksPerRow];
                Array.Fill(ones, 1f);
                Quantizer.StoreScales(ones, w.RowScaleBytes(r), scaleType);
            }
            var x = new float[rows * k];
            for (int m = 0; m < rows; m++) Array.Fill(x, m % 2 == 0 ? 1f : -1f, m * k, k);
            foreach (var path in SupportedPaths())
            {
                float[] y = Run(path, x, rows, w, [], 0f);
                for (int m = 0; m < rows; m++)
                    for (int r = 0; r < n; r++)
                    {
                        double exact = (m % 2 == 0 ? 1.0 : -1.0) * k * valueOfRow[r];
                        Assert.True(Math.Abs(y[m * n + r] - exact) <= 1e-5 * k, $"{path}, {scaleType}: y[{m}, {r}] = {y[m * n + r]}, exact {exact}");
                    }
                Assert.Equal(ScalarReference(path, x, rows, k, w, [], 0f), y);
            }
        }
    }

    [Property(Arbitrary = [typeof(IntegerGemmArbitraries)], MaxTest = 40)]
    public void Error_against_the_dequantized_product_stays_within_the_activation_and_table_rounding(IntegerGemmCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, c.Range);
        var w = QuantizeNf4(RandomFloats(random, c.N * c.K, 1f), c.N, c.K, DType.F16);
        var row = new float[c.K];
        var absMax = new float[w.BlocksPerRow];
        foreach (var path in SupportedPaths())
        {
            float[] actual = Run(path, x, c.Rows, w, [], 0f);
            int limit = IntegerGemm.ActivationLimit(path), level = IntegerGemm.Nf4Level(path);
            for (int r = 0; r < c.N; r++)
            {
                w.DequantizeRow(r, row);
                w.ReadScales(r, absMax);
                for (int m = 0; m < c.Rows; m++)
                {
                    double sum = 0, magnitude = 0, bound = 0;
                    for (int b = 0; b * 32 < c.K; b++)
                    {
                        double xMax = 0;
                        for (int i = b * 32; i < Math.Min(c.K, b * 32 + 32); i++) xMax = Math.Max(xMax, Math.Abs(x[m * c.K + i]));
                        // An activation moves by at most half its step xMax / L, a weight by half the table's step absmax / level.
                        double xError = xMax / limit / 2, wError = absMax[b / 2] / level / 2.0;
                        for (int i = b * 32; i < Math.Min(c.K, b * 32 + 32); i++)
                        {
                            double xi = x[m * c.K + i], wi = row[i];
                            sum += xi * wi;
                            magnitude += Math.Abs(xi * wi);
                            bound += xError * Math.Abs(wi) + Math.Abs(xi) * wError + xError * wError;
                        }
                    }
                    double tolerance = bound * (1 + 1e-4) + 1e-5 * magnitude + 1e-30;
                    Assert.True(Math.Abs(actual[m * c.N + r] - sum) <= tolerance, $"{path}: y[{m}, {r}] = {actual[m * c.N + r]}, dequantized product {sum}, bound {tolerance}");
                }
            }
        }
    }

    [Fact]
    public void Non_finite_activations_give_nan_rows_and_leave_the_others_alone()
    {
        int rows = 9, k = 70, n = 20;
        var random = new Random(5);
        float[] x = RandomFloats(random, rows * k, 1f);
        x[2 * k + 40] = float.NaN;
        x[6 * k + 66] = float.PositiveInfinity;
        var w = QuantizeNf4(RandomFloats(random, n * k, 1f), n, k, DType.F16);
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
}
