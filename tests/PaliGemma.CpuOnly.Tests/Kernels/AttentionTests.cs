using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public enum MaskKind
{
    Full,
    /// <summary>PaliGemma prefix-LM: the first Prefix keys are seen by everyone, later ones causally.</summary>
    PrefixCausal,
    /// <summary>Causal with a sliding window (Gemma 2 local layers).</summary>
    SlidingWindow,
    /// <summary>Arbitrary ranges, some empty.</summary>
    Random,
}

public sealed record AttentionCase(
    int Queries, int Keys, int Heads, int KvHeads, int HeadDim, int QSlack, int KvSlack,
    MaskKind Mask, bool Padding, float SoftCap, float Scale, Width Width, int Seed);

public static class AttentionArbitraries
{
    public static Arbitrary<AttentionCase> Cases() => Arb.From(
        from queries in Gen.Choose(1, 20)
        from keys in Gen.Frequency((1, Gen.Constant(0)), (6, Gen.Choose(1, 150)))
        from heads in Gen.Elements((1, 1), (3, 3), (2, 2), (4, 2), (6, 2), (6, 3), (4, 1), (5, 1), (8, 1))
        from headDim in Gen.Choose(1, 40)
        from qSlack in Gen.Choose(0, 3)
        from kvSlack in Gen.Choose(0, 3)
        from mask in Gen.Elements(MaskKind.Full, MaskKind.PrefixCausal, MaskKind.SlidingWindow, MaskKind.Random)
        from padding in Gen.Elements(true, false)
        from softCap in Gen.Elements(0f, 0f, 1.5f, 5f, 50f)
        from scale in Gen.Elements(0.125f, 0.35f, 1f, 2f)
        from width in Widths
        from seed in Seeds
        select new AttentionCase(queries, keys, heads.Item1, heads.Item2, headDim, qSlack, kvSlack, mask, padding, softCap, scale, width, seed));
}

public static class SharedKeyArbitraries
{
    /// <summary>
    /// Prefill and vision shapes: more queries than one block holds, so several query blocks of a kv head read its key
    /// blocks packed once and shared (an odd last query block, key blocks past some queries' ranges, tails of every width).
    /// </summary>
    public static Arbitrary<AttentionCase> Cases() => Arb.From(
        from queries in Gen.Choose(40, 140)
        from keys in Gen.Frequency((1, Gen.Constant(0)), (6, Gen.Choose(1, 150)))
        from heads in Gen.Elements((1, 1), (2, 2), (3, 3), (2, 1), (4, 2), (8, 1))
        from headDim in Gen.Frequency((4, Gen.Choose(1, 40)), (1, Gen.Constant(72)), (1, Gen.Choose(65, 80)))
        from qSlack in Gen.Choose(0, 3)
        from kvSlack in Gen.Choose(0, 3)
        from mask in Gen.Elements(MaskKind.Full, MaskKind.PrefixCausal, MaskKind.SlidingWindow, MaskKind.Random)
        from padding in Gen.Elements(true, false)
        from softCap in Gen.Elements(0f, 0f, 5f)
        from scale in Gen.Elements(0.125f, 0.35f, 1f)
        from width in Widths
        from seed in Seeds
        select new AttentionCase(queries, keys, heads.Item1, heads.Item2, headDim, qSlack, kvSlack, mask, padding, softCap, scale, width, seed));
}

public sealed class AttentionTests
{
    [Property(Arbitrary = [typeof(AttentionArbitraries)], MaxTest = 150)]
    public void Forward_matches_double_softmax_reference(AttentionCase c) => Check(c, useWidth: true);

    [Property(Arbitrary = [typeof(AttentionArbitraries)], MaxTest = 30)]
    public void Public_entry_point_matches_double_softmax_reference(AttentionCase c) => Check(c, useWidth: false);

    [Property(Arbitrary = [typeof(SharedKeyArbitraries)], MaxTest = 40)]
    public void Shared_key_blocks_match_double_softmax_reference(AttentionCase c) => Check(c, useWidth: true);

    // Each work item's key range cut into chunks of an odd number of keys, merged from partial softmaxes.
    [Property(Arbitrary = [typeof(AttentionArbitraries)], MaxTest = 100)]
    public void Split_key_ranges_match_double_softmax_reference(AttentionCase c, PositiveInt chunkKeys) =>
        Check(c, useWidth: true, splitKeys: 1 + chunkKeys.Get % 70);

    // Several query blocks and key blocks per work item, enough work to run multi-threaded; the decode shapes (one
    // query, few kv heads, many keys) take the split-key path whenever there is more than one thread.
    [Theory]
    [InlineData(150, 200, 4, 4, 72, MaskKind.PrefixCausal, 0f)]
    [InlineData(70, 300, 8, 1, 64, MaskKind.SlidingWindow, 50f)]
    [InlineData(1, 500, 8, 4, 256, MaskKind.Full, 30f)]
    [InlineData(1, 4133, 8, 1, 256, MaskKind.Full, 0f)]
    [InlineData(1, 2999, 8, 1, 256, MaskKind.PrefixCausal, 30f)]
    [InlineData(3, 1700, 8, 2, 200, MaskKind.Random, 0f)]
    public void Forward_matches_reference_on_larger_problems(int queries, int keys, int heads, int kvHeads, int headDim, MaskKind mask, float softCap) =>
        Check(new AttentionCase(queries, keys, heads, kvHeads, headDim, 1, 2, mask, true, softCap, 1f / MathF.Sqrt(headDim), Width.V512, queries + keys), useWidth: false);

    private static void Check(AttentionCase c, bool useWidth, int splitKeys = 0)
    {
        var random = new Random(c.Seed);
        int d = c.HeadDim;
        int qStride = c.Heads * d + c.QSlack, kvStride = c.KvHeads * d + c.KvSlack;
        float[] q = RandomFloats(random, c.Queries * qStride, -1.5f, 1.5f);
        float[] k = RandomFloats(random, Math.Max(0, c.Keys * kvStride), -1.5f, 1.5f);
        float[] v = RandomFloats(random, Math.Max(0, c.Keys * kvStride), -2f, 2f);
        var (start, end) = MakeRanges(c, random);
        byte[] valid = c.Padding ? Enumerable.Range(0, c.Keys).Select(_ => (byte)(random.Next(5) == 0 ? 0 : 1 + random.Next(3))).ToArray() : [];
        float[] output = new float[c.Queries * c.Heads * d];
        Array.Fill(output, float.NaN);

        var problem = new AttentionProblem
        {
            Q = q, QRowStride = qStride, Queries = c.Queries,
            K = k, V = v, KvRowStride = kvStride, Keys = c.Keys,
            Heads = c.Heads, KvHeads = c.KvHeads, HeadDim = d,
            Scale = c.Scale, LogitSoftCap = c.SoftCap,
            KeyStart = start, KeyEnd = end, KeyValid = valid,
            Output = output,
        };
        if (useWidth)
            Attention.Forward(problem, c.Width.ToSimd(), splitKeys);
        else
            Attention.Forward(problem);

        AssertMatchesReference(q, qStride, k, v, kvStride, c.Queries, c.Keys, c.Heads, c.KvHeads, d, c.Scale, c.SoftCap,
            start, end, c.Padding ? valid : null, output, c.ToString());
    }

    /// <summary>
    /// The scalar reference (fp64 softmax over each query's visible, unmasked keys) against <paramref name="output"/>
    /// [queries, heads·d]; a query that sees no key must be exactly 0. Shared by every backend's attention tests.
    /// </summary>
    internal static void AssertMatchesReference(float[] q, int qStride, float[] k, float[] v, int kvStride, int queries, int keys,
        int heads, int kvHeads, int d, float scale, float softCap, int[] start, int[] end, byte[]? valid, ReadOnlySpan<float> output, string what)
    {
        int group = heads / kvHeads;
        var weights = new double[keys];
        for (int i = 0; i < queries; i++)
        {
            for (int h = 0; h < heads; h++)
            {
                int g = h / group;
                double max = double.NegativeInfinity;
                for (int j = 0; j < keys; j++)
                {
                    weights[j] = double.NegativeInfinity;
                    if (j < start[i] || j >= end[i] || (valid is not null && valid[j] == 0))
                        continue;
                    double score = 0;
                    for (int e = 0; e < d; e++)
                        score += (double)q[i * qStride + h * d + e] * k[j * kvStride + g * d + e];
                    score *= scale;
                    if (softCap > 0)
                        score = softCap * Math.Tanh(score / softCap);
                    weights[j] = score;
                    max = Math.Max(max, score);
                }
                double total = 0;
                for (int j = 0; j < keys; j++)
                {
                    weights[j] = double.IsNegativeInfinity(weights[j]) ? 0 : Math.Exp(weights[j] - max);
                    total += weights[j];
                }
                for (int e = 0; e < d; e++)
                {
                    double expected = 0, magnitude = 0;
                    for (int j = 0; j < keys; j++)
                    {
                        if (weights[j] == 0) continue;
                        expected += weights[j] / total * v[j * kvStride + g * d + e];
                        magnitude = Math.Max(magnitude, Math.Abs(v[j * kvStride + g * d + e]));
                    }
                    float actual = output[i * heads * d + h * d + e];
                    if (total == 0)
                        Assert.True(actual == 0f, $"query {i} head {h} sees no key and must be 0, got {actual}");
                    else
                        AssertClose(expected, actual, 1e-5 * magnitude, $"out[query {i}, head {h}, {e}] ({what})");
                }
            }
        }
    }

    private static (int[] Start, int[] End) MakeRanges(AttentionCase c, Random random) => MakeRanges(c.Mask, c.Queries, c.Keys, random);

    /// <summary>Per-query visible key ranges of a mask kind; the queries are the last positions of the key sequence.</summary>
    internal static (int[] Start, int[] End) MakeRanges(MaskKind mask, int queries, int keys, Random random)
    {
        var start = new int[queries];
        var end = new int[queries];
        int prefix = random.Next(0, keys + 1);
        int window = random.Next(1, 40);
        for (int i = 0; i < queries; i++)
        {
            // Queries are the last Queries positions of the key sequence (prefill of a suffix or decode).
            int position = keys - queries + i;
            switch (mask)
            {
                case MaskKind.Full:
                    start[i] = 0; end[i] = keys;
                    break;
                case MaskKind.PrefixCausal:
                    start[i] = 0; end[i] = Math.Clamp(Math.Max(prefix, position + 1), 0, keys);
                    break;
                case MaskKind.SlidingWindow:
                    end[i] = Math.Clamp(position + 1, 0, keys); start[i] = Math.Max(0, end[i] - window);
                    break;
                default:
                    start[i] = random.Next(0, keys + 1); end[i] = random.Next(0, keys + 1);
                    break;
            }
        }
        return (start, end);
    }

    [Fact]
    public void Forward_rejects_bad_problems()
    {
        static AttentionProblem Valid(float[] q, float[] kv, int[] start, int[] end, float[] output) => new()
        {
            Q = q, QRowStride = 8, Queries = 2,
            K = kv, V = kv, KvRowStride = 4, Keys = 3,
            Heads = 2, KvHeads = 1, HeadDim = 4, Scale = 0.5f,
            KeyStart = start, KeyEnd = end, Output = output,
        };
        float[] q = new float[16], kv = new float[12], output = new float[16];
        int[] start = [0, 0], end = [3, 3];

        static string? ParamName(Action action) => Assert.ThrowsAny<ArgumentException>(action).ParamName;

        Attention.Forward(Valid(q, kv, start, end, output));   // the baseline is accepted
        Assert.Equal("problem.KvHeads", ParamName(() => { var p = Valid(q, kv, start, end, output); p.KvHeads = 3; p.Heads = 2; Attention.Forward(p); }));
        Assert.Equal("problem.Q", ParamName(() => { var p = Valid(q, kv, start, end, output); p.Q = new float[15]; Attention.Forward(p); }));
        Assert.Equal("problem.K", ParamName(() => { var p = Valid(q, kv, start, end, output); p.K = new float[11]; Attention.Forward(p); }));
        Assert.Equal("problem.V", ParamName(() => { var p = Valid(q, kv, start, end, output); p.V = new float[8]; Attention.Forward(p); }));
        Assert.Equal("problem.Output", ParamName(() => { var p = Valid(q, kv, start, end, output); p.Output = new float[15]; Attention.Forward(p); }));
        Assert.Equal("problem.KeyStart", ParamName(() => { var p = Valid(q, kv, start, end, output); p.KeyStart = new int[1]; Attention.Forward(p); }));
        Assert.Equal("problem.KeyEnd", ParamName(() => { var p = Valid(q, kv, start, end, output); p.KeyEnd = new[] { 3, 4 }; Attention.Forward(p); }));
        Assert.Equal("problem.KeyValid", ParamName(() => { var p = Valid(q, kv, start, end, output); p.KeyValid = new byte[2]; Attention.Forward(p); }));
        Assert.Equal("problem.QRowStride", ParamName(() => { var p = Valid(q, kv, start, end, output); p.QRowStride = 7; Attention.Forward(p); }));
        Assert.Equal("problem.LogitSoftCap", ParamName(() => { var p = Valid(q, kv, start, end, output); p.LogitSoftCap = -1f; Attention.Forward(p); }));
    }
}
