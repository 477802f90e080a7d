using System.Diagnostics;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.Cli;

/// <summary><c>paligemma caption|answer|detect|segment|ocr</c>: one PaliGemma task on one image.</summary>
public static class TaskCommand
{
    private static readonly HashSet<string> Flags = ["json", "quiet"];

    public static int Run(PaliGemmaTask task, string[] args)
    {
        string command = task.ToString().ToLowerInvariant();
        var a = new ParsedArguments(args, Flags);
        string modelDir = a.Required("model");
        string imagePath = a.Required("image");
        string? tokenizer = a.Optional("tokenizer");
        bool json = a.Flag("json"), quiet = a.Flag("quiet");
        var options = new GenerationOptions
        {
            MaxNewTokens = a.Int("max-new-tokens", task == PaliGemmaTask.Segment ? 128 : 64, 1, 1 << 20),
            Progress = quiet ? null : new StderrProgress(),
        };
        string prompt;
        string? annotate = null, vae = null;
        try
        {
            switch (task)
            {
                case PaliGemmaTask.Caption:
                    prompt = TaskPrompts.Caption(a.Optional("lang") ?? TaskPrompts.DefaultLanguage);
                    break;
                case PaliGemmaTask.Answer:
                    prompt = TaskPrompts.Answer(a.Required("question"), a.Optional("lang") ?? TaskPrompts.DefaultLanguage);
                    break;
                case PaliGemmaTask.Detect:
                    prompt = TaskPrompts.Detect(a.Required("object"));
                    annotate = a.Optional("annotate");
                    break;
                case PaliGemmaTask.Segment:
                    prompt = TaskPrompts.Segment(a.Required("object"));
                    annotate = a.Optional("annotate");
                    vae = a.Optional("vae");
                    break;
                default:
                    prompt = TaskPrompts.Ocr();
                    break;
            }
        }
        catch (ArgumentException e)
        {
            throw new UsageException(TaskSupport.OneLine(e.Message));
        }
        a.RejectUnknown();
        if (annotate is not null && !annotate.EndsWith(".png", StringComparison.OrdinalIgnoreCase))
            throw new UsageException($"--annotate must name a .png file, got '{annotate}'");

        var total = Stopwatch.StartNew();
        // Check the cheap inputs before the model load, so a missing --vae fails fast.
        MaskDecoder? decoder = task == PaliGemmaTask.Segment ? TaskSupport.LoadMaskDecoder(vae, command) : null;
        var clock = Stopwatch.StartNew();
        var image = ImageLoader.Load(imagePath);
        var imageTime = clock.Elapsed;
        TaskSupport.Progress(quiet, $"loading {modelDir}");
        using var model = PaliGemmaModel.Load(modelDir, new PaliGemmaLoadOptions { TokenizerPath = tokenizer, Backend = CliBackend.Current });
        TaskSupport.Progress(quiet, $"loaded in {model.LoadTime.TotalMilliseconds:F0} ms; image {image.Width}x{image.Height}; {prompt}");

        var tasks = new PaliGemmaTasks(model, decoder);
        var result = tasks.Run(image, prompt, options);
        result.Timings.Preprocess += imageTime;
        if (annotate is not null) ResultAnnotator.SavePng(ResultAnnotator.Draw(image, result.Objects), annotate);

        var stdout = Console.Out;
        if (json)
        {
            stdout.WriteLine(TaskJson.Write(false, w =>
            {
                w.WriteStartObject();
                TaskJson.WriteResult(w, result, model.LoadTime.TotalMilliseconds, total.Elapsed.TotalMilliseconds);
                if (annotate is not null) w.WriteString("annotated", annotate);
                w.WriteEndObject();
            }));
        }
        else if (task is PaliGemmaTask.Detect or PaliGemmaTask.Segment)
        {
            if (result.Objects.Count == 0) stdout.WriteLine($"no objects found; raw output: {result.Text}");
            foreach (var o in result.Objects) stdout.WriteLine(TaskJson.Describe(o));
        }
        else
        {
            stdout.WriteLine(result.Text);
        }
        if (annotate is not null) TaskSupport.Progress(quiet, $"wrote {annotate}");
        return 0;
    }
}
