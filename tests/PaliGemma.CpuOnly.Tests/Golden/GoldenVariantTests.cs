using PaliGemma.CpuOnly.Tensors;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;

namespace PaliGemma.CpuOnly.Tests.Golden;

/// <summary>The bf16 and sharded copies of tiny-mqa-56, and the training-style suffix score.</summary>
public sealed class GoldenVariantTests(Xunit.Abstractions.ITestOutputHelper output)
{
    private const string Tiny = "tiny-mqa-56";

    public static TheoryData<string> Bf16Samples()
    {
        var data = new TheoryData<string>();
        foreach (var s in GoldenData.CaseJson(Tiny).GetProperty("bf16_weights_upcast_to_f32_references").GetProperty("samples").EnumerateArray())
            data.Add(s.GetProperty("sample").GetString()!);
        return data;
    }

    [Theory]
    [MemberData(nameof(Bf16Samples))]
    public void Bf16_weights_match_the_upcast_reference(string sampleName) =>
        GoldenChecks.Bf16Upcast(GoldenData.CaseJson(Tiny), GoldenData.Sample(Tiny, sampleName), GoldenData.Model(Tiny, "bf16"), "");

    [Fact]
    public void Sharded_checkpoint_gives_results_identical_to_the_single_file() =>
        GoldenChecks.ShardedEqualsSingle(GoldenData.Sample(Tiny, "s1_caption"), GoldenData.Model(Tiny), GoldenData.Model(Tiny, "sharded"));

    [Fact]
    public void Suffix_score_matches_the_reference_loss_and_logits()
    {
        var sample = GoldenData.Sample(Tiny, "t1_suffix_loss");
        var model = GoldenData.Model(Tiny);
        var (prefix, suffix) = model.Tokenizer.BuildPromptWithSuffix(sample.Prompts[0], sample.Json.GetProperty("suffix").GetString()!, model.NumImageTokens);
        Assert.Equal(sample.Npy("input_ids").ToInt64().Select(x => (int)x), prefix.Concat(suffix));

        double loss = new PaliGemmaGenerator(model).Score(sample.Floats("pixel_values"), prefix, suffix, out float[] logits);
        Compare.Close("suffix_logits", "suffix logits", logits, sample.Floats("logits"));
        double expected = sample.Json.GetProperty("loss").GetDouble();
        output.WriteLine($"loss {loss:R} vs reference {expected:R}: relative difference {Math.Abs(loss - expected) / expected:E3}");
        Assert.True(Math.Abs(loss - expected) <= 1e-4 * Math.Abs(expected), $"loss {loss} vs reference {expected}");
    }

    [Fact]
    public void Suffix_score_from_image_and_text_matches_the_reference_loss()
    {
        var sample = GoldenData.Sample(Tiny, "t1_suffix_loss");
        var model = GoldenData.Model(Tiny);
        var image = PaliGemma.CpuOnly.Model.Imaging.ImageLoader.Load(Path.Combine(sample.CaseDirectory, sample.Images[0]));
        double loss = new PaliGemmaGenerator(model).Score(image, sample.Prompts[0], sample.Json.GetProperty("suffix").GetString()!);
        double expected = sample.Json.GetProperty("loss").GetDouble();
        Assert.True(Math.Abs(loss - expected) <= 1e-4 * Math.Abs(expected), $"loss {loss} vs reference {expected}");
    }
}
