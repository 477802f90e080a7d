using System.Diagnostics;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Model.Text;

namespace PaliGemma.CpuOnly.Model;

/// <summary>One image and one prompt.</summary>
public sealed record GenerationRequest(RgbImage Image, string Prompt);

public sealed record GenerationOptions
{
    public int MaxNewTokens { get; init; } = 64;
    /// <summary>Told after each vision and prompt layer, for progress displays on big models.</summary>
    public IProgress<InferenceProgress>? Progress { get; init; }
    public SamplingOptions Sampling { get; init; } = new();
    /// <summary>Keep the logits of every generated step (for --logits-out and reference checks).</summary>
    public bool KeepStepLogits { get; init; }
    /// <summary>
    /// A run-time LoRA adapter (from <see cref="PaliGemmaModel.LoadAdapter"/> of the same model) used for this request's
    /// vision tower and decoder; null runs the model's own weights. One loaded model serves any number of adapters.
    /// </summary>
    public LoraAdapter? Adapter { get; init; }

    public void Validate()
    {
        if (MaxNewTokens < 1) throw new ArgumentOutOfRangeException(nameof(MaxNewTokens), MaxNewTokens, "max new tokens must be at least 1");
        Sampling.Validate();
    }
}

/// <summary>A token as it is produced.</summary>
public readonly record struct GeneratedToken(int Row, int Step, int Id, string Text, bool IsEnd);

public sealed class GenerationTimings
{
    public TimeSpan Preprocess { get; set; }
    public TimeSpan Vision { get; set; }
    public TimeSpan Prefill { get; set; }
    public List<TimeSpan> DecodeSteps { get; } = [];
}

public sealed class GenerationResult
{
    public required int[] PromptIds { get; init; }
    /// <summary>Generated ids, ending with &lt;eos&gt; when the model stopped by itself.</summary>
    public required int[] GeneratedIds { get; init; }
    /// <summary>Decoded answer, without the final &lt;eos&gt;.</summary>
    public required string Text { get; init; }
    public required GenerationTimings Timings { get; init; }
    /// <summary>Logits of each generated step [steps][vocab] when <see cref="GenerationOptions.KeepStepLogits"/>.</summary>
    public IReadOnlyList<float[]>? StepLogits { get; init; }
    public bool StoppedAtEos => GeneratedIds.Length > 0 && GeneratedIds[^1] == EosId;
    internal int EosId { get; init; }
}

/// <summary>Greedy or sampled generation over a loaded <see cref="PaliGemmaModel"/>, single prompts or left-padded batches.</summary>
public sealed class PaliGemmaGenerator
{
    private readonly PaliGemmaModel _model;

    public PaliGemmaGenerator(PaliGemmaModel model) => _model = model;

    public GenerationResult Generate(GenerationRequest request, GenerationOptions options, Action<GeneratedToken>? onToken = null,
        CancellationToken cancellationToken = default) =>
        GenerateBatch([request], options, onToken, cancellationToken)[0];

    /// <summary>
    /// Generates for several prompts at once: prompts are left-padded to one length, padding is masked, and each row
    /// stops at its own &lt;eos&gt;. Tokens are reported through <paramref name="onToken"/> as they are produced.
    /// </summary>
    public IReadOnlyList<GenerationResult> GenerateBatch(IReadOnlyList<GenerationRequest> requests, GenerationOptions options,
        Action<GeneratedToken>? onToken = null, CancellationToken cancellationToken = default)
    {
        options.Validate();
        if (requests.Count == 0) throw new ArgumentException("no requests", nameof(requests));
        int batch = requests.Count, s = _model.ImageSize;
        var timings = new GenerationTimings();
        var clock = Stopwatch.StartNew();
        var pixels = new float[batch * 3 * s * s];
        for (int b = 0; b < batch; b++)
            ImagePreprocessor.ToPixelValues(requests[b].Image, s, pixels.AsSpan(b * 3 * s * s, 3 * s * s));
        var prompts = new int[batch][];
        for (int b = 0; b < batch; b++) prompts[b] = _model.Tokenizer.BuildPrompt(requests[b].Prompt, _model.NumImageTokens);
        timings.Preprocess = clock.Elapsed;
        return GenerateFromIds(pixels, prompts, options, onToken, timings, cancellationToken);
    }

    /// <summary>
    /// Generation from preprocessed inputs: pixel values [B, 3, S, S] and each row's prompt ids (image tokens included),
    /// left-padded here. The entry point for callers that build prompts themselves.
    /// </summary>
    public IReadOnlyList<GenerationResult> GenerateFromIds(float[] pixels, IReadOnlyList<int[]> prompts, GenerationOptions options,
        Action<GeneratedToken>? onToken = null, GenerationTimings? timings = null, CancellationToken cancellationToken = default)
    {
        options.Validate();
        int batch = prompts.Count, imageTokens = _model.NumImageTokens;
        if (batch == 0) throw new ArgumentException("no prompts", nameof(prompts));
        var tokenizer = _model.Tokenizer;
        timings ??= new GenerationTimings();
        var clock = Stopwatch.StartNew();
        float[] features = _model.EncodeImages(pixels, batch, null, cancellationToken, options.Adapter, options.Progress);
        timings.Vision = clock.Elapsed;

        var (ids, mask) = PaliGemmaTokenizer.PadLeft(prompts, tokenizer.PadId);
        int tokens = ids.GetLength(1);
        int capacity = tokens + options.MaxNewTokens;
        if (capacity > _model.Config.Text.MaxPositionEmbeddings)
            throw new ArgumentException($"the prompt ({tokens} tokens with {imageTokens} image tokens) plus {options.MaxNewTokens} new tokens exceeds the model's {_model.Config.Text.MaxPositionEmbeddings} positions", nameof(prompts));

        var session = new PaliGemmaSession(_model, batch, capacity, options.Adapter);
        int vocab = session.VocabSize;
        var logits = new float[batch * vocab];
        clock.Restart();
        session.Prefill(Flatten(ids), Flatten(mask), tokens, features, logits, new PrefillOptions { Progress = options.Progress }, cancellationToken);
        timings.Prefill = clock.Elapsed;

        var samplers = new TokenSampler[batch];
        for (int b = 0; b < batch; b++)
            samplers[b] = new TokenSampler(options.Sampling with { Seed = options.Sampling.Seed + (ulong)b });
        var generated = new List<int>[batch];
        var stepLogits = options.KeepStepLogits ? new List<float[]>[batch] : null;
        var decoders = new StreamingDecoder[batch];
        var finished = new bool[batch];
        for (int b = 0; b < batch; b++)
        {
            generated[b] = new List<int>(options.MaxNewTokens);   // sized up front: the decode loop itself allocates nothing
            decoders[b] = new StreamingDecoder(tokenizer);
            if (stepLogits is not null) stepLogits[b] = [];
        }
        var next = new int[batch];
        timings.DecodeSteps.Capacity = Math.Max(timings.DecodeSteps.Capacity, options.MaxNewTokens);
        for (int step = 0; step < options.MaxNewTokens; step++)
        {
            bool allDone = true;
            for (int b = 0; b < batch; b++)
            {
                if (finished[b])
                {
                    next[b] = tokenizer.PadId;   // finished rows keep feeding padding, as transformers does
                    continue;
                }
                var rowLogits = logits.AsSpan(b * vocab, vocab);
                stepLogits?[b].Add(rowLogits.ToArray());
                int id = samplers[b].Next(rowLogits);
                next[b] = id;
                generated[b].Add(id);
                bool end = id == tokenizer.EosId;
                finished[b] = end;
                allDone &= end;
                onToken?.Invoke(new GeneratedToken(b, step, id, end ? decoders[b].Flush() : decoders[b].Push(id), end));
            }
            if (allDone || step + 1 == options.MaxNewTokens) break;
            cancellationToken.ThrowIfCancellationRequested();
            clock.Restart();
            session.Decode(next, logits, cancellationToken);
            timings.DecodeSteps.Add(clock.Elapsed);
        }

        var results = new GenerationResult[batch];
        for (int b = 0; b < batch; b++)
        {
            int[] gen = [.. generated[b]];
            int textLength = gen.Length > 0 && gen[^1] == tokenizer.EosId ? gen.Length - 1 : gen.Length;
            results[b] = new GenerationResult
            {
                PromptIds = prompts[b],
                GeneratedIds = gen,
                Text = tokenizer.Decode(gen.AsSpan(0, textLength)),
                Timings = timings,
                StepLogits = stepLogits?[b],
                EosId = tokenizer.EosId,
            };
        }
        return results;
    }

    /// <summary>
    /// Mean cross-entropy of <paramref name="suffix"/> (followed by &lt;eos&gt;) given the image and prompt, with the prompt
    /// attending bidirectionally and the suffix causally (the training-time mask). Lower means more likely; use it to rank answers.
    /// </summary>
    public double Score(RgbImage image, string prompt, string suffix, CancellationToken cancellationToken = default, LoraAdapter? adapter = null)
    {
        var (prefix, suffixIds) = _model.Tokenizer.BuildPromptWithSuffix(prompt, suffix, _model.NumImageTokens);
        return Score(_model.Preprocess(image), prefix, suffixIds, out _, cancellationToken, adapter);
    }

    /// <summary>Scores token ids directly; <paramref name="logits"/> receives [prefix+suffix, vocab].</summary>
    public double Score(float[] pixelValues, int[] prefix, int[] suffix, out float[] logits, CancellationToken cancellationToken = default,
        LoraAdapter? adapter = null)
    {
        if (suffix.Length == 0) throw new ArgumentException("the suffix is empty", nameof(suffix));
        int total = prefix.Length + suffix.Length, vocab = _model.Decoder.VocabSize;
        int[] ids = [.. prefix, .. suffix];
        float[] features = _model.EncodeImages(pixelValues, 1, null, cancellationToken, adapter);
        var session = new PaliGemmaSession(_model, 1, total, adapter);
        logits = new float[total * vocab];
        session.Prefill(ids, default, total, features, logits, new PrefillOptions { AllLogits = true, PrefixLength = prefix.Length }, cancellationToken);

        // Position i predicts token i + 1; only suffix tokens are scored.
        double loss = 0;
        for (int i = prefix.Length - 1; i < total - 1; i++)
        {
            var row = logits.AsSpan(i * vocab, vocab);
            float max = System.Numerics.Tensors.TensorPrimitives.Max(row);
            double sum = 0;
            foreach (float x in row) sum += Math.Exp(x - max);
            loss += max + Math.Log(sum) - row[ids[i + 1]];
        }
        return loss / suffix.Length;
    }

    private static T[] Flatten<T>(T[,] array)
    {
        var flat = new T[array.Length];
        int i = 0;
        foreach (var x in array) flat[i++] = x;
        return flat;
    }
}
