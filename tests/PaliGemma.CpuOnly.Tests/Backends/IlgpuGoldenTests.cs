using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tests.Golden;
using PaliGemma.CpuOnly.Tests.Lora;
using PaliGemma.CpuOnly.Tests.Tensors;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.Backends;

/// <summary>
/// Every golden generation sample of PaliGemma 1 and 2 through the ILGPU backend (ILGPU's CPU simulator), with the bounds
/// of the CPU backend: vision tower, projector, image features, every decoder layer's states, prefix logits, greedy ids and
/// step logits, plus the bf16 checkpoint against its upcast reference. The whole model is resident on the device: weights
/// uploaded at load, activations and the KV cache in device buffers.
/// </summary>
[Collection(nameof(IlgpuCollection))]
public sealed class IlgpuGoldenTests(IlgpuFixture fixture, ITestOutputHelper output)
{
    private const string Kind = "ilgpu_";

    public static TheoryData<string, string, string> GenerationSamples()
    {
        var data = new TheoryData<string, string, string>();
        foreach (var root in new[] { TestPaths.Golden, TestPaths.GoldenPg2 })
        {
            foreach (var s in GoldenData.Samples(root).Where(s => !s.IsSuffix))
                data.Add(Path.GetFileName(root), s.Case, s.Name);
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Vision_decoder_states_prefix_logits_and_generation_match_the_reference(string set, string caseName, string sampleName)
    {
        string root = Root(set);
        var sample = GoldenData.Sample(caseName, sampleName, root);
        using var model = Load(Path.Combine(root, caseName), root, caseName);
        Assert.Same(fixture.Backend, model.Backend);

        GoldenChecks.Vision(sample, model, Kind, Report);
        GoldenChecks.DecoderStatesAndPrefixLogits(sample, model, Kind, Report);
        var results = new PaliGemmaGenerator(model).GenerateFromIds(sample.Floats("pixel_values"), GoldenChecks.PromptRows(sample),
            new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true });
        GoldenModelTests.CheckGeneration($"ilgpu {sample}", results, sample.FilePath("generated_ids"), sample.FilePath("step_logits"), Kind + "step_logits");
    }

    public static TheoryData<string, string> Bf16Samples()
    {
        var data = new TheoryData<string, string>();
        foreach (var c in GoldenData.CaseNames)
        {
            if (!GoldenData.CaseJson(c).TryGetProperty("bf16_weights_upcast_to_f32_references", out var bf16)) continue;
            foreach (var s in bf16.GetProperty("samples").EnumerateArray()) data.Add(c, s.GetProperty("sample").GetString()!);
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Bf16Samples))]
    public void Bf16_weights_stay_bf16_on_the_device_and_match_the_upcast_reference(string caseName, string sampleName)
    {
        using var model = Load(Path.Combine(TestPaths.Golden, caseName, "bf16"), TestPaths.Golden, caseName);
        GoldenChecks.Bf16Upcast(GoldenData.CaseJson(caseName), GoldenData.Sample(caseName, sampleName), model, Kind);
    }

    [Fact]
    public void A_merged_lora_adapter_runs_on_the_device_and_matches_the_merged_reference()
    {
        using var model = PaliGemmaModel.Load(LoraGoldenData.BaseDirectory, new PaliGemmaLoadOptions
        {
            MergeAdapterDirectory = LoraGoldenData.AdapterDirectory("lora"),
            Backend = fixture.Backend,
        });
        const string sample = "s1_caption";
        var results = new PaliGemmaGenerator(model).GenerateFromIds(LoraGoldenData.PixelValues(sample), [LoraGoldenData.InputIds(sample)],
            new GenerationOptions { MaxNewTokens = LoraGoldenData.MaxNewTokens(sample), KeepStepLogits = true });
        GoldenModelTests.CheckGeneration($"ilgpu merged lora {sample}", results,
            LoraGoldenData.FilePath("merged", sample, "generated_ids"), LoraGoldenData.FilePath("merged", sample, "step_logits"), Kind + "lora_step_logits");
    }

    [Fact]
    public void Run_time_lora_on_a_device_is_refused_with_a_pointer_to_merging()
    {
        using var model = Load(LoraGoldenData.BaseDirectory, TestPaths.Golden, LoraGoldenData.BaseCase);
        var adapter = model.LoadAdapter(LoraGoldenData.AdapterDirectory("lora"));
        var e = Assert.Throws<NotSupportedException>(() => model.EncodeImages(LoraGoldenData.PixelValues("s1_caption"), 1, null, default, adapter));
        Assert.Contains("merge it at load", e.Message);
        Assert.Contains(fixture.Backend.Name, e.Message);
    }

    private PaliGemmaModel Load(string directory, string root, string caseName) =>
        PaliGemmaModel.Load(directory, new PaliGemmaLoadOptions
        {
            TokenizerPath = Path.Combine(root, caseName, "tokenizer.model"),
            Backend = fixture.Backend,
        });

    private static string Root(string set) => set == Path.GetFileName(TestPaths.GoldenPg2) ? TestPaths.GoldenPg2 : TestPaths.Golden;

    private void Report(string what, double ratio) => output.WriteLine($"{what}: {ratio:E3}");
}
