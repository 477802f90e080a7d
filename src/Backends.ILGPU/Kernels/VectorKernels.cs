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

    // The element-wise kernels stride over the grid: a launch sized from the device's resident groups covers any length.

    public static void Add(ArrayView<float> a, ArrayView<float> b, ArrayView<float> destination)
    {
        for (long i = Grid.GlobalLinearIndex, step = (long)Grid.DimX * Group.DimX; i < a.Length; i += step)
            destination[i] = a[i] + b[i];
    }

    public static void Scale(ArrayView<float> x, float factor, ArrayView<float> destination)
    {
        for (long i = Grid.GlobalLinearIndex, step = (long)Grid.DimX * Group.DimX; i < x.Length; i += step)
            destination[i] = x[i] * factor;
    }

    public static void GeluTanh(ArrayView<float> x, ArrayView<float> y)
    {
        for (long i = Grid.GlobalLinearIndex, step = (long)Grid.DimX * Group.DimX; i < x.Length; i += step)
            y[i] = Gelu(x[i]);
    }

    public static void GeluTanhMul(ArrayView<float> gate, ArrayView<float> up, ArrayView<float> y)
    {
        for (long i = Grid.GlobalLinearIndex, step = (long)Grid.DimX * Group.DimX; i < gate.Length; i += step)
            y[i] = Gelu(gate[i]) * up[i];
    }

    private static float Gelu(float v) =>
        v / (1f + MathF.Exp(v * (v * v * MinusTwoSqrtTwoOverPiCubic + MinusTwoSqrtTwoOverPi)));

    /// <summary>Gemma RMSNorm, a group per row (striding over the rows): y = x · rsqrt(mean(x²) + eps) · (offset + w).</summary>
    public static void RmsNorm(ArrayView<float> x, ArrayView<float> y, ArrayView<float> weight, int rows, int dim, float eps, float offset)
    {
        var scratch = SharedMemory.Allocate<float>(2 * MaxGroup);
        int lane = Group.IdxX, lanes = Group.DimX;
        int slot = 0;
        for (int row = Grid.IdxX; row < rows; row += Grid.DimX)
        {
            long start = (long)row * dim;
            float squares = 0f;
            for (int i = lane; i < dim; i += lanes)
            {
                float v = x[start + i];
                squares += v * v;
            }
            float scale = 1f / MathF.Sqrt(GroupSum(squares, scratch, slot) / dim + eps);
            slot ^= 1;
            // Every lane rewrites only the elements it read, after the reduction: y may be x.
            for (int i = lane; i < dim; i += lanes)
                y[start + i] = x[start + i] * scale * (offset + weight[i]);
        }
    }

    /// <summary>
    /// LayerNorm, a group per row (striding over the rows). Each lane takes the mean of its own elements and the sum of
    /// their squared deviations from it (two passes, no cancellation); one barrier later every lane merges the lanes'
    /// (count, mean, M2) in lane order (Chan et al.), the stable equivalent of a two-pass mean and biased variance.
    /// </summary>
    public static void LayerNorm(ArrayView<float> x, ArrayView<float> y, ArrayView<float> gamma, ArrayView<float> beta, int rows, int dim, float eps, int hasBeta)
    {
        var scratch = SharedMemory.Allocate<float>(4 * MaxGroup);
        int lane = Group.IdxX, lanes = Group.DimX;
        int own = LaneCount(lane, lanes, dim);
        int slot = 0;
        for (int row = Grid.IdxX; row < rows; row += Grid.DimX)
        {
            long start = (long)row * dim;
            float sum = 0f;
            for (int i = lane; i < dim; i += lanes)
                sum += x[start + i];
            float localMean = own > 0 ? sum / own : 0f;
            float localM2 = 0f;
            for (int i = lane; i < dim; i += lanes)
            {
                float d = x[start + i] - localMean;
                localM2 += d * d;
            }
            // Two slots, as GroupSum: a slot is rewritten only after the next row's barrier.
            int offset = slot * 2 * MaxGroup;
            slot ^= 1;
            scratch[offset + 2 * lane] = localMean;
            scratch[offset + 2 * lane + 1] = localM2;
            Group.Barrier();

            float mean = 0f, m2 = 0f;
            int count = 0;
            for (int t = 0; t < lanes; t++)
            {
                int n = LaneCount(t, lanes, dim);
                if (n == 0)
                    break;
                int total = count + n;
                float delta = scratch[offset + 2 * t] - mean;
                mean += delta * ((float)n / total);
                m2 += scratch[offset + 2 * t + 1] + delta * delta * ((float)count * n / total);
                count = total;
            }
            float rstd = 1f / MathF.Sqrt(m2 / dim + eps);
            for (int i = lane; i < dim; i += lanes)
            {
                float normalized = (x[start + i] - mean) * rstd;
                y[start + i] = hasBeta != 0 ? normalized * gamma[i] + beta[i] : normalized * gamma[i];
            }
        }
    }

    /// <summary>How many of <paramref name="dim"/> elements lane <paramref name="lane"/> takes when lanes stride over them.</summary>
    private static int LaneCount(int lane, int lanes, int dim) => lane < dim ? (dim - lane + lanes - 1) / lanes : 0;

    /// <summary>
    /// The sum of every lane's value, returned to all lanes: one barrier, then each lane adds the partials in the same
    /// order. Consecutive reductions alternate between the two halves of <paramref name="scratch"/> (slot 0, 1): a half
    /// is rewritten only after the barrier of the reduction in between, when every lane has read it.
    /// </summary>
    private static float GroupSum(float value, ArrayView<float> scratch, int slot)
    {
        int offset = slot * MaxGroup;
        scratch[offset + Group.IdxX] = value;
        Group.Barrier();
        float total = 0f;
        for (int t = 0; t < Group.DimX; t++)
            total += scratch[offset + t];
        return total;
    }

    /// <summary>
    /// Rotate-half rotary embedding in place; each thread takes (row, head, i &lt; half) items, striding over the grid. <paramref name="table"/> holds
    /// cos, sin pairs per (row, i), computed on the host with the CPU kernel's float32 angles.
    /// </summary>
    public static void Rope(ArrayView<float> x, ArrayView<float> table, long count, RopeShape s)
    {
        int half = s.HeadDim >> 1;
        int perRow = s.Heads * half;
        for (long index = Grid.GlobalLinearIndex, step = (long)Grid.DimX * Group.DimX; index < count; index += step)
        {
            int row = (int)(index / perRow);
            int rest = (int)(index - (long)row * perRow);
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
}
