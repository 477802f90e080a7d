using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Cli;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Quant;

/// <summary>The quantize tool's output: loadable, memory-mapped, equal to load-time quantization, and checked on load.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class QuantizedCheckpointTests : IDisposable
{
    private readonly string _temp = Path.Combine(Path.GetTempPath(), "pg-quant-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_temp)) Directory.Delete(_temp, recursive: true);
    }

    // quantize searches each block's scale by default; load-time quantization with the same selection writes the same bytes.
    [Theory]
    [InlineData("tiny-mqa-56", "", QuantFormat.Q8, ScaleSelection.MinimumError)]
    [InlineData("tiny-mqa-56", "sharded", QuantFormat.Nf4, ScaleSelection.MinimumError)]
    [InlineData("tiny-mqa-56", "bf16", QuantFormat.Q8, ScaleSelection.MinimumError)]
    [InlineData("small-mha-84", "", QuantFormat.Nf4, ScaleSelection.MinimumError)]
    [InlineData("tiny-mqa-56", "", QuantFormat.Q8, ScaleSelection.AbsMax)]
    public void Quantize_command_writes_a_mapped_checkpoint_equal_to_load_time_quantization(string caseName, string variant, QuantFormat format, ScaleSelection scales)
    {
        string source = Path.Combine(TestPaths.Golden, caseName, variant);
        string tokenizer = Path.Combine(TestPaths.Golden, caseName, "tokenizer.model");
        string[] scaleOption = scales == ScaleSelection.AbsMax ? ["--quant-scales", "absmax"] : [];
        var (code, _, err) = CliTests.Run(["quantize", "--model", source, "--to", format.Name(), "--out", _temp, "--quiet", .. scaleOption]);
        Assert.True(code == 0, err);
        Assert.True(File.Exists(Path.Combine(_temp, "config.json")));
        Assert.False(File.Exists(Path.Combine(_temp, SafetensorsCheckpoint.IndexFileName)));

        using (var file = SafetensorsFile.Open(Path.Combine(_temp, "model.safetensors")))
        {
            Assert.Equal(format.Name(), file.Metadata[QuantizedCheckpoint.FormatKey]);
            Assert.Equal("q8", file.Metadata[QuantizedCheckpoint.EmbeddingFormatKey]);
            Assert.True(file.Contains("language_model.model.embed_tokens.weight.q8"));
            Assert.False(file.Contains("language_model.model.layers.0.mlp.down_proj.weight"));
            // Norms and biases stay as they were.
            Assert.True(file.Contains("language_model.model.norm.weight"));
            Assert.True(file.Contains("multi_modal_projector.linear.bias"));
        }

        using var stored = PaliGemmaModel.Load(_temp, tokenizer);
        using var atLoad = PaliGemmaModel.Load(source, new PaliGemmaLoadOptions { TokenizerPath = tokenizer, QuantizeTo = format, QuantizeScales = scales });
        Assert.Equal(format, stored.Quantization);
        Assert.False(stored.Decoder.QuantizedEmbedding!.OwnsMemory);
        Assert.True(atLoad.Decoder.QuantizedEmbedding!.OwnsMemory);

        var sample = GoldenData.Samples().First(s => s.Case == caseName && !s.IsBatch && !s.IsSuffix);
        var image = PaliGemma.CpuOnly.Model.Imaging.ImageLoader.Load(Path.Combine(sample.CaseDirectory, sample.Images[0]));
        var options = new GenerationOptions { MaxNewTokens = 4, KeepStepLogits = true };
        var a = new PaliGemmaGenerator(stored).Generate(new GenerationRequest(image, sample.Prompts[0]), options);
        var b = new PaliGemmaGenerator(atLoad).Generate(new GenerationRequest(image, sample.Prompts[0]), options);
        Assert.Equal(b.GeneratedIds, a.GeneratedIds);
        for (int s = 0; s < a.StepLogits!.Count; s++) Assert.Equal(b.StepLogits![s], a.StepLogits[s]);
    }

    [Fact]
    public void A_q8_tensor_with_a_wrong_block_count_is_an_error_naming_it()
    {
        string source = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
        Assert.Equal(0, CliTests.Run("quantize", "--model", source, "--to", "q8", "--out", _temp, "--quiet").Code);
        const string victim = "language_model.model.layers.1.mlp.down_proj.weight.q8";
        // Rewrite the file with one block per row missing from one matrix (scales left consistent, so the codes are caught).
        string path = Path.Combine(_temp, "model.safetensors");
        var writer = new SafetensorsWriter(QuantizedCheckpoint.Metadata(QuantFormat.Q8));
        using (var file = SafetensorsFile.Open(path))
        {
            foreach (string name in file.TensorNames)
            {
                var t = file.Get(name);
                if (name == victim)
                {
                    long rows = t.Shape[0], cols = t.Shape[1] - 32;
                    writer.Add(name, t.DType, [rows, cols], new byte[rows * cols]);
                }
                else writer.Add(name, t.DType, t.Shape, t.Bytes);
            }
        }
        writer.WriteTo(path);
        var error = Assert.Throws<InvalidDataException>(() => PaliGemmaModel.Load(_temp, Path.Combine(source, "tokenizer.model")));
        Assert.Contains(victim, error.Message);
        Assert.Contains("blocks", error.Message);
    }

    [Fact]
    public void Quantized_tensors_in_a_file_without_the_format_metadata_are_rejected()
    {
        string source = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
        Assert.Equal(0, CliTests.Run("quantize", "--model", source, "--to", "nf4", "--out", _temp, "--quiet").Code);
        string path = Path.Combine(_temp, "model.safetensors");
        var writer = new SafetensorsWriter();
        using (var file = SafetensorsFile.Open(path))
            foreach (string name in file.TensorNames)
            {
                var t = file.Get(name);
                writer.Add(name, t.DType, t.Shape, t.Bytes);
            }
        writer.WriteTo(path);
        var error = Assert.Throws<InvalidDataException>(() => PaliGemmaModel.Load(_temp, Path.Combine(source, "tokenizer.model")));
        Assert.Contains(QuantizedCheckpoint.FormatKey, error.Message);
    }

    [Fact]
    public void Dtype_option_and_quantized_folder_disagreeing_is_an_error()
    {
        string source = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
        Assert.Equal(0, CliTests.Run("quantize", "--model", source, "--to", "nf4", "--out", _temp, "--quiet").Code);
        var error = Assert.Throws<InvalidDataException>(() =>
            PaliGemmaModel.Load(_temp, new PaliGemmaLoadOptions { TokenizerPath = Path.Combine(source, "tokenizer.model"), QuantizeTo = QuantFormat.Q8 }));
        Assert.Contains("nf4", error.Message);
        var (code, _, err) = CliTests.Run("quantize", "--model", source, "--to", "q4", "--out", _temp);
        Assert.Equal(2, code);
        Assert.Contains("--to", err);
        (code, _, err) = CliTests.Run("quantize", "--model", source, "--to", "q8", "--quant-scales", "mse", "--out", _temp);
        Assert.Equal(2, code);
        Assert.Contains("--quant-scales", err);
    }

    [Fact]
    public void Eval_quant_reports_cosine_and_agreement_for_a_quantized_folder()
    {
        string source = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
        Assert.Equal(0, CliTests.Run("quantize", "--model", source, "--to", "q8", "--out", _temp, "--quiet").Code);
        var (code, stdout, err) = CliTests.Run("eval-quant", "--model", source, "--quantized", _temp, "--image", Path.Combine(source, "rgb_640x480.png"),
            "--new-tokens", "6", "--quiet");
        Assert.True(code == 0, err);
        var match = System.Text.RegularExpressions.Regex.Match(stdout, @"^q8: prefix logits cosine (\d\.\d+), max relative diff \d\.\d+; top-1 agreement (\d+)/(\d+)");
        Assert.True(match.Success, stdout);
        Assert.InRange(double.Parse(match.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture), 0.99, 1.0);
        Assert.Equal("6", match.Groups[3].Value);
    }
}
