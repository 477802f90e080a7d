using System.Buffers;
using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Diagnostics;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Cli;

/// <summary>
/// <c>paligemma bench</c>: times each stage of one generation (greedy, never stopping early at &lt;eos&gt;) over several
/// runs and puts decode speed next to the memory bandwidth the same process can reach.
/// </summary>
public static class BenchCommand
{
    private static readonly HashSet<string> Flags = ["json", "quiet", "merge-adapter", "compare-merged", "profile"];

    private sealed class RunTimings
    {
        public double PreprocessSeconds, VisionSeconds, PrefillSeconds;
        public List<double> DecodeStepSeconds = [];
        public long AllocatedBytes, AllocatedBytesThisThread;
        public int ProfiledSteps;
        public double ProfiledSeconds;
        public double DecodeSeconds => DecodeStepSeconds.Sum();
    }

    private static string WeightsName(PaliGemmaModel model) =>
        model.Quantization is { } q ? PaliGemma.CpuOnly.Quant.QuantFormats.Name(q).ToUpperInvariant() : model.Decoder.EmbeddingDType.ToString().ToUpperInvariant();

    /// <summary>The weight bytes one decode step streams: quantized matrices count their blocks and scales, float ones their tensors in the checkpoint.</summary>
    private static long WeightBytesPerToken(PaliGemmaModel model, string modelDir) => model.Quantization is null
        ? ModelFootprint.DecodeWeightBytesPerToken(modelDir, model.Config.Text)
        : model.Decoder.DecodeWeightBytesPerToken();

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string modelDir = a.Required("model");
        string? imagePath = a.Optional("image");
        string prompt = a.Optional("prompt") ?? "caption en";
        string? tokenizerPath = a.Optional("tokenizer");
        int newTokens = a.Int("new-tokens", 32, 2, 1 << 16);
        int runs = a.Int("runs", 3, 1, 1000);
        int warmup = a.Int("warmup", 0, 0, 100);
        int threads = a.Int("threads", 0, 0, 4096);
        int probeMb = a.Int("probe-mb", 1024, 0, 1 << 20);
        string? dtype = a.Optional("dtype");
        var quantizeTo = dtype is null ? (PaliGemma.CpuOnly.Quant.QuantFormat?)null : QuantizeCommand.ParseFormat(dtype, "--dtype");
        var quantizeScales = QuantizeCommand.ParseScales(a.Optional("quant-scales"), new PaliGemmaLoadOptions().QuantizeScales);
        string? adapterDir = a.Optional("adapter");
        bool mergeAdapter = a.Flag("merge-adapter");
        bool compareMerged = a.Flag("compare-merged");
        bool json = a.Flag("json"), quiet = a.Flag("quiet"), profile = a.Flag("profile");
        string? versusText = a.Optional("versus");
        a.RejectUnknown();
        string[] versusDirs = versusText is null ? [] : BenchVersus.ParseDirectories(versusText);
        if (versusDirs.Length > 0 && (adapterDir is not null || profile))
            throw new UsageException("--versus compares checkpoints without an adapter or a profile: leave out --adapter and --profile");
        if (mergeAdapter && adapterDir is null) throw new UsageException("--merge-adapter needs --adapter DIR");
        if (compareMerged && (adapterDir is null || mergeAdapter)) throw new UsageException("--compare-merged needs --adapter DIR at run time (without --merge-adapter)");
        if (threads > 0) KernelThreading.MaxThreads = threads;

        void Progress(string message)
        {
            if (!quiet) Console.Error.WriteLine("[bench] " + message);
        }

        double? loadAverageStart = ProcessStats.LoadAverage();
        if (loadAverageStart > Environment.ProcessorCount)
            Progress(string.Create(CultureInfo.InvariantCulture, $"note: load average {loadAverageStart:F1} on {Environment.ProcessorCount} cores; other work competes for the CPUs"));
        Progress(adapterDir is null ? $"loading {modelDir}" : $"loading {modelDir} with {adapterDir} {(mergeAdapter ? "merged at load" : "at run time")}");
        long? rssBeforeLoad = ProcessStats.ResidentBytes();
        // --profile runs the model on a backend that times each operation of the decode steps.
        var profiler = profile ? new ProfilingBackend(CliBackend.Current ?? PaliGemma.CpuOnly.Kernels.Backends.CpuBackend.Instance) : null;
        using var model = PaliGemmaModel.Load(modelDir, new PaliGemmaLoadOptions
        {
            TokenizerPath = tokenizerPath,
            QuantizeTo = quantizeTo,
            QuantizeScales = quantizeScales,
            MergeAdapterDirectory = mergeAdapter ? adapterDir : null,
            Backend = (PaliGemma.CpuOnly.Kernels.Backends.IComputeBackend?)profiler ?? CliBackend.Current,
        });
        double loadSeconds = model.LoadTime.TotalSeconds;
        long weightBytesPerToken = WeightBytesPerToken(model, modelDir);
        long? rssAfterLoad = ProcessStats.ResidentBytes();
        LoraAdapter? runtimeAdapter = null;
        double adapterLoadSeconds = 0;
        if (adapterDir is not null && !mergeAdapter)
        {
            var adapterClock = Stopwatch.StartNew();
            runtimeAdapter = model.LoadAdapter(adapterDir);
            adapterLoadSeconds = adapterClock.Elapsed.TotalSeconds;
        }
        long? rssAfterAdapter = ProcessStats.ResidentBytes();
        var adapterStats = AdapterStats.Of(runtimeAdapter ?? model.MergedAdapter);
        if (adapterStats is { } stats)
            Progress(string.Create(CultureInfo.InvariantCulture,
                $"adapter: {stats.Modules} modules, r {stats.Rank}, {stats.FileBytes / 1e6:F2} MB file, {stats.MemoryBytes / 1e6:F2} MB in fp32{(mergeAdapter ? $", merged into {stats.MergedWeightBytes / 1e9:F2} GB of private weight copies" : "")}"));
        Progress(string.Create(CultureInfo.InvariantCulture,
            $"loaded in {loadSeconds * 1000:F0} ms; {WeightsName(model)} weights, {weightBytesPerToken / 1e9:F2} GB streamed per decode token; {KernelThreading.MaxThreads} threads, {KernelInfo.VectorWidth}"));

        var results = new List<RunTimings>();
        int promptTokens = 0;
        var visionProfile = new PhaseProfile("vision");
        var prefillProfile = new PhaseProfile("prefill");
        for (int r = 0; r < warmup + runs; r++)
        {
            string label = r < warmup ? $"warm-up {r + 1}/{warmup}" : $"run {r - warmup + 1}/{runs}";
            var timings = RunOnce(model, runtimeAdapter, imagePath, prompt, newTokens, out promptTokens, message => Progress($"{label}: {message}"),
                r >= warmup ? profiler : null, visionProfile, prefillProfile);
            if (r >= warmup) results.Add(timings);
        }
        long? peakRss = ProcessStats.PeakResidentBytes();

        InterleavedResult? interleaved = null;
        if (compareMerged)
        {
            Progress($"interleaved: loading {modelDir} with {adapterDir} merged, then rotating decode steps: run-time adapter, merged, base");
            using var merged = PaliGemmaModel.Load(modelDir, new PaliGemmaLoadOptions { TokenizerPath = tokenizerPath, MergeAdapterDirectory = adapterDir, Backend = CliBackend.Current });
            interleaved = Interleave(model, runtimeAdapter!, merged, imagePath, prompt, newTokens, runs, Progress);
            Progress(string.Create(CultureInfo.InvariantCulture,
                $"interleaved: run time {interleaved.RuntimeMedianStepSeconds * 1000:F1} ms/token, merged {interleaved.MergedMedianStepSeconds * 1000:F1}, base {interleaved.BaseMedianStepSeconds * 1000:F1} (medians of {interleaved.Steps} steps each), run time / merged {interleaved.Ratio:F3}"));
        }

        IReadOnlyList<BenchVersus.Entry>? versus = null;
        if (versusDirs.Length > 0)
        {
            var contenders = new List<BenchVersus.Contender> { new(modelDir, WeightsName(model), model, weightBytesPerToken) };
            try
            {
                foreach (string dir in versusDirs)
                {
                    Progress($"versus: loading {dir}");
                    var other = PaliGemmaModel.Load(dir, new PaliGemmaLoadOptions { TokenizerPath = tokenizerPath, Backend = CliBackend.Current });
                    contenders.Add(new BenchVersus.Contender(dir, WeightsName(other), other, WeightBytesPerToken(other, dir)));
                }
                Progress($"versus: {warmup} + {runs} rounds of vision, prefill and {newTokens - 1} decode steps, the {contenders.Count} models in turn");
                versus = BenchVersus.Run(contenders, imagePath, prompt, newTokens, warmup, runs, Progress);
            }
            finally
            {
                foreach (var c in contenders.Skip(1)) c.Model.Dispose();
            }
        }

        DecodeProfile? decodeProfile = null;
        if (profiler is not null)
        {
            Progress("profile: timing the LM head alone");
            decodeProfile = DecodeProfile.Of(profiler, model, results.Sum(x => x.ProfiledSteps), results.Sum(x => x.ProfiledSeconds));
        }

        MemoryBandwidthResult? probe = null, mappedProbe = null;
        if (probeMb > 0)
        {
            Progress($"memory read probe: {probeMb} MB on {KernelThreading.MaxThreads} threads");
            probe = MemoryBandwidth.MeasureRead((long)probeMb << 20);
            Progress(string.Create(CultureInfo.InvariantCulture, $"memory read {probe.MedianGBps:F1} GB/s median, {probe.BestGBps:F1} GB/s best"));
            // The same probe over the weights decode streams, read where they are (the mapped checkpoint, private copies).
            var regions = model.Decoder.DecodeWeightRegions();
            Progress($"mapped read probe: the {regions.Count} weight matrices decode streams, in place");
            mappedProbe = MemoryBandwidth.MeasureRead(regions);
            Progress(string.Create(CultureInfo.InvariantCulture, $"mapped read {mappedProbe.MedianGBps:F1} GB/s median, {mappedProbe.BestGBps:F1} GB/s best"));
        }

        double? loadAverageEnd = ProcessStats.LoadAverage();
        double preprocess = Median(results.Select(x => x.PreprocessSeconds));
        double vision = Median(results.Select(x => x.VisionSeconds));
        double prefill = Median(results.Select(x => x.PrefillSeconds));
        int decodeSteps = newTokens - 1;
        double decodePerToken = Median(results.Select(x => x.DecodeSeconds / decodeSteps));
        double decodeTokensPerSecond = 1 / decodePerToken;
        double decodeGBps = weightBytesPerToken / decodePerToken / 1e9;
        int countedSteps = Math.Max(1, decodeSteps - 1);   // allocation is counted after the first decode step
        double allocatedPerToken = Median(results.Select(x => (double)x.AllocatedBytes / countedSteps));
        double allocatedPerTokenThread = Median(results.Select(x => (double)x.AllocatedBytesThisThread / countedSteps));

        if (json)
        {
            var buffer = new ArrayBufferWriter<byte>();
            using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
            {
                w.WriteStartObject();
                w.WriteString("model", Path.GetFullPath(modelDir));
                w.WriteString("weights_dtype", WeightsName(model));
                w.WriteString("image", imagePath ?? "synthetic 640x480 gradient");
                w.WriteString("prompt", prompt);
                w.WriteNumber("prompt_tokens", promptTokens);
                w.WriteNumber("new_tokens", newTokens);
                w.WriteNumber("decode_steps", decodeSteps);
                w.WriteNumber("runs", runs);
                w.WriteNumber("warmup_runs", warmup);
                w.WriteNumber("threads", KernelThreading.MaxThreads);
                w.WriteNumber("processor_count", Environment.ProcessorCount);
                w.WriteString("vector_width", KernelInfo.VectorWidth);
                w.WriteString("runtime", System.Runtime.InteropServices.RuntimeInformation.FrameworkDescription);
                WriteOptional(w, "load_average_1m_start", loadAverageStart);
                WriteOptional(w, "load_average_1m_end", loadAverageEnd);
                w.WriteNumber("load_s", Round(loadSeconds));
                w.WriteNumber("preprocess_s", Round(preprocess));
                w.WriteNumber("vision_s", Round(vision));
                w.WriteNumber("prefill_s", Round(prefill));
                w.WriteNumber("prefill_tokens_per_s", Round(promptTokens / prefill));
                w.WriteNumber("decode_s_per_token", Round(decodePerToken));
                w.WriteNumber("decode_tokens_per_s", Round(decodeTokensPerSecond));
                w.WriteNumber("decode_weight_bytes_per_token", weightBytesPerToken);
                w.WriteNumber("decode_weight_gb_per_s", Round(decodeGBps));
                if (adapterStats is { } adapter)
                {
                    w.WriteString("adapter", Path.GetFullPath(adapterDir!));
                    w.WriteString("adapter_mode", mergeAdapter ? "merged" : "runtime");
                    w.WriteNumber("adapter_modules", adapter.Modules);
                    w.WriteNumber("adapter_rank", adapter.Rank);
                    w.WriteNumber("adapter_file_bytes", adapter.FileBytes);
                    w.WriteNumber("adapter_memory_bytes", adapter.MemoryBytes);
                    w.WriteNumber("adapter_decode_bytes_per_token", adapter.DecodeBytesPerToken);
                    if (mergeAdapter)
                    {
                        w.WriteNumber("merged_weight_bytes", adapter.MergedWeightBytes);
                        // Load and merge together: the private copies plus the base pages the merge read.
                        WriteOptional(w, "load_and_merge_rss_added_bytes", rssAfterLoad - rssBeforeLoad);
                    }
                    else
                    {
                        w.WriteNumber("adapter_load_s", Round(adapterLoadSeconds));
                        WriteOptional(w, "adapter_rss_added_bytes", rssAfterAdapter - rssAfterLoad);
                    }
                }
                else
                {
                    w.WriteNull("adapter");
                }
                WriteOptional(w, "rss_before_load_bytes", rssBeforeLoad);
                WriteOptional(w, "rss_after_load_bytes", rssAfterLoad);
                WriteOptional(w, "rss_after_adapter_bytes", rssAfterAdapter);
                WriteProbe(w, "memory_read", "memory_probe_bytes", probe, decodeGBps);
                WriteProbe(w, "mapped_read", "mapped_read_bytes", mappedProbe, decodeGBps);
                decodeProfile?.WriteJson(w);
                if (versus is not null) BenchVersus.WriteJson(w, versus, probe?.MedianGBps);
                if (peakRss is long rss) w.WriteNumber("peak_rss_bytes", rss);
                else w.WriteNull("peak_rss_bytes");
                w.WriteNumber("allocated_bytes_per_decode_token", Math.Round(allocatedPerToken));
                w.WriteNumber("allocated_bytes_per_decode_token_this_thread", Math.Round(allocatedPerTokenThread));
                if (interleaved is not null)
                {
                    w.WriteStartObject("interleaved_vs_merged");
                    w.WriteNumber("steps", interleaved.Steps);
                    w.WriteNumber("runtime_decode_s_per_token_median", Round(interleaved.RuntimeMedianStepSeconds));
                    w.WriteNumber("merged_decode_s_per_token_median", Round(interleaved.MergedMedianStepSeconds));
                    w.WriteNumber("base_decode_s_per_token_median", Round(interleaved.BaseMedianStepSeconds));
                    w.WriteNumber("runtime_over_merged", Round(interleaved.Ratio));
                    w.WriteNumber("runtime_over_base", Round(interleaved.RuntimeMedianStepSeconds / interleaved.BaseMedianStepSeconds));
                    w.WriteNumber("merged_over_base", Round(interleaved.MergedMedianStepSeconds / interleaved.BaseMedianStepSeconds));
                    w.WriteNumber("runtime_decode_s_total", Round(interleaved.RuntimeTotalSeconds));
                    w.WriteNumber("merged_decode_s_total", Round(interleaved.MergedTotalSeconds));
                    w.WriteNumber("base_decode_s_total", Round(interleaved.BaseTotalSeconds));
                    w.WriteEndObject();
                }
                w.WriteStartArray("runs_detail");
                foreach (var run in results)
                {
                    w.WriteStartObject();
                    w.WriteNumber("preprocess_s", Round(run.PreprocessSeconds));
                    w.WriteNumber("vision_s", Round(run.VisionSeconds));
                    w.WriteNumber("prefill_s", Round(run.PrefillSeconds));
                    w.WriteStartArray("decode_step_s");
                    foreach (double step in run.DecodeStepSeconds) w.WriteNumberValue(Round(step));
                    w.WriteEndArray();
                    w.WriteEndObject();
                }
                w.WriteEndArray();
                w.WriteEndObject();
            }
            Console.Out.WriteLine(Encoding.UTF8.GetString(buffer.WrittenSpan));
        }
        else
        {
            var o = Console.Out;
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"load        {loadSeconds * 1000,10:F1} ms"));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"preprocess  {preprocess * 1000,10:F1} ms"));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"vision      {vision * 1000,10:F1} ms"));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"prefill     {prefill * 1000,10:F1} ms  {promptTokens} tokens, {promptTokens / prefill:F1} tokens/s"));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"decode      {decodePerToken * 1000,10:F1} ms/token  {decodeTokensPerSecond:F2} tokens/s, {decodeGBps:F1} GB/s of weights ({weightBytesPerToken / 1e9:F2} GB/token)"));
            if (probe is not null)
                o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"memory read {probe.MedianGBps,10:F1} GB/s  (decode reaches {100 * decodeGBps / probe.MedianGBps:F0}%; {probe.BufferBytes >> 20} MB of fresh anonymous memory)"));
            if (mappedProbe is not null)
                o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"mapped read {mappedProbe.MedianGBps,10:F1} GB/s  (decode reaches {100 * decodeGBps / mappedProbe.MedianGBps:F0}%; the {mappedProbe.BufferBytes / 1e9:F2} GB of weights decode streams, read in place)"));
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"peak RSS    {(peakRss is long p ? $"{p / 1e9:F2} GB" : "n/a"),10}"));
            if (adapterStats is { } adapter)
            {
                string added = rssAfterAdapter - rssAfterLoad is long bytes ? $"{bytes / 1e6:F1} MB" : "n/a";
                if (mergeAdapter)
                    o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"adapter     {adapter.FileBytes / 1e6,10:F2} MB  merged: {adapter.Modules} modules, r {adapter.Rank}, {adapter.MergedWeightBytes / 1e9:F2} GB of private weight copies"));
                else
                    o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"adapter     {adapter.FileBytes / 1e6,10:F2} MB  run time: {adapter.Modules} modules, r {adapter.Rank}, {adapter.MemoryBytes / 1e6:F2} MB in fp32, RSS added {added}"));
            }
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"allocated   {allocatedPerToken,10:F0} bytes/decode token after the first step ({allocatedPerTokenThread:F0} on the decoding thread)"));
            if (interleaved is not null)
                o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"interleaved {interleaved.RuntimeMedianStepSeconds * 1000,10:F1} ms/token run time, {interleaved.MergedMedianStepSeconds * 1000:F1} merged, {interleaved.BaseMedianStepSeconds * 1000:F1} base ({interleaved.Steps} steps each): run time / merged {interleaved.Ratio:F3}"));
            if (versus is not null) BenchVersus.WriteText(o, versus, probe?.MedianGBps);
            decodeProfile?.WriteText(o);
            if (profiler is not null)
            {
                visionProfile.WriteText(o);
                prefillProfile.WriteText(o);
            }
        }
        return 0;
    }

    private static RunTimings RunOnce(PaliGemmaModel model, LoraAdapter? adapter, string? imagePath, string prompt, int newTokens, out int promptTokens, Action<string> progress,
        ProfilingBackend? profiler = null, PhaseProfile? visionProfile = null, PhaseProfile? prefillProfile = null)
    {
        var t = new RunTimings();
        var clock = Stopwatch.StartNew();
        var image = imagePath is null ? GradientImage(640, 480) : ImageLoader.Load(imagePath);
        float[] pixels = model.Preprocess(image);
        int[] ids = model.Tokenizer.BuildPrompt(prompt, model.NumImageTokens);
        t.PreprocessSeconds = clock.Elapsed.TotalSeconds;
        promptTokens = ids.Length;

        if (profiler is not null) visionProfile?.Begin(profiler);
        clock.Restart();
        float[] features = model.EncodeImages(pixels, 1, null, default, adapter);
        t.VisionSeconds = clock.Elapsed.TotalSeconds;
        if (profiler is not null) visionProfile?.End(profiler, t.VisionSeconds);
        progress(string.Create(CultureInfo.InvariantCulture, $"vision {t.VisionSeconds:F2} s"));

        var session = new PaliGemmaSession(model, 1, ids.Length + newTokens, adapter);
        var logits = new float[session.VocabSize];
        if (profiler is not null) prefillProfile?.Begin(profiler);
        clock.Restart();
        session.Prefill(ids, default, ids.Length, features, logits);
        t.PrefillSeconds = clock.Elapsed.TotalSeconds;
        if (profiler is not null) prefillProfile?.End(profiler, t.PrefillSeconds);
        progress(string.Create(CultureInfo.InvariantCulture, $"prefill {ids.Length} tokens {t.PrefillSeconds:F2} s ({ids.Length / t.PrefillSeconds:F1} tokens/s)"));

        // Greedy, ignoring <eos>: a random model may emit it at any step, and every run must decode the same number of tokens.
        int[] next = [TensorPrimitives.IndexOfMax(logits)];
        var stepClock = new Stopwatch();
        t.DecodeStepSeconds.Capacity = newTokens;   // the timing list must not allocate inside the measured loop
        // Allocation is counted from the second step on: the first one sizes per-thread kernel scratch (once per process).
        long allocatedBefore = 0, threadBefore = 0;
        for (int step = 1; step < newTokens; step++)
        {
            if (step == 2)
            {
                allocatedBefore = GC.GetTotalAllocatedBytes(precise: true);
                threadBefore = GC.GetAllocatedBytesForCurrentThread();
            }
            // The profile leaves out the first step of a run, as the allocation count does.
            if (profiler is not null) profiler.Recording = step >= 2;
            stepClock.Restart();
            session.Decode(next, logits);
            next[0] = TensorPrimitives.IndexOfMax(logits);
            double seconds = stepClock.Elapsed.TotalSeconds;
            t.DecodeStepSeconds.Add(seconds);
            if (profiler is { Recording: true })
            {
                t.ProfiledSteps++;
                t.ProfiledSeconds += seconds;
            }
        }
        if (profiler is not null) profiler.Recording = false;
        if (newTokens > 2)
        {
            t.AllocatedBytesThisThread = GC.GetAllocatedBytesForCurrentThread() - threadBefore;
            t.AllocatedBytes = GC.GetTotalAllocatedBytes(precise: true) - allocatedBefore;
        }
        progress(string.Create(CultureInfo.InvariantCulture,
            $"decode {newTokens - 1} steps {t.DecodeSeconds:F2} s ({(newTokens - 1) / t.DecodeSeconds:F2} tokens/s)"));
        return t;
    }

    private sealed record InterleavedResult(int Steps, double RuntimeMedianStepSeconds, double MergedMedianStepSeconds, double BaseMedianStepSeconds,
        double RuntimeTotalSeconds, double MergedTotalSeconds, double BaseTotalSeconds)
    {
        public double Ratio => RuntimeMedianStepSeconds / MergedMedianStepSeconds;
    }

    /// <summary>
    /// Decodes with the run-time adapter, the merged model and the base model without an adapter in turn, one step each,
    /// the order rotated every step: all three see the same load from other processes, so their ratios hold on a busy
    /// machine where separate runs drift. The base separates the low-rank work (run time vs base, same mapped weights)
    /// from the effect of reading private copies instead of mapped file pages (merged vs base).
    /// </summary>
    private static InterleavedResult Interleave(PaliGemmaModel model, LoraAdapter adapter, PaliGemmaModel merged, string? imagePath, string prompt,
        int newTokens, int runs, Action<string> progress)
    {
        var steps = new[] { new List<double>(), new List<double>(), new List<double>() };   // run time, merged, base
        var clock = new Stopwatch();
        for (int r = 0; r < runs; r++)
        {
            var image = imagePath is null ? GradientImage(640, 480) : ImageLoader.Load(imagePath);
            int[] ids = model.Tokenizer.BuildPrompt(prompt, model.NumImageTokens);
            float[] pixels = model.Preprocess(image);
            var sessions = new[]
            {
                new PaliGemmaSession(model, 1, ids.Length + newTokens, adapter),
                new PaliGemmaSession(merged, 1, ids.Length + newTokens),
                new PaliGemmaSession(model, 1, ids.Length + newTokens),
            };
            var logits = sessions.Select(x => new float[x.VocabSize]).ToArray();
            sessions[0].Prefill(ids, default, ids.Length, model.EncodeImages(pixels, 1, null, default, adapter), logits[0]);
            sessions[1].Prefill(ids, default, ids.Length, merged.EncodeImages(pixels, 1), logits[1]);
            sessions[2].Prefill(ids, default, ids.Length, model.EncodeImages(pixels, 1), logits[2]);
            // Each session follows its own greedy tokens (they part ways: the adapter changes them, bf16 rounding may too).
            var next = logits.Select(l => new[] { TensorPrimitives.IndexOfMax(l) }).ToArray();
            var seconds = new double[sessions.Length];
            for (int step = 1; step < newTokens; step++)
            {
                BenchVersus.DecodeInTurn(sessions, next, logits, step, seconds, clock);
                for (int s = 0; s < seconds.Length; s++) steps[s].Add(seconds[s]);
            }
            progress(string.Create(CultureInfo.InvariantCulture, $"interleaved run {r + 1}/{runs}: {newTokens - 1} steps each"));
        }
        return new InterleavedResult(steps[0].Count, Median(steps[0]), Median(steps[1]), Median(steps[2]), steps[0].Sum(), steps[1].Sum(), steps[2].Sum());
    }

    /// <summary>Sizes of a loaded adapter: its file, its fp32 A and B, the part read per decode token, and merged copies.</summary>
    private readonly record struct AdapterStats(int Modules, int Rank, long FileBytes, long MemoryBytes, long DecodeBytesPerToken, long MergedWeightBytes)
    {
        public static AdapterStats? Of(LoraAdapter? adapter)
        {
            if (adapter is null) return null;
            long memory = 0, decode = 0, merged = 0;
            foreach (var m in adapter.Modules)
            {
                long bytes = ((long)m.A.Length + m.BTransposed.Length) * sizeof(float);
                memory += bytes;
                if (m.Name.StartsWith("language_model.", StringComparison.Ordinal)) decode += bytes;
                if (m.Layer.HasMergedWeight) merged += (long)m.Layer.Weight.Rows * m.Layer.Weight.Cols * m.Layer.Weight.DType.SizeOf();
            }
            long file = new FileInfo(Path.Combine(adapter.Directory, LoraAdapter.WeightsFileName)).Length;
            return new AdapterStats(adapter.Modules.Count, adapter.Config.Rank, file, memory, decode, merged);
        }
    }

    /// <summary>A smooth RGB gradient: the preprocessing work of a real photo without needing a file.</summary>
    internal static RgbImage GradientImage(int width, int height)
    {
        var pixels = new byte[width * height * 3];
        for (int y = 0; y < height; y++)
        for (int x = 0; x < width; x++)
        {
            int i = (y * width + x) * 3;
            pixels[i] = (byte)(255 * x / Math.Max(1, width - 1));
            pixels[i + 1] = (byte)(255 * y / Math.Max(1, height - 1));
            pixels[i + 2] = (byte)(255 * (x + y) / Math.Max(1, width + height - 2));
        }
        return new RgbImage(width, height, pixels);
    }

    private static void WriteOptional(Utf8JsonWriter w, string name, long? value)
    {
        if (value is long v) w.WriteNumber(name, v);
        else w.WriteNull(name);
    }

    private static void WriteOptional(Utf8JsonWriter w, string name, double? value)
    {
        if (value is double v) w.WriteNumber(name, Round(v));
        else w.WriteNull(name);
    }

    internal static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        int n = sorted.Length;
        return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    }

    /// <summary>A read probe's median, best, size and decode's share of the median as "{name}_gb_per_s"..., or null when it did not run.</summary>
    private static void WriteProbe(Utf8JsonWriter w, string name, string bytesName, MemoryBandwidthResult? probe, double decodeGBps)
    {
        if (probe is null)
        {
            w.WriteNull($"{name}_gb_per_s");
            return;
        }
        w.WriteNumber($"{name}_gb_per_s", Round(probe.MedianGBps));
        w.WriteNumber($"{name}_gb_per_s_best", Round(probe.BestGBps));
        w.WriteNumber(bytesName, probe.BufferBytes);
        w.WriteNumber($"decode_fraction_of_{name}", Round(decodeGBps / probe.MedianGBps));
    }

    internal static double Round(double value) => double.IsFinite(value) ? Math.Round(value, 6) : 0;
}
