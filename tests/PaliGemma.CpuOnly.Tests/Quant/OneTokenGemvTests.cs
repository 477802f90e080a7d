using System.Runtime.Intrinsics.X86;
using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Quant;

public sealed record OneTokenCase(QuantFormat Format, int K, int N, bool Bias, float SoftCap, int Seed, DType ScaleType);

public static class OneTokenArbitraries
{
    // K across and inside blocks (odd nf4 block counts, partial blocks), N below and across the 4-row steps and the
    // work items (several items; lanes with rows left for adjacent steps, a short last one among them).
    public static Arbitrary<OneTokenCase> Cases() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from k in Gen.OneOf(Gen.Choose(1, 300), Gen.Choose(1000, 1300))
        from n in Gen.OneOf(Gen.Choose(1, 40), Gen.Choose(65, 700))
        from bias in Gen.Elements(true, false)
        from cap in Gen.Elements(0f, 0f, 5f)
        from seed in Gen.Choose(0, int.MaxValue)
        from scales in Gen.Elements(DType.F16, DType.F32)
        select new OneTokenCase(format, k, n, bias, cap, seed, scales));
}

/// <summary>
/// The AVX-512 one-token GEMV on int16 activations against a scalar model of exactly what it computes (x quantized per W
/// block, integer dot products, fp32 combined scales), and the pieces it is built from.
/// </summary>
public sealed unsafe class OneTokenGemvTests
{
    private static bool Supported => Avx512F.IsSupported && Avx512BW.IsSupported;

    [Property(Arbitrary = [typeof(OneTokenArbitraries)], MaxTest = 60)]
    public void One_token_int16_gemv_matches_the_integer_reference(OneTokenCase c)
    {
        if (!Supported)
            return;
        var random = new Random(c.Seed);
        float[] x = QuantKernelTests.RandomFloats(random, c.K, 2f);
        // A block of zeros and a block with one outlier: the zero scale and coarse codes for the rest of the block.
        if (c.K > 70) { Array.Clear(x, 0, 32); x[40] = 300f; }
        float[] weights = QuantKernelTests.RandomFloats(random, c.N * c.K, 1f);
        float[] bias = c.Bias ? QuantKernelTests.RandomFloats(random, c.N, 3f) : [];
        var q = QuantKernelTests.QuantizeF32(weights, c.N, c.K, c.Format, c.ScaleType);
        var y = new float[c.N + 1];
        Array.Fill(y, 12345f);
        QuantMatMul.Multiply(x, 1, q, bias, y.AsSpan(0, c.N), c.SoftCap, QuantMatMul.GemvPath.Vector512);
        var (expected, magnitude) = Reference(q, x, bias, c.SoftCap);
        for (int n = 0; n < c.N; n++)
        {
            double tolerance = 1e-5 * magnitude[n] + 1e-6;
            Assert.True(Math.Abs(y[n] - expected[n]) <= tolerance, $"y[{n}] = {y[n]}, expected {expected[n]} (tolerance {tolerance})");
        }
        Assert.Equal(12345f, y[c.N]);
    }

    [Theory]
    [InlineData(QuantFormat.Q8, float.NaN)]
    [InlineData(QuantFormat.Q8, float.PositiveInfinity)]
    [InlineData(QuantFormat.Nf4, float.NaN)]
    [InlineData(QuantFormat.Nf4, float.NegativeInfinity)]
    public void A_non_finite_activation_makes_every_output_NaN(QuantFormat format, float bad)
    {
        if (!Supported)
            return;
        const int k = 300, n = 70;
        var random = new Random(7);
        float[] x = QuantKernelTests.RandomFloats(random, k, 1f);
        x[131] = bad;
        var q = QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, n * k, 1f), n, k, format, DType.F16);
        var y = new float[n];
        QuantMatMul.Multiply(x, 1, q, default, y, 0f, QuantMatMul.GemvPath.Vector512);
        Assert.All(y, value => Assert.True(float.IsNaN(value), $"{value}"));
    }

    [Fact]
    public void The_int16_nf4_table_is_the_rounded_nf4_codes_twice()
    {
        var table = QuantMatMul.Nf4Int16Table;
        for (int i = 0; i < 32; i++)
            Assert.Equal((short)MathF.Round(Quantizer.Nf4Codes[i & 15] * QuantMatMul.Nf4TableLimit), table[i]);
        // 8 products of table entries and activation codes fit an int32 lane.
        Assert.True(8L * QuantMatMul.Nf4TableLimit * QuantMatMul.Nf4ActivationLimit <= int.MaxValue);
    }

    [Theory]
    [InlineData(QuantFormat.Q8, 1)]
    [InlineData(QuantFormat.Q8, 7)]
    [InlineData(QuantFormat.Nf4, 1)]
    [InlineData(QuantFormat.Nf4, 2)]
    [InlineData(QuantFormat.Nf4, 5)]
    public void Activations_are_coded_per_block_in_the_kernel_order(QuantFormat format, int blocks)
    {
        if (!Supported)
            return;
        int size = format.BlockSize();
        var random = new Random(blocks);
        float[] x = QuantKernelTests.RandomFloats(random, blocks * size, 5f);
        Array.Clear(x, 0, size / 2);
        if (blocks > 1)
        {
            Array.Clear(x, size, size);      // an all-zero block
            x[size + 3] = 1e-31f;            // below MinAbsMax: still zeros
        }
        int codeCount = format == QuantFormat.Nf4 ? (blocks + 1) / 2 * 128 : blocks * 32;
        var codes = new short[codeCount + 8];
        Array.Fill(codes, (short)12345);
        var scales = new float[blocks];
        fixed (float* xp = x)
        fixed (short* cp = codes)
        fixed (float* sp = scales)
            QuantMatMul.QuantizeOneToken(format, xp, blocks, cp, sp);

        int limit = format == QuantFormat.Q8 ? QuantMatMul.Q8ActivationLimit : QuantMatMul.Nf4ActivationLimit;
        for (int b = 0; b < blocks; b++)
        {
            var (expectedCodes, scale) = ReferenceBlock(x.AsSpan(b * size, size), limit);
            Assert.Equal(format == QuantFormat.Nf4 ? scale / QuantMatMul.Nf4TableLimit : scale, scales[b]);
            for (int e = 0; e < size; e++)
                Assert.Equal(expectedCodes[e], codes[CodeIndex(format, b, e)]);
        }
        // An odd nf4 block count pairs the last block with zeros.
        if (format == QuantFormat.Nf4 && blocks % 2 == 1)
            for (int e = 0; e < 64; e++)
                Assert.Equal(0, codes[CodeIndex(format, blocks, e)]);
        for (int i = codeCount; i < codes.Length; i++)
            Assert.Equal(12345, codes[i]);
    }

    [Fact]
    public void Combined_fp16_scales_are_exact_for_every_bit_pattern()
    {
        if (!Supported)
            return;
        // 64 rows of 1024 q8 blocks hold every fp16 bit pattern once; x's scales vary per block.
        const int rows = 64, blocks = 1024;
        var q = QuantizedMatrix.Allocate(QuantFormat.Q8, rows, blocks * 32, DType.F16);
        var bits = (ushort*)q.ScaleData;
        for (int i = 0; i < rows * blocks; i++) bits[i] = (ushort)(i * 40503);   // odd multiplier: a permutation of 0..65535
        var random = new Random(3);
        var xScales = new float[4 * blocks];
        for (int b = 0; b < blocks; b++) xScales[b] = (float)Math.Pow(2, random.Next(-40, 15)) * (1f + random.NextSingle());
        for (int copy = 1; copy < 4; copy++) Array.Copy(xScales, 0, xScales, copy * blocks, blocks);
        var rebiased = new float[4 * blocks];
        var combined = new float[4 * blocks + 1];
        fixed (float* xs = xScales)
        fixed (float* rs = rebiased)
        fixed (float* target = combined)
        {
            Assert.True(QuantMatMul.RebiasScales(xs, 4 * blocks, rs));
            for (int row = 0; row < rows; row += 4)
            {
                // Four adjacent rows in one sweep, then one row with room for an nf4 zero partner, then without the rebias.
                QuantMatMul.CombineScales(q, (long)row * blocks, 4 * blocks, 4 * blocks, xs, rs, target);
                for (int i = 0; i < 4 * blocks; i++)
                    AssertProduct(bits[row * blocks + i], xScales[i], combined[i]);
                QuantMatMul.CombineScales(q, (long)row * blocks, blocks, blocks + 1, xs, null, target);
                for (int i = 0; i < blocks; i++)
                    AssertProduct(bits[row * blocks + i], xScales[i], combined[i]);
                Assert.Equal(0f, combined[blocks]);
            }
        }
    }

    [Theory]
    [InlineData(DType.F16, true)]
    [InlineData(DType.F16, false)]
    [InlineData(DType.F32, true)]
    public void Scale_groups_are_the_exact_products_of_every_scale(DType scaleType, bool rebias)
    {
        if (!Supported)
            return;
        // The kernels combine 16 scales at a time just before their codes; every group must hold exactly the products of
        // the widened W scales and x's, every fp16 pattern included (negative, subnormal, infinite and NaN scales take
        // the exact widening).
        const int rows = 64, blocks = 1024;
        var q = QuantizedMatrix.Allocate(QuantFormat.Q8, rows, blocks * 32, scaleType);
        var random = new Random(11);
        for (int i = 0; i < rows * blocks; i++)
        {
            // fp16: the first half of the rows every bit pattern, the second only finite non-negative ones (the fast path).
            if (scaleType == DType.F16)
                ((ushort*)q.ScaleData)[i] = (ushort)(i < rows * blocks / 2 ? i * 40503 : i * 40503 % 0x7C00);
            else
                ((float*)q.ScaleData)[i] = (float)Math.Pow(2, random.Next(-30, 10)) * (random.NextSingle() - 0.25f);
        }
        var xScales = new float[blocks];
        for (int b = 0; b < blocks; b++) xScales[b] = (float)Math.Pow(2, random.Next(-40, 15)) * (1f + random.NextSingle());
        var rebiased = new float[blocks];
        var group = new float[QuantMatMul.OneTokenScaleGroup];
        fixed (float* xs = xScales)
        fixed (float* rs = rebiased)
        fixed (float* target = group)
        {
            Assert.True(QuantMatMul.RebiasScales(xs, blocks, rs));
            float* xr = rebias ? rs : null;
            for (int row = 0; row < rows; row++)
            {
                for (int b = 0; b < blocks; b += QuantMatMul.OneTokenScaleGroup)
                {
                    long first = (long)row * blocks + b;
                    QuantMatMul.CombineScaleGroup(q.ScaleData, scaleType == DType.F32, first, xs + b, xr == null ? null : xr + b, target);
                    for (int i = 0; i < QuantMatMul.OneTokenScaleGroup; i++)
                    {
                        if (scaleType == DType.F16)
                        {
                            AssertProduct(((ushort*)q.ScaleData)[first + i], xScales[b + i], group[i]);
                            continue;
                        }
                        float expected = ((float*)q.ScaleData)[first + i] * xScales[b + i];
                        Assert.True(BitConverter.SingleToUInt32Bits(expected) == BitConverter.SingleToUInt32Bits(group[i]),
                            $"row {row} block {b + i}: {group[i]}, expected {expected}");
                    }
                }
            }
        }
    }

    [Fact]
    public void Activation_scales_too_large_to_rebias_are_refused()
    {
        var scales = new[] { 1f, 32768f, 40000f };
        var rebiased = new float[3];
        fixed (float* s = scales)
        fixed (float* r = rebiased)
        {
            Assert.True(QuantMatMul.RebiasScales(s, 2, r));
            Assert.False(QuantMatMul.RebiasScales(s, 3, r));
        }
    }

    private static void AssertProduct(ushort half, float xScale, float actual)
    {
        float expected = (float)BitConverter.UInt16BitsToHalf(half) * xScale;
        if (float.IsNaN(expected))
            Assert.True(float.IsNaN(actual), $"0x{half:X4} x {xScale}: {actual}");
        else
            Assert.True(BitConverter.SingleToUInt32Bits(expected) == BitConverter.SingleToUInt32Bits(actual), $"0x{half:X4} x {xScale}: {actual}, expected {expected}");
    }

    /// <summary>Where element e of block b lands: q8 in x's order; nf4 in pairs of blocks, 4 runs of 32 (see QuantizeOneToken).</summary>
    private static int CodeIndex(QuantFormat format, int b, int e)
    {
        if (format == QuantFormat.Q8)
            return b * 32 + e;
        // Element e is nibble (e >= 32) of byte j = e mod 32 of block b; the pair's byte B = 32 (b mod 2) + j sits in word
        // B / 2 of run 2 (B mod 2) + (e >= 32).
        int j = e % 32, high = e >= 32 ? 1 : 0;
        int pairByte = 32 * (b % 2) + j;
        return b / 2 * 128 + (2 * (pairByte % 2) + high) * 32 + pairByte / 2;
    }

    /// <summary>round-half-even(x · (L / absmax)), clamped; scale absmax / L (0 below MinAbsMax, NaN for a non-finite block).</summary>
    private static (short[] Codes, float Scale) ReferenceBlock(ReadOnlySpan<float> x, int limit)
    {
        var codes = new short[x.Length];
        float absMax = 0f;
        bool finite = true;
        foreach (float v in x)
        {
            finite &= float.IsFinite(v);
            absMax = MathF.Max(absMax, MathF.Abs(v));
        }
        if (!finite)
            return (codes, float.NaN);
        if (absMax < IntegerGemm.MinAbsMax)
            return (codes, 0f);
        float inverse = limit / absMax;
        for (int i = 0; i < x.Length; i++)
            codes[i] = (short)Math.Clamp((int)MathF.Round(x[i] * inverse, MidpointRounding.ToEven), -limit, limit);
        return (codes, absMax / limit);
    }

    /// <summary>
    /// What the kernel computes, in double: per W block, the integer dot product of the W codes (q8) or int16 table
    /// entries (nf4) with x's codes, times the fp32 product of the two scales; and Σ of the terms' magnitudes.
    /// </summary>
    private static (double[] Y, double[] Magnitude) Reference(QuantizedMatrix q, float[] x, float[] bias, float softCap)
    {
        int size = q.Format.BlockSize(), blocks = q.BlocksPerRow;
        int limit = q.Format == QuantFormat.Q8 ? QuantMatMul.Q8ActivationLimit : QuantMatMul.Nf4ActivationLimit;
        var padded = new float[blocks * size];
        x.CopyTo(padded, 0);
        var codes = new short[blocks][];
        var xScales = new float[blocks];
        for (int b = 0; b < blocks; b++)
        {
            (codes[b], xScales[b]) = ReferenceBlock(padded.AsSpan(b * size, size), limit);
            if (q.Format == QuantFormat.Nf4) xScales[b] /= QuantMatMul.Nf4TableLimit;
        }
        var table = QuantMatMul.Nf4Int16Table;
        var y = new double[q.Rows];
        var magnitude = new double[q.Rows];
        var scales = new float[blocks];
        for (int n = 0; n < q.Rows; n++)
        {
            q.ReadScales(n, scales);
            ReadOnlySpan<byte> row = q.RowBlocks(n);
            double sum = bias.Length > 0 ? bias[n] : 0, total = Math.Abs(sum);
            for (int b = 0; b < blocks; b++)
            {
                float combined = scales[b] * xScales[b];
                long dot = 0, absDot = 0;
                for (int e = 0; e < size; e++)
                {
                    int weight = q.Format == QuantFormat.Q8
                        ? (sbyte)row[b * 32 + e]
                        : table[e < 32 ? row[b * 32 + e] & 15 : row[b * 32 + e - 32] >> 4];
                    dot += (long)weight * codes[b][e];
                    absDot += Math.Abs((long)weight * codes[b][e]);
                }
                sum += (double)combined * dot;
                total += Math.Abs((double)combined) * absDot;
            }
            y[n] = softCap > 0 ? softCap * Math.Tanh(sum / softCap) : sum;
            magnitude[n] = total;
        }
        return (y, magnitude);
    }
}
