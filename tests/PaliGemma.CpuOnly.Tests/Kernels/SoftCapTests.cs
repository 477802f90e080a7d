using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

/// <summary>Gemma 2's tanh soft-cap, alone and fused into the matrix product's output tiles.</summary>
public sealed unsafe class SoftCapTests
{
    [Fact]
    public void Soft_cap_is_cap_times_tanh_of_x_over_cap_and_works_in_place()
    {
        float[] x = [0f, 1e-3f, -2.5f, 29f, 31f, -300f, 1e6f, float.NegativeInfinity];
        var y = x.ToArray();
        Activations.SoftCap(y, y, 30f);
        for (int i = 0; i < x.Length; i++)
            AssertClose(30.0 * Math.Tanh(x[i] / 30.0), y[i], 2e-6 * 30, $"x = {x[i]}");
        Assert.All(y, v => Assert.InRange(v, -30f, 30f));
        Assert.Throws<ArgumentOutOfRangeException>(() => Activations.SoftCap(x, y, 0f));
    }

    // Crosses tile edges (64 x 64), several K blocks and the parallel threshold, so every tile's epilogue runs exactly once.
    [Theory]
    [InlineData(1, 64, 2304, DType.F32)]
    [InlineData(5, 2100, 131, DType.BF16)]
    [InlineData(70, 1500, 70, DType.F16)]
    public void Fused_output_soft_cap_equals_the_product_then_the_cap(int rows, int k, int n, DType dtype)
    {
        var random = new Random(rows * 7 + n);
        float[] x = RandomFloats(random, rows * k, -2f, 2f);
        var (bytes, _) = EncodeWeights(RandomFloats(random, n * k, -2f, 2f), dtype);
        var plain = new float[rows * n];
        var capped = new float[rows * n];
        fixed (byte* wp = bytes)
        {
            var w = new WeightMatrix(wp, dtype, n, k);
            MatMul.Multiply(x, rows, w, default, plain);
            MatMul.Multiply(x, rows, w, default, capped, outputSoftCap: 30f);
        }
        Assert.True(plain.Max(Math.Abs) > 30f, "the products should reach past the cap for the test to mean something");
        // Vector and scalar tanh may differ in the last bit, so compare with the exact cap of the uncapped product.
        for (int i = 0; i < plain.Length; i++)
            AssertClose(30.0 * Math.Tanh(plain[i] / 30.0), capped[i], 2e-6 * 30, $"element {i}");
    }
}
