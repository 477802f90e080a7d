using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public sealed record NormCase(int Rows, int Dim, float Eps, bool Shift, bool InPlace, float Offset, Width Width, int Seed);

public static class NormArbitraries
{
    public static Arbitrary<NormCase> Cases() => Arb.From(
        from rows in Gen.Choose(1, 9)
        from dim in Gen.Choose(1, 70)
        from eps in Gen.Elements(1e-6f, 1e-5f, 1e-3f)
        from shift in Gen.Elements(true, false)
        from inPlace in Gen.Elements(true, false)
        // A large common offset checks that the variance does not cancel catastrophically.
        from offset in Gen.Elements(0f, 0.5f, -20f)
        from width in Widths
        from seed in Seeds
        select new NormCase(rows, dim, eps, shift, inPlace, offset, width, seed));
}

public sealed class NormsTests
{
    [Property(Arbitrary = [typeof(NormArbitraries)], MaxTest = 100)]
    public void LayerNorm_matches_double_reference(NormCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.Dim, -3f, 3f);
        for (int i = 0; i < x.Length; i++) x[i] += c.Offset;
        float[] gamma = RandomFloats(random, c.Dim, -2f, 2f);
        float[] beta = c.Shift ? RandomFloats(random, c.Dim, -1f, 1f) : [];
        float[] original = (float[])x.Clone();
        float[] y = c.InPlace ? x : new float[x.Length];

        Norms.LayerNorm(x, y, c.Rows, c.Dim, gamma, beta, c.Eps, c.Width.ToSimd());

        for (int r = 0; r < c.Rows; r++)
        {
            double mean = 0, variance = 0;
            for (int i = 0; i < c.Dim; i++) mean += original[r * c.Dim + i];
            mean /= c.Dim;
            for (int i = 0; i < c.Dim; i++) variance += Math.Pow(original[r * c.Dim + i] - mean, 2);
            variance /= c.Dim;
            double rstd = 1 / Math.Sqrt(variance + c.Eps);
            for (int i = 0; i < c.Dim; i++)
            {
                double normalized = (original[r * c.Dim + i] - mean) * rstd;
                double b = c.Shift ? beta[i] : 0;
                double expected = normalized * gamma[i] + b;
                // Rounding |x| (incl. the offset) in float moves the centred value by ~|x| eps.
                double scale = (Math.Abs(normalized) + Math.Abs(original[r * c.Dim + i]) * rstd) * Math.Abs(gamma[i]) + Math.Abs(b);
                AssertClose(expected, y[r * c.Dim + i], 1e-5 * scale + 1e-7, $"y[{r}, {i}]");
            }
        }
    }

    [Property(Arbitrary = [typeof(NormArbitraries)], MaxTest = 100)]
    public void RmsNorm_matches_double_reference(NormCase c)
    {
        bool unitOffset = c.Shift;
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.Dim, -3f, 3f);
        for (int i = 0; i < x.Length; i++) x[i] += c.Offset;
        float[] weight = RandomFloats(random, c.Dim, -1.5f, 1.5f);
        float[] original = (float[])x.Clone();
        float[] y = c.InPlace ? x : new float[x.Length];

        Norms.RmsNorm(x, y, c.Rows, c.Dim, weight, c.Eps, unitOffset, c.Width.ToSimd());

        for (int r = 0; r < c.Rows; r++)
        {
            double meanSquare = 0;
            for (int i = 0; i < c.Dim; i++) meanSquare += Math.Pow(original[r * c.Dim + i], 2);
            meanSquare /= c.Dim;
            double rstd = 1 / Math.Sqrt(meanSquare + c.Eps);
            for (int i = 0; i < c.Dim; i++)
            {
                double factor = unitOffset ? 1.0 + weight[i] : weight[i];
                double expected = original[r * c.Dim + i] * rstd * factor;
                double scale = Math.Abs(original[r * c.Dim + i] * rstd) * (Math.Abs(factor) + 1);
                AssertClose(expected, y[r * c.Dim + i], 1e-5 * scale + 1e-7, $"y[{r}, {i}] unitOffset={unitOffset}");
            }
        }
    }

    [Fact]
    public void Public_entry_points_use_the_same_formulas()
    {
        float[] x = [1f, 2f, 3f, 4f, 5f];
        float[] gamma = [1f, 1f, 1f, 1f, 1f];
        float[] y = new float[5];
        Norms.LayerNorm(x, y, 1, 5, gamma, default, 0f);
        // mean 3, biased variance 2.
        for (int i = 0; i < 5; i++)
            AssertClose((x[i] - 3) / Math.Sqrt(2), y[i], 1e-6, $"layernorm[{i}]");

        Norms.RmsNorm(x, y, 1, 5, [0f, 0f, 0f, 0f, 0f], 0f, unitOffset: true);
        for (int i = 0; i < 5; i++)
            AssertClose(x[i] / Math.Sqrt(11), y[i], 1e-6, $"rmsnorm[{i}]");
    }

    [Fact]
    public void Norms_reject_mismatched_sizes()
    {
        float[] six = new float[6], three = new float[3];
        Assert.Equal("x", Assert.Throws<ArgumentException>(() => Norms.LayerNorm(new float[5], six, 2, 3, three, three, 1e-6f)).ParamName);
        Assert.Equal("y", Assert.Throws<ArgumentException>(() => Norms.LayerNorm(six, new float[5], 2, 3, three, three, 1e-6f)).ParamName);
        Assert.Equal("gamma", Assert.Throws<ArgumentException>(() => Norms.LayerNorm(six, six, 2, 3, new float[2], three, 1e-6f)).ParamName);
        Assert.Equal("beta", Assert.Throws<ArgumentException>(() => Norms.LayerNorm(six, six, 2, 3, three, new float[4], 1e-6f)).ParamName);
        Assert.Equal("dim", Assert.Throws<ArgumentOutOfRangeException>(() => Norms.LayerNorm(six, six, 2, 0, three, three, 1e-6f)).ParamName);
        Assert.Equal("weight", Assert.Throws<ArgumentException>(() => Norms.RmsNorm(six, six, 2, 3, new float[6], 1e-6f, true)).ParamName);
        Assert.Equal("x", Assert.Throws<ArgumentException>(() => Norms.RmsNorm(three, six, 2, 3, three, 1e-6f, true)).ParamName);
        Assert.Equal("rows", Assert.Throws<ArgumentOutOfRangeException>(() => Norms.RmsNorm(six, six, -1, 3, three, 1e-6f, true)).ParamName);
    }
}
