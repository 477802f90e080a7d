using System.Diagnostics;
using PaliGemma.CpuOnly.Model.Imaging;

namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>The outcome of one task: the raw text, the parsed objects (detect/segment) and how long each part took.</summary>
public sealed class TaskResult
{
    public required PaliGemmaTask Task { get; init; }
    public required string Prompt { get; init; }
    /// <summary>The generated text as decoded, loc/seg tokens included, without the final &lt;eos&gt;.</summary>
    public required string Text { get; init; }
    /// <summary>Objects parsed from <see cref="Text"/> for detect and segment; empty for the other tasks.</summary>
    public required IReadOnlyList<DetectedObject> Objects { get; init; }
    public required int ImageWidth { get; init; }
    public required int ImageHeight { get; init; }
    public required int[] PromptIds { get; init; }
    public required int[] GeneratedIds { get; init; }
    public required bool StoppedAtEos { get; init; }
    public required GenerationTimings Timings { get; init; }
    /// <summary>Time spent decoding segmentation masks (zero without a mask decoder).</summary>
    public TimeSpan MaskDecode { get; init; }
}

/// <summary>
/// PaliGemma's tasks over a loaded model: builds the prompt, generates, and parses boxes and masks. Segment outputs get
/// full-image masks when a <see cref="MaskDecoder"/> is given; without one their objects carry only the seg codes.
/// </summary>
public sealed class PaliGemmaTasks
{
    private readonly PaliGemmaGenerator _generator;

    public PaliGemmaTasks(PaliGemmaModel model, MaskDecoder? maskDecoder = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        Model = model;
        MaskDecoder = maskDecoder;
        _generator = new PaliGemmaGenerator(model);
    }

    public PaliGemmaModel Model { get; }
    public MaskDecoder? MaskDecoder { get; }

    public TaskResult Caption(RgbImage image, string language = TaskPrompts.DefaultLanguage, GenerationOptions? options = null, CancellationToken cancellationToken = default) =>
        Run(image, TaskPrompts.Caption(language), options, cancellationToken);

    public TaskResult Answer(RgbImage image, string question, string language = TaskPrompts.DefaultLanguage, GenerationOptions? options = null, CancellationToken cancellationToken = default) =>
        Run(image, TaskPrompts.Answer(question, language), options, cancellationToken);

    public TaskResult Detect(RgbImage image, IReadOnlyList<string> objects, GenerationOptions? options = null, CancellationToken cancellationToken = default) =>
        Run(image, TaskPrompts.Detect(objects), options, cancellationToken);

    public TaskResult Segment(RgbImage image, IReadOnlyList<string> objects, GenerationOptions? options = null, CancellationToken cancellationToken = default) =>
        Run(image, TaskPrompts.Segment(objects), options, cancellationToken);

    public TaskResult Ocr(RgbImage image, GenerationOptions? options = null, CancellationToken cancellationToken = default) =>
        Run(image, TaskPrompts.Ocr(), options, cancellationToken);

    /// <summary>Runs any prompt; objects are parsed when its first word is detect or segment.</summary>
    public TaskResult Run(RgbImage image, string prompt, GenerationOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(image);
        ArgumentNullException.ThrowIfNull(prompt);
        var generated = _generator.Generate(new GenerationRequest(image, prompt), options ?? new GenerationOptions(), null, cancellationToken);
        return ToTaskResult(image, prompt, generated, MaskDecoder);
    }

    /// <summary>
    /// Turns a finished generation into a task result: detect and segment answers are parsed into objects (boxes in
    /// <paramref name="image"/>'s pixels) and, with a <paramref name="maskDecoder"/>, segment masks are decoded.
    /// </summary>
    public static TaskResult ToTaskResult(RgbImage image, string prompt, GenerationResult generated, MaskDecoder? maskDecoder)
    {
        var task = TaskPrompts.TaskOf(prompt);
        IReadOnlyList<DetectedObject> objects = task is PaliGemmaTask.Detect or PaliGemmaTask.Segment
            ? OutputParser.Parse(generated.Text, image.Width, image.Height)
            : [];
        var clock = Stopwatch.StartNew();
        if (maskDecoder is not null) DecodeMasks(objects, maskDecoder);
        return new TaskResult
        {
            Task = task,
            Prompt = prompt,
            Text = generated.Text,
            Objects = objects,
            ImageWidth = image.Width,
            ImageHeight = image.Height,
            PromptIds = generated.PromptIds,
            GeneratedIds = generated.GeneratedIds,
            StoppedAtEos = generated.StoppedAtEos,
            Timings = generated.Timings,
            MaskDecode = clock.Elapsed,
        };
    }

    /// <summary>Decodes the full-image mask of every object that has seg codes (see <see cref="DetectedObject.Mask"/>).</summary>
    public static void DecodeMasks(IReadOnlyList<DetectedObject> objects, MaskDecoder decoder)
    {
        ArgumentNullException.ThrowIfNull(objects);
        ArgumentNullException.ThrowIfNull(decoder);
        Span<int> codes = stackalloc int[16];
        foreach (var o in objects)
        {
            if (o.Seg is not { } seg) continue;
            for (int i = 0; i < 16; i++) codes[i] = seg[i];
            float[] mask64 = decoder.Decode(codes);
            o.SetMask(MaskPlacement.FullMask(mask64, o.MaskPixelBox, o.ImageWidth, o.ImageHeight));
        }
    }
}
