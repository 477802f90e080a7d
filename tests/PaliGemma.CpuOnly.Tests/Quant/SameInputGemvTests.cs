using System.Numerics.Tensors;
using System.Runtime.Intrinsics.X86;
using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Lora;

namespace PaliGemma.CpuOnly.Tests.Quant;

/// <summary>One fused group: format, K, and per member its N, bias and scale type.</summary>
public sealed record SameInputCase(QuantFormat Format, int K, int[] Ns, bool[] Biases, DType[] ScaleTypes, int Seed)
{
    public override string ToString() => $"{Format} K={K} N=[{string.Join(',', Ns)}] bias=[{string.Join(',', Biases)}] scales=[{string.Join(',', ScaleTypes)}] seed={Seed}";
}

public static class SameInputArbitraries
{
    // K inside and across blocks (partial blocks, odd nf4 block counts); 1 to 6 members (more than one batch of 4), each
    // N below a 4-row step up to several work items.
    public static Arbitrary<SameInputCase> Cases() => Arb.From(
        from format in Gen.Elements(QuantFormat.Q8, QuantFormat.Nf4)
        from k in Gen.OneOf(Gen.Choose(1, 200), Gen.Choose(500, 700))
        from count in Gen.Choose(1, 6)
        from ns in Gen.ArrayOf(Gen.OneOf(Gen.Choose(1, 40), Gen.Choose(60, 300)), count)
        from biases in Gen.ArrayOf(Gen.Elements(true, false), count)
        from scales in Gen.ArrayOf(Gen.Elements(DType.F16, DType.F32), count)
        from seed in Gen.Choose(0, int.MaxValue)
        select new SameInputCase(format, k, ns, biases, scales, seed));
}

/// <summary>
/// The fused one-token GEMV of several quantized matrices on one x (<see cref="IComputeBackend.MatMulSameInput"/>): bit
/// for bit what one call per matrix gives, in the kernel, through the CPU backend, and in whole quantized models.
/// </summary>
public sealed unsafe class SameInputGemvTests
{
    private static bool Supported => Avx512F.IsSupported && Avx512BW.IsSupported;
    private const float Sentinel = 12345f;

    [Property(Arbitrary = [typeof(SameInputArbitraries)], MaxTest = 60)]
    public void Fused_one_token_gemvs_are_bit_identical_to_one_call_each(SameInputCase c)
    {
        if (!Supported)
            return;
        var random = new Random(c.Seed);
        float[] x = QuantKernelTests.RandomFloats(random, c.K, 2f);
        // A zero block and an outlier: the zero scale and coarse codes take the same route in both.
        if (c.K > 100) { Array.Clear(x, 0, 32); x[70] = 250f; }
        var matrices = new QuantizedMatrix[c.Ns.Length];
        var biases = new float[c.Ns.Length][];
        for (int i = 0; i < matrices.Length; i++)
        {
            matrices[i] = QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, c.Ns[i] * c.K, 1f), c.Ns[i], c.K, c.Format, c.ScaleTypes[i]);
            biases[i] = c.Biases[i] ? QuantKernelTests.RandomFloats(random, c.Ns[i], 3f) : [];
        }
        CheckBitIdentical(x, matrices, biases);
    }

    [Theory]
    [InlineData(QuantFormat.Q8)]
    [InlineData(QuantFormat.Nf4)]
    public void A_group_above_the_parallel_threshold_is_bit_identical_too(QuantFormat format)
    {
        if (!Supported)
            return;
        // 1.4 M weights: the group runs on the worker pool (q's items first, then the small k and v's).
        const int k = 1090;
        var random = new Random(11);
        float[] x = QuantKernelTests.RandomFloats(random, k, 1f);
        int[] ns = [1030, 130, 130];
        var matrices = ns.Select(n => QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, n * k, 1f), n, k, format, DType.F16)).ToArray();
        CheckBitIdentical(x, matrices, [QuantKernelTests.RandomFloats(random, ns[0], 1f), [], []]);
    }

    private static void CheckBitIdentical(float[] x, QuantizedMatrix[] matrices, float[][] biases)
    {
        var fused = new float[matrices.Length][];
        var products = new HostProduct[matrices.Length];
        for (int i = 0; i < matrices.Length; i++)
        {
            fused[i] = new float[matrices[i].Rows + 1];
            Array.Fill(fused[i], Sentinel);
            products[i] = new HostProduct(matrices[i], biases[i], fused[i].AsMemory(0, matrices[i].Rows));
        }
        Assert.True(QuantMatMul.TryMultiplySameInput(x, 1, products, QuantMatMul.GemvPath.Vector512));
        for (int i = 0; i < matrices.Length; i++)
        {
            var separate = new float[matrices[i].Rows];
            QuantMatMul.Multiply(x, 1, matrices[i], biases[i], separate, 0f, QuantMatMul.GemvPath.Vector512);
            for (int n = 0; n < separate.Length; n++)
                Assert.True(BitConverter.SingleToInt32Bits(separate[n]) == BitConverter.SingleToInt32Bits(fused[i][n]),
                    $"matrix {i} ({matrices[i]}), y[{n}]: fused {fused[i][n]:R}, one call {separate[n]:R}");
            Assert.Equal(Sentinel, fused[i][^1]);
        }
    }

    [Fact]
    public void Groups_the_fused_kernel_does_not_take_are_declined_untouched()
    {
        var random = new Random(3);
        const int k = 96;
        float[] x = QuantKernelTests.RandomFloats(random, 2 * k, 1f);
        QuantizedMatrix Make(QuantFormat format, int cols) => QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, 8 * cols, 1f), 8, cols, format, DType.F16);
        var q8 = Make(QuantFormat.Q8, k);
        var y0 = new float[16];
        var y1 = new float[16];
        Array.Fill(y0, Sentinel);
        Array.Fill(y1, Sentinel);
        bool Try(IMatrixOperand second, int rows, QuantMatMul.GemvPath path = QuantMatMul.GemvPath.Vector512) =>
            QuantMatMul.TryMultiplySameInput(x, rows, [new HostProduct(q8, default, y0), new HostProduct(second, default, y1)], path);

        Assert.False(Try(Make(QuantFormat.Nf4, k), 1));        // another format
        Assert.False(Try(Make(QuantFormat.Q8, k + 32), 1));    // another K
        Assert.False(Try(Make(QuantFormat.Q8, k), 2));         // two x rows: the fp32-activation GEMV
        Assert.False(Try(Make(QuantFormat.Q8, k), 1, QuantMatMul.GemvPath.Vector256));
        fixed (float* w = QuantKernelTests.RandomFloats(random, 8 * k, 1f))
            Assert.False(Try(new WeightMatrix(w, DType.F32, 8, k), 1));   // not quantized
        Assert.All(y0, v => Assert.Equal(Sentinel, v));
        Assert.All(y1, v => Assert.Equal(Sentinel, v));
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public void Cpu_backend_same_input_products_equal_one_matmul_each_for_mixed_weights(int rows)
    {
        // A bf16-style float weight among quantized ones: the backend falls back to one MatMul each, whatever the group.
        var backend = CpuBackend.Instance;
        var random = new Random(5 + rows);
        const int k = 200;
        float[] floatWeights = QuantKernelTests.RandomFloats(random, 24 * k, 1f);
        fixed (float* w = floatWeights)
        {
            IMatrixOperand[] operands =
            [
                QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, 70 * k, 1f), 70, k, QuantFormat.Nf4, DType.F16),
                QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, 9 * k, 1f), 9, k, QuantFormat.Nf4, DType.F32),
                new WeightMatrix(w, DType.F32, 24, k),
            ];
            foreach (var group in new[] { operands[..2], operands })
            {
                var resident = group.Select((o, i) => backend.Upload(o, i == 0 ? QuantKernelTests.RandomFloats(random, o.Rows, 1f) : [])).ToArray();
                using var x = backend.Allocate(rows * k);
                backend.Write(QuantKernelTests.RandomFloats(random, rows * k, 1f), x.Span);
                var fused = resident.Select(r => backend.Allocate(rows * r.Rows)).ToArray();
                var separate = resident.Select(r => backend.Allocate(rows * r.Rows)).ToArray();
                ((IComputeBackend)backend).MatMulSameInput(x.Span, rows, resident, fused.Select(b => b.Span).ToArray());
                for (int i = 0; i < resident.Length; i++)
                {
                    backend.MatMul(x.Span, rows, resident[i], separate[i].Span);
                    Assert.True(fused[i].Span.HostSpan.SequenceEqual(separate[i].Span.HostSpan), $"group of {group.Length}, product {i}");
                }
            }
        }
    }

    [Fact]
    public void Mismatched_groups_are_refused_with_a_clear_message()
    {
        var backend = CpuBackend.Instance;
        var random = new Random(9);
        var a = backend.Upload(QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, 8 * 64, 1f), 8, 64, QuantFormat.Q8, DType.F16), []);
        var b = backend.Upload(QuantKernelTests.QuantizeF32(QuantKernelTests.RandomFloats(random, 8 * 96, 1f), 8, 96, QuantFormat.Q8, DType.F16), []);
        using var x = backend.Allocate(96);
        using var y = backend.Allocate(8);
        var e = Assert.Throws<ArgumentException>(() => backend.MatMulSameInput(x.Span, 1, [a, b], [y.Span, y.Span]));
        Assert.Contains("K = 96", e.Message);
        e = Assert.Throws<ArgumentException>(() => backend.MatMulSameInput(x.Span, 1, [a, a], [y.Span]));
        Assert.Contains("2 weights but 1 outputs", e.Message);
    }

    /// <summary>
    /// Whole quantized golden models: decode logits with the CPU backend's fused q/k/v and gate/up equal, bit for bit,
    /// those of the same model on a pass-through backend that keeps the seam's default (one MatMul per weight); with and
    /// without a run-time LoRA adapter (its terms are added after the fused products).
    /// </summary>
    [Theory]
    [InlineData(QuantFormat.Q8, false)]
    [InlineData(QuantFormat.Nf4, false)]
    [InlineData(QuantFormat.Q8, true)]
    public void Quantized_model_decode_logits_are_bit_identical_with_and_without_fusion(QuantFormat format, bool adapter)
    {
        string dir = LoraGoldenData.BaseDirectory;
        PaliGemmaModel Load(IComputeBackend? backend) => PaliGemmaModel.Load(dir, new PaliGemmaLoadOptions
        {
            TokenizerPath = Path.Combine(dir, "tokenizer.model"), QuantizeTo = format, Backend = backend,
        });
        using var fusedModel = Load(null);
        using var unfusedModel = Load(new UnfusedBackend(CpuBackend.Instance));
        var fusedAdapter = adapter ? fusedModel.LoadAdapter(LoraGoldenData.AdapterDirectory("lora")) : null;
        var unfusedAdapter = adapter ? unfusedModel.LoadAdapter(LoraGoldenData.AdapterDirectory("lora")) : null;

        int[] ids = fusedModel.Tokenizer.BuildPrompt("caption en", fusedModel.NumImageTokens);
        var random = new Random(2);
        float[] pixels = QuantKernelTests.RandomFloats(random, 3 * fusedModel.ImageSize * fusedModel.ImageSize, 1f);
        const int steps = 8;
        var fused = new PaliGemmaSession(fusedModel, 1, ids.Length + steps + 1, fusedAdapter);
        var unfused = new PaliGemmaSession(unfusedModel, 1, ids.Length + steps + 1, unfusedAdapter);
        var fusedLogits = new float[fused.VocabSize];
        var unfusedLogits = new float[unfused.VocabSize];
        byte[] mask = Enumerable.Repeat((byte)1, ids.Length).ToArray();
        fused.Prefill(ids, mask, ids.Length, fusedModel.EncodeImages(pixels, 1, adapter: fusedAdapter), fusedLogits);
        unfused.Prefill(ids, mask, ids.Length, unfusedModel.EncodeImages(pixels, 1, adapter: unfusedAdapter), unfusedLogits);
        for (int step = 0; step < steps; step++)
        {
            int next = TensorPrimitives.IndexOfMax(fusedLogits);
            fused.Decode([next], fusedLogits);
            unfused.Decode([next], unfusedLogits);
            Assert.True(fusedLogits.AsSpan().SequenceEqual(unfusedLogits), $"{format}, adapter {adapter}: decode step {step} logits differ");
        }
    }

    /// <summary>Runs everything on another backend but keeps <see cref="IComputeBackend.MatMulSameInput"/>'s default.</summary>
    private sealed class UnfusedBackend(IComputeBackend inner) : IComputeBackend
    {
        public string Name => "unfused " + inner.Name;
        public bool IsHost => inner.IsHost;
        public DeviceBuffer Allocate(long length) => inner.Allocate(length);
        public void Write(ReadOnlySpan<float> source, DeviceSpan destination) => inner.Write(source, destination);
        public void Read(DeviceSpan source, Span<float> destination) => inner.Read(source, destination);
        public ResidentMatrix Upload(IMatrixOperand weight, ReadOnlySpan<float> bias) => new Wrapped(this, weight, inner.Upload(weight, bias), bias.Length);
        public void MatMul(DeviceSpan x, int rows, ResidentMatrix weight, DeviceSpan y, float outputSoftCap = 0f) =>
            inner.MatMul(x, rows, ((Wrapped)weight).Inner, y, outputSoftCap);
        public void Copy(DeviceSpan source, DeviceSpan destination) => inner.Copy(source, destination);
        public void Add(DeviceSpan a, DeviceSpan b, DeviceSpan destination) => inner.Add(a, b, destination);
        public void Scale(DeviceSpan x, float factor, DeviceSpan destination) => inner.Scale(x, factor, destination);
        public void GeluTanh(DeviceSpan x, DeviceSpan y) => inner.GeluTanh(x, y);
        public void GeluTanhMul(DeviceSpan gate, DeviceSpan up, DeviceSpan y) => inner.GeluTanhMul(gate, up, y);
        public void RmsNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan weight, float eps, bool unitOffset) => inner.RmsNorm(x, y, rows, dim, weight, eps, unitOffset);
        public void LayerNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan gamma, DeviceSpan beta, float eps) => inner.LayerNorm(x, y, rows, dim, gamma, beta, eps);
        public void Rope(DeviceSpan x, int rows, int heads, int headDim, int rowStride, ReadOnlySpan<int> positions, float theta) => inner.Rope(x, rows, heads, headDim, rowStride, positions, theta);
        public void Attention(scoped in DeviceAttentionProblem problem) => inner.Attention(problem);

        private sealed class Wrapped(IComputeBackend backend, IMatrixOperand source, ResidentMatrix inner, int biasLength) : ResidentMatrix(backend, source, biasLength)
        {
            public ResidentMatrix Inner { get; } = inner;
        }
    }
}
