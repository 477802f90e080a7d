using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;

namespace PaliGemma.CpuOnly.Tests.Golden;

/// <summary>
/// The per-sample reference checks both golden sets (PaliGemma 1 and 2) run: <paramref name="kindPrefix"/> keeps their
/// ratios apart in golden-ratios.tsv, <paramref name="report"/> receives each ratio for the test output.
/// </summary>
internal static class GoldenChecks
{
    /// <summary>Each row's prompt ids without the left padding.</summary>
    public static int[][] PromptRows(GoldenSample sample)
    {
        var ids = sample.Npy("input_ids");
        long[] mask = sample.Npy("attention_mask").ToInt64();
        long[] flat = ids.ToInt64();
        int batch = (int)ids.Shape[0], tokens = (int)ids.Shape[1];
        var rows = new int[batch][];
        for (int b = 0; b < batch; b++)
            rows[b] = Enumerable.Range(0, tokens).Where(t => mask[b * tokens + t] != 0).Select(t => (int)flat[b * tokens + t]).ToArray();
        return rows;
    }

    /// <summary>SigLIP output, projector output and scaled image features.</summary>
    public static void Vision(GoldenSample sample, PaliGemmaModel model, string kindPrefix, Action<string, double> report)
    {
        var trace = new VisionTrace();
        var features = model.EncodeImages(sample.Floats("pixel_values"), sample.Images.Length, trace);
        report("vision_last_hidden_state", Compare.Close(kindPrefix + "vision_last_hidden_state", $"{sample} vision", trace.LastHiddenState, sample.Floats("vision_last_hidden_state")));
        report("projector_output", Compare.Close(kindPrefix + "projector_output_unscaled", $"{sample} projector", trace.ProjectorOutput, sample.Floats("projector_output_unscaled")));
        report("image_features_scaled", Compare.Close(kindPrefix + "image_features_scaled", $"{sample} features", features, sample.Floats("image_features_scaled")));
    }

    /// <summary>
    /// Every decoder layer's hidden states and the prefix logits with the reference's positions (1..L on every row, padding
    /// not accounted), then, where stored, the prefix logits with generate()'s own positions, which the session computes.
    /// </summary>
    public static void DecoderStatesAndPrefixLogits(GoldenSample sample, PaliGemmaModel model, string kindPrefix, Action<string, double> report)
    {
        var idsArray = sample.Npy("input_ids");
        int batch = (int)idsArray.Shape[0], tokens = (int)idsArray.Shape[1], h = model.Config.Text.HiddenSize, vocab = model.Decoder.VocabSize;
        int[] ids = idsArray.ToInt64().Select(x => (int)x).ToArray();
        byte[] mask = sample.Npy("attention_mask").ToInt64().Select(x => (byte)x).ToArray();
        var features = model.EncodeImages(sample.Floats("pixel_values"), batch);

        int[] positions = new int[batch * tokens];
        for (int i = 0; i < positions.Length; i++) positions[i] = i % tokens + 1;
        var states = new float[model.Config.Text.NumHiddenLayers + 1][];
        var logits = new float[batch * tokens * vocab];
        new PaliGemmaSession(model, batch, tokens).Prefill(ids, mask, tokens, features, logits, new PrefillOptions
        {
            Positions = positions,
            AllLogits = true,
            Observer = (index, s) => states[index] = s.ToArray(),
        });

        var expectedStates = sample.Floats("decoder_hidden_states");
        int layerSize = batch * tokens * h;
        for (int l = 0; l < states.Length; l++)
            report($"hidden[{l}]", Compare.Close(kindPrefix + "decoder_hidden_states", $"{sample} hidden state {l}", states[l], expectedStates.AsSpan(l * layerSize, layerSize)));

        if (sample.HasFile("prefix_logits"))
        {
            report("prefix_logits", Compare.Close(kindPrefix + "prefix_logits", $"{sample} prefix logits", logits, sample.Floats("prefix_logits")));
        }
        else
        {
            // long-448 stores only the rows after the image tokens.
            int start = sample.Json.GetProperty("prefix_logits_text_rows_start").GetInt32();
            var rows = logits.AsSpan(start * vocab, (tokens - start) * vocab);
            report("prefix_logits_text_rows", Compare.Close(kindPrefix + "prefix_logits", $"{sample} prefix logits (text rows)", rows, sample.Floats("prefix_logits_text_rows")));
        }

        if (sample.HasFile("prefix_logits_generate_positions"))
        {
            var generateLogits = new float[batch * tokens * vocab];
            new PaliGemmaSession(model, batch, tokens).Prefill(ids, mask, tokens, features, generateLogits, new PrefillOptions { AllLogits = true });
            report("prefix_logits_generate_positions", Compare.Close(kindPrefix + "prefix_logits", $"{sample} prefix logits (generate positions)",
                RealRows(generateLogits, mask, vocab), RealRows(sample.Floats("prefix_logits_generate_positions"), mask, vocab)));
        }
    }

    /// <summary>End to end from the image files and prompt texts: prompt ids, greedy ids and decoded text as the reference.</summary>
    public static void GenerationFromFiles(GoldenSample sample, PaliGemmaModel model)
    {
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

    /// <summary>
    /// The bf16 copy (BF16 weights, fp32 math) against the reference that ran the same weights upcast to fp32: prefix logits,
    /// greedy ids and step logits at the golden bound.
    /// </summary>
    public static void Bf16Upcast(System.Text.Json.JsonElement caseJson, GoldenSample sample, PaliGemmaModel bf16Model, string kindPrefix)
    {
        var reference = caseJson.GetProperty("bf16_weights_upcast_to_f32_references").GetProperty("samples")
            .EnumerateArray().Single(s => s.GetProperty("sample").GetString() == sample.Name);
        Assert.Equal(DType.BF16, bf16Model.Decoder.EmbeddingDType);
        string dir = sample.CaseDirectory;

        int[] ids = sample.Npy("input_ids").ToInt64().Select(x => (int)x).ToArray();
        var features = bf16Model.EncodeImages(sample.Floats("pixel_values"), 1);
        var logits = new float[ids.Length * bf16Model.Decoder.VocabSize];
        new PaliGemmaSession(bf16Model, 1, ids.Length).Prefill(ids, default, ids.Length, features, logits, new PrefillOptions { AllLogits = true });
        Compare.Close(kindPrefix + "bf16up_prefix_logits", $"bf16 {sample} prefix logits", logits,
            Npy.Read(Path.Combine(dir, reference.GetProperty("prefix_logits").GetString()!)).ToFloat32());

        var results = new PaliGemmaGenerator(bf16Model).GenerateFromIds(sample.Floats("pixel_values"), [ids],
            new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true });
        GoldenModelTests.CheckGeneration($"bf16 {sample}", results,
            Path.Combine(dir, reference.GetProperty("generated_ids").GetString()!),
            Path.Combine(dir, reference.GetProperty("step_logits").GetString()!), kindPrefix + "bf16up_step_logits");
    }

    /// <summary>The sharded copy generates bit-identical step logits and the same ids as the single file.</summary>
    public static GenerationResult ShardedEqualsSingle(GoldenSample sample, PaliGemmaModel single, PaliGemmaModel sharded)
    {
        var options = new GenerationOptions { MaxNewTokens = sample.MaxNewTokens, KeepStepLogits = true };
        int[] ids = sample.Npy("input_ids").ToInt64().Select(x => (int)x).ToArray();
        var a = new PaliGemmaGenerator(single).GenerateFromIds(sample.Floats("pixel_values"), [ids], options)[0];
        var b = new PaliGemmaGenerator(sharded).GenerateFromIds(sample.Floats("pixel_values"), [ids], options)[0];
        Assert.Equal(a.GeneratedIds, b.GeneratedIds);
        for (int s = 0; s < a.StepLogits!.Count; s++) Assert.Equal(a.StepLogits[s], b.StepLogits![s]);
        return b;
    }

    /// <summary>Logit rows of real tokens only: pad rows are never read by generation.</summary>
    private static float[] RealRows(float[] logits, byte[] mask, int vocab) =>
        Enumerable.Range(0, mask.Length).Where(i => mask[i] != 0).SelectMany(i => logits.AsSpan(i * vocab, vocab).ToArray()).ToArray();
}
