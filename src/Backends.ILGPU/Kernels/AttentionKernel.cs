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
    /// <summary>Keys per tile: staged K/V rows (query blocks) or scored keys (key split).</summary>
    public int TileKeys;
}

/// <summary>
/// Scaled dot-product attention with an online softmax, as src/Kernels/Attention.cs defines it: per query, the keys of
/// its range [KeyStart, KeyEnd) that are valid are scored (dot · scale, then the optional soft-cap), and the values are
/// weighted by the softmax of the scores. A query that sees no key gets zeros. Two launch shapes share that definition:
/// <see cref="QueryBlocks"/> for many queries (prefill, vision) and <see cref="KeySplit"/> for a few (decode).
/// </summary>
internal static class AttentionKernel
{
    public const int MaxHeadDim = 256;
    /// <summary>Floats of each staged K or V tile of <see cref="QueryBlocks"/>; two of each (double buffering): 32 KB.</summary>
    public const int StagedTileFloats = 2048;
    /// <summary>Most keys per <see cref="KeySplit"/> tile (its shared score and weight arrays).</summary>
    public const int MaxSplitTileKeys = 1024;

    /// <summary>Keys per <see cref="QueryBlocks"/> tile for a head size: as many as a staged tile holds.</summary>
    internal static int BlockTileKeys(int headDim) => StagedTileFloats / headDim;

    /// <summary>
    /// Many queries: a group of L lanes serves L (query, head) rows of one KV head, rows ordered query-major over the
    /// heads that share the KV head (grouped-query attention), so each lane owns one query of one head. The keys that
    /// any row of the block sees go by in tiles of <see cref="AttentionShape.TileKeys"/>: the lanes stage each tile's K
    /// and V rows in shared memory once for the whole block, double-buffered (the next tile loads while this one is
    /// used, one barrier per tile), and every lane folds the tile's keys into its own online softmax four at a time: a
    /// score above the running max rescales the running sum and the lane's accumulated values (its query and accumulator
    /// are per-lane local arrays). Grid: (ceil(Queries · Heads / KvHeads / L), KvHeads).
    /// </summary>
    /// <param name="meta">KeyStart[Queries], KeyEnd[Queries], then (when HasValid) KeyValid[Keys] as 0/1 ints.</param>
    public static void QueryBlocks(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<int> meta, ArrayView<float> output, AttentionShape s)
    {
        var keyTiles = SharedMemory.Allocate<float>(2 * StagedTileFloats);
        var valueTiles = SharedMemory.Allocate<float>(2 * StagedTileFloats);
        var query = LocalMemory.Allocate<float>(MaxHeadDim);
        var acc = LocalMemory.Allocate<float>(MaxHeadDim);
        int lane = Group.IdxX, lanes = Group.DimX;
        int d = s.HeadDim;
        int headsPerKv = s.Heads / s.KvHeads;
        int kvHead = Grid.IdxY;
        int rows = s.Queries * headsPerKv;
        int blockStart = Grid.IdxX * lanes;
        int blockEnd = rows - blockStart < lanes ? rows : blockStart + lanes;
        int row = blockStart + lane;
        bool active = row < rows;
        int qi = active ? row / headsPerKv : 0;
        int head = kvHead * headsPerKv + (active ? row - qi * headsPerKv : 0);
        long kvOffset = (long)kvHead * d;

        // The union of the block's key ranges: only its tiles are staged.
        int low = int.MaxValue, high = 0;
        for (int i = blockStart / headsPerKv; i <= (blockEnd - 1) / headsPerKv; i++)
        {
            int a = meta[i], b = meta[s.Queries + i];
            if (a < b)
            {
                low = a < low ? a : low;
                high = b > high ? b : high;
            }
        }
        int tiles = low < high ? (high - low + s.TileKeys - 1) / s.TileKeys : 0;
        int first = active ? meta[qi] : 0, end = active ? meta[s.Queries + qi] : 0;

        long qStart = (long)qi * s.QRowStride + (long)head * d;
        for (int e = 0; e < d; e++)
        {
            query[e] = 0f;
            acc[e] = 0f;
        }
        if (active)
        {
            for (int e = 0; e < d; e++)
                query[e] = q[qStart + e];
        }

        if (tiles > 0)
        {
            StageKeyTile(k, v, s, keyTiles, valueTiles, 0, low, high, kvOffset, lane, lanes);
            Group.Barrier();
        }
        float runningMax = float.NegativeInfinity, runningSum = 0f;
        for (int tile = 0; tile < tiles; tile++)
        {
            // The other buffer was last read in the previous tile, which every lane finished before the last barrier.
            if (tile + 1 < tiles)
                StageKeyTile(k, v, s, keyTiles, valueTiles, tile + 1, low, high, kvOffset, lane, lanes);

            int j0 = low + tile * s.TileKeys;
            int buffer = (tile & 1) * StagedTileFloats;
            int count = high - j0 < s.TileKeys ? high - j0 : s.TileKeys;
            // This lane's part of the tile (empty for lanes whose range misses it).
            int from = first - j0 > 0 ? first - j0 : 0;
            int to = end - j0 < count ? end - j0 : count;
            for (int jj = from; jj < to; jj += 4)
            {
                // Four keys at a time: the query and the accumulator are read once per four keys. Keys past the lane's
                // part of the tile read the last one's row (in bounds) and are masked like invalid keys.
                int last = to - 1;
                int a0 = buffer + jj * d;
                int a1 = buffer + (jj + 1 < to ? jj + 1 : last) * d;
                int a2 = buffer + (jj + 2 < to ? jj + 2 : last) * d;
                int a3 = buffer + (jj + 3 < to ? jj + 3 : last) * d;
                float dot0 = 0f, dot1 = 0f, dot2 = 0f, dot3 = 0f;
                for (int e = 0; e < d; e++)
                {
                    float qe = query[e];
                    dot0 += qe * keyTiles[a0 + e];
                    dot1 += qe * keyTiles[a1 + e];
                    dot2 += qe * keyTiles[a2 + e];
                    dot3 += qe * keyTiles[a3 + e];
                }
                int j = j0 + jj;
                float s0 = Score(dot0, j, true, meta, s);
                float s1 = Score(dot1, j + 1, jj + 1 < to, meta, s);
                float s2 = Score(dot2, j + 2, jj + 2 < to, meta, s);
                float s3 = Score(dot3, j + 3, jj + 3 < to, meta, s);
                float newMax = MathF.Max(MathF.Max(runningMax, MathF.Max(s0, s1)), MathF.Max(s2, s3));
                if (newMax == float.NegativeInfinity)
                    continue;   // no visible key yet
                float factor = 1f;
                if (newMax > runningMax)
                {
                    factor = MathF.Exp(runningMax - newMax);   // 0 for the first visible key
                    runningMax = newMax;
                }
                float p0 = MathF.Exp(s0 - newMax), p1 = MathF.Exp(s1 - newMax);
                float p2 = MathF.Exp(s2 - newMax), p3 = MathF.Exp(s3 - newMax);
                runningSum = runningSum * factor + ((p0 + p1) + (p2 + p3));
                for (int e = 0; e < d; e++)
                    acc[e] = acc[e] * factor + p0 * valueTiles[a0 + e] + p1 * valueTiles[a1 + e] + p2 * valueTiles[a2 + e] + p3 * valueTiles[a3 + e];
            }
            if (tile + 1 < tiles)
                Group.Barrier();   // tile + 1 is staged; this tile's buffer may be overwritten
        }

        if (!active)
            return;
        long outStart = ((long)qi * s.Heads + head) * d;
        float inverse = runningSum > 0f ? 1f / runningSum : 0f;
        for (int e = 0; e < d; e++)
            output[outStart + e] = runningSum > 0f ? acc[e] * inverse : 0f;
    }

    /// <summary>A key's score (dot · scale, then the soft-cap); -inf when it is past the range or invalid.</summary>
    private static float Score(float dot, int key, bool inRange, ArrayView<int> meta, AttentionShape s)
    {
        if (!inRange || (s.HasValid != 0 && meta[2 * s.Queries + key] == 0))
            return float.NegativeInfinity;
        float score = dot * s.Scale;
        return s.SoftCap > 0f ? s.SoftCap * MathF.Tanh(score / s.SoftCap) : score;
    }

    /// <summary>Copies the K and V rows of key tile <paramref name="tile"/> (from <paramref name="low"/>) into buffer tile mod 2.</summary>
    private static void StageKeyTile(ArrayView<float> k, ArrayView<float> v, AttentionShape s, ArrayView<float> keyTiles, ArrayView<float> valueTiles,
        int tile, int low, int high, long kvOffset, int lane, int lanes)
    {
        int d = s.HeadDim;
        int j0 = low + tile * s.TileKeys;
        int count = high - j0 < s.TileKeys ? high - j0 : s.TileKeys;
        int buffer = (tile & 1) * StagedTileFloats;
        int floats = count * d;
        for (int t = lane; t < floats; t += lanes)
        {
            int jj = t / d;
            long at = (long)(j0 + jj) * s.KvRowStride + kvOffset + (t - jj * d);
            keyTiles[buffer + t] = k[at];
            valueTiles[buffer + t] = v[at];
        }
    }

    /// <summary>
    /// A few queries: one group per (query, head), the query's keys split over the lanes in tiles of
    /// <see cref="AttentionShape.TileKeys"/> (several keys per lane). Each lane scores its keys into shared memory; after
    /// a barrier every lane takes the tile's max, writes the exponentials of its own keys, and after a second barrier the
    /// lanes, which own the output dimensions e ≡ lane (mod L), fold the tile's sum and weighted values into the running
    /// state. Grid: Queries · Heads groups.
    /// </summary>
    /// <param name="meta">KeyStart[Queries], KeyEnd[Queries], then (when HasValid) KeyValid[Keys] as 0/1 ints.</param>
    public static void KeySplit(ArrayView<float> q, ArrayView<float> k, ArrayView<float> v, ArrayView<int> meta, ArrayView<float> output, AttentionShape s)
    {
        var query = SharedMemory.Allocate<float>(MaxHeadDim);
        var acc = SharedMemory.Allocate<float>(MaxHeadDim);
        var scores = SharedMemory.Allocate<float>(MaxSplitTileKeys);
        var weights = SharedMemory.Allocate<float>(MaxSplitTileKeys);
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
        for (int j0 = first; j0 < end; j0 += s.TileKeys)
        {
            int count = end - j0 < s.TileKeys ? end - j0 : s.TileKeys;
            for (int jj = lane; jj < count; jj += lanes)
            {
                int j = j0 + jj;
                float score = float.NegativeInfinity;
                if (s.HasValid == 0 || meta[2 * s.Queries + j] != 0)
                {
                    long keyStart = (long)j * s.KvRowStride + kvOffset;
                    float dot = 0f;
                    for (int e = 0; e < d; e++)
                        dot += query[e] * k[keyStart + e];
                    score = dot * s.Scale;
                    if (s.SoftCap > 0f)
                        score = s.SoftCap * MathF.Tanh(score / s.SoftCap);
                }
                scores[jj] = score;
            }
            Group.Barrier();

            // Every lane scans the same shared scores, so tileMax (and the branches on it) is uniform across the group.
            float tileMax = float.NegativeInfinity;
            for (int jj = 0; jj < count; jj++)
                tileMax = MathF.Max(tileMax, scores[jj]);
            float newMax = MathF.Max(runningMax, tileMax);
            if (tileMax != float.NegativeInfinity)
            {
                for (int jj = lane; jj < count; jj += lanes)
                    weights[jj] = MathF.Exp(scores[jj] - newMax);
            }
            // Also orders this tile's score reads before the next tile's writes (weights are next written after the
            // next tile's first barrier, when every lane is done reading them).
            Group.Barrier();

            if (tileMax != float.NegativeInfinity)
            {
                float factor = MathF.Exp(runningMax - newMax);   // 0 on the first visible tile
                float tileSum = 0f;
                for (int jj = 0; jj < count; jj++)
                    tileSum += weights[jj];
                for (int e = lane; e < d; e += lanes)
                {
                    float a = acc[e] * factor;
                    long valueStart = (long)j0 * s.KvRowStride + kvOffset + e;
                    for (int jj = 0; jj < count; jj++)
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
        }

        long outStart = ((long)qi * s.Heads + head) * d;
        float inverse = runningSum > 0f ? 1f / runningSum : 0f;
        for (int e = lane; e < d; e += lanes)
            output[outStart + e] = runningSum > 0f ? acc[e] * inverse : 0f;
    }
}
