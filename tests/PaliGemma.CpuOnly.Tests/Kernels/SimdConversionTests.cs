using System.Runtime.Intrinsics;
using PaliGemma.CpuOnly.Kernels.Simd;

namespace PaliGemma.CpuOnly.Tests.Kernels;

/// <summary>The in-register bf16/f16 widening, checked exhaustively over all 65536 bit patterns at every width.</summary>
public sealed unsafe class SimdConversionTests
{
    private static readonly ushort[] AllBits = Enumerable.Range(0, 65536).Select(i => (ushort)i).ToArray();

    [Theory]
    [InlineData(Width.Scalar)]
    [InlineData(Width.V128)]
    [InlineData(Width.V256)]
    [InlineData(Width.V512)]
    public void Half_widening_is_exact_for_every_bit_pattern(Width width)
    {
        float[] widened = Widen(width, half: true);
        for (int i = 0; i < AllBits.Length; i++)
        {
            float expected = (float)BitConverter.UInt16BitsToHalf(AllBits[i]);
            if (float.IsNaN(expected))
                Assert.True(float.IsNaN(widened[i]), $"0x{i:X4} should widen to NaN, got {widened[i]}");
            else
                Assert.True(BitConverter.SingleToUInt32Bits(expected) == BitConverter.SingleToUInt32Bits(widened[i]),
                    $"0x{i:X4}: expected {expected:R}, got {widened[i]:R}");
        }
    }

    [Theory]
    [InlineData(Width.Scalar)]
    [InlineData(Width.V128)]
    [InlineData(Width.V256)]
    [InlineData(Width.V512)]
    public void BFloat16_widening_puts_the_bits_in_the_high_half(Width width)
    {
        float[] widened = Widen(width, half: false);
        for (int i = 0; i < AllBits.Length; i++)
            Assert.Equal((uint)i << 16, BitConverter.SingleToUInt32Bits(widened[i]));
    }

    private static float[] Widen(Width width, bool half)
    {
        var result = new float[AllBits.Length];
        fixed (ushort* source = AllBits)
        fixed (float* destination = result)
        {
            switch (width)
            {
                case Width.V512:
                    for (int i = 0; i < AllBits.Length; i += 16)
                        (half ? Simd512.LoadHalf(source + i) : Simd512.LoadBFloat16(source + i)).Store(destination + i);
                    break;
                case Width.V256:
                    for (int i = 0; i < AllBits.Length; i += 8)
                        (half ? Simd256.LoadHalf(source + i) : Simd256.LoadBFloat16(source + i)).Store(destination + i);
                    break;
                case Width.V128:
                    for (int i = 0; i < AllBits.Length; i += 4)
                        (half ? Simd128.LoadHalf(source + i) : Simd128.LoadBFloat16(source + i)).Store(destination + i);
                    break;
                default:
                    for (int i = 0; i < AllBits.Length; i++)
                        destination[i] = half ? SimdScalar.LoadHalf(source + i) : SimdScalar.LoadBFloat16(source + i);
                    break;
            }
        }
        return result;
    }

    [Fact]
    public void Best_width_is_the_widest_accelerated_one()
    {
        SimdWidth expected = Vector512.IsHardwareAccelerated ? SimdWidth.Vector512
            : Vector256.IsHardwareAccelerated ? SimdWidth.Vector256 : SimdWidth.Vector128;
        Assert.Equal(expected, SimdWidths.Best);
    }
}
