using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public sealed record GemvCase(int Rows, int K, int N, DType DType, bool Bias, float SoftCap, Width Width, int Seed);

public static class GemvArbitraries
{
    // K up to 200 covers no whole pair of vectors, one or several pairs (2 x 16 at Vector512) and every tail length;
    // N up to 41 splits the rows into four lanes of every length pattern (the last lanes short or empty).
    public static Arbitrary<GemvCase> Cases() => Arb.From(
        from rows in Gen.Choose(1, 4)
        from k in Gen.Choose(1, 200)
        from n in Gen.Choose(1, 41)
        from dtype in Gen.Elements(DType.F32, DType.BF16, DType.F16)
        from bias in Gen.Elements(true, false)
        from softCap in Gen.Elements(0f, 0f, 3f)
        from width in Widths
        from seed in Seeds
        select new GemvCase(rows, k, n, dtype, bias, softCap, width, seed));
}

/// <summary>The decode GEMV (1 to 4 x rows) against a double-precision reference, at every vector width.</summary>
public sealed unsafe class GemvTests
{
    [Property(Arbitrary = [typeof(GemvArbitraries)], MaxTest = 300)]
    public void Multiply_matches_double_reference(GemvCase c) =>
        Check(c.Rows, c.K, c.N, c.DType, c.Bias, c.SoftCap, c.Width, c.Seed);

    // Large enough (2 MB and more) to be cut into chunks for the worker pool (rows of each chunk a multiple of four, the
    // last chunk short, so its lanes are uneven), with K tails after the paired vectors and prefetches that run past the
    // end of the matrix.
    [Theory]
    [InlineData(1, 2100, 517, DType.BF16)]
    [InlineData(2, 1037, 520, DType.F32)]
    [InlineData(3, 333, 3203, DType.F16)]
    [InlineData(4, 4099, 263, DType.BF16)]
    [InlineData(1, 64, 16411, DType.BF16)]
    [InlineData(1, 4099, 259, DType.BF16)]
    [InlineData(1, 5000, 211, DType.F16)]
    [InlineData(1, 4160, 130, DType.F32)]
    public void Multiply_matches_reference_when_split_over_threads(int rows, int k, int n, DType dtype)
    {
        int before = KernelThreading.MaxThreads;
        KernelThreading.MaxThreads = 2;
        try
        {
            Assert.True(Gemv.ChunkCount((long)n * k * dtype.SizeOf(), n, 2) > 1, "the shape should be split over threads");
            Check(rows, k, n, dtype, bias: true, softCap: 0f, width: null, seed: rows * 31 + k);
            Check(rows, k, n, dtype, bias: false, softCap: 5f, width: null, seed: rows * 37 + n);
        }
        finally
        {
            KernelThreading.MaxThreads = before;
        }
    }

    [Fact]
    public void Small_matrices_stay_on_the_calling_thread()
    {
        Assert.Equal(1, Gemv.ChunkCount(256L * 2048 * 2, 256, 2));        // Gemma's k/v projection, 1 MB
        Assert.True(Gemv.ChunkCount(2048L * 2048 * 2, 2048, 2) > 1);      // q/o, 8 MB
        Assert.Equal(1, Gemv.ChunkCount(2048L * 2048 * 2, 2048, 1));      // one thread allowed
        Assert.InRange(Gemv.ChunkCount(16384L * 2048 * 2, 16384, 2), 2, 16384 / 4);
    }

    [Fact]
    public void MatMul_sends_one_to_four_rows_here_and_the_gemv_takes_no_other_row_count()
    {
        var weights = new float[6];
        fixed (float* wp = weights)
        {
            var w = new WeightMatrix(wp, DType.F32, 2, 3);
            var y = new float[10];
            Assert.Equal("rows", Assert.Throws<ArgumentOutOfRangeException>(() => Gemv.Multiply(new float[15], 5, w, default, y, Width.V128.ToSimd(), 0f)).ParamName);
            Assert.Equal("rows", Assert.Throws<ArgumentOutOfRangeException>(() => Gemv.Multiply(new float[3], 0, w, default, y, Width.V128.ToSimd(), 0f)).ParamName);
            Assert.Equal("x", Assert.Throws<ArgumentException>(() => Gemv.Multiply(new float[5], 2, w, default, y, Width.V128.ToSimd(), 0f)).ParamName);
            Assert.Equal("y", Assert.Throws<ArgumentException>(() => Gemv.Multiply(new float[6], 2, w, default, new float[3], Width.V128.ToSimd(), 0f)).ParamName);
            Assert.Equal("w", Assert.Throws<ArgumentException>(() => Gemv.Multiply(new float[6], 2, default(WeightMatrix), default, y, Width.V128.ToSimd(), 0f)).ParamName);
        }
    }

    private static void Check(int rows, int k, int n, DType dtype, bool bias, float softCap, Width? width, int seed)
    {
        var random = new Random(seed);
        // x is longer than rows * k: the kernel must read only its rows.
        float[] x = RandomFloats(random, rows * k + 3, -2f, 2f);
        var (bytes, decoded) = EncodeWeights(RandomFloats(random, n * k, -2f, 2f), dtype);
        float[] b = bias ? RandomFloats(random, n, -3f, 3f) : [];
        // One extra row of slack in y must stay untouched.
        var y = new float[(rows + 1) * n];
        Array.Fill(y, 12345f);

        fixed (byte* wp = bytes)
        {
            var w = new WeightMatrix(wp, dtype, n, k);
            if (width is { } chosen)
                Gemv.Multiply(x, rows, w, b, y, chosen.ToSimd(), softCap);
            else if (softCap > 0f)
                MatMul.Multiply(x, rows, w, b, y, softCap);
            else
                MatMul.Multiply(x, rows, w, b, y);
        }

        MatMulTests.AssertMatchesReference(x, rows, k, n, decoded, b, softCap, y, $"{rows}x{k} * {n}x{k} {dtype} bias {bias} cap {softCap} {width}");
    }
}
