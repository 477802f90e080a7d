using ILGPU;

namespace PaliGemma.CpuOnly.Backends.ILGPU.Kernels;

/// <summary>
/// How a kernel reads element (row n, column k) of a resident weight matrix: the stored bytes stay as they are on the
/// device and each element is widened (bf16, f16) or dequantized (q8, nf4) to fp32 in registers when it is loaded.
/// </summary>
internal interface IDeviceWeights
{
    float Load(int row, int col);
}

internal struct Float32Weights : IDeviceWeights
{
    public ArrayView<float> Data;
    public int Cols;

    public readonly float Load(int row, int col) => Data[(long)row * Cols + col];
}

internal struct BFloat16Weights : IDeviceWeights
{
    public ArrayView<ushort> Data;
    public int Cols;

    // bf16 is the top half of an fp32: widening is a shift.
    public readonly float Load(int row, int col) => Interop.IntAsFloat((uint)Data[(long)row * Cols + col] << 16);
}

internal struct Float16Weights : IDeviceWeights
{
    public ArrayView<ushort> Data;
    public int Cols;

    public readonly float Load(int row, int col) => HalfToSingle(Data[(long)row * Cols + col]);

    /// <summary>IEEE binary16 bits to fp32, exactly (subnormals, infinities and NaN payloads included).</summary>
    public static float HalfToSingle(uint bits)
    {
        uint sign = (bits & 0x8000u) << 16;
        uint exponent = (bits >> 10) & 0x1Fu;
        uint mantissa = bits & 0x3FFu;
        if (exponent == 0x1Fu)
            return Interop.IntAsFloat(sign | 0x7F800000u | (mantissa << 13));
        if (exponent == 0u)
        {
            // Subnormal (or zero): mantissa · 2^-24 is exact in fp32. Through int: an unsigned conversion widens via
            // double in IL, which OpenCL devices without fp64 cannot compile.
            float magnitude = (int)mantissa * (1f / 16777216f);
            return sign != 0u ? -magnitude : magnitude;
        }
        return Interop.IntAsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    }
}

/// <summary>q8: 32 signed bytes per block along K, one fp32 scale per block; w = q · scale.</summary>
internal struct Q8Weights : IDeviceWeights
{
    public ArrayView<byte> Codes;
    public ArrayView<float> Scales;
    public int BlocksPerRow;

    public readonly float Load(int row, int col)
    {
        long block = (long)row * BlocksPerRow + (col >> 5);
        return (sbyte)Codes[block * 32 + (col & 31)] * Scales[block];
    }
}

/// <summary>nf4: 64 weights per 32-byte block (byte j: element j in the low nibble, j + 32 in the high one), fp32 absmax per block.</summary>
internal struct Nf4Weights : IDeviceWeights
{
    public ArrayView<byte> Codes;
    public ArrayView<float> Scales;
    /// <summary>The 16 NF4 code values.</summary>
    public ArrayView<float> Table;
    public int BlocksPerRow;

    public readonly float Load(int row, int col)
    {
        long block = (long)row * BlocksPerRow + (col >> 6);
        int index = col & 63;
        int packed = Codes[block * 32 + (index & 31)];
        int code = index < 32 ? packed & 0xF : packed >> 4;
        return Table[code] * Scales[block];
    }
}
