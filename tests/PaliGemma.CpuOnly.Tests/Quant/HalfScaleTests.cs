using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Synthesis;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Golden;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Quant;

/// <summary>fp16 block scales: rounding, the fp32 fallback for scales outside fp16's range, and older fp32-scale checkpoints.</summary>
public sealed unsafe class HalfScaleTests
{
    [Property(MaxTest = 2000)]
    public void Scale_rounding_equals_the_Half_conversion(uint bits)
    {
        // Every non-negative finite fp32 value, from subnormals to beyond fp16's range.
        float scale = BitConverter.UInt32BitsToSingle(bits & 0x7FFF_FFFFu);
        if (!float.IsFinite(scale)) return;
        float expected = (float)(Half)scale;
        Assert.Equal(expected, Quantizer.RoundScale(scale, DType.F16));
        Assert.Equal(scale, Quantizer.RoundScale(scale, DType.F32));
    }

    [Fact]
    public void Scale_rounding_ties_go_to_even_at_every_range_edge()
    {
        foreach (float scale in new[] { 0f, 65504f, 65519.99f, 65520f, 1f / 16384f, 1f / 32768f, 1.5f / 16777216f, 2.5f / 16777216f,
                     0.5f / 16777216f, 1f + 1f / 2048f, 1f + 3f / 2048f, 2048f + 1f, 1e-30f })
            Assert.Equal((float)(Half)scale, Quantizer.RoundScale(scale, DType.F16));
    }

    private static QuantizedMatrix Quantize(float[] weights, int n, int k, QuantFormat format)
    {
        fixed (float* p = weights)
            return Quantizer.Quantize(new WeightMatrix(p, DType.F32, n, k), format);
    }

    private static float[] Gaussianish(int count, int seed, float scale)
    {
        var random = new Random(seed);
        var values = new float[count];
        for (int i = 0; i < count; i++) values[i] = (float)((random.NextDouble() + random.NextDouble() + random.NextDouble() - 1.5) * scale);
        return values;
    }

    [Theory]
    [InlineData(QuantFormat.Q8)]
    [InlineData(QuantFormat.Nf4)]
    public void Matrices_get_fp16_scales_that_dequantize_like_their_fp32_values(QuantFormat format)
    {
        const int n = 7, k = 200;
        float[] weights = Gaussianish(n * k, 1, 0.05f);
        weights.AsSpan(3 * k, k).Clear(); // an all-zero row: scale 0 fits fp16
        var q = Quantize(weights, n, k, format);
        Assert.Equal(DType.F16, q.ScaleType);
        Assert.Equal((long)n * q.BlocksPerRow * 2, q.ScaleByteCount);
        Assert.Equal(q.BlockByteCount + q.ScaleByteCount, q.StreamedBytes);
        var scales = new float[q.BlocksPerRow];
        var row = new float[k];
        var expected = new float[k];
        for (int r = 0; r < n; r++)
        {
            q.ReadScales(r, scales);
            for (int b = 0; b < scales.Length; b++)
            {
                Assert.Equal(scales[b], q.Scale(r, b));
                Assert.Equal(scales[b], (float)(Half)scales[b]);
            }
            q.DequantizeRow(r, row);
            Quantizer.DequantizeRow(format, q.RowBlocks(r), scales, expected);
            Assert.Equal(expected, row);
        }
    }

    [Theory]
    [InlineData(QuantFormat.Q8, 1e-7f)]   // q8 scale ~8e-10: would round to 0 (or a subnormal of 1 significant bit) in fp16
    [InlineData(QuantFormat.Q8, 2e-3f)]   // q8 scale ~1.6e-5: an fp16 subnormal, rounded by more than 2^-10 of its value
    [InlineData(QuantFormat.Q8, 1e7f)]    // q8 scale ~79000: beyond fp16's 65504
    [InlineData(QuantFormat.Nf4, 1e-6f)]
    [InlineData(QuantFormat.Nf4, 1e5f)]
    public void A_block_whose_scale_does_not_fit_fp16_keeps_the_matrix_in_fp32_scales(QuantFormat format, float magnitude)
    {
        const int n = 5, k = 130;
        float[] weights = Gaussianish(n * k, 2, 0.05f);
        // One block of row 2 holds the out-of-range weights; everything else is ordinary.
        int first = 2 * k + format.BlockSize();
        for (int i = 0; i < format.BlockSize(); i++) weights[first + i] = (i % 3 - 1) * magnitude * (1 + i * 0.01f);
        fixed (float* p = weights)
            Assert.Null(Quantizer.TryQuantize(new WeightMatrix(p, DType.F32, n, k), format, DType.F16));
        var q = Quantize(weights, n, k, format);
        Assert.Equal(DType.F32, q.ScaleType);
        Assert.Equal((long)n * q.BlocksPerRow * 4, q.ScaleByteCount);

        // The outlying block is as accurate as any other: within half a step (q8) / half the largest nf4 gap of its scale.
        var row = new float[k];
        q.DequantizeRow(2, row);
        float scale = q.Scale(2, 1);
        float bound = format == QuantFormat.Q8 ? 0.5f * scale : 0.5f * (1f - 0.6961928f) * scale; // nf4: half its widest gap
        for (int i = 0; i < format.BlockSize(); i++)
            Assert.True(Math.Abs(row[format.BlockSize() + i] - weights[first + i]) <= bound * (1 + 1e-5f), $"element {i}: {weights[first + i]} -> {row[format.BlockSize() + i]}");
    }

    [Fact]
    public void Synthesis_stops_with_an_error_naming_a_tensor_whose_scales_do_not_fit_fp16()
    {
        using var temp = new TempDirectory();
        const string name = "language_model.model.layers.0.mlp.down_proj.weight";
        var tensors = new[]
        {
            new SyntheticTensor("language_model.model.norm.weight", [64], new TensorInit(1f, 0.02f)),
            new SyntheticTensor(name, [8, 64], new TensorInit(0f, 1e-8f)),
        };
        var error = Assert.Throws<InvalidDataException>(() => QuantizedSynthesis.Write(tensors, temp.File("model.safetensors"), QuantFormat.Q8,
            new SyntheticCheckpointOptions { Seed = 1, DType = DType.F32 }, _ => { }, CancellationToken.None));
        Assert.Contains(name, error.Message);
        Assert.Contains("fp16", error.Message);
    }

    /// <summary>
    /// `quantize` on a float checkpoint with one Linear weight scaled below fp16's scale range: that tensor keeps F32
    /// scales (and says so), the others get F16, and the model loads and matches load-time quantization.
    /// </summary>
    [Fact]
    public void Quantize_keeps_fp32_scales_for_a_tensor_whose_blocks_do_not_fit_fp16()
    {
        using var temp = new TempDirectory();
        string source = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
        string scaledSource = temp.File("scaled"), quantized = temp.File("quantized");
        Directory.CreateDirectory(scaledSource);
        const string tiny = "language_model.model.layers.0.mlp.down_proj.weight";
        var writer = new SafetensorsWriter();
        using (var checkpoint = SafetensorsCheckpoint.Open(source))
            foreach (string name in checkpoint.TensorNames)
            {
                var t = checkpoint.Get(name);
                if (name == tiny)
                {
                    float[] values = t.ToFloatArray();
                    for (int i = 0; i < values.Length; i++) values[i] *= 1e-6f;
                    writer.Add(name, DType.F32, t.Shape, System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()));
                }
                else writer.Add(name, t.DType, t.Shape, t.Bytes);
            }
        writer.WriteTo(Path.Combine(scaledSource, "model.safetensors"));
        File.Copy(Path.Combine(source, "config.json"), Path.Combine(scaledSource, "config.json"));

        var log = new List<string>();
        QuantizedCheckpoint.Write(scaledSource, quantized, QuantFormat.Q8, log.Add);
        Assert.Contains(log, line => line.StartsWith(tiny, StringComparison.Ordinal) && line.Contains("F32 scales", StringComparison.Ordinal));
        using (var file = SafetensorsFile.Open(Path.Combine(quantized, "model.safetensors")))
        {
            Assert.Equal(DType.F32, file.Get(QuantizedCheckpoint.ScalesName(tiny, QuantFormat.Q8)).DType);
            Assert.Equal(DType.F16, file.Get(QuantizedCheckpoint.ScalesName("language_model.model.layers.0.mlp.up_proj.weight", QuantFormat.Q8)).DType);
            Assert.Equal(DType.F16, file.Get(QuantizedCheckpoint.ScalesName("language_model.model.embed_tokens.weight", QuantFormat.Q8)).DType);
            Assert.Equal(QuantizedCheckpoint.LayoutVersion, file.Metadata[QuantizedCheckpoint.LayoutKey]);
        }

        string tokenizer = Path.Combine(source, "tokenizer.model");
        using var stored = PaliGemmaModel.Load(quantized, tokenizer);
        using var atLoad = PaliGemmaModel.Load(scaledSource, new PaliGemmaLoadOptions { TokenizerPath = tokenizer, QuantizeTo = QuantFormat.Q8, QuantizeScales = ScaleSelection.MinimumError });
        var image = new PaliGemma.CpuOnly.Model.Imaging.RgbImage(2, 2, [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
        var options = new GenerationOptions { MaxNewTokens = 3, KeepStepLogits = true };
        var a = new PaliGemmaGenerator(stored).Generate(new GenerationRequest(image, "caption en"), options);
        var b = new PaliGemmaGenerator(atLoad).Generate(new GenerationRequest(image, "caption en"), options);
        Assert.Equal(b.GeneratedIds, a.GeneratedIds);
        for (int s = 0; s < a.StepLogits!.Count; s++) Assert.Equal(b.StepLogits![s], a.StepLogits[s]);
    }

    /// <summary>Rewrites a quantized checkpoint's scale tensors with <paramref name="scaleType"/> and its layout tag.</summary>
    private static void RewriteScales(string directory, DType scaleType, string layout, string? onlyTensor = null, Func<TensorData, long[]>? shape = null)
    {
        string path = Path.Combine(directory, "model.safetensors");
        var metadata = QuantizedCheckpoint.Metadata(QuantFormat.Q8);
        metadata[QuantizedCheckpoint.LayoutKey] = layout;
        var writer = new SafetensorsWriter(metadata) { AlignToCacheLines = true };
        using (var file = SafetensorsFile.Open(path))
            foreach (string name in file.TensorNames)
            {
                var t = file.Get(name);
                bool target = name.EndsWith(".q8_scales", StringComparison.Ordinal) && (onlyTensor is null || name == onlyTensor);
                if (!target)
                {
                    writer.Add(name, t.DType, t.Shape, t.Bytes);
                    continue;
                }
                float[] values = t.ToFloatArray();
                long[] newShape = shape?.Invoke(t) ?? t.Shape;
                int count = (int)newShape.Aggregate(1L, (x, y) => x * y);
                var bytes = new byte[count * scaleType.SizeOf()];
                if (scaleType == DType.BF16)
                    for (int i = 0; i < count; i++)
                        System.Buffers.Binary.BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(2 * i), (ushort)(BitConverter.SingleToUInt32Bits(values[i]) >> 16));
                else
                    Quantizer.StoreScales(values.AsSpan(0, Math.Min(count, values.Length)), bytes, scaleType);
                writer.Add(name, scaleType, newShape, bytes);
            }
        writer.WriteTo(path);
    }

    [Fact]
    public void An_older_fp32_scale_checkpoint_loads_and_generates_exactly_as_the_fp16_one()
    {
        using var temp = new TempDirectory();
        string source = Path.Combine(TestPaths.Golden, "tiny-mqa-56"), tokenizer = Path.Combine(source, "tokenizer.model");
        string current = temp.File("fp16"), older = temp.File("fp32");
        QuantizedCheckpoint.Write(source, current, QuantFormat.Q8);
        QuantizedCheckpoint.Write(source, older, QuantFormat.Q8);
        // The same scale values widened to F32 under the v1 layout tag: what a checkpoint of the previous build holds.
        RewriteScales(older, DType.F32, QuantizedCheckpoint.LayoutVersionFp32);

        using var a = PaliGemmaModel.Load(current, tokenizer);
        using var b = PaliGemmaModel.Load(older, tokenizer);
        Assert.Equal(DType.F16, a.Decoder.QuantizedEmbedding!.ScaleType);
        Assert.Equal(DType.F32, b.Decoder.QuantizedEmbedding!.ScaleType);
        Assert.Equal(a.Decoder.QuantizedEmbedding.StreamedBytes + a.Decoder.QuantizedEmbedding.ScaleCount * 2, b.Decoder.QuantizedEmbedding.StreamedBytes);
        var image = new PaliGemma.CpuOnly.Model.Imaging.RgbImage(2, 2, [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
        var options = new GenerationOptions { MaxNewTokens = 4, KeepStepLogits = true };
        var ra = new PaliGemmaGenerator(a).Generate(new GenerationRequest(image, "caption en"), options);
        var rb = new PaliGemmaGenerator(b).Generate(new GenerationRequest(image, "caption en"), options);
        Assert.Equal(ra.GeneratedIds, rb.GeneratedIds);
        for (int s = 0; s < ra.StepLogits!.Count; s++) Assert.Equal(ra.StepLogits[s], rb.StepLogits![s]);
    }

    public static TheoryData<string, string> BadScaleTensors => new()
    {
        { "v1-with-f16", "F32" },
        { "bf16-scales", "F16 or F32" },
        { "missing-block", "blocks per row" },
    };

    [Theory]
    [MemberData(nameof(BadScaleTensors))]
    public void A_scale_tensor_with_a_wrong_dtype_or_count_is_an_error_naming_it(string variant, string expected)
    {
        using var temp = new TempDirectory();
        string source = Path.Combine(TestPaths.Golden, "tiny-mqa-56"), dir = temp.File("q8");
        QuantizedCheckpoint.Write(source, dir, QuantFormat.Q8);
        const string victim = "language_model.model.layers.1.self_attn.o_proj.weight.q8_scales";
        switch (variant)
        {
            case "v1-with-f16":
                // An otherwise valid v1 checkpoint (all F32) with one F16 scale tensor.
                RewriteScales(dir, DType.F32, QuantizedCheckpoint.LayoutVersionFp32);
                RewriteScales(dir, DType.F16, QuantizedCheckpoint.LayoutVersionFp32, victim);
                break;
            case "bf16-scales":
                RewriteScales(dir, DType.BF16, QuantizedCheckpoint.LayoutVersion, victim);
                break;
            default:
                RewriteScales(dir, DType.F16, QuantizedCheckpoint.LayoutVersion, victim, t => [t.Shape[0], t.Shape[1] - 1]);
                break;
        }
        var error = Assert.Throws<InvalidDataException>(() => PaliGemmaModel.Load(dir, Path.Combine(source, "tokenizer.model")));
        Assert.Contains(victim, error.Message);
        Assert.Contains(expected, error.Message);
    }
}
