using System.Diagnostics;
using PaliGemma.CpuOnly.Quant;

namespace PaliGemma.Cli;

/// <summary><c>paligemma quantize</c>: writes a q8 or nf4 copy of a float checkpoint that loads memory-mapped.</summary>
public static class QuantizeCommand
{
    private static readonly HashSet<string> Flags = ["quiet"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string modelDir = a.Required("model");
        string outDir = a.Required("out");
        QuantFormat format = ParseFormat(a.Required("to"), "--to");
        ScaleSelection scales = ParseScales(a.Optional("quant-scales"), ScaleSelection.MinimumError);
        bool quiet = a.Flag("quiet");
        a.RejectUnknown();
        if (Path.GetFullPath(modelDir).TrimEnd('/') == Path.GetFullPath(outDir).TrimEnd('/'))
            throw new UsageException("--out must be a different folder from --model");

        var clock = Stopwatch.StartNew();
        QuantizedCheckpoint.Write(modelDir, outDir, format, quiet ? null : message => Console.Error.WriteLine($"[quantize] {message}"), scales);
        if (!quiet)
        {
            long bytes = new FileInfo(Path.Combine(outDir, "model.safetensors")).Length;
            Console.Error.WriteLine($"[quantize] wrote {Path.Combine(outDir, "model.safetensors")} ({bytes / 1e9:F2} GB, {format.Name()}; embedding q8) in {clock.Elapsed.TotalSeconds:F1} s");
        }
        return 0;
    }

    /// <summary>Parses <c>--quant-scales search|absmax</c>; absent: <paramref name="absent"/>.</summary>
    public static ScaleSelection ParseScales(string? text, ScaleSelection absent) => text?.ToLowerInvariant() switch
    {
        null => absent,
        "search" => ScaleSelection.MinimumError,
        "absmax" => ScaleSelection.AbsMax,
        _ => throw new UsageException($"--quant-scales must be search or absmax, got '{text}'"),
    };

    /// <summary>Parses q8 / nf4 for <paramref name="option"/>, or reports a usage error.</summary>
    public static QuantFormat ParseFormat(string text, string option) =>
        QuantFormats.Parse(text) ?? throw new UsageException($"{option} must be q8 or nf4, got '{text}'");
}
