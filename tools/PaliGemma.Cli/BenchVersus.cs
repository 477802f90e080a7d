using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;

namespace PaliGemma.Cli;

/// <summary>
/// <c>paligemma bench --versus DIR[,DIR...]</c>: the bench model and the other checkpoints run the same image and prompt in
/// turn, phase by phase (every model's vision pass, then every prefill, then one decode step of each model at a time), the
/// order rotated every round and step. All of them see the same load and the same minute of the host's memory bandwidth,
/// which drifts too much between separate runs for a ratio such as "q8 decodes 1.8x as fast as bf16" to hold.
/// </summary>
internal static class BenchVersus
{
    /// <summary>One model's times (medians) and its speed-up over the first model (medians of the ratios of neighbouring turns).</summary>
    internal sealed record Entry(string Directory, string Weights, long DecodeBytesPerToken, int Rounds, int Steps,
        double VisionSeconds, double PrefillSeconds, double DecodeStepSeconds,
        double VisionSpeedup, double PrefillSpeedup, double DecodeSpeedup)
    {
        public double DecodeGBps => DecodeBytesPerToken / DecodeStepSeconds / 1e9;
    }

    internal sealed record Contender(string Directory, string Weights, PaliGemmaModel Model, long DecodeBytesPerToken);

    /// <summary>Parses the comma-separated folder list of --versus; each must be a directory.</summary>
    public static string[] ParseDirectories(string text)
    {
        string[] directories = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (directories.Length == 0)
            throw new UsageException("--versus needs at least one checkpoint folder (DIR or DIR,DIR,...)");
        foreach (string directory in directories)
        {
            if (!Directory.Exists(directory))
                throw new UsageException($"--versus: '{directory}' is not a folder");
        }
        return directories;
    }

    public static IReadOnlyList<Entry> Run(IReadOnlyList<Contender> models, string? imagePath, string prompt, int newTokens, int warmupRounds, int rounds, Action<string> progress)
    {
        int count = models.Count;
        var vision = Lists(count);
        var prefill = Lists(count);
        var decode = Lists(count);
        // Ratios of the first model's time to each one's, taken between neighbouring turns of the same round or step.
        var visionRatios = Lists(count);
        var prefillRatios = Lists(count);
        var decodeRatios = Lists(count);
        var image = imagePath is null ? BenchCommand.GradientImage(640, 480) : ImageLoader.Load(imagePath);
        var clock = new Stopwatch();
        // Warm-up rounds (negative numbers) run every model's kernels once before anything is recorded.
        for (int round = -warmupRounds; round < rounds; round++)
        {
            bool recorded = round >= 0;
            var features = new float[count][];
            var pixels = models.Select(m => m.Model.Preprocess(image)).ToArray();
            var roundVision = new double[count];
            foreach (int m in Turns(round + warmupRounds, count))
            {
                clock.Restart();
                features[m] = models[m].Model.EncodeImages(pixels[m], 1);
                roundVision[m] = clock.Elapsed.TotalSeconds;
            }
            if (recorded) Record(vision, visionRatios, roundVision);

            var sessions = new PaliGemmaSession[count];
            var logits = new float[count][];
            var next = new int[count][];
            var roundPrefill = new double[count];
            foreach (int m in Turns(round + warmupRounds, count))
            {
                var model = models[m].Model;
                int[] ids = model.Tokenizer.BuildPrompt(prompt, model.NumImageTokens);
                sessions[m] = new PaliGemmaSession(model, 1, ids.Length + newTokens);
                logits[m] = new float[sessions[m].VocabSize];
                clock.Restart();
                sessions[m].Prefill(ids, default, ids.Length, features[m], logits[m]);
                roundPrefill[m] = clock.Elapsed.TotalSeconds;
                // Each model follows its own greedy tokens (quantization may change them); ignoring <eos>, as bench does.
                next[m] = [TensorPrimitives.IndexOfMax(logits[m])];
            }
            if (recorded) Record(prefill, prefillRatios, roundPrefill);

            var stepTimes = new double[count];
            for (int step = 1; step < newTokens; step++)
            {
                DecodeInTurn(sessions, next, logits, round + warmupRounds + step, stepTimes, clock);
                if (recorded) Record(decode, decodeRatios, stepTimes);
            }
            progress((recorded ? $"versus round {round + 1}/{rounds}: " : $"versus warm-up {round + warmupRounds + 1}/{warmupRounds}: ") + string.Join(", ", Enumerable.Range(0, count).Select(m => string.Create(CultureInfo.InvariantCulture,
                $"{models[m].Weights} vision {roundVision[m]:F2} s, prefill {roundPrefill[m]:F2} s"))));
        }

        return Enumerable.Range(0, count).Select(m => new Entry(models[m].Directory, models[m].Weights, models[m].DecodeBytesPerToken,
            rounds, decode[m].Count, BenchCommand.Median(vision[m]), BenchCommand.Median(prefill[m]), BenchCommand.Median(decode[m]),
            BenchCommand.Median(visionRatios[m]), BenchCommand.Median(prefillRatios[m]), BenchCommand.Median(decodeRatios[m]))).ToList();
    }

    /// <summary>
    /// One greedy decode step of every session, in the order <see cref="Turns"/> gives for <paramref name="shift"/>:
    /// each follows its own argmax token (ignoring &lt;eos&gt;); <paramref name="seconds"/>[s] is session s's step time.
    /// </summary>
    internal static void DecodeInTurn(PaliGemmaSession[] sessions, int[][] next, float[][] logits, int shift, double[] seconds, Stopwatch clock)
    {
        foreach (int s in Turns(shift, sessions.Length))
        {
            clock.Restart();
            sessions[s].Decode(next[s], logits[s]);
            next[s][0] = TensorPrimitives.IndexOfMax(logits[s]);
            seconds[s] = clock.Elapsed.TotalSeconds;
        }
    }

    /// <summary>Model indices in the order of one turn: a rotation that moves by one every round or step.</summary>
    private static IEnumerable<int> Turns(int shift, int count) => Enumerable.Range(0, count).Select(turn => (shift + turn) % count);

    private static List<double>[] Lists(int count) => Enumerable.Range(0, count).Select(_ => new List<double>()).ToArray();

    private static void Record(List<double>[] times, List<double>[] ratios, double[] seconds)
    {
        for (int m = 0; m < seconds.Length; m++)
        {
            times[m].Add(seconds[m]);
            ratios[m].Add(seconds[0] / seconds[m]);
        }
    }

    public static void WriteText(TextWriter o, IReadOnlyList<Entry> entries, double? probeGBps)
    {
        var first = entries[0];
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"versus      medians of {first.Rounds} rounds ({first.Steps} decode steps) per model, turns rotated; speed-up = the first model's time / this one's, median over neighbouring turns"));
        o.WriteLine("  weights  vision ms  prefill ms  decode ms/token  tokens/s   GB/s" + (probeGBps is null ? "" : "  of probe") + "  speed-up: vision  prefill  decode  folder");
        foreach (var e in entries)
        {
            string ofProbe = probeGBps is double p ? string.Create(CultureInfo.InvariantCulture, $"  {100 * e.DecodeGBps / p,7:F0}%") : "";
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  {e.Weights,-7}  {e.VisionSeconds * 1000,9:F1}  {e.PrefillSeconds * 1000,10:F1}  {e.DecodeStepSeconds * 1000,15:F1}  {1 / e.DecodeStepSeconds,8:F2}  {e.DecodeGBps,5:F1}{ofProbe}  {e.VisionSpeedup,16:F3}  {e.PrefillSpeedup,7:F3}  {e.DecodeSpeedup,6:F3}  {e.Directory}"));
        }
    }

    public static void WriteJson(Utf8JsonWriter w, IReadOnlyList<Entry> entries, double? probeGBps)
    {
        w.WriteStartArray("versus");
        foreach (var e in entries)
        {
            w.WriteStartObject();
            w.WriteString("model", Path.GetFullPath(e.Directory));
            w.WriteString("weights_dtype", e.Weights);
            w.WriteNumber("rounds", e.Rounds);
            w.WriteNumber("decode_steps", e.Steps);
            w.WriteNumber("vision_s", BenchCommand.Round(e.VisionSeconds));
            w.WriteNumber("prefill_s", BenchCommand.Round(e.PrefillSeconds));
            w.WriteNumber("decode_s_per_token", BenchCommand.Round(e.DecodeStepSeconds));
            w.WriteNumber("decode_tokens_per_s", BenchCommand.Round(1 / e.DecodeStepSeconds));
            w.WriteNumber("decode_weight_bytes_per_token", e.DecodeBytesPerToken);
            w.WriteNumber("decode_weight_gb_per_s", BenchCommand.Round(e.DecodeGBps));
            if (probeGBps is double p) w.WriteNumber("decode_fraction_of_memory_read", BenchCommand.Round(e.DecodeGBps / p));
            w.WriteNumber("vision_speedup_vs_first", BenchCommand.Round(e.VisionSpeedup));
            w.WriteNumber("prefill_speedup_vs_first", BenchCommand.Round(e.PrefillSpeedup));
            w.WriteNumber("decode_speedup_vs_first", BenchCommand.Round(e.DecodeSpeedup));
            w.WriteEndObject();
        }
        w.WriteEndArray();
    }
}
