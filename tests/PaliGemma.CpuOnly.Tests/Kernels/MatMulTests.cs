using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public sealed record MatMulCase(int Rows, int K, int N, DType DType, bool Bias, Width Width, int Seed);

public static class MatMulArbitraries
{
    public static Arbitrary<MatMulCase> Cases() => Arb.From(
        from rows in Gen.Choose(1, 9)
        from k in Gen.Choose(1, 70)
        from n in Gen.Choose(1, 13)
        from dtype in Gen.Elements(DType.F32, DType.BF16, DType.F16)
        from bias in Gen.Elements(true, false)
        from width in Widths
        from seed in Seeds
        select new MatMulCase(rows, k, n, dtype, bias, width, seed));

    /// <summary>
    /// Shapes for the packed GEMM (16+ rows): M crossing panels of 2 vectors and ending in a half panel or a partial
    /// one, N crossing micro-panels of 12 and the 16-wide transposed store, K odd, below one vector and across K blocks of 256.
    /// </summary>
    public static Arbitrary<PackedMatMulCase> PackedCases() => Arb.From(
        from rows in Gen.Choose(MatMul.PackedMinRows, 80)
        from k in Gen.OneOf(Gen.Choose(1, 20), Gen.Choose(21, 600))
        from n in Gen.Choose(1, 60)
        from dtype in Gen.Elements(DType.F32, DType.BF16, DType.F16)
        from bias in Gen.Elements(true, false)
        from softCap in Gen.Elements(0f, 0f, 8f)
        from width in Widths
        from seed in Seeds
        select new PackedMatMulCase(rows, k, n, dtype, bias, softCap, width, seed));
}

public sealed record PackedMatMulCase(int Rows, int K, int N, DType DType, bool Bias, float SoftCap, Width Width, int Seed);

public sealed unsafe class MatMulTests
{
    [Property(Arbitrary = [typeof(MatMulArbitraries)], MaxTest = 150)]
    public void Multiply_matches_double_reference(MatMulCase c) => Check(c.Rows, c.K, c.N, c.DType, c.Bias, c.Width, c.Seed);

    [Property(Arbitrary = [typeof(MatMulArbitraries)], MaxTest = 50)]
    public void Public_entry_point_matches_double_reference(MatMulCase c) => Check(c.Rows, c.K, c.N, c.DType, c.Bias, width: null, c.Seed);

    // Crosses the 64 x 64 tile edges and the K blocks (F16 tiles of 8+ rows go through the widened panel), large enough to
    // run multi-threaded; the first rows are below MatMul.PackedMinRows (the dot-product tiles), the rest the packed GEMM.
    [Theory]
    [InlineData(31, 2100, 131, DType.F16)]
    [InlineData(20, 1500, 70, DType.BF16)]
    [InlineData(70, 2100, 131, DType.F32)]
    [InlineData(67, 2100, 130, DType.BF16)]
    [InlineData(1, 4500, 257, DType.F16)]
    [InlineData(133, 100, 65, DType.BF16)]
    [InlineData(66, 1500, 70, DType.F16)]
    public void Multiply_matches_reference_on_tiled_and_parallel_shapes(int rows, int k, int n, DType dtype) =>
        Check(rows, k, n, dtype, bias: true, width: null, seed: rows * 31 + k);

    [Property(Arbitrary = [typeof(MatMulArbitraries)], MaxTest = 120)]
    public void Packed_gemm_matches_double_reference(PackedMatMulCase c) =>
        Check(c.Rows, c.K, c.N, c.DType, c.Bias, c.Width, c.Seed, c.SoftCap);

    // Several row blocks (of up to 10 panels) and several work items per thread, with a ragged last panel, micro-panel and K block.
    [Theory]
    [InlineData(350, 600, 530, DType.BF16, 0f)]
    [InlineData(529, 70, 97, DType.F32, 0f)]
    [InlineData(257, 333, 251, DType.F16, 5f)]
    public void Packed_gemm_matches_reference_on_blocked_shapes(int rows, int k, int n, DType dtype, float softCap) =>
        Check(rows, k, n, dtype, bias: true, width: null, seed: rows + k + n, softCap);

    private static void Check(int rows, int k, int n, DType dtype, bool bias, Width? width, int seed, float softCap = 0f)
    {
        var random = new Random(seed);
        float[] x = RandomFloats(random, rows * k, -2f, 2f);
        var (bytes, decoded) = EncodeWeights(RandomFloats(random, n * k, -2f, 2f), dtype);
        float[] b = bias ? RandomFloats(random, n, -3f, 3f) : [];
        // One extra row of slack in y must stay untouched.
        var y = new float[(rows + 1) * n];
        Array.Fill(y, 12345f);

        fixed (byte* wp = bytes)
        {
            var w = new WeightMatrix(wp, dtype, n, k);
            if (width is { } chosen)
                MatMul.Multiply(x, rows, w, b, y, chosen.ToSimd(), softCap);
            else if (softCap > 0f)
                MatMul.Multiply(x, rows, w, b, y, softCap);
            else
                MatMul.Multiply(x, rows, w, b, y);
        }

        AssertMatchesReference(x, rows, k, n, decoded, b, softCap, y, $"{rows}x{k} * {n}x{k} {dtype} {width} cap {softCap}");
    }

    /// <summary>
    /// y (rows x n, then one untouched slack row of 12345) equals x·Wᵀ + b (b empty: none), soft-capped when
    /// <paramref name="softCap"/> &gt; 0, against a double-precision reference; shared with the GEMV tests.
    /// </summary>
    internal static void AssertMatchesReference(float[] x, int rows, int k, int n, double[] decoded, float[] b, float softCap, float[] y, string label)
    {
        bool bias = b.Length > 0;
        for (int m = 0; m < rows; m++)
        {
            for (int j = 0; j < n; j++)
            {
                double sum = bias ? b[j] : 0.0, magnitude = bias ? Math.Abs(b[j]) : 0.0;
                for (int i = 0; i < k; i++)
                {
                    double product = x[m * k + i] * decoded[j * k + i];
                    sum += product;
                    magnitude += Math.Abs(product);
                }
                // The cap's slope is at most 1, so the product's tolerance carries over; tanh itself adds a few ulps of the cap.
                double expected = softCap > 0f ? softCap * Math.Tanh(sum / softCap) : sum;
                double tolerance = 1e-5 * magnitude + 1e-30 + (softCap > 0f ? 2e-6 * softCap : 0);
                AssertClose(expected, y[m * n + j], tolerance, $"y[{m}, {j}] ({label})");
            }
        }
        for (int j = rows * n; j < y.Length; j++)
            Assert.Equal(12345f, y[j]);
    }

    [Fact]
    public void Multiply_rejects_mismatched_sizes()
    {
        var weights = new float[6];
        fixed (float* wp = weights)
        {
            var w = new WeightMatrix(wp, DType.F32, 2, 3);   // N = 2, K = 3
            float[] y = new float[4];
            Assert.Equal("x", Assert.Throws<ArgumentException>(() => MatMul.Multiply(new float[5], 2, w, default, y)).ParamName);
            Assert.Equal("bias", Assert.Throws<ArgumentException>(() => MatMul.Multiply(new float[6], 2, w, new float[3], y)).ParamName);
            Assert.Equal("y", Assert.Throws<ArgumentException>(() => MatMul.Multiply(new float[6], 2, w, default, new float[3])).ParamName);
            Assert.Equal("rows", Assert.Throws<ArgumentOutOfRangeException>(() => MatMul.Multiply(new float[6], -1, w, default, y)).ParamName);
            Assert.Equal("w", Assert.Throws<ArgumentException>(() => MatMul.Multiply(new float[6], 2, default(WeightMatrix), default, y)).ParamName);
        }
    }

    [Fact]
    public void WeightMatrix_rejects_bad_arguments()
    {
        var storage = new float[4];
        fixed (float* pinned = storage)
        {
            float* p = pinned;
            Assert.Equal("dtype", Assert.Throws<ArgumentException>(() => new WeightMatrix(p, DType.I32, 2, 2)).ParamName);
            Assert.Equal("rows", Assert.Throws<ArgumentOutOfRangeException>(() => new WeightMatrix(p, DType.F32, 0, 2)).ParamName);
            Assert.Equal("cols", Assert.Throws<ArgumentOutOfRangeException>(() => new WeightMatrix(p, DType.F32, 2, -1)).ParamName);
            Assert.Equal("data", Assert.Throws<ArgumentNullException>(() => new WeightMatrix(null, DType.F32, 2, 2)).ParamName);
        }
    }

    [Fact]
    public void FromTensor_flattens_trailing_dimensions_and_multiplies_like_the_flat_matrix()
    {
        // A conv-style weight [N, C, H, W] is an N x (C*H*W) matrix.
        const int n = 5, c = 3, h = 2, wd = 4, k = c * h * wd;
        var random = new Random(11);
        var (bytes, decoded) = EncodeWeights(RandomFloats(random, n * k, -1f, 1f), DType.BF16);
        float[] x = RandomFloats(random, 2 * k, -1f, 1f);
        var y = new float[2 * n];
        fixed (byte* p = bytes)
        {
            var tensor = new TensorData("patch.weight", DType.BF16, [n, c, h, wd], p, bytes.Length, "test.safetensors");
            var w = WeightMatrix.FromTensor(tensor);
            Assert.Equal(n, w.Rows);
            Assert.Equal(k, w.Cols);
            Assert.Equal(DType.BF16, w.DType);
            Assert.True(w.Data == p);
            MatMul.Multiply(x, 2, w, default, y);
        }
        for (int m = 0; m < 2; m++)
        {
            for (int j = 0; j < n; j++)
            {
                double sum = 0, magnitude = 0;
                for (int i = 0; i < k; i++)
                {
                    sum += x[m * k + i] * decoded[j * k + i];
                    magnitude += Math.Abs(x[m * k + i] * decoded[j * k + i]);
                }
                AssertClose(sum, y[m * n + j], 1e-5 * magnitude, $"y[{m}, {j}]");
            }
        }
    }

    [Fact]
    public void FromTensor_rejects_unusable_tensors()
    {
        var storage = new byte[64];
        fixed (byte* p = storage)
        {
            var vector = new TensorData("norm.weight", DType.F32, [16], p, 64, "m.safetensors");
            var ints = new TensorData("ids", DType.I32, [4, 4], p, 64, "m.safetensors");
            var shortData = new TensorData("proj.weight", DType.F32, [4, 8], p, 64, "m.safetensors");
            var e1 = Assert.Throws<ArgumentException>(() => WeightMatrix.FromTensor(vector));
            Assert.Equal("tensor", e1.ParamName);
            Assert.Contains("norm.weight", e1.Message);
            Assert.Equal("tensor", Assert.Throws<ArgumentException>(() => WeightMatrix.FromTensor(ints)).ParamName);
            Assert.Contains("proj.weight", Assert.Throws<ArgumentException>(() => WeightMatrix.FromTensor(shortData)).Message);
        }
    }
}
