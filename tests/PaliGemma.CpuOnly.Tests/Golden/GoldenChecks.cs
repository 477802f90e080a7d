using PaliGemma.CpuOnly.Model;

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

    /// <summary>Logit rows of real tokens only: pad rows are never read by generation.</summary>
    private static float[] RealRows(float[] logits, byte[] mask, int vocab) =>
        Enumerable.Range(0, mask.Length).Where(i => mask[i] != 0).SelectMany(i => logits.AsSpan(i * vocab, vocab).ToArray()).ToArray();
}
