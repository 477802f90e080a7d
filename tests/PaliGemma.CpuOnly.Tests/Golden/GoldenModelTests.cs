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

    private static int[][] PromptRows(GoldenSample sample)
    {
        var ids = sample.Npy("input_ids");
        var mask = sample.Npy("attention_mask").ToInt64();
        long[] flat = ids.ToInt64();
        int batch = (int)ids.Shape[0], tokens = (int)ids.Shape[1];
        var rows = new int[batch][];
        for (int b = 0; b < batch; b++)
            rows[b] = Enumerable.Range(0, tokens).Where(t => mask[b * tokens + t] != 0).Select(t => (int)flat[b * tokens + t]).ToArray();
        return rows;
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Vision_tower_and_projector_match_the_reference(string caseName, string sampleName)
    {
        var sample = GoldenData.Sample(caseName, sampleName);
        var model = GoldenData.Model(caseName);
        int batch = sample.Images.Length;
        var trace = new VisionTrace();
        var features = model.EncodeImages(sample.Floats("pixel_values"), batch, trace);
        Report("vision_last_hidden_state", Compare.Close("vision_last_hidden_state", $"{sample} vision", trace.LastHiddenState, sample.Floats("vision_last_hidden_state")));
        Report("projector_output", Compare.Close("projector_output_unscaled", $"{sample} projector", trace.ProjectorOutput, sample.Floats("projector_output_unscaled")));
        Report("image_features_scaled", Compare.Close("image_features_scaled", $"{sample} features", features, sample.Floats("image_features_scaled")));
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Decoder_states_and_prefix_logits_match_the_reference(string caseName, string sampleName)
    {
        var sample = GoldenData.Sample(caseName, sampleName);
        var model = GoldenData.Model(caseName);
        var idsArray = sample.Npy("input_ids");
        int batch = (int)idsArray.Shape[0], tokens = (int)idsArray.Shape[1], h = model.Config.Text.HiddenSize, vocab = model.Decoder.VocabSize;
        int[] ids = idsArray.ToInt64().Select(x => (int)x).ToArray();
        byte[] mask = sample.Npy("attention_mask").ToInt64().Select(x => (byte)x).ToArray();
        var features = model.EncodeImages(sample.Floats("pixel_values"), batch);

        // The reference's forward pass uses positions 1..L for every row (padding not accounted).
        int[] positions = new int[batch * tokens];
        for (int i = 0; i < positions.Length; i++) positions[i] = i % tokens + 1;
        var states = new float[model.Config.Text.NumHiddenLayers + 1][];
        var session = new PaliGemmaSession(model, batch, tokens);
        var logits = new float[batch * tokens * vocab];
        session.Prefill(ids, mask, tokens, features, logits, new PrefillOptions
        {
            Positions = positions,
            AllLogits = true,
            Observer = (index, s) => states[index] = s.ToArray(),
        });

        var expectedStates = sample.Floats("decoder_hidden_states");
        int layerSize = batch * tokens * h;
        for (int l = 0; l < states.Length; l++)
            Report($"hidden[{l}]", Compare.Close("decoder_hidden_states", $"{sample} hidden state {l}", states[l], expectedStates.AsSpan(l * layerSize, layerSize)));

        if (sample.HasFile("prefix_logits"))
        {
            Report("prefix_logits", Compare.Close("prefix_logits", $"{sample} prefix logits", logits, sample.Floats("prefix_logits")));
        }
        else
        {
            // long-448 stores only the rows after the image tokens.
            int start = sample.Json.GetProperty("prefix_logits_text_rows_start").GetInt32();
            var rows = logits.AsSpan(start * vocab, (tokens - start) * vocab);
            Report("prefix_logits_text_rows", Compare.Close("prefix_logits", $"{sample} prefix logits (text rows)", rows, sample.Floats("prefix_logits_text_rows")));
        }

        if (sample.HasFile("prefix_logits_generate_positions"))
        {
            // generate()'s own positions: cumsum of the attention mask, which the session computes itself.
            var generateSession = new PaliGemmaSession(model, batch, tokens);
            var generateLogits = new float[batch * tokens * vocab];
            generateSession.Prefill(ids, mask, tokens, features, generateLogits, new PrefillOptions { AllLogits = true });
            var expected = sample.Floats("prefix_logits_generate_positions");
            Report("prefix_logits_generate_positions", Compare.Close("prefix_logits", $"{sample} prefix logits (generate positions)",
                RealRows(generateLogits, mask, vocab), RealRows(expected, mask, vocab)));
        }
    }

    /// <summary>Logit rows of real tokens only: pad rows are never read by generation.</summary>
    private static float[] RealRows(float[] logits, byte[] mask, int vocab) =>
        Enumerable.Range(0, mask.Length).Where(i => mask[i] != 0).SelectMany(i => logits.AsSpan(i * vocab, vocab).ToArray()).ToArray();

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Greedy_generation_matches_the_reference_ids_and_step_logits(string caseName, string sampleName)
    {
        var sample = GoldenData.Sample(caseName, sampleName);
        var model = GoldenData.Model(caseName);
        var generator = new PaliGemmaGenerator(model);
        var results = generator.GenerateFromIds(sample.Floats("pixel_values"), PromptRows(sample),
            new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true });
        CheckGeneration(sample.ToString(), results, sample.FilePath("generated_ids"), sample.FilePath("step_logits"));
    }

    [Theory]
    [MemberData(nameof(GenerationSamples))]
    public void Generation_from_the_image_file_and_prompt_text_gives_the_reference_ids(string caseName, string sampleName)
    {
        var sample = GoldenData.Sample(caseName, sampleName);
        var model = GoldenData.Model(caseName);
        var requests = sample.Images.Zip(sample.Prompts, (image, prompt) =>
            new GenerationRequest(ImageLoader.Load(Path.Combine(sample.CaseDirectory, image)), prompt)).ToList();
        var results = new PaliGemmaGenerator(model).GenerateBatch(requests, new GenerationOptions { MaxNewTokens = sample.MaxNewTokens });
        var expected = sample.Npy("generated_ids");
        int steps = (int)expected.Shape[1];
        long[] flat = expected.ToInt64();
        var promptRows = PromptRows(sample);
        for (int b = 0; b < results.Count; b++)
        {
            Assert.Equal(promptRows[b], results[b].PromptIds);
            Assert.Equal(flat.Skip(b * steps).Take(steps).Select(x => (int)x), results[b].GeneratedIds);
            Assert.Equal(sample.Json.GetProperty("generated_text")[b].GetString(), results[b].Text);
        }
    }

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
