using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Tests.Golden;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.GoldenPg2;

/// <summary>
/// Every sample of every PaliGemma 2 case against transformers 4.47.1: vision tower, projector, scaled image features,
/// per-layer decoder states, prefix logits, the attention masks, step logits and greedy ids. Batched (left-padded)
/// samples are checked against the reference's cache-free recompute (see tests/golden-pg2/README.md).
/// </summary>
public sealed class Pg2GoldenModelTests(ITestOutputHelper output)
{
    public static TheoryData<string, string> GenerationSamples() => Pg2Golden.GenerationSamples();

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Vision_tower_and_projector_match_the_reference(string caseName, string sampleName) =>
        GoldenChecks.Vision(Pg2Golden.Sample(caseName, sampleName), Pg2Golden.Model(caseName), "pg2_", Report);

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Decoder_states_and_prefix_logits_match_the_reference(string caseName, string sampleName)
    {
        var model = Pg2Golden.Model(caseName);
        Assert.True(model.Config.Text.IsGemma2);
        GoldenChecks.DecoderStatesAndPrefixLogits(Pg2Golden.Sample(caseName, sampleName), model, "pg2_", Report);
    }

    /// <summary>
    /// The stored masks are what transformers passed to its eager attention, [batch, query, key]. They must equal the rule
    /// the decoder takes its key ranges from (<see cref="AttentionMask"/>), with each row's padding and the layer's window.
    /// </summary>
    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Attention_masks_equal_the_reference_masks_per_layer_kind(string caseName, string sampleName)
    {
        var sample = Pg2Golden.Sample(caseName, sampleName);
        var text = Pg2Golden.Model(caseName).Config.Text;
        int window = text.SlidingWindow!.Value;
        Assert.Equal(window, text.LayerWindow(0));
        Assert.Equal(0, text.LayerWindow(1));
        var ids = sample.Npy("input_ids");
        int batch = (int)ids.Shape[0], tokens = (int)ids.Shape[1];
        byte[] mask = sample.Npy("attention_mask").ToInt64().Select(x => (byte)x).ToArray();
        foreach (var (key, layerWindow) in new[] { ("attn_allowed_sliding_uint8", window), ("attn_allowed_global_uint8", 0) })
        {
            var expected = sample.Npy(key);
            Assert.Equal(new long[] { batch, tokens, tokens }, expected.Shape);
            byte[] expectedBytes = expected.ToUInt8();
            var allowed = new byte[tokens * tokens];
            for (int b = 0; b < batch; b++)
            {
                AttentionMask.BuildAllowed(tokens, tokens, layerWindow, mask.AsSpan(b * tokens, tokens), allowed);
                Assert.True(expectedBytes.AsSpan(b * tokens * tokens, tokens * tokens).SequenceEqual(allowed), $"{sample} {key} row {b}");
            }
        }
        // The sliding masks really drop keys in every sample (the window is smaller than the prompt).
        Assert.True(sample.Json.GetProperty("sliding_window_masked_entries_in_prefix").GetInt32() > 0);
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Greedy_generation_matches_the_reference_ids_and_step_logits(string caseName, string sampleName)
    {
        var sample = Pg2Golden.Sample(caseName, sampleName);
        var model = Pg2Golden.Model(caseName);
        var results = new PaliGemmaGenerator(model).GenerateFromIds(sample.Floats("pixel_values"), Pg2Golden.PromptRows(sample),
            new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true });
        GoldenModelTests.CheckGeneration(sample.ToString(), results, sample.FilePath("generated_ids"), sample.FilePath("step_logits"), "pg2_step_logits");

        // Every decode step runs past the sliding window, so the ring cache has rolled over.
        int window = model.Config.Text.SlidingWindow!.Value;
        Assert.True(results.Max(r => r.PromptIds.Length) > window);
    }

    /// <summary>
    /// transformers 4.47.1's own generate() mis-masks left-padded rows once its sliding cache rolls over (the reference
    /// stores what it returned). Rows it got right must equal ours; rows it got wrong must not, since ours follow the recompute.
    /// </summary>
    [Fact]
    public void Padded_batch_rows_follow_the_recompute_not_the_4_47_1_generate_defect()
    {
        foreach (var sample in Pg2Golden.Samples().Where(s => s.HasFile("hf_generate_generated_ids")))
        {
            var model = Pg2Golden.Model(sample.Case);
            var results = new PaliGemmaGenerator(model).GenerateFromIds(sample.Floats("pixel_values"), Pg2Golden.PromptRows(sample),
                new GenerationOptions { MaxNewTokens = sample.MaxNewTokens });
            var hf = sample.Npy("hf_generate_generated_ids");
            int steps = (int)hf.Shape[1];
            long[] flat = hf.ToInt64();
            var agrees = sample.Json.GetProperty("generate_vs_recompute").GetProperty("generate_ids_equal_recompute_ids_per_row")
                .EnumerateArray().Select(e => e.GetBoolean()).ToArray();
            Assert.Contains(false, agrees);
            for (int b = 0; b < results.Count; b++)
            {
                var theirs = flat.Skip(b * steps).Take(steps).Select(x => (int)x).ToArray();
                Assert.True(agrees[b] == theirs.SequenceEqual(results[b].GeneratedIds), $"{sample} row {b}");
            }
        }
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Generation_from_the_image_file_and_prompt_text_gives_the_reference_ids(string caseName, string sampleName) =>
        GoldenChecks.GenerationFromFiles(Pg2Golden.Sample(caseName, sampleName), Pg2Golden.Model(caseName));

    private void Report(string what, double ratio) => output.WriteLine($"{what}: {ratio:E3}");
}
