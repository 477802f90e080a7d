using System.Runtime.Intrinsics;
using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Row-wise normalisations. Every row of <c>dim</c> floats is normalised independently; y may be the same memory as x.</summary>
public static unsafe class Norms
{
    /// <summary>
    /// LayerNorm: y = (x - mean) / sqrt(var + eps) * gamma + beta per row, with the biased variance (divide by dim).
    /// </summary>
    /// <param name="beta">dim floats, or empty for no shift.</param>
    public static void LayerNorm(ReadOnlySpan<float> x, Span<float> y, int rows, int dim, ReadOnlySpan<float> gamma, ReadOnlySpan<float> beta, float eps) =>
        LayerNorm(x, y, rows, dim, gamma, beta, eps, SimdWidths.Best.FitTo(dim));

    /// <summary>
    /// Gemma RMSNorm: y = x / sqrt(mean(x^2) + eps) * (unitOffset ? 1 + weight : weight) per row.
    /// </summary>
    public static void RmsNorm(ReadOnlySpan<float> x, Span<float> y, int rows, int dim, ReadOnlySpan<float> weight, float eps, bool unitOffset) =>
        RmsNorm(x, y, rows, dim, weight, eps, unitOffset, SimdWidths.Best.FitTo(dim));

    internal static void LayerNorm(ReadOnlySpan<float> x, Span<float> y, int rows, int dim, ReadOnlySpan<float> gamma, ReadOnlySpan<float> beta, float eps, SimdWidth width)
    {
        ValidateRows(x, y, rows, dim);
        if (gamma.Length != dim)
            throw new ArgumentException($"gamma holds {gamma.Length} floats; it must hold dim = {dim}", nameof(gamma));
        if (!beta.IsEmpty && beta.Length != dim)
            throw new ArgumentException($"beta holds {beta.Length} floats; it must be empty or hold dim = {dim}", nameof(beta));

        fixed (float* xp = x)
        fixed (float* yp = y)
        fixed (float* gp = gamma)
        fixed (float* bp = beta)
        {
            float* b = beta.IsEmpty ? null : bp;
            switch (width)
            {
                case SimdWidth.Vector512: LayerNormRows<Simd512, Vector512<float>>(xp, yp, rows, dim, gp, b, eps); break;
                case SimdWidth.Vector256: LayerNormRows<Simd256, Vector256<float>>(xp, yp, rows, dim, gp, b, eps); break;
                case SimdWidth.Vector128: LayerNormRows<Simd128, Vector128<float>>(xp, yp, rows, dim, gp, b, eps); break;
                default: LayerNormRows<SimdScalar, float>(xp, yp, rows, dim, gp, b, eps); break;
            }
        }
    }

    internal static void RmsNorm(ReadOnlySpan<float> x, Span<float> y, int rows, int dim, ReadOnlySpan<float> weight, float eps, bool unitOffset, SimdWidth width)
    {
        ValidateRows(x, y, rows, dim);
        if (weight.Length != dim)
            throw new ArgumentException($"weight holds {weight.Length} floats; it must hold dim = {dim}", nameof(weight));

        fixed (float* xp = x)
        fixed (float* yp = y)
        fixed (float* wp = weight)
        {
            switch (width)
            {
                case SimdWidth.Vector512: RmsNormRows<Simd512, Vector512<float>>(xp, yp, rows, dim, wp, eps, unitOffset); break;
                case SimdWidth.Vector256: RmsNormRows<Simd256, Vector256<float>>(xp, yp, rows, dim, wp, eps, unitOffset); break;
                case SimdWidth.Vector128: RmsNormRows<Simd128, Vector128<float>>(xp, yp, rows, dim, wp, eps, unitOffset); break;
                default: RmsNormRows<SimdScalar, float>(xp, yp, rows, dim, wp, eps, unitOffset); break;
            }
        }
    }

    private static void ValidateRows(ReadOnlySpan<float> x, Span<float> y, int rows, int dim) => CheckRows(x.Length, y.Length, rows, dim);

    /// <summary>Validates x and y of a row-wise normalisation of <paramref name="rows"/> x <paramref name="dim"/> floats (shared by every backend).</summary>
    public static void CheckRows(long xLength, long yLength, int rows, int dim)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(dim);
        long needed = (long)rows * dim;
        if (xLength < needed)
            throw new ArgumentException($"x holds {xLength} floats; {rows} rows of {dim} need {needed}", "x");
        if (yLength < needed)
            throw new ArgumentException($"y holds {yLength} floats; {rows} rows of {dim} need {needed}", "y");
    }

    private static void LayerNormRows<TOps, TVec>(float* x, float* y, int rows, int dim, float* gamma, float* beta, float eps)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        nint n = dim;
        nint vectorEnd = n & ~(nint)(TOps.Count - 1);
        for (int r = 0; r < rows; r++)
        {
            float* xr = x + (nint)r * dim;
            float* yr = y + (nint)r * dim;

            float mean = Sum<TOps, TVec>(xr, n) / dim;

            // Second pass over (x - mean)^2: the one-pass E[x^2] - mean^2 form loses digits when |mean| >> std.
            TVec meanV = TOps.Create(mean);
            TVec sq = TOps.Zero;
            nint i = 0;
            for (; i < vectorEnd; i += TOps.Count)
            {
                TVec d = TOps.Subtract(TOps.Load(xr + i), meanV);
                sq = TOps.MultiplyAdd(d, d, sq);
            }
            float variance = TOps.Sum(sq);
            for (; i < n; i++)
            {
                float d = xr[i] - mean;
                variance += d * d;
            }
            variance /= dim;

            float rstd = 1f / MathF.Sqrt(variance + eps);
            TVec rstdV = TOps.Create(rstd);
            for (i = 0; i < vectorEnd; i += TOps.Count)
            {
                TVec normalized = TOps.Multiply(TOps.Subtract(TOps.Load(xr + i), meanV), rstdV);
                TVec result = beta == null
                    ? TOps.Multiply(normalized, TOps.Load(gamma + i))
                    : TOps.MultiplyAdd(normalized, TOps.Load(gamma + i), TOps.Load(beta + i));
                TOps.Store(result, yr + i);
            }
            for (; i < n; i++)
            {
                float normalized = (xr[i] - mean) * rstd;
                yr[i] = beta == null ? normalized * gamma[i] : normalized * gamma[i] + beta[i];
            }
        }
    }

    private static void RmsNormRows<TOps, TVec>(float* x, float* y, int rows, int dim, float* weight, float eps, bool unitOffset)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        nint n = dim;
        nint vectorEnd = n & ~(nint)(TOps.Count - 1);
        TVec one = TOps.Create(unitOffset ? 1f : 0f);
        float offset = unitOffset ? 1f : 0f;
        for (int r = 0; r < rows; r++)
        {
            float* xr = x + (nint)r * dim;
            float* yr = y + (nint)r * dim;

            TVec sq = TOps.Zero;
            nint i = 0;
            for (; i < vectorEnd; i += TOps.Count)
            {
                TVec v = TOps.Load(xr + i);
                sq = TOps.MultiplyAdd(v, v, sq);
            }
            float sumSquares = TOps.Sum(sq);
            for (; i < n; i++)
                sumSquares += xr[i] * xr[i];

            // Same operation order as the Hugging Face Gemma module: (x * rsqrt(mean + eps)) * (1 + w).
            float scale = 1f / MathF.Sqrt(sumSquares / dim + eps);
            TVec scaleV = TOps.Create(scale);
            for (i = 0; i < vectorEnd; i += TOps.Count)
            {
                TVec factor = TOps.Add(one, TOps.Load(weight + i));
                TOps.Store(TOps.Multiply(TOps.Multiply(TOps.Load(xr + i), scaleV), factor), yr + i);
            }
            for (; i < n; i++)
                yr[i] = xr[i] * scale * (offset + weight[i]);
        }
    }

    private static float Sum<TOps, TVec>(float* x, nint n)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        nint vectorEnd = n & ~(nint)(TOps.Count - 1);
        TVec a0 = TOps.Zero, a1 = TOps.Zero;
        nint i = 0;
        for (; i + TOps.Count < vectorEnd; i += 2 * TOps.Count)
        {
            a0 = TOps.Add(a0, TOps.Load(x + i));
            a1 = TOps.Add(a1, TOps.Load(x + i + TOps.Count));
        }
        for (; i < vectorEnd; i += TOps.Count)
            a0 = TOps.Add(a0, TOps.Load(x + i));
        float sum = TOps.Sum(TOps.Add(a0, a1));
        for (; i < n; i++)
            sum += x[i];
        return sum;
    }
}
