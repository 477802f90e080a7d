using System.Buffers;
using System.Diagnostics;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Cli;

/// <summary><c>paligemma generate</c>: one image, one prompt, the answer streamed to stdout (or one JSON object).</summary>
public static class GenerateCommand
{
    private static readonly HashSet<string> Flags = ["json", "quiet", "merge-adapter"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string modelDir = a.Required("model");
        string imagePath = a.Required("image");
        string prompt = a.Required("prompt");
        string? tokenizer = a.Optional("tokenizer");
        bool json = a.Flag("json"), quiet = a.Flag("quiet");
        string? logitsOut = a.Optional("logits-out");
        // --adapter DIR: a PEFT LoRA folder applied at run time; with --merge-adapter it is merged into the weights at load.
        string? adapterDir = a.Optional("adapter");
        bool mergeAdapter = a.Flag("merge-adapter");
        string? dtype = a.Optional("dtype");
        var quantizeScales = QuantizeCommand.ParseScales(a.Optional("quant-scales"), new PaliGemmaLoadOptions().QuantizeScales);
        var options = new GenerationOptions
        {
            MaxNewTokens = a.Int("max-new-tokens", 64, 1, 1 << 20),
            Sampling = new SamplingOptions
            {
                Temperature = a.Float("temperature", 0f, 0f, 100f),
                TopK = a.Int("top-k", 0, 0, int.MaxValue),
                TopP = a.Float("top-p", 1f, float.Epsilon, 1f),
                Seed = a.ULong("seed", 0),
            },
            KeepStepLogits = logitsOut is not null,
            Progress = quiet ? null : new StderrProgress(),
        };
        a.RejectUnknown();
        if (mergeAdapter && adapterDir is null) throw new UsageException("--merge-adapter needs --adapter DIR");
        if (logitsOut is not null && !logitsOut.EndsWith(".npy", StringComparison.OrdinalIgnoreCase))
            throw new UsageException($"--logits-out must name a .npy file, got '{logitsOut}'");

        var total = Stopwatch.StartNew();
        Progress(quiet, $"loading {modelDir}");
        using var model = PaliGemmaModel.Load(modelDir, new PaliGemmaLoadOptions
        {
            TokenizerPath = tokenizer,
            MergeAdapterDirectory = mergeAdapter ? adapterDir : null,
            QuantizeTo = dtype is null ? null : QuantizeCommand.ParseFormat(dtype, "--dtype"),
            QuantizeScales = quantizeScales,
            Backend = CliBackend.Current,
        });
        if (adapterDir is not null && !mergeAdapter) options = options with { Adapter = model.LoadAdapter(adapterDir) };
        var clock = Stopwatch.StartNew();
        var image = ImageLoader.Load(imagePath);
        var decodeTime = clock.Elapsed;
        Progress(quiet, $"loaded in {model.LoadTime.TotalMilliseconds:F0} ms; image {image.Width}x{image.Height}; generating");

        var generator = new PaliGemmaGenerator(model);
        var stdout = Console.Out;
        var result = generator.Generate(new GenerationRequest(image, prompt), options, token =>
        {
            if (!json) stdout.Write(token.Text);
        });
        result.Timings.Preprocess += decodeTime;
        if (!json) stdout.WriteLine();

        if (logitsOut is not null)
        {
            var steps = result.StepLogits!;
            int vocab = model.Decoder.VocabSize;
            var flat = new float[steps.Count * vocab];
            for (int s = 0; s < steps.Count; s++) steps[s].CopyTo(flat, s * vocab);
            Npy.WriteFloat32(logitsOut, flat, [steps.Count, vocab]);
        }

        var t = result.Timings;
        double decodeMs = t.DecodeSteps.Sum(x => x.TotalMilliseconds);
        if (json)
        {
            var buffer = new ArrayBufferWriter<byte>();
            using var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping });
            w.WriteStartObject();
            w.WriteString("text", result.Text);
            w.WriteString("prompt", prompt);
            WriteIds(w, "prompt_ids", result.PromptIds);
            WriteIds(w, "generated_ids", result.GeneratedIds);
            w.WriteBoolean("stopped_at_eos", result.StoppedAtEos);
            w.WriteStartObject("timings_ms");
            w.WriteNumber("load", Math.Round(model.LoadTime.TotalMilliseconds, 3));
            w.WriteNumber("preprocess", Math.Round(t.Preprocess.TotalMilliseconds, 3));
            w.WriteNumber("vision", Math.Round(t.Vision.TotalMilliseconds, 3));
            w.WriteNumber("prefill", Math.Round(t.Prefill.TotalMilliseconds, 3));
            w.WriteStartArray("decode_per_token");
            foreach (var step in t.DecodeSteps) w.WriteNumberValue(Math.Round(step.TotalMilliseconds, 3));
            w.WriteEndArray();
            w.WriteNumber("total", Math.Round(total.Elapsed.TotalMilliseconds, 3));
            w.WriteEndObject();
            w.WriteNumber("prefill_tokens", result.PromptIds.Length);
            w.WriteNumber("prefill_tokens_per_second", Math.Round(result.PromptIds.Length / Math.Max(t.Prefill.TotalSeconds, 1e-9), 3));
            w.WriteNumber("decode_tokens_per_second", t.DecodeSteps.Count == 0 ? 0 : Math.Round(t.DecodeSteps.Count / (decodeMs / 1000), 3));
            if (logitsOut is not null) w.WriteString("logits_out", logitsOut);
            w.WriteEndObject();
            w.Flush();
            stdout.WriteLine(Encoding.UTF8.GetString(buffer.WrittenSpan));
        }
        else
        {
            Progress(quiet, $"vision {t.Vision.TotalMilliseconds:F0} ms, prefill {result.PromptIds.Length} tokens {t.Prefill.TotalMilliseconds:F0} ms, " +
                            $"{t.DecodeSteps.Count} decode steps {(t.DecodeSteps.Count == 0 ? 0 : t.DecodeSteps.Count / (decodeMs / 1000)):F1} tokens/s");
        }
        return 0;
    }

    private static void WriteIds(Utf8JsonWriter w, string name, int[] ids)
    {
        w.WriteStartArray(name);
        foreach (int id in ids) w.WriteNumberValue(id);
        w.WriteEndArray();
    }

    private static void Progress(bool quiet, string message)
    {
        if (!quiet) Console.Error.WriteLine($"[paligemma] {message}");
    }
}
