using ILGPU;

namespace PaliGemma.CpuOnly.Backends.ILGPU.Kernels;

internal struct RopeShape
{
    public int Heads;
    public int HeadDim;
    public int RowStride;
}

/// <summary>Element-wise operations, row normalisations and the rotary embedding.</summary>
internal static class VectorKernels
{
    /// <summary>Largest group the shared reduction arrays are sized for.</summary>
    public const int MaxGroup = 256;

    // gelu_tanh(v) = v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3): the CPU kernels' form (no cancellation for v < 0).
    private const float MinusTwoSqrtTwoOverPi = -1.5957691216057308f;
    private const float MinusTwoSqrtTwoOverPiCubic = -1.5957691216057308f * 0.044715f;

    public static void Add(Index1D i, ArrayView<float> a, ArrayView<float> b, ArrayView<float> destination) =>
        destination[i] = a[i] + b[i];

    public static void Scale(Index1D i, ArrayView<float> x, float factor, ArrayView<float> destination) =>
        destination[i] = x[i] * factor;

    public static void GeluTanh(Index1D i, ArrayView<float> x, ArrayView<float> y) =>
        y[i] = Gelu(x[i]);

    public static void GeluTanhMul(Index1D i, ArrayView<float> gate, ArrayView<float> up, ArrayView<float> y) =>
        y[i] = Gelu(gate[i]) * up[i];

    private static float Gelu(float v) =>
        v / (1f + MathF.Exp(v * (v * v * MinusTwoSqrtTwoOverPiCubic + MinusTwoSqrtTwoOverPi)));

    /// <summary>Gemma RMSNorm, one group per row: y = x · rsqrt(mean(x²) + eps) · (offset + w).</summary>
    public static void RmsNorm(ArrayView<float> x, ArrayView<float> y, ArrayView<float> weight, int dim, float eps, float offset)
    {
        var scratch = SharedMemory.Allocate<float>(MaxGroup);
        int lane = Group.IdxX, lanes = Group.DimX;
        long start = (long)Grid.IdxX * dim;
        float squares = 0f;
        for (int i = lane; i < dim; i += lanes)
        {
            float v = x[start + i];
            squares += v * v;
        }
        float scale = 1f / MathF.Sqrt(GroupSum(squares, scratch) / dim + eps);
        // Every lane rewrites only the elements it read, after the reduction: y may be x.
        for (int i = lane; i < dim; i += lanes)
            y[start + i] = x[start + i] * scale * (offset + weight[i]);
    }

    /// <summary>LayerNorm, one group per row, two passes (mean, then the biased variance of x - mean).</summary>
    public static void LayerNorm(ArrayView<float> x, ArrayView<float> y, ArrayView<float> gamma, ArrayView<float> beta, int dim, float eps, int hasBeta)
    {
        var scratch = SharedMemory.Allocate<float>(MaxGroup);
        int lane = Group.IdxX, lanes = Group.DimX;
        long start = (long)Grid.IdxX * dim;
        float sum = 0f;
        for (int i = lane; i < dim; i += lanes)
            sum += x[start + i];
        float mean = GroupSum(sum, scratch) / dim;
        float squares = 0f;
        for (int i = lane; i < dim; i += lanes)
        {
            float d = x[start + i] - mean;
            squares += d * d;
        }
        float rstd = 1f / MathF.Sqrt(GroupSum(squares, scratch) / dim + eps);
        for (int i = lane; i < dim; i += lanes)
        {
            float normalized = (x[start + i] - mean) * rstd;
            y[start + i] = hasBeta != 0 ? normalized * gamma[i] + beta[i] : normalized * gamma[i];
        }
    }

    /// <summary>The sum of every lane's value, returned to all lanes (tree reduction; the group size is a power of two).</summary>
    private static float GroupSum(float value, ArrayView<float> scratch)
    {
        int lane = Group.IdxX;
        scratch[lane] = value;
        Group.Barrier();
        for (int stride = Group.DimX >> 1; stride > 0; stride >>= 1)
        {
            if (lane < stride)
                scratch[lane] += scratch[lane + stride];
            Group.Barrier();
        }
        float total = scratch[0];
        Group.Barrier();   // scratch is reused by the next reduction
        return total;
    }

    /// <summary>
    /// Rotate-half rotary embedding in place; one thread per (row, head, i &lt; half). <paramref name="table"/> holds
    /// cos, sin pairs per (row, i), computed on the host with the CPU kernel's float32 angles.
    /// </summary>
    public static void Rope(Index1D index, ArrayView<float> x, ArrayView<float> table, RopeShape s)
    {
        int half = s.HeadDim >> 1;
        int perRow = s.Heads * half;
        int row = index / perRow;
        int rest = index - row * perRow;
        int head = rest / half;
        int i = rest - head * half;
        long lo = (long)row * s.RowStride + (long)head * s.HeadDim + i;
        long hi = lo + half;
        long t = 2L * ((long)row * half + i);
        float cos = table[t], sin = table[t + 1];
        float a = x[lo], b = x[hi];
        x[lo] = a * cos - b * sin;
        x[hi] = b * cos + a * sin;
    }
}
