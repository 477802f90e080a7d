using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>Which kernel multiplies many x rows (prefill, vision) by q8 or nf4 weights.</summary>
public enum QuantPrefillKernel
{
    /// <summary>
    /// The fastest kernel that keeps the activations' precision: int16 activations from <see cref="QuantMatMul.IntegerMinRows"/>
    /// rows where the CPU has integer multiply-add, else the panels.
    /// </summary>
    Auto,
    /// <summary>W dequantized a panel at a time into fp32 and run through the fp32 GEMM: activations stay fp32.</summary>
    DequantizedPanels,
    /// <summary>Activations quantized to int16 blocks of 32 (one fp32 scale each), <c>vpmaddwd</c> on AVX-512BW / AVX2 / SSE2 + FMA.</summary>
    Int16Activations,
    /// <summary>
    /// Activations quantized to int8 blocks of 32, <c>vpdpbusd</c> on AVX-VNNI: the fastest, and the least accurate
    /// (the activations are rounded about as coarsely as the weights). Without VNNI, as <see cref="Int16Activations"/>.
    /// </summary>
    Int8Activations,
}

/// <summary>
/// y = x Wᵀ + b with W a <see cref="QuantizedMatrix"/>. Few x rows (decode): a GEMV that streams the packed blocks once
/// and dequantizes them in registers. Many x rows (prefill, vision): q8 and nf4 weights meet activations quantized to int16
/// (or int8) blocks in integer multiply-adds (<see cref="IntegerGemm"/>, chosen by <see cref="PrefillKernel"/>); on CPUs
/// without integer multiply-add (or when chosen) W is dequantized a K block of a few rows at a time straight into the
/// panels of the packed fp32 GEMM (<see cref="PackedGemm"/>).
/// </summary>
public static unsafe class QuantMatMul
{
    internal enum GemvPath { Scalar, Vector256, Vector512 }

    /// <summary>Up to this many x rows take the streaming GEMV (each W block is read once per group of 4 rows).</summary>
    public const int GemvMaxRows = 4;
    // W rows per GEMV work item: enough to amortize the scheduling, small enough to balance the threads.
    private const int GemvRowsPerItem = 32;
    // Below this many weights (about 10 µs of work) the GEMV runs on the calling thread: waking a second thread costs as much.
    private const long GemvParallelThreshold = 1L << 20;

    /// <summary>y[m, n] = sum_k x[m, k] · W[n, k] + bias[n] for m &lt; rows; then y = cap · tanh(y / cap) when <paramref name="outputSoftCap"/> &gt; 0.</summary>
    public static void Multiply(ReadOnlySpan<float> x, int rows, QuantizedMatrix w, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap = 0f) =>
        Multiply(x, rows, w, bias, y, outputSoftCap, BestGemvPath);

    /// <summary>
    /// From this many x rows <see cref="QuantPrefillKernel.Auto"/> takes the int16-activation kernel (measured faster than
    /// the panels on every Gemma and SigLIP shape at 16 and 256 rows; at 5 rows it loses on some, where the padding of
    /// the x rows to whole micro-kernels and the per-item copy of W cost more than the multiply-adds save). nf4 weights
    /// follow the same rule: at 16 rows they measured level with their panels (0.9-1.1x), at 32 rows 1.2-1.5x faster.
    /// </summary>
    public const int IntegerMinRows = 16;

    /// <summary>
    /// The kernel for more than <see cref="GemvMaxRows"/> x rows of q8 or nf4 weights, process-wide (default
    /// <see cref="QuantPrefillKernel.Auto"/>).
    /// </summary>
    public static QuantPrefillKernel PrefillKernel { get; set; } = QuantPrefillKernel.Auto;

    /// <summary>The integer path a many-row call with these weights takes under <see cref="PrefillKernel"/>; None: the fp32 panels (or the GEMV for few rows).</summary>
    internal static IntegerGemm.Path PrefillPath(int rows, QuantizedMatrix w)
    {
        if (rows <= GemvMaxRows)
            return IntegerGemm.Path.None;
        return PrefillKernel switch
        {
            QuantPrefillKernel.DequantizedPanels => IntegerGemm.Path.None,
            QuantPrefillKernel.Int8Activations when IntegerGemm.BestInt8 != IntegerGemm.Path.None => IntegerGemm.BestInt8,
            QuantPrefillKernel.Auto when rows < IntegerMinRows => IntegerGemm.Path.None,
            _ => IntegerGemm.BestInt16,
        };
    }

    /// <summary>The widest GEMV this CPU runs: AVX-512, else AVX2 + FMA, else the portable scalar loop.</summary>
    internal static GemvPath BestGemvPath { get; } =
        Avx512F.IsSupported && Avx512BW.IsSupported ? GemvPath.Vector512 :
        Avx2.IsSupported && Fma.IsSupported ? GemvPath.Vector256 : GemvPath.Scalar;

    /// <summary>As the public overload with the GEMV path chosen by the caller (tests run each one the CPU supports).</summary>
    internal static void Multiply(ReadOnlySpan<float> x, int rows, QuantizedMatrix w, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap, GemvPath path)
    {
        ArgumentNullException.ThrowIfNull(w);
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        if (!(outputSoftCap >= 0f) || float.IsInfinity(outputSoftCap))
            throw new ArgumentOutOfRangeException(nameof(outputSoftCap), outputSoftCap, "the soft-cap must be 0 (none) or positive and finite");
        int n = w.Rows, k = w.Cols;
        MatMul.CheckOperands(x, rows, n, k, bias, y);
        if (rows == 0)
            return;

        if (rows <= GemvMaxRows)
            Gemv(x, rows, w, bias, y, outputSoftCap, path);
        else
            MultiplyPrefill(x, rows, w, bias, y, outputSoftCap, PrefillPath(rows, w));
    }

    /// <summary>Many-row multiply on a chosen kernel: the given integer path, or the fp32 panels when it is None (tests and benchmarks).</summary>
    internal static void MultiplyPrefill(ReadOnlySpan<float> x, int rows, QuantizedMatrix w, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap, IntegerGemm.Path path)
    {
        ArgumentNullException.ThrowIfNull(w);
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        MatMul.CheckOperands(x, rows, w.Rows, w.Cols, bias, y);
        if (rows == 0)
            return;
        if (path == IntegerGemm.Path.None)
            PanelGemm(x, rows, w, bias, y, outputSoftCap);
        else
            IntegerGemm.Multiply(x, rows, w, bias, y, outputSoftCap, path);
    }

    private static void Gemv(ReadOnlySpan<float> x, int rows, QuantizedMatrix w, ReadOnlySpan<float> bias, Span<float> y, float softCap, GemvPath path)
    {
        int k = w.Cols;
        int padded = w.BlocksPerRow * w.Format.BlockSize();
        float[]? rented = PadRows(x, rows, k, padded);
        try
        {
            ReadOnlySpan<float> xs = rented != null ? rented : x;
            fixed (float* xp = xs)
            fixed (float* bp = bias)
            fixed (float* yp = y)
            {
                // One token on AVX-512: x once as int16 codes (CodeOneToken).
                var activations = UsesInt16Activations(rows, path) ? CodeOneToken(w.Format, xp, w.BlocksPerRow) : default;
                int rowsPerItem = rows == 1 ? OneTokenRowsPerItem(w.Rows, w.Cols) : GemvRowsPerItem;
                var job = new GemvJob(w, xp, activations, padded, rows, rowsPerItem, bias.IsEmpty ? null : bp, yp, softCap, path);
                int items = (w.Rows + rowsPerItem - 1) / rowsPerItem;
                bool parallel = (long)w.Rows * padded >= GemvParallelThreshold && KernelThreading.MaxThreads > 1 && items > 1;
                // The kernels' worker pool: no closure, no Parallel.For state, so a decode step allocates nothing.
                KernelThreading.For(items, parallel, job);
            }
        }
        finally
        {
            if (rented != null) ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>
    /// x's rows copied into zero-padded rows of <paramref name="padded"/> floats, rented from the shared pool (return it),
    /// when K is not a multiple of the block: the kernels read whole blocks. Null when x can be read as it is.
    /// </summary>
    private static float[]? PadRows(ReadOnlySpan<float> x, int rows, int k, int padded)
    {
        if (padded == k)
            return null;
        float[] rented = ArrayPool<float>.Shared.Rent(rows * padded);
        Array.Clear(rented, 0, rows * padded);
        for (int m = 0; m < rows; m++)
            x.Slice(m * k, k).CopyTo(rented.AsSpan(m * padded, k));
        return rented;
    }

    /// <summary>Most matrices one fused batch takes (the decoder's groups are 3 and 2); larger groups run in batches of this many.</summary>
    private const int SameInputBatch = 4;

    /// <summary>
    /// One token by several q8 or nf4 matrices of one format and K (<see cref="IMatrixOperand.TryMultiplySameInputOnHost"/>):
    /// x is coded to int16 once, and the work items of every matrix (each cut as its own call would cut it) run in one
    /// <see cref="KernelThreading.For"/>, so the small matrices' rows join the big ones' threads and the group pays one
    /// fork/join. Each row runs the same kernel on the same codes and scales as in <see cref="Multiply(ReadOnlySpan{float}, int, QuantizedMatrix, ReadOnlySpan{float}, Span{float}, float)"/>,
    /// so the outputs are bit-identical to one call per matrix. False (nothing written): not one row on the int16
    /// one-token path, or the weights are not all quantized in one format with one K.
    /// </summary>
    internal static bool TryMultiplySameInput(ReadOnlySpan<float> x, int rows, ReadOnlySpan<HostProduct> products, GemvPath path)
    {
        if (!UsesInt16Activations(rows, path) || products.IsEmpty || products[0].Weight is not QuantizedMatrix first)
            return false;
        foreach (var product in products)
        {
            if (product.Weight is not QuantizedMatrix w || w.Format != first.Format || w.Cols != first.Cols)
                return false;
        }
        foreach (var product in products)
        {
            var w = (QuantizedMatrix)product.Weight;
            MatMul.CheckOperands(x, 1, w.Rows, w.Cols, product.Bias.Span, product.Output.Span);
        }

        int k = first.Cols, blocks = first.BlocksPerRow;
        int padded = blocks * first.Format.BlockSize();
        float[]? rented = PadRows(x, 1, k, padded);
        try
        {
            ReadOnlySpan<float> xs = rented != null ? rented : x;
            fixed (float* xp = xs)
            {
                var activations = CodeOneToken(first.Format, xp, blocks);
                for (int i = 0; i < products.Length; i += SameInputBatch)
                    RunSameInputBatch(products.Slice(i, Math.Min(SameInputBatch, products.Length - i)), xp, padded, activations, path);
            }
        }
        finally
        {
            if (rented != null) ArrayPool<float>.Shared.Return(rented);
        }
        return true;
    }

    /// <summary>Up to <see cref="SameInputBatch"/> matrices' one-token work items, in the given order, in one parallel batch.</summary>
    private static void RunSameInputBatch(ReadOnlySpan<HostProduct> batch, float* x, int padded, OneTokenActivations activations, GemvPath path)
    {
        HostProduct p0 = batch[0], p1 = batch.Length > 1 ? batch[1] : default, p2 = batch.Length > 2 ? batch[2] : default, p3 = batch.Length > 3 ? batch[3] : default;
        // An empty bias pins to null, which the kernels read as "no bias".
        fixed (float* y0 = p0.Output.Span, y1 = p1.Output.Span, y2 = p2.Output.Span, y3 = p3.Output.Span)
        fixed (float* b0 = p0.Bias.Span, b1 = p1.Bias.Span, b2 = p2.Bias.Span, b3 = p3.Bias.Span)
        {
            var job = new SameInputJob();
            long weights = 0;
            int items = 0;
            for (int i = 0; i < batch.Length; i++)
            {
                var w = (QuantizedMatrix)batch[i].Weight;
                int rowsPerItem = OneTokenRowsPerItem(w.Rows, w.Cols);
                float* y = i switch { 0 => y0, 1 => y1, 2 => y2, _ => y3 };
                float* bias = i switch { 0 => b0, 1 => b1, 2 => b2, _ => b3 };
                job.Jobs[i] = new GemvJob(w, x, activations, padded, 1, rowsPerItem, bias, y, 0f, path);
                items += (w.Rows + rowsPerItem - 1) / rowsPerItem;
                job.ItemEnds[i] = items;
                weights += (long)w.Rows * padded;
            }
            // The threshold of one call, on the whole group: small matrices beside a big one no longer run alone.
            bool parallel = weights >= GemvParallelThreshold && KernelThreading.MaxThreads > 1 && items > 1;
            KernelThreading.For(items, parallel, job);
        }
    }

    /// <summary>The work items of several one-token GEMVs as one batch: item i runs in the matrix whose range holds it.</summary>
    private struct SameInputJob : IWorkItems
    {
        public GemvJobs Jobs;
        public ItemCounts ItemEnds;

        public void Run(int item)
        {
            int j = 0;
            while (item >= ItemEnds[j])
                j++;
            Jobs[j].Run(j == 0 ? item : item - ItemEnds[j - 1]);
        }
    }

    [InlineArray(SameInputBatch)]
    private struct GemvJobs
    {
        private GemvJob _first;
    }

    [InlineArray(SameInputBatch)]
    private struct ItemCounts
    {
        private int _first;
    }

    // Per-thread fp32 copy of one W row's scales for the GEMV of 2-4 x rows or without AVX-512 (fp16 widened; the
    // one-token kernels combine theirs on the stack). Pinned: the kernels take its address.
    [ThreadStatic] private static float[]? t_scales;
    // The calling thread's int16 codes and block scales of x for the one-token kernels (pinned, reused: no allocation per token).
    [ThreadStatic] private static short[]? t_xCodes;
    [ThreadStatic] private static float[]? t_xScales;

    /// <summary>
    /// One token's x (padded to whole W blocks) as int16 codes with one scale per W block (<see cref="QuantizeOneToken"/>),
    /// and those scales times 2^112 where that fits (see <see cref="CombineScaleGroup"/>), in the calling thread's pinned buffers:
    /// valid until its next one-token call.
    /// </summary>
    private static OneTokenActivations CodeOneToken(QuantFormat format, float* x, int blocks)
    {
        int codeCount = format == QuantFormat.Nf4 ? (blocks + 1) / 2 * 128 : blocks * 32;
        short[] xCodes = t_xCodes is { } codeBuffer && codeBuffer.Length >= codeCount ? codeBuffer : (t_xCodes = GC.AllocateUninitializedArray<short>(codeCount, pinned: true));
        float[] xScales = t_xScales is { } scaleBuffer && scaleBuffer.Length >= 2 * blocks ? scaleBuffer : (t_xScales = GC.AllocateUninitializedArray<float>(2 * blocks, pinned: true));
        short* codes = (short*)Unsafe.AsPointer(ref xCodes[0]);
        float* scales = (float*)Unsafe.AsPointer(ref xScales[0]);
        QuantizeOneToken(format, x, blocks, codes, scales);
        bool rebiased = RebiasScales(scales, blocks, scales + blocks);
        return new OneTokenActivations(codes, scales, rebiased ? scales + blocks : null);
    }

    /// <summary>Whether a GEMV of <paramref name="rows"/> x rows on <paramref name="path"/> codes x to int16 (one token on AVX-512).</summary>
    internal static bool UsesInt16Activations(int rows, GemvPath path) => rows == 1 && path == GemvPath.Vector512;

    /// <summary>
    /// How far ahead of its position each one-token lane prefetches (8 KB in flight per thread, as the bf16 GEMV does);
    /// the hardware prefetcher alone does not keep enough lines in flight. 1, 4 and 8 KB measured level or slower.
    /// </summary>
    private const int OneTokenPrefetchBytes = 2048;
    /// <summary>
    /// A one-token row with at most this many bytes of scales (K up to 8192 with fp16 scales) has its whole scale row
    /// prefetched two rows on by the step; longer ones (the down projection's 1 KB) have their scale lines prefetched by
    /// the kernels as the groups go, <see cref="OneTokenScalePrefetchBytes"/> ahead: 64 lines asked for at once starved
    /// the code streams (down streamed 13-16 % slower than with no scale reads at all, now 7-9 %, about their bytes).
    /// </summary>
    private const int WholeScaleRowPrefetchLimit = 256;
    /// <summary>How far ahead of its group the kernels prefetch a long scale row (128 and 512 bytes measured slower).</summary>
    private const int OneTokenScalePrefetchBytes = 256;
    /// <summary>
    /// W rows per work item for one token, a multiple of 4: long items keep the lanes long, about four items per thread keep
    /// the threads balanced when one of them is slowed down. A matrix of at most <see cref="SmallOneTokenWeights"/> runs
    /// as one item per thread instead: its items are short enough that each one's start (four lanes ramping up) and the
    /// last one's tail cost more than the balance gains (Gemma's q and o 3-9 % faster, k and v 10-15 %).
    /// </summary>
    internal static int OneTokenRowsPerItem(int rows, int cols)
    {
        int threads = KernelThreading.MaxThreads;
        if ((long)rows * cols <= SmallOneTokenWeights)
            return Math.Max(4, (rows + 4 * threads - 1) / (4 * threads) * 4);
        return Math.Clamp(rows / (4 * threads) / 4 * 4, 64, 512);
    }

    /// <summary>Weights up to which a one-token GEMV takes one work item per thread (16 Mi: Gemma's attention projections).</summary>
    internal const long SmallOneTokenWeights = 1L << 24;

    /// <summary>One token's x for the int16 kernels: codes, block scales, and the scales times 2^112 (null where that overflows).</summary>
    private readonly struct OneTokenActivations(short* codes, float* scales, float* rebiasedScales)
    {
        public readonly short* Codes = codes;
        public readonly float* Scales = scales;
        public readonly float* RebiasedScales = rebiasedScales;
    }

    private struct GemvJob(QuantizedMatrix w, float* x, OneTokenActivations oneToken, int xStride, int rows, int rowsPerItem, float* bias, float* y, float softCap, GemvPath path) : IWorkItems
    {
        public void Run(int item)
        {
            int n0 = item * rowsPerItem;
            int n1 = Math.Min(w.Rows, n0 + rowsPerItem);
            if (oneToken.Codes != null)
            {
                RunOneToken(n0, n1);
                return;
            }
            int blocks = w.BlocksPerRow;
            int yStride = w.Rows;
            // fp16 scales are widened to fp32 one W row at a time (stays in L1); fp32 scales are read in place.
            float[] widened = t_scales is { } buffer && buffer.Length >= blocks ? buffer : (t_scales = GC.AllocateUninitializedArray<float>(Math.Max(blocks, 256), pinned: true));
            float* scaleBuffer = (float*)Unsafe.AsPointer(ref widened[0]);
            for (int n = n0; n < n1; n++)
            {
                byte* codes = w.Blocks + (long)n * blocks * 32;
                float* scales = WidenScales(w, (long)n * blocks, blocks, scaleBuffer);
                for (int m = 0; m < rows; m += 4)
                {
                    int count = Math.Min(4, rows - m);
                    float* xm = x + (long)m * xStride;
                    float s0, s1, s2, s3;
                    if (path == GemvPath.Vector512)
                    {
                        if (w.Format == QuantFormat.Q8)
                            DotQ8Vector512(codes, scales, blocks, xm, xStride, count, out s0, out s1, out s2, out s3);
                        else
                            DotNf4Vector512(codes, scales, blocks, xm, xStride, count, out s0, out s1, out s2, out s3);
                    }
                    else if (path == GemvPath.Vector256)
                    {
                        if (w.Format == QuantFormat.Q8)
                            DotQ8Vector256(codes, scales, blocks, xm, xStride, count, out s0, out s1, out s2, out s3);
                        else
                            DotNf4Vector256(codes, scales, blocks, xm, xStride, count, out s0, out s1, out s2, out s3);
                    }
                    else
                    {
                        DotScalar(w.Format, codes, scales, blocks, xm, xStride, count, out s0, out s1, out s2, out s3);
                    }
                    float b = bias == null ? 0f : bias[n];
                    Store(y + (long)m * yStride + n, s0 + b, softCap);
                    if (count > 1) Store(y + (long)(m + 1) * yStride + n, s1 + b, softCap);
                    if (count > 2) Store(y + (long)(m + 2) * yStride + n, s2 + b, softCap);
                    if (count > 3) Store(y + (long)(m + 3) * yStride + n, s3 + b, softCap);
                }
            }
        }

        /// <summary>
        /// One token on int16 activations, W rows n0..n1: four lanes, contiguous quarters of the rows an odd number of rows
        /// apart (so that they do not share cache sets), are read side by side, four long streams each prefetched a little
        /// ahead (running on into the lane's next row, and past the last lane into the rows after it); the rows the lanes
        /// leave go four adjacent ones at a time, a short last step repeating its last row (sums dropped). Measured against
        /// four adjacent rows per step throughout: faster in the whole model for both formats.
        /// </summary>
        private void RunOneToken(int n0, int n1)
        {
            long rowBytes = (long)w.BlocksPerRow * 32;
            // The four rows' combined scales, a group of 16 blocks at a time plus the last partial group (see OneTokenScaleGroup).
            float* scales = stackalloc float[8 * OneTokenScaleGroup];
            float* sums = stackalloc float[4];
            int count = n1 - n0;
            int laneRows = count >= 8 ? (count / 4 - 1) | 1 : 0;
            for (int lane = 0; lane < 4 && laneRows > 0; lane++)
            {
                byte* first = w.Blocks + (n0 + lane * laneRows) * rowBytes;
                PackedGemm.PrefetchLines(first, first + OneTokenPrefetchBytes);
            }
            for (int t = 0; t < laneRows; t++)
            {
                int r0 = n0 + t;
                Step(r0, r0 + laneRows, r0 + 2 * laneRows, r0 + 3 * laneRows, 4, OneTokenPrefetchBytes, scales, sums);
            }
            for (int r = n0 + 4 * laneRows; r < n1; r += 4)
            {
                int valid = Math.Min(4, n1 - r);
                Step(r, r + Math.Min(1, valid - 1), r + Math.Min(2, valid - 1), r + Math.Min(3, valid - 1), valid, 0, scales, sums);
            }
        }

        /// <summary>
        /// Rows r0..r3 (the first <paramref name="valid"/> stored) by the kernel, which combines their block scales with x's
        /// as it goes; with a prefetch distance, also the scale lines of each row 2 on (the scales live apart from the codes).
        /// </summary>
        private void Step(int r0, int r1, int r2, int r3, int valid, nint ahead, float* scales, float* sums)
        {
            long scaleRowBytes = (long)w.BlocksPerRow * w.ScaleType.SizeOf();
            if (ahead != 0 && scaleRowBytes <= WholeScaleRowPrefetchLimit)
            {
                // Two rows on: measured against none (nf4 6-9 % slower), 8 and 32 rows (level or slower).
                PrefetchScales(w.ScaleData + (r0 + 2) * scaleRowBytes, scaleRowBytes);
                PrefetchScales(w.ScaleData + (r1 + 2) * scaleRowBytes, scaleRowBytes);
                PrefetchScales(w.ScaleData + (r2 + 2) * scaleRowBytes, scaleRowBytes);
                PrefetchScales(w.ScaleData + (r3 + 2) * scaleRowBytes, scaleRowBytes);
            }
            if (w.Format == QuantFormat.Q8)
                DotQ8FourRowsInt16(w, r0, r1, r2, r3, oneToken, ahead, scales, sums);
            else
                DotNf4FourRowsInt16(w, r0, r1, r2, r3, oneToken, ahead, scales, sums);
            Store(y + r0, sums[0] + (bias == null ? 0f : bias[r0]), softCap);
            if (valid > 1) Store(y + r1, sums[1] + (bias == null ? 0f : bias[r1]), softCap);
            if (valid > 2) Store(y + r2, sums[2] + (bias == null ? 0f : bias[r2]), softCap);
            if (valid > 3) Store(y + r3, sums[3] + (bias == null ? 0f : bias[r3]), softCap);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void PrefetchScales(byte* start, long length) => PackedGemm.PrefetchLines(start, start + length);

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Store(float* target, float value, float cap) => *target = cap > 0f ? cap * MathF.Tanh(value / cap) : value;
    }

    /// <summary>
    /// The fp32 values of <paramref name="count"/> scales from index <paramref name="first"/>: fp32 scales in place, fp16
    /// ones widened into <paramref name="buffer"/> (inline, 16 at a time: a library call per pass cost a quarter of the
    /// one-token q8 kernel's time on 2048-wide rows).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float* WidenScales(QuantizedMatrix w, long first, int count, float* buffer)
    {
        if (w.ScaleType == DType.F32)
            return (float*)w.ScaleData + first;
        WidenHalves((ushort*)w.ScaleData + first, buffer, count);
        return buffer;
    }

    /// <summary>fp16 bit patterns to fp32, exactly (subnormals, zeros, ±∞ and NaN included).</summary>
    internal static void WidenHalves(ushort* source, float* destination, int count)
    {
        int i = 0;
        if (Avx512F.IsSupported)
        {
            // |h| << 13 puts the exponent and fraction where fp32 keeps them, 112 below fp32's bias; the multiply by 2^112
            // rebiases normal numbers and turns fp16 subnormals (fp32 subnormal bits) into the right normal values.
            // Infinity and NaN (exponent 31) keep an all-ones exponent instead.
            for (; i + 16 <= count; i += 16)
                WidenSixteen(Avx512F.ConvertToVector512UInt32(Vector256.Load(source + i))).Store(destination + i);
        }
        for (; i < count; i++)
            destination[i] = (float)BitConverter.UInt16BitsToHalf(source[i]);
    }

    /// <summary>16 fp16 bit patterns (zero-extended to 32 bits) to fp32, exactly.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> WidenSixteen(Vector512<uint> bits)
    {
        Vector512<uint> magnitude = bits & Vector512.Create(0x7FFFu);
        Vector512<float> finite = (magnitude << 13).AsSingle() * Vector512.Create(BitConverter.UInt32BitsToSingle(0x77800000u)); // 2^112
        Vector512<float> special = ((magnitude << 13) | Vector512.Create(0x7F800000u)).AsSingle();
        Vector512<float> value = Vector512.ConditionalSelect(Vector512.GreaterThanOrEqual(magnitude, Vector512.Create(0x7C00u)).AsSingle(), special, finite);
        return (value.AsUInt32() | ((bits & Vector512.Create(0x8000u)) << 16)).AsSingle();
    }

    // Two to four x rows (one token takes the int16 kernels); rows beyond count reuse row 0 (their sums are ignored).
    private static void DotQ8Vector512(byte* codes, float* scales, int blocks, float* x0, int xStride, int count,
        out float s0, out float s1, out float s2, out float s3)
    {
        float* x1 = count > 1 ? x0 + xStride : x0;
        float* x2 = count > 2 ? x0 + 2 * xStride : x0;
        float* x3 = count > 3 ? x0 + 3 * xStride : x0;
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < blocks; b++)
        {
            sbyte* q = (sbyte*)codes + b * 32;
            Vector512<float> w0 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q)));
            Vector512<float> w1 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16)));
            Vector512<float> s = Vector512.Create(scales[b]);
            int o = b * 32;
            a0 = Vector512.FusedMultiplyAdd(Vector512.FusedMultiplyAdd(w1, Vector512.Load(x0 + o + 16), w0 * Vector512.Load(x0 + o)), s, a0);
            a1 = Vector512.FusedMultiplyAdd(Vector512.FusedMultiplyAdd(w1, Vector512.Load(x1 + o + 16), w0 * Vector512.Load(x1 + o)), s, a1);
            a2 = Vector512.FusedMultiplyAdd(Vector512.FusedMultiplyAdd(w1, Vector512.Load(x2 + o + 16), w0 * Vector512.Load(x2 + o)), s, a2);
            a3 = Vector512.FusedMultiplyAdd(Vector512.FusedMultiplyAdd(w1, Vector512.Load(x3 + o + 16), w0 * Vector512.Load(x3 + o)), s, a3);
        }
        s0 = Vector512.Sum(a0); s1 = Vector512.Sum(a1); s2 = Vector512.Sum(a2); s3 = Vector512.Sum(a3);
    }

    /// <summary>Largest q8 activation code: one block's 32 products stay far inside int32.</summary>
    internal const int Q8ActivationLimit = short.MaxValue;
    /// <summary>
    /// Largest nf4 activation code and the NF4 table in int16 (NF4 · 16383, rounded): an int32 lane of the one-token nf4
    /// kernel sums 8 products, 8 · 16383² &lt; 2^31.
    /// </summary>
    internal const int Nf4ActivationLimit = 16383;
    internal const int Nf4TableLimit = 16383;

    /// <summary>
    /// The NF4 table as int16 codes, round(NF4 · <see cref="Nf4TableLimit"/>), twice (vpermw reads 5 index bits).
    /// Literals, so the JIT keeps the table in a register (a test checks them against <see cref="Quantizer.Nf4Codes"/>).
    /// </summary>
    internal static Vector512<short> Nf4Int16Table
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => Vector512.Create(
            -16383, -11406, -8602, -6470, -4660, -3027, -1492, 0, 1304, 2637, 4032, 5536, 7220, 9217, 11844, 16383,
            -16383, -11406, -8602, -6470, -4660, -3027, -1492, 0, 1304, 2637, 4032, 5536, 7220, 9217, 11844, (short)16383);
    }

    /// <summary>
    /// One token's x (padded to whole W blocks) as int16 codes, one fp32 scale per W block: scale = absmax / L,
    /// code = round-half-even(x · (L / absmax)) clamped to ±L (L = <see cref="Q8ActivationLimit"/> or
    /// <see cref="Nf4ActivationLimit"/>); a block with absmax below <see cref="IntegerGemm.MinAbsMax"/> gives zeros and scale 0,
    /// one holding a NaN or an infinity zeros and scale NaN (so the outputs are NaN). q8: the codes in x's order.
    /// nf4: in the order of <see cref="DotNf4FourRowsInt16"/>, 128 codes per pair of blocks (an odd last block pairs with zeros).
    /// </summary>
    internal static void QuantizeOneToken(QuantFormat format, float* x, int blocks, short* codes, float* scales)
    {
        if (format == QuantFormat.Q8)
        {
            // The prefill GEMM's block coder (L = 32767), its 16 code pairs stored in x's order.
            for (int b = 0; b < blocks; b++)
            {
                scales[b] = IntegerGemm.QuantizeBlockInt16Vector512(x + b * 32, out Vector512<int> pairs);
                pairs.AsInt16().Store(codes + b * 32);
            }
            return;
        }
        // Pair p, run s (the kernel's shift by 4s), word i: nibble s of the code byte 2i + s / 2 of the pair's 64 bytes
        // (block 2p + i / 16, byte j = 2 (i mod 16) + s / 2): element j for even s, j + 32 for odd s. So run s takes the
        // even (s &lt; 2) or odd elements of one half (s even: 0-31, odd: 32-63) of each block: one two-source word permute.
        var even = Vector512.Create((short)0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62);
        var odd = even + Vector512<short>.One;
        Vector512<short>* halves = stackalloc Vector512<short>[4];
        for (int b = 0; b < blocks; b += 2)
        {
            for (int e = 0; e < 2; e++)
            {
                if (b + e == blocks)
                {
                    // The zero partner of an odd last block (its combined scale is the zero CombineScales leaves).
                    halves[2] = halves[3] = Vector512<short>.Zero;
                    break;
                }
                float* source = x + (b + e) * 64;
                Vector512<float> v0 = Vector512.Load(source), v1 = Vector512.Load(source + 16), v2 = Vector512.Load(source + 32), v3 = Vector512.Load(source + 48);
                Vector512<float> peak = Vector512.MaxNative(Vector512.MaxNative(Vector512.Abs(v0), Vector512.Abs(v1)), Vector512.MaxNative(Vector512.Abs(v2), Vector512.Abs(v3)));
                var finite = Vector512.IsFinite(v0) & Vector512.IsFinite(v1) & Vector512.IsFinite(v2) & Vector512.IsFinite(v3);
                // The int16 table carries a factor Nf4TableLimit, which the block's scale takes out.
                scales[b + e] = IntegerGemm.BlockInverse(peak, finite, Nf4ActivationLimit, out Vector512<float> inverse) / Nf4TableLimit;
                halves[2 * e] = Vector512.Create(IntegerGemm.ToInt16(v0 * inverse, Nf4ActivationLimit), IntegerGemm.ToInt16(v1 * inverse, Nf4ActivationLimit));
                halves[2 * e + 1] = Vector512.Create(IntegerGemm.ToInt16(v2 * inverse, Nf4ActivationLimit), IntegerGemm.ToInt16(v3 * inverse, Nf4ActivationLimit));
            }
            short* target = codes + b * 64;
            Avx512BW.PermuteVar32x16x2(halves[0], even, halves[2]).Store(target);
            Avx512BW.PermuteVar32x16x2(halves[1], even, halves[3]).Store(target + 32);
            Avx512BW.PermuteVar32x16x2(halves[0], odd, halves[2]).Store(target + 64);
            Avx512BW.PermuteVar32x16x2(halves[1], odd, halves[3]).Store(target + 96);
        }
    }

    /// <summary>x's block scales times 2^112 into <paramref name="rebiased"/>; false where one would overflow (the scale is above 2^15).</summary>
    internal static bool RebiasScales(float* scales, int blocks, float* rebiased)
    {
        const float Rebias = 5.192296858534828e33f; // 2^112
        bool fits = true;
        for (int b = 0; b < blocks; b++)
        {
            fits &= !(scales[b] > 32768f);
            rebiased[b] = scales[b] * Rebias;
        }
        return fits;
    }

    /// <summary>
    /// <paramref name="blocks"/> W block scales from index <paramref name="first"/> times x's, then zeros up to
    /// <paramref name="stride"/> (past an odd nf4 block count: the scale of the kernel's zero partner block): whole groups
    /// of 16 as the kernels make them (<see cref="CombineScaleGroup"/>), the rest widened (<see cref="WidenHalves"/>) and
    /// multiplied. Every product is exactly the fp32 product of the widened W scale and x's.
    /// </summary>
    internal static void CombineScales(QuantizedMatrix w, long first, int blocks, int stride, float* xScales, float* rebiasedXScales, float* target)
    {
        bool f32 = w.ScaleType == DType.F32;
        int b = 0;
        for (; b + OneTokenScaleGroup <= blocks; b += OneTokenScaleGroup)
            CombineScaleGroup(w.ScaleData, f32, first + b, xScales + b, rebiasedXScales == null ? null : rebiasedXScales + b, target + b);
        if (f32)
            new ReadOnlySpan<float>((float*)w.ScaleData + first + b, blocks - b).CopyTo(new Span<float>(target + b, blocks - b));
        else
            WidenHalves((ushort*)w.ScaleData + first + b, target + b, blocks - b);
        for (; b < blocks; b++)
            target[b] *= xScales[b];
        for (; b < stride; b++)
            target[b] = 0f;
    }

    /// <summary>
    /// Blocks per group of combined scales in the one-token kernels: one vector of them, made just before its codes are
    /// read. Combining a whole row of scales per step instead (a pass over 4 rows' scales into a buffer before the
    /// kernel) cost the 2048 x 16384 down projection about a fifth of its rate, and the 2048-wide matrices a few percent.
    /// </summary>
    internal const int OneTokenScaleGroup = 16;

    /// <summary>
    /// <see cref="OneTokenScaleGroup"/> W block scales from index <paramref name="first"/> times x's, exactly as widening
    /// then multiplying gives them. fp16 scales: a half's bits shifted left by 13 are the fp32 bits of its value times
    /// 2^-112 (subnormal halves included), so where x's scales times 2^112 are given (<paramref name="rebiasedXScales"/>,
    /// null where that would overflow) the group takes a widening load, a shift and a multiply; a group holding a negative
    /// scale, an infinity or a NaN (never written by <see cref="Quantizer"/>) takes the exact widening. Inline and without
    /// calls, so that the kernels keep their sums in registers.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void CombineScaleGroup(byte* scaleData, bool f32, long first, float* xScales, float* rebiasedXScales, float* target)
    {
        if (f32)
        {
            (Vector512.Load((float*)scaleData + first) * Vector512.Load(xScales)).Store(target);
            return;
        }
        Vector512<uint> bits = Avx512F.ConvertToVector512UInt32(Vector256.Load((ushort*)scaleData + first));
        if (rebiasedXScales != null && !Vector512.GreaterThanOrEqualAny(bits, Vector512.Create(0x7C00u)))
            ((bits << 13).AsSingle() * Vector512.Load(rebiasedXScales)).Store(target);
        else
            (WidenSixteen(bits) * Vector512.Load(xScales)).Store(target);
    }

    /// <summary>
    /// Rows f0..f3's (their first block's scale index) combined scales of the group of 16 blocks from block b0, the four
    /// groups side by side from <paramref name="target"/>; inline, so that the kernels keep their sums in registers.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CombineFourRowGroups(byte* scaleData, bool f32, long f0, long f1, long f2, long f3, int b0, OneTokenActivations x, float* target)
    {
        float* xs = x.Scales + b0;
        float* xr = x.RebiasedScales == null ? null : x.RebiasedScales + b0;
        CombineScaleGroup(scaleData, f32, f0 + b0, xs, xr, target);
        CombineScaleGroup(scaleData, f32, f1 + b0, xs, xr, target + OneTokenScaleGroup);
        CombineScaleGroup(scaleData, f32, f2 + b0, xs, xr, target + 2 * OneTokenScaleGroup);
        CombineScaleGroup(scaleData, f32, f3 + b0, xs, xr, target + 3 * OneTokenScaleGroup);
    }

    /// <summary>
    /// The four rows' combined scales of the last partial group (blocks <paramref name="full"/> on), made before the
    /// kernels' sums start, zero-filled to <paramref name="stride"/> (nf4: an odd count's zero partner), 16 floats apart.
    /// </summary>
    private static void CombineFourRowTails(QuantizedMatrix w, long f0, long f1, long f2, long f3, int full, int stride, OneTokenActivations x, float* target)
    {
        int n = w.BlocksPerRow - full;
        float* xs = x.Scales + full;
        float* xr = x.RebiasedScales == null ? null : x.RebiasedScales + full;
        CombineScales(w, f0 + full, n, stride, xs, xr, target);
        CombineScales(w, f1 + full, n, stride, xs, xr, target + OneTokenScaleGroup);
        CombineScales(w, f2 + full, n, stride, xs, xr, target + 2 * OneTokenScaleGroup);
        CombineScales(w, f3 + full, n, stride, xs, xr, target + 3 * OneTokenScaleGroup);
    }

    /// <summary>
    /// Four q8 W rows by one token of int16 activations: per block, sign-extend 32 codes to int16, one vpmaddwd against
    /// x's codes (shared by the rows), convert, and one FMA by the combined scale. Even and odd blocks keep separate sums
    /// (eight FMA chains hide the FMA latency). The combined scales are made 16 blocks at a time as the codes stream
    /// (<see cref="CombineScaleGroup"/>, into <paramref name="groups"/>), the last partial group's before the sums start.
    /// </summary>
    private static void DotQ8FourRowsInt16(QuantizedMatrix w, int r0, int r1, int r2, int r3, OneTokenActivations oneToken, nint ahead, float* groups, float* sums)
    {
        int blocks = w.BlocksPerRow;
        long rowBytes = (long)blocks * 32;
        sbyte* q0 = (sbyte*)w.Blocks + r0 * rowBytes, q1 = (sbyte*)w.Blocks + r1 * rowBytes, q2 = (sbyte*)w.Blocks + r2 * rowBytes, q3 = (sbyte*)w.Blocks + r3 * rowBytes;
        long f0 = (long)r0 * blocks, f1 = (long)r1 * blocks, f2 = (long)r2 * blocks, f3 = (long)r3 * blocks;
        short* x = oneToken.Codes;
        byte* scaleData = w.ScaleData;
        bool f32 = w.ScaleType == DType.F32;
        int scaleSize = f32 ? 4 : 2;
        int full = blocks & ~(OneTokenScaleGroup - 1);
        float* c0 = groups, c1 = c0 + OneTokenScaleGroup, c2 = c1 + OneTokenScaleGroup, c3 = c2 + OneTokenScaleGroup;
        // The last partial group's scales first, while no sums are live across the calls.
        float* t0 = groups + 4 * OneTokenScaleGroup, t1 = t0 + OneTokenScaleGroup, t2 = t1 + OneTokenScaleGroup, t3 = t2 + OneTokenScaleGroup;
        if (full < blocks)
            CombineFourRowTails(w, f0, f1, f2, f3, full, blocks - full, oneToken, t0);
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0;
        bool prefetchScales = ahead != 0 && (long)blocks * scaleSize > WholeScaleRowPrefetchLimit;
        for (int b0 = 0; b0 < full; b0 += OneTokenScaleGroup)
        {
            if (prefetchScales)
                PrefetchGroupScales(scaleData, scaleSize, f0, f1, f2, f3, b0);
            CombineFourRowGroups(scaleData, f32, f0, f1, f2, f3, b0, oneToken, c0);
            for (int j = 0; j < OneTokenScaleGroup; j += 2)
            {
                int o = (b0 + j) * 32;
                PrefetchFourRows((byte*)q0 + o, (byte*)q1 + o, (byte*)q2 + o, (byte*)q3 + o, ahead);
                Vector512<short> x0 = Vector512.Load(x + o), x1 = Vector512.Load(x + o + 32);
                a0 = Q8BlockInt16(q0 + o, x0, c0[j], a0); e0 = Q8BlockInt16(q0 + o + 32, x1, c0[j + 1], e0);
                a1 = Q8BlockInt16(q1 + o, x0, c1[j], a1); e1 = Q8BlockInt16(q1 + o + 32, x1, c1[j + 1], e1);
                a2 = Q8BlockInt16(q2 + o, x0, c2[j], a2); e2 = Q8BlockInt16(q2 + o + 32, x1, c2[j + 1], e2);
                a3 = Q8BlockInt16(q3 + o, x0, c3[j], a3); e3 = Q8BlockInt16(q3 + o + 32, x1, c3[j + 1], e3);
            }
        }
        int b = full;
        for (; b + 2 <= blocks; b += 2)
        {
            int o = b * 32, j = b - full;
            PrefetchFourRows((byte*)q0 + o, (byte*)q1 + o, (byte*)q2 + o, (byte*)q3 + o, ahead);
            Vector512<short> x0 = Vector512.Load(x + o), x1 = Vector512.Load(x + o + 32);
            a0 = Q8BlockInt16(q0 + o, x0, t0[j], a0); e0 = Q8BlockInt16(q0 + o + 32, x1, t0[j + 1], e0);
            a1 = Q8BlockInt16(q1 + o, x0, t1[j], a1); e1 = Q8BlockInt16(q1 + o + 32, x1, t1[j + 1], e1);
            a2 = Q8BlockInt16(q2 + o, x0, t2[j], a2); e2 = Q8BlockInt16(q2 + o + 32, x1, t2[j + 1], e2);
            a3 = Q8BlockInt16(q3 + o, x0, t3[j], a3); e3 = Q8BlockInt16(q3 + o + 32, x1, t3[j + 1], e3);
        }
        if (b < blocks)
        {
            int o = b * 32, j = b - full;
            Vector512<short> x0 = Vector512.Load(x + o);
            a0 = Q8BlockInt16(q0 + o, x0, t0[j], a0);
            a1 = Q8BlockInt16(q1 + o, x0, t1[j], a1);
            a2 = Q8BlockInt16(q2 + o, x0, t2[j], a2);
            a3 = Q8BlockInt16(q3 + o, x0, t3[j], a3);
        }
        sums[0] = Vector512.Sum(a0 + e0); sums[1] = Vector512.Sum(a1 + e1); sums[2] = Vector512.Sum(a2 + e2); sums[3] = Vector512.Sum(a3 + e3);
    }

    /// <summary>
    /// For a group starting a scale line (every 32 fp16 or 16 fp32 blocks), asks for the four rows' scale line
    /// <see cref="OneTokenScalePrefetchBytes"/> ahead (running on into each lane's next row, whose scales follow).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PrefetchGroupScales(byte* scaleData, int scaleSize, long f0, long f1, long f2, long f3, int b0)
    {
        if (((b0 * scaleSize) & 63) == 0)
        {
            PrefetchFourRows(scaleData + (f0 + b0) * scaleSize, scaleData + (f1 + b0) * scaleSize,
                scaleData + (f2 + b0) * scaleSize, scaleData + (f3 + b0) * scaleSize, OneTokenScalePrefetchBytes);
        }
    }

    /// <summary>Asks for the line <paramref name="ahead"/> bytes past each of the four rows' current codes or scales (none when 0).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PrefetchFourRows(byte* q0, byte* q1, byte* q2, byte* q3, nint ahead)
    {
        if (ahead == 0)
            return;
        Sse.Prefetch0(q0 + ahead);
        Sse.Prefetch0(q1 + ahead);
        Sse.Prefetch0(q2 + ahead);
        Sse.Prefetch0(q3 + ahead);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Q8BlockInt16(sbyte* q, Vector512<short> x, float scale, Vector512<float> sum) =>
        Vector512.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(Avx512BW.MultiplyAddAdjacent(Avx512BW.ConvertToVector512Int16(Vector256.Load(q)), x)),
            Vector512.Create(scale), sum);

    /// <summary>
    /// Four nf4 W rows by one token of int16 activations, two blocks (64 code bytes) per step. Word i of the codes shifted
    /// right by 4s holds nibble s of byte 2i + s / 2 in its low bits (vpermw reads 5, the table is repeated), so 3 shifts
    /// feed 4 lookups of 32 int16 weights, each multiplied with x's codes (vpmaddwd, in the order
    /// <see cref="QuantizeOneToken"/> writes). Int32 lanes 0-7 hold bytes 0-31 (the first block), 8-15 the second, so a
    /// pair's sum is converted once and scaled by a vector of both blocks' combined scales. An odd last block pairs with zeros. The
    /// combined scales are made 16 blocks at a time, as in <see cref="DotQ8FourRowsInt16"/>.
    /// </summary>
    private static void DotNf4FourRowsInt16(QuantizedMatrix w, int r0, int r1, int r2, int r3, OneTokenActivations oneToken, nint ahead, float* groups, float* sums)
    {
        int blocks = w.BlocksPerRow;
        long rowBytes = (long)blocks * 32;
        byte* q0 = w.Blocks + r0 * rowBytes, q1 = w.Blocks + r1 * rowBytes, q2 = w.Blocks + r2 * rowBytes, q3 = w.Blocks + r3 * rowBytes;
        long f0 = (long)r0 * blocks, f1 = (long)r1 * blocks, f2 = (long)r2 * blocks, f3 = (long)r3 * blocks;
        short* x = oneToken.Codes;
        byte* scaleData = w.ScaleData;
        bool f32 = w.ScaleType == DType.F32;
        int scaleSize = f32 ? 4 : 2;
        int full = blocks & ~(OneTokenScaleGroup - 1);
        float* c0 = groups, c1 = c0 + OneTokenScaleGroup, c2 = c1 + OneTokenScaleGroup, c3 = c2 + OneTokenScaleGroup;
        // The last partial group's scales first (an odd count with its zero partner's), while no sums are live across the calls.
        float* t0 = groups + 4 * OneTokenScaleGroup, t1 = t0 + OneTokenScaleGroup, t2 = t1 + OneTokenScaleGroup, t3 = t2 + OneTokenScaleGroup;
        if (full < blocks)
            CombineFourRowTails(w, f0, f1, f2, f3, full, (blocks - full + 1) & ~1, oneToken, t0);
        Vector512<short> table = Nf4Int16Table;
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        bool prefetchScales = ahead != 0 && (long)blocks * scaleSize > WholeScaleRowPrefetchLimit;
        for (int b0 = 0; b0 < full; b0 += OneTokenScaleGroup)
        {
            if (prefetchScales)
                PrefetchGroupScales(scaleData, scaleSize, f0, f1, f2, f3, b0);
            CombineFourRowGroups(scaleData, f32, f0, f1, f2, f3, b0, oneToken, c0);
            // Each row's 16 combined scales stay in a register and a pair's scale vector is one vpermps, in place of two
            // broadcasts and a blend per row and pair (one thread: 3-7 % faster over the decoder's matrices).
            Vector512<float> g0 = Vector512.Load(c0), g1 = Vector512.Load(c1), g2 = Vector512.Load(c2), g3 = Vector512.Load(c3);
            Vector512<int> pair = FirstPairIndex;
            for (int j = 0; j < OneTokenScaleGroup; j += 2, pair += Vector512.Create(2))
            {
                int o = (b0 + j) * 32;
                PrefetchFourRows(q0 + o, q1 + o, q2 + o, q3 + o, ahead);
                short* xp = x + (b0 + j) * 64;
                Vector512<short> x0 = Vector512.Load(xp), x1 = Vector512.Load(xp + 32), x2 = Vector512.Load(xp + 64), x3 = Vector512.Load(xp + 96);
                a0 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q0 + o)), x0, x1, x2, x3), Avx512F.PermuteVar16x32(g0, pair), a0);
                a1 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q1 + o)), x0, x1, x2, x3), Avx512F.PermuteVar16x32(g1, pair), a1);
                a2 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q2 + o)), x0, x1, x2, x3), Avx512F.PermuteVar16x32(g2, pair), a2);
                a3 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q3 + o)), x0, x1, x2, x3), Avx512F.PermuteVar16x32(g3, pair), a3);
            }
        }
        int b = full;
        for (; b + 2 <= blocks; b += 2)
        {
            int o = b * 32, j = b - full;
            PrefetchFourRows(q0 + o, q1 + o, q2 + o, q3 + o, ahead);
            short* xp = x + b * 64;
            Vector512<short> x0 = Vector512.Load(xp), x1 = Vector512.Load(xp + 32), x2 = Vector512.Load(xp + 64), x3 = Vector512.Load(xp + 96);
            a0 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q0 + o)), x0, x1, x2, x3), PairScales(t0 + j), a0);
            a1 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q1 + o)), x0, x1, x2, x3), PairScales(t1 + j), a1);
            a2 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q2 + o)), x0, x1, x2, x3), PairScales(t2 + j), a2);
            a3 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector512.Load((ushort*)(q3 + o)), x0, x1, x2, x3), PairScales(t3 + j), a3);
        }
        if (b < blocks)
        {
            // The last block's 32 bytes and 32 zero bytes (the zero partner's x codes and scale are zero).
            int o = b * 32, j = b - full;
            short* xp = x + b * 64;
            Vector512<short> x0 = Vector512.Load(xp), x1 = Vector512.Load(xp + 32), x2 = Vector512.Load(xp + 64), x3 = Vector512.Load(xp + 96);
            a0 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector256.Load((ushort*)(q0 + o)).ToVector512(), x0, x1, x2, x3), PairScales(t0 + j), a0);
            a1 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector256.Load((ushort*)(q1 + o)).ToVector512(), x0, x1, x2, x3), PairScales(t1 + j), a1);
            a2 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector256.Load((ushort*)(q2 + o)).ToVector512(), x0, x1, x2, x3), PairScales(t2 + j), a2);
            a3 = Vector512.FusedMultiplyAdd(Nf4PairInt16(table, Vector256.Load((ushort*)(q3 + o)).ToVector512(), x0, x1, x2, x3), PairScales(t3 + j), a3);
        }
        sums[0] = Vector512.Sum(a0); sums[1] = Vector512.Sum(a1); sums[2] = Vector512.Sum(a2); sums[3] = Vector512.Sum(a3);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Nf4PairInt16(Vector512<short> table, Vector512<ushort> c, Vector512<short> x0, Vector512<short> x1, Vector512<short> x2, Vector512<short> x3)
    {
        Vector512<int> t = Avx512BW.MultiplyAddAdjacent(Avx512BW.PermuteVar32x16(table, c.AsInt16()), x0);
        Vector512<int> u = Avx512BW.MultiplyAddAdjacent(Avx512BW.PermuteVar32x16(table, (c >> 4).AsInt16()), x1);
        t += Avx512BW.MultiplyAddAdjacent(Avx512BW.PermuteVar32x16(table, (c >> 8).AsInt16()), x2);
        u += Avx512BW.MultiplyAddAdjacent(Avx512BW.PermuteVar32x16(table, (c >> 12).AsInt16()), x3);
        return Avx512F.ConvertToVector512Single(t + u);
    }

    /// <summary>vpermps indices of a group's first pair: scale 0 in lanes 0-7, scale 1 in lanes 8-15 (pair j: add j).</summary>
    private static Vector512<int> FirstPairIndex => Vector512.Create(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);

    /// <summary>scales[0] in lanes 0-7, scales[1] in lanes 8-15 (the last partial group's pairs).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> PairScales(float* scales) =>
        Vector512.ConditionalSelect(Vector512.Create(0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1).AsSingle(),
            Vector512.Create(scales[1]), Vector512.Create(scales[0]));

    private static void DotNf4Vector512(byte* codes, float* scales, int blocks, float* x0, int xStride, int count,
        out float s0, out float s1, out float s2, out float s3)
    {
        float* x1 = count > 1 ? x0 + xStride : x0;
        float* x2 = count > 2 ? x0 + 2 * xStride : x0;
        float* x3 = count > 3 ? x0 + 3 * xStride : x0;
        Vector512<float> table = Vector512.Create(Quantizer.Nf4Codes);
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < blocks; b++)
        {
            byte* q = codes + b * 32;
            // Bytes 0..15 carry elements 0..15 (low nibbles) and 32..47 (high); bytes 16..31 carry 16..31 and 48..63.
            // vpermps reads only the low 4 bits of each index, so the low nibbles need no mask.
            Vector512<int> lo = Avx512F.ConvertToVector512Int32(Vector128.Load(q));
            Vector512<int> hi = Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16));
            Vector512<float> w0 = Avx512F.PermuteVar16x32(table, lo);
            Vector512<float> w2 = Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(lo, 4));
            Vector512<float> w1 = Avx512F.PermuteVar16x32(table, hi);
            Vector512<float> w3 = Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(hi, 4));
            Vector512<float> s = Vector512.Create(scales[b]);
            int o = b * 64;
            a0 = Vector512.FusedMultiplyAdd(Block64(w0, w1, w2, w3, x0 + o), s, a0);
            if (count > 1)
            {
                a1 = Vector512.FusedMultiplyAdd(Block64(w0, w1, w2, w3, x1 + o), s, a1);
                a2 = Vector512.FusedMultiplyAdd(Block64(w0, w1, w2, w3, x2 + o), s, a2);
                a3 = Vector512.FusedMultiplyAdd(Block64(w0, w1, w2, w3, x3 + o), s, a3);
            }
        }
        s0 = Vector512.Sum(a0); s1 = Vector512.Sum(a1); s2 = Vector512.Sum(a2); s3 = Vector512.Sum(a3);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Block64(Vector512<float> w0, Vector512<float> w1, Vector512<float> w2, Vector512<float> w3, float* x)
    {
        Vector512<float> t = w0 * Vector512.Load(x);
        t = Vector512.FusedMultiplyAdd(w1, Vector512.Load(x + 16), t);
        t = Vector512.FusedMultiplyAdd(w2, Vector512.Load(x + 32), t);
        return Vector512.FusedMultiplyAdd(w3, Vector512.Load(x + 48), t);
    }

    private static void DotQ8Vector256(byte* codes, float* scales, int blocks, float* x, int xStride, int count,
        out float s0, out float s1, out float s2, out float s3)
    {
        Vector256<float> a0 = Vector256<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < blocks; b++)
        {
            sbyte* q = (sbyte*)codes + b * 32;
            Vector256<float> w0 = Avx.ConvertToVector256Single(Avx2.ConvertToVector256Int32(q));
            Vector256<float> w1 = Avx.ConvertToVector256Single(Avx2.ConvertToVector256Int32(q + 8));
            Vector256<float> w2 = Avx.ConvertToVector256Single(Avx2.ConvertToVector256Int32(q + 16));
            Vector256<float> w3 = Avx.ConvertToVector256Single(Avx2.ConvertToVector256Int32(q + 24));
            Vector256<float> s = Vector256.Create(scales[b]);
            int o = b * 32;
            a0 = Fma.MultiplyAdd(Block32(w0, w1, w2, w3, x + o), s, a0);
            if (count > 1) a1 = Fma.MultiplyAdd(Block32(w0, w1, w2, w3, x + xStride + o), s, a1);
            if (count > 2) a2 = Fma.MultiplyAdd(Block32(w0, w1, w2, w3, x + 2 * xStride + o), s, a2);
            if (count > 3) a3 = Fma.MultiplyAdd(Block32(w0, w1, w2, w3, x + 3 * xStride + o), s, a3);
        }
        s0 = Vector256.Sum(a0); s1 = Vector256.Sum(a1); s2 = Vector256.Sum(a2); s3 = Vector256.Sum(a3);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Block32(Vector256<float> w0, Vector256<float> w1, Vector256<float> w2, Vector256<float> w3, float* x)
    {
        Vector256<float> t = w0 * Vector256.Load(x);
        t = Fma.MultiplyAdd(w1, Vector256.Load(x + 8), t);
        t = Fma.MultiplyAdd(w2, Vector256.Load(x + 16), t);
        return Fma.MultiplyAdd(w3, Vector256.Load(x + 24), t);
    }

    private static void DotNf4Vector256(byte* codes, float* scales, int blocks, float* x, int xStride, int count,
        out float s0, out float s1, out float s2, out float s3)
    {
        ReadOnlySpan<float> table = Quantizer.Nf4Codes;
        // 16 codes in two 8-lane tables; bit 3 of the code picks the table (moved to the sign bit for the blend).
        Vector256<float> lowTable = Vector256.Create(table[..8]), highTable = Vector256.Create(table[8..]);
        Vector256<float> a0 = Vector256<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < blocks; b++)
        {
            byte* q = codes + b * 32;
            Vector256<float> s = Vector256.Create(scales[b]);
            Vector256<float> t0 = Vector256<float>.Zero, t1 = t0, t2 = t0, t3 = t0;
            int o = b * 64;
            for (int c = 0; c < 4; c++)
            {
                // Bytes 8c..8c+7 hold elements 8c.. (low nibbles) and 32 + 8c.. (high nibbles).
                Vector256<int> packed = Avx2.ConvertToVector256Int32(q + 8 * c);
                // The lookup reads bits 0-3 of the index only (3 for the permutes, bit 3 for the blend): no mask for the low nibble.
                Vector256<float> low = Lookup(lowTable, highTable, packed);
                Vector256<float> high = Lookup(lowTable, highTable, Avx2.ShiftRightLogical(packed, 4));
                int e = o + 8 * c;
                t0 = Fma.MultiplyAdd(low, Vector256.Load(x + e), Fma.MultiplyAdd(high, Vector256.Load(x + e + 32), t0));
                if (count > 1) t1 = Fma.MultiplyAdd(low, Vector256.Load(x + xStride + e), Fma.MultiplyAdd(high, Vector256.Load(x + xStride + e + 32), t1));
                if (count > 2) t2 = Fma.MultiplyAdd(low, Vector256.Load(x + 2 * xStride + e), Fma.MultiplyAdd(high, Vector256.Load(x + 2 * xStride + e + 32), t2));
                if (count > 3) t3 = Fma.MultiplyAdd(low, Vector256.Load(x + 3 * xStride + e), Fma.MultiplyAdd(high, Vector256.Load(x + 3 * xStride + e + 32), t3));
            }
            a0 = Fma.MultiplyAdd(t0, s, a0);
            a1 = Fma.MultiplyAdd(t1, s, a1);
            a2 = Fma.MultiplyAdd(t2, s, a2);
            a3 = Fma.MultiplyAdd(t3, s, a3);
        }
        s0 = Vector256.Sum(a0); s1 = Vector256.Sum(a1); s2 = Vector256.Sum(a2); s3 = Vector256.Sum(a3);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Lookup(Vector256<float> lowTable, Vector256<float> highTable, Vector256<int> code) =>
        Avx.BlendVariable(Avx2.PermuteVar8x32(lowTable, code), Avx2.PermuteVar8x32(highTable, code), Avx2.ShiftLeftLogical(code, 28).AsSingle());

    private static void DotScalar(QuantFormat format, byte* codes, float* scales, int blocks, float* x, int xStride, int count,
        out float s0, out float s1, out float s2, out float s3)
    {
        Span<float> sums = stackalloc float[4];
        sums.Clear();
        float* weights = stackalloc float[64];
        int blockSize = format.BlockSize();
        for (int b = 0; b < blocks; b++)
        {
            Quantizer.DequantizeRow(format, new ReadOnlySpan<byte>(codes + b * 32, 32), new ReadOnlySpan<float>(scales + b, 1), new Span<float>(weights, blockSize));
            for (int r = 0; r < count; r++)
            {
                float* xb = x + (long)r * xStride + b * blockSize;
                float dot = 0f;
                for (int i = 0; i < blockSize; i++) dot += weights[i] * xb[i];
                sums[r] += dot;
            }
        }
        s0 = sums[0]; s1 = sums[1]; s2 = sums[2]; s3 = sums[3];
    }

    /// <summary>The weights dequantized a K block of a few rows at a time straight into the packed fp32 GEMM's panels.</summary>
    private static void PanelGemm(ReadOnlySpan<float> x, int rows, QuantizedMatrix w, ReadOnlySpan<float> bias, Span<float> y, float softCap)
    {
        PackedGemm.Multiply(x, rows, new QuantizedRows(w), w.Rows, w.Cols, bias, y, softCap);
        // The row source holds only pointers into w's storage, which must outlive the multiply.
        GC.KeepAlive(w);
    }
}
