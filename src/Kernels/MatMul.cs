using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using PaliGemma.CpuOnly.Kernels.Simd;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>y = x W^T + b with W read in place in F32, BF16 or F16.</summary>
public static unsafe class MatMul
{
    // Fewer than PackedMinRows x rows (decode, short prompts): dot-product tiles that read W in place.
    // Register block: 4 x rows times 4 W rows, 16 vector accumulators running along K (both operands are contiguous in K).
    private const int MicroRows = 4;
    private const int MicroCols = 4;
    // A work item is a tile of x rows times W rows; both tiles' K blocks are sized to stay in L2 while the tile is swept.
    private const int TileRows = 64;
    private const int TileCols = 64;
    private const int DepthBlock = 1024;
    // Tiles with at least this many x rows widen F16 weights once into an fp32 panel instead of in every micro-kernel.
    private const int PanelMinRows = 8;
    // Below this many multiply-adds the fork/join costs more than it saves.
    private const long ParallelThreshold = 1L << 20;
    // From this many x rows the packed outer-product GEMM (PackedGemm) is faster than the dot-product tiles below
    // (measured at SigLIP's and Gemma's shapes: from 32 rows it wins on every one, at 16-28 on few).
    internal const int PackedMinRows = 32;

    // Each thread's fp32 panel, kept so that warm calls allocate nothing (a tile never calls MatMul again).
    [ThreadStatic] private static float[]? t_panel;

    /// <summary>
    /// y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] for m &lt; <paramref name="rows"/>.
    /// </summary>
    /// <param name="x">rows x W.Cols floats, row-major (longer spans are fine; the rest is ignored).</param>
    /// <param name="rows">Number of x rows (tokens); 0 does nothing.</param>
    /// <param name="w">The weight matrix, N = W.Rows by K = W.Cols.</param>
    /// <param name="bias">N floats, or empty for no bias.</param>
    /// <param name="y">Receives rows x W.Rows floats, row-major. Must not overlap x.</param>
    public static void Multiply(ReadOnlySpan<float> x, int rows, in WeightMatrix w, ReadOnlySpan<float> bias, Span<float> y) =>
        Multiply(x, rows, w, bias, y, SimdWidths.Best.FitTo(w.Cols));

    /// <summary>
    /// As <see cref="Multiply(ReadOnlySpan{float}, int, in WeightMatrix, ReadOnlySpan{float}, Span{float})"/>, then
    /// y = cap · tanh(y / cap) (Gemma 2's final-logit soft-cap), applied to each output tile as soon as it is complete,
    /// while it is still in cache. A cap of 0 means none.
    /// </summary>
    public static void Multiply(ReadOnlySpan<float> x, int rows, in WeightMatrix w, ReadOnlySpan<float> bias, Span<float> y, float outputSoftCap)
    {
        if (!(outputSoftCap >= 0f) || float.IsInfinity(outputSoftCap))
            throw new ArgumentOutOfRangeException(nameof(outputSoftCap), outputSoftCap, "the soft-cap must be 0 (none) or positive and finite");
        Multiply(x, rows, w, bias, y, SimdWidths.Best.FitTo(w.Cols), outputSoftCap);
    }

    /// <summary>
    /// Validates the operands of y[rows, n] = x[rows, k]·Wᵀ + bias, shared by every weight format (fp32/bf16/f16 here,
    /// q8/nf4 in the Quant library): x and y may be longer than needed, bias is empty or exactly n.
    /// </summary>
    public static void CheckOperands(ReadOnlySpan<float> x, int rows, int n, int k, ReadOnlySpan<float> bias, ReadOnlySpan<float> y)
    {
        if (x.Length < (long)rows * k)
            throw new ArgumentException($"x holds {x.Length} floats; {rows} rows of K = {k} need {(long)rows * k}", nameof(x));
        if (!bias.IsEmpty && bias.Length != n)
            throw new ArgumentException($"bias holds {bias.Length} floats; it must be empty or N = {n}", nameof(bias));
        if (y.Length < (long)rows * n)
            throw new ArgumentException($"y holds {y.Length} floats; {rows} rows of N = {n} need {(long)rows * n}", nameof(y));
    }

    /// <summary>As the public overload, with the vector width chosen by the caller (tests run every width).</summary>
    internal static void Multiply(ReadOnlySpan<float> x, int rows, in WeightMatrix w, ReadOnlySpan<float> bias, Span<float> y, SimdWidth width, float outputSoftCap = 0f)
    {
        if (rows is > 0 and <= Gemv.MaxRows) { Gemv.Multiply(x, rows, w, bias, y, width, outputSoftCap); return; }
        if (w.Data == null)
            throw new ArgumentException("the weight matrix is uninitialised (default WeightMatrix)", nameof(w));
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        int n = w.Rows, k = w.Cols;
        CheckOperands(x, rows, n, k, bias, y);
        if (rows == 0)
            return;

        fixed (float* xp = x)
        fixed (float* bp = bias)
        fixed (float* yp = y)
        {
            var shape = new Shape(xp, (byte*)w.Data, bias.IsEmpty ? null : bp, yp, rows, n, k, outputSoftCap);
            switch (width)
            {
                case SimdWidth.Vector512: Run<Simd512, Vector512<float>>(shape, w.DType); break;
                case SimdWidth.Vector256: Run<Simd256, Vector256<float>>(shape, w.DType); break;
                case SimdWidth.Vector128: Run<Simd128, Vector128<float>>(shape, w.DType); break;
                default: Run<SimdScalar, float>(shape, w.DType); break;
            }
        }
    }

    internal readonly struct Shape(float* x, byte* w, float* bias, float* y, int rows, int n, int k, float softCap)
    {
        public readonly float SoftCap = softCap;
        public readonly float* X = x;
        public readonly byte* W = w;
        public readonly float* Bias = bias;
        public readonly float* Y = y;
        public readonly int Rows = rows;
        public readonly int N = n;
        public readonly int K = k;
    }

    private static void Run<TOps, TVec>(in Shape shape, DType dtype)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        switch (dtype)
        {
            case DType.F32: Run<TOps, TVec, Float32Reader>(shape); break;
            case DType.BF16: Run<TOps, TVec, BFloat16Reader>(shape); break;
            case DType.F16: Run<TOps, TVec, HalfReader>(shape); break;
            default: throw new ArgumentException($"weight dtype {dtype} is not supported", "w");
        }
    }

    private static void Run<TOps, TVec, TReader>(in Shape shape)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TReader : struct, IWeightReader
    {
        if (shape.Rows >= PackedMinRows)
        {
            var rows = new StoredWeightRows<TOps, TVec, TReader>(shape.W, shape.K);
            PackedGemm.Multiply<TOps, TVec, StoredWeightRows<TOps, TVec, TReader>>(
                shape.X, shape.Rows, shape.N, shape.K, rows, shape.Bias, shape.Y, shape.SoftCap);
            return;
        }
        int tilesM = (shape.Rows + TileRows - 1) / TileRows;
        int tilesN = (shape.N + TileCols - 1) / TileCols;
        bool parallel = (long)shape.Rows * shape.N * shape.K >= ParallelThreshold;
        KernelThreading.For(tilesM * tilesN, parallel, new Tiles<TOps, TVec, TReader>(shape, tilesM));
    }

    private readonly struct Tiles<TOps, TVec, TReader>(Shape shape, int tilesM) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TReader : struct, IWeightReader
    {
        public void Run(int item)
        {
            // Consecutive items share a W tile, so it is fetched from memory once and then hit in cache.
            int m0 = item % tilesM * TileRows;
            int n0 = item / tilesM * TileCols;
            int m1 = Math.Min(shape.Rows, m0 + TileRows);
            int n1 = Math.Min(shape.N, n0 + TileCols);
            int k = shape.K;
            nint wStride = (nint)k * TReader.ElementSize;
            float* sums = stackalloc float[MicroRows * MicroCols];

            // Split K evenly into blocks of at most DepthBlock so every block does a useful amount of work.
            int depthBlocks = m1 - m0 < MicroRows ? 1 : (k + DepthBlock - 1) / DepthBlock;
            int depth = (k + depthBlocks - 1) / depthBlocks;

            // Formats that are costly to widen are widened once per tile into an fp32 panel when enough x rows reuse it.
            bool widenPanel = !TReader.CheapToWiden && m1 - m0 >= PanelMinRows;
            float[]? panelBuffer = null;
            if (widenPanel)
            {
                panelBuffer = t_panel;
                if (panelBuffer == null || panelBuffer.Length < TileCols * depth)
                    t_panel = panelBuffer = new float[TileCols * depth];
            }
            fixed (float* panel = panelBuffer)
            {
                for (int k0 = 0; k0 < k; k0 += depth)
                {
                    int k1 = Math.Min(k, k0 + depth);
                    if (widenPanel)
                    {
                        new StoredWeightRows<TOps, TVec, TReader>(shape.W, k).Widen(n0, n1 - n0, k0, k1, panel, depth);
                        // Offset so that element index k0 of a panel row is panel[row * depth].
                        Block<TOps, TVec, Float32Reader>.Sweep(shape, (byte*)(panel - k0), (nint)depth * sizeof(float), m0, m1, n0, n1, k0, k1, sums);
                    }
                    else
                    {
                        Block<TOps, TVec, TReader>.Sweep(shape, shape.W + n0 * wStride, wStride, m0, m1, n0, n1, k0, k1, sums);
                    }
                }
            }
            if (shape.SoftCap > 0f)
            {
                for (int m = m0; m < m1; m++)
                {
                    var tileRow = new Span<float>(shape.Y + (nint)m * shape.N + n0, n1 - n0);
                    Activations.SoftCap(tileRow, tileRow, shape.SoftCap);
                }
            }
        }
    }

    /// <summary>Register-blocked dot products of x rows against W rows over one K block (Attention scores use them too).</summary>
    internal static class Block<TOps, TVec, TReader>
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TReader : struct, IWeightReader
    {
        /// <summary>
        /// y[m0..m1, n0..n1] (+)= x[m, k0..k1] . W[n, k0..k1]; <paramref name="w"/> is W row n0 and element k of a row is
        /// read at index k. The first K block stores (with bias), later ones add.
        /// </summary>
        public static void Sweep(in Shape shape, byte* w, nint wStride, int m0, int m1, int n0, int n1, int k0, int k1, float* sums)
        {
            int k = shape.K;
            bool first = k0 == 0;
            for (int m = m0; m < m1; m += MicroRows)
            {
                int mr = Math.Min(MicroRows, m1 - m);
                float* xRow = shape.X + (nint)m * k;
                float* yRow = shape.Y + (nint)m * shape.N;
                for (int nn = n0; nn < n1; nn += MicroCols)
                {
                    int nr = Math.Min(MicroCols, n1 - nn);
                    byte* wRow = w + (nn - n0) * wStride;
                    float* bias = shape.Bias == null ? null : shape.Bias + nn;
                    if (mr == MicroRows && nr == MicroCols)
                    {
                        Dot4x4(xRow, k, wRow, wStride, k0, k1, sums);
                        Write(sums, MicroRows, MicroCols, yRow + nn, shape.N, bias, first);
                    }
                    else if (nr == MicroCols)
                    {
                        for (int r = 0; r < mr; r++)
                        {
                            Dot1x4(xRow + (nint)r * k, wRow, wStride, k0, k1, sums);
                            Write(sums, 1, MicroCols, yRow + (nint)r * shape.N + nn, shape.N, bias, first);
                        }
                    }
                    else
                    {
                        for (int c = 0; c < nr; c++)
                        {
                            float* columnBias = bias == null ? null : bias + c;
                            if (mr == MicroRows)
                            {
                                Dot4x1(xRow, k, wRow + c * wStride, k0, k1, sums);
                                Write(sums, MicroRows, 1, yRow + nn + c, shape.N, columnBias, first);
                            }
                            else
                            {
                                for (int r = 0; r < mr; r++)
                                {
                                    sums[0] = Dot1x1(xRow + (nint)r * k, wRow + c * wStride, k0, k1);
                                    Write(sums, 1, 1, yRow + (nint)r * shape.N + nn + c, shape.N, columnBias, first);
                                }
                            }
                        }
                    }
                }
            }
        }

        /// <summary>Stores (first K block: with bias) or adds (later K blocks) a rows x cols block of sums into y.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Write(float* sums, int rows, int cols, float* y, int yStride, float* bias, bool first)
        {
            for (int r = 0; r < rows; r++)
            {
                float* yr = y + (nint)r * yStride;
                for (int c = 0; c < cols; c++)
                {
                    float s = sums[r * cols + c];
                    yr[c] = first ? (bias == null ? s : s + bias[c]) : yr[c] + s;
                }
            }
        }

        // Vector loop bound: the largest index <= end that keeps [start, bound) a whole number of vectors (Count is a power of two).
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static nint VectorEnd(nint start, nint end) => start + ((end - start) & ~(nint)(TOps.Count - 1));

        internal static void Dot4x4(float* x0, nint xStride, byte* w0, nint wStride, nint start, nint end, float* sums)
        {
            float* x1 = x0 + xStride, x2 = x1 + xStride, x3 = x2 + xStride;
            byte* w1 = w0 + wStride, w2 = w1 + wStride, w3 = w2 + wStride;
            TVec a00 = TOps.Zero, a01 = TOps.Zero, a02 = TOps.Zero, a03 = TOps.Zero;
            TVec a10 = TOps.Zero, a11 = TOps.Zero, a12 = TOps.Zero, a13 = TOps.Zero;
            TVec a20 = TOps.Zero, a21 = TOps.Zero, a22 = TOps.Zero, a23 = TOps.Zero;
            TVec a30 = TOps.Zero, a31 = TOps.Zero, a32 = TOps.Zero, a33 = TOps.Zero;
            nint i = start;
            for (nint vectorEnd = VectorEnd(start, end); i < vectorEnd; i += TOps.Count)
            {
                TVec v0 = TReader.Load<TOps, TVec>(w0, i);
                TVec v1 = TReader.Load<TOps, TVec>(w1, i);
                TVec v2 = TReader.Load<TOps, TVec>(w2, i);
                TVec v3 = TReader.Load<TOps, TVec>(w3, i);
                TVec u = TOps.Load(x0 + i);
                a00 = TOps.MultiplyAdd(u, v0, a00); a01 = TOps.MultiplyAdd(u, v1, a01);
                a02 = TOps.MultiplyAdd(u, v2, a02); a03 = TOps.MultiplyAdd(u, v3, a03);
                u = TOps.Load(x1 + i);
                a10 = TOps.MultiplyAdd(u, v0, a10); a11 = TOps.MultiplyAdd(u, v1, a11);
                a12 = TOps.MultiplyAdd(u, v2, a12); a13 = TOps.MultiplyAdd(u, v3, a13);
                u = TOps.Load(x2 + i);
                a20 = TOps.MultiplyAdd(u, v0, a20); a21 = TOps.MultiplyAdd(u, v1, a21);
                a22 = TOps.MultiplyAdd(u, v2, a22); a23 = TOps.MultiplyAdd(u, v3, a23);
                u = TOps.Load(x3 + i);
                a30 = TOps.MultiplyAdd(u, v0, a30); a31 = TOps.MultiplyAdd(u, v1, a31);
                a32 = TOps.MultiplyAdd(u, v2, a32); a33 = TOps.MultiplyAdd(u, v3, a33);
            }
            sums[0] = TOps.Sum(a00); sums[1] = TOps.Sum(a01); sums[2] = TOps.Sum(a02); sums[3] = TOps.Sum(a03);
            sums[4] = TOps.Sum(a10); sums[5] = TOps.Sum(a11); sums[6] = TOps.Sum(a12); sums[7] = TOps.Sum(a13);
            sums[8] = TOps.Sum(a20); sums[9] = TOps.Sum(a21); sums[10] = TOps.Sum(a22); sums[11] = TOps.Sum(a23);
            sums[12] = TOps.Sum(a30); sums[13] = TOps.Sum(a31); sums[14] = TOps.Sum(a32); sums[15] = TOps.Sum(a33);
            for (; i < end; i++)
            {
                float v0 = TReader.LoadScalar(w0, i), v1 = TReader.LoadScalar(w1, i);
                float v2 = TReader.LoadScalar(w2, i), v3 = TReader.LoadScalar(w3, i);
                float u0 = x0[i], u1 = x1[i], u2 = x2[i], u3 = x3[i];
                sums[0] += u0 * v0; sums[1] += u0 * v1; sums[2] += u0 * v2; sums[3] += u0 * v3;
                sums[4] += u1 * v0; sums[5] += u1 * v1; sums[6] += u1 * v2; sums[7] += u1 * v3;
                sums[8] += u2 * v0; sums[9] += u2 * v1; sums[10] += u2 * v2; sums[11] += u2 * v3;
                sums[12] += u3 * v0; sums[13] += u3 * v1; sums[14] += u3 * v2; sums[15] += u3 * v3;
            }
        }

        internal static void Dot1x4(float* x, byte* w0, nint wStride, nint start, nint end, float* sums)
        {
            byte* w1 = w0 + wStride, w2 = w1 + wStride, w3 = w2 + wStride;
            TVec a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero;
            nint i = start;
            for (nint vectorEnd = VectorEnd(start, end); i < vectorEnd; i += TOps.Count)
            {
                TVec u = TOps.Load(x + i);
                a0 = TOps.MultiplyAdd(u, TReader.Load<TOps, TVec>(w0, i), a0);
                a1 = TOps.MultiplyAdd(u, TReader.Load<TOps, TVec>(w1, i), a1);
                a2 = TOps.MultiplyAdd(u, TReader.Load<TOps, TVec>(w2, i), a2);
                a3 = TOps.MultiplyAdd(u, TReader.Load<TOps, TVec>(w3, i), a3);
            }
            float s0 = TOps.Sum(a0), s1 = TOps.Sum(a1), s2 = TOps.Sum(a2), s3 = TOps.Sum(a3);
            for (; i < end; i++)
            {
                float u = x[i];
                s0 += u * TReader.LoadScalar(w0, i);
                s1 += u * TReader.LoadScalar(w1, i);
                s2 += u * TReader.LoadScalar(w2, i);
                s3 += u * TReader.LoadScalar(w3, i);
            }
            sums[0] = s0; sums[1] = s1; sums[2] = s2; sums[3] = s3;
        }

        internal static void Dot4x1(float* x0, nint xStride, byte* w, nint start, nint end, float* sums)
        {
            float* x1 = x0 + xStride, x2 = x1 + xStride, x3 = x2 + xStride;
            TVec a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero;
            nint i = start;
            for (nint vectorEnd = VectorEnd(start, end); i < vectorEnd; i += TOps.Count)
            {
                TVec v = TReader.Load<TOps, TVec>(w, i);
                a0 = TOps.MultiplyAdd(TOps.Load(x0 + i), v, a0);
                a1 = TOps.MultiplyAdd(TOps.Load(x1 + i), v, a1);
                a2 = TOps.MultiplyAdd(TOps.Load(x2 + i), v, a2);
                a3 = TOps.MultiplyAdd(TOps.Load(x3 + i), v, a3);
            }
            float s0 = TOps.Sum(a0), s1 = TOps.Sum(a1), s2 = TOps.Sum(a2), s3 = TOps.Sum(a3);
            for (; i < end; i++)
            {
                float v = TReader.LoadScalar(w, i);
                s0 += x0[i] * v; s1 += x1[i] * v; s2 += x2[i] * v; s3 += x3[i] * v;
            }
            sums[0] = s0; sums[1] = s1; sums[2] = s2; sums[3] = s3;
        }

        internal static float Dot1x1(float* x, byte* w, nint start, nint end)
        {
            TVec a0 = TOps.Zero, a1 = TOps.Zero;
            nint i = start;
            nint vectorEnd = VectorEnd(start, end);
            // Two accumulators hide the FMA latency on this lone dot product.
            for (; i + TOps.Count < vectorEnd; i += 2 * TOps.Count)
            {
                a0 = TOps.MultiplyAdd(TOps.Load(x + i), TReader.Load<TOps, TVec>(w, i), a0);
                a1 = TOps.MultiplyAdd(TOps.Load(x + i + TOps.Count), TReader.Load<TOps, TVec>(w, i + TOps.Count), a1);
            }
            for (; i < vectorEnd; i += TOps.Count)
                a0 = TOps.MultiplyAdd(TOps.Load(x + i), TReader.Load<TOps, TVec>(w, i), a0);
            float s = TOps.Sum(TOps.Add(a0, a1));
            for (; i < end; i++)
                s += x[i] * TReader.LoadScalar(w, i);
            return s;
        }
    }
}
