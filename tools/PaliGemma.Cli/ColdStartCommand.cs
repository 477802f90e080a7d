using System.Buffers;
using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Diagnostics;
using PaliGemma.CpuOnly.Model.Imaging;

namespace PaliGemma.Cli;

/// <summary>What one probe process reports about itself: monotonic timestamps (<see cref="Stopwatch.GetTimestamp"/>, one
/// clock for every process on the host) and its peak resident set.</summary>
public sealed record ColdStartReading(string Runtime, long EnteredTicks, long ReadyTicks, long FirstTokenTicks, int FirstTokenId,
    double LoadMilliseconds, long? PeakRssAtReadyBytes, long? PeakRssBytes)
{
    public const string Prefix = "cold-start-probe";

    /// <summary>One line of <c>key=value</c> pairs after <see cref="Prefix"/>; RSS is -1 where /proc is missing.</summary>
    public string Format() => string.Create(CultureInfo.InvariantCulture,
        $"{Prefix} runtime={Runtime} entered={EnteredTicks} ready={ReadyTicks} first_token={FirstTokenTicks} first_token_id={FirstTokenId} " +
        $"load_ms={LoadMilliseconds:R} peak_rss_ready={PeakRssAtReadyBytes ?? -1} peak_rss={PeakRssBytes ?? -1}");

    /// <summary>Reads the probe line out of a probe's whole stdout.</summary>
    /// <exception cref="InvalidDataException">No probe line, a missing or malformed field, or timestamps out of order.</exception>
    public static ColdStartReading Parse(string output)
    {
        string? line = output.Split('\n').Select(l => l.Trim()).LastOrDefault(l => l.StartsWith(Prefix + " ", StringComparison.Ordinal));
        if (line is null) throw new InvalidDataException($"no '{Prefix}' line in the probe's output: '{Shorten(output)}'");
        var fields = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (string pair in line[(Prefix.Length + 1)..].Split(' ', StringSplitOptions.RemoveEmptyEntries))
        {
            int eq = pair.IndexOf('=');
            if (eq <= 0 || !fields.TryAdd(pair[..eq], pair[(eq + 1)..]))
                throw new InvalidDataException($"malformed or repeated field '{pair}' in probe line '{line}'");
        }
        string Field(string name) => fields.TryGetValue(name, out var v) ? v : throw new InvalidDataException($"probe line lacks '{name}': '{line}'");
        long Long(string name) => long.TryParse(Field(name), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out long v)
            ? v : throw new InvalidDataException($"probe field '{name}' is not an integer: '{line}'");
        long? Rss(string name) => Long(name) is var v && v >= 0 ? v : null;
        if (!double.TryParse(Field("load_ms"), NumberStyles.Float, CultureInfo.InvariantCulture, out double loadMs))
            throw new InvalidDataException($"probe field 'load_ms' is not a number: '{line}'");
        var reading = new ColdStartReading(Field("runtime"), Long("entered"), Long("ready"), Long("first_token"), checked((int)Long("first_token_id")),
            loadMs, Rss("peak_rss_ready"), Rss("peak_rss"));
        if (reading.ReadyTicks < reading.EnteredTicks || reading.FirstTokenTicks < reading.ReadyTicks)
            throw new InvalidDataException($"probe timestamps out of order (entered <= ready <= first token expected): '{line}'");
        return reading;
    }

    private static string Shorten(string text) => text.Length <= 300 ? text.Trim() : text[..300].Trim() + "...";
}

/// <summary>One spawned run seen from the parent: the probe's reading plus when the parent started the process.</summary>
public sealed record ColdStartRun(long SpawnTicks, long ExitTicks, ColdStartReading Reading)
{
    public double StartToMainMs => Milliseconds(Reading.EnteredTicks - SpawnTicks);
    public double StartToReadyMs => Milliseconds(Reading.ReadyTicks - SpawnTicks);
    public double StartToFirstTokenMs => Milliseconds(Reading.FirstTokenTicks - SpawnTicks);
    public double StartToExitMs => Milliseconds(ExitTicks - SpawnTicks);

    internal static double Milliseconds(long ticks) => ticks * 1000.0 / Stopwatch.Frequency;
}

/// <summary>
/// <c>paligemma bench --cold-start</c>: spawns a <c>paligemma</c> binary (by default this one) several times; each child
/// loads the model, reports when it was ready and when the first generated token came out, and exits. Times are measured
/// from just before the parent starts the child, so they include exec and runtime start-up, as a user would see them.
/// </summary>
public static class ColdStartCommand
{
    /// <summary>The hidden command a child runs; not in the help.</summary>
    public const string ProbeCommand = "__cold-start-probe";

    private static readonly HashSet<string> Flags = ["cold-start", "json", "quiet", "no-first-token"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        a.Flag("cold-start");
        string modelDir = a.Required("model");
        string? binary = a.Optional("binary");
        string? tokenizerPath = a.Optional("tokenizer");
        string? imagePath = a.Optional("image");
        string prompt = a.Optional("prompt") ?? "caption en";
        int runs = a.Int("runs", 5, 1, 1000);
        bool json = a.Flag("json"), quiet = a.Flag("quiet"), noFirstToken = a.Flag("no-first-token");
        a.RejectUnknown();
        if (!Directory.Exists(modelDir)) throw new DirectoryNotFoundException($"'{modelDir}': model folder not found");

        var (fileName, prefixArgs) = ResolveBinary(binary);
        var probeArgs = new List<string>(prefixArgs) { ProbeCommand, "--model", modelDir, "--prompt", prompt };
        if (tokenizerPath is not null) probeArgs.AddRange(["--tokenizer", tokenizerPath]);
        if (imagePath is not null) probeArgs.AddRange(["--image", imagePath]);
        if (noFirstToken) probeArgs.Add("--no-first-token");

        var results = new List<ColdStartRun>(runs);
        for (int r = 0; r < runs; r++)
        {
            var run = SpawnOnce(fileName, probeArgs);
            results.Add(run);
            if (!quiet)
                Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"[cold-start] run {r + 1}/{runs}: ready {run.StartToReadyMs:F1} ms, first token {(noFirstToken ? "skipped" : $"{run.StartToFirstTokenMs:F1} ms")}, exit {run.StartToExitMs:F1} ms"));
        }

        var summary = ColdStartSummary.From(results);
        string runtime = results[0].Reading.Runtime;
        if (json) Console.Out.WriteLine(ToJson(fileName, modelDir, runtime, summary, results, noFirstToken));
        else WriteTable(Console.Out, fileName, modelDir, runtime, summary, noFirstToken);
        return 0;
    }

    /// <summary>The binary and leading arguments that run this CLI: an explicit path, this apphost/AOT binary, or dotnet + paligemma.dll.</summary>
    internal static (string FileName, string[] PrefixArgs) ResolveBinary(string? binary)
    {
        if (binary is not null)
        {
            if (!File.Exists(binary)) throw new FileNotFoundException($"'{binary}': --binary not found", binary);
            string full = Path.GetFullPath(binary);
            return full.EndsWith(".dll", StringComparison.OrdinalIgnoreCase) ? ("dotnet", [full]) : (full, []);
        }
        string self = Environment.ProcessPath ?? throw new InvalidOperationException("cannot tell which binary is running; pass --binary");
        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
            return (self, [Path.Combine(AppContext.BaseDirectory, "paligemma.dll")]);
        return (self, []);
    }

    private static ColdStartRun SpawnOnce(string fileName, IReadOnlyList<string> args)
    {
        var info = new ProcessStartInfo(fileName)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string arg in args) info.ArgumentList.Add(arg);
        long spawn = Stopwatch.GetTimestamp();
        using var process = Process.Start(info) ?? throw new InvalidOperationException($"'{fileName}': could not start the probe");
        var stderr = process.StandardError.ReadToEndAsync();
        string stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        long exit = Stopwatch.GetTimestamp();
        if (process.ExitCode != 0)
            throw new InvalidOperationException($"'{fileName}' {ProbeCommand} exited with code {process.ExitCode}: {stderr.Result.Trim()}");
        return new ColdStartRun(spawn, exit, ColdStartReading.Parse(stdout));
    }

    /// <summary>The child side: load, report ready, produce one greedy token, report it, exit.</summary>
    public static int Probe(string[] args)
    {
        long entered = Stopwatch.GetTimestamp();
        var a = new ParsedArguments(args, new HashSet<string> { "no-first-token" });
        string modelDir = a.Required("model");
        string? tokenizerPath = a.Optional("tokenizer");
        string? imagePath = a.Optional("image");
        string prompt = a.Optional("prompt") ?? "caption en";
        bool noFirstToken = a.Flag("no-first-token");
        a.RejectUnknown();

        using var model = PaliGemmaModel.Load(modelDir, new PaliGemmaLoadOptions { TokenizerPath = tokenizerPath, Backend = CliBackend.Current });
        long ready = Stopwatch.GetTimestamp();
        long? rssReady = ProcessStats.PeakResidentBytes();

        int firstToken = -1;
        long firstTokenTicks = ready;
        if (!noFirstToken)
        {
            var image = imagePath is null ? BenchCommand.GradientImage(640, 480) : ImageLoader.Load(imagePath);
            float[] pixels = model.Preprocess(image);
            int[] ids = model.Tokenizer.BuildPrompt(prompt, model.NumImageTokens);
            float[] features = model.EncodeImages(pixels, 1);
            var session = new PaliGemmaSession(model, 1, ids.Length + 1);
            var logits = new float[session.VocabSize];
            session.Prefill(ids, default, ids.Length, features, logits);
            firstToken = TensorPrimitives.IndexOfMax(logits);
            firstTokenTicks = Stopwatch.GetTimestamp();
        }

        string runtime = System.Runtime.CompilerServices.RuntimeFeature.IsDynamicCodeSupported ? "JIT" : "NativeAOT";
        var reading = new ColdStartReading(runtime, entered, ready, firstTokenTicks, firstToken, model.LoadTime.TotalMilliseconds,
            rssReady, ProcessStats.PeakResidentBytes());
        Console.Out.WriteLine(reading.Format());
        return 0;
    }

    private static void WriteTable(TextWriter o, string binary, string modelDir, string runtime, ColdStartSummary s, bool noFirstToken)
    {
        o.WriteLine($"cold start: {binary} ({runtime}), model {modelDir}, medians of {s.Runs} runs");
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"start -> main         {s.StartToMainMs,10:F1} ms"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"start -> ready        {s.StartToReadyMs,10:F1} ms  (PaliGemmaModel.Load {s.LoadMs:F1} ms)"));
        if (!noFirstToken)
            o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"start -> first token  {s.StartToFirstTokenMs,10:F1} ms"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"start -> exit         {s.StartToExitMs,10:F1} ms"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"peak RSS at ready     {Megabytes(s.PeakRssAtReadyBytes),10} MB"));
        o.WriteLine(string.Create(CultureInfo.InvariantCulture, $"peak RSS              {Megabytes(s.PeakRssBytes),10} MB"));
    }

    private static string Megabytes(double? bytes) =>
        bytes is double b ? (b / (1 << 20)).ToString("F1", CultureInfo.InvariantCulture) : "n/a";

    private static string ToJson(string binary, string modelDir, string runtime, ColdStartSummary s, List<ColdStartRun> runs, bool noFirstToken)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            w.WriteStartObject();
            w.WriteString("binary", binary);
            w.WriteString("runtime", runtime);
            w.WriteString("model", Path.GetFullPath(modelDir));
            w.WriteNumber("runs", s.Runs);
            w.WriteNumber("start_to_main_ms", Math.Round(s.StartToMainMs, 3));
            w.WriteNumber("start_to_ready_ms", Math.Round(s.StartToReadyMs, 3));
            w.WriteNumber("load_ms", Math.Round(s.LoadMs, 3));
            if (noFirstToken) w.WriteNull("start_to_first_token_ms");
            else w.WriteNumber("start_to_first_token_ms", Math.Round(s.StartToFirstTokenMs, 3));
            w.WriteNumber("start_to_exit_ms", Math.Round(s.StartToExitMs, 3));
            WriteBytes(w, "peak_rss_at_ready_bytes", s.PeakRssAtReadyBytes);
            WriteBytes(w, "peak_rss_bytes", s.PeakRssBytes);
            w.WriteStartArray("runs_detail");
            foreach (var run in runs)
            {
                w.WriteStartObject();
                w.WriteNumber("start_to_main_ms", Math.Round(run.StartToMainMs, 3));
                w.WriteNumber("start_to_ready_ms", Math.Round(run.StartToReadyMs, 3));
                if (!noFirstToken)
                {
                    w.WriteNumber("start_to_first_token_ms", Math.Round(run.StartToFirstTokenMs, 3));
                    w.WriteNumber("first_token_id", run.Reading.FirstTokenId);
                }
                WriteBytes(w, "peak_rss_bytes", run.Reading.PeakRssBytes);
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(buffer.WrittenSpan);
    }

    private static void WriteBytes(Utf8JsonWriter w, string name, double? bytes)
    {
        if (bytes is double b) w.WriteNumber(name, Math.Round(b));
        else w.WriteNull(name);
    }
}

/// <summary>Medians over the runs of a cold-start bench.</summary>
public sealed record ColdStartSummary(int Runs, double StartToMainMs, double StartToReadyMs, double StartToFirstTokenMs, double StartToExitMs,
    double LoadMs, double? PeakRssAtReadyBytes, double? PeakRssBytes)
{
    public static ColdStartSummary From(IReadOnlyList<ColdStartRun> runs)
    {
        if (runs.Count == 0) throw new ArgumentException("at least one run is needed", nameof(runs));
        double? RssMedian(Func<ColdStartRun, long?> select) =>
            runs.All(r => select(r) is not null) ? Median(runs.Select(r => (double)select(r)!.Value)) : null;
        return new ColdStartSummary(runs.Count,
            Median(runs.Select(r => r.StartToMainMs)), Median(runs.Select(r => r.StartToReadyMs)),
            Median(runs.Select(r => r.StartToFirstTokenMs)), Median(runs.Select(r => r.StartToExitMs)),
            Median(runs.Select(r => r.Reading.LoadMilliseconds)),
            RssMedian(r => r.Reading.PeakRssAtReadyBytes), RssMedian(r => r.Reading.PeakRssBytes));
    }

    /// <summary>Middle value, or the mean of the two middle values for an even count.</summary>
    public static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToArray();
        if (sorted.Length == 0) throw new ArgumentException("no values", nameof(values));
        int n = sorted.Length;
        return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    }
}
