using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>
/// Supplies the rows of an [N, K] weight matrix widened to fp32, a block at a time, for the packed GEMM: how the
/// weights are stored (fp32/bf16/f16 in place, or quantized blocks in the Quant library) stays behind this seam.
/// A struct, so that the GEMM is compiled once per source and the call is inlined.
/// </summary>
internal unsafe interface IWeightRows
{
    /// <summary>
    /// Writes weights W[row + r, k0..k1) as fp32 to <c>destination + r · stride</c> for r &lt; <paramref name="count"/>.
    /// <paramref name="k0"/> is 0 or a multiple of <see cref="PackedGemm.DepthBlock"/> (so of every quantization block size).
    /// Runs on several threads at once.
    /// </summary>
    void Widen(int row, int count, int k0, int k1, float* destination, int stride);

    /// <summary>
    /// Hints that W[row .. row + count, k0..k1) is widened soon (the GEMM asks for the next micro-panel's rows while it
    /// computes with this one, so the weights stream in from memory under the arithmetic). May do nothing.
    /// </summary>
    void Prefetch(int row, int count, int k0, int k1);
}

/// <summary>The fp32/bf16/f16 weights of a <see cref="WeightMatrix"/>, widened with the kernel's vector width.</summary>
internal readonly unsafe struct StoredWeightRows<TOps, TVec, TReader>(byte* data, int cols) : IWeightRows
    where TOps : struct, ISimdOps<TOps, TVec>
    where TVec : unmanaged
    where TReader : struct, IWeightReader
{
    public void Widen(int row, int count, int k0, int k1, float* destination, int stride)
    {
        nint rowBytes = (nint)cols * TReader.ElementSize;
        nint vectorEnd = k0 + ((k1 - k0) & ~(nint)(TOps.Count - 1));
        for (int r = 0; r < count; r++)
        {
            byte* source = data + (row + r) * rowBytes;
            float* target = destination + (nint)r * stride - k0;
            nint i = k0;
            for (; i < vectorEnd; i += TOps.Count)
                TOps.Store(TReader.Load<TOps, TVec>(source, i), target + i);
            for (; i < k1; i++)
                target[i] = TReader.LoadScalar(source, i);
        }
    }

    public void Prefetch(int row, int count, int k0, int k1)
    {
        nint rowBytes = (nint)cols * TReader.ElementSize;
        for (int r = 0; r < count; r++)
        {
            byte* source = data + (row + r) * rowBytes;
            PackedGemm.PrefetchLines(source + k0 * TReader.ElementSize, source + k1 * TReader.ElementSize);
        }
    }
}

/// <summary>
/// y = x Wᵀ + b for many x rows: a GotoBLAS-style outer-product GEMM. The x rows are packed (transposed) into panels
/// of <c>2 · Count</c> rows, so one register tile holds 2 vectors along M times <see cref="Broadcasts"/> W rows; W is
/// widened to fp32 a K block of <see cref="Broadcasts"/> rows at a time (never as a whole) and each weight is
/// broadcast from that small L1-resident micro-panel. Tiles accumulate over K blocks in a per-thread buffer laid out
/// [n][m] (the register tile's own layout), which is transposed into y with the bias and soft-cap once it is complete.
/// M and N tails are zero-padded in the packed operands, so the micro-kernel has no tails at all (K has none either:
/// it runs along K one element at a time).
/// </summary>
internal static unsafe class PackedGemm
{
    /// <summary>W rows per micro-panel: each is broadcast against 2 vectors of x rows (24 accumulators).</summary>
    internal const int Broadcasts = 12;
    private const int HalfBroadcasts = Broadcasts / 2;
    /// <summary>K block: a micro-panel of W (Broadcasts x DepthBlock fp32) fits in L1, an x block in L2.</summary>
    internal const int DepthBlock = 256;
    // Most x panels per row block, so that the packed x block (rows x DepthBlock) and the [n][m] sums stay in L2
    // (10 panels of 32 rows take a Gemma prompt of 256 image tokens plus text in one block).
    private const int MaxPanelsPerRowBlock = 10;
    // Most micro-panels (W rows / Broadcasts) per work item; items are then balanced between the threads.
    private const int MaxMicroPanelsPerItem = 20;
    // Below this many multiply-adds the fork/join costs more than it saves.
    private const long ParallelThreshold = 1L << 20;

    // The calling thread's packed x (one row block, all of K) and each thread's W micro-panel and [n][m] sums: kept, so warm calls allocate nothing.
    [ThreadStatic] private static float[]? t_packedX;
    [ThreadStatic] private static float[]? t_packedW;
    [ThreadStatic] private static float[]? t_sums;

    /// <summary>
    /// y[m, n] = sum_k x[m, k] · W[n, k] + bias[n] for m &lt; rows, then y = cap · tanh(y / cap) when
    /// <paramref name="softCap"/> is positive, with W [n, k] supplied by <paramref name="w"/> (the Quant library's
    /// weights come in here). The operands are checked as <see cref="MatMul.CheckOperands"/> does.
    /// </summary>
    public static void Multiply<TRows>(ReadOnlySpan<float> x, int rows, in TRows w, int n, int k, ReadOnlySpan<float> bias, Span<float> y, float softCap)
        where TRows : struct, IWeightRows =>
        Multiply(x, rows, w, n, k, bias, y, softCap, SimdWidths.Best);

    /// <summary>As the overload above, with the vector width chosen by the caller (tests run every width).</summary>
    public static void Multiply<TRows>(ReadOnlySpan<float> x, int rows, in TRows w, int n, int k, ReadOnlySpan<float> bias, Span<float> y, float softCap, SimdWidth width)
        where TRows : struct, IWeightRows
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(n);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(k);
        if (!(softCap >= 0f) || float.IsInfinity(softCap))
            throw new ArgumentOutOfRangeException(nameof(softCap), softCap, "the soft-cap must be 0 (none) or positive and finite");
        MatMul.CheckOperands(x, rows, n, k, bias, y);
        if (rows == 0)
            return;
        fixed (float* xp = x)
        fixed (float* bp = bias)
        fixed (float* yp = y)
        {
            float* biasPointer = bias.IsEmpty ? null : bp;
            switch (width)
            {
                case SimdWidth.Vector512: Multiply<Simd512, Vector512<float>, TRows>(xp, rows, n, k, w, biasPointer, yp, softCap); break;
                case SimdWidth.Vector256: Multiply<Simd256, Vector256<float>, TRows>(xp, rows, n, k, w, biasPointer, yp, softCap); break;
                case SimdWidth.Vector128: Multiply<Simd128, Vector128<float>, TRows>(xp, rows, n, k, w, biasPointer, yp, softCap); break;
                default: Multiply<SimdScalar, float, TRows>(xp, rows, n, k, w, biasPointer, yp, softCap); break;
            }
        }
    }

    /// <summary>y[m, n] = sum_k x[m, k] · W[n, k] + bias[n] for m &lt; rows, then the soft-cap when it is positive.</summary>
    public static void Multiply<TOps, TVec, TRows>(float* x, int rows, int n, int k, in TRows w, float* bias, float* y, float softCap)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TRows : struct, IWeightRows
    {
        int panelRows = 2 * TOps.Count;
        int panels = (rows + panelRows - 1) / panelRows;
        int rowBlocks = (panels + MaxPanelsPerRowBlock - 1) / MaxPanelsPerRowBlock;
        int microPanels = (n + Broadcasts - 1) / Broadcasts;
        bool parallel = (long)rows * n * k >= ParallelThreshold && KernelThreading.MaxThreads > 1;
        int items = (microPanels + MaxMicroPanelsPerItem - 1) / MaxMicroPanelsPerItem;
        if (parallel)
        {
            // A whole number of items per thread, so that neither waits for the other at the end.
            int threads = KernelThreading.MaxThreads;
            items = Math.Min(microPanels, (items + threads - 1) / threads * threads);
        }

        int mostPanels = (panels + rowBlocks - 1) / rowBlocks;
        long packedLength = (long)mostPanels * panelRows * k + LineFloats;
        float[] packedX = t_packedX is { } existing && existing.Length >= packedLength
            ? existing
            : (t_packedX = GC.AllocateUninitializedArray<float>(checked((int)packedLength)));
        fixed (float* unaligned = packedX)
        {
            float* xp = AlignToLine(unaligned);
            for (int block = 0; block < rowBlocks; block++)
            {
                // Row blocks split the panels evenly.
                int p0 = (int)((long)block * panels / rowBlocks), p1 = (int)((long)(block + 1) * panels / rowBlocks);
                var job = new Job<TOps, TVec, TRows>(x, xp, rows, n, k, w, bias, y, softCap, p0, p1, microPanels, items);
                KernelThreading.For(p1 - p0, parallel, new PackRows<TOps, TVec, TRows>(job));
                KernelThreading.For(items, parallel, job);
            }
        }
    }

    // The packed buffers start on a cache line, so that no 64-byte vector load or store straddles two (arrays are
    // only 8- or 16-byte aligned); their arrays hold one line more than they use.
    private const int LineFloats = 64 / sizeof(float);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float* AlignToLine(float* pointer) => (float*)(((nint)pointer + 63) & ~(nint)63);

    /// <summary>Asks for every cache line of [start, end) to be brought into L2 (where the CPU has a prefetch instruction).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void PrefetchLines(byte* start, byte* end)
    {
        if (!Sse.IsSupported)
            return;
        // From the line holding the first byte: the rows are rarely aligned to cache lines.
        for (byte* line = (byte*)((nint)start & ~(nint)63); line < end; line += 64)
            Sse.Prefetch1(line);
    }

    /// <summary>
    /// destination row c = column c of the 16 x 16 block of 32-bit values at <paramref name="source"/> (rows
    /// <paramref name="sourceStride"/> floats apart); destination rows are <paramref name="destinationStride"/> floats
    /// apart. Data movement only, so any 32-bit values (the Quant library's int16 code pairs too) come out bit for bit.
    /// </summary>
    internal static void Transpose16(float* source, nint sourceStride, float* destination, nint destinationStride) =>
        Transpose16(source, sourceStride, destination, destinationStride, default, addVector: false);

    /// <summary>As the overload above, with <paramref name="add"/> added to every destination row (a bias along the row).</summary>
    internal static void Transpose16(float* source, nint sourceStride, float* destination, nint destinationStride, Vector512<float> add) =>
        Transpose16(source, sourceStride, destination, destinationStride, add, addVector: true);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose16(float* source, nint sourceStride, float* destination, nint destinationStride, Vector512<float> add, bool addVector)
    {
        // Pairs of rows interleaved, then groups of 4 rows within each 128-bit lane, then the lanes themselves.
        var (t0, t1) = InterleaveRows(source, sourceStride);
        var (t2, t3) = InterleaveRows(source + 2 * sourceStride, sourceStride);
        var (t4, t5) = InterleaveRows(source + 4 * sourceStride, sourceStride);
        var (t6, t7) = InterleaveRows(source + 6 * sourceStride, sourceStride);
        var (t8, t9) = InterleaveRows(source + 8 * sourceStride, sourceStride);
        var (t10, t11) = InterleaveRows(source + 10 * sourceStride, sourceStride);
        var (t12, t13) = InterleaveRows(source + 12 * sourceStride, sourceStride);
        var (t14, t15) = InterleaveRows(source + 14 * sourceStride, sourceStride);

        // u[4g + c], lane L: rows 4g..4g+3 of column 4L + c.
        Vector512<float> u0 = Avx512F.Shuffle(t0, t2, 0x44), u1 = Avx512F.Shuffle(t0, t2, 0xEE);
        Vector512<float> u2 = Avx512F.Shuffle(t1, t3, 0x44), u3 = Avx512F.Shuffle(t1, t3, 0xEE);
        Vector512<float> u4 = Avx512F.Shuffle(t4, t6, 0x44), u5 = Avx512F.Shuffle(t4, t6, 0xEE);
        Vector512<float> u6 = Avx512F.Shuffle(t5, t7, 0x44), u7 = Avx512F.Shuffle(t5, t7, 0xEE);
        Vector512<float> u8 = Avx512F.Shuffle(t8, t10, 0x44), u9 = Avx512F.Shuffle(t8, t10, 0xEE);
        Vector512<float> u10 = Avx512F.Shuffle(t9, t11, 0x44), u11 = Avx512F.Shuffle(t9, t11, 0xEE);
        Vector512<float> u12 = Avx512F.Shuffle(t12, t14, 0x44), u13 = Avx512F.Shuffle(t12, t14, 0xEE);
        Vector512<float> u14 = Avx512F.Shuffle(t13, t15, 0x44), u15 = Avx512F.Shuffle(t13, t15, 0xEE);

        LaneTranspose(u0, u4, u8, u12, destination, destinationStride, add, addVector);
        LaneTranspose(u1, u5, u9, u13, destination + destinationStride, destinationStride, add, addVector);
        LaneTranspose(u2, u6, u10, u14, destination + 2 * destinationStride, destinationStride, add, addVector);
        LaneTranspose(u3, u7, u11, u15, destination + 3 * destinationStride, destinationStride, add, addVector);
    }

    /// <summary>Rows <paramref name="row"/> and the next one interleaved element by element (low and high halves of each 128-bit lane).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector512<float> Low, Vector512<float> High) InterleaveRows(float* row, nint stride)
    {
        Vector512<float> a = Vector512.Load(row), b = Vector512.Load(row + stride);
        return (Avx512F.UnpackLow(a, b), Avx512F.UnpackHigh(a, b));
    }

    /// <summary>Output rows c, 4 + c, 8 + c, 12 + c: lane L of each from lane L of a, b, c, d in turn.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void LaneTranspose(Vector512<float> a, Vector512<float> b, Vector512<float> c, Vector512<float> d,
        float* destination, nint destinationStride, Vector512<float> add, bool addVector)
    {
        Vector512<float> abLow = Avx512F.Shuffle4x128(a, b, 0x44), abHigh = Avx512F.Shuffle4x128(a, b, 0xEE);
        Vector512<float> cdLow = Avx512F.Shuffle4x128(c, d, 0x44), cdHigh = Avx512F.Shuffle4x128(c, d, 0xEE);
        Vector512<float> row0 = Avx512F.Shuffle4x128(abLow, cdLow, 0x88), row4 = Avx512F.Shuffle4x128(abLow, cdLow, 0xDD);
        Vector512<float> row8 = Avx512F.Shuffle4x128(abHigh, cdHigh, 0x88), row12 = Avx512F.Shuffle4x128(abHigh, cdHigh, 0xDD);
        if (addVector)
        {
            row0 += add; row4 += add; row8 += add; row12 += add;
        }
        row0.Store(destination);
        row4.Store(destination + 4 * destinationStride);
        row8.Store(destination + 8 * destinationStride);
        row12.Store(destination + 12 * destinationStride);
    }

    private readonly struct PackRows<TOps, TVec, TRows>(Job<TOps, TVec, TRows> job) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TRows : struct, IWeightRows
    {
        public void Run(int item) => job.PackPanel(item);
    }

    private readonly struct Job<TOps, TVec, TRows>(
        float* x, float* packedX, int rows, int n, int k, TRows w, float* bias, float* y, float softCap,
        int firstPanel, int endPanel, int microPanels, int items) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TRows : struct, IWeightRows
    {
        private static int PanelRows => 2 * TOps.Count;

        /// <summary>
        /// Packs the x rows of panel <paramref name="index"/> (of this row block), zero rows past the end. Each K block
        /// of the row block is contiguous, [panel][k][PanelRows], so the block the micro-kernels sweep is one span of memory.
        /// </summary>
        public void PackPanel(int index)
        {
            int panelRows = PanelRows;
            int panels = endPanel - firstPanel;
            int m0 = (firstPanel + index) * panelRows;
            int valid = Math.Min(panelRows, rows - m0);
            // Whole groups of 16 rows go through 16 x 16 register transposes.
            int vectorRows = typeof(TOps) == typeof(Simd512) && Avx512F.IsSupported ? valid & ~15 : 0;
            for (int k0 = 0; k0 < k; k0 += DepthBlock)
            {
                int depth = Math.Min(DepthBlock, k - k0);
                float* block = packedX + (nint)k0 * panels * panelRows + (nint)index * depth * panelRows;
                int vectorDepth = depth & ~15;
                for (int r = 0; r < vectorRows; r += 16)
                {
                    for (int i = 0; i < vectorDepth; i += 16)
                        Transpose16(x + (nint)(m0 + r) * k + k0 + i, k, block + (nint)i * panelRows + r, panelRows);
                }
                // The rest element by element, in chunks of K so that the part of the panel being written stays in L1.
                const int Chunk = 64;
                for (int i0 = 0; i0 < depth; i0 += Chunk)
                {
                    int i1 = Math.Min(depth, i0 + Chunk);
                    for (int r = 0; r < panelRows; r++)
                    {
                        int start = r < vectorRows ? Math.Max(i0, vectorDepth) : i0;
                        float* target = block + r;
                        if (r < valid)
                        {
                            float* source = x + (nint)(m0 + r) * k + k0;
                            for (int i = start; i < i1; i++)
                                target[(nint)i * panelRows] = source[i];
                        }
                        else
                        {
                            for (int i = start; i < i1; i++)
                                target[(nint)i * panelRows] = 0f;
                        }
                    }
                }
            }
        }

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Run(int item)
        {
            int panelRows = PanelRows;
            int panels = endPanel - firstPanel;
            int m0 = firstPanel * panelRows;
            int m1 = Math.Min(rows, endPanel * panelRows);
            int sumStride = panels * panelRows;
            // This item's micro-panels, an even share of all of them.
            int j0 = (int)((long)item * microPanels / items), j1 = (int)((long)(item + 1) * microPanels / items);
            int n0 = j0 * Broadcasts, n1 = Math.Min(n, j1 * Broadcasts);
            int blockRows = (j1 - j0) * Broadcasts;

            int sumLength = blockRows * sumStride;
            float[] packedW = t_packedW ??= GC.AllocateUninitializedArray<float>(Broadcasts * DepthBlock + LineFloats);
            float[] sums = t_sums is { } s && s.Length >= sumLength + LineFloats ? s : (t_sums = GC.AllocateUninitializedArray<float>(sumLength + LineFloats));
            fixed (float* unalignedW = packedW)
            fixed (float* unalignedSums = sums)
            {
                float* wPanel = AlignToLine(unalignedW), cp = AlignToLine(unalignedSums);
                for (int k0 = 0; k0 < k; k0 += DepthBlock)
                {
                    int depth = Math.Min(DepthBlock, k - k0);
                    bool accumulate = k0 > 0;
                    for (int j = j0; j < j1; j++)
                    {
                        // Widen the micro-panel's W rows for this K block (rows past N are zeros: their sums are never
                        // stored), and ask for the next micro-panel's, which then arrive from memory under this one's arithmetic.
                        int row = j * Broadcasts, count = Math.Min(Broadcasts, n - row);
                        w.Widen(row, count, k0, k0 + depth, wPanel, DepthBlock);
                        for (int r = count; r < Broadcasts; r++)
                            new Span<float>(wPanel + (nint)r * DepthBlock, depth).Clear();
                        if (j + 1 < j1)
                            w.Prefetch(row + Broadcasts, Math.Min(Broadcasts, n - row - Broadcasts), k0, k0 + depth);
                        else if (k0 + DepthBlock < k)
                            w.Prefetch(n0, Math.Min(Broadcasts, n - n0), k0 + DepthBlock, Math.Min(k, k0 + 2 * DepthBlock));

                        // The W micro-panel stays in L1 while the x panels of the block stream past it from L2.
                        float* sumRow = cp + (nint)(j - j0) * Broadcasts * sumStride;
                        for (int p = 0; p < panels; p++)
                        {
                            float* xPanel = packedX + ((nint)k0 * panels + (nint)p * depth) * panelRows;
                            // A last panel with at most one vector of real rows skips the other (zero) vector.
                            if (m1 - (m0 + p * panelRows) <= TOps.Count)
                                Kernel1(xPanel, wPanel, depth, sumRow + p * panelRows, sumStride, accumulate);
                            else if (SplitTile)
                            {
                                Kernel2Half(xPanel, wPanel, depth, sumRow + p * panelRows, sumStride, accumulate);
                                Kernel2Half(xPanel, wPanel + HalfBroadcasts * DepthBlock, depth, sumRow + p * panelRows + HalfBroadcasts * sumStride, sumStride, accumulate);
                            }
                            else
                                Kernel2(xPanel, wPanel, depth, sumRow + p * panelRows, sumStride, accumulate);
                        }
                    }
                }
                Store(cp, sumStride, m0, m1, n0, n1);
            }
        }

        /// <summary>y[m0..m1, n0..n1] = sums[n][m] + bias, then the soft-cap, while the rows are in cache.</summary>
        private void Store(float* sums, int sumStride, int m0, int m1, int n0, int n1)
        {
            int m = m0;
            if (typeof(TOps) == typeof(Simd512) && Avx512F.IsSupported)
            {
                // 16 x 16 blocks transposed in registers; the rest (N tail, last rows) element by element.
                int nVectorEnd = n0 + ((n1 - n0) & ~15);
                for (; m + 16 <= m1; m += 16)
                {
                    float* yRows = y + (nint)m * n;
                    for (int c = n0; c < nVectorEnd; c += 16)
                        Transpose16(sums + (nint)(c - n0) * sumStride + (m - m0), sumStride, yRows + c, n,
                            bias == null ? Vector512<float>.Zero : Vector512.Load(bias + c));
                    for (int r = 0; r < 16; r++)
                    {
                        float* yRow = yRows + (nint)r * n;
                        float* column = sums + (m + r - m0);
                        for (int c = nVectorEnd; c < n1; c++)
                            yRow[c] = column[(nint)(c - n0) * sumStride] + (bias == null ? 0f : bias[c]);
                        if (softCap > 0f)
                        {
                            var tileRow = new Span<float>(yRow + n0, n1 - n0);
                            Activations.SoftCap(tileRow, tileRow, softCap);
                        }
                    }
                }
            }
            for (; m < m1; m++)
            {
                float* yRow = y + (nint)m * n;
                float* column = sums + (m - m0);
                for (int c = n0; c < n1; c++)
                    yRow[c] = column[(nint)(c - n0) * sumStride] + (bias == null ? 0f : bias[c]);
                if (softCap > 0f)
                {
                    var tileRow = new Span<float>(yRow + n0, n1 - n0);
                    Activations.SoftCap(tileRow, tileRow, softCap);
                }
            }
        }

        /// <summary>sums[12 W rows][2 vectors of x rows] (+)= x panel · W micro-panel over <paramref name="depth"/> K elements.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Kernel2(float* x, float* w, int depth, float* sums, nint sumStride, bool accumulate)
        {
            TVec a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero, a4 = TOps.Zero, a5 = TOps.Zero;
            TVec a6 = TOps.Zero, a7 = TOps.Zero, a8 = TOps.Zero, a9 = TOps.Zero, a10 = TOps.Zero, a11 = TOps.Zero;
            TVec b0 = TOps.Zero, b1 = TOps.Zero, b2 = TOps.Zero, b3 = TOps.Zero, b4 = TOps.Zero, b5 = TOps.Zero;
            TVec b6 = TOps.Zero, b7 = TOps.Zero, b8 = TOps.Zero, b9 = TOps.Zero, b10 = TOps.Zero, b11 = TOps.Zero;
            int count = TOps.Count;
            for (int i = 0; i < depth; i++)
            {
                TVec u = TOps.Load(x), v = TOps.Load(x + count);
                TVec s = TOps.Create(w[0]); a0 = TOps.MultiplyAdd(u, s, a0); b0 = TOps.MultiplyAdd(v, s, b0);
                s = TOps.Create(w[1 * DepthBlock]); a1 = TOps.MultiplyAdd(u, s, a1); b1 = TOps.MultiplyAdd(v, s, b1);
                s = TOps.Create(w[2 * DepthBlock]); a2 = TOps.MultiplyAdd(u, s, a2); b2 = TOps.MultiplyAdd(v, s, b2);
                s = TOps.Create(w[3 * DepthBlock]); a3 = TOps.MultiplyAdd(u, s, a3); b3 = TOps.MultiplyAdd(v, s, b3);
                s = TOps.Create(w[4 * DepthBlock]); a4 = TOps.MultiplyAdd(u, s, a4); b4 = TOps.MultiplyAdd(v, s, b4);
                s = TOps.Create(w[5 * DepthBlock]); a5 = TOps.MultiplyAdd(u, s, a5); b5 = TOps.MultiplyAdd(v, s, b5);
                s = TOps.Create(w[6 * DepthBlock]); a6 = TOps.MultiplyAdd(u, s, a6); b6 = TOps.MultiplyAdd(v, s, b6);
                s = TOps.Create(w[7 * DepthBlock]); a7 = TOps.MultiplyAdd(u, s, a7); b7 = TOps.MultiplyAdd(v, s, b7);
                s = TOps.Create(w[8 * DepthBlock]); a8 = TOps.MultiplyAdd(u, s, a8); b8 = TOps.MultiplyAdd(v, s, b8);
                s = TOps.Create(w[9 * DepthBlock]); a9 = TOps.MultiplyAdd(u, s, a9); b9 = TOps.MultiplyAdd(v, s, b9);
                s = TOps.Create(w[10 * DepthBlock]); a10 = TOps.MultiplyAdd(u, s, a10); b10 = TOps.MultiplyAdd(v, s, b10);
                s = TOps.Create(w[11 * DepthBlock]); a11 = TOps.MultiplyAdd(u, s, a11); b11 = TOps.MultiplyAdd(v, s, b11);
                x += 2 * count;
                w++;
            }
            Put(sums, a0, accumulate); Put(sums + count, b0, accumulate); sums += sumStride;
            Put(sums, a1, accumulate); Put(sums + count, b1, accumulate); sums += sumStride;
            Put(sums, a2, accumulate); Put(sums + count, b2, accumulate); sums += sumStride;
            Put(sums, a3, accumulate); Put(sums + count, b3, accumulate); sums += sumStride;
            Put(sums, a4, accumulate); Put(sums + count, b4, accumulate); sums += sumStride;
            Put(sums, a5, accumulate); Put(sums + count, b5, accumulate); sums += sumStride;
            Put(sums, a6, accumulate); Put(sums + count, b6, accumulate); sums += sumStride;
            Put(sums, a7, accumulate); Put(sums + count, b7, accumulate); sums += sumStride;
            Put(sums, a8, accumulate); Put(sums + count, b8, accumulate); sums += sumStride;
            Put(sums, a9, accumulate); Put(sums + count, b9, accumulate); sums += sumStride;
            Put(sums, a10, accumulate); Put(sums + count, b10, accumulate); sums += sumStride;
            Put(sums, a11, accumulate); Put(sums + count, b11, accumulate);
        }

        /// <summary>
        /// True where 24 accumulators would not fit in the registers: x64 without AVX-512 has 16 vector registers, so
        /// each micro-panel is swept as two halves of 6 W rows (12 accumulators). Vector128 on x64 is the best width
        /// only on CPUs without AVX, so it always takes the halves (which also keeps them tested on AVX-512 machines).
        /// </summary>
        private static bool SplitTile => X86Base.IsSupported && (!Avx512F.IsSupported || typeof(TOps) == typeof(Simd128));

        /// <summary>As <see cref="Kernel2"/> for 6 W rows: 12 accumulators, for CPUs with 16 vector registers.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Kernel2Half(float* x, float* w, int depth, float* sums, nint sumStride, bool accumulate)
        {
            TVec a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero, a4 = TOps.Zero, a5 = TOps.Zero;
            TVec b0 = TOps.Zero, b1 = TOps.Zero, b2 = TOps.Zero, b3 = TOps.Zero, b4 = TOps.Zero, b5 = TOps.Zero;
            int count = TOps.Count;
            for (int i = 0; i < depth; i++)
            {
                TVec u = TOps.Load(x), v = TOps.Load(x + count);
                TVec s = TOps.Create(w[0]); a0 = TOps.MultiplyAdd(u, s, a0); b0 = TOps.MultiplyAdd(v, s, b0);
                s = TOps.Create(w[1 * DepthBlock]); a1 = TOps.MultiplyAdd(u, s, a1); b1 = TOps.MultiplyAdd(v, s, b1);
                s = TOps.Create(w[2 * DepthBlock]); a2 = TOps.MultiplyAdd(u, s, a2); b2 = TOps.MultiplyAdd(v, s, b2);
                s = TOps.Create(w[3 * DepthBlock]); a3 = TOps.MultiplyAdd(u, s, a3); b3 = TOps.MultiplyAdd(v, s, b3);
                s = TOps.Create(w[4 * DepthBlock]); a4 = TOps.MultiplyAdd(u, s, a4); b4 = TOps.MultiplyAdd(v, s, b4);
                s = TOps.Create(w[5 * DepthBlock]); a5 = TOps.MultiplyAdd(u, s, a5); b5 = TOps.MultiplyAdd(v, s, b5);
                x += 2 * count;
                w++;
            }
            Put(sums, a0, accumulate); Put(sums + count, b0, accumulate); sums += sumStride;
            Put(sums, a1, accumulate); Put(sums + count, b1, accumulate); sums += sumStride;
            Put(sums, a2, accumulate); Put(sums + count, b2, accumulate); sums += sumStride;
            Put(sums, a3, accumulate); Put(sums + count, b3, accumulate); sums += sumStride;
            Put(sums, a4, accumulate); Put(sums + count, b4, accumulate); sums += sumStride;
            Put(sums, a5, accumulate); Put(sums + count, b5, accumulate);
        }

        /// <summary>As <see cref="Kernel2"/> for a last panel whose second vector holds only padding.</summary>
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private static void Kernel1(float* x, float* w, int depth, float* sums, nint sumStride, bool accumulate)
        {
            TVec a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero, a4 = TOps.Zero, a5 = TOps.Zero;
            TVec a6 = TOps.Zero, a7 = TOps.Zero, a8 = TOps.Zero, a9 = TOps.Zero, a10 = TOps.Zero, a11 = TOps.Zero;
            int step = 2 * TOps.Count;
            for (int i = 0; i < depth; i++)
            {
                TVec u = TOps.Load(x);
                a0 = TOps.MultiplyAdd(u, TOps.Create(w[0]), a0);
                a1 = TOps.MultiplyAdd(u, TOps.Create(w[1 * DepthBlock]), a1);
                a2 = TOps.MultiplyAdd(u, TOps.Create(w[2 * DepthBlock]), a2);
                a3 = TOps.MultiplyAdd(u, TOps.Create(w[3 * DepthBlock]), a3);
                a4 = TOps.MultiplyAdd(u, TOps.Create(w[4 * DepthBlock]), a4);
                a5 = TOps.MultiplyAdd(u, TOps.Create(w[5 * DepthBlock]), a5);
                a6 = TOps.MultiplyAdd(u, TOps.Create(w[6 * DepthBlock]), a6);
                a7 = TOps.MultiplyAdd(u, TOps.Create(w[7 * DepthBlock]), a7);
                a8 = TOps.MultiplyAdd(u, TOps.Create(w[8 * DepthBlock]), a8);
                a9 = TOps.MultiplyAdd(u, TOps.Create(w[9 * DepthBlock]), a9);
                a10 = TOps.MultiplyAdd(u, TOps.Create(w[10 * DepthBlock]), a10);
                a11 = TOps.MultiplyAdd(u, TOps.Create(w[11 * DepthBlock]), a11);
                x += step;
                w++;
            }
            Put(sums, a0, accumulate); sums += sumStride;
            Put(sums, a1, accumulate); sums += sumStride;
            Put(sums, a2, accumulate); sums += sumStride;
            Put(sums, a3, accumulate); sums += sumStride;
            Put(sums, a4, accumulate); sums += sumStride;
            Put(sums, a5, accumulate); sums += sumStride;
            Put(sums, a6, accumulate); sums += sumStride;
            Put(sums, a7, accumulate); sums += sumStride;
            Put(sums, a8, accumulate); sums += sumStride;
            Put(sums, a9, accumulate); sums += sumStride;
            Put(sums, a10, accumulate); sums += sumStride;
            Put(sums, a11, accumulate);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Put(float* target, TVec value, bool accumulate) =>
            TOps.Store(accumulate ? TOps.Add(TOps.Load(target), value) : value, target);
    }
}
