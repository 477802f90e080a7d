using System.Runtime.Intrinsics;
using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels.Simd;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public sealed record ExpCase(float Low, float High, Width Width, int Seed);

public static class ExpArbitraries
{
    public static Arbitrary<ExpCase> Cases() => Arb.From(
        from range in Gen.Elements((-1f, 1f), (-0.35f, 0.35f), (-20f, 0f), (-90f, -80f), (-87.5f, -87f), (80f, 90f), (88f, 88.5f), (-100f, 100f))
        from width in Widths
        from seed in Seeds
        select new ExpCase(range.Item1, range.Item2, width, seed));
}

public sealed class PolynomialExpTests
{
    // Cephes' expf polynomial is within about 2 ulp; 4 float ulps (2^-21 relative) bounds it with room for the range reduction.
    private const double RelativeTolerance = 4.0 / (1 << 23);

    [Property(Arbitrary = [typeof(ExpArbitraries)], MaxTest = 100)]
    public void Exp_matches_double_reference_in_range_and_saturates_outside(ExpCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, 64, c.Low, c.High);
        float[] y = Evaluate(x, c.Width);
        for (int i = 0; i < x.Length; i++)
        {
            if (x[i] < PolynomialExp.Low)
            {
                Assert.Equal(0f, y[i]);
            }
            else if (x[i] > PolynomialExp.High)
            {
                Assert.Equal(float.PositiveInfinity, y[i]);
            }
            else
            {
                double expected = Math.Exp(x[i]);
                AssertClose(expected, y[i], RelativeTolerance * expected, $"exp({x[i]:R}) at {c.Width}");
            }
        }
    }

    [Theory]
    [InlineData(Width.Scalar)]
    [InlineData(Width.V128)]
    [InlineData(Width.V256)]
    [InlineData(Width.V512)]
    public void Exp_of_special_values(Width width)
    {
        float[] x = [0f, -0f, float.NegativeInfinity, float.PositiveInfinity, PolynomialExp.Low, PolynomialExp.High, -1e-30f, 1e-30f,
                     float.MinValue, float.MaxValue, -88f, -87.4f, 0.3465736f, -0.3465736f, 1f, -1f];
        float[] y = Evaluate(x, width);
        Assert.Equal(1f, y[0]);
        Assert.Equal(1f, y[1]);
        Assert.Equal(0f, y[2]);   // masked scores give weight exactly 0
        Assert.Equal(float.PositiveInfinity, y[3]);
        for (int i = 4; i < x.Length; i++)
        {
            double expected = x[i] < PolynomialExp.Low ? 0 : x[i] > PolynomialExp.High ? double.PositiveInfinity : Math.Exp(x[i]);
            if (double.IsInfinity(expected) || expected == 0)
                Assert.Equal((float)expected, y[i]);
            else
                AssertClose(expected, y[i], RelativeTolerance * expected, $"exp({x[i]:R}) at {width}");
        }
    }

    /// <summary>Applies the exp of one width lane by lane (the tail of a partial vector padded with zeros).</summary>
    private static unsafe float[] Evaluate(float[] x, Width width)
    {
        int lanes = width.ToSimd().FloatCount();
        var padded = new float[(x.Length + lanes - 1) / lanes * lanes];
        x.CopyTo(padded, 0);
        var y = new float[padded.Length];
        fixed (float* source = padded)
        fixed (float* destination = y)
        {
            for (int i = 0; i < padded.Length; i += lanes)
            {
                switch (width)
                {
                    case Width.V512: PolynomialExp.Exp(Vector512.Load(source + i)).Store(destination + i); break;
                    case Width.V256: PolynomialExp.Exp(Vector256.Load(source + i)).Store(destination + i); break;
                    case Width.V128: PolynomialExp.Exp(Vector128.Load(source + i)).Store(destination + i); break;
                    default: destination[i] = PolynomialExp.Exp(source[i]); break;
                }
            }
        }
        return y[..x.Length];
    }
}
