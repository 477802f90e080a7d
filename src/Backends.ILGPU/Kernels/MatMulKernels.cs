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
}

/// <summary>y[rows, N] = x[rows, K]·Wᵀ + b with fp32 accumulation, W read through <see cref="IDeviceWeights"/>.</summary>
internal static class MatMulKernels
{
    /// <summary>Up to this many x rows take the GEMV (a group per output column); more take the tiled GEMM.</summary>
    public const int GemvMaxRows = 8;
    /// <summary>Largest group the kernels' shared arrays are sized for.</summary>
    public const int MaxGroup = 256;
    /// <summary>K columns per GEMM step.</summary>
    public const int TileK = 16;
    /// <summary>Largest GEMM tile side: 4 outputs per thread, at most 16 threads per dimension.</summary>
    public const int MaxTile = 64;
    // Row pitch of the shared tiles: one float of padding keeps the lanes of a warp on different banks.
    private const int Pitch = TileK + 1;

    /// <summary>
    /// Few rows (decode): group n computes column n of y. Its lanes stride over K (consecutive lanes read consecutive
    /// weights), accumulate up to 4 x rows per pass, then reduce their partial sums in shared memory.
    /// </summary>
    public static void Gemv<TWeights>(ArrayView<float> x, TWeights w, ArrayView<float> bias, ArrayView<float> y, MatMulShape s)
        where TWeights : struct, IDeviceWeights
    {
        var partial = SharedMemory.Allocate<float>(4 * MaxGroup);
        int lane = Group.IdxX, lanes = Group.DimX;
        int n = Grid.IdxX;
        for (int m0 = 0; m0 < s.Rows; m0 += 4)
        {
            int count = s.Rows - m0 < 4 ? s.Rows - m0 : 4;
            float a0 = 0f, a1 = 0f, a2 = 0f, a3 = 0f;
            for (int k = lane; k < s.K; k += lanes)
            {
                float weight = w.Load(n, k);
                long xi = (long)m0 * s.K + k;
                a0 += x[xi] * weight;
                if (count > 1) a1 += x[xi + s.K] * weight;
                if (count > 2) a2 += x[xi + 2L * s.K] * weight;
                if (count > 3) a3 += x[xi + 3L * s.K] * weight;
            }
            partial[lane] = a0;
            partial[MaxGroup + lane] = a1;
            partial[2 * MaxGroup + lane] = a2;
            partial[3 * MaxGroup + lane] = a3;
            Group.Barrier();
            for (int stride = lanes >> 1; stride > 0; stride >>= 1)
            {
                if (lane < stride)
                {
                    partial[lane] += partial[lane + stride];
                    partial[MaxGroup + lane] += partial[MaxGroup + lane + stride];
                    partial[2 * MaxGroup + lane] += partial[2 * MaxGroup + lane + stride];
                    partial[3 * MaxGroup + lane] += partial[3 * MaxGroup + lane + stride];
                }
                Group.Barrier();
            }
            if (lane < count)
                y[(long)(m0 + lane) * s.N + n] = Finish(partial[lane * MaxGroup], bias, n, s);
            Group.Barrier();   // the next pass overwrites partial
        }
    }

    /// <summary>
    /// Many rows (prefill, vision): a group of dx·dy threads computes a (4·dy) x (4·dx) tile of y, each thread a 4 x 4
    /// block (rows ty + i·dy, columns tx + j·dx), from x and W tiles of <see cref="TileK"/> columns staged in shared memory
    /// (W dequantized once, while staging).
    /// </summary>
    public static void Gemm<TWeights>(ArrayView<float> x, TWeights w, ArrayView<float> bias, ArrayView<float> y, MatMulShape s)
        where TWeights : struct, IDeviceWeights
    {
        var xs = SharedMemory.Allocate<float>(MaxTile * Pitch);
        var ws = SharedMemory.Allocate<float>(MaxTile * Pitch);
        int tx = Group.IdxX, ty = Group.IdxY, dx = Group.DimX, dy = Group.DimY;
        int tileM = 4 * dy, tileN = 4 * dx;
        int m0 = Grid.IdxY * tileM, n0 = Grid.IdxX * tileN;
        int thread = ty * dx + tx, threads = dx * dy;

        float c00 = 0f, c01 = 0f, c02 = 0f, c03 = 0f;
        float c10 = 0f, c11 = 0f, c12 = 0f, c13 = 0f;
        float c20 = 0f, c21 = 0f, c22 = 0f, c23 = 0f;
        float c30 = 0f, c31 = 0f, c32 = 0f, c33 = 0f;
        for (int k0 = 0; k0 < s.K; k0 += TileK)
        {
            for (int e = thread; e < tileM * TileK; e += threads)
            {
                int mm = e / TileK, kk = e - mm * TileK;
                int m = m0 + mm, k = k0 + kk;
                xs[mm * Pitch + kk] = m < s.Rows && k < s.K ? x[(long)m * s.K + k] : 0f;
            }
            for (int e = thread; e < tileN * TileK; e += threads)
            {
                int nn = e / TileK, kk = e - nn * TileK;
                int n = n0 + nn, k = k0 + kk;
                ws[nn * Pitch + kk] = n < s.N && k < s.K ? w.Load(n, k) : 0f;
            }
            Group.Barrier();
            for (int kk = 0; kk < TileK; kk++)
            {
                float a0 = xs[ty * Pitch + kk], a1 = xs[(ty + dy) * Pitch + kk];
                float a2 = xs[(ty + 2 * dy) * Pitch + kk], a3 = xs[(ty + 3 * dy) * Pitch + kk];
                float b0 = ws[tx * Pitch + kk], b1 = ws[(tx + dx) * Pitch + kk];
                float b2 = ws[(tx + 2 * dx) * Pitch + kk], b3 = ws[(tx + 3 * dx) * Pitch + kk];
                c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
                c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
                c20 += a2 * b0; c21 += a2 * b1; c22 += a2 * b2; c23 += a2 * b3;
                c30 += a3 * b0; c31 += a3 * b1; c32 += a3 * b2; c33 += a3 * b3;
            }
            Group.Barrier();   // the next step overwrites the tiles
        }

        int r0 = m0 + ty, col0 = n0 + tx;
        StoreRow(y, bias, s, r0, col0, dx, c00, c01, c02, c03);
        StoreRow(y, bias, s, r0 + dy, col0, dx, c10, c11, c12, c13);
        StoreRow(y, bias, s, r0 + 2 * dy, col0, dx, c20, c21, c22, c23);
        StoreRow(y, bias, s, r0 + 3 * dy, col0, dx, c30, c31, c32, c33);
    }

    private static void StoreRow(ArrayView<float> y, ArrayView<float> bias, MatMulShape s, int row, int col, int step, float v0, float v1, float v2, float v3)
    {
        if (row >= s.Rows)
            return;
        long rowStart = (long)row * s.N;
        if (col < s.N) y[rowStart + col] = Finish(v0, bias, col, s);
        if (col + step < s.N) y[rowStart + col + step] = Finish(v1, bias, col + step, s);
        if (col + 2 * step < s.N) y[rowStart + col + 2 * step] = Finish(v2, bias, col + 2 * step, s);
        if (col + 3 * step < s.N) y[rowStart + col + 3 * step] = Finish(v3, bias, col + 3 * step, s);
    }

    /// <summary>Adds the bias, then soft-caps, as the CPU kernels do.</summary>
    private static float Finish(float sum, ArrayView<float> bias, int n, MatMulShape s)
    {
        float value = s.HasBias != 0 ? sum + bias[n] : sum;
        return s.SoftCap > 0f ? s.SoftCap * MathF.Tanh(value / s.SoftCap) : value;
    }
}
