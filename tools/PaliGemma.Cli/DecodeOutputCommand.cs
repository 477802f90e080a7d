using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.Cli;

/// <summary>
/// <c>paligemma decode-output</c>: turns a raw detect/segment output into boxes, masks and an annotated picture without
/// loading the language model.
/// </summary>
public static class DecodeOutputCommand
{
    private static readonly HashSet<string> Flags = ["json", "quiet"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string text = a.Required("text");
        string? vae = a.Optional("vae"), annotateImage = a.Optional("annotate-image"), outPath = a.Optional("out");
        bool json = a.Flag("json");
        a.Flag("quiet");   // accepted for symmetry with the other commands; nothing is printed on stderr anyway
        bool haveSize = a.Optional("width") is not null || a.Optional("height") is not null;
        int width = a.Int("width", 0, 1, 1 << 20), height = a.Int("height", 0, 1, 1 << 20);
        a.RejectUnknown();
        if ((annotateImage is null) != (outPath is null)) throw new UsageException("--annotate-image and --out go together");
        if (outPath is not null && !outPath.EndsWith(".png", StringComparison.OrdinalIgnoreCase))
            throw new UsageException($"--out must name a .png file, got '{outPath}'");
        if (annotateImage is null && (width == 0 || height == 0))
            throw new UsageException("--width and --height are required (or --annotate-image to take them from the picture)");
        if (haveSize && (width == 0 || height == 0)) throw new UsageException("give both --width and --height");

        MaskDecoder? decoder = vae is null ? null : TaskSupport.LoadMaskDecoder(vae, "decode-output");
        RgbImage? image = null;
        if (annotateImage is not null)
        {
            image = ImageLoader.Load(annotateImage);
            if (width == 0)
            {
                width = image.Width;
                height = image.Height;
            }
            else if (width != image.Width || height != image.Height)
                throw new UsageException($"--width/--height say {width}x{height} but '{annotateImage}' is {image.Width}x{image.Height}");
        }

        var objects = OutputParser.Parse(text, width, height);
        if (decoder is not null) PaliGemmaTasks.DecodeMasks(objects, decoder);
        if (image is not null) ResultAnnotator.SavePng(ResultAnnotator.Draw(image, objects), outPath!);

        if (json)
        {
            Console.Out.WriteLine(TaskJson.Write(false, w =>
            {
                w.WriteStartObject();
                w.WriteString("text", text);
                TaskJson.WriteImageSize(w, width, height);
                TaskJson.WriteObjects(w, objects);
                if (outPath is not null) w.WriteString("annotated", outPath);
                w.WriteEndObject();
            }));
        }
        else
        {
            if (objects.Count == 0) Console.Out.WriteLine("no objects found");
            foreach (var o in objects) Console.Out.WriteLine(TaskJson.Describe(o));
        }
        return 0;
    }
}
