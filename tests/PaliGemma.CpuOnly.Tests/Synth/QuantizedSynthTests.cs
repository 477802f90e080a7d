using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Synthesis;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Cli;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Synth;

/// <summary><c>paligemma synth --dtype q8|nf4</c>: the quantized layout written directly, on the tiny Gemma 2 config.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class QuantizedSynthTests
{
    private static string TinyConfig => Path.Combine(TestPaths.RepoRoot, "tests", "golden-pg2", "pg2-tiny-56", "config.json");

    private static void SynthCli(string dir, string dtype, ulong seed)
    {
        var (code, stdout, stderr) = CliTests.Run("synth", "--config", TinyConfig, "--out", dir, "--dtype", dtype, "--seed", seed.ToString(System.Globalization.CultureInfo.InvariantCulture), "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        Assert.Contains("wrote", stdout);
    }

    private static bool SameBytes(string a, string b) => File.ReadAllBytes(a).AsSpan().SequenceEqual(File.ReadAllBytes(b));

    [Theory]
    [InlineData("q8")]
    [InlineData("nf4")]
    public void Direct_output_equals_quantize_of_the_bf16_synth_and_generates(string dtype)
    {
        var format = QuantFormats.Parse(dtype)!.Value;
        using var temp = new TempDirectory();
        string direct = temp.File("direct"), bf16 = temp.File("bf16"), quantized = temp.File("quantized");
        SynthCli(direct, dtype, seed: 7);
        SyntheticCheckpoint.Write(TinyConfig, bf16, new SyntheticCheckpointOptions { Seed = 7, DType = DType.BF16 });
        QuantizedCheckpoint.Write(bf16, quantized, format);

        var names = Directory.GetFiles(direct).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
        Assert.Equal(new[] { "config.json", "model.safetensors", "tokenizer.model" }, names);
        foreach (string name in names!)
            Assert.True(SameBytes(Path.Combine(direct, name!), Path.Combine(quantized, name!)), $"{name} differs from quantize's output");

        using (var checkpoint = SafetensorsCheckpoint.Open(direct))
        {
            Assert.Equal(format, QuantizedCheckpoint.FormatOf(checkpoint));
            Assert.True(checkpoint.TryGet(QuantizedCheckpoint.CodesName("language_model.model.embed_tokens.weight", QuantFormat.Q8), out _));
            Assert.True(checkpoint.TryGet(QuantizedCheckpoint.CodesName("language_model.model.layers.0.mlp.down_proj.weight", format), out _));
        }

        using var model = PaliGemmaModel.Load(direct);
        var image = new RgbImage(2, 2, [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
        var result = new PaliGemmaGenerator(model).Generate(new GenerationRequest(image, "caption en"),
            new GenerationOptions { MaxNewTokens = 4, KeepStepLogits = true });
        Assert.InRange(result.GeneratedIds.Length, 1, 4);
        Assert.All(result.StepLogits!, logits => Assert.All(logits, x => Assert.True(float.IsFinite(x), $"logit {x}")));
    }

    [Theory]
    [InlineData("q8")]
    [InlineData("nf4")]
    public void Same_seed_gives_identical_bytes_and_another_seed_other_codes(string dtype)
    {
        using var temp = new TempDirectory();
        SynthCli(temp.File("a"), dtype, seed: 42);
        SynthCli(temp.File("b"), dtype, seed: 42);
        SynthCli(temp.File("c"), dtype, seed: 43);
        foreach (string name in new[] { "config.json", "model.safetensors", "tokenizer.model" })
            Assert.True(SameBytes(Path.Combine(temp.File("a"), name), Path.Combine(temp.File("b"), name)), name);

        using var a = SafetensorsCheckpoint.Open(temp.File("a"));
        using var c = SafetensorsCheckpoint.Open(temp.File("c"));
        Assert.Equal(a.TensorNames.Order(StringComparer.Ordinal), c.TensorNames.Order(StringComparer.Ordinal));
        foreach (string name in a.TensorNames)
            Assert.False(a.Get(name).Bytes.SequenceEqual(c.Get(name).Bytes), $"{name} is the same under seeds 42 and 43");
    }

    [Fact]
    public void Unknown_dtype_is_a_usage_error_naming_the_choices()
    {
        using var temp = new TempDirectory();
        var (code, _, stderr) = CliTests.Run("synth", "--config", TinyConfig, "--out", temp.File("x"), "--dtype", "q4", "--quiet");
        Assert.NotEqual(0, code);
        Assert.Contains("q8 or nf4", stderr);
    }
}
