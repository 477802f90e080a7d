using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Quant;

public sealed record ScaleSearchCase(QuantFormat Format, DType ScaleType, float Magnitude, int Zeros, bool Outlier, int Length, int Seed);

public static class ScaleSearchArbitraries
{
    public static Arbitrary<ScaleSearchCase> Cases() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from scaleType in Gen.Elements(DType.F16, DType.F32)
        from magnitude in Gen.Elements(5e-3f, 0.02f, 1f, 300f)
        from zeros in Gen.Choose(0, 40)
        from outlier in Gen.Elements(true, false)
        from length in Gen.Choose(1, 64)
        from seed in Gen.Choose(0, int.MaxValue)
        select new ScaleSearchCase(format, scaleType, magnitude, zeros, outlier, length, seed));
}

/// <summary>The least-error scale search: every vector path equals the scalar reference, and it lowers the error.</summary>
public sealed class ScaleSearchTests
{
    private static float[] Block(ScaleSearchCase c)
    {
        // A whole block (padding past Length stays 0, as the quantizer pads a row's last block).
        var random = new Random(c.Seed);
        var block = new float[c.Format.BlockSize()];
        int length = Math.Min(c.Length, block.Length);
        for (int i = 0; i < length; i++)
            block[i] = (float)((random.NextDouble() + random.NextDouble() + random.NextDouble() - 1.5) * c.Magnitude);
        for (int z = 0; z < c.Zeros; z++) block[random.Next(length)] = 0f;
        if (c.Outlier) block[random.Next(length)] *= 4f;
        return block;
    }

    private static IEnumerable<ScaleSearch.Path> SupportedPaths(QuantFormat format)
    {
        yield return ScaleSearch.Path.Scalar;
        if (Vector256.IsHardwareAccelerated && format == QuantFormat.Q8) yield return ScaleSearch.Path.Vector256;
        if (Avx512F.IsSupported) yield return ScaleSearch.Path.Vector512;
    }

    [Property(Arbitrary = [typeof(ScaleSearchArbitraries)], MaxTest = 300)]
    public void Every_path_chooses_the_scalar_references_scale_and_codes(ScaleSearchCase c)
    {
        float[] block = Block(c);
        float absMax = block.Max(MathF.Abs);
        float natural = c.Format == QuantFormat.Q8 ? absMax / 127f : absMax;
        if (!Quantizer.ScaleFits(natural, c.ScaleType) || Quantizer.RoundScale(natural, c.ScaleType) < ScaleSearch.MinScale(c.ScaleType))
            return;
        float expected = ScaleSearch.Choose(c.Format, block, natural, c.ScaleType, ScaleSearch.Path.Scalar);
        Assert.Equal(expected, Quantizer.RoundScale(expected, c.ScaleType));
        var expectedCodes = new byte[32];
        var expectedScale = new float[1];
        Assert.True(Quantizer.TryQuantizeRow(c.Format, block, expectedCodes, expectedScale, c.ScaleType, ScaleSelection.MinimumError, ScaleSearch.Path.Scalar));
        Assert.Equal(expected, expectedScale[0]);
        foreach (var path in SupportedPaths(c.Format))
        {
            Assert.Equal(expected, ScaleSearch.Choose(c.Format, block, natural, c.ScaleType, path));
            var codes = new byte[32];
            var scale = new float[1];
            Assert.True(Quantizer.TryQuantizeRow(c.Format, block, codes, scale, c.ScaleType, ScaleSelection.MinimumError, path));
            Assert.Equal(expectedScale, scale);
            Assert.Equal(expectedCodes, codes);
        }
    }

    [Property(Arbitrary = [typeof(ScaleSearchArbitraries)], MaxTest = 300)]
    public void The_searched_scale_never_leaves_more_squared_error_than_absmax(ScaleSearchCase c)
    {
        float[] block = Block(c);
        var searchedCodes = new byte[32];
        var absMaxCodes = new byte[32];
        float[] searched = new float[1], plain = new float[1];
        if (!Quantizer.TryQuantizeRow(c.Format, block, searchedCodes, searched, c.ScaleType, ScaleSelection.MinimumError))
            return;
        Assert.True(Quantizer.TryQuantizeRow(c.Format, block, absMaxCodes, plain, c.ScaleType, ScaleSelection.AbsMax));
        double searchedError = SquaredError(c.Format, block, searchedCodes, searched);
        double absMaxError = SquaredError(c.Format, block, absMaxCodes, plain);
        // The search scores in fp32 (at most 64 terms); the double sums may differ from its scores by that rounding.
        Assert.True(searchedError <= absMaxError * (1 + 1e-5) + 1e-30, $"searched scale {searched[0]}: {searchedError}; absmax {plain[0]}: {absMaxError}");
        // The scale stays within the candidates' range (rounded to the scale type): q8 never below absmax/127.
        float absMax = block.Max(MathF.Abs);
        float natural = c.Format == QuantFormat.Q8 ? absMax / 127f : absMax;
        var multipliers = ScaleSearch.Multipliers(c.Format).ToArray();
        Assert.InRange(searched[0], natural * multipliers.Min() * (1 - 1f / 1024), natural * multipliers.Max() * (1 + 1f / 1024));
    }

    private static double SquaredError(QuantFormat format, float[] block, byte[] codes, float[] scale)
    {
        var restored = new float[block.Length];
        Quantizer.DequantizeRow(format, codes, scale, restored);
        double sum = 0;
        for (int i = 0; i < block.Length; i++) sum += (block[i] - (double)restored[i]) * (block[i] - (double)restored[i]);
        return sum;
    }

    [Theory]
    [InlineData(QuantFormat.Q8, 0.08)]   // measured 10.2 % (rms 5.35e-3 -> 4.81e-3 of the weights' rms)
    [InlineData(QuantFormat.Nf4, 0.06)]  // measured 7.2 % (9.19e-2 -> 8.52e-2)
    public void On_gaussian_weights_the_search_lowers_the_rms_error(QuantFormat format, double minimumGain)
    {
        var random = new Random(11);
        const int k = 64 * 1024;
        var row = new float[k];
        for (int i = 0; i < k; i++)
            row[i] = (float)(Math.Sqrt(-2 * Math.Log(1 - random.NextDouble())) * Math.Cos(2 * Math.PI * random.NextDouble()) * 0.02);
        double Rms(ScaleSelection selection)
        {
            int blocks = format.BlocksPerRow(k);
            var codes = new byte[blocks * 32];
            var scales = new float[blocks];
            Assert.True(Quantizer.TryQuantizeRow(format, row, codes, scales, DType.F16, selection));
            var restored = new float[k];
            Quantizer.DequantizeRow(format, codes, scales, restored);
            double error = 0;
            for (int i = 0; i < k; i++) error += (row[i] - (double)restored[i]) * (row[i] - (double)restored[i]);
            return Math.Sqrt(error / k);
        }
        double gain = 1 - Rms(ScaleSelection.MinimumError) / Rms(ScaleSelection.AbsMax);
        Assert.True(gain >= minimumGain, $"{format.Name()}: the search lowers the rms error by {gain:P1}");
    }

    [Property(MaxTest = 2000)]
    public void Vector_scale_rounding_equals_the_scalar_one(uint bits, bool half)
    {
        float scale = BitConverter.UInt32BitsToSingle(bits & 0x7FFF_FFFFu);
        if (!float.IsFinite(scale)) return;
        var type = half ? DType.F16 : DType.F32;
        float expected = Quantizer.RoundScale(scale, type);
        if (Vector512.IsHardwareAccelerated) Assert.Equal(expected, ScaleSearch.RoundScale(Vector512.Create(scale), type).GetElement(7));
        if (Vector256.IsHardwareAccelerated) Assert.Equal(expected, ScaleSearch.RoundScale(Vector256.Create(scale), type).GetElement(3));
    }

    [Fact]
    public void The_nf4_code_lookup_equals_the_midpoint_count()
    {
        if (!Avx512F.IsSupported) return;
        var values = new List<float> { 0f, -0f, 1f, -1f, 1.25f, -1.25f, 3f, -3f };
        // Every midpoint and every bin edge, and their neighbours a few ulps away.
        var edges = Quantizer.Nf4Midpoints.ToArray().Concat(Enumerable.Range(0, 33).Select(b => -1f + b / 16f));
        foreach (float edge in edges)
        {
            float below = edge, above = edge;
            values.Add(edge);
            for (int step = 0; step < 4; step++)
            {
                below = MathF.BitDecrement(below);
                above = MathF.BitIncrement(above);
                values.Add(below);
                values.Add(above);
            }
        }
        var random = new Random(3);
        for (int i = 0; i < 20000; i++) values.Add((float)(random.NextDouble() * 2.6 - 1.3));
        while (values.Count % 16 != 0) values.Add(0.5f);
        for (int i = 0; i < values.Count; i += 16)
        {
            var codes = ScaleSearch.Nf4Lookup.Code(Vector512.Create(values.GetRange(i, 16).ToArray()));
            for (int lane = 0; lane < 16; lane++)
                Assert.True(Quantizer.Nf4Code(values[i + lane]) == codes.GetElement(lane), $"v = {values[i + lane]:R}: code {codes.GetElement(lane)}, expected {Quantizer.Nf4Code(values[i + lane])}");
        }
    }
}
