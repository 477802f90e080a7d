using System.Buffers;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Tasks;

namespace PaliGemma.Cli;

/// <summary>JSON output of task results, written with <see cref="Utf8JsonWriter"/> (no reflection, NativeAOT-clean).</summary>
internal static class TaskJson
{
    public static string Write(bool indented, Action<Utf8JsonWriter> body)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = indented, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            body(w);
        }
        return Encoding.UTF8.GetString(buffer.WrittenSpan);
    }

    /// <summary>The fields of a task result, inside an object the caller has started.</summary>
    public static void WriteResult(Utf8JsonWriter w, TaskResult r, double loadMs, double totalMs)
    {
        w.WriteString("task", r.Task.ToString().ToLowerInvariant());
        w.WriteString("prompt", r.Prompt);
        w.WriteString("text", r.Text);
        WriteImageSize(w, r.ImageWidth, r.ImageHeight);
        if (r.Task is PaliGemmaTask.Detect or PaliGemmaTask.Segment) WriteObjects(w, r.Objects);
        WriteInts(w, "generated_ids", r.GeneratedIds);
        w.WriteBoolean("stopped_at_eos", r.StoppedAtEos);
        var t = r.Timings;
        w.WriteStartObject("timings_ms");
        if (loadMs >= 0) w.WriteNumber("load", Ms(loadMs));
        w.WriteNumber("preprocess", Ms(t.Preprocess.TotalMilliseconds));
        w.WriteNumber("vision", Ms(t.Vision.TotalMilliseconds));
        w.WriteNumber("prefill", Ms(t.Prefill.TotalMilliseconds));
        w.WriteNumber("decode", Ms(t.DecodeSteps.Sum(s => s.TotalMilliseconds)));
        w.WriteNumber("decode_steps", t.DecodeSteps.Count);
        w.WriteNumber("masks", Ms(r.MaskDecode.TotalMilliseconds));
        w.WriteNumber("total", Ms(totalMs));
        w.WriteEndObject();
    }

    public static void WriteImageSize(Utf8JsonWriter w, int width, int height)
    {
        w.WriteStartObject("image_size");
        w.WriteNumber("width", width);
        w.WriteNumber("height", height);
        w.WriteEndObject();
    }

    /// <summary>
    /// "objects": label, box_xyxy (pixels, token / 1023 * size), box_xyxy_div1024, normalized y1x1y2x2 (both conventions),
    /// loc tokens, seg codes or null, the integer mask box, and the full-image mask as COCO uncompressed RLE (column-major).
    /// </summary>
    public static void WriteObjects(Utf8JsonWriter w, IReadOnlyList<DetectedObject> objects)
    {
        w.WriteStartArray("objects");
        foreach (var o in objects)
        {
            w.WriteStartObject();
            w.WriteString("label", o.Label);
            WriteDoubles(w, "box_xyxy", o.BoxXyxy);
            WriteDoubles(w, "box_xyxy_div1024", o.BoxXyxyDiv1024);
            WriteDoubles(w, "normalized_y1x1y2x2", o.NormalizedY1X1Y2X2);
            WriteDoubles(w, "normalized_y1x1y2x2_div1024", o.NormalizedY1X1Y2X2Div1024);
            WriteInts(w, "loc_y1x1y2x2", o.LocY1X1Y2X2);
            if (o.Seg is { } seg) WriteInts(w, "seg", seg);
            else w.WriteNull("seg");
            if (o.Seg is not null)
            {
                if (o.MaskPixelBox is { } box) WriteInts(w, "mask_pixel_box_x1y1x2y2", [box.X1, box.Y1, box.X2, box.Y2]);
                else w.WriteNull("mask_pixel_box_x1y1x2y2");
            }
            if (o.Mask is { } mask)
            {
                w.WriteStartObject("mask");
                w.WriteString("format", "coco_rle_uncompressed_column_major");
                WriteInts(w, "size", [o.ImageHeight, o.ImageWidth]);
                WriteInts(w, "counts", MaskRle.Encode(mask, o.ImageWidth, o.ImageHeight));
                w.WriteNumber("area", mask.Count(m => m != 0));
                w.WriteEndObject();
            }
            else w.WriteNull("mask");
            w.WriteEndObject();
        }
        w.WriteEndArray();
    }

    /// <summary>One readable line per object for plain output.</summary>
    public static string Describe(DetectedObject o)
    {
        string text = o.ToString();
        if (o.Mask is { } mask) text += FormattableString.Invariant($" mask={mask.Count(m => m != 0)}px");
        else if (o.Seg is not null) text += " (seg codes, no mask decoded)";
        return text;
    }

    public static void WriteInts(Utf8JsonWriter w, string name, IReadOnlyList<int> values)
    {
        w.WriteStartArray(name);
        foreach (int v in values) w.WriteNumberValue(v);
        w.WriteEndArray();
    }

    private static void WriteDoubles(Utf8JsonWriter w, string name, double[] values)
    {
        w.WriteStartArray(name);
        foreach (double v in values) w.WriteNumberValue(v);
        w.WriteEndArray();
    }

    private static double Ms(double ms) => Math.Round(ms, 3);
}

/// <summary>Helpers shared by the task commands.</summary>
internal static class TaskSupport
{
    /// <summary>Loads the mask decoder, or fails with one line that says where to get it.</summary>
    public static MaskDecoder LoadMaskDecoder(string? path, string command)
    {
        string hint = OneLine(MaskDecoder.DownloadHint);
        if (path is null) throw new FileNotFoundException($"{command} needs the mask decoder: pass --vae FILE. {hint}");
        if (!File.Exists(path)) throw new FileNotFoundException($"mask decoder '{path}' not found. {hint}", path);
        return MaskDecoder.Load(path);
    }

    public static string OneLine(string text) => text.ReplaceLineEndings(" ").Trim();

    public static void Progress(bool quiet, string message)
    {
        if (!quiet) Console.Error.WriteLine($"[paligemma] {message}");
    }
}
