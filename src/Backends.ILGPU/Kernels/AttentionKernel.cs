using ILGPU;

namespace PaliGemma.CpuOnly.Backends.ILGPU.Kernels;

internal struct AttentionShape
{
    public int QRowStride;
    public int Queries;
    public int KvRowStride;
    public int Heads;
    public int KvHeads;
    public int HeadDim;
    public float Scale;
    public float SoftCap;
    public int HasValid;
}

/// <summary>
/// Scaled dot-product attention with an online softmax, as src/Kernels/Attention.cs defines it: one group per
/// (query, head); the keys of the query's range go by in tiles of one key per lane. Each lane scores its key (masked:
/// -inf), the tile's max and exponentials are folded into a running max and sum, and the lanes, which own the output
/// dimensions e ≡ lane (mod lanes), add the weighted values. A query that sees no key gets zeros.
/// </summary>
internal static class AttentionKernel
{
    public const int MaxHeadDim = 256;
    public const int MaxGroup = 256;

    /// <param name="meta">KeyStart[Queries], KeyEnd[Queries], then (when HasValid) KeyValid[Keys] as 0/1 ints.</param>
    public static void Forward(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<int> meta, ArrayView<float> output, AttentionShape s)
    {
        var query = SharedMemory.Allocate<float>(MaxHeadDim);
        var acc = SharedMemory.Allocate<float>(MaxHeadDim);
        var scores = SharedMemory.Allocate<float>(MaxGroup);
        var weights = SharedMemory.Allocate<float>(MaxGroup);
        int lane = Group.IdxX, lanes = Group.DimX;
        int qi = Grid.IdxX / s.Heads;
        int head = Grid.IdxX - qi * s.Heads;
        int d = s.HeadDim;
        long kvOffset = (long)(head / (s.Heads / s.KvHeads)) * d;
        long qStart = (long)qi * s.QRowStride + (long)head * d;
        int first = meta[qi], end = meta[s.Queries + qi];

        for (int e = lane; e < d; e += lanes)
        {
            query[e] = q[qStart + e];
            acc[e] = 0f;
        }
        Group.Barrier();

        float runningMax = float.NegativeInfinity, runningSum = 0f;
        for (int j0 = first; j0 < end; j0 += lanes)
        {
            int keys = end - j0 < lanes ? end - j0 : lanes;
            int j = j0 + lane;
            float score = float.NegativeInfinity;
            if (lane < keys && (s.HasValid == 0 || meta[2 * s.Queries + j] != 0))
            {
                long keyStart = (long)j * s.KvRowStride + kvOffset;
                float dot = 0f;
                for (int e = 0; e < d; e++)
                    dot += query[e] * k[keyStart + e];
                score = dot * s.Scale;
                if (s.SoftCap > 0f)
                    score = s.SoftCap * MathF.Tanh(score / s.SoftCap);
            }
            scores[lane] = score;
            Group.Barrier();

            // Every lane scans the same shared scores, so the branch below is uniform across the group.
            float tileMax = float.NegativeInfinity;
            for (int jj = 0; jj < keys; jj++)
                tileMax = MathF.Max(tileMax, scores[jj]);
            if (tileMax != float.NegativeInfinity)
            {
                float newMax = MathF.Max(runningMax, tileMax);
                float factor = MathF.Exp(runningMax - newMax);   // 0 on the first visible tile
                weights[lane] = lane < keys ? MathF.Exp(scores[lane] - newMax) : 0f;
                Group.Barrier();
                float tileSum = 0f;
                for (int jj = 0; jj < keys; jj++)
                    tileSum += weights[jj];
                for (int e = lane; e < d; e += lanes)
                {
                    float a = acc[e] * factor;
                    long valueStart = (long)j0 * s.KvRowStride + kvOffset + e;
                    for (int jj = 0; jj < keys; jj++)
                    {
                        float p = weights[jj];
                        if (p != 0f)
                            a += p * v[valueStart + (long)jj * s.KvRowStride];
                    }
                    acc[e] = a;
                }
                runningSum = runningSum * factor + tileSum;
                runningMax = newMax;
            }
            Group.Barrier();   // the next tile overwrites scores and weights
        }

        long outStart = ((long)qi * s.Heads + head) * d;
        float inverse = runningSum > 0f ? 1f / runningSum : 0f;
        for (int e = lane; e < d; e += lanes)
            output[outStart + e] = runningSum > 0f ? acc[e] * inverse : 0f;
    }
}
