using System.Numerics.Tensors;
using System.Runtime.Intrinsics;
using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>
/// One scaled dot-product attention call: multi-head, grouped-query or multi-query (query head h reads kv head
/// h / (Heads / KvHeads)), with a visible key range per query and an optional key padding mask.
/// </summary>
public ref struct AttentionProblem
{
    /// <summary>Queries; row i, head h starts at Q[i * QRowStride + h * HeadDim].</summary>
    public ReadOnlySpan<float> Q;
    public int QRowStride;
    public int Queries;

    /// <summary>Keys; key j, kv head g starts at K[j * KvRowStride + g * HeadDim].</summary>
    public ReadOnlySpan<float> K;
    /// <summary>Values, laid out like <see cref="K"/>.</summary>
    public ReadOnlySpan<float> V;
    public int KvRowStride;
    public int Keys;

    public int Heads;
    public int KvHeads;
    public int HeadDim;

    /// <summary>scores = (q . k) * Scale.</summary>
    public float Scale;
    /// <summary>0 for none; otherwise scores = cap * tanh(scores / cap) after scaling (Gemma 2).</summary>
    public float LogitSoftCap;

    /// <summary>Query i sees keys j with KeyStart[i] &lt;= j &lt; KeyEnd[i] ...</summary>
    public ReadOnlySpan<int> KeyStart;
    public ReadOnlySpan<int> KeyEnd;
    /// <summary>... and KeyValid[j] != 0 when KeyValid is not empty (padding).</summary>
    public ReadOnlySpan<byte> KeyValid;

    /// <summary>[Queries, Heads * HeadDim], contiguous. A query that sees no key gets zeros.</summary>
    public Span<float> Output;
}

/// <summary>
/// Tiled attention with an online softmax: scores are made one key block at a time and folded into a running
/// max, sum and output, so no Queries x Keys matrix is ever stored. Accumulation is fp32 throughout.
/// </summary>
public static unsafe class Attention
{
    // A work item is one kv head and a block of queries; its (query, head in group) pairs are the "rows".
    private const int KeyBlock = 64;
    private const int TargetRows = 64;
    private const int RowBlock = 4;
    private const int ChunkBlock = 4;
    // Up to this many rows per work item (decode), scores are dot products over K read in place.
    private const int DotScoreRows = 8;
    private const long ParallelThreshold = 1L << 18;
    // Smallest key chunk worth a thread of its own when a call has too few work items to go round: decode reads its K and
    // V from memory, so two threads beat one from about 256 keys (a 3B-224 caption's 261-285: 0.97 -> 0.66 ms per token).
    private const int MinSplitKeys = 2 * KeyBlock;
    // Chunks are whole vectors of keys, not whole key blocks, so that two chunks of a short range are even.
    private const int SplitKeyMultiple = 16;
    // Most floats of packed keys held at once by one calling thread (16 MB: SigLIP at 256 tokens needs 2.5 MB for all 16
    // heads, Gemma's one kv head 8 MB at 4096 tokens).
    private const long MaxSharedKeyFloats = 1L << 22;

    public static void Forward(scoped in AttentionProblem problem) => Forward(problem, SimdWidths.Best);

    /// <summary>
    /// As the public overload, with the vector width chosen by the caller; a positive <paramref name="splitKeys"/>
    /// forces the split-key path with chunks of that many keys (tests reach it at small sizes).
    /// </summary>
    internal static void Forward(scoped in AttentionProblem problem, SimdWidth width, int splitKeys = 0)
    {
        Validate(problem);
        if (problem.Queries == 0)
            return;

        fixed (float* q = problem.Q)
        fixed (float* k = problem.K)
        fixed (float* v = problem.V)
        fixed (int* start = problem.KeyStart)
        fixed (int* end = problem.KeyEnd)
        fixed (byte* valid = problem.KeyValid)
        fixed (float* output = problem.Output)
        {
            var shape = new Shape
            {
                Q = q, QRowStride = problem.QRowStride, Queries = problem.Queries,
                K = k, V = v, KvRowStride = problem.KvRowStride, Keys = problem.Keys,
                Heads = problem.Heads, KvHeads = problem.KvHeads, HeadDim = problem.HeadDim,
                Scale = problem.Scale, SoftCap = problem.LogitSoftCap,
                KeyStart = start, KeyEnd = end, KeyValid = problem.KeyValid.IsEmpty ? null : valid,
                Output = output,
            };
            switch (width)
            {
                case SimdWidth.Vector512: Run<Simd512, Vector512<float>>(shape, splitKeys); break;
                case SimdWidth.Vector256: Run<Simd256, Vector256<float>>(shape, splitKeys); break;
                case SimdWidth.Vector128: Run<Simd128, Vector128<float>>(shape, splitKeys); break;
                default: Run<SimdScalar, float>(shape, splitKeys); break;
            }
        }
    }

    private static void Validate(scoped in AttentionProblem p) =>
        CheckProblem(p.Heads, p.KvHeads, p.HeadDim, p.Queries, p.Keys, p.Scale, p.LogitSoftCap, p.QRowStride, p.Q.Length, p.Output.Length,
            p.KvRowStride, p.K.Length, p.V.Length, p.KeyStart, p.KeyEnd, p.KeyValid);

    /// <summary>
    /// Validates one attention problem given its shape and operand lengths (shared by every backend, so the CPU kernel and a
    /// device kernel reject the same inputs with the same messages, named <c>problem.Field</c>).
    /// </summary>
    public static void CheckProblem(int heads, int kvHeads, int headDim, int queries, int keys, float scale, float logitSoftCap,
        int qRowStride, long qLength, long outputLength, int kvRowStride, long kLength, long vLength,
        ReadOnlySpan<int> keyStart, ReadOnlySpan<int> keyEnd, ReadOnlySpan<byte> keyValid)
    {
        const string Name = "problem";
        if (heads <= 0)
            throw new ArgumentException($"Heads is {heads}; it must be positive", Name + ".Heads");
        if (kvHeads <= 0 || heads % kvHeads != 0)
            throw new ArgumentException($"KvHeads is {kvHeads}; it must be positive and divide Heads = {heads}", Name + ".KvHeads");
        if (headDim <= 0)
            throw new ArgumentException($"HeadDim is {headDim}; it must be positive", Name + ".HeadDim");
        if (queries < 0)
            throw new ArgumentException($"Queries is {queries}; it must not be negative", Name + ".Queries");
        if (keys < 0)
            throw new ArgumentException($"Keys is {keys}; it must not be negative", Name + ".Keys");
        if (!float.IsFinite(scale))
            throw new ArgumentException($"Scale is {scale}; it must be finite", Name + ".Scale");
        if (!(logitSoftCap >= 0f) || float.IsInfinity(logitSoftCap))
            throw new ArgumentException($"LogitSoftCap is {logitSoftCap}; it must be 0 (none) or positive and finite", Name + ".LogitSoftCap");

        long qWidth = (long)heads * headDim;
        long kvWidth = (long)kvHeads * headDim;
        if (queries > 0)
        {
            if (qRowStride < qWidth)
                throw new ArgumentException($"QRowStride {qRowStride} is smaller than Heads * HeadDim = {qWidth}", Name + ".QRowStride");
            long needed = (long)(queries - 1) * qRowStride + qWidth;
            if (qLength < needed)
                throw new ArgumentException($"Q holds {qLength} floats; {queries} queries need {needed}", Name + ".Q");
            if (outputLength < queries * qWidth)
                throw new ArgumentException($"Output holds {outputLength} floats; {queries} queries need {queries * qWidth}", Name + ".Output");
            if (keyStart.Length < queries)
                throw new ArgumentException($"KeyStart holds {keyStart.Length} entries; there are {queries} queries", Name + ".KeyStart");
            if (keyEnd.Length < queries)
                throw new ArgumentException($"KeyEnd holds {keyEnd.Length} entries; there are {queries} queries", Name + ".KeyEnd");
        }
        if (keys > 0)
        {
            if (kvRowStride < kvWidth)
                throw new ArgumentException($"KvRowStride {kvRowStride} is smaller than KvHeads * HeadDim = {kvWidth}", Name + ".KvRowStride");
            long needed = (long)(keys - 1) * kvRowStride + kvWidth;
            if (kLength < needed)
                throw new ArgumentException($"K holds {kLength} floats; {keys} keys need {needed}", Name + ".K");
            if (vLength < needed)
                throw new ArgumentException($"V holds {vLength} floats; {keys} keys need {needed}", Name + ".V");
        }
        if (!keyValid.IsEmpty && keyValid.Length < keys)
            throw new ArgumentException($"KeyValid holds {keyValid.Length} entries; it must be empty or cover {keys} keys", Name + ".KeyValid");
        for (int i = 0; i < queries; i++)
        {
            if (keyStart[i] < 0)
                throw new ArgumentException($"KeyStart[{i}] is {keyStart[i]}; it must not be negative", Name + ".KeyStart");
            if (keyEnd[i] > keys)
                throw new ArgumentException($"KeyEnd[{i}] is {keyEnd[i]}; there are only {keys} keys", Name + ".KeyEnd");
        }
    }

    private struct Shape
    {
        public float* Q; public int QRowStride; public int Queries;
        public float* K; public float* V; public int KvRowStride; public int Keys;
        public int Heads; public int KvHeads; public int HeadDim;
        public float Scale; public float SoftCap;
        public int* KeyStart; public int* KeyEnd; public byte* KeyValid;
        public float* Output;
    }

    private static void Run<TOps, TVec>(in Shape shape, int forcedSplitKeys)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        int group = shape.Heads / shape.KvHeads;
        int queriesPerBlock = Math.Max(1, TargetRows / group);
        int blocks = (shape.Queries + queriesPerBlock - 1) / queriesPerBlock;
        int items = shape.KvHeads * blocks;
        long work = (long)shape.Queries * shape.Keys * shape.Heads * shape.HeadDim;
        bool parallel = work >= ParallelThreshold;
        var body = new Blocks<TOps, TVec>(shape, queriesPerBlock, blocks);
        VisibleKeys(shape, 0, shape.Queries, out int lo, out int hi);
        int splitKeys = forcedSplitKeys > 0 ? forcedSplitKeys : parallel ? SplitKeys((long)hi - lo, items, KernelThreading.MaxThreads) : 0;
        if (splitKeys == 0 || lo >= hi)
        {
            if (lo < hi && blocks > 1 && body.PacksKeyBlocks && SharedKeyFloats(body, lo, hi) <= MaxSharedKeyFloats)
                RunWithSharedKeys(shape, body, blocks, lo, hi, parallel);
            else
                KernelThreading.For(items, parallel, body);
            return;
        }

        // Few work items (decode: one query, one kv head) and many keys: every item's key range is cut into chunks
        // that run on separate threads, each leaving a partial softmax (max, sum, unnormalised output) to merge here.
        int splits = (int)(((long)hi - lo + splitKeys - 1) / splitKeys);
        int slotLength = body.PartialLength;
        float[] partials = ThreadScratch(ref t_partials, items * splits * slotLength);
        fixed (float* partial = partials)
        {
            KernelThreading.For(items * splits, true, new KeySplits<TOps, TVec>(body, lo, splitKeys, splits, partial));
            for (int item = 0; item < items; item++)
                body.Merge(item, partial + (nint)item * splits * slotLength, splits);
        }
    }

    /// <summary>
    /// Several query blocks read the same keys (prefill, vision): each kv head's key blocks are transposed (and V padded)
    /// once, by all threads, into a buffer every query block of that head then reads, instead of once per query block.
    /// As many kv heads at a time as fit in <see cref="MaxSharedKeyFloats"/> (at least one).
    /// </summary>
    private static void RunWithSharedKeys<TOps, TVec>(in Shape shape, Blocks<TOps, TVec> body, int blocks, int lo, int hi, bool parallel)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        int keyBlocks = (int)(((long)hi - lo + KeyBlock - 1) / KeyBlock);
        long headFloats = SharedKeyFloats(body, lo, hi);
        int headsPerPass = (int)Math.Clamp(MaxSharedKeyFloats / headFloats, 1, shape.KvHeads);
        float[] packed = ThreadScratch(ref t_sharedKeys, checked((int)(headsPerPass * headFloats)));
        fixed (float* keys = packed)
        {
            for (int first = 0; first < shape.KvHeads; first += headsPerPass)
            {
                int heads = Math.Min(headsPerPass, shape.KvHeads - first);
                KernelThreading.For(heads * keyBlocks, parallel, new KeyBlockPacking<TOps, TVec>(body, first, keyBlocks, lo, hi, keys));
                KernelThreading.For(heads * blocks, parallel, new SharedKeyBlocks<TOps, TVec>(body, first, blocks, headFloats, lo, keys));
            }
        }
    }

    /// <summary>Floats of one kv head's keys lo..hi-1 packed in blocks (beyond <see cref="MaxSharedKeyFloats"/>, each query block packs its own).</summary>
    private static long SharedKeyFloats<TOps, TVec>(Blocks<TOps, TVec> body, int lo, int hi)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged =>
        ((long)hi - lo + KeyBlock - 1) / KeyBlock * body.PackedBlockLength;

    /// <summary>Keys per chunk when each work item's key range should be split across threads, else 0.</summary>
    private static int SplitKeys(long span, int items, int threads)
    {
        if (items >= threads)
            return 0;
        // Twice as many chunks as threads so that a late thread does not leave the others idle at the end.
        long wanted = Math.Min(span / MinSplitKeys, (2L * threads + items - 1) / items);
        if (wanted < 2)
            return 0;
        long keys = (span + wanted - 1) / wanted;
        return (int)((keys + SplitKeyMultiple - 1) / SplitKeyMultiple * SplitKeyMultiple);
    }

    /// <summary>The union of the key ranges of queries q0..q0+queries-1 (lo = int.MaxValue, hi = int.MinValue when all are empty).</summary>
    private static void VisibleKeys(in Shape s, int q0, int queries, out int lo, out int hi)
    {
        lo = int.MaxValue;
        hi = int.MinValue;
        for (int i = q0; i < q0 + queries; i++)
        {
            if (s.KeyStart[i] < s.KeyEnd[i])
            {
                lo = Math.Min(lo, s.KeyStart[i]);
                hi = Math.Max(hi, s.KeyEnd[i]);
            }
        }
    }

    // Per-thread scratch, kept for the thread's lifetime so that warm calls allocate nothing. A kernel's work items
    // never call the kernel again, so one buffer per purpose and thread is never used twice at once.
    [ThreadStatic] private static float[]? t_blockScratch;
    [ThreadStatic] private static float[]? t_partials;
    [ThreadStatic] private static float[]? t_sharedKeys;

    private static float[] ThreadScratch(ref float[]? buffer, int length)
    {
        float[]? current = buffer;
        if (current == null || current.Length < length)
            buffer = current = new float[length];
        return current;
    }

    /// <summary>Work item i is chunk i % splits of the key range of <see cref="Blocks{TOps, TVec}"/> item i / splits.</summary>
    private readonly struct KeySplits<TOps, TVec>(Blocks<TOps, TVec> blocks, int lo, int splitKeys, int splits, float* partials) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        public void Run(int item)
        {
            int from = lo + item % splits * splitKeys;
            int to = (int)Math.Min((long)from + splitKeys, int.MaxValue);
            blocks.RunPartial(item / splits, from, to, partials + (nint)item * blocks.PartialLength);
        }
    }

    /// <summary>
    /// Work item i packs key block i % keyBlocks (keys lo + b * KeyBlock, ...) of kv head firstHead + i / keyBlocks; a head's
    /// blocks lie back to back, heads one after another.
    /// </summary>
    private readonly struct KeyBlockPacking<TOps, TVec>(Blocks<TOps, TVec> blocks, int firstHead, int keyBlocks, int lo, int hi, float* packed) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        public void Run(int item)
        {
            int j0 = lo + item % keyBlocks * KeyBlock;
            blocks.PackBlock(firstHead + item / keyBlocks, j0, Math.Min(KeyBlock, hi - j0), packed + (nint)item * blocks.PackedBlockLength);
        }
    }

    /// <summary>
    /// Work item i is query block i % blocks of kv head firstHead + i / blocks (a <see cref="Blocks{TOps, TVec}"/> item),
    /// reading that head's keys as packed from key lo on.
    /// </summary>
    private readonly struct SharedKeyBlocks<TOps, TVec>(Blocks<TOps, TVec> blocks, int firstHead, int queryBlocks, long headFloats, int lo, float* packed) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        public void Run(int item)
        {
            int head = item / queryBlocks;
            blocks.RunPacked((firstHead + head) * queryBlocks + item % queryBlocks, packed + head * headFloats, lo);
        }
    }

    private readonly struct Blocks<TOps, TVec> : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        private readonly Shape _shape;
        private readonly int _queriesPerBlock;
        private readonly int _blocks;
        private readonly int _group;
        private readonly int _rowCapacity;   // rows of one block, rounded up to RowBlock
        private readonly int _paddedDim;     // HeadDim rounded up to a whole number of vectors

        public Blocks(Shape shape, int queriesPerBlock, int blocks)
        {
            _shape = shape;
            _queriesPerBlock = queriesPerBlock;
            _blocks = blocks;
            _group = shape.Heads / shape.KvHeads;
            _rowCapacity = RoundUp(queriesPerBlock * _group, RowBlock);
            _paddedDim = RoundUp(shape.HeadDim, TOps.Count);
        }

        private static int RoundUp(int value, int multiple) => (value + multiple - 1) / multiple * multiple;

        private int ScratchLength =>
            _rowCapacity * _shape.HeadDim + _shape.HeadDim * KeyBlock + KeyBlock * _paddedDim + _rowCapacity * KeyBlock +
            _rowCapacity * _paddedDim + 3 * _rowCapacity + TOps.Count;

        /// <summary>Floats of one packed key block: K transposed [HeadDim, KeyBlock], then V as KeyBlock rows of the padded dimension.</summary>
        public int PackedBlockLength => _shape.HeadDim * KeyBlock + KeyBlock * _paddedDim;

        /// <summary>Whether a full query block scores against transposed key blocks (else it reads K in place and packing is wasted).</summary>
        public bool PacksKeyBlocks => _rowCapacity > DotScoreRows;

        /// <summary>Packs keys j0..j0+keys-1 of one kv head into a block of <see cref="PackedBlockLength"/> floats.</summary>
        public void PackBlock(int kvHead, int j0, int keys, float* block)
        {
            int keysPadded = RoundUp(keys, TOps.Count);
            PackKeys(kvHead, j0, keys, keysPadded, block, _paddedDim == _shape.HeadDim ? null : block + _shape.HeadDim * KeyBlock);
        }

        /// <summary>Item <paramref name="item"/> over all its keys, with the key blocks already packed from key <paramref name="packedFrom"/> on.</summary>
        public void RunPacked(int item, float* packedKeys, int packedFrom)
        {
            fixed (float* scratch = ThreadScratch(ref t_blockScratch, ScratchLength))
                RunBlock(item, 0, int.MaxValue, scratch, null, packedKeys, packedFrom);
        }

        /// <summary>Floats of one partial result: the unnormalised output rows, then each row's max, then its sum.</summary>
        public int PartialLength => _rowCapacity * (_paddedDim + 2);

        public void Run(int item) => RunPartial(item, 0, int.MaxValue, null);

        /// <summary>
        /// Item <paramref name="item"/> over keys from..to-1 only (intersected with each query's range). With no
        /// <paramref name="partial"/> the result is final and goes to the output; else its partial softmax goes there.
        /// </summary>
        public void RunPartial(int item, int from, int to, float* partial)
        {
            // Scratch: packed queries, K block transposed (d-major), V block with padded rows, score tile, output
            // accumulators, then per-row max / sum / rescale factor.
            fixed (float* scratch = ThreadScratch(ref t_blockScratch, ScratchLength))
                RunBlock(item, from, to, scratch, partial, null, 0);
        }

        /// <summary>Folds the partial results of one item's key chunks into its output rows.</summary>
        public void Merge(int item, float* partials, int splits)
        {
            ref readonly Shape s = ref _shape;
            int d = s.HeadDim, dPad = _paddedDim, rowCap = _rowCapacity, group = _group, slot = PartialLength;
            int kvHead = item / _blocks;
            int q0 = item % _blocks * _queriesPerBlock;
            int rows = Math.Min(_queriesPerBlock, s.Queries - q0) * group;
            for (int r = 0; r < rows; r++)
            {
                float* dst = s.Output + (nint)(q0 + r / group) * s.Heads * d + (nint)(kvHead * group + r % group) * d;
                float max = float.NegativeInfinity;
                for (int c = 0; c < splits; c++)
                    max = MathF.Max(max, partials[(nint)c * slot + rowCap * dPad + r]);
                var output = new Span<float>(dst, d);
                if (max == float.NegativeInfinity)
                {
                    output.Clear();
                    continue;
                }
                float sum = 0f;
                bool first = true;
                for (int c = 0; c < splits; c++)
                {
                    float* chunk = partials + (nint)c * slot;
                    float chunkMax = chunk[rowCap * dPad + r];
                    if (chunkMax == float.NegativeInfinity)
                        continue;   // this chunk saw none of the row's keys
                    float factor = MathF.Exp(chunkMax - max);
                    sum += chunk[rowCap * dPad + rowCap + r] * factor;
                    if (first)
                        Scale(chunk + r * dPad, factor, dst, d);
                    else
                        AddScaled(chunk + r * dPad, factor, dst, d);
                    first = false;
                }
                Scale(dst, 1f / sum, dst, d);
            }
        }

        /// <param name="packedKeys">Null, or this item's kv head's key blocks packed by <see cref="PackBlock"/> from key <paramref name="packedFrom"/> on
        /// (the item's blocks then start on that grid).</param>
        private void RunBlock(int item, int from, int to, float* scratch, float* partial, float* packedKeys, int packedFrom)
        {
            ref readonly Shape s = ref _shape;
            int d = s.HeadDim, dPad = _paddedDim, rowCap = _rowCapacity, group = _group;
            int kvHead = item / _blocks;
            int q0 = item % _blocks * _queriesPerBlock;
            int queries = Math.Min(_queriesPerBlock, s.Queries - q0);
            int rows = queries * group;
            int rowsPadded = RoundUp(rows, RowBlock);

            float* qPack = scratch;
            float* kT = qPack + rowCap * d;
            float* vPack = kT + d * KeyBlock;
            float* scores = vPack + KeyBlock * dPad;
            float* acc = scores + rowCap * KeyBlock;
            float* rowMax = acc + rowCap * dPad;
            float* rowSum = rowMax + rowCap;
            float* rowScale = rowSum + rowCap;
            float* sums = stackalloc float[RowBlock * RowBlock];
            // Few rows (decode) read K in place with dot products along the head dimension, where transposing a key
            // block would cost as much as the scores; V is read in place whenever its rows need no padding.
            bool dotScores = rowsPadded <= DotScoreRows;
            bool vInPlace = dPad == d;

            // Row r is query q0 + r / group, head kvHead * group + r % group.
            for (int r = 0; r < rowsPadded; r++)
            {
                float* dst = qPack + r * d;
                if (r < rows)
                {
                    float* src = s.Q + (nint)(q0 + r / group) * s.QRowStride + (nint)(kvHead * group + r % group) * d;
                    new ReadOnlySpan<float>(src, d).CopyTo(new Span<float>(dst, d));
                }
                else
                {
                    new Span<float>(dst, d).Clear();
                }
                rowMax[r] = float.NegativeInfinity;
                rowSum[r] = 0f;
            }
            new Span<float>(acc, rowsPadded * dPad).Clear();

            VisibleKeys(s, q0, queries, out int lo, out int hi);
            lo = Math.Max(lo, from);
            hi = Math.Min(hi, to);

            int firstBlock = packedKeys == null || lo >= hi ? lo : packedFrom + (lo - packedFrom) / KeyBlock * KeyBlock;
            for (int j0 = firstBlock; j0 < hi; j0 += KeyBlock)
            {
                int keys = Math.Min(KeyBlock, hi - j0);
                int chunks = (keys + TOps.Count - 1) / TOps.Count;
                int keysPadded = chunks * TOps.Count;
                if (!AnyVisible(q0, queries, j0, keys))
                    continue;

                if (packedKeys != null)
                {
                    // The shared block may hold keys before lo or past hi: the softmax masks them per query.
                    kT = packedKeys + (nint)((j0 - packedFrom) / KeyBlock) * PackedBlockLength;
                    vPack = kT + d * KeyBlock;
                }
                else if (!dotScores || !vInPlace)
                {
                    PackKeys(kvHead, j0, keys, keysPadded, dotScores ? null : kT, vInPlace ? null : vPack);
                }
                nint kvOffset = (nint)j0 * s.KvRowStride + (nint)kvHead * d;
                if (dotScores)
                {
                    DotScores(qPack, rowsPadded, d, s.K + kvOffset, s.KvRowStride, keys, scores, s.Scale, sums, vInPlace ? s.V + kvOffset : null);
                }
                else
                {
                    for (int r = 0; r < rowsPadded; r += RowBlock)
                        Scores(qPack + r * d, d, kT, chunks, scores + r * KeyBlock, TOps.Create(s.Scale));
                }

                for (int r = 0; r < rowsPadded; r++)
                    SoftmaxStep(r < rows ? q0 + r / group : -1, j0, keys, keysPadded, scores + r * KeyBlock, rowMax + r, rowSum + r, rowScale + r);

                float* vBlock = vInPlace ? s.V + kvOffset : vPack;
                nint vStride = vInPlace ? s.KvRowStride : dPad;
                for (int r = 0; r < rowsPadded; r += RowBlock)
                    AccumulateValues(scores + r * KeyBlock, keys, vBlock, vStride, dPad, acc + r * dPad, rowScale + r);
            }

            if (partial != null)
            {
                // Unnormalised rows, then each row's max and sum, for Merge.
                new ReadOnlySpan<float>(acc, rows * dPad).CopyTo(new Span<float>(partial, rows * dPad));
                new ReadOnlySpan<float>(rowMax, rows).CopyTo(new Span<float>(partial + rowCap * dPad, rows));
                new ReadOnlySpan<float>(rowSum, rows).CopyTo(new Span<float>(partial + rowCap * dPad + rowCap, rows));
                return;
            }
            for (int r = 0; r < rows; r++)
            {
                float* dst = s.Output + (nint)(q0 + r / group) * s.Heads * d + (nint)(kvHead * group + r % group) * d;
                float sum = rowSum[r];
                if (sum > 0f)
                    Scale(acc + r * dPad, 1f / sum, dst, d);
                else
                    new Span<float>(dst, d).Clear();
            }
        }

        private bool AnyVisible(int q0, int queries, int j0, int keys)
        {
            ref readonly Shape s = ref _shape;
            for (int i = q0; i < q0 + queries; i++)
            {
                if (Math.Max(s.KeyStart[i], j0) < Math.Min(s.KeyEnd[i], j0 + keys))
                    return true;
            }
            return false;
        }

        /// <summary>
        /// Copies keys j0..j0+keys of one kv head: K transposed to [HeadDim, KeyBlock] (zero past the last key) when
        /// <paramref name="kT"/> is given, V as rows of paddedDim when <paramref name="vPack"/> is given.
        /// </summary>
        private void PackKeys(int kvHead, int j0, int keys, int keysPadded, float* kT, float* vPack)
        {
            ref readonly Shape s = ref _shape;
            int d = s.HeadDim, dPad = _paddedDim;
            for (int jj = 0; jj < keys; jj++)
            {
                nint offset = (nint)(j0 + jj) * s.KvRowStride + (nint)kvHead * d;
                if (kT != null)
                {
                    float* key = s.K + offset;
                    for (int e = 0; e < d; e++)
                        kT[e * KeyBlock + jj] = key[e];
                }
                if (vPack != null)
                {
                    float* vRow = vPack + jj * dPad;
                    new ReadOnlySpan<float>(s.V + offset, d).CopyTo(new Span<float>(vRow, d));
                    new Span<float>(vRow + d, dPad - d).Clear();
                }
            }
            for (int e = 0; kT != null && e < d && keys < keysPadded; e++)
                new Span<float>(kT + e * KeyBlock + keys, keysPadded - keys).Clear();
        }

        /// <summary>
        /// Scores of all packed query rows (a multiple of 4) against keys read in place, 4 keys x 4 rows at a time:
        /// scores[r, j] = (q_r . k_j) * scale. Entries past the last key are left as they are (the softmax masks them).
        /// With <paramref name="v"/> (V read in place, same stride), each step also prefetches its 4 keys' value rows, which
        /// the block's P·V reads next: decode's V comes from memory, and the hardware prefetcher follows only K meanwhile
        /// (4-9 % faster over 285-2000 keys).
        /// </summary>
        private static void DotScores(float* q, int rowsPadded, int d, float* k, int kStride, int keys, float* scores, float scale, float* sums, float* v)
        {
            nint kBytes = (nint)kStride * sizeof(float);
            int j = 0;
            for (; j + RowBlock <= keys; j += RowBlock)
            {
                if (v != null)
                {
                    for (int jj = 0; jj < RowBlock; jj++)
                    {
                        float* vRow = v + (nint)(j + jj) * kStride;
                        PackedGemm.PrefetchLines((byte*)vRow, (byte*)(vRow + d));
                    }
                }
                byte* keyRows = (byte*)(k + (nint)j * kStride);
                for (int r = 0; r < rowsPadded; r += RowBlock)
                {
                    MatMul.Block<TOps, TVec, Float32Reader>.Dot4x4(q + r * d, d, keyRows, kBytes, 0, d, sums);
                    for (int rr = 0; rr < RowBlock; rr++)
                    {
                        float* row = scores + (r + rr) * KeyBlock + j;
                        for (int c = 0; c < RowBlock; c++)
                            row[c] = sums[rr * RowBlock + c] * scale;
                    }
                }
            }
            for (; j < keys; j++)
            {
                byte* keyRow = (byte*)(k + (nint)j * kStride);
                for (int r = 0; r < rowsPadded; r += RowBlock)
                {
                    MatMul.Block<TOps, TVec, Float32Reader>.Dot4x1(q + r * d, d, keyRow, 0, d, sums);
                    for (int rr = 0; rr < RowBlock; rr++)
                        scores[(r + rr) * KeyBlock + j] = sums[rr] * scale;
                }
            }
        }

        /// <summary>Scores of 4 packed query rows against the block: scores[r, j] = (q_r . k_j) * scale, vectorised over keys.</summary>
        private static void Scores(float* q, int d, float* kT, int chunks, float* scores, TVec scale)
        {
            int n = TOps.Count;
            float* q1 = q + d, q2 = q1 + d, q3 = q2 + d;
            int c = 0;
            for (; c + ChunkBlock <= chunks; c += ChunkBlock)
            {
                TVec a00 = TOps.Zero, a01 = TOps.Zero, a02 = TOps.Zero, a03 = TOps.Zero;
                TVec a10 = TOps.Zero, a11 = TOps.Zero, a12 = TOps.Zero, a13 = TOps.Zero;
                TVec a20 = TOps.Zero, a21 = TOps.Zero, a22 = TOps.Zero, a23 = TOps.Zero;
                TVec a30 = TOps.Zero, a31 = TOps.Zero, a32 = TOps.Zero, a33 = TOps.Zero;
                float* k = kT + c * n;
                for (int e = 0; e < d; e++, k += KeyBlock)
                {
                    TVec k0 = TOps.Load(k), k1 = TOps.Load(k + n), k2 = TOps.Load(k + 2 * n), k3 = TOps.Load(k + 3 * n);
                    TVec u = TOps.Create(q[e]);
                    a00 = TOps.MultiplyAdd(u, k0, a00); a01 = TOps.MultiplyAdd(u, k1, a01);
                    a02 = TOps.MultiplyAdd(u, k2, a02); a03 = TOps.MultiplyAdd(u, k3, a03);
                    u = TOps.Create(q1[e]);
                    a10 = TOps.MultiplyAdd(u, k0, a10); a11 = TOps.MultiplyAdd(u, k1, a11);
                    a12 = TOps.MultiplyAdd(u, k2, a12); a13 = TOps.MultiplyAdd(u, k3, a13);
                    u = TOps.Create(q2[e]);
                    a20 = TOps.MultiplyAdd(u, k0, a20); a21 = TOps.MultiplyAdd(u, k1, a21);
                    a22 = TOps.MultiplyAdd(u, k2, a22); a23 = TOps.MultiplyAdd(u, k3, a23);
                    u = TOps.Create(q3[e]);
                    a30 = TOps.MultiplyAdd(u, k0, a30); a31 = TOps.MultiplyAdd(u, k1, a31);
                    a32 = TOps.MultiplyAdd(u, k2, a32); a33 = TOps.MultiplyAdd(u, k3, a33);
                }
                float* o = scores + c * n;
                TOps.Store(TOps.Multiply(a00, scale), o); TOps.Store(TOps.Multiply(a01, scale), o + n);
                TOps.Store(TOps.Multiply(a02, scale), o + 2 * n); TOps.Store(TOps.Multiply(a03, scale), o + 3 * n);
                o += KeyBlock;
                TOps.Store(TOps.Multiply(a10, scale), o); TOps.Store(TOps.Multiply(a11, scale), o + n);
                TOps.Store(TOps.Multiply(a12, scale), o + 2 * n); TOps.Store(TOps.Multiply(a13, scale), o + 3 * n);
                o += KeyBlock;
                TOps.Store(TOps.Multiply(a20, scale), o); TOps.Store(TOps.Multiply(a21, scale), o + n);
                TOps.Store(TOps.Multiply(a22, scale), o + 2 * n); TOps.Store(TOps.Multiply(a23, scale), o + 3 * n);
                o += KeyBlock;
                TOps.Store(TOps.Multiply(a30, scale), o); TOps.Store(TOps.Multiply(a31, scale), o + n);
                TOps.Store(TOps.Multiply(a32, scale), o + 2 * n); TOps.Store(TOps.Multiply(a33, scale), o + 3 * n);
            }
            for (; c < chunks; c++)
            {
                TVec a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero;
                float* k = kT + c * n;
                for (int e = 0; e < d; e++, k += KeyBlock)
                {
                    TVec k0 = TOps.Load(k);
                    a0 = TOps.MultiplyAdd(TOps.Create(q[e]), k0, a0);
                    a1 = TOps.MultiplyAdd(TOps.Create(q1[e]), k0, a1);
                    a2 = TOps.MultiplyAdd(TOps.Create(q2[e]), k0, a2);
                    a3 = TOps.MultiplyAdd(TOps.Create(q3[e]), k0, a3);
                }
                float* o = scores + c * n;
                TOps.Store(TOps.Multiply(a0, scale), o);
                TOps.Store(TOps.Multiply(a1, scale), o + KeyBlock);
                TOps.Store(TOps.Multiply(a2, scale), o + 2 * KeyBlock);
                TOps.Store(TOps.Multiply(a3, scale), o + 3 * KeyBlock);
            }
        }

        /// <summary>
        /// Folds one row's block of scores into its running softmax: masks invisible keys, finds the new max, turns the
        /// scores into exp(score - max) in place and records the factor the row's earlier output must be rescaled by.
        /// A row that sees nothing here gets all-zero weights and factor 1.
        /// </summary>
        private void SoftmaxStep(int query, int j0, int keys, int keysPadded, float* row, float* max, float* sum, float* rescale)
        {
            ref readonly Shape s = ref _shape;
            int first = 0, last = 0;
            if (query >= 0)
            {
                first = Math.Max(s.KeyStart[query], j0) - j0;
                last = Math.Min(s.KeyEnd[query], j0 + keys) - j0;
            }
            if (first >= last)
            {
                new Span<float>(row, keysPadded).Clear();
                *rescale = 1f;
                return;
            }

            var span = new Span<float>(row, keysPadded);
            if (s.SoftCap > 0f)
            {
                TensorPrimitives.Divide(span, s.SoftCap, span);
                TensorPrimitives.Tanh(span, span);
                TensorPrimitives.Multiply(span, s.SoftCap, span);
            }
            span[..first].Fill(float.NegativeInfinity);
            span[last..].Fill(float.NegativeInfinity);
            if (s.KeyValid != null)
            {
                byte* valid = s.KeyValid + j0;
                for (int j = first; j < last; j++)
                {
                    if (valid[j] == 0)
                        row[j] = float.NegativeInfinity;
                }
            }

            int n = TOps.Count;
            TVec maxV = TOps.Create(float.NegativeInfinity);
            for (int j = 0; j < keysPadded; j += n)
                maxV = TOps.Max(maxV, TOps.Load(row + j));
            float blockMax = TOps.MaxAcross(maxV);
            if (blockMax == float.NegativeInfinity)
            {
                span.Clear();
                *rescale = 1f;
                return;
            }

            float newMax = MathF.Max(*max, blockMax);
            TVec newMaxV = TOps.Create(newMax);
            TVec total = TOps.Zero;
            for (int j = 0; j < keysPadded; j += n)
            {
                TVec p = TOps.Exp(TOps.Subtract(TOps.Load(row + j), newMaxV));
                TOps.Store(p, row + j);
                total = TOps.Add(total, p);
            }
            float factor = MathF.Exp(*max - newMax);   // exp(-inf) = 0 on the first visible block
            *rescale = factor;
            *sum = *sum * factor + TOps.Sum(total);
            *max = newMax;
        }

        /// <summary>
        /// acc[r] = acc[r] * rescale[r] + sum_j p[r, j] * v_j for 4 rows, vectorised over the head dimension; v_j starts
        /// at v + j * vStride and is readable up to dPad.
        /// </summary>
        private static void AccumulateValues(float* p, int keys, float* v0Row, nint vStride, int dPad, float* acc, float* rescale)
        {
            int n = TOps.Count;
            int chunks = dPad / n;
            float* p1 = p + KeyBlock, p2 = p1 + KeyBlock, p3 = p2 + KeyBlock;
            float* acc1 = acc + dPad, acc2 = acc1 + dPad, acc3 = acc2 + dPad;
            TVec f0 = TOps.Create(rescale[0]), f1 = TOps.Create(rescale[1]), f2 = TOps.Create(rescale[2]), f3 = TOps.Create(rescale[3]);
            int c = 0;
            // SigLIP's head size 72 is 5 vectors of 16: one 4 x 5 tile (20 of the 32 registers) rather than a 4 x 4 tile
            // and a 4 x 1 pass whose 4 accumulator chains cannot keep the FMA units busy.
            if (chunks == 5 && TOps.Count == 16)
            {
                AccumulateValues4x5(p, keys, v0Row, vStride, dPad, acc, f0, f1, f2, f3);
                return;
            }
            for (; c + ChunkBlock <= chunks; c += ChunkBlock)
            {
                int o = c * n;
                TVec a00 = TOps.Multiply(TOps.Load(acc + o), f0), a01 = TOps.Multiply(TOps.Load(acc + o + n), f0);
                TVec a02 = TOps.Multiply(TOps.Load(acc + o + 2 * n), f0), a03 = TOps.Multiply(TOps.Load(acc + o + 3 * n), f0);
                TVec a10 = TOps.Multiply(TOps.Load(acc1 + o), f1), a11 = TOps.Multiply(TOps.Load(acc1 + o + n), f1);
                TVec a12 = TOps.Multiply(TOps.Load(acc1 + o + 2 * n), f1), a13 = TOps.Multiply(TOps.Load(acc1 + o + 3 * n), f1);
                TVec a20 = TOps.Multiply(TOps.Load(acc2 + o), f2), a21 = TOps.Multiply(TOps.Load(acc2 + o + n), f2);
                TVec a22 = TOps.Multiply(TOps.Load(acc2 + o + 2 * n), f2), a23 = TOps.Multiply(TOps.Load(acc2 + o + 3 * n), f2);
                TVec a30 = TOps.Multiply(TOps.Load(acc3 + o), f3), a31 = TOps.Multiply(TOps.Load(acc3 + o + n), f3);
                TVec a32 = TOps.Multiply(TOps.Load(acc3 + o + 2 * n), f3), a33 = TOps.Multiply(TOps.Load(acc3 + o + 3 * n), f3);
                float* v = v0Row + o;
                for (int j = 0; j < keys; j++, v += vStride)
                {
                    TVec v0 = TOps.Load(v), v1 = TOps.Load(v + n), v2 = TOps.Load(v + 2 * n), v3 = TOps.Load(v + 3 * n);
                    TVec w = TOps.Create(p[j]);
                    a00 = TOps.MultiplyAdd(w, v0, a00); a01 = TOps.MultiplyAdd(w, v1, a01);
                    a02 = TOps.MultiplyAdd(w, v2, a02); a03 = TOps.MultiplyAdd(w, v3, a03);
                    w = TOps.Create(p1[j]);
                    a10 = TOps.MultiplyAdd(w, v0, a10); a11 = TOps.MultiplyAdd(w, v1, a11);
                    a12 = TOps.MultiplyAdd(w, v2, a12); a13 = TOps.MultiplyAdd(w, v3, a13);
                    w = TOps.Create(p2[j]);
                    a20 = TOps.MultiplyAdd(w, v0, a20); a21 = TOps.MultiplyAdd(w, v1, a21);
                    a22 = TOps.MultiplyAdd(w, v2, a22); a23 = TOps.MultiplyAdd(w, v3, a23);
                    w = TOps.Create(p3[j]);
                    a30 = TOps.MultiplyAdd(w, v0, a30); a31 = TOps.MultiplyAdd(w, v1, a31);
                    a32 = TOps.MultiplyAdd(w, v2, a32); a33 = TOps.MultiplyAdd(w, v3, a33);
                }
                TOps.Store(a00, acc + o); TOps.Store(a01, acc + o + n); TOps.Store(a02, acc + o + 2 * n); TOps.Store(a03, acc + o + 3 * n);
                TOps.Store(a10, acc1 + o); TOps.Store(a11, acc1 + o + n); TOps.Store(a12, acc1 + o + 2 * n); TOps.Store(a13, acc1 + o + 3 * n);
                TOps.Store(a20, acc2 + o); TOps.Store(a21, acc2 + o + n); TOps.Store(a22, acc2 + o + 2 * n); TOps.Store(a23, acc2 + o + 3 * n);
                TOps.Store(a30, acc3 + o); TOps.Store(a31, acc3 + o + n); TOps.Store(a32, acc3 + o + 2 * n); TOps.Store(a33, acc3 + o + 3 * n);
            }
            for (; c < chunks; c++)
            {
                int o = c * n;
                TVec a0 = TOps.Multiply(TOps.Load(acc + o), f0), a1 = TOps.Multiply(TOps.Load(acc1 + o), f1);
                TVec a2 = TOps.Multiply(TOps.Load(acc2 + o), f2), a3 = TOps.Multiply(TOps.Load(acc3 + o), f3);
                float* v = v0Row + o;
                for (int j = 0; j < keys; j++, v += vStride)
                {
                    TVec v0 = TOps.Load(v);
                    a0 = TOps.MultiplyAdd(TOps.Create(p[j]), v0, a0);
                    a1 = TOps.MultiplyAdd(TOps.Create(p1[j]), v0, a1);
                    a2 = TOps.MultiplyAdd(TOps.Create(p2[j]), v0, a2);
                    a3 = TOps.MultiplyAdd(TOps.Create(p3[j]), v0, a3);
                }
                TOps.Store(a0, acc + o); TOps.Store(a1, acc1 + o); TOps.Store(a2, acc2 + o); TOps.Store(a3, acc3 + o);
            }
        }

        /// <summary><see cref="AccumulateValues"/> for rows of exactly 5 vectors.</summary>
        private static void AccumulateValues4x5(float* p, int keys, float* v, nint vStride, int dPad, float* acc, TVec f0, TVec f1, TVec f2, TVec f3)
        {
            int n = TOps.Count;
            float* p1 = p + KeyBlock, p2 = p1 + KeyBlock, p3 = p2 + KeyBlock;
            float* acc1 = acc + dPad, acc2 = acc1 + dPad, acc3 = acc2 + dPad;
            TVec a00 = TOps.Multiply(TOps.Load(acc), f0), a01 = TOps.Multiply(TOps.Load(acc + n), f0), a02 = TOps.Multiply(TOps.Load(acc + 2 * n), f0);
            TVec a03 = TOps.Multiply(TOps.Load(acc + 3 * n), f0), a04 = TOps.Multiply(TOps.Load(acc + 4 * n), f0);
            TVec a10 = TOps.Multiply(TOps.Load(acc1), f1), a11 = TOps.Multiply(TOps.Load(acc1 + n), f1), a12 = TOps.Multiply(TOps.Load(acc1 + 2 * n), f1);
            TVec a13 = TOps.Multiply(TOps.Load(acc1 + 3 * n), f1), a14 = TOps.Multiply(TOps.Load(acc1 + 4 * n), f1);
            TVec a20 = TOps.Multiply(TOps.Load(acc2), f2), a21 = TOps.Multiply(TOps.Load(acc2 + n), f2), a22 = TOps.Multiply(TOps.Load(acc2 + 2 * n), f2);
            TVec a23 = TOps.Multiply(TOps.Load(acc2 + 3 * n), f2), a24 = TOps.Multiply(TOps.Load(acc2 + 4 * n), f2);
            TVec a30 = TOps.Multiply(TOps.Load(acc3), f3), a31 = TOps.Multiply(TOps.Load(acc3 + n), f3), a32 = TOps.Multiply(TOps.Load(acc3 + 2 * n), f3);
            TVec a33 = TOps.Multiply(TOps.Load(acc3 + 3 * n), f3), a34 = TOps.Multiply(TOps.Load(acc3 + 4 * n), f3);
            for (int j = 0; j < keys; j++, v += vStride)
            {
                TVec v0 = TOps.Load(v), v1 = TOps.Load(v + n), v2 = TOps.Load(v + 2 * n), v3 = TOps.Load(v + 3 * n), v4 = TOps.Load(v + 4 * n);
                TVec w = TOps.Create(p[j]);
                a00 = TOps.MultiplyAdd(w, v0, a00); a01 = TOps.MultiplyAdd(w, v1, a01); a02 = TOps.MultiplyAdd(w, v2, a02);
                a03 = TOps.MultiplyAdd(w, v3, a03); a04 = TOps.MultiplyAdd(w, v4, a04);
                w = TOps.Create(p1[j]);
                a10 = TOps.MultiplyAdd(w, v0, a10); a11 = TOps.MultiplyAdd(w, v1, a11); a12 = TOps.MultiplyAdd(w, v2, a12);
                a13 = TOps.MultiplyAdd(w, v3, a13); a14 = TOps.MultiplyAdd(w, v4, a14);
                w = TOps.Create(p2[j]);
                a20 = TOps.MultiplyAdd(w, v0, a20); a21 = TOps.MultiplyAdd(w, v1, a21); a22 = TOps.MultiplyAdd(w, v2, a22);
                a23 = TOps.MultiplyAdd(w, v3, a23); a24 = TOps.MultiplyAdd(w, v4, a24);
                w = TOps.Create(p3[j]);
                a30 = TOps.MultiplyAdd(w, v0, a30); a31 = TOps.MultiplyAdd(w, v1, a31); a32 = TOps.MultiplyAdd(w, v2, a32);
                a33 = TOps.MultiplyAdd(w, v3, a33); a34 = TOps.MultiplyAdd(w, v4, a34);
            }
            TOps.Store(a00, acc); TOps.Store(a01, acc + n); TOps.Store(a02, acc + 2 * n); TOps.Store(a03, acc + 3 * n); TOps.Store(a04, acc + 4 * n);
            TOps.Store(a10, acc1); TOps.Store(a11, acc1 + n); TOps.Store(a12, acc1 + 2 * n); TOps.Store(a13, acc1 + 3 * n); TOps.Store(a14, acc1 + 4 * n);
            TOps.Store(a20, acc2); TOps.Store(a21, acc2 + n); TOps.Store(a22, acc2 + 2 * n); TOps.Store(a23, acc2 + 3 * n); TOps.Store(a24, acc2 + 4 * n);
            TOps.Store(a30, acc3); TOps.Store(a31, acc3 + n); TOps.Store(a32, acc3 + 2 * n); TOps.Store(a33, acc3 + 3 * n); TOps.Store(a34, acc3 + 4 * n);
        }

        /// <summary>destination += source * factor.</summary>
        private static void AddScaled(float* source, float factor, float* destination, int length)
        {
            TVec f = TOps.Create(factor);
            int i = 0;
            for (; i + TOps.Count <= length; i += TOps.Count)
                TOps.Store(TOps.MultiplyAdd(TOps.Load(source + i), f, TOps.Load(destination + i)), destination + i);
            for (; i < length; i++)
                destination[i] += source[i] * factor;
        }

        private static void Scale(float* source, float factor, float* destination, int length)
        {
            TVec f = TOps.Create(factor);
            int i = 0;
            for (; i + TOps.Count <= length; i += TOps.Count)
                TOps.Store(TOps.Multiply(TOps.Load(source + i), f), destination + i);
            for (; i < length; i++)
                destination[i] = source[i] * factor;
        }
    }
}
