using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Model;

public sealed class ModelLoadTests
{
    public static TheoryData<string> Cases()
    {
        var data = new TheoryData<string>();
        foreach (var c in GoldenData.CaseNames) data.Add(c);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Config_defaults_equal_the_full_config_transformers_writes(string caseName)
    {
        string dir = Path.Combine(TestPaths.Golden, caseName);
        var minimal = PaliGemmaConfig.Load(Path.Combine(dir, "config.json"));
        var full = PaliGemmaConfig.Load(Path.Combine(dir, "config.full.json"));
        Assert.Equal(full.Vision, minimal.Vision);
        Assert.Equal(full.Text, minimal.Text);
        Assert.Equal(full with { Vision = minimal.Vision, Text = minimal.Text }, minimal);
    }

    [Theory]
    [InlineData("paligemma-3b-pt-224.config.json", 224, 256)]
    [InlineData("paligemma-3b-pt-448.config.json", 448, 1024)]
    [InlineData("paligemma-3b-pt-896.config.json", 896, 4096)]
    public void Full_size_configs_get_the_real_model_shape(string file, int imageSize, int imageTokens)
    {
        var c = PaliGemmaConfig.Load(Path.Combine(TestPaths.Golden, file));
        Assert.Equal(imageSize, c.Vision.ImageSize);
        Assert.Equal(imageTokens, c.NumImageTokens);
        Assert.Equal((1152, 4304, 27, 16, 14), (c.Vision.HiddenSize, c.Vision.IntermediateSize, c.Vision.NumHiddenLayers, c.Vision.NumAttentionHeads, c.Vision.PatchSize));
        Assert.Equal((2048, 16384, 18, 8, 1, 256, 257216), (c.Text.HiddenSize, c.Text.IntermediateSize, c.Text.NumHiddenLayers,
            c.Text.NumAttentionHeads, c.Text.NumKeyValueHeads, c.Text.HeadDim, c.Text.VocabSize));
        Assert.Equal(257152, c.ImageTokenIndex);
        Assert.Equal(1e-6f, c.Text.RmsNormEps);
        Assert.Equal(10000f, c.Text.RopeTheta);
    }

    [Theory]
    [InlineData("{", "invalid config JSON")]
    [InlineData("""{"model_type":"llava"}""", "model_type")]
    [InlineData("""{"text_config":{"model_type":"gemma","num_attention_heads":8,"num_key_value_heads":3}}""", "num_key_value_heads")]
    [InlineData("""{"vision_config":{"image_size":225,"patch_size":14}}""", "patch_size")]
    [InlineData("""{"text_config":{"hidden_size":-5}}""", "text_config.hidden_size")]
    [InlineData("""{"projection_dim":100,"text_config":{"hidden_size":64}}""", "projection_dim")]
    public void Bad_configs_are_rejected_naming_the_key(string json, string mentioned)
    {
        var e = Assert.Throws<InvalidDataException>(() => PaliGemmaConfig.Parse(System.Text.Encoding.UTF8.GetBytes(json), "cfg.json"));
        Assert.Contains("cfg.json", e.Message);
        Assert.Contains(mentioned, e.Message);
    }

    /// <summary>A copy of tiny-mqa-56 with one tensor removed or reshaped must fail at load naming that tensor.</summary>
    [Theory]
    [InlineData("language_model.model.layers.1.mlp.up_proj.weight", "missing")]
    [InlineData("vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.bias", "missing")]
    [InlineData("multi_modal_projector.linear.weight", "reshape")]
    [InlineData("language_model.model.embed_tokens.weight", "reshape")]
    public void Missing_or_misshapen_tensors_fail_at_load_naming_tensor_and_shape(string tensor, string damage)
    {
        string golden = Path.Combine(TestPaths.Golden, "tiny-mqa-56");
        string dir = Path.Combine(Path.GetTempPath(), $"pg-load-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            foreach (var f in new[] { "config.json", "tokenizer.model" }) File.Copy(Path.Combine(golden, f), Path.Combine(dir, f));
            using (var source = SafetensorsFile.Open(Path.Combine(golden, "model.safetensors")))
            {
                var writer = new SafetensorsWriter();
                foreach (var name in source.TensorNames)
                {
                    var t = source.Get(name);
                    if (name == tensor && damage == "missing") continue;
                    long[] shape = name == tensor ? [t.Shape[1], t.Shape[0]] : t.Shape;
                    writer.Add(name, t.DType, shape, t.Bytes);
                }
                writer.WriteTo(Path.Combine(dir, "model.safetensors"));
            }
            var e = Assert.ThrowsAny<Exception>(() => PaliGemmaModel.Load(dir));
            Assert.Contains(tensor, e.Message);
            Assert.Contains(damage == "missing" ? "missing" : "expected", e.Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void A_prompt_longer_than_the_model_positions_is_rejected()
    {
        var model = GoldenData.Model("tiny-mqa-56");
        var image = new PaliGemma.CpuOnly.Model.Imaging.RgbImage(4, 4, new byte[4 * 4 * 3]);
        var e = Assert.Throws<ArgumentException>(() => new PaliGemmaGenerator(model).Generate(
            new GenerationRequest(image, "caption en"), new GenerationOptions { MaxNewTokens = 9000 }));
        Assert.Contains("positions", e.Message);
    }
}
