using System.Runtime.Intrinsics;
using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Rotary position embedding in the rotate-half layout used by Hugging Face Gemma.</summary>
public static unsafe class Rope
{
    /// <summary>
    /// Rotates, in place, every head of every row: for i &lt; headDim/2, with angle = position * invFreq[i],
    /// out[i] = x[i] cos - x[i + half] sin and out[i + half] = x[i + half] cos + x[i] sin.
    /// invFreq, the angles and the cos/sin values are rounded to float32 as Hugging Face computes them.
    /// </summary>
    /// <param name="x">rows rows, row r starting at r * rowStride; each holds heads heads of headDim floats back to back.</param>
    /// <param name="positions">Rotary position of each row.</param>
    /// <param name="theta">Rotary base (10000 for Gemma).</param>
    public static void Apply(Span<float> x, int rows, int heads, int headDim, int rowStride, ReadOnlySpan<int> positions, float theta) =>
        Apply(x, rows, heads, headDim, rowStride, positions, theta, SimdWidths.Best.FitTo(headDim / 2));

    /// <summary>Validates the operands of <see cref="Apply(Span{float}, int, int, int, int, ReadOnlySpan{int}, float)"/> (shared by every backend).</summary>
    public static void CheckOperands(long xLength, int rows, int heads, int headDim, int rowStride, int positionsLength, float theta)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(heads);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(headDim);
        if (headDim % 2 != 0)
            throw new ArgumentException($"headDim {headDim} must be even for rotate-half rotary embedding", nameof(headDim));
        if (rowStride < (long)heads * headDim)
            throw new ArgumentException($"rowStride {rowStride} is smaller than heads * headDim = {(long)heads * headDim}", nameof(rowStride));
        if (positionsLength < rows)
            throw new ArgumentException($"positions holds {positionsLength} entries; there are {rows} rows", "positions");
        if (!(theta > 0f) || float.IsInfinity(theta))
            throw new ArgumentOutOfRangeException(nameof(theta), theta, "rotary base must be positive and finite");
        if (xLength < (long)(rows - 1) * rowStride + (long)heads * headDim)
            throw new ArgumentException($"x holds {xLength} floats; {rows} rows with stride {rowStride} of {heads} x {headDim} need {(long)(rows - 1) * rowStride + (long)heads * headDim}", "x");
    }

    internal static void Apply(Span<float> x, int rows, int heads, int headDim, int rowStride, ReadOnlySpan<int> positions, float theta, SimdWidth width)
    {
        CheckOperands(x.Length, rows, heads, headDim, rowStride, positions.Length, theta);
        if (rows == 0)
            return;

        int half = headDim / 2;
        int chunkRows = Math.Clamp(MaxTableFloats / half, 1, rows);
        var table = t_table ??= new AngleTable();
        fixed (float* xp = x)
        {
            for (int r0 = 0; r0 < rows; r0 += chunkRows)
            {
                int count = Math.Min(chunkRows, rows - r0);
                table.Prepare(positions.Slice(r0, count), theta, headDim);
                fixed (float* cos = table.Cos)
                fixed (float* sin = table.Sin)
                {
                    float* xr = xp + (nint)r0 * rowStride;
                    switch (width)
                    {
                        case SimdWidth.Vector512: Rows<Simd512, Vector512<float>>(xr, count, heads, headDim, rowStride, cos, sin); break;
                        case SimdWidth.Vector256: Rows<Simd256, Vector256<float>>(xr, count, heads, headDim, rowStride, cos, sin); break;
                        case SimdWidth.Vector128: Rows<Simd128, Vector128<float>>(xr, count, heads, headDim, rowStride, cos, sin); break;
                        default: Rows<SimdScalar, float>(xr, count, heads, headDim, rowStride, cos, sin); break;
                    }
                }
            }
        }
    }

    // The cos/sin of one call's positions, kept per thread: the queries and keys of a layer, and every layer of one
    // forward pass, rotate by the same positions, so the trigonometry (the bulk of a prefill call's time) runs once.
    private const int MaxTableFloats = 1 << 19;
    [ThreadStatic] private static AngleTable? t_table;

    private sealed class AngleTable
    {
        private int[] _positions = [];
        private int _count = -1, _headDim;
        private float _theta;
        private float[] _invFreq = [];
        public float[] Cos = [], Sin = [];

        /// <summary>Fills Cos/Sin [positions.Length, headDim / 2] unless they already hold these positions' angles.</summary>
        public void Prepare(ReadOnlySpan<int> positions, float theta, int headDim)
        {
            if (_count == positions.Length && _headDim == headDim && _theta.Equals(theta) && positions.SequenceEqual(_positions.AsSpan(0, _count)))
                return;
            int half = headDim / 2, count = positions.Length;
            if (_positions.Length < count)
                _positions = new int[count];
            if (Cos.Length < count * half)
            {
                Cos = new float[count * half];
                Sin = new float[count * half];
            }
            if (_invFreq.Length < half)
                _invFreq = new float[half];
            if (_headDim != headDim || !_theta.Equals(theta))
            {
                for (int i = 0; i < half; i++)
                    _invFreq[i] = 1f / MathF.Pow(theta, (2 * i) / (float)headDim);
            }
            for (int r = 0; r < count; r++)
            {
                Span<float> cos = Cos.AsSpan(r * half, half), sin = Sin.AsSpan(r * half, half);
                // Consecutive rows often share a position (several sequences, repeated decode steps): copy the row then.
                if (r > 0 && positions[r] == positions[r - 1])
                {
                    Cos.AsSpan((r - 1) * half, half).CopyTo(cos);
                    Sin.AsSpan((r - 1) * half, half).CopyTo(sin);
                    continue;
                }
                float position = positions[r];
                for (int i = 0; i < half; i++)
                {
                    float angle = position * _invFreq[i];
                    cos[i] = (float)Math.Cos(angle);
                    sin[i] = (float)Math.Sin(angle);
                }
            }
            positions.CopyTo(_positions);
            _count = count;
            _headDim = headDim;
            _theta = theta;
        }
    }

    /// <summary>Rotates rows whose cos/sin rows (half floats each) are given, row r's at cos + r * half.</summary>
    private static void Rows<TOps, TVec>(float* x, int rows, int heads, int headDim, int rowStride, float* cosTable, float* sinTable)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        int half = headDim / 2;
        nint vectorEnd = half & ~(nint)(TOps.Count - 1);
        for (int r = 0; r < rows; r++)
        {
            float* cos = cosTable + (nint)r * half, sin = sinTable + (nint)r * half;
            float* row = x + (nint)r * rowStride;
            for (int h = 0; h < heads; h++)
            {
                float* lo = row + (nint)h * headDim;
                float* hi = lo + half;
                nint i = 0;
                // Separate products then add, as torch evaluates x * cos + rotate_half(x) * sin (no fused multiply-add).
                for (; i < vectorEnd; i += TOps.Count)
                {
                    TVec a = TOps.Load(lo + i), b = TOps.Load(hi + i);
                    TVec c = TOps.Load(cos + i), s = TOps.Load(sin + i);
                    TOps.Store(TOps.Subtract(TOps.Multiply(a, c), TOps.Multiply(b, s)), lo + i);
                    TOps.Store(TOps.Add(TOps.Multiply(b, c), TOps.Multiply(a, s)), hi + i);
                }
                for (; i < half; i++)
                {
                    float a = lo[i], b = hi[i];
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}
