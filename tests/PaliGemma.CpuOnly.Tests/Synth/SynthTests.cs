using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Synthesis;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Cli;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Synth;

/// <summary><c>paligemma synth</c> and the synthesis library, on the tiny golden config (a checkpoint of about 1 MB).</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class SynthTests
{
    private static string TinyConfig => Path.Combine(TestPaths.Golden, "tiny-mqa-56", "config.json");

    private static SyntheticCheckpointResult Synthesize(string directory, ulong seed = 1, DType dtype = DType.F32, long maxShardBytes = 2_000_000_000) =>
        SyntheticCheckpoint.Write(TinyConfig, directory, new SyntheticCheckpointOptions { Seed = seed, DType = dtype, MaxShardBytes = maxShardBytes });

    private static string GoldenCase(string folder) => Path.Combine(TestPaths.RepoRoot, "tests", folder);

    [Theory]
    [InlineData("golden/tiny-mqa-56")]
    [InlineData("golden/small-mha-84")]
    [InlineData("golden/long-448")]
    [InlineData("golden-pg2/pg2-tiny-56")]
    [InlineData("golden-pg2/pg2-mha-84-sw16")]
    public void Plan_names_and_shapes_match_the_transformers_checkpoints(string caseFolder)
    {
        string dir = GoldenCase(caseFolder);
        var plan = PaliGemmaTensorPlan.For(PaliGemmaConfig.Load(Path.Combine(dir, "config.json")));
        using var checkpoint = SafetensorsCheckpoint.Open(dir);
        Assert.Equal(checkpoint.TensorNames.Order(StringComparer.Ordinal), plan.Select(t => t.Name).Order(StringComparer.Ordinal));
        foreach (var tensor in plan) Assert.Equal(checkpoint.Get(tensor.Name).Shape, tensor.Shape);
    }

    [Theory]
    [InlineData("golden/tiny-mqa-56", "f32")]
    [InlineData("golden/tiny-mqa-56", "bf16")]
    [InlineData("golden/tiny-mqa-56", "f16")]
    [InlineData("golden-pg2/pg2-tiny-56", "bf16")]
    public void Cli_output_loads_and_generates(string caseFolder, string dtype)
    {
        using var temp = new TempDirectory();
        string dir = temp.File("model");
        string config = Path.Combine(GoldenCase(caseFolder), "config.json");
        var (code, stdout, stderr) = CliTests.Run("synth", "--config", config, "--out", dir, "--dtype", dtype, "--seed", "5", "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        Assert.Contains("wrote", stdout);
        Assert.Equal(File.ReadAllBytes(config), File.ReadAllBytes(Path.Combine(dir, "config.json")));

        using var model = PaliGemmaModel.Load(dir);
        Assert.Equal(model.Config.Text.VocabSize, model.Tokenizer.PieceCount);
        Assert.Equal(model.Config.ImageTokenIndex, model.Tokenizer.ImageTokenId);
        Assert.Equal(dtype.ToUpperInvariant(), model.Decoder.EmbeddingDType.ToString().ToUpperInvariant());

        var image = new RgbImage(2, 2, [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
        var result = new PaliGemmaGenerator(model).Generate(new GenerationRequest(image, "caption en"),
            new GenerationOptions { MaxNewTokens = 6, KeepStepLogits = true });
        Assert.InRange(result.GeneratedIds.Length, 1, 6);
        Assert.All(result.StepLogits!, logits => Assert.All(logits, x => Assert.True(float.IsFinite(x) && Math.Abs(x) < 100, $"logit {x}")));
        // Unit-scale logits: a random model is unsure, not saturated.
        var first = result.StepLogits![0];
        double mean = first.Average(), std = Math.Sqrt(first.Average(x => (x - mean) * (x - mean)));
        Assert.InRange(std, 0.2, 5);
    }

    [Fact]
    public void Same_seed_gives_identical_bytes_and_another_seed_other_weights()
    {
        using var temp = new TempDirectory();
        Synthesize(temp.File("a"), seed: 42);
        Synthesize(temp.File("b"), seed: 42);
        Synthesize(temp.File("c"), seed: 43);

        var names = Directory.GetFiles(temp.File("a")).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
        Assert.Equal(new[] { "config.json", "model.safetensors", "tokenizer.model" }, names);
        foreach (string name in names!)
            Assert.True(File.ReadAllBytes(Path.Combine(temp.File("a"), name!)).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(temp.File("b"), name!))), name);

        using var a = SafetensorsCheckpoint.Open(temp.File("a"));
        using var c = SafetensorsCheckpoint.Open(temp.File("c"));
        Assert.Equal(a.TensorNames, c.TensorNames);
        foreach (string name in a.TensorNames)
            Assert.False(a.Get(name).Bytes.SequenceEqual(c.Get(name).Bytes), $"{name} is the same under seeds 42 and 43");
    }

    [Fact]
    public void Small_shard_size_splits_into_files_with_a_consistent_index_and_the_same_tensors()
    {
        using var temp = new TempDirectory();
        const long maxShard = 300_000;
        var single = Synthesize(temp.File("single"), seed: 9);
        var sharded = Synthesize(temp.File("sharded"), seed: 9, maxShardBytes: maxShard);
        Assert.Single(single.WeightFiles);
        Assert.True(sharded.WeightFiles.Count >= 3, $"{sharded.WeightFiles.Count} shards");
        for (int i = 0; i < sharded.WeightFiles.Count; i++)
            Assert.Equal($"model-{i + 1:D5}-of-{sharded.WeightFiles.Count:D5}.safetensors", Path.GetFileName(sharded.WeightFiles[i]));

        using var index = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(temp.File("sharded"), SafetensorsCheckpoint.IndexFileName)));
        Assert.Equal(sharded.TensorBytes, index.RootElement.GetProperty("metadata").GetProperty("total_size").GetInt64());
        var weightMap = index.RootElement.GetProperty("weight_map").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetString());

        using var one = SafetensorsCheckpoint.Open(temp.File("single"));
        using var many = SafetensorsCheckpoint.Open(temp.File("sharded"));
        Assert.Equal(one.TensorNames.Order(StringComparer.Ordinal), weightMap.Keys.Order(StringComparer.Ordinal));
        foreach (string name in one.TensorNames)
        {
            var tensor = many.Get(name);
            Assert.Equal(weightMap[name], Path.GetFileName(tensor.Source));
            Assert.True(one.Get(name).Bytes.SequenceEqual(tensor.Bytes), name);
        }
        // Every shard stays under the limit unless it holds one tensor that alone exceeds it.
        foreach (var file in many.Files)
        {
            long data = file.TensorNames.Sum(n => file.Get(n).ByteLength);
            Assert.True(data <= maxShard || file.TensorNames.Count == 1, $"{Path.GetFileName(file.Path)} holds {data} bytes in {file.TensorNames.Count} tensors");
        }
        using var model = PaliGemmaModel.Load(temp.File("sharded"));
        Assert.Equal(2, model.Config.Text.NumHiddenLayers);
    }

    [Fact]
    public void Tensors_follow_the_planned_distributions()
    {
        using var temp = new TempDirectory();
        Synthesize(temp.File("m"), seed: 3);
        var config = PaliGemmaConfig.Load(TinyConfig);
        using var checkpoint = SafetensorsCheckpoint.Open(temp.File("m"));
        var plan = PaliGemmaTensorPlan.For(config);
        Assert.Equal(plan.Select(t => t.Name).Order(StringComparer.Ordinal), checkpoint.TensorNames.Order(StringComparer.Ordinal));

        int h = config.Text.HiddenSize;
        AssertStatistics(checkpoint, "language_model.model.embed_tokens.weight", 0, 1 / Math.Sqrt(h));
        AssertStatistics(checkpoint, "language_model.model.layers.1.mlp.down_proj.weight", 0, 1 / Math.Sqrt(config.Text.IntermediateSize));
        AssertStatistics(checkpoint, "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", 0, 1 / Math.Sqrt(config.Vision.HiddenSize));
        AssertStatistics(checkpoint, "vision_tower.vision_model.encoder.layers.0.layer_norm1.weight", 1, 0.02, meanTolerance: 0.02);
        AssertStatistics(checkpoint, "language_model.model.norm.weight", 0, 0.02, meanTolerance: 0.02);
    }

    private static void AssertStatistics(SafetensorsCheckpoint checkpoint, string name, double mean, double std, double meanTolerance = 0)
    {
        float[] values = checkpoint.Get(name).ToFloatArray();
        double m = values.Average(), s = Math.Sqrt(values.Average(x => (x - m) * (x - m)));
        double allowedMean = meanTolerance > 0 ? meanTolerance : 4 * std / Math.Sqrt(values.Length);
        Assert.True(Math.Abs(m - mean) <= allowedMean, $"{name}: mean {m}, expected {mean}");
        double stdTolerance = Math.Max(0.05, 4 / Math.Sqrt(2.0 * values.Length));   // 4 standard errors of a sample std
        Assert.True(Math.Abs(s - std) <= stdTolerance * std, $"{name}: std {s}, expected {std}");
        // Irwin-Hall(4) tails stop at √12 σ.
        Assert.All(values, x => Assert.True(Math.Abs(x - mean) <= 3.47 * std, $"{name}: {x}"));
    }

    [Fact]
    public void Chunks_in_reduced_precision_are_the_rounded_fp32_chunk()
    {
        const long elements = SyntheticTensorData.ChunkElements + 1000;
        var init = new TensorInit(0.5f, 2f);
        ulong key = SyntheticTensorData.NameKey("w");
        for (long chunk = 0; chunk < 2; chunk++)
        {
            int count = (int)Math.Min(SyntheticTensorData.ChunkElements, elements - chunk * SyntheticTensorData.ChunkElements);
            var f32 = new byte[count * 4];
            var bf16 = new byte[count * 2];
            var f16 = new byte[count * 2];
            SyntheticTensorData.FillChunk(11, key, chunk, elements, init, DType.F32, f32);
            SyntheticTensorData.FillChunk(11, key, chunk, elements, init, DType.BF16, bf16);
            SyntheticTensorData.FillChunk(11, key, chunk, elements, init, DType.F16, f16);
            var singles = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(f32);
            var brains = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(bf16);
            var halves = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, Half>(f16);
            for (int i = 0; i < count; i++)
            {
                Assert.Equal((Half)singles[i], halves[i]);
                float widened = BitConverter.Int32BitsToSingle(brains[i] << 16);
                // Nearest bf16: no other bf16 value is closer (bf16 spacing at x is 2^(exponent-7)).
                float spacing = MathF.Pow(2, MathF.Floor(MathF.Log2(MathF.Abs(singles[i]))) - 7);
                Assert.True(MathF.Abs(widened - singles[i]) <= spacing / 2, $"{singles[i]} -> {widened}");
            }
        }
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            SyntheticTensorData.FillChunk(11, key, 2, elements, init, DType.F32, new byte[4]));
    }

    [Fact]
    public void Streamed_tensor_is_its_chunks_in_order()
    {
        var tensor = new SyntheticTensor("t", [3, SyntheticTensorData.ChunkElements - 5], new TensorInit(0f, 1f));
        using var streamed = new MemoryStream();
        long reported = 0;
        SyntheticTensorData.WriteTensor(streamed, 77, tensor, DType.BF16, n => reported += n);
        Assert.Equal(tensor.ByteLength(DType.BF16), streamed.Length);
        Assert.Equal(streamed.Length, reported);

        long elements = tensor.ElementCount;
        var expected = new byte[elements * 2];
        for (long chunk = 0; chunk < SyntheticTensorData.ChunkCount(elements); chunk++)
        {
            long start = chunk * SyntheticTensorData.ChunkElements;
            int count = (int)Math.Min(SyntheticTensorData.ChunkElements, elements - start);
            SyntheticTensorData.FillChunk(77, SyntheticTensorData.NameKey("t"), chunk, elements, tensor.Init, DType.BF16, expected.AsSpan((int)start * 2, count * 2));
        }
        Assert.True(expected.AsSpan().SequenceEqual(streamed.ToArray()));
    }

    [Fact]
    public void A_given_tokenizer_is_copied_when_it_fits_the_config()
    {
        using var temp = new TempDirectory();
        string golden = Path.Combine(TestPaths.Golden, "tiny-mqa-56", "tokenizer.model");
        SyntheticCheckpoint.Write(TinyConfig, temp.File("m"), new SyntheticCheckpointOptions { TokenizerPath = golden });
        Assert.Equal(File.ReadAllBytes(golden), File.ReadAllBytes(temp.File("m/tokenizer.model")));

        // <image> at 257152 does not match the tiny config's image_token_index 2299.
        string big = temp.File("big.model");
        File.WriteAllBytes(big, SyntheticTokenizer.Build(257216, 257152));
        var (code, _, stderr) = CliTests.Run("synth", "--config", TinyConfig, "--out", temp.File("n"), "--vocab-tokenizer", big, "--quiet");
        Assert.Equal(1, code);
        Assert.Contains("image_token_index", stderr);
        Assert.False(Directory.Exists(temp.File("n")) && Directory.EnumerateFiles(temp.File("n")).Any());
    }

    [Fact]
    public void Synthetic_tokenizer_has_paligemmas_layout_and_decodes_every_id()
    {
        // The released 224 config: 257216 embedding rows, <image> = 257152, <loc0000> = 256000 as in the real tokenizer.
        var tokenizer = PaliGemma.CpuOnly.Model.Text.PaliGemmaTokenizer.Load(new MemoryStream(SyntheticTokenizer.Build(257216, 257152)), "synthetic");
        Assert.Equal(257216, tokenizer.PieceCount);
        Assert.Equal(257152, tokenizer.ImageTokenId);
        Assert.Equal((0, 1, 2), (tokenizer.PadId, tokenizer.EosId, tokenizer.BosId));
        Assert.Equal(256000, tokenizer.PieceToId("<loc0000>"));
        Assert.Equal(257151, tokenizer.PieceToId("<seg127>"));

        const string text = "detect cat; <loc0012><seg003> Zürich\n";
        int[] ids = tokenizer.Encode(text);
        Assert.Equal(text, tokenizer.Decode(ids));
        Assert.Contains(256012, ids);
        Assert.Contains(257027, ids);
        Assert.True(ids.Length < text.Length, $"{ids.Length} ids for {text.Length} characters: merges are not applied");
        for (int id = 0; id < tokenizer.PieceCount; id += 97) Assert.NotNull(tokenizer.DecodeToken(id));
        Assert.NotNull(tokenizer.DecodeToken(257215));
    }

    [Fact]
    public void Synthetic_tokenizer_puts_markers_after_image_when_there_is_no_room_before()
    {
        int min = SyntheticTokenizer.MinimumVocabSize;
        int image = min - 1153;
        var tokenizer = PaliGemma.CpuOnly.Model.Text.PaliGemmaTokenizer.Load(new MemoryStream(SyntheticTokenizer.Build(min, image)), "small");
        Assert.Equal(image, tokenizer.ImageTokenId);
        Assert.Equal(image + 1, tokenizer.PieceToId("<loc0000>"));
        Assert.Equal(min, tokenizer.PieceCount);
        Assert.Throws<ArgumentOutOfRangeException>(() => SyntheticTokenizer.Build(min - 1, image));
        Assert.Throws<ArgumentOutOfRangeException>(() => SyntheticTokenizer.Build(min + 10, 5));
    }

    [Fact]
    public void Cli_refuses_to_overwrite_without_force_and_rejects_bad_options()
    {
        using var temp = new TempDirectory();
        string dir = temp.File("m");
        Assert.Equal(0, CliTests.Run("synth", "--config", TinyConfig, "--out", dir, "--quiet", "--shard-size", "0.3MB").Code);
        int before = Directory.GetFiles(dir, "model-*").Length;
        Assert.True(before > 1);

        var (code, _, stderr) = CliTests.Run("synth", "--config", TinyConfig, "--out", dir, "--quiet");
        Assert.Equal(1, code);
        Assert.Contains("already holds checkpoint files", stderr);

        // --force replaces the whole checkpoint: no stale shards next to the new single file.
        Assert.Equal(0, CliTests.Run("synth", "--config", TinyConfig, "--out", dir, "--quiet", "--force").Code);
        Assert.Empty(Directory.GetFiles(dir, "model-*"));
        Assert.False(File.Exists(Path.Combine(dir, SafetensorsCheckpoint.IndexFileName)));
        Assert.True(File.Exists(Path.Combine(dir, SafetensorsCheckpoint.SingleFileName)));

        Assert.Equal(2, CliTests.Run("synth", "--config", TinyConfig, "--out", temp.File("x"), "--dtype", "int8").Code);
        Assert.Equal(2, CliTests.Run("synth", "--config", TinyConfig, "--out", temp.File("x"), "--shard-size", "2XB").Code);
        Assert.Equal(2, CliTests.Run("synth", "--out", temp.File("x")).Code);
        Assert.Equal(1, CliTests.Run("synth", "--config", temp.File("missing.json"), "--out", temp.File("x")).Code);
    }
}
