using ILGPU;

namespace PaliGemma.CpuOnly.Backends.ILGPU.Kernels;

internal struct MatMulShape
{
    public int Rows;
    public int N;
    public int K;
    public int HasBias;
    /// <summary>0 for none; otherwise y = cap · tanh(y / cap).</summary>
    public float SoftCap;
    /// <summary>GEMM: log2 of the K columns per step (see <see cref="MatMulKernels.GemmTileKShift"/>).</summary>
    public int TileKShift;
}

/// <summary>y[rows, N] = x[rows, K]·Wᵀ + b with fp32 accumulation, W read through <see cref="IDeviceWeights"/>.</summary>
internal static class MatMulKernels
{
    /// <summary>Up to this many x rows take the GEMV (a group per <see cref="GemvColumns"/> output columns); more take the tiled GEMM.</summary>
    public const int GemvMaxRows = 8;
    /// <summary>Largest GEMV group its shared partial sums are sized for.</summary>
    public const int GemvMaxGroup = 128;
    /// <summary>Output columns per GEMV group.</summary>
    public const int GemvColumns = 4;
    // A lane's partial sums (4 rows x GemvColumns), padded to an odd pitch so the lanes' writes spread over the banks.
    private const int PartialPitch = 4 * GemvColumns + 1;
    /// <summary>Rows and columns of y per GEMM thread (an 8 x 8 register block).</summary>
    public const int ThreadBlock = 8;
    /// <summary>Largest GEMM tile side: 8 outputs per thread, at most 16 threads per dimension.</summary>
    public const int MaxTile = 128;
    /// <summary>Most K columns per GEMM step.</summary>
    public const int MaxTileK = 256;
    /// <summary>
    /// Floats of one staged GEMM tile (x or W; two buffers of each, 34 KB): the largest tile, 128 rows of 16 columns
    /// plus one float of padding per row (an odd pitch keeps the lanes of a warp on different banks).
    /// </summary>
    private const int StagedTileFloats = MaxTile * (16 + 1);

    /// <summary>
    /// log2 of the K columns per GEMM step for a tile of <paramref name="tileSide"/> rows and columns: the widest power
    /// of two whose padded rows fit the staged tile (16 for 128-row tiles; more for the small groups of ILGPU's CPU
    /// simulator, whose barriers are costly), and no wider than K needs.
    /// </summary>
    public static int GemmTileKShift(int tileSide, int k)
    {
        int shift = 0;
        while ((2 << shift) <= MaxTileK && tileSide * ((2 << shift) + 1) <= StagedTileFloats && (1 << shift) < k)
            shift++;
        return shift;
    }

    /// <summary>
    /// Few rows (decode): group g computes columns <see cref="GemvColumns"/>·g and the next ones of y. Its lanes stride
    /// over K (consecutive lanes read consecutive weights of a column) and accumulate up to 4 x rows per pass for every
    /// column of the group; after one barrier, lane o sums the lanes' partials of (row, column) o.
    /// </summary>
    public static void Gemv<TWeights>(ArrayView<float> x, TWeights w, ArrayView<float> bias, ArrayView<float> y, MatMulShape s)
        where TWeights : struct, IDeviceWeights
    {
        var partial = SharedMemory.Allocate<float>(GemvMaxGroup * PartialPitch);
        int lane = Group.IdxX, lanes = Group.DimX;
        int n0 = Grid.IdxX * GemvColumns;
        for (int m0 = 0; m0 < s.Rows; m0 += 4)
        {
            int count = s.Rows - m0 < 4 ? s.Rows - m0 : 4;
            for (int c = 0; c < GemvColumns; c++)
            {
                int n = n0 + c;
                float a0 = 0f, a1 = 0f, a2 = 0f, a3 = 0f;
                if (n < s.N)
                {
                    for (int k = lane; k < s.K; k += lanes)
                    {
                        float weight = w.Load(n, k);
                        long xi = (long)m0 * s.K + k;
                        a0 += x[xi] * weight;
                        if (count > 1) a1 += x[xi + s.K] * weight;
                        if (count > 2) a2 += x[xi + 2L * s.K] * weight;
                        if (count > 3) a3 += x[xi + 3L * s.K] * weight;
                    }
                }
                int at = lane * PartialPitch + 4 * c;
                partial[at] = a0;
                partial[at + 1] = a1;
                partial[at + 2] = a2;
                partial[at + 3] = a3;
            }
            Group.Barrier();
            for (int o = lane; o < 4 * GemvColumns; o += lanes)
            {
                int row = o & 3, n = n0 + (o >> 2);
                if (row < count && n < s.N)
                {
                    float sum = 0f;
                    for (int t = 0; t < lanes; t++)
                        sum += partial[t * PartialPitch + o];
                    y[(long)(m0 + row) * s.N + n] = Finish(sum, bias, n, s);
                }
            }
            if (m0 + 4 < s.Rows)
                Group.Barrier();   // the next pass overwrites partial
        }
    }

    /// <summary>
    /// Many rows (prefill, vision): a group of dx·dy threads computes a (8·dy) x (8·dx) tile of y, each thread an 8 x 8
    /// block held in registers (rows ty + i·dy, columns tx + j·dx), from x and W tiles of 2^<see cref="MatMulShape.TileKShift"/> columns
    /// staged in shared memory (W dequantized once, while staging). The staging is double-buffered: step t+1 is loaded
    /// into the other buffer while step t is multiplied, so each K step costs one barrier (the last none).
    /// </summary>
    public static void Gemm<TWeights>(ArrayView<float> x, TWeights w, ArrayView<float> bias, ArrayView<float> y, MatMulShape s)
        where TWeights : struct, IDeviceWeights
    {
        var xs = SharedMemory.Allocate<float>(2 * StagedTileFloats);
        var ws = SharedMemory.Allocate<float>(2 * StagedTileFloats);
        int tx = Group.IdxX, ty = Group.IdxY, dx = Group.DimX, dy = Group.DimY;
        int tileM = ThreadBlock * dy, tileN = ThreadBlock * dx;
        int m0 = Grid.IdxY * tileM, n0 = Grid.IdxX * tileN;
        int thread = ty * dx + tx, threads = dx * dy;

        Float8 c0 = default, c1 = default, c2 = default, c3 = default;
        Float8 c4 = default, c5 = default, c6 = default, c7 = default;
        int tileK = 1 << s.TileKShift, pitch = tileK + 1;
        int steps = (s.K + tileK - 1) >> s.TileKShift;
        Stage(x, w, s, xs, ws, 0, m0, n0, tileM, tileN, thread, threads);
        Group.Barrier();
        for (int step = 0; step < steps; step++)
        {
            // The other buffer was last read in the previous step, which every thread finished before the last barrier.
            if (step + 1 < steps)
                Stage(x, w, s, xs, ws, step + 1, m0, n0, tileM, tileN, thread, threads);
            int buffer = (step & 1) * StagedTileFloats;
            int xa = buffer + ty * pitch, wb = buffer + tx * pitch;
            int xStep = dy * pitch, wStep = dx * pitch;
            for (int kk = 0; kk < tileK; kk++)
            {
                var b = Float8.Load(ws, wb + kk, wStep);
                int a = xa + kk;
                c0 = c0.MultiplyAdd(xs[a], b);
                c1 = c1.MultiplyAdd(xs[a + xStep], b);
                c2 = c2.MultiplyAdd(xs[a + 2 * xStep], b);
                c3 = c3.MultiplyAdd(xs[a + 3 * xStep], b);
                c4 = c4.MultiplyAdd(xs[a + 4 * xStep], b);
                c5 = c5.MultiplyAdd(xs[a + 5 * xStep], b);
                c6 = c6.MultiplyAdd(xs[a + 6 * xStep], b);
                c7 = c7.MultiplyAdd(xs[a + 7 * xStep], b);
            }
            if (step + 1 < steps)
                Group.Barrier();   // step + 1's tiles are complete; this step's buffer may be overwritten
        }

        int r0 = m0 + ty, col0 = n0 + tx;
        StoreRow(y, bias, s, r0, col0, dx, c0);
        StoreRow(y, bias, s, r0 + dy, col0, dx, c1);
        StoreRow(y, bias, s, r0 + 2 * dy, col0, dx, c2);
        StoreRow(y, bias, s, r0 + 3 * dy, col0, dx, c3);
        StoreRow(y, bias, s, r0 + 4 * dy, col0, dx, c4);
        StoreRow(y, bias, s, r0 + 5 * dy, col0, dx, c5);
        StoreRow(y, bias, s, r0 + 6 * dy, col0, dx, c6);
        StoreRow(y, bias, s, r0 + 7 * dy, col0, dx, c7);
    }

    /// <summary>Loads K step <paramref name="step"/> of the x and W tiles (zeros past the edges) into buffer step mod 2.</summary>
    private static void Stage<TWeights>(ArrayView<float> x, TWeights w, MatMulShape s, ArrayView<float> xs, ArrayView<float> ws,
        int step, int m0, int n0, int tileM, int tileN, int thread, int threads)
        where TWeights : struct, IDeviceWeights
    {
        int buffer = (step & 1) * StagedTileFloats;
        int tileK = 1 << s.TileKShift, pitch = tileK + 1;
        int k0 = step << s.TileKShift;
        for (int e = thread; e < tileM << s.TileKShift; e += threads)
        {
            int mm = e >> s.TileKShift, kk = e & (tileK - 1);
            int m = m0 + mm, k = k0 + kk;
            xs[buffer + mm * pitch + kk] = m < s.Rows && k < s.K ? x[(long)m * s.K + k] : 0f;
        }
        for (int e = thread; e < tileN << s.TileKShift; e += threads)
        {
            int nn = e >> s.TileKShift, kk = e & (tileK - 1);
            int n = n0 + nn, k = k0 + kk;
            ws[buffer + nn * pitch + kk] = n < s.N && k < s.K ? w.Load(n, k) : 0f;
        }
    }

    /// <summary>Writes one row of a thread's block: columns col + j·step, j &lt; 8, those inside y.</summary>
    private static void StoreRow(ArrayView<float> y, ArrayView<float> bias, MatMulShape s, int row, int col, int step, Float8 v)
    {
        if (row >= s.Rows)
            return;
        long rowStart = (long)row * s.N;
        Store(y, bias, s, rowStart, col, v.V0);
        Store(y, bias, s, rowStart, col + step, v.V1);
        Store(y, bias, s, rowStart, col + 2 * step, v.V2);
        Store(y, bias, s, rowStart, col + 3 * step, v.V3);
        Store(y, bias, s, rowStart, col + 4 * step, v.V4);
        Store(y, bias, s, rowStart, col + 5 * step, v.V5);
        Store(y, bias, s, rowStart, col + 6 * step, v.V6);
        Store(y, bias, s, rowStart, col + 7 * step, v.V7);
    }

    private static void Store(ArrayView<float> y, ArrayView<float> bias, MatMulShape s, long rowStart, int col, float value)
    {
        if (col < s.N)
            y[rowStart + col] = Finish(value, bias, col, s);
    }

    /// <summary>Adds the bias, then soft-caps, as the CPU kernels do.</summary>
    private static float Finish(float sum, ArrayView<float> bias, int n, MatMulShape s)
    {
        float value = s.HasBias != 0 ? sum + bias[n] : sum;
        return s.SoftCap > 0f ? s.SoftCap * MathF.Tanh(value / s.SoftCap) : value;
    }
}

/// <summary>Eight fp32 values in registers: a row of a GEMM thread's 8 x 8 block, or the 8 weights of one K column it multiplies.</summary>
internal struct Float8
{
    public float V0, V1, V2, V3, V4, V5, V6, V7;

    /// <summary>values[at + j·step], j &lt; 8.</summary>
    public static Float8 Load(ArrayView<float> values, int at, int step) => new()
    {
        V0 = values[at], V1 = values[at + step], V2 = values[at + 2 * step], V3 = values[at + 3 * step],
        V4 = values[at + 4 * step], V5 = values[at + 5 * step], V6 = values[at + 6 * step], V7 = values[at + 7 * step],
    };

    /// <summary>this + a·b, element-wise.</summary>
    public readonly Float8 MultiplyAdd(float a, Float8 b) => new()
    {
        V0 = V0 + a * b.V0, V1 = V1 + a * b.V1, V2 = V2 + a * b.V2, V3 = V3 + a * b.V3,
        V4 = V4 + a * b.V4, V5 = V5 + a * b.V5, V6 = V6 + a * b.V6, V7 = V7 + a * b.V7,
    };
}
