namespace PaliGemma.CpuOnly.Kernels.Simd;

/// <summary>
/// The float vector operations the kernels are written against. Implemented by zero-size structs over
/// Vector512/256/128 and plain float (Count = 1), so one generic kernel body is compiled once per width
/// and every call below is inlined by the JIT.
/// </summary>
internal unsafe interface ISimdOps<TSelf, TVec>
    where TSelf : struct, ISimdOps<TSelf, TVec>
    where TVec : unmanaged
{
    static abstract int Count { get; }
    static abstract TVec Zero { get; }
    static abstract TVec Create(float value);
    static abstract TVec Load(float* source);
    static abstract void Store(TVec value, float* destination);
    /// <summary>Loads <see cref="Count"/> bfloat16 values and widens them to float (bits shifted into the high half).</summary>
    static abstract TVec LoadBFloat16(ushort* source);
    /// <summary>Loads <see cref="Count"/> IEEE half values and widens them to float exactly (subnormals, inf and NaN included).</summary>
    static abstract TVec LoadHalf(ushort* source);
    static abstract TVec Add(TVec left, TVec right);
    static abstract TVec Subtract(TVec left, TVec right);
    static abstract TVec Multiply(TVec left, TVec right);
    static abstract TVec Divide(TVec left, TVec right);
    /// <summary>left * right + addend, fused where the hardware has FMA.</summary>
    static abstract TVec MultiplyAdd(TVec left, TVec right, TVec addend);
    /// <summary>Lane-wise maximum without NaN/signed-zero fix-ups (inputs are ordinary numbers or -inf).</summary>
    static abstract TVec Max(TVec left, TVec right);
    /// <summary>Lane-wise exp by <see cref="PolynomialExp"/> (about 2 ulp; 0 below its Low, +inf above its High).</summary>
    static abstract TVec Exp(TVec value);
    static abstract float Sum(TVec value);
    static abstract float MaxAcross(TVec value);
}
