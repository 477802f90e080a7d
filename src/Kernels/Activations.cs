using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Kernels;

/// <summary>Element-wise activations. Destinations may be the same memory as a source (in place).</summary>
public static unsafe class Activations
{
    // gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3).
    // The sigmoid form has no cancellation for negative x and saturates correctly (exp overflow gives -0, underflow gives x).
    private const float MinusTwoSqrtTwoOverPi = -1.5957691216057308f;            // -2 * sqrt(2/pi)
    private const float MinusTwoSqrtTwoOverPiCubic = -1.5957691216057308f * 0.044715f;

    /// <summary>gelu_pytorch_tanh: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). y must hold at least x.Length floats.</summary>
    public static void GeluTanh(ReadOnlySpan<float> x, Span<float> y) => GeluTanh(x, y, SimdWidths.Best);

    /// <summary>GeGLU: y = gelu_tanh(gate) * up. up must match gate's length; y must hold at least that many floats.</summary>
    public static void GeluTanhMul(ReadOnlySpan<float> gate, ReadOnlySpan<float> up, Span<float> y) => GeluTanhMul(gate, up, y, SimdWidths.Best);

    /// <summary>Soft-cap: y = cap · tanh(x / cap) (Gemma 2 attention scores and final logits). y may be x.</summary>
    public static void SoftCap(ReadOnlySpan<float> x, Span<float> y, float cap)
    {
        if (y.Length < x.Length)
            throw new ArgumentException($"y holds {y.Length} floats; x has {x.Length}", nameof(y));
        if (!(cap > 0f) || float.IsInfinity(cap))
            throw new ArgumentOutOfRangeException(nameof(cap), cap, "the soft-cap must be positive and finite");
        y = y[..x.Length];
        System.Numerics.Tensors.TensorPrimitives.Divide(x, cap, y);
        System.Numerics.Tensors.TensorPrimitives.Tanh(y, y);
        System.Numerics.Tensors.TensorPrimitives.Multiply(y, cap, y);
    }

    internal static void GeluTanh(ReadOnlySpan<float> x, Span<float> y, SimdWidth width)
    {
        if (y.Length < x.Length)
            throw new ArgumentException($"y holds {y.Length} floats; x has {x.Length}", nameof(y));
        fixed (float* xp = x)
        fixed (float* yp = y)
        {
            switch (width)
            {
                case SimdWidth.Vector512: GeluParallel<Simd512, Vector512<float>>(xp, null, yp, x.Length); break;
                case SimdWidth.Vector256: GeluParallel<Simd256, Vector256<float>>(xp, null, yp, x.Length); break;
                case SimdWidth.Vector128: GeluParallel<Simd128, Vector128<float>>(xp, null, yp, x.Length); break;
                default: GeluParallel<SimdScalar, float>(xp, null, yp, x.Length); break;
            }
        }
    }

    internal static void GeluTanhMul(ReadOnlySpan<float> gate, ReadOnlySpan<float> up, Span<float> y, SimdWidth width)
    {
        if (up.Length != gate.Length)
            throw new ArgumentException($"up holds {up.Length} floats; gate has {gate.Length}", nameof(up));
        if (y.Length < gate.Length)
            throw new ArgumentException($"y holds {y.Length} floats; gate has {gate.Length}", nameof(y));
        fixed (float* gp = gate)
        fixed (float* up_ = up)
        fixed (float* yp = y)
        {
            switch (width)
            {
                case SimdWidth.Vector512: GeluParallel<Simd512, Vector512<float>>(gp, up_, yp, gate.Length); break;
                case SimdWidth.Vector256: GeluParallel<Simd256, Vector256<float>>(gp, up_, yp, gate.Length); break;
                case SimdWidth.Vector128: GeluParallel<Simd128, Vector128<float>>(gp, up_, yp, gate.Length); break;
                default: GeluParallel<SimdScalar, float>(gp, up_, yp, gate.Length); break;
            }
        }
    }

    // Element-wise work is split into chunks of this many floats (a multiple of every vector width) across the kernel
    // threads once there are at least two chunks: a prefill's GeGLU is millions of exps.
    private const int ChunkLength = 1 << 14;

    private static void GeluParallel<TOps, TVec>(float* x, float* up, float* y, nint n)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        long chunks = (n + ChunkLength - 1) / ChunkLength;
        if (chunks < 2 || chunks > int.MaxValue)
        {
            Gelu<TOps, TVec>(x, up, y, n);
            return;
        }
        KernelThreading.For((int)chunks, true, new GeluChunks<TOps, TVec>(x, up, y, n));
    }

    private readonly struct GeluChunks<TOps, TVec>(float* x, float* up, float* y, nint n) : IWorkItems
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        public void Run(int item)
        {
            nint start = (nint)item * ChunkLength;
            Gelu<TOps, TVec>(x + start, up == null ? null : up + start, y + start, Math.Min(ChunkLength, n - start));
        }
    }

    /// <summary>y = gelu_tanh(x) (* up when up is not null).</summary>
    private static void Gelu<TOps, TVec>(float* x, float* up, float* y, nint n)
        where TOps : struct, ISimdOps<TOps, TVec>
        where TVec : unmanaged
    {
        TVec one = TOps.Create(1f);
        TVec linear = TOps.Create(MinusTwoSqrtTwoOverPi);
        TVec cubic = TOps.Create(MinusTwoSqrtTwoOverPiCubic);
        nint vectorEnd = n & ~(nint)(TOps.Count - 1);
        nint i = 0;
        for (; i < vectorEnd; i += TOps.Count)
        {
            TVec v = TOps.Load(x + i);
            TVec minusTwoU = TOps.Multiply(v, TOps.MultiplyAdd(TOps.Multiply(v, v), cubic, linear));
            TVec result = TOps.Divide(v, TOps.Add(one, TOps.Exp(minusTwoU)));
            if (up != null)
                result = TOps.Multiply(result, TOps.Load(up + i));
            TOps.Store(result, y + i);
        }
        for (; i < n; i++)
        {
            float result = GeluScalar(x[i]);
            y[i] = up == null ? result : result * up[i];
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float GeluScalar(float v) =>
        v / (1f + MathF.Exp(v * (v * v * MinusTwoSqrtTwoOverPiCubic + MinusTwoSqrtTwoOverPi)));
}
