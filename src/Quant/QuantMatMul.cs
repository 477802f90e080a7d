using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;
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
        // The kernels read whole blocks, so x rows are copied into zero-padded rows when K is not a multiple of the block.
        float[]? rented = padded != k ? ArrayPool<float>.Shared.Rent(rows * padded) : null;
        try
        {
            if (rented != null)
            {
                Array.Clear(rented, 0, rows * padded);
                for (int m = 0; m < rows; m++)
                    x.Slice(m * k, k).CopyTo(rented.AsSpan(m * padded, k));
            }
            ReadOnlySpan<float> xs = rented != null ? rented : x;
            // One token on nf4: x once more in the order the nibble-shift kernel consumes it (see PermuteForNf4Pairs).
            bool nf4Pairs = rows == 1 && path == GemvPath.Vector512 && w.Format == QuantFormat.Nf4;
            float[]? permuted = nf4Pairs ? t_nf4X is { } buffer && buffer.Length >= padded ? buffer : (t_nf4X = GC.AllocateUninitializedArray<float>(padded, pinned: true)) : null;
            if (permuted != null)
                PermuteForNf4Pairs(xs[..padded], permuted);
            fixed (float* xp = xs)
            fixed (float* pp = permuted)
            fixed (float* bp = bias)
            fixed (float* yp = y)
            {
                int rowsPerItem = rows == 1 ? OneTokenRowsPerItem(w.Rows) : GemvRowsPerItem;
                var job = new GemvJob(w, xp, pp, padded, rows, rowsPerItem, bias.IsEmpty ? null : bp, yp, softCap, path);
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

    // Per-thread fp32 copy of the fp16 scales of the W rows a GEMV pass reads (pinned: the kernels take its address).
    [ThreadStatic] private static float[]? t_scales;
    // The calling thread's permuted copy of x for the one-token nf4 kernel (pinned, reused: no allocation per token).
    [ThreadStatic] private static float[]? t_nf4X;

    // How far ahead (in passes of 4 W rows) the one-token kernels prefetch: the hardware prefetcher alone does not follow
    // four short row streams that start afresh every pass (measured: q8 15 -> 26 GB/s and nf4 12 -> 22 GB/s on one thread).
    private const int PrefetchPasses = 2;
    /// <summary>
    /// W rows per work item for one token: long items keep the passes without prefetch (the first two of an item) few,
    /// about four items per thread keep the threads balanced when one of them is slowed down. A multiple of 4.
    /// </summary>
    internal static int OneTokenRowsPerItem(int rows) => Math.Clamp(rows / (4 * KernelThreading.MaxThreads) / 4 * 4, 64, 512);

    private struct GemvJob(QuantizedMatrix w, float* x, float* nf4X, int xStride, int rows, int rowsPerItem, float* bias, float* y, float softCap, GemvPath path) : IWorkItems
    {
        public void Run(int item)
        {
            int n0 = item * rowsPerItem;
            int n1 = Math.Min(w.Rows, n0 + rowsPerItem);
            int blocks = w.BlocksPerRow;
            int yStride = w.Rows;
            // fp16 scales are widened to fp32 four W rows at a time (a few KB, stays in L1); fp32 scales are read in place.
            float[] widened = t_scales is { } buffer && buffer.Length >= 4 * blocks ? buffer : (t_scales = GC.AllocateUninitializedArray<float>(Math.Max(4 * blocks, 256), pinned: true));
            float* scaleBuffer = (float*)Unsafe.AsPointer(ref widened[0]);
            int n = n0;
            if (rows == 1 && path == GemvPath.Vector512)
            {
                // One token: four W rows per pass share every x load (x of a long K row lives in L2, not L1), and the
                // rows of the pass after next are prefetched (within this item: the next item may be another thread's).
                long rowBytes = (long)blocks * 32;
                byte* end = w.Blocks + (long)n1 * rowBytes;
                Span<float> sums = stackalloc float[4];
                for (; n + 4 <= n1; n += 4)
                {
                    byte* codes = w.Blocks + (long)n * rowBytes;
                    float* scales = WidenScales(w, (long)n * blocks, 4 * blocks, scaleBuffer);
                    byte* ahead = codes + PrefetchPasses * 4 * rowBytes;
                    if (ahead + 4 * rowBytes > end) ahead = null;
                    if (w.Format == QuantFormat.Q8)
                        DotQ8FourRowsVector512(codes, scales, blocks, x, ahead, sums);
                    else
                        DotNf4FourRowsVector512(codes, scales, blocks, x, nf4X, ahead, sums);
                    for (int r = 0; r < 4; r++)
                        Store(y + n + r, sums[r] + (bias == null ? 0f : bias[n + r]), softCap);
                }
            }
            for (; n < n1; n++)
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
            var magnitudeMask = Vector512.Create(0x7FFFu);
            var infinity = Vector512.Create(0x7C00u);
            var rebias = Vector512.Create(BitConverter.UInt32BitsToSingle(0x77800000u)); // 2^112
            for (; i + 16 <= count; i += 16)
            {
                Vector512<uint> bits = Avx512F.ConvertToVector512UInt32(Vector256.Load(source + i));
                Vector512<uint> magnitude = bits & magnitudeMask;
                Vector512<float> finite = (magnitude << 13).AsSingle() * rebias;
                Vector512<float> special = ((magnitude << 13) | Vector512.Create(0x7F800000u)).AsSingle();
                Vector512<float> value = Vector512.ConditionalSelect(Vector512.GreaterThanOrEqual(magnitude, infinity).AsSingle(), special, finite);
                (value.AsUInt32() | ((bits & Vector512.Create(0x8000u)) << 16)).AsSingle().Store(destination + i);
            }
        }
        for (; i < count; i++)
            destination[i] = (float)BitConverter.UInt16BitsToHalf(source[i]);
    }

    /// <summary>
    /// x in the order of the one-token nf4 kernel: for each pair of blocks (128 weights; 64 bytes of codes = 16 dwords),
    /// 8 runs of 16 floats, run s lane l holding the x element that nibble s of dword l multiplies: block 2p + l / 8,
    /// byte 4 (l mod 8) + s / 2, low nibble (element j) for even s, high nibble (element j + 32) for odd s. A last odd block
    /// keeps the plain order.
    /// </summary>
    internal static void PermuteForNf4Pairs(ReadOnlySpan<float> x, Span<float> permuted)
    {
        int pairs = x.Length / 128;
        int p = 0;
        if (Avx512F.IsSupported)
        {
            // Run s takes lanes 0-7 from x elements (s / 2) + 4i of block 2p's first (even s) or second (odd s) half, and
            // lanes 8-15 from the same places in block 2p + 1: two 32-entry permutes and a blend per run.
            var upperHalf = Vector512.Create(0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1).AsSingle();
            var strideFour = 4 * (Vector512<int>.Indices & Vector512.Create(7));
            fixed (float* source = x)
            fixed (float* target = permuted)
            {
                for (; p < pairs; p++)
                {
                    float* from = source + p * 128, to = target + p * 128;
                    for (int shift = 0; shift < 8; shift++)
                    {
                        Vector512<int> index = strideFour + Vector512.Create(shift >> 1);
                        int half = 32 * (shift & 1);
                        Vector512<float> first = Avx512F.PermuteVar16x32x2(Vector512.Load(from + half), index, Vector512.Load(from + half + 16));
                        Vector512<float> second = Avx512F.PermuteVar16x32x2(Vector512.Load(from + 64 + half), index, Vector512.Load(from + 64 + half + 16));
                        Vector512.ConditionalSelect(upperHalf, second, first).Store(to + shift * 16);
                    }
                }
            }
        }
        for (; p < pairs; p++)
            for (int shift = 0; shift < 8; shift++)
                for (int lane = 0; lane < 16; lane++)
                    permuted[p * 128 + shift * 16 + lane] = x[p * 128 + Nf4PairIndex(shift, lane)];
        x[(pairs * 128)..].CopyTo(permuted[(pairs * 128)..]);
    }

    /// <summary>Where, in a pair of blocks, the x element for nibble <paramref name="shift"/> of dword <paramref name="lane"/> is.</summary>
    private static int Nf4PairIndex(int shift, int lane) => 64 * (lane >> 3) + 4 * (lane & 7) + (shift >> 1) + 32 * (shift & 1);

    // One x row: the block dot product is scaled once per block; rows beyond count reuse row 0 (their sums are ignored).
    private static void DotQ8Vector512(byte* codes, float* scales, int blocks, float* x0, int xStride, int count,
        out float s0, out float s1, out float s2, out float s3)
    {
        float* x1 = count > 1 ? x0 + xStride : x0;
        float* x2 = count > 2 ? x0 + 2 * xStride : x0;
        float* x3 = count > 3 ? x0 + 3 * xStride : x0;
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        if (count == 1)
        {
            for (int b = 0; b < blocks; b++)
            {
                sbyte* q = (sbyte*)codes + b * 32;
                Vector512<float> w0 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q)));
                Vector512<float> w1 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16)));
                float* xb = x0 + b * 32;
                Vector512<float> t = Vector512.FusedMultiplyAdd(w1, Vector512.Load(xb + 16), w0 * Vector512.Load(xb));
                a0 = Vector512.FusedMultiplyAdd(t, Vector512.Create(scales[b]), a0);
            }
        }
        else
        {
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
        }
        s0 = Vector512.Sum(a0); s1 = Vector512.Sum(a1); s2 = Vector512.Sum(a2); s3 = Vector512.Sum(a3);
    }

    private static void DotQ8FourRowsVector512(byte* codes, float* scales, int blocks, float* x, byte* ahead, Span<float> sums)
    {
        nint rowBytes = (nint)blocks * 32;
        sbyte* q0 = (sbyte*)codes, q1 = q0 + rowBytes, q2 = q1 + rowBytes, q3 = q2 + rowBytes;
        float* c0 = scales, c1 = c0 + blocks, c2 = c1 + blocks, c3 = c2 + blocks;
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        int b = 0;
        if (ahead != null)
        {
            // Two blocks of four rows (256 bytes) per step, and 256 bytes of the pass after next: it is all in cache by then.
            for (; b + 2 <= blocks; b += 2)
            {
                int o = b * 32;
                Sse.Prefetch0(ahead + 4 * o);
                Sse.Prefetch0(ahead + 4 * o + 64);
                Sse.Prefetch0(ahead + 4 * o + 128);
                Sse.Prefetch0(ahead + 4 * o + 192);
                Q8FourRows(q0, q1, q2, q3, c0, c1, c2, c3, x, b, ref a0, ref a1, ref a2, ref a3);
                Q8FourRows(q0, q1, q2, q3, c0, c1, c2, c3, x, b + 1, ref a0, ref a1, ref a2, ref a3);
            }
        }
        for (; b < blocks; b++)
            Q8FourRows(q0, q1, q2, q3, c0, c1, c2, c3, x, b, ref a0, ref a1, ref a2, ref a3);
        sums[0] = Vector512.Sum(a0); sums[1] = Vector512.Sum(a1); sums[2] = Vector512.Sum(a2); sums[3] = Vector512.Sum(a3);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Q8FourRows(sbyte* q0, sbyte* q1, sbyte* q2, sbyte* q3, float* c0, float* c1, float* c2, float* c3, float* x, int b,
        ref Vector512<float> a0, ref Vector512<float> a1, ref Vector512<float> a2, ref Vector512<float> a3)
    {
        int o = b * 32;
        Vector512<float> xl = Vector512.Load(x + o), xh = Vector512.Load(x + o + 16);
        a0 = Vector512.FusedMultiplyAdd(Q8Block(q0 + o, xl, xh), Vector512.Create(c0[b]), a0);
        a1 = Vector512.FusedMultiplyAdd(Q8Block(q1 + o, xl, xh), Vector512.Create(c1[b]), a1);
        a2 = Vector512.FusedMultiplyAdd(Q8Block(q2 + o, xl, xh), Vector512.Create(c2[b]), a2);
        a3 = Vector512.FusedMultiplyAdd(Q8Block(q3 + o, xl, xh), Vector512.Create(c3[b]), a3);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Q8Block(sbyte* q, Vector512<float> xl, Vector512<float> xh)
    {
        Vector512<float> w0 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q)));
        Vector512<float> w1 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16)));
        return Vector512.FusedMultiplyAdd(w1, xh, w0 * xl);
    }

    /// <summary>
    /// Four W rows by one token, two nf4 blocks (64 bytes) per step: each dword of codes holds 8 nibbles, and shifting the
    /// whole vector right by 4s puts nibble s of every dword in its low 4 bits, which is all <c>vpermps</c> reads. So one
    /// load and 7 shifts feed 8 lookups of 16 weights, against x permuted to match (<see cref="PermuteForNf4Pairs"/>);
    /// lanes 0-7 belong to the first block and 8-15 to the second, so each row's pair sum is scaled by a vector holding
    /// both blocks' scales. A last odd block runs the per-block kernel on plain x.
    /// </summary>
    private static void DotNf4FourRowsVector512(byte* codes, float* scales, int blocks, float* x, float* permutedX, byte* ahead, Span<float> sums)
    {
        nint rowBytes = (nint)blocks * 32;
        byte* q0 = codes, q1 = q0 + rowBytes, q2 = q1 + rowBytes, q3 = q2 + rowBytes;
        float* c0 = scales, c1 = c0 + blocks, c2 = c1 + blocks, c3 = c2 + blocks;
        Vector512<float> table = Vector512.Create(Quantizer.Nf4Codes);
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        int b = 0;
        for (; b + 2 <= blocks; b += 2)
        {
            int o = b * 32;
            if (ahead != null)
            {
                Sse.Prefetch0(ahead + 4 * o);
                Sse.Prefetch0(ahead + 4 * o + 64);
                Sse.Prefetch0(ahead + 4 * o + 128);
                Sse.Prefetch0(ahead + 4 * o + 192);
            }
            float* xp = permutedX + b * 64;
            a0 = Vector512.FusedMultiplyAdd(Nf4Pair(table, q0 + o, xp), PairScales(c0 + b), a0);
            a1 = Vector512.FusedMultiplyAdd(Nf4Pair(table, q1 + o, xp), PairScales(c1 + b), a1);
            a2 = Vector512.FusedMultiplyAdd(Nf4Pair(table, q2 + o, xp), PairScales(c2 + b), a2);
            a3 = Vector512.FusedMultiplyAdd(Nf4Pair(table, q3 + o, xp), PairScales(c3 + b), a3);
        }
        if (b < blocks)
        {
            float* xb = x + b * 64;
            Vector512<float> x0 = Vector512.Load(xb), x1 = Vector512.Load(xb + 16), x2 = Vector512.Load(xb + 32), x3 = Vector512.Load(xb + 48);
            int o = b * 32;
            a0 = Vector512.FusedMultiplyAdd(Nf4Block(table, q0 + o, x0, x1, x2, x3), Vector512.Create(c0[b]), a0);
            a1 = Vector512.FusedMultiplyAdd(Nf4Block(table, q1 + o, x0, x1, x2, x3), Vector512.Create(c1[b]), a1);
            a2 = Vector512.FusedMultiplyAdd(Nf4Block(table, q2 + o, x0, x1, x2, x3), Vector512.Create(c2[b]), a2);
            a3 = Vector512.FusedMultiplyAdd(Nf4Block(table, q3 + o, x0, x1, x2, x3), Vector512.Create(c3[b]), a3);
        }
        sums[0] = Vector512.Sum(a0); sums[1] = Vector512.Sum(a1); sums[2] = Vector512.Sum(a2); sums[3] = Vector512.Sum(a3);
    }

    /// <summary>Per lane, Σ over the 8 nibbles of its code dword of NF4[nibble] · x (two running sums for a shorter chain).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Nf4Pair(Vector512<float> table, byte* q, float* xp)
    {
        Vector512<uint> c = Vector512.Load((uint*)q);
        Vector512<float> t = Avx512F.PermuteVar16x32(table, c.AsInt32()) * Vector512.Load(xp);
        Vector512<float> u = Avx512F.PermuteVar16x32(table, (c >> 4).AsInt32()) * Vector512.Load(xp + 16);
        t = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, (c >> 8).AsInt32()), Vector512.Load(xp + 32), t);
        u = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, (c >> 12).AsInt32()), Vector512.Load(xp + 48), u);
        t = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, (c >> 16).AsInt32()), Vector512.Load(xp + 64), t);
        u = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, (c >> 20).AsInt32()), Vector512.Load(xp + 80), u);
        t = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, (c >> 24).AsInt32()), Vector512.Load(xp + 96), t);
        u = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, (c >> 28).AsInt32()), Vector512.Load(xp + 112), u);
        return t + u;
    }

    /// <summary>scales[0] in lanes 0-7, scales[1] in lanes 8-15.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> PairScales(float* scales) =>
        Vector512.ConditionalSelect(Vector512.Create(0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1).AsSingle(),
            Vector512.Create(scales[1]), Vector512.Create(scales[0]));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Nf4Block(Vector512<float> table, byte* q, Vector512<float> x0, Vector512<float> x1, Vector512<float> x2, Vector512<float> x3)
    {
        // vpermps reads only the low 4 bits of each index: the low nibble needs no mask.
        Vector512<int> lo = Avx512F.ConvertToVector512Int32(Vector128.Load(q));
        Vector512<int> hi = Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16));
        Vector512<float> t = Avx512F.PermuteVar16x32(table, lo) * x0;
        t = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, hi), x1, t);
        t = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(lo, 4)), x2, t);
        return Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(hi, 4)), x3, t);
    }

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
