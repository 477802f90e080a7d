using System.Numerics.Tensors;

namespace PaliGemma.CpuOnly.Model.Diagnostics;

/// <summary>Accuracy of a quantized model against a float reference, for one sample.</summary>
/// <param name="Cosine">Cosine similarity of the prefix logits (all compared rows flattened).</param>
/// <param name="MaxRelativeDiff">max |quantized − reference| / max |reference| over the prefix logits.</param>
/// <param name="AgreeingSteps">Generated positions where the quantized model's argmax equals the reference token.</param>
/// <param name="Steps">Generated positions compared (up to and including the reference's first &lt;eos&gt;).</param>
public sealed record QuantizationAccuracyResult(double Cosine, double MaxRelativeDiff, int AgreeingSteps, int Steps)
{
    public double Agreement => Steps == 0 ? 1 : (double)AgreeingSteps / Steps;
}

/// <summary>Metrics for comparing a quantized model with its float reference.</summary>
public static class QuantizationAccuracy
{
    public static double Cosine(ReadOnlySpan<float> actual, ReadOnlySpan<float> expected)
    {
        if (actual.Length != expected.Length) throw new ArgumentException($"{actual.Length} values against {expected.Length}", nameof(actual));
        double dot = 0, aa = 0, ee = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            dot += (double)actual[i] * expected[i];
            aa += (double)actual[i] * actual[i];
            ee += (double)expected[i] * expected[i];
        }
        return aa == 0 || ee == 0 ? (aa == ee ? 1 : 0) : dot / Math.Sqrt(aa * ee);
    }

    /// <summary>max |actual − expected| / max |expected| (the plain max difference when the reference is all zeros).</summary>
    public static double MaxRelativeDiff(ReadOnlySpan<float> actual, ReadOnlySpan<float> expected)
    {
        if (actual.Length != expected.Length) throw new ArgumentException($"{actual.Length} values against {expected.Length}", nameof(actual));
        double maxDiff = 0, maxRef = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            maxDiff = Math.Max(maxDiff, Math.Abs((double)actual[i] - expected[i]));
            maxRef = Math.Max(maxRef, Math.Abs((double)expected[i]));
        }
        return maxRef == 0 ? maxDiff : maxDiff / maxRef;
    }

    /// <summary>
    /// Teacher forcing: runs one unpadded row <paramref name="promptIds"/> followed by <paramref name="generatedIds"/> (all
    /// but the last) through <paramref name="model"/> in one prefill (prompt as the bidirectional prefix, generated tokens
    /// causal, as during generation) and returns the logits of every position [prompt + generated − 1, vocab].
    /// </summary>
    public static float[] TeacherForcedLogits(PaliGemmaModel model, ReadOnlySpan<float> imageFeatures, ReadOnlySpan<int> promptIds, ReadOnlySpan<int> generatedIds)
    {
        ArgumentNullException.ThrowIfNull(model);
        int tokens = promptIds.Length + Math.Max(0, generatedIds.Length - 1);
        var ids = new int[tokens];
        promptIds.CopyTo(ids);
        if (generatedIds.Length > 1) generatedIds[..^1].CopyTo(ids.AsSpan(promptIds.Length));
        var mask = new byte[tokens];
        Array.Fill(mask, (byte)1);
        var session = new PaliGemmaSession(model, 1, tokens);
        var logits = new float[(long)tokens * model.Decoder.VocabSize];
        session.Prefill(ids, mask, tokens, imageFeatures, logits, new PrefillOptions { AllLogits = true, PrefixLength = promptIds.Length });
        return logits;
    }

    /// <summary>
    /// How many generated positions of the teacher-forced <paramref name="logits"/> (from <see cref="TeacherForcedLogits"/>)
    /// have their argmax at the reference token; positions after the reference's first <paramref name="eosId"/> are not counted.
    /// </summary>
    public static (int Agreeing, int Steps) TopOneAgreement(ReadOnlySpan<float> logits, int vocab, int promptLength, ReadOnlySpan<int> generatedIds, int eosId)
    {
        int agreeing = 0, steps = 0;
        for (int s = 0; s < generatedIds.Length; s++)
        {
            int position = promptLength - 1 + s;
            int best = TensorPrimitives.IndexOfMax(logits.Slice(position * vocab, vocab));
            steps++;
            if (best == generatedIds[s]) agreeing++;
            if (generatedIds[s] == eosId) break;
        }
        return (agreeing, steps);
    }
}
