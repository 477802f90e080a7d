using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>Which kernel multiplies many x rows (prefill, vision) by q8 weights.</summary>
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
/// and dequantizes them in registers. Many x rows (prefill, vision): q8 weights meet activations quantized to int16 (or int8)
/// blocks in integer multiply-adds (<see cref="IntegerGemm"/>, chosen by <see cref="PrefillKernel"/>); nf4 weights (and q8 on CPUs without integer multiply-add) are dequantized a
/// K block of a few rows at a time straight into the panels of the packed fp32 GEMM (<see cref="PackedGemm"/>).
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
    /// the x rows to whole micro-kernels and the per-item copy of W cost more than the multiply-adds save).
    /// </summary>
    public const int IntegerMinRows = 16;

    /// <summary>
    /// The kernel for more than <see cref="GemvMaxRows"/> x rows of q8 weights, process-wide (default
    /// <see cref="QuantPrefillKernel.Auto"/>). nf4 weights always use the dequantized panels.
    /// </summary>
    public static QuantPrefillKernel PrefillKernel { get; set; } = QuantPrefillKernel.Auto;

    /// <summary>The integer path a many-row call with these weights takes under <see cref="PrefillKernel"/>; None: the fp32 panels (or the GEMV for few rows).</summary>
    internal static IntegerGemm.Path PrefillPath(int rows, QuantizedMatrix w)
    {
        if (rows <= GemvMaxRows || w.Format != QuantFormat.Q8)
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
            fixed (float* xp = xs)
            fixed (float* bp = bias)
            fixed (float* yp = y)
            {
                var job = new GemvJob(w, xp, padded, rows, bias.IsEmpty ? null : bp, yp, softCap, path);
                int items = (w.Rows + GemvRowsPerItem - 1) / GemvRowsPerItem;
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

    private struct GemvJob(QuantizedMatrix w, float* x, int xStride, int rows, float* bias, float* y, float softCap, GemvPath path) : IWorkItems
    {
        public void Run(int item)
        {
            int n0 = item * GemvRowsPerItem;
            int n1 = Math.Min(w.Rows, n0 + GemvRowsPerItem);
            int blocks = w.BlocksPerRow;
            int yStride = w.Rows;
            int n = n0;
            if (rows == 1 && path == GemvPath.Vector512)
            {
                // One token: four W rows per pass share every x load (x of a long K row lives in L2, not L1).
                Span<float> sums = stackalloc float[4];
                for (; n + 4 <= n1; n += 4)
                {
                    byte* codes = w.Blocks + (long)n * blocks * 32;
                    float* scales = w.Scales + (long)n * blocks;
                    if (w.Format == QuantFormat.Q8)
                        DotQ8FourRowsVector512(codes, scales, blocks, x, sums);
                    else
                        DotNf4FourRowsVector512(codes, scales, blocks, x, sums);
                    for (int r = 0; r < 4; r++)
                        Store(y + n + r, sums[r] + (bias == null ? 0f : bias[n + r]), softCap);
                }
            }
            for (; n < n1; n++)
            {
                byte* codes = w.Blocks + (long)n * blocks * 32;
                float* scales = w.Scales + (long)n * blocks;
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

    private static void DotQ8FourRowsVector512(byte* codes, float* scales, int blocks, float* x, Span<float> sums)
    {
        nint rowBytes = (nint)blocks * 32;
        sbyte* q0 = (sbyte*)codes, q1 = q0 + rowBytes, q2 = q1 + rowBytes, q3 = q2 + rowBytes;
        float* c0 = scales, c1 = c0 + blocks, c2 = c1 + blocks, c3 = c2 + blocks;
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < blocks; b++)
        {
            int o = b * 32;
            Vector512<float> xl = Vector512.Load(x + o), xh = Vector512.Load(x + o + 16);
            a0 = Vector512.FusedMultiplyAdd(Q8Block(q0 + o, xl, xh), Vector512.Create(c0[b]), a0);
            a1 = Vector512.FusedMultiplyAdd(Q8Block(q1 + o, xl, xh), Vector512.Create(c1[b]), a1);
            a2 = Vector512.FusedMultiplyAdd(Q8Block(q2 + o, xl, xh), Vector512.Create(c2[b]), a2);
            a3 = Vector512.FusedMultiplyAdd(Q8Block(q3 + o, xl, xh), Vector512.Create(c3[b]), a3);
        }
        sums[0] = Vector512.Sum(a0); sums[1] = Vector512.Sum(a1); sums[2] = Vector512.Sum(a2); sums[3] = Vector512.Sum(a3);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Q8Block(sbyte* q, Vector512<float> xl, Vector512<float> xh)
    {
        Vector512<float> w0 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q)));
        Vector512<float> w1 = Avx512F.ConvertToVector512Single(Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16)));
        return Vector512.FusedMultiplyAdd(w1, xh, w0 * xl);
    }

    private static void DotNf4FourRowsVector512(byte* codes, float* scales, int blocks, float* x, Span<float> sums)
    {
        nint rowBytes = (nint)blocks * 32;
        byte* q0 = codes, q1 = q0 + rowBytes, q2 = q1 + rowBytes, q3 = q2 + rowBytes;
        float* c0 = scales, c1 = c0 + blocks, c2 = c1 + blocks, c3 = c2 + blocks;
        Vector512<float> table = Vector512.Create(Quantizer.Nf4Codes);
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < blocks; b++)
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

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Nf4Block(Vector512<float> table, byte* q, Vector512<float> x0, Vector512<float> x1, Vector512<float> x2, Vector512<float> x3)
    {
        Vector512<int> nibble = Vector512.Create(0xF);
        Vector512<int> lo = Avx512F.ConvertToVector512Int32(Vector128.Load(q));
        Vector512<int> hi = Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16));
        Vector512<float> t = Avx512F.PermuteVar16x32(table, lo & nibble) * x0;
        t = Vector512.FusedMultiplyAdd(Avx512F.PermuteVar16x32(table, hi & nibble), x1, t);
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
        Vector512<int> nibble = Vector512.Create(0xF);
        Vector512<float> a0 = Vector512<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < blocks; b++)
        {
            byte* q = codes + b * 32;
            // Bytes 0..15 carry elements 0..15 (low nibbles) and 32..47 (high); bytes 16..31 carry 16..31 and 48..63.
            Vector512<int> lo = Avx512F.ConvertToVector512Int32(Vector128.Load(q));
            Vector512<int> hi = Avx512F.ConvertToVector512Int32(Vector128.Load(q + 16));
            Vector512<float> w0 = Avx512F.PermuteVar16x32(table, lo & nibble);
            Vector512<float> w2 = Avx512F.PermuteVar16x32(table, Vector512.ShiftRightLogical(lo, 4));
            Vector512<float> w1 = Avx512F.PermuteVar16x32(table, hi & nibble);
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
        Vector256<int> nibble = Vector256.Create(0xF);
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
                Vector256<float> low = Lookup(lowTable, highTable, packed & nibble);
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
