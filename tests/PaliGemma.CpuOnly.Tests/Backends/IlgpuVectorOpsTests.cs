using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels.Backends;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Backends;

public sealed record DeviceElementwiseCase(int Length, float Range, bool InPlace, int Offset, int Seed);

public sealed record DeviceNormCase(int Rows, int Dim, float Eps, bool Flag, bool InPlace, float Shift, int Offset, int Seed);

public sealed record DeviceRopeCase(int Rows, int Heads, int HeadDim, int StrideSlack, float Theta, bool RepeatPositions, int Seed);

public static class DeviceVectorArbitraries
{
    public static Arbitrary<DeviceElementwiseCase> Elementwise() => Arb.From(
        from length in Gen.Choose(0, 100)
        from range in Gen.Elements(1f, 6f, 30f)
        from inPlace in Gen.Elements(true, false)
        from offset in Gen.Choose(0, 3)
        from seed in Seeds
        select new DeviceElementwiseCase(length, range, inPlace, offset, seed));

    public static Arbitrary<DeviceNormCase> Norms() => Arb.From(
        from rows in Gen.Choose(1, 6)
        from dim in Gen.Choose(1, 70)
        from eps in Gen.Elements(1e-6f, 1e-5f, 1e-3f)
        from flag in Gen.Elements(true, false)
        from inPlace in Gen.Elements(true, false)
        // A large common shift checks that the variance does not cancel catastrophically.
        from shift in Gen.Elements(0f, 0.5f, -20f)
        from offset in Gen.Choose(0, 3)
        from seed in Seeds
        select new DeviceNormCase(rows, dim, eps, flag, inPlace, shift, offset, seed));

    public static Arbitrary<DeviceRopeCase> Rope() => Arb.From(
        from rows in Gen.Choose(1, 6)
        from heads in Gen.Choose(1, 4)
        from halfDim in Gen.Choose(1, 40)
        from slack in Gen.Choose(0, 5)
        from theta in Gen.Elements(10000f, 500000f, 100f)
        from repeat in Gen.Elements(true, false)
        from seed in Seeds
        select new DeviceRopeCase(rows, heads, 2 * halfDim, slack, theta, repeat, seed));
}

[Collection(nameof(IlgpuCollection))]
public sealed class IlgpuVectorOpsTests(IlgpuFixture fixture)
{
    private static double GeluReference(double x) => 0.5 * x * (1 + Math.Tanh(Math.Sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));

    // As the CPU kernel tests: float rounding of the cubic argument (~1e-7 of |x|) and exp (1e-5 relative).
    private static double GeluTolerance(double expected, double x) => 1e-5 * Math.Abs(expected) + 1e-6 * Math.Abs(x) + 1e-30;

    [Property(Arbitrary = [typeof(DeviceVectorArbitraries)], MaxTest = 40)]
    public void Elementwise_operations_match_references(DeviceElementwiseCase c)
    {
        var backend = fixture.Backend;
        var random = new Random(c.Seed);
        float[] a = RandomFloats(random, c.Length, -c.Range, c.Range);
        float[] b = RandomFloats(random, c.Length, -4f, 4f);
        float factor = (float)(random.NextDouble() * 4 - 2);
        using var scope = new DeviceScope(backend);
        var aSpan = scope.Upload(a, c.Offset, slack: 1, fill: 777f).Slice(0, c.Length);
        var bSpan = scope.Upload(b, c.Offset).Slice(0, c.Length);
        DeviceSpan Output() => c.InPlace ? scope.Upload(a, c.Offset).Slice(0, c.Length) : scope.Upload(new float[c.Length], c.Offset, slack: 2, fill: 777f);

        var sum = Output();
        backend.Add(c.InPlace ? sum : aSpan, bSpan, sum);
        var scaled = Output();
        backend.Scale(c.InPlace ? scaled : aSpan, factor, scaled);
        var gelu = Output();
        backend.GeluTanh(c.InPlace ? gelu : aSpan, gelu);
        var geglu = Output();
        backend.GeluTanhMul(c.InPlace ? geglu : aSpan, bSpan, geglu);

        float[] sums = scope.Download(sum), products = scope.Download(scaled), gelus = scope.Download(gelu), geglus = scope.Download(geglu);
        for (int i = 0; i < c.Length; i++)
        {
            Assert.Equal(a[i] + b[i], sums[i]);
            Assert.Equal(a[i] * factor, products[i]);
            double expected = GeluReference(a[i]);
            AssertClose(expected, gelus[i], GeluTolerance(expected, a[i]), $"gelu({a[i]:R})");
            expected = GeluReference(a[i]) * b[i];
            AssertClose(expected, geglus[i], GeluTolerance(expected, a[i] * b[i]), $"gelu({a[i]:R}) * {b[i]:R}");
        }
        // Past the range nothing is written; the input's neighbour is untouched too.
        if (!c.InPlace)
            Assert.All([.. sums[c.Length..], .. products[c.Length..], .. gelus[c.Length..], .. geglus[c.Length..]], v => Assert.Equal(777f, v));
        Assert.Equal(777f, scope.Download(aSpan.Buffer.Slice(c.Offset + c.Length, 1))[0]);
    }

    [Property(Arbitrary = [typeof(DeviceVectorArbitraries)], MaxTest = 40)]
    public void Norms_match_double_references(DeviceNormCase c)
    {
        var backend = fixture.Backend;
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.Dim, -3f, 3f);
        for (int i = 0; i < x.Length; i++) x[i] += c.Shift;
        float[] gamma = RandomFloats(random, c.Dim, -2f, 2f);
        float[] beta = c.Flag ? RandomFloats(random, c.Dim, -1f, 1f) : [];
        using var scope = new DeviceScope(backend);

        // LayerNorm (Flag: with beta), RmsNorm (Flag: unit offset), each in place or into a separate range.
        var layerX = scope.Upload(x, c.Offset);
        var layerY = c.InPlace ? layerX : scope.Upload(new float[x.Length], c.Offset);
        backend.LayerNorm(layerX, layerY, c.Rows, c.Dim, scope.Upload(gamma, 1), c.Flag ? scope.Upload(beta) : default, c.Eps);
        var rmsX = scope.Upload(x, c.Offset);
        var rmsY = c.InPlace ? rmsX : scope.Upload(new float[x.Length], c.Offset);
        backend.RmsNorm(rmsX, rmsY, c.Rows, c.Dim, scope.Upload(gamma, 2), c.Eps, unitOffset: c.Flag);
        float[] layer = scope.Download(layerY), rms = scope.Download(rmsY);

        for (int r = 0; r < c.Rows; r++)
        {
            double mean = 0, variance = 0, meanSquare = 0;
            for (int i = 0; i < c.Dim; i++)
            {
                mean += x[r * c.Dim + i];
                meanSquare += Math.Pow(x[r * c.Dim + i], 2);
            }
            mean /= c.Dim;
            meanSquare /= c.Dim;
            for (int i = 0; i < c.Dim; i++) variance += Math.Pow(x[r * c.Dim + i] - mean, 2);
            variance /= c.Dim;
            double rstd = 1 / Math.Sqrt(variance + c.Eps), rmsScale = 1 / Math.Sqrt(meanSquare + c.Eps);
            for (int i = 0; i < c.Dim; i++)
            {
                double value = x[r * c.Dim + i];
                double normalized = (value - mean) * rstd;
                double shift = c.Flag ? beta[i] : 0;
                double scale = (Math.Abs(normalized) + Math.Abs(value) * rstd) * Math.Abs(gamma[i]) + Math.Abs(shift);
                AssertClose(normalized * gamma[i] + shift, layer[r * c.Dim + i], 1e-5 * scale + 1e-7, $"layernorm y[{r}, {i}]");

                double factor = c.Flag ? 1.0 + gamma[i] : gamma[i];
                AssertClose(value * rmsScale * factor, rms[r * c.Dim + i], 1e-5 * Math.Abs(value * rmsScale) * (Math.Abs(factor) + 1) + 1e-7, $"rmsnorm y[{r}, {i}]");
            }
        }
    }

    [Property(Arbitrary = [typeof(DeviceVectorArbitraries)], MaxTest = 30)]
    public void Rope_matches_float32_angle_reference_and_keys_its_tables_by_position(DeviceRopeCase c)
    {
        var backend = fixture.Backend;
        var random = new Random(c.Seed);
        int stride = c.Heads * c.HeadDim + c.StrideSlack;
        float[] x = RandomFloats(random, (c.Rows - 1) * stride + c.Heads * c.HeadDim, -2f, 2f);
        int[] positions = new int[c.Rows], others = new int[c.Rows];
        for (int r = 0; r < c.Rows; r++)
        {
            positions[r] = c.RepeatPositions && r > 0 && random.Next(2) == 0 ? positions[r - 1] : random.Next(0, 9000);
            others[r] = positions[r] + 1 + random.Next(100);
        }
        using var scope = new DeviceScope(backend);

        // The same positions twice around different ones: the third call reuses the cached table, the second must not,
        // nor the fourth (same positions, another base).
        var first = scope.Upload(x);
        var middle = scope.Upload(x);
        var last = scope.Upload(x);
        var otherBase = scope.Upload(x);
        backend.Rope(first, c.Rows, c.Heads, c.HeadDim, stride, positions, c.Theta);
        backend.Rope(middle, c.Rows, c.Heads, c.HeadDim, stride, others, c.Theta);
        backend.Rope(last, c.Rows, c.Heads, c.HeadDim, stride, positions, c.Theta);
        backend.Rope(otherBase, c.Rows, c.Heads, c.HeadDim, stride, positions, 2 * c.Theta);

        Verify(scope.Download(first), positions, c.Theta);
        Verify(scope.Download(middle), others, c.Theta);
        Verify(scope.Download(last), positions, c.Theta);
        Verify(scope.Download(otherBase), positions, 2 * c.Theta);

        void Verify(float[] rotated, int[] at, float theta) =>
            PaliGemma.CpuOnly.Tests.Kernels.RopeTests.AssertMatchesReference(x, rotated, c.Rows, c.Heads, c.HeadDim, stride, at, theta);
    }

    [Fact]
    public void Copy_moves_ranges_between_and_within_buffers()
    {
        var backend = fixture.Backend;
        float[] values = Enumerable.Range(0, 40).Select(i => (float)i).ToArray();
        using var scope = new DeviceScope(backend);
        var source = scope.Upload(values);
        var target = scope.Zeros(50);

        backend.Copy(source.Slice(3, 20), target.Slice(7, 20));
        float[] copied = scope.Download(target);
        for (int i = 0; i < 50; i++)
            Assert.Equal(i >= 7 && i < 27 ? i - 4 : 0f, copied[i]);

        // Overlapping ranges of one buffer behave like memmove, in both directions.
        backend.Copy(source.Slice(0, 30), source.Slice(5, 30));
        float[] forward = (float[])values.Clone();
        Array.Copy(forward, 0, forward, 5, 30);
        Assert.Equal(forward, scope.Download(source));
        backend.Copy(source.Slice(6, 30), source.Slice(2, 30));
        Array.Copy(forward, 6, forward, 2, 30);
        Assert.Equal(forward, scope.Download(source));

        Assert.Equal("destination", Assert.Throws<ArgumentException>(() => backend.Copy(source.Slice(0, 3), target.Slice(0, 4))).ParamName);
    }
}
