using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Backends;

public enum StoredWeights { F32, BF16, F16, Q8, Nf4 }

public sealed record DeviceMatMulCase(int Rows, int K, int N, StoredWeights Weights, bool Bias, float SoftCap, int XOffset, int Seed);

public static class DeviceMatMulArbitraries
{
    // Row counts on both sides of the GEMV / tiled-GEMM switch (8), odd K (block tails for q8/nf4), odd N.
    public static Arbitrary<DeviceMatMulCase> Cases() => Arb.From(
        from rows in Gen.Frequency((3, Gen.Choose(1, 8)), (2, Gen.Choose(9, 20)))
        from k in Gen.Choose(1, 70)
        from n in Gen.Choose(1, 13)
        from weights in Gen.Elements(StoredWeights.F32, StoredWeights.BF16, StoredWeights.F16, StoredWeights.Q8, StoredWeights.Nf4)
        from bias in Gen.Elements(true, false)
        from softCap in Gen.Elements(0f, 0f, 5f, 30f)
        from xOffset in Gen.Choose(0, 3)
        from seed in Seeds
        select new DeviceMatMulCase(rows, k, n, weights, bias, softCap, xOffset, seed));
}

[Collection(nameof(IlgpuCollection))]
public sealed unsafe class IlgpuMatMulTests(IlgpuFixture fixture)
{
    [Property(Arbitrary = [typeof(DeviceMatMulArbitraries)], MaxTest = 80)]
    public void MatMul_matches_double_reference_for_every_weight_format(DeviceMatMulCase c) => Check(fixture.Backend, c);

    // Several GEMV passes of 4 rows and groups of 4 columns, many 16 x 16 GEMM tiles (2 x 2 threads of 8 x 8), K steps
    // of 128 columns (the width 16-row tiles take) with a tail, and whole q8/nf4 blocks plus a tail.
    [Theory]
    [InlineData(7, 150, 45, StoredWeights.Nf4)]
    [InlineData(37, 150, 21, StoredWeights.Q8)]
    [InlineData(26, 90, 19, StoredWeights.BF16)]
    [InlineData(50, 300, 70, StoredWeights.F16)]
    public void MatMul_matches_reference_on_multi_tile_shapes(int rows, int k, int n, StoredWeights weights) =>
        Check(fixture.Backend, new DeviceMatMulCase(rows, k, n, weights, Bias: true, SoftCap: 0f, XOffset: 1, Seed: rows * 31 + k));

    internal static void Check(IComputeBackend backend, DeviceMatMulCase c)
    {
        var random = new Random(c.Seed);
        float[] x = RandomFloats(random, c.Rows * c.K, -2f, 2f);
        float[] values = RandomFloats(random, c.N * c.K, -2f, 2f);
        float[] bias = c.Bias ? RandomFloats(random, c.N, -3f, 3f) : [];
        var (operand, decoded, pin) = MakeWeights(values, c.N, c.K, c.Weights);
        using var handle = pin;
        // The CPU backend multiplies many rows of q8/nf4 weights on quantized activations (IntegerGemm): its bound adds
        // the rounding of the activations and, for nf4, of the integer code table.
        var integerPath = backend is CpuBackend && operand is QuantizedMatrix quantized ? QuantMatMul.PrefillPath(c.Rows, quantized) : IntegerGemm.Path.None;
        using var scope = new DeviceScope(backend);

        var xs = scope.Upload(x, c.XOffset, slack: 2, fill: float.NaN);
        // One extra row of y must stay untouched.
        var y = scope.Upload(new float[(c.Rows + 1) * c.N].Select(_ => 12345f).ToArray());
        var w = scope.Resident(operand, bias);
        Assert.Equal(c.N, w.Rows);
        Assert.Equal(c.K, w.Cols);
        backend.MatMul(xs, c.Rows, w, y, c.SoftCap);
        float[] result = scope.Download(y);

        for (int m = 0; m < c.Rows; m++)
        {
            for (int j = 0; j < c.N; j++)
            {
                double sum = c.Bias ? bias[j] : 0.0, magnitude = Math.Abs(sum);
                for (int i = 0; i < c.K; i++)
                {
                    double product = x[m * c.K + i] * decoded[j * c.K + i];
                    sum += product;
                    magnitude += Math.Abs(product);
                }
                double expected = c.SoftCap > 0 ? c.SoftCap * Math.Tanh(sum / c.SoftCap) : sum;
                // The quantized kernels' bound, plus the soft-cap kernel's (tanh in fp32).
                double tolerance = 1e-5 * magnitude + 1e-6 + 2e-6 * c.SoftCap;
                if (integerPath != IntegerGemm.Path.None)
                    tolerance += IntegerPathBound((QuantizedMatrix)operand, integerPath, x.AsSpan(m * c.K, c.K), decoded.AsSpan(j * c.K, c.K), j);
                AssertClose(expected, result[m * c.N + j], tolerance, $"y[{m}, {j}] ({c})");
            }
        }
        for (int j = c.Rows * c.N; j < result.Length; j++)
            Assert.Equal(12345f, result[j]);
    }

    /// <summary>
    /// How far the integer GEMM may move one output from the product of the dequantized weights: each activation by half
    /// its block's step (absmax / L), each nf4 weight by half the code table's step (absmax / level), and their product.
    /// </summary>
    private static double IntegerPathBound(QuantizedMatrix w, IntegerGemm.Path path, ReadOnlySpan<float> x, ReadOnlySpan<double> weights, int row)
    {
        double bound = 0;
        for (int b = 0; b * 32 < x.Length; b++)
        {
            int end = Math.Min(x.Length, b * 32 + 32);
            double xMax = 0;
            for (int i = b * 32; i < end; i++) xMax = Math.Max(xMax, Math.Abs(x[i]));
            double xError = xMax / IntegerGemm.ActivationLimit(path) / 2;
            double wError = w.Format == QuantFormat.Nf4 ? w.Scale(row, b / 2) / IntegerGemm.Nf4Level(path) / 2.0 : 0;
            for (int i = b * 32; i < end; i++)
                bound += xError * Math.Abs(weights[i]) + Math.Abs(x[i]) * wError + xError * wError;
        }
        return bound * (1 + 1e-4);
    }

    /// <summary>The weight in the requested storage, the exact value of every stored element, and what keeps it pinned.</summary>
    internal static (IMatrixOperand Operand, double[] Decoded, IDisposable Pin) MakeWeights(float[] values, int n, int k, StoredWeights format)
    {
        if (format is StoredWeights.Q8 or StoredWeights.Nf4)
        {
            QuantizedMatrix q;
            fixed (float* p = values)
                q = Quantizer.Quantize(new WeightMatrix(p, DType.F32, n, k), format == StoredWeights.Q8 ? QuantFormat.Q8 : QuantFormat.Nf4);
            var decoded = new double[n * k];
            var row = new float[k];
            for (int j = 0; j < n; j++)
            {
                q.DequantizeRow(j, row);
                for (int i = 0; i < k; i++) decoded[j * k + i] = row[i];
            }
            return (q, decoded, new Pinned(null));
        }
        var dtype = format switch { StoredWeights.F32 => DType.F32, StoredWeights.BF16 => DType.BF16, _ => DType.F16 };
        var (bytes, exact) = EncodeWeights(values, dtype);
        var pinned = new Pinned(bytes);
        return (new WeightMatrix((void*)pinned.Address, dtype, n, k), exact, pinned);
    }

    internal sealed class Pinned : IDisposable
    {
        private System.Runtime.InteropServices.GCHandle _handle;

        public Pinned(byte[]? bytes)
        {
            if (bytes != null)
                _handle = System.Runtime.InteropServices.GCHandle.Alloc(bytes, System.Runtime.InteropServices.GCHandleType.Pinned);
        }

        public nint Address => _handle.IsAllocated ? _handle.AddrOfPinnedObject() : 0;

        public void Dispose()
        {
            if (_handle.IsAllocated)
                _handle.Free();
        }
    }
}
