using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace PaliGemma.CpuOnly.Kernels.Simd;

/// <summary>Shared bit tricks for widening half precision lane-wise.</summary>
internal static class HalfBits
{
    // Half exponent/mantissa moved into float position; multiplying by 2^112 re-biases the exponent (15 -> 127)
    // and turns half subnormals into float normals exactly. Exponent 31 (inf/NaN) gets the float all-ones exponent instead.
    public const uint MagnitudeMask = 0x7FFF;
    public const uint SignMask = 0x8000;
    public const uint InfNanThreshold = 0x7C00u << 13;
    public const uint FloatExponentMask = 0x7F800000;
    public const float Rebias = 5.192296858534828e33f; // 2^112

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ToSingle(ushort bits)
    {
        uint magnitude = (bits & MagnitudeMask) << 13;
        float value = magnitude >= InfNanThreshold
            ? BitConverter.UInt32BitsToSingle(magnitude | FloatExponentMask)
            : BitConverter.UInt32BitsToSingle(magnitude) * Rebias;
        return BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(value) | ((bits & SignMask) << 16));
    }
}

internal readonly unsafe struct Simd512 : ISimdOps<Simd512, Vector512<float>>
{
    public static int Count => Vector512<float>.Count;
    public static Vector512<float> Zero => Vector512<float>.Zero;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Create(float value) => Vector512.Create(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Load(float* source) => Vector512.Load(source);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Store(Vector512<float> value, float* destination) => value.Store(destination);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> LoadBFloat16(ushort* source) =>
        Vector512.ShiftLeft(Vector512.WidenLower(Vector256.Load(source).ToVector512Unsafe()), 16).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> LoadHalf(ushort* source)
    {
        Vector512<uint> bits = Vector512.WidenLower(Vector256.Load(source).ToVector512Unsafe());
        Vector512<uint> magnitude = Vector512.ShiftLeft(bits & Vector512.Create(HalfBits.MagnitudeMask), 13);
        Vector512<float> finite = magnitude.AsSingle() * Vector512.Create(HalfBits.Rebias);
        Vector512<float> infNan = (magnitude | Vector512.Create(HalfBits.FloatExponentMask)).AsSingle();
        Vector512<float> value = Vector512.ConditionalSelect(
            Vector512.GreaterThanOrEqual(magnitude, Vector512.Create(HalfBits.InfNanThreshold)).AsSingle(), infNan, finite);
        return value | Vector512.ShiftLeft(bits & Vector512.Create(HalfBits.SignMask), 16).AsSingle();
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Add(Vector512<float> left, Vector512<float> right) => left + right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Subtract(Vector512<float> left, Vector512<float> right) => left - right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Multiply(Vector512<float> left, Vector512<float> right) => left * right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Divide(Vector512<float> left, Vector512<float> right) => left / right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> MultiplyAdd(Vector512<float> left, Vector512<float> right, Vector512<float> addend) =>
        Vector512.MultiplyAddEstimate(left, right, addend);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Max(Vector512<float> left, Vector512<float> right) => Vector512.MaxNative(left, right);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp(Vector512<float> value) => PolynomialExp.Exp(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Sum(Vector512<float> value) => Vector512.Sum(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float MaxAcross(Vector512<float> value) =>
        Simd256.MaxAcross(Vector256.MaxNative(value.GetLower(), value.GetUpper()));
}

internal readonly unsafe struct Simd256 : ISimdOps<Simd256, Vector256<float>>
{
    public static int Count => Vector256<float>.Count;
    public static Vector256<float> Zero => Vector256<float>.Zero;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Create(float value) => Vector256.Create(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Load(float* source) => Vector256.Load(source);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Store(Vector256<float> value, float* destination) => value.Store(destination);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> LoadBFloat16(ushort* source) =>
        Vector256.ShiftLeft(Vector256.WidenLower(Vector128.Load(source).ToVector256Unsafe()), 16).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> LoadHalf(ushort* source)
    {
        Vector256<uint> bits = Vector256.WidenLower(Vector128.Load(source).ToVector256Unsafe());
        Vector256<uint> magnitude = Vector256.ShiftLeft(bits & Vector256.Create(HalfBits.MagnitudeMask), 13);
        Vector256<float> finite = magnitude.AsSingle() * Vector256.Create(HalfBits.Rebias);
        Vector256<float> infNan = (magnitude | Vector256.Create(HalfBits.FloatExponentMask)).AsSingle();
        Vector256<float> value = Vector256.ConditionalSelect(
            Vector256.GreaterThanOrEqual(magnitude, Vector256.Create(HalfBits.InfNanThreshold)).AsSingle(), infNan, finite);
        return value | Vector256.ShiftLeft(bits & Vector256.Create(HalfBits.SignMask), 16).AsSingle();
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Add(Vector256<float> left, Vector256<float> right) => left + right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Subtract(Vector256<float> left, Vector256<float> right) => left - right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Multiply(Vector256<float> left, Vector256<float> right) => left * right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Divide(Vector256<float> left, Vector256<float> right) => left / right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> MultiplyAdd(Vector256<float> left, Vector256<float> right, Vector256<float> addend) =>
        Vector256.MultiplyAddEstimate(left, right, addend);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Max(Vector256<float> left, Vector256<float> right) => Vector256.MaxNative(left, right);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp(Vector256<float> value) => PolynomialExp.Exp(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Sum(Vector256<float> value) => Vector256.Sum(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float MaxAcross(Vector256<float> value) =>
        Simd128.MaxAcross(Vector128.MaxNative(value.GetLower(), value.GetUpper()));
}

internal readonly unsafe struct Simd128 : ISimdOps<Simd128, Vector128<float>>
{
    public static int Count => Vector128<float>.Count;
    public static Vector128<float> Zero => Vector128<float>.Zero;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Create(float value) => Vector128.Create(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Load(float* source) => Vector128.Load(source);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Store(Vector128<float> value, float* destination) => value.Store(destination);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> LoadBFloat16(ushort* source) =>
        Vector128.ShiftLeft(Vector128.WidenLower(Vector64.Load(source).ToVector128Unsafe()), 16).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> LoadHalf(ushort* source)
    {
        Vector128<uint> bits = Vector128.WidenLower(Vector64.Load(source).ToVector128Unsafe());
        Vector128<uint> magnitude = Vector128.ShiftLeft(bits & Vector128.Create(HalfBits.MagnitudeMask), 13);
        Vector128<float> finite = magnitude.AsSingle() * Vector128.Create(HalfBits.Rebias);
        Vector128<float> infNan = (magnitude | Vector128.Create(HalfBits.FloatExponentMask)).AsSingle();
        Vector128<float> value = Vector128.ConditionalSelect(
            Vector128.GreaterThanOrEqual(magnitude, Vector128.Create(HalfBits.InfNanThreshold)).AsSingle(), infNan, finite);
        return value | Vector128.ShiftLeft(bits & Vector128.Create(HalfBits.SignMask), 16).AsSingle();
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Add(Vector128<float> left, Vector128<float> right) => left + right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Subtract(Vector128<float> left, Vector128<float> right) => left - right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Multiply(Vector128<float> left, Vector128<float> right) => left * right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Divide(Vector128<float> left, Vector128<float> right) => left / right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> MultiplyAdd(Vector128<float> left, Vector128<float> right, Vector128<float> addend) =>
        Vector128.MultiplyAddEstimate(left, right, addend);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Max(Vector128<float> left, Vector128<float> right) => Vector128.MaxNative(left, right);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Exp(Vector128<float> value) => PolynomialExp.Exp(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Sum(Vector128<float> value) => Vector128.Sum(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float MaxAcross(Vector128<float> value)
    {
        Vector128<float> pairs = Vector128.MaxNative(value, Vector128.Shuffle(value, Vector128.Create(2, 3, 0, 1)));
        return MathF.Max(pairs.GetElement(0), pairs.GetElement(1));
    }
}

/// <summary>Count = 1: the same kernels in plain float arithmetic, used for tiny sizes and as a test oracle for the widths.</summary>
internal readonly unsafe struct SimdScalar : ISimdOps<SimdScalar, float>
{
    public static int Count => 1;
    public static float Zero => 0f;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Create(float value) => value;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Load(float* source) => *source;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Store(float value, float* destination) => *destination = value;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadBFloat16(ushort* source) => BitConverter.UInt32BitsToSingle((uint)*source << 16);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadHalf(ushort* source) => HalfBits.ToSingle(*source);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Add(float left, float right) => left + right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Subtract(float left, float right) => left - right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Multiply(float left, float right) => left * right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Divide(float left, float right) => left / right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float MultiplyAdd(float left, float right, float addend) => float.MultiplyAddEstimate(left, right, addend);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Max(float left, float right) => left > right ? left : right;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Exp(float value) => PolynomialExp.Exp(value);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Sum(float value) => value;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float MaxAcross(float value) => value;
}
