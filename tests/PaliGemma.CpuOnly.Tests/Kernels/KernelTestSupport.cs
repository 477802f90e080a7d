using FsCheck;
using FsCheck.Fluent;
using PaliGemma.CpuOnly.Kernels.Simd;
using PaliGemma.CpuOnly.Tensors;
using Xunit.Sdk;

namespace PaliGemma.CpuOnly.Tests.Kernels;

/// <summary>The kernel vector widths, as seen by the tests (mirrors the internal SimdWidth).</summary>
public enum Width
{
    Scalar = SimdWidth.Scalar,
    V128 = SimdWidth.Vector128,
    V256 = SimdWidth.Vector256,
    V512 = SimdWidth.Vector512,
}

internal static class KernelTestSupport
{
    public static SimdWidth ToSimd(this Width width) => (SimdWidth)(int)width;

    public static Gen<Width> Widths { get; } = Gen.Elements(Width.Scalar, Width.V128, Width.V256, Width.V512);

    public static Gen<int> Seeds { get; } = Gen.Choose(0, int.MaxValue - 1);

    public static float[] RandomFloats(Random random, int length, float low, float high)
    {
        var values = new float[length];
        for (int i = 0; i < values.Length; i++)
            values[i] = low + (float)random.NextDouble() * (high - low);
        return values;
    }

    /// <summary>
    /// Encodes values as a weight matrix of <paramref name="dtype"/> and returns the bytes plus the exact float value
    /// of every stored element (what the kernel must multiply with).
    /// </summary>
    public static (byte[] Bytes, double[] Decoded) EncodeWeights(float[] values, DType dtype)
    {
        var decoded = new double[values.Length];
        byte[] bytes;
        switch (dtype)
        {
            case DType.F32:
                bytes = new byte[values.Length * 4];
                Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length);
                for (int i = 0; i < values.Length; i++) decoded[i] = values[i];
                break;
            case DType.BF16:
                bytes = new byte[values.Length * 2];
                for (int i = 0; i < values.Length; i++)
                {
                    // Round to nearest even into the top 16 bits.
                    uint bits = BitConverter.SingleToUInt32Bits(values[i]);
                    ushort bf = (ushort)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
                    BitConverter.TryWriteBytes(bytes.AsSpan(2 * i), bf);
                    decoded[i] = BitConverter.UInt32BitsToSingle((uint)bf << 16);
                }
                break;
            case DType.F16:
                bytes = new byte[values.Length * 2];
                for (int i = 0; i < values.Length; i++)
                {
                    Half h = (Half)values[i];
                    BitConverter.TryWriteBytes(bytes.AsSpan(2 * i), BitConverter.HalfToUInt16Bits(h));
                    decoded[i] = (double)h;
                }
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(dtype));
        }
        return (bytes, decoded);
    }

    /// <summary>Fails with the context when |actual - expected| exceeds the tolerance (NaN never passes).</summary>
    public static void AssertClose(double expected, float actual, double tolerance, string context)
    {
        double error = Math.Abs(actual - expected);
        if (!(error <= tolerance))
            throw new XunitException($"{context}: expected {expected:R}, got {actual:R} (error {error:E3} > tolerance {tolerance:E3})");
    }
}
