using System.Diagnostics;
using System.Text;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.Cli;

/// <summary>
/// <c>paligemma batch</c>: runs one task per JSONL line with a single model load. A bad line yields a result with "error"
/// and the run goes on; the exit code is 1 when any line failed.
/// </summary>
public static class BatchCommand
{
    private static readonly HashSet<string> Flags = ["quiet"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string modelDir = a.Required("model");
        string inputPath = a.Required("input");
        string? outputPath = a.Optional("output"), vae = a.Optional("vae"), tokenizer = a.Optional("tokenizer");
        bool quiet = a.Flag("quiet");
        int maxNewTokens = a.Int("max-new-tokens", 64, 1, 1 << 20);
        a.RejectUnknown();

        if (!File.Exists(inputPath)) throw new FileNotFoundException($"input file '{inputPath}' not found", inputPath);
        string[] lines = File.ReadAllLines(inputPath);
        string baseDir = Path.GetDirectoryName(Path.GetFullPath(inputPath)) ?? ".";
        int total = lines.Count(l => !string.IsNullOrWhiteSpace(l));
        MaskDecoder? decoder = vae is null ? null : TaskSupport.LoadMaskDecoder(vae, "batch");

        TaskSupport.Progress(quiet, $"loading {modelDir}");
        using var model = PaliGemmaModel.Load(modelDir, new PaliGemmaLoadOptions { TokenizerPath = tokenizer, Backend = CliBackend.Current });
        TaskSupport.Progress(quiet, $"loaded in {model.LoadTime.TotalMilliseconds:F0} ms; {total} lines");
        var tasks = new PaliGemmaTasks(model, decoder);

        using var output = outputPath is null ? null : new StreamWriter(outputPath, false, new UTF8Encoding(false));
        var sink = output ?? Console.Out;
        var clock = Stopwatch.StartNew();
        int done = 0, failed = 0;
        for (int i = 0; i < lines.Length; i++)
        {
            if (string.IsNullOrWhiteSpace(lines[i])) continue;
            string json = RunLine(tasks, lines[i], i + 1, baseDir, maxNewTokens, ref failed);
            sink.WriteLine(json);
            sink.Flush();
            done++;
            double rate = done / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
            TaskSupport.Progress(quiet, FormattableString.Invariant($"{done}/{total} lines, {rate:F2} lines/s, ETA {(total - done) / rate:F0} s"));
        }
        if (failed > 0) Console.Error.WriteLine($"paligemma: {failed} of {total} lines failed (their results hold \"error\")");
        return failed > 0 ? 1 : 0;
    }

    private static string RunLine(PaliGemmaTasks tasks, string line, int lineNumber, string baseDir, int maxNewTokens, ref int failed)
    {
        string? image = null;
        try
        {
            var lineClock = Stopwatch.StartNew();
            string prompt;
            int lineMaxNewTokens;
            using (var doc = JsonDocument.Parse(line))
            {
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException("the line is not a JSON object");
                image = String(root, "image") ?? throw new InvalidDataException("\"image\" is missing");
                prompt = PromptOf(root);
                lineMaxNewTokens = root.TryGetProperty("max_new_tokens", out var m) && m.TryGetInt32(out int n) && n > 0 ? n : maxNewTokens;
            }
            var task = TaskPrompts.TaskOf(prompt);
            if (task == PaliGemmaTask.Segment && tasks.MaskDecoder is null)
                throw new InvalidOperationException($"segment needs the mask decoder: pass --vae FILE. {TaskSupport.OneLine(MaskDecoder.DownloadHint)}");
            string imagePath = Path.IsPathRooted(image) ? image : Path.Combine(baseDir, image);
            var picture = ImageLoader.Load(imagePath);
            var result = tasks.Run(picture, prompt, new GenerationOptions { MaxNewTokens = lineMaxNewTokens });
            return TaskJson.Write(false, w =>
            {
                w.WriteStartObject();
                w.WriteNumber("line", lineNumber);
                w.WriteString("image", image);
                TaskJson.WriteResult(w, result, -1, lineClock.Elapsed.TotalMilliseconds);
                w.WriteEndObject();
            });
        }
        catch (Exception e) when (e is not OutOfMemoryException and not OperationCanceledException)
        {
            failed++;
            string message = TaskSupport.OneLine(e is JsonException ? $"not valid JSON: {e.Message}" : e.Message);
            return TaskJson.Write(false, w =>
            {
                w.WriteStartObject();
                w.WriteNumber("line", lineNumber);
                if (image is not null) w.WriteString("image", image);
                w.WriteString("error", message);
                w.WriteEndObject();
            });
        }
    }

    /// <summary>"prompt" as given, or one built from "task" with "lang", "question" or "objects" (a string "a ; b" or an array).</summary>
    private static string PromptOf(JsonElement root)
    {
        if (String(root, "prompt") is { } prompt)
        {
            if (root.TryGetProperty("task", out _)) throw new InvalidDataException("give \"prompt\" or \"task\", not both");
            return prompt;
        }
        string task = String(root, "task") ?? throw new InvalidDataException("the line needs \"prompt\" or \"task\"");
        string lang = String(root, "lang") ?? TaskPrompts.DefaultLanguage;
        return task switch
        {
            "caption" => TaskPrompts.Caption(lang),
            "answer" => TaskPrompts.Answer(String(root, "question") ?? throw new InvalidDataException("task \"answer\" needs \"question\""), lang),
            "detect" => TaskPrompts.Detect(Objects(root)),
            "segment" => TaskPrompts.Segment(Objects(root)),
            "ocr" => TaskPrompts.Ocr(),
            _ => throw new InvalidDataException($"unknown task \"{task}\" (caption, answer, detect, segment, ocr)"),
        };
    }

    private static IReadOnlyList<string> Objects(JsonElement root)
    {
        if (!root.TryGetProperty("objects", out var objects)) throw new InvalidDataException("detect and segment need \"objects\"");
        if (objects.ValueKind == JsonValueKind.String) return TaskPrompts.SplitObjects(objects.GetString()!);
        if (objects.ValueKind != JsonValueKind.Array) throw new InvalidDataException("\"objects\" must be a string or an array of strings");
        var names = new List<string>();
        foreach (var e in objects.EnumerateArray())
            names.Add(e.ValueKind == JsonValueKind.String ? e.GetString()! : throw new InvalidDataException("\"objects\" must hold strings"));
        return names;
    }

    private static string? String(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null) return null;
        return value.ValueKind == JsonValueKind.String ? value.GetString() : throw new InvalidDataException($"\"{name}\" must be a string");
    }
}
