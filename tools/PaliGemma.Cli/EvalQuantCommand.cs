using System.Globalization;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Diagnostics;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Quant;

namespace PaliGemma.Cli;

/// <summary>
/// <c>paligemma eval-quant</c>: the float checkpoint generates greedily; then the quantized model (quantized at load with
/// --dtype, or a folder written by <c>quantize</c> with --quantized) is teacher-forced on the same sequence. Prints the
/// prefix-logit cosine and max relative difference and the top-1 agreement at each generated position.
/// </summary>
public static class EvalQuantCommand
{
    private static readonly HashSet<string> Flags = ["quiet"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string modelDir = a.Required("model");
        string imagePath = a.Required("image");
        string prompt = a.Optional("prompt") ?? "caption en";
        string? dtype = a.Optional("dtype");
        var quantizeScales = QuantizeCommand.ParseScales(a.Optional("quant-scales"), new PaliGemmaLoadOptions().QuantizeScales);
        string? quantizedDir = a.Optional("quantized");
        string? tokenizer = a.Optional("tokenizer");
        int newTokens = a.Int("new-tokens", 16, 1, 4096);
        bool quiet = a.Flag("quiet");
        a.RejectUnknown();
        if ((dtype is null) == (quantizedDir is null))
            throw new UsageException("give exactly one of --dtype q8|nf4 (quantize at load) or --quantized DIR");
        QuantFormat? format = dtype is null ? null : QuantizeCommand.ParseFormat(dtype, "--dtype");

        var image = ImageLoader.Load(imagePath);
        int[] promptIds, generated;
        float[] referenceLogits;
        using (var reference = PaliGemmaModel.Load(modelDir, new PaliGemmaLoadOptions { TokenizerPath = tokenizer, Backend = CliBackend.Current }))
        {
            if (!quiet) Console.Error.WriteLine($"[eval-quant] reference: {modelDir}, greedy {newTokens} tokens");
            var result = new PaliGemmaGenerator(reference).Generate(new GenerationRequest(image, prompt), new GenerationOptions { MaxNewTokens = newTokens });
            promptIds = result.PromptIds;
            generated = result.GeneratedIds;
            var features = reference.EncodeImages(reference.Preprocess(image), 1);
            referenceLogits = QuantizationAccuracy.TeacherForcedLogits(reference, features, promptIds, generated);
        }

        using var quantized = PaliGemmaModel.Load(quantizedDir ?? modelDir, new PaliGemmaLoadOptions { TokenizerPath = tokenizer, QuantizeTo = format, QuantizeScales = quantizeScales, Backend = CliBackend.Current });
        if (quantized.Quantization is null)
            throw new InvalidDataException($"'{quantizedDir}' is not a quantized checkpoint (no {QuantizedCheckpoint.FormatKey} metadata)");
        if (!quiet) Console.Error.WriteLine($"[eval-quant] quantized: {quantized.Directory} ({quantized.Quantization.Value.Name()}), teacher-forced");
        var qFeatures = quantized.EncodeImages(quantized.Preprocess(image), 1);
        float[] logits = QuantizationAccuracy.TeacherForcedLogits(quantized, qFeatures, promptIds, generated);

        int vocab = quantized.Decoder.VocabSize;
        var prefix = logits.AsSpan(0, promptIds.Length * vocab);
        var referencePrefix = referenceLogits.AsSpan(0, promptIds.Length * vocab);
        double cosine = QuantizationAccuracy.Cosine(prefix, referencePrefix);
        double maxRel = QuantizationAccuracy.MaxRelativeDiff(prefix, referencePrefix);
        var (agreeing, steps) = QuantizationAccuracy.TopOneAgreement(logits, vocab, promptIds.Length, generated, quantized.Tokenizer.EosId);
        Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{quantized.Quantization.Value.Name()}: prefix logits cosine {cosine:F6}, max relative diff {maxRel:F4}; top-1 agreement {agreeing}/{steps} ({(double)agreeing / Math.Max(1, steps):P1})"));
        return 0;
    }
}
