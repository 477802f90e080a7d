using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels.Simd;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>
/// y = x·Wᵀ + b for 1 to <see cref="MaxRows"/> x rows (decode). Every weight is used once per call, so the kernel is
/// built to stream W at memory speed rather than to reuse it: the rows are cut into a few long contiguous runs per
/// thread, and each run into four lanes (contiguous quarters) that are read side by side, one row of each lane per
/// step. A core then keeps four long sequential streams in flight, which measured faster than one stream (prefetched or
/// not) on the same bytes; every line of each lane is also prefetched in software a short distance ahead, running on
/// into the lane's next row (the hardware prefetchers stop at each 4 KB page). Every x load feeds four W rows and every
/// W load 1-4 x rows. bf16 weights are widened two vectors per 64-byte load (a shift for the even elements, a mask for
/// the odd ones) against an x permuted once per call to match.
/// </summary>
internal static unsafe class Gemv
{
    public const int MaxRows = 4;
    // Lanes read side by side (so every x load feeds four W rows).
    private const int GroupRows = 4;
    // How far ahead of each lane's position its lines are prefetched (8 KB in flight in all). Measured on Zen 5 against
    // 1 and 4 KB, and against one 8 KB-prefetched stream per thread: 2 KB per lane was as fast or faster in every case.
    private const int LanePrefetchBytes = 2048;
    // Work items per thread: long contiguous runs, but enough of them that a thread the OS delays does not hold the rest up.
    private const int ChunksPerThread = 4;
    private const long MinChunkBytes = 64 << 10;
    // Below this much weight one thread streams it about as fast as two (a 1 MB matrix takes ~30 µs on one core) and a
    // fork/join only adds risk: when another process holds a core, the call waits for a descheduled worker's chunk.
    private const long ParallelMinBytes = 2 << 20;

    // The calling thread's buffer for x in the order the paired bf16 loads expect (kept: warm calls allocate nothing).
    [ThreadStatic] private static float[]? t_permutedX;

    public static void Multiply(ReadOnlySpan<float> x, int rows, in WeightMatrix w, ReadOnlySpan<float> bias, Span<float> y, SimdWidth width, float outputSoftCap)
    {
        if (w.Data == null)
            throw new ArgumentException("the weight matrix is uninitialised (default WeightMatrix)", nameof(w));
        if (rows is < 1 or > MaxRows)
            throw new ArgumentOutOfRangeException(nameof(rows), rows, $"the GEMV takes 1 to {MaxRows} x rows");
        int n = w.Rows, k = w.Cols;
        MatMul.CheckOperands(x, rows, n, k, bias, y);
        fixed (float* xp = x)
        fixed (float* bp = bias)
        fixed (float* yp = y)
        {
            var problem = new Problem(xp, (byte*)w.Data, bias.IsEmpty ? null : bp, yp, rows, n, k, outputSoftCap);
            switch (width)
            {
                case SimdWidth.Vector512: Run<Simd512, Vector512<float>>(problem, w.DType); break;
                case SimdWidth.Vector256: Run<Simd256, Vector256<float>>(problem, w.DType); break;
                case SimdWidth.Vector128: Run<Simd128, Vector128<float>>(problem, w.DType); break;
                default: Run<SimdScalar, float>(problem, w.DType); break;
            }
        }
    }

    private readonly struct Problem(float* x, byte* w, float* bias, float* y, int rows, int n, int k, float softCap)
    {
        public readonly float* X = x;
        public readonly byte* W = w;
        public readonly float* Bias = bias;
        public readonly float* Y = y;
        public readonly int Rows = rows;
        public readonly int N = n;
        public readonly int K = k;
        public readonly float SoftCap = softCap;
    }

    private static void Run<TOps, TVec>(in Problem problem, DType dtype)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        switch (dtype)
        {
            case DType.F32: Run<TOps, TVec, ConsecutivePairs<Float32Reader>>(problem); break;
            case DType.BF16: Run<TOps, TVec, BFloat16Pairs>(problem); break;
            case DType.F16: Run<TOps, TVec, ConsecutivePairs<HalfReader>>(problem); break;
            default: throw new ArgumentException($"weight dtype {dtype} is not supported", "w");
        }
    }

    private static void Run<TOps, TVec, TPairs>(Problem problem)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TPairs : struct, IPairReader
    {
        int k = problem.K;
        int groups = (problem.N + GroupRows - 1) / GroupRows;
        int chunks = ChunkCount((long)k * TPairs.ElementSize * problem.N, problem.N, KernelThreading.MaxThreads);

        // The paired loads see x in their own order over the whole pairs; the scalar tail reads the caller's x.
        int pairElements = 2 * TOps.Count;
        int pairedK = k - k % pairElements;
        float* xPaired = problem.X;
        float[]? permuted = null;
        if (TPairs.PermutesX && TOps.Count > 1 && pairedK > 0)
        {
            permuted = t_permutedX;
            if (permuted == null || permuted.Length < problem.Rows * k)
                t_permutedX = permuted = GC.AllocateUninitializedArray<float>(Math.Max(problem.Rows * k, 4096), pinned: true);
            fixed (float* p = permuted)
                xPaired = p;
            for (int r = 0; r < problem.Rows; r++)
                Deinterleave(problem.X + (nint)r * k, xPaired + (nint)r * k, pairedK, TOps.Count);
        }

        KernelThreading.For(chunks, chunks > 1, new Chunks<TOps, TVec, TPairs>(problem, xPaired, groups, chunks));
        GC.KeepAlive(permuted);
    }

    /// <summary>Work items for a matrix of <paramref name="weightBytes"/> in <paramref name="rows"/> W rows: 1 runs on the calling thread.</summary>
    internal static int ChunkCount(long weightBytes, int rows, int threads)
    {
        if (threads < 2 || weightBytes < ParallelMinBytes)
            return 1;
        long byBytes = Math.Max(1, weightBytes / MinChunkBytes);
        int groups = (rows + GroupRows - 1) / GroupRows;
        return (int)Math.Min(Math.Min((long)threads * ChunksPerThread, byBytes), groups);
    }

    /// <summary>Per block of 2·count floats: the even-indexed ones, then the odd-indexed ones.</summary>
    private static void Deinterleave(float* source, float* destination, int length, int count)
    {
        int block = 0;
        if (count == 16 && Avx512F.IsSupported)
        {
            Vector512<int> even = Vector512.Create(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            Vector512<int> odd = even + Vector512<int>.One;
            for (; block < length; block += 32)
            {
                Vector512<float> low = Vector512.Load(source + block), high = Vector512.Load(source + block + 16);
                Avx512F.PermuteVar16x32x2(low, even, high).Store(destination + block);
                Avx512F.PermuteVar16x32x2(low, odd, high).Store(destination + block + 16);
            }
        }
        else if (count == 8 && Avx512F.VL.IsSupported)
        {
            Vector256<int> even = Vector256.Create(0, 2, 4, 6, 8, 10, 12, 14);
            Vector256<int> odd = even + Vector256<int>.One;
            for (; block < length; block += 16)
            {
                Vector256<float> low = Vector256.Load(source + block), high = Vector256.Load(source + block + 8);
                Avx512F.VL.PermuteVar8x32x2(low, even, high).Store(destination + block);
                Avx512F.VL.PermuteVar8x32x2(low, odd, high).Store(destination + block + 8);
            }
        }
        for (; block < length; block += 2 * count)
        {
            for (int j = 0; j < count; j++)
            {
                destination[block + j] = source[block + 2 * j];
                destination[block + count + j] = source[block + 2 * j + 1];
            }
        }
    }

    private readonly struct Chunks<TOps, TVec, TPairs>(Problem problem, float* xPaired, int groups, int chunks) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
        where TPairs : struct, IPairReader
    {
        public void Run(int item)
        {
            int n0 = (int)((long)groups * item / chunks) * GroupRows;
            int n1 = Math.Min(problem.N, (int)((long)groups * (item + 1) / chunks) * GroupRows);
            RunLanes(n0, n1);
            if (problem.SoftCap > 0f)
            {
                for (int r = 0; r < problem.Rows; r++)
                {
                    var part = new Span<float>(problem.Y + (nint)r * problem.N + n0, n1 - n0);
                    Activations.SoftCap(part, part, problem.SoftCap);
                }
            }
        }

        /// <summary>
        /// Rows n0..n1 as four lanes, each a contiguous quarter of them: a step reads one row of every lane side by side,
        /// so a thread keeps four long sequential streams going (more lines in flight than one stream gets, measured), and
        /// each lane's prefetch runs on into its own next row.
        /// </summary>
        private void RunLanes(int n0, int n1)
        {
            int k = problem.K, rows = problem.Rows;
            nint rowBytes = (nint)k * TPairs.ElementSize;
            float* y = problem.Y, bias = problem.Bias;
            float* sums = stackalloc float[MaxRows * GroupRows];
            // Three x rows run the four-row kernel with the last row repeated (its results are dropped).
            nint xLast = (nint)(rows == 3 ? 2 : rows - 1) * k;
            int count = n1 - n0;
            // An odd lane length keeps the lanes from starting a power of two apart (2048-wide bf16 rows are 4 KB, and a
            // chunk of 2^k rows would put all four lanes in the same cache sets); the last lanes may come out short.
            int laneRows = ((count + GroupRows - 1) / GroupRows) | 1;
            byte* first = problem.W + n0 * rowBytes;
            // Each lane's first lines, which no earlier row prefetched.
            for (int lane = 0; lane < GroupRows; lane++)
                for (nint offset = 0; offset < LanePrefetchBytes; offset += 64)
                    Prefetch(first + lane * laneRows * rowBytes + offset);
            for (int t = 0; t < laneRows; t++)
            {
                // Lane runs only get shorter, so the lanes that still have row t are the first ones; the others repeat
                // the last of them (read from cache, sums dropped).
                int valid = Math.Min(GroupRows, (count - t + laneRows - 1) / laneRows);
                byte* w0 = first + t * rowBytes;
                nint laneBytes = laneRows * rowBytes;
                nint step1 = valid > 1 ? laneBytes : 0, step2 = valid > 2 ? 2 * laneBytes : step1, step3 = valid > 3 ? 3 * laneBytes : step2;
                var group = new Group(w0, w0 + step1, w0 + step2, w0 + step3);
                if (rows == 1)
                    Dot1x4(problem.X, xPaired, k, group, sums);
                else if (rows == 2)
                    Dot2(problem.X, xPaired, k, group, sums);
                else
                    Dot4(problem.X, xPaired, k, xLast, group, sums);
                for (int r = 0; r < rows; r++)
                {
                    float* yRow = y + (nint)r * problem.N + n0 + t;
                    for (int c = 0; c < valid; c++)
                    {
                        int n = n0 + t + c * laneRows;
                        yRow[c * laneRows] = bias == null ? sums[r * GroupRows + c] : sums[r * GroupRows + c] + bias[n];
                    }
                }
            }
        }

        /// <summary>The current W row of each lane.</summary>
        private readonly struct Group(byte* w0, byte* w1, byte* w2, byte* w3)
        {
            public readonly byte* W0 = w0, W1 = w1, W2 = w2, W3 = w3;
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Prefetch(byte* p)
        {
            if (Sse.IsSupported)
                Sse.Prefetch0(p);
        }

        /// <summary>Prefetches the line <paramref name="ahead"/> bytes past each row's current position.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void PrefetchGroup(byte* w0, byte* w1, byte* w2, byte* w3, nint ahead)
        {
            Prefetch(w0 + ahead);
            Prefetch(w1 + ahead);
            Prefetch(w2 + ahead);
            Prefetch(w3 + ahead);
            if (TOps.Count * 2 * TPairs.ElementSize > 64)
            {
                Prefetch(w0 + ahead + 64);
                Prefetch(w1 + ahead + 64);
                Prefetch(w2 + ahead + 64);
                Prefetch(w3 + ahead + 64);
            }
        }

        private static void Dot1x4(float* x, float* xp, int k, in Group g, float* sums)
        {
            int pair = 2 * TOps.Count;
            int pairedK = k - k % pair;
            byte* w0 = g.W0, w1 = g.W1, w2 = g.W2, w3 = g.W3;
            TVec e0 = TOps.Zero, e1 = TOps.Zero, e2 = TOps.Zero, e3 = TOps.Zero;
            TVec o0 = TOps.Zero, o1 = TOps.Zero, o2 = TOps.Zero, o3 = TOps.Zero;
            nint i = 0;
            for (; i < pairedK; i += pair)
            {
                PrefetchGroup(w0, w1, w2, w3, LanePrefetchBytes + i * TPairs.ElementSize);
                TVec xe = TOps.Load(xp + i), xo = TOps.Load(xp + i + TOps.Count);
                TPairs.Load<TOps, TVec>(w0, i, out TVec v, out TVec u);
                e0 = TOps.MultiplyAdd(xe, v, e0);
                o0 = TOps.MultiplyAdd(xo, u, o0);
                TPairs.Load<TOps, TVec>(w1, i, out v, out u);
                e1 = TOps.MultiplyAdd(xe, v, e1);
                o1 = TOps.MultiplyAdd(xo, u, o1);
                TPairs.Load<TOps, TVec>(w2, i, out v, out u);
                e2 = TOps.MultiplyAdd(xe, v, e2);
                o2 = TOps.MultiplyAdd(xo, u, o2);
                TPairs.Load<TOps, TVec>(w3, i, out v, out u);
                e3 = TOps.MultiplyAdd(xe, v, e3);
                o3 = TOps.MultiplyAdd(xo, u, o3);
            }
            float s0 = TOps.Sum(TOps.Add(e0, o0)), s1 = TOps.Sum(TOps.Add(e1, o1));
            float s2 = TOps.Sum(TOps.Add(e2, o2)), s3 = TOps.Sum(TOps.Add(e3, o3));
            for (; i < k; i++)
            {
                float a = x[i];
                s0 += a * TPairs.LoadScalar(w0, i);
                s1 += a * TPairs.LoadScalar(w1, i);
                s2 += a * TPairs.LoadScalar(w2, i);
                s3 += a * TPairs.LoadScalar(w3, i);
            }
            sums[0] = s0; sums[1] = s1; sums[2] = s2; sums[3] = s3;
        }

        private static void Dot2(float* x, float* xp, int k, in Group g, float* sums)
        {
            int pair = 2 * TOps.Count;
            int pairedK = k - k % pair;
            float* xp1 = xp + k;
            TVec a0 = TOps.Zero, a1 = TOps.Zero, a2 = TOps.Zero, a3 = TOps.Zero;
            TVec b0 = TOps.Zero, b1 = TOps.Zero, b2 = TOps.Zero, b3 = TOps.Zero;
            byte* w0 = g.W0, w1 = g.W1, w2 = g.W2, w3 = g.W3;
            nint i = 0;
            for (; i < pairedK; i += pair)
            {
                PrefetchGroup(w0, w1, w2, w3, LanePrefetchBytes + i * TPairs.ElementSize);
                TVec xe = TOps.Load(xp + i), xo = TOps.Load(xp + i + TOps.Count);
                TVec ye = TOps.Load(xp1 + i), yo = TOps.Load(xp1 + i + TOps.Count);
                TPairs.Load<TOps, TVec>(w0, i, out TVec v, out TVec u);
                a0 = TOps.MultiplyAdd(xe, v, a0); a0 = TOps.MultiplyAdd(xo, u, a0); b0 = TOps.MultiplyAdd(ye, v, b0); b0 = TOps.MultiplyAdd(yo, u, b0);
                TPairs.Load<TOps, TVec>(w1, i, out v, out u);
                a1 = TOps.MultiplyAdd(xe, v, a1); a1 = TOps.MultiplyAdd(xo, u, a1); b1 = TOps.MultiplyAdd(ye, v, b1); b1 = TOps.MultiplyAdd(yo, u, b1);
                TPairs.Load<TOps, TVec>(w2, i, out v, out u);
                a2 = TOps.MultiplyAdd(xe, v, a2); a2 = TOps.MultiplyAdd(xo, u, a2); b2 = TOps.MultiplyAdd(ye, v, b2); b2 = TOps.MultiplyAdd(yo, u, b2);
                TPairs.Load<TOps, TVec>(w3, i, out v, out u);
                a3 = TOps.MultiplyAdd(xe, v, a3); a3 = TOps.MultiplyAdd(xo, u, a3); b3 = TOps.MultiplyAdd(ye, v, b3); b3 = TOps.MultiplyAdd(yo, u, b3);
            }
            float s0 = TOps.Sum(a0), s1 = TOps.Sum(a1), s2 = TOps.Sum(a2), s3 = TOps.Sum(a3);
            float t0 = TOps.Sum(b0), t1 = TOps.Sum(b1), t2 = TOps.Sum(b2), t3 = TOps.Sum(b3);
            float* x1 = x + k;
            for (; i < k; i++)
            {
                float c0 = TPairs.LoadScalar(w0, i), c1 = TPairs.LoadScalar(w1, i), c2 = TPairs.LoadScalar(w2, i), c3 = TPairs.LoadScalar(w3, i);
                float a = x[i], b = x1[i];
                s0 += a * c0; s1 += a * c1; s2 += a * c2; s3 += a * c3;
                t0 += b * c0; t1 += b * c1; t2 += b * c2; t3 += b * c3;
            }
            sums[0] = s0; sums[1] = s1; sums[2] = s2; sums[3] = s3;
            sums[4] = t0; sums[5] = t1; sums[6] = t2; sums[7] = t3;
        }

        private static void Dot4(float* x, float* xp, int k, nint lastRowOffset, in Group g, float* sums)
        {
            int pair = 2 * TOps.Count;
            int pairedK = k - k % pair;
            float* xp1 = xp + k, xp2 = xp + 2 * (nint)k, xp3 = xp + lastRowOffset;
            TVec a00 = TOps.Zero, a01 = TOps.Zero, a02 = TOps.Zero, a03 = TOps.Zero;
            TVec a10 = TOps.Zero, a11 = TOps.Zero, a12 = TOps.Zero, a13 = TOps.Zero;
            TVec a20 = TOps.Zero, a21 = TOps.Zero, a22 = TOps.Zero, a23 = TOps.Zero;
            TVec a30 = TOps.Zero, a31 = TOps.Zero, a32 = TOps.Zero, a33 = TOps.Zero;
            byte* w0 = g.W0, w1 = g.W1, w2 = g.W2, w3 = g.W3;
            nint i = 0;
            for (; i < pairedK; i += pair)
            {
                PrefetchGroup(w0, w1, w2, w3, LanePrefetchBytes + i * TPairs.ElementSize);
                TPairs.Load<TOps, TVec>(w0, i, out TVec v0, out TVec u0);
                TPairs.Load<TOps, TVec>(w1, i, out TVec v1, out TVec u1);
                TPairs.Load<TOps, TVec>(w2, i, out TVec v2, out TVec u2);
                TPairs.Load<TOps, TVec>(w3, i, out TVec v3, out TVec u3);
                TVec xe = TOps.Load(xp + i), xo = TOps.Load(xp + i + TOps.Count);
                a00 = TOps.MultiplyAdd(xe, v0, a00); a00 = TOps.MultiplyAdd(xo, u0, a00); a01 = TOps.MultiplyAdd(xe, v1, a01); a01 = TOps.MultiplyAdd(xo, u1, a01);
                a02 = TOps.MultiplyAdd(xe, v2, a02); a02 = TOps.MultiplyAdd(xo, u2, a02); a03 = TOps.MultiplyAdd(xe, v3, a03); a03 = TOps.MultiplyAdd(xo, u3, a03);
                xe = TOps.Load(xp1 + i); xo = TOps.Load(xp1 + i + TOps.Count);
                a10 = TOps.MultiplyAdd(xe, v0, a10); a10 = TOps.MultiplyAdd(xo, u0, a10); a11 = TOps.MultiplyAdd(xe, v1, a11); a11 = TOps.MultiplyAdd(xo, u1, a11);
                a12 = TOps.MultiplyAdd(xe, v2, a12); a12 = TOps.MultiplyAdd(xo, u2, a12); a13 = TOps.MultiplyAdd(xe, v3, a13); a13 = TOps.MultiplyAdd(xo, u3, a13);
                xe = TOps.Load(xp2 + i); xo = TOps.Load(xp2 + i + TOps.Count);
                a20 = TOps.MultiplyAdd(xe, v0, a20); a20 = TOps.MultiplyAdd(xo, u0, a20); a21 = TOps.MultiplyAdd(xe, v1, a21); a21 = TOps.MultiplyAdd(xo, u1, a21);
                a22 = TOps.MultiplyAdd(xe, v2, a22); a22 = TOps.MultiplyAdd(xo, u2, a22); a23 = TOps.MultiplyAdd(xe, v3, a23); a23 = TOps.MultiplyAdd(xo, u3, a23);
                xe = TOps.Load(xp3 + i); xo = TOps.Load(xp3 + i + TOps.Count);
                a30 = TOps.MultiplyAdd(xe, v0, a30); a30 = TOps.MultiplyAdd(xo, u0, a30); a31 = TOps.MultiplyAdd(xe, v1, a31); a31 = TOps.MultiplyAdd(xo, u1, a31);
                a32 = TOps.MultiplyAdd(xe, v2, a32); a32 = TOps.MultiplyAdd(xo, u2, a32); a33 = TOps.MultiplyAdd(xe, v3, a33); a33 = TOps.MultiplyAdd(xo, u3, a33);
            }
            sums[0] = TOps.Sum(a00); sums[1] = TOps.Sum(a01); sums[2] = TOps.Sum(a02); sums[3] = TOps.Sum(a03);
            sums[4] = TOps.Sum(a10); sums[5] = TOps.Sum(a11); sums[6] = TOps.Sum(a12); sums[7] = TOps.Sum(a13);
            sums[8] = TOps.Sum(a20); sums[9] = TOps.Sum(a21); sums[10] = TOps.Sum(a22); sums[11] = TOps.Sum(a23);
            sums[12] = TOps.Sum(a30); sums[13] = TOps.Sum(a31); sums[14] = TOps.Sum(a32); sums[15] = TOps.Sum(a33);
            float* x1 = x + k, x2 = x1 + k, x3 = x + lastRowOffset;
            for (; i < k; i++)
            {
                float c0 = TPairs.LoadScalar(w0, i), c1 = TPairs.LoadScalar(w1, i), c2 = TPairs.LoadScalar(w2, i), c3 = TPairs.LoadScalar(w3, i);
                float u0 = x[i], u1 = x1[i], u2 = x2[i], u3 = x3[i];
                sums[0] += u0 * c0; sums[1] += u0 * c1; sums[2] += u0 * c2; sums[3] += u0 * c3;
                sums[4] += u1 * c0; sums[5] += u1 * c1; sums[6] += u1 * c2; sums[7] += u1 * c3;
                sums[8] += u2 * c0; sums[9] += u2 * c1; sums[10] += u2 * c2; sums[11] += u2 * c3;
                sums[12] += u3 * c0; sums[13] += u3 * c1; sums[14] += u3 * c2; sums[15] += u3 * c3;
            }
        }
    }
}

/// <summary>
/// Reads 2·Count consecutive weights of one storage type as two float vectors. For bf16 the pair comes from one load:
/// each 32-bit lane holds two bf16 values, and a shift (even element) and a mask (odd element) widen both, so the x
/// vectors must hold the even-indexed and the odd-indexed elements of the pair (<see cref="PermutesX"/>).
/// </summary>
internal unsafe interface IPairReader
{
    static abstract int ElementSize { get; }

    /// <summary>True: "first" holds elements index+2j and "second" index+2j+1; false: index+j and index+Count+j.</summary>
    static abstract bool PermutesX { get; }

    static abstract void Load<TOps, TVec>(byte* row, nint index, out TVec first, out TVec second)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged;

    static abstract float LoadScalar(byte* row, nint index);
}

/// <summary>Two consecutive vectors of an ordinary <see cref="IWeightReader"/> (fp32, f16): x keeps its own order.</summary>
internal readonly unsafe struct ConsecutivePairs<TReader> : IPairReader
    where TReader : struct, IWeightReader
{
    public static int ElementSize => TReader.ElementSize;
    public static bool PermutesX => false;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Load<TOps, TVec>(byte* row, nint index, out TVec first, out TVec second)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        first = TReader.Load<TOps, TVec>(row, index);
        second = TReader.Load<TOps, TVec>(row, index + TOps.Count);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadScalar(byte* row, nint index) => TReader.LoadScalar(row, index);
}

internal readonly unsafe struct BFloat16Pairs : IPairReader
{
    public static int ElementSize => sizeof(ushort);
    public static bool PermutesX => true;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Load<TOps, TVec>(byte* row, nint index, out TVec first, out TVec second)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        ushort* p = (ushort*)row + index;
        // Little-endian: lane j holds element 2j in its low half and element 2j+1 in its high half.
        if (typeof(TVec) == typeof(Vector512<float>))
        {
            Vector512<uint> lanes = Vector512.Load((uint*)p);
            var even = Vector512.ShiftLeft(lanes, 16).AsSingle();
            var odd = (lanes & Vector512.Create(0xFFFF0000u)).AsSingle();
            first = Unsafe.As<Vector512<float>, TVec>(ref even);
            second = Unsafe.As<Vector512<float>, TVec>(ref odd);
        }
        else if (typeof(TVec) == typeof(Vector256<float>))
        {
            Vector256<uint> lanes = Vector256.Load((uint*)p);
            var even = Vector256.ShiftLeft(lanes, 16).AsSingle();
            var odd = (lanes & Vector256.Create(0xFFFF0000u)).AsSingle();
            first = Unsafe.As<Vector256<float>, TVec>(ref even);
            second = Unsafe.As<Vector256<float>, TVec>(ref odd);
        }
        else if (typeof(TVec) == typeof(Vector128<float>))
        {
            Vector128<uint> lanes = Vector128.Load((uint*)p);
            var even = Vector128.ShiftLeft(lanes, 16).AsSingle();
            var odd = (lanes & Vector128.Create(0xFFFF0000u)).AsSingle();
            first = Unsafe.As<Vector128<float>, TVec>(ref even);
            second = Unsafe.As<Vector128<float>, TVec>(ref odd);
        }
        else
        {
            // One lane: the pair is elements index and index + 1, which is also x's own order.
            first = TOps.LoadBFloat16(p);
            second = TOps.LoadBFloat16(p + 1);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadScalar(byte* row, nint index) => BFloat16Reader.LoadScalar(row, index);
}
