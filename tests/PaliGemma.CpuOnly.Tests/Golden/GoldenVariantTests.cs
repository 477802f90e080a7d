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
    public void Bf16_weights_match_the_upcast_reference(string sampleName)
    {
        var reference = GoldenData.CaseJson(Tiny).GetProperty("bf16_weights_upcast_to_f32_references").GetProperty("samples")
            .EnumerateArray().Single(s => s.GetProperty("sample").GetString() == sampleName);
        var sample = GoldenData.Sample(Tiny, sampleName);
        var model = GoldenData.Model(Tiny, "bf16");
        Assert.Equal(DType.BF16, model.Decoder.EmbeddingDType);
        string dir = sample.CaseDirectory;

        int[] ids = sample.Npy("input_ids").ToInt64().Select(x => (int)x).ToArray();
        var features = model.EncodeImages(sample.Floats("pixel_values"), 1);
        var session = new PaliGemmaSession(model, 1, ids.Length);
        var logits = new float[ids.Length * model.Decoder.VocabSize];
        session.Prefill(ids, default, ids.Length, features, logits, new PrefillOptions { AllLogits = true });
        Compare.Close("bf16up_prefix_logits", $"bf16 {sampleName} prefix logits", logits,
            Npy.Read(Path.Combine(dir, reference.GetProperty("prefix_logits").GetString()!)).ToFloat32());

        var results = new PaliGemmaGenerator(model).GenerateFromIds(sample.Floats("pixel_values"), [ids],
            new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true });
        GoldenModelTests.CheckGeneration($"bf16 {sampleName}", results,
            Path.Combine(dir, reference.GetProperty("generated_ids").GetString()!),
            Path.Combine(dir, reference.GetProperty("step_logits").GetString()!), "bf16up_step_logits");
    }

    [Fact]
    public void Sharded_checkpoint_gives_results_identical_to_the_single_file()
    {
        var sample = GoldenData.Sample(Tiny, "s1_caption");
        var single = GoldenData.Model(Tiny);
        var sharded = GoldenData.Model(Tiny, "sharded");
        var options = new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true };
        int[] ids = sample.Npy("input_ids").ToInt64().Select(x => (int)x).ToArray();
        var a = new PaliGemmaGenerator(single).GenerateFromIds(sample.Floats("pixel_values"), [ids], options)[0];
        var b = new PaliGemmaGenerator(sharded).GenerateFromIds(sample.Floats("pixel_values"), [ids], options)[0];
        Assert.Equal(a.GeneratedIds, b.GeneratedIds);
        for (int s = 0; s < a.StepLogits!.Count; s++) Assert.Equal(a.StepLogits[s], b.StepLogits![s]);
    }

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
