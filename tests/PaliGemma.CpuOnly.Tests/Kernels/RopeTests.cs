using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public sealed record RopeCase(int Rows, int Heads, int HeadDim, int StrideSlack, float Theta, bool RepeatPositions, Width Width, int Seed);

public static class RopeArbitraries
{
    public static Arbitrary<RopeCase> Cases() => Arb.From(
        from rows in Gen.Choose(1, 6)
        from heads in Gen.Choose(1, 4)
        from halfDim in Gen.Choose(1, 40)
        from slack in Gen.Choose(0, 5)
        from theta in Gen.Elements(10000f, 500000f, 100f)
        from repeat in Gen.Elements(true, false)
        from width in Widths
        from seed in Seeds
        select new RopeCase(rows, heads, 2 * halfDim, slack, theta, repeat, width, seed));
}

public sealed class RopeTests
{
    [Property(Arbitrary = [typeof(RopeArbitraries)], MaxTest = 100)]
    public void Apply_matches_float32_angle_reference(RopeCase c)
    {
        var random = new Random(c.Seed);
        int stride = c.Heads * c.HeadDim + c.StrideSlack;
        float[] x = RandomFloats(random, (c.Rows - 1) * stride + c.Heads * c.HeadDim, -2f, 2f);
        float[] original = (float[])x.Clone();
        int[] positions = new int[c.Rows];
        for (int r = 0; r < c.Rows; r++)
            positions[r] = c.RepeatPositions && r > 0 && random.Next(2) == 0 ? positions[r - 1] : random.Next(0, 9000);

        Rope.Apply(x, c.Rows, c.Heads, c.HeadDim, stride, positions, c.Theta, c.Width.ToSimd());

        AssertMatchesReference(original, x, c.Rows, c.Heads, c.HeadDim, stride, positions, c.Theta);
    }

    /// <summary>
    /// Scalar reference of rotate-half RoPE with Hugging Face's float32 angles, against <paramref name="rotated"/>; the gap
    /// between rows must be untouched. Shared by every backend's RoPE tests.
    /// </summary>
    internal static void AssertMatchesReference(float[] original, ReadOnlySpan<float> rotated, int rows, int heads, int headDim, int stride,
        ReadOnlySpan<int> positions, float theta)
    {
        int half = headDim / 2;
        for (int r = 0; r < rows; r++)
        {
            for (int i = 0; i < half; i++)
            {
                // Hugging Face: float32 inv_freq = 1 / theta^(2i/d), float32 angle = position * inv_freq; cos/sin of that float.
                float invFreq = 1f / MathF.Pow(theta, (2 * i) / (float)headDim);
                float angle = positions[r] * invFreq;
                double cos = (float)Math.Cos(angle), sin = (float)Math.Sin(angle);
                for (int h = 0; h < heads; h++)
                {
                    int lo = r * stride + h * headDim + i, hi = lo + half;
                    double a = original[lo], b = original[hi];
                    double tolerance = 1e-6 * (Math.Abs(a) + Math.Abs(b));
                    AssertClose(a * cos - b * sin, rotated[lo], tolerance, $"row {r} head {h} i {i} (position {positions[r]})");
                    AssertClose(b * cos + a * sin, rotated[hi], tolerance, $"row {r} head {h} i {i + half} (position {positions[r]})");
                }
            }
            // The gap between rows is not touched.
            for (int j = heads * headDim; j < stride && r * stride + j < original.Length; j++)
                Assert.Equal(original[r * stride + j], rotated[r * stride + j]);
        }
    }

    [Fact]
    public void Position_zero_is_the_identity_and_angles_are_float32()
    {
        float[] x = [1f, 2f, 3f, 4f, 5f, 6f, 7f, 8f];
        Rope.Apply(x, 1, 1, 8, 8, [0], 10000f);
        Assert.Equal([1f, 2f, 3f, 4f, 5f, 6f, 7f, 8f], x);

        // At a large position the float32 angle differs from the exact one by far more than float rounding of the result.
        const int position = 8191;
        float[] y = [1f, 0f];
        Rope.Apply(y, 1, 1, 2, 2, [position], 10000f);
        float angle = position * 1f;
        Assert.Equal((float)Math.Cos(angle), y[0]);
        Assert.Equal((float)Math.Sin(angle), y[1]);
    }

    // The cos/sin table of the last call is kept per thread: back-to-back calls that agree or differ in one position, the
    // base or the head size must each rotate by their own angles.
    [Property(Arbitrary = [typeof(RopeArbitraries)], MaxTest = 50)]
    public void Apply_after_another_call_uses_its_own_angles(RopeCase c, bool samePositions, bool sameTheta, bool sameHeadDim)
    {
        var random = new Random(c.Seed);
        int stride = c.Heads * c.HeadDim + c.StrideSlack;
        int[] positions = Enumerable.Range(0, c.Rows).Select(_ => random.Next(0, 9000)).ToArray();
        float[] first = RandomFloats(random, (c.Rows - 1) * stride + c.Heads * c.HeadDim, -2f, 2f);
        Rope.Apply(first, c.Rows, c.Heads, c.HeadDim, stride, positions, c.Theta, c.Width.ToSimd());

        int[] next = (int[])positions.Clone();
        if (!samePositions)
            next[random.Next(next.Length)] += 1 + random.Next(3);
        float theta = sameTheta ? c.Theta : c.Theta * 1.5f;
        int headDim = sameHeadDim ? c.HeadDim : c.HeadDim + 2;
        stride = c.Heads * headDim + c.StrideSlack;
        float[] x = RandomFloats(random, (c.Rows - 1) * stride + c.Heads * headDim, -2f, 2f);
        float[] original = (float[])x.Clone();
        Rope.Apply(x, c.Rows, c.Heads, headDim, stride, next, theta, c.Width.ToSimd());
        AssertMatchesReference(original, x, c.Rows, c.Heads, headDim, stride, next, theta);
    }

    // More rows than one cos/sin table holds (2^19 floats: 2048 rows of head size 512): the rows go in table-sized chunks.
    [Fact]
    public void Apply_covers_more_rows_than_one_table_holds()
    {
        const int rows = 2051, headDim = 512;
        var random = new Random(7);
        int[] positions = Enumerable.Range(0, rows).Select(_ => random.Next(0, 9000)).ToArray();
        float[] x = RandomFloats(random, rows * headDim, -2f, 2f);
        float[] original = (float[])x.Clone();
        Rope.Apply(x, rows, 1, headDim, headDim, positions, 10000f);
        AssertMatchesReference(original, x, rows, 1, headDim, headDim, positions, 10000f);
    }

    [Fact]
    public void Apply_rejects_bad_arguments()
    {
        float[] x = new float[16];
        Assert.Equal("headDim", Assert.Throws<ArgumentException>(() => Rope.Apply(x, 2, 1, 7, 8, [0, 1], 10000f)).ParamName);
        Assert.Equal("rowStride", Assert.Throws<ArgumentException>(() => Rope.Apply(x, 2, 2, 4, 7, [0, 1], 10000f)).ParamName);
        Assert.Equal("positions", Assert.Throws<ArgumentException>(() => Rope.Apply(x, 2, 1, 8, 8, [0], 10000f)).ParamName);
        Assert.Equal("x", Assert.Throws<ArgumentException>(() => Rope.Apply(x, 3, 1, 8, 8, [0, 1, 2], 10000f)).ParamName);
        Assert.Equal("theta", Assert.Throws<ArgumentOutOfRangeException>(() => Rope.Apply(x, 2, 1, 8, 8, [0, 1], 0f)).ParamName);
    }
}
