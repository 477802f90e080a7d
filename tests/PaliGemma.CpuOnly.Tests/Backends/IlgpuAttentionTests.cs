using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Tests.Kernels;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Backends;

public sealed record DeviceAttentionCase(
    int Queries, int Keys, int Heads, int KvHeads, int HeadDim, int QSlack, int KvSlack,
    MaskKind Mask, bool Padding, float SoftCap, float Scale, int Seed);

public static class DeviceAttentionArbitraries
{
    public static Arbitrary<DeviceAttentionCase> Cases() => Arb.From(
        from queries in Gen.Choose(1, 6)
        from keys in Gen.Frequency((1, Gen.Constant(0)), (6, Gen.Choose(1, 40)))
        from heads in Gen.Elements((1, 1), (3, 3), (2, 2), (4, 2), (6, 3), (4, 1), (5, 1))
        from headDim in Gen.Choose(1, 40)
        from qSlack in Gen.Choose(0, 3)
        from kvSlack in Gen.Choose(0, 3)
        from mask in Gen.Elements(MaskKind.Full, MaskKind.PrefixCausal, MaskKind.SlidingWindow, MaskKind.Random)
        from padding in Gen.Elements(true, false)
        from softCap in Gen.Elements(0f, 0f, 1.5f, 5f, 50f)
        from scale in Gen.Elements(0.125f, 0.35f, 1f, 2f)
        from seed in Seeds
        select new DeviceAttentionCase(queries, keys, heads.Item1, heads.Item2, headDim, qSlack, kvSlack, mask, padding, softCap, scale, seed));
}

[Collection(nameof(IlgpuCollection))]
public sealed class IlgpuAttentionTests(IlgpuFixture fixture)
{
    [Property(Arbitrary = [typeof(DeviceAttentionArbitraries)], MaxTest = 60)]
    public void Attention_matches_double_softmax_reference(DeviceAttentionCase c) => Check(fixture.Backend, c);

    // With the fixture's 4 lanes: (query, head) rows per KV head >= 4 take the query-block kernel (K/V tiles of
    // 2048 / HeadDim keys staged per block), fewer take the key-split kernel (tiles of 4 x 8 keys). Several tiles and
    // blocks of each, HeadDim beyond the lanes, grouped-query heads, ranges that differ inside a block, then the same
    // shapes with other ranges (the range upload is cached by content).
    [Theory]
    [InlineData(5, 70, 4, 2, 72, MaskKind.PrefixCausal, 0f)]        // blocks: 10 rows, tiles of 28 keys
    [InlineData(5, 70, 4, 2, 72, MaskKind.SlidingWindow, 50f)]
    [InlineData(2, 33, 8, 1, 256, MaskKind.Full, 30f)]             // blocks: 16 rows, tiles of 8 keys
    [InlineData(70, 300, 2, 2, 16, MaskKind.PrefixCausal, 0f)]      // blocks: 18 per head, a partial last one, 3 tiles
    [InlineData(70, 150, 2, 2, 16, MaskKind.SlidingWindow, 0f)]     // blocks: windows inside one tile
    [InlineData(43, 130, 6, 3, 24, MaskKind.Random, 5f)]            // blocks: ranges of any shape, 2 tiles
    [InlineData(37, 120, 3, 1, 40, MaskKind.PrefixCausal, 0f)]      // blocks spanning query boundaries (3 heads per KV head)
    [InlineData(1, 150, 2, 1, 40, MaskKind.Full, 0f)]              // key split: 2 rows, 5 tiles
    [InlineData(3, 200, 1, 1, 16, MaskKind.SlidingWindow, 30f)]     // key split: 3 rows
    public void Attention_matches_reference_on_multi_tile_problems(int queries, int keys, int heads, int kvHeads, int headDim, MaskKind mask, float softCap) =>
        Check(fixture.Backend, new DeviceAttentionCase(queries, keys, heads, kvHeads, headDim, 1, 2, mask, true, softCap, 1f / MathF.Sqrt(headDim), queries + keys + (int)mask));

    internal static void Check(IComputeBackend backend, DeviceAttentionCase c)
    {
        var random = new Random(c.Seed);
        int d = c.HeadDim;
        int qStride = c.Heads * d + c.QSlack, kvStride = c.KvHeads * d + c.KvSlack;
        float[] q = RandomFloats(random, c.Queries * qStride, -1.5f, 1.5f);
        float[] k = RandomFloats(random, c.Keys * kvStride, -1.5f, 1.5f);
        float[] v = RandomFloats(random, c.Keys * kvStride, -2f, 2f);
        var (start, end) = MakeRanges(c, random);
        byte[] valid = c.Padding ? Enumerable.Range(0, c.Keys).Select(_ => (byte)(random.Next(5) == 0 ? 0 : 1 + random.Next(3))).ToArray() : [];
        using var scope = new DeviceScope(backend);
        var output = scope.Upload(new float[c.Queries * c.Heads * d].Select(_ => float.NaN).ToArray(), 1);

        var problem = new DeviceAttentionProblem
        {
            Q = scope.Upload(q, 2), QRowStride = qStride, Queries = c.Queries,
            K = c.Keys > 0 ? scope.Upload(k, 1) : default, V = c.Keys > 0 ? scope.Upload(v) : default,
            KvRowStride = kvStride, Keys = c.Keys,
            Heads = c.Heads, KvHeads = c.KvHeads, HeadDim = d,
            Scale = c.Scale, LogitSoftCap = c.SoftCap,
            KeyStart = start, KeyEnd = end, KeyValid = valid,
            Output = output,
        };
        backend.Attention(problem);
        float[] result = scope.Download(output);

        AttentionTests.AssertMatchesReference(q, qStride, k, v, kvStride, c.Queries, c.Keys, c.Heads, c.KvHeads, d, c.Scale, c.SoftCap,
            start, end, c.Padding ? valid : null, result, c.ToString());
    }

    private static (int[] Start, int[] End) MakeRanges(DeviceAttentionCase c, Random random) => AttentionTests.MakeRanges(c.Mask, c.Queries, c.Keys, random);
}
