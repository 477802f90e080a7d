using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public sealed record ActivationCase(int Length, float Range, bool InPlace, Width Width, int Seed);

public static class ActivationArbitraries
{
    public static Arbitrary<ActivationCase> Cases() => Arb.From(
        from length in Gen.Choose(0, 100)
        from range in Gen.Elements(1f, 6f, 30f)
        from inPlace in Gen.Elements(true, false)
        from width in Widths
        from seed in Seeds
        select new ActivationCase(length, range, inPlace, width, seed));
}

public sealed class ActivationsTests
{
    private static double GeluReference(double x) => 0.5 * x * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));

    // Float rounding of the cubic argument shifts the result by ~1e-7 relative of |x|; the 1e-5 relative part covers exp.
    private static double Tolerance(double expected, double x) => 1e-5 * Math.Abs(expected) + 1e-6 * Math.Abs(x) + 1e-30;

    [Property(Arbitrary = [typeof(ActivationArbitraries)], MaxTest = 100)]
    public void GeluTanh_matches_double_reference(ActivationCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Length, -c.Range, c.Range);
        float[] original = (float[])x.Clone();
        float[] y = c.InPlace ? x : new float[c.Length + 3];

        Activations.GeluTanh(x, y, c.Width.ToSimd());

        for (int i = 0; i < c.Length; i++)
        {
            double expected = GeluReference(original[i]);
            AssertClose(expected, y[i], Tolerance(expected, original[i]), $"gelu({original[i]:R})");
        }
        if (!c.InPlace)
            Assert.All(y[c.Length..], v => Assert.Equal(0f, v));
    }

    [Property(Arbitrary = [typeof(ActivationArbitraries)], MaxTest = 100)]
    public void GeluTanhMul_matches_double_reference(ActivationCase c)
    {
        var random = new Random(c.Seed);
        float[] gate = RandomFloats(random, c.Length, -c.Range, c.Range);
        float[] up = RandomFloats(random, c.Length, -4f, 4f);
        float[] original = (float[])gate.Clone();
        float[] y = c.InPlace ? gate : new float[c.Length];

        Activations.GeluTanhMul(gate, up, y, c.Width.ToSimd());

        for (int i = 0; i < c.Length; i++)
        {
            double expected = GeluReference(original[i]) * up[i];
            AssertClose(expected, y[i], Tolerance(expected, original[i] * up[i]), $"gelu({original[i]:R}) * {up[i]:R}");
        }
    }

    // Long enough to be cut into chunks run on the kernel threads (16384 floats each), with a partial last chunk.
    [Theory]
    [InlineData(Width.Scalar)]
    [InlineData(Width.V128)]
    [InlineData(Width.V256)]
    [InlineData(Width.V512)]
    public void Gelu_of_several_chunks_matches_double_reference(Width width)
    {
        var random = new Random(3 + (int)width);
        int length = 3 * 16384 + 37;
        float[] gate = RandomFloats(random, length, -8f, 8f);
        float[] up = RandomFloats(random, length, -4f, 4f);
        float[] gelu = new float[length], product = new float[length];
        Activations.GeluTanh(gate, gelu, width.ToSimd());
        Activations.GeluTanhMul(gate, up, product, width.ToSimd());
        for (int i = 0; i < length; i++)
        {
            double expected = GeluReference(gate[i]);
            AssertClose(expected, gelu[i], Tolerance(expected, gate[i]), $"gelu({gate[i]:R}) at {i}");
            AssertClose(expected * up[i], product[i], Tolerance(expected * up[i], gate[i] * up[i]), $"gelu({gate[i]:R}) * {up[i]:R} at {i}");
        }
    }

    [Fact]
    public void GeluTanh_handles_extremes()
    {
        float[] x = [0f, -0f, 1e-30f, -1e-30f, 200f, -200f, float.MaxValue, float.MinValue, float.PositiveInfinity, float.NegativeInfinity,
                     10f, -10f, 3f, -3f, 0.5f, -0.5f, 88f];
        float[] y = new float[x.Length];
        Activations.GeluTanh(x, y);
        for (int i = 0; i < x.Length; i++)
        {
            // -inf gives NaN, as in torch (0.5 * -inf * (1 + tanh(-inf)) = -inf * 0).
            double expected = double.IsInfinity(x[i]) ? (x[i] > 0 ? double.PositiveInfinity : double.NaN) :
                Math.Abs(x[i]) > 100 ? (x[i] > 0 ? x[i] : 0) : GeluReference(x[i]);
            if (double.IsPositiveInfinity(expected))
                Assert.Equal(float.PositiveInfinity, y[i]);
            else if (double.IsNaN(expected))
                Assert.True(float.IsNaN(y[i]));
            else
                AssertClose(expected, y[i], Tolerance(expected, Math.Min(Math.Abs(x[i]), 1e3)), $"gelu({x[i]:R})");
        }
    }

    [Fact]
    public void Activations_reject_mismatched_sizes()
    {
        Assert.Equal("y", Assert.Throws<ArgumentException>(() => Activations.GeluTanh(new float[5], new float[4])).ParamName);
        Assert.Equal("up", Assert.Throws<ArgumentException>(() => Activations.GeluTanhMul(new float[5], new float[4], new float[5])).ParamName);
        Assert.Equal("y", Assert.Throws<ArgumentException>(() => Activations.GeluTanhMul(new float[5], new float[5], new float[4])).ParamName);
    }
}
