using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.Golden;

/// <summary>
/// Every sample of every golden case against the transformers reference: vision tower, projector, scaled image features,
/// per-layer decoder states, prefix logits, step logits and greedy ids.
/// </summary>
public sealed class GoldenModelTests(ITestOutputHelper output)
{
    public static TheoryData<string, string> GenerationSamples()
    {
        var data = new TheoryData<string, string>();
        foreach (var s in GoldenData.Samples().Where(s => !s.IsSuffix)) data.Add(s.Case, s.Name);
        return data;
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Vision_tower_and_projector_match_the_reference(string caseName, string sampleName) =>
        GoldenChecks.Vision(GoldenData.Sample(caseName, sampleName), GoldenData.Model(caseName), "", Report);

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Decoder_states_and_prefix_logits_match_the_reference(string caseName, string sampleName) =>
        GoldenChecks.DecoderStatesAndPrefixLogits(GoldenData.Sample(caseName, sampleName), GoldenData.Model(caseName), "", Report);

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Greedy_generation_matches_the_reference_ids_and_step_logits(string caseName, string sampleName)
    {
        var sample = GoldenData.Sample(caseName, sampleName);
        var model = GoldenData.Model(caseName);
        var generator = new PaliGemmaGenerator(model);
        var results = generator.GenerateFromIds(sample.Floats("pixel_values"), GoldenChecks.PromptRows(sample),
            new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true });
        CheckGeneration(sample.ToString(), results, sample.FilePath("generated_ids"), sample.FilePath("step_logits"));
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Generation_from_the_image_file_and_prompt_text_gives_the_reference_ids(string caseName, string sampleName) =>
        GoldenChecks.GenerationFromFiles(GoldenData.Sample(caseName, sampleName), GoldenData.Model(caseName));

    /// <summary>Greedy ids exact and every step's logits [batch, steps, vocab] within the bound.</summary>
    internal static void CheckGeneration(string what, IReadOnlyList<GenerationResult> results, string idsPath, string stepLogitsPath, string kind = "step_logits")
    {
        var expectedIds = Npy.Read(idsPath);
        int steps = (int)expectedIds.Shape[1];
        long[] ids = expectedIds.ToInt64();
        var stepLogits = Npy.Read(stepLogitsPath);
        float[] expectedLogits = stepLogits.ToFloat32();
        int vocab = (int)stepLogits.Shape[^1];
        for (int b = 0; b < results.Count; b++)
        {
            Assert.Equal(ids.Skip(b * steps).Take(steps).Select(x => (int)x), results[b].GeneratedIds);
            for (int s = 0; s < steps; s++)
                Compare.Close(kind, $"{what} row {b} step {s}", results[b].StepLogits![s], expectedLogits.AsSpan((b * steps + s) * vocab, vocab));
        }
    }

    private void Report(string what, double ratio) => output.WriteLine($"{what}: {ratio:E3}");
}
