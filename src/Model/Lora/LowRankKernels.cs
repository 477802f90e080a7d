using System.Buffers;
using System.Numerics;
using System.Numerics.Tensors;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.CpuOnly.Model.Lora;

/// <summary>
/// The two passes of a LoRA delta y[rows, n] += s·(x[rows, k]·Aᵀ)·Bᵀ with A [rank, k] and Bᵀ [rank, n] in fp32.
/// At decode (a row or two) both passes read their fp32 matrix once, front to back: the delta is bound by memory, and
/// one sequential stream measured faster than interleaving the rank rows (rank streams, or short bursts from each).
/// With prompt-sized row counts the up pass works in column blocks that stay in L1 while every row uses them.
/// Large passes are split over threads.
/// </summary>
internal static unsafe class LowRankKernels
{
    /// <summary>From this many x rows on, x·Aᵀ goes through MatMul's tiled GEMM, which reuses each A tile across rows.</summary>
    public const int GemmMinRows = 4;

    // Multiply-adds below which a pass stays on the calling thread. A fork/join measured 10-15 µs on a 2-core VM, about
    // what one thread needs to stream 256K multiply-adds' worth of fp32 weights: a decode step's largest pass (rank 8 x
    // 16384) runs faster on one thread; prompt-sized passes are far above this.
    private const long ParallelMultiplyAdds = 1L << 20;
    // Columns of the up pass that every row uses before moving on when there are many rows (rank·512 floats stay in L1).
    private const int UpBlockColumns = 512;

    [ThreadStatic] private static Job? t_job;
    private static ParallelOptions s_options = new() { MaxDegreeOfParallelism = KernelThreading.MaxThreads };

    /// <summary>
    /// down[m, j] = Σ_k x[m, k]·A[j, k] for m &lt; rows, j &lt; rank (x rows of length k, down rows of length rank). A is
    /// read once, row after row, each row against every x row (those stay in cache).
    /// </summary>
    public static void Down(float* x, int rows, int k, float* a, int rank, float* down)
    {
        if (rank > 1 && IsParallel((long)rows * k * rank))
        {
            RunParallel(Job.Kind.Down, rank, x, rows, k, a, rank, down, null, 0, 0f, null, 0);
            return;
        }
        for (int j = 0; j < rank; j++)
            DownRow(x, rows, k, a, rank, down, j);
    }

    /// <summary>
    /// y[m, c] += scaling · Σ_j down[m, j]·Bᵀ[j, c] for m &lt; rows, c &lt; n, with the sum over the rank taken in order and
    /// scaled before it is added (PEFT's order; each step rounded to fp32, no fused multiply-add, so every element is the
    /// same whichever thread computes it and however the columns are split).
    /// </summary>
    public static void Up(float* down, int rows, int rank, float* bTransposed, int n, float scaling, float* y)
    {
        if (IsParallel((long)rows * n * rank))
        {
            // A contiguous column range per thread, or blocks balanced by the scheduler.
            int threads = s_options.MaxDegreeOfParallelism;
            int columns = rows < GemmMinRows ? AlignUp((n + threads - 1) / threads, 64) : UpBlockColumns;
            int items = (n + columns - 1) / columns;
            if (items > 1)
            {
                RunParallel(Job.Kind.Up, items, null, rows, 0, null, rank, down, bTransposed, n, scaling, y, columns);
                return;
            }
        }
        UpColumns(down, rows, rank, bTransposed, n, scaling, y, 0, n);
    }

    private static bool IsParallel(long multiplyAdds)
    {
        if (multiplyAdds < ParallelMultiplyAdds) return false;
        int threads = KernelThreading.MaxThreads;
        if (threads < 2) return false;
        if (s_options.MaxDegreeOfParallelism != threads)
            s_options = new ParallelOptions { MaxDegreeOfParallelism = threads };
        return true;
    }

    private static int AlignUp(int value, int multiple) => (value + multiple - 1) / multiple * multiple;

    private static void DownRow(float* x, int rows, int k, float* a, int rank, float* down, int j)
    {
        var aRow = new ReadOnlySpan<float>(a + (nint)j * k, k);
        for (int m = 0; m < rows; m++)
            down[(nint)m * rank + j] = TensorPrimitives.Dot(new ReadOnlySpan<float>(x + (nint)m * k, k), aRow);
    }

    /// <summary>The up pass over columns [c0, c1): whole-row passes for a row or two, L1 blocks for more.</summary>
    private static void UpColumns(float* down, int rows, int rank, float* bTransposed, int n, float scaling, float* y, int c0, int c1)
    {
        if (rows < GemmMinRows)
        {
            UpRowsStreaming(down, rows, rank, bTransposed, n, scaling, y, c0, c1);
            return;
        }
        for (int b0 = c0; b0 < c1; b0 += UpBlockColumns)
        {
            int b1 = Math.Min(c1, b0 + UpBlockColumns);
            for (int m = 0; m < rows; m++)
                UpRowBlock(down + (nint)m * rank, rank, bTransposed, n, scaling, y + (nint)m * n, b0, b1);
        }
    }

    /// <summary>
    /// Per row: the rank sum over [c0, c1) built in a pooled buffer by one pass per Bᵀ row, so Bᵀ is read in address
    /// order (the buffer, at most 64 KiB for a 16384-wide layer, stays in L2), then scaled into y.
    /// </summary>
    private static void UpRowsStreaming(float* down, int rows, int rank, float* bTransposed, int n, float scaling, float* y, int c0, int c1)
    {
        int length = c1 - c0;
        float[] rented = ArrayPool<float>.Shared.Rent(length);
        try
        {
            var sums = rented.AsSpan(0, length);
            for (int m = 0; m < rows; m++)
            {
                float* d = down + (nint)m * rank;
                TensorPrimitives.Multiply(new ReadOnlySpan<float>(bTransposed + c0, length), d[0], sums);
                for (int j = 1; j < rank; j++)
                    TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(bTransposed + (nint)j * n + c0, length), d[j], sums, sums);
                var yRow = new Span<float>(y + (nint)m * n + c0, length);
                TensorPrimitives.MultiplyAdd(sums, scaling, yRow, yRow);
            }
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>
    /// yRow[c] += scaling·Σ_j d[j]·Bᵀ[j, c] for c in [c0, c1), four vectors of columns at a time with the sums in
    /// registers; the block of Bᵀ it reads stays in L1 for the next row.
    /// </summary>
    private static void UpRowBlock(float* d, int rank, float* bTransposed, nint n, float scaling, float* yRow, int c0, int c1)
    {
        int width = Vector<float>.Count, c = c0;
        var s = new Vector<float>(scaling);
        for (; c <= c1 - 4 * width; c += 4 * width)
        {
            float* b = bTransposed + c;
            var dj = new Vector<float>(d[0]);
            var u0 = Vector.Load(b) * dj;
            var u1 = Vector.Load(b + width) * dj;
            var u2 = Vector.Load(b + 2 * width) * dj;
            var u3 = Vector.Load(b + 3 * width) * dj;
            for (int j = 1; j < rank; j++)
            {
                b += n;
                dj = new Vector<float>(d[j]);
                u0 = Vector.Load(b) * dj + u0;
                u1 = Vector.Load(b + width) * dj + u1;
                u2 = Vector.Load(b + 2 * width) * dj + u2;
                u3 = Vector.Load(b + 3 * width) * dj + u3;
            }
            float* yc = yRow + c;
            Vector.Store(u0 * s + Vector.Load(yc), yc);
            Vector.Store(u1 * s + Vector.Load(yc + width), yc + width);
            Vector.Store(u2 * s + Vector.Load(yc + 2 * width), yc + 2 * width);
            Vector.Store(u3 * s + Vector.Load(yc + 3 * width), yc + 3 * width);
        }
        for (; c <= c1 - width; c += width)
        {
            float* b = bTransposed + c;
            var u = Vector.Load(b) * new Vector<float>(d[0]);
            for (int j = 1; j < rank; j++)
            {
                b += n;
                u = Vector.Load(b) * new Vector<float>(d[j]) + u;
            }
            Vector.Store(u * s + Vector.Load(yRow + c), yRow + c);
        }
        for (; c < c1; c++)
        {
            float u = bTransposed[c] * d[0];
            for (int j = 1; j < rank; j++) u = bTransposed[j * n + c] * d[j] + u;
            yRow[c] = u * scaling + yRow[c];
        }
    }

    private static void RunParallel(Job.Kind kind, int items, float* x, int rows, int k, float* a, int rank, float* down,
        float* bTransposed, int n, float scaling, float* y, int columns)
    {
        // One job object per thread, taken while in use: no allocation of our own per call, and safe should a call nest.
        var job = t_job ?? new Job();
        t_job = null;
        try
        {
            job.Set(kind, x, rows, k, a, rank, down, bTransposed, n, scaling, y, columns);
            Parallel.For(0, items, s_options, job.Body);
        }
        finally
        {
            job.Set(default, null, 0, 0, null, 0, null, null, 0, 0f, null, 0);
            t_job = job;
        }
    }

    /// <summary>The operands of one parallel pass; <see cref="Body"/> runs one work item of it.</summary>
    private sealed class Job
    {
        public enum Kind { Down, Up }

        private Kind _kind;
        private float* _x, _a, _down, _bTransposed, _y;
        private int _rows, _k, _rank, _n, _columns;
        private float _scaling;

        public Job() => Body = Run;

        public Action<int> Body { get; }

        public void Set(Kind kind, float* x, int rows, int k, float* a, int rank, float* down, float* bTransposed, int n, float scaling,
            float* y, int columns)
        {
            _kind = kind;
            _x = x;
            _rows = rows;
            _k = k;
            _a = a;
            _rank = rank;
            _down = down;
            _bTransposed = bTransposed;
            _n = n;
            _scaling = scaling;
            _y = y;
            _columns = columns;
        }

        private void Run(int item)
        {
            if (_kind == Kind.Down)
            {
                DownRow(_x, _rows, _k, _a, _rank, _down, item);
                return;
            }
            int c0 = item * _columns;
            UpColumns(_down, _rows, _rank, _bTransposed, _n, _scaling, _y, c0, Math.Min(_n, c0 + _columns));
        }
    }
}
