using System.Runtime.CompilerServices;
using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Lora;

public sealed record LowRankCase(int Rows, int In, int Out, int Rank, float Scaling, int Seed);

public static class LowRankArbitraries
{
    // Rows on both sides of the GEMM switch (4), ranks that are and are not multiples of the four-row groups,
    // widths that leave vector tails.
    public static Arbitrary<LowRankCase> Cases() => Arb.From(
        from rows in Gen.Choose(1, 9)
        from inFeatures in Gen.Choose(1, 90)
        from outFeatures in Gen.Choose(1, 110)
        from rank in Gen.Choose(1, 11)
        from scaling in Gen.Elements(0.5f, 1f, 2f, 2.828427f)
        from seed in Seeds
        select new LowRankCase(rows, inFeatures, outFeatures, rank, scaling, seed));
}

/// <summary>
/// The run-time LoRA delta y += s·(x·Aᵀ)·Bᵀ (<see cref="LoraModule"/>'s AddDelta, reached through its internal
/// constructor) against a double-precision reference, on odd shapes and on shapes large enough to run multi-threaded.
/// </summary>
public sealed unsafe class LowRankDeltaTests
{
    [UnsafeAccessor(UnsafeAccessorKind.Constructor)]
    private static extern LoraModule NewModule(string name, Linear target, float[] pinnedA, float[] bTransposed, int rank, float scaling);

    [UnsafeAccessor(UnsafeAccessorKind.Method, Name = "AddDelta")]
    private static extern void AddDelta(LoraModule module, ReadOnlySpan<float> x, int rows, Span<float> y);

    // The module only takes its layer's shape; the layer's weight is never read, so one float stands in for it.
    private static readonly float[] s_placeholderWeight = GC.AllocateArray<float>(1, pinned: true);

    [Property(Arbitrary = [typeof(LowRankArbitraries)], MaxTest = 200)]
    public void AddDelta_matches_double_reference(LowRankCase c) => Check(c.Rows, c.In, c.Out, c.Rank, c.Scaling, c.Seed);

    // Above the threads' threshold in the up pass (one row: a column range per thread; several: column blocks),
    // the down pass (A row groups per thread) or both; odd sizes leave vector and block tails.
    [Theory]
    [InlineData(1, 2051, 131101, 8)]
    [InlineData(1, 131101, 2049, 8)]
    [InlineData(2, 75001, 75003, 7)]
    [InlineData(3, 4099, 70001, 5)]
    [InlineData(37, 301, 3603, 8)]
    [InlineData(1, 65537, 257, 16)]
    public void AddDelta_matches_double_reference_on_parallel_shapes(int rows, int inFeatures, int outFeatures, int rank) =>
        Check(rows, inFeatures, outFeatures, rank, 2f, seed: rows * 7919 + inFeatures);

    /// <summary>
    /// Each output is computed by the same code in the same order whichever thread runs it and however many rows share
    /// the call (below the GEMM switch): three rows at once, above the threshold for threads, equal three single-row calls below it.
    /// </summary>
    [Theory]
    [InlineData(3, 256, 50001, 8)]     // up pass: 3 rows threaded, 1 row not
    [InlineData(3, 50001, 256, 8)]     // down pass: likewise
    public void Rows_together_and_one_at_a_time_give_the_same_bits(int rows, int inFeatures, int outFeatures, int rank)
    {
        var random = new Random(11);
        var module = RandomModule(random, inFeatures, outFeatures, rank, 2f);
        float[] x = RandomFloats(random, rows * inFeatures, -1f, 1f);
        float[] start = RandomFloats(random, rows * outFeatures, -1f, 1f);
        float[] together = (float[])start.Clone(), separately = (float[])start.Clone();
        AddDelta(module, x, rows, together);
        for (int m = 0; m < rows; m++)
            AddDelta(module, x.AsSpan(m * inFeatures, inFeatures), 1, separately.AsSpan(m * outFeatures, outFeatures));
        Assert.Equal(separately, together);
    }

    [Theory]
    [InlineData(1, 2048, 256, 8)]      // decode shapes on one thread: scratch on the stack
    [InlineData(3, 300, 700, 8)]
    [InlineData(40, 64, 96, 8)]        // x·Aᵀ too large for the stack: the shared pool
    public void A_call_on_one_thread_allocates_nothing(int rows, int inFeatures, int outFeatures, int rank)
    {
        var random = new Random(3);
        var module = RandomModule(random, inFeatures, outFeatures, rank, 1f);
        float[] x = RandomFloats(random, rows * inFeatures, -1f, 1f);
        float[] y = new float[rows * outFeatures];
        AddDelta(module, x, rows, y);   // warm the pool
        long before = GC.GetAllocatedBytesForCurrentThread();
        AddDelta(module, x, rows, y);
        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }

    [Fact]
    public void Short_operands_are_rejected_with_the_module_name()
    {
        var module = RandomModule(new Random(1), 10, 20, 4, 1f);
        var x = new float[2 * 10];
        var y = new float[2 * 20];
        var shortX = Assert.Throws<ArgumentException>(() => AddDelta(module, x.AsSpan(0, 19), 2, y));
        Assert.Equal("x", shortX.ParamName);
        Assert.Contains("test.proj", shortX.Message);
        var shortY = Assert.Throws<ArgumentException>(() => AddDelta(module, x, 2, y.AsSpan(0, 39)));
        Assert.Equal("y", shortY.ParamName);
        Assert.Throws<ArgumentOutOfRangeException>(() => AddDelta(module, x, -1, y));
        AddDelta(module, default, 0, default);   // no rows: nothing to do
    }

    private static LoraModule RandomModule(Random random, int inFeatures, int outFeatures, int rank, float scaling)
    {
        float[] a = GC.AllocateArray<float>(rank * inFeatures, pinned: true);
        RandomFloats(random, a.Length, -1f, 1f).CopyTo(a, 0);
        float[] bTransposed = GC.AllocateArray<float>(rank * outFeatures, pinned: true);
        RandomFloats(random, bTransposed.Length, -1f, 1f).CopyTo(bTransposed, 0);
        fixed (float* placeholder = s_placeholderWeight)
        {
            var layer = new Linear(new WeightMatrix(placeholder, DType.F32, outFeatures, inFeatures), null, "test.proj");
            return NewModule("test.proj", layer, a, bTransposed, rank, scaling);
        }
    }

    private static void Check(int rows, int inFeatures, int outFeatures, int rank, float scaling, int seed)
    {
        var random = new Random(seed);
        var module = RandomModule(random, inFeatures, outFeatures, rank, scaling);
        float[] x = RandomFloats(random, rows * inFeatures, -2f, 2f);
        // One row of slack after the output must stay untouched.
        float[] y = new float[(rows + 1) * outFeatures];
        float[] start = RandomFloats(random, rows * outFeatures, -3f, 3f);
        start.CopyTo(y, 0);
        Array.Fill(y, 12345f, rows * outFeatures, outFeatures);

        AddDelta(module, x, rows, y);

        // Rounding bound for a sum of products taken in any order: γ(n)·Σ|terms| with γ(n) = n·u/(1 - n·u), u = 2⁻²⁴; the
        // scaled product and the addition to y add one rounding each.
        const double u = 1.0 / (1 << 24);
        int chain = inFeatures + rank + 2;
        double gamma = chain * u / (1 - chain * u);
        var a = module.A;
        var bT = module.BTransposed;
        var down = new double[rank];
        var downMagnitude = new double[rank];
        for (int m = 0; m < rows; m++)
        {
            for (int j = 0; j < rank; j++)
            {
                double sum = 0, magnitude = 0;
                for (int k = 0; k < inFeatures; k++)
                {
                    double product = (double)x[m * inFeatures + k] * a[j * inFeatures + k];
                    sum += product;
                    magnitude += Math.Abs(product);
                }
                down[j] = sum;
                downMagnitude[j] = magnitude;
            }
            for (int n = 0; n < outFeatures; n++)
            {
                double delta = 0, magnitude = 0;
                for (int j = 0; j < rank; j++)
                {
                    delta += down[j] * bT[j * outFeatures + n];
                    magnitude += downMagnitude[j] * Math.Abs(bT[j * outFeatures + n]);
                }
                double expected = start[m * outFeatures + n] + scaling * delta;
                double tolerance = 1.01 * gamma * scaling * magnitude + 2 * u * Math.Abs(expected) + 1e-30;
                AssertClose(expected, y[m * outFeatures + n], tolerance, $"y[{m}, {n}] ({rows} rows, {inFeatures} -> r {rank} -> {outFeatures})");
            }
        }
        for (int i = rows * outFeatures; i < y.Length; i++)
            Assert.Equal(12345f, y[i]);
    }
}
