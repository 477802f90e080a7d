using System.Diagnostics;
using System.Globalization;
using PaliGemma.CpuOnly.Model.Synthesis;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Cli;

/// <summary><c>paligemma synth</c>: a full-size random-weight checkpoint from a config, for benchmarks without downloads.</summary>
public static class SynthCommand
{
    private static readonly HashSet<string> Flags = ["force", "quiet"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string configPath = a.Required("config");
        string outDir = a.Required("out");
        string dtypeText = a.Optional("dtype") ?? "bf16";
        // q8 / nf4: the quantized layout of `paligemma quantize`, written directly (the other tensors stay bf16).
        QuantFormat? quantization = QuantFormats.Parse(dtypeText);
        DType dtype = quantization is null ? ParseDType(dtypeText) : DType.BF16;
        ulong seed = a.ULong("seed", 0);
        long shardBytes = ParseByteSize("shard-size", a.Optional("shard-size") ?? "2GB");
        string? tokenizer = a.Optional("vocab-tokenizer");
        bool force = a.Flag("force"), quiet = a.Flag("quiet");
        a.RejectUnknown();

        var options = new SyntheticCheckpointOptions { DType = dtype, Seed = seed, MaxShardBytes = shardBytes, TokenizerPath = tokenizer, Overwrite = force, Quantization = quantization };
        var lastReport = Stopwatch.StartNew();
        var stderr = Console.Error;
        void Report(SynthesisProgress p)
        {
            if (quiet || (lastReport.Elapsed.TotalSeconds < 1 && p.BytesWritten < p.TotalBytes)) return;
            lastReport.Restart();
            double seconds = Math.Max(p.Elapsed.TotalSeconds, 1e-9), rate = p.BytesWritten / seconds;
            double eta = rate > 0 ? (p.TotalBytes - p.BytesWritten) / rate : 0;
            stderr.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"[synth] {p.BytesWritten / 1e9:F2}/{p.TotalBytes / 1e9:F2} GB ({100.0 * p.BytesWritten / Math.Max(p.TotalBytes, 1):F0}%), {rate / 1e6:F0} MB/s, ETA {eta:F0} s"));
        }

        if (!quiet) stderr.WriteLine($"[synth] {configPath} -> {outDir} ({quantization?.Name() ?? dtype.ToHeaderName()}, seed {seed}, shards up to {FormatBytes(shardBytes)})");
        var result = SyntheticCheckpoint.Write(configPath, outDir, options, Report);
        double mbPerSecond = result.TensorBytes / Math.Max(result.Elapsed.TotalSeconds, 1e-9) / 1e6;
        Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"wrote {result.TensorCount} tensors, {result.TensorBytes / 1e9:F3} GB in {result.WeightFiles.Count} file(s) to {result.Directory} in {result.Elapsed.TotalSeconds:F1} s ({mbPerSecond:F0} MB/s)"));
        return 0;
    }

    private static string FormatBytes(long bytes) => bytes switch
    {
        >= 1_000_000_000 => (bytes / 1e9).ToString("0.## GB", CultureInfo.InvariantCulture),
        >= 1_000_000 => (bytes / 1e6).ToString("0.## MB", CultureInfo.InvariantCulture),
        >= 1_000 => (bytes / 1e3).ToString("0.## KB", CultureInfo.InvariantCulture),
        _ => bytes.ToString(CultureInfo.InvariantCulture) + " B",
    };

    private static DType ParseDType(string text) => text.ToLowerInvariant() switch
    {
        "bf16" or "bfloat16" => DType.BF16,
        "f32" or "fp32" or "float32" => DType.F32,
        "f16" or "fp16" or "float16" => DType.F16,
        _ => throw new UsageException($"--dtype must be bf16, f32, f16, q8 or nf4, got '{text}'"),
    };

    /// <summary>"2GB", "500MB", "1GiB", "123456" (bytes): decimal units as Hugging Face's max_shard_size, binary ones with "i".</summary>
    internal static long ParseByteSize(string option, string text)
    {
        string t = text.Trim();
        int split = t.Length;
        while (split > 0 && char.IsLetter(t[split - 1])) split--;
        long unit = t[split..].ToUpperInvariant() switch
        {
            "" or "B" => 1L,
            "KB" => 1_000L,
            "MB" => 1_000_000L,
            "GB" => 1_000_000_000L,
            "KIB" => 1L << 10,
            "MIB" => 1L << 20,
            "GIB" => 1L << 30,
            _ => -1L,
        };
        if (unit < 0 || !double.TryParse(t[..split], NumberStyles.Float, CultureInfo.InvariantCulture, out double value) || !(value > 0) || value * unit > long.MaxValue)
            throw new UsageException($"--{option} must be a size such as 2GB, 500MB or 1GiB, got '{text}'");
        return Math.Max(1, (long)(value * unit));
    }
}
