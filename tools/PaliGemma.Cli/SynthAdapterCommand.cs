using System.Globalization;
using PaliGemma.CpuOnly.Model.Synthesis;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Cli;

/// <summary><c>paligemma synth-adapter</c>: a random PEFT LoRA adapter for a checkpoint, for LoRA benchmarks without a trained one.</summary>
public static class SynthAdapterCommand
{
    private static readonly HashSet<string> Flags = ["force", "quiet"];

    public static int Run(string[] args)
    {
        var a = new ParsedArguments(args, Flags);
        string modelDir = a.Required("model");
        string outDir = a.Required("out");
        int rank = a.Int("rank", 8, 1, 1 << 16);
        float alpha = a.Float("alpha", 16f, float.Epsilon, 1e9f);
        string targetsText = a.Optional("targets") ?? string.Join(",", SyntheticAdapterOptions.DefaultTargets);
        ulong seed = a.ULong("seed", 0);
        DType dtype = (a.Optional("dtype") ?? "f32").ToLowerInvariant() switch
        {
            "f32" or "fp32" or "float32" => DType.F32,
            "bf16" or "bfloat16" => DType.BF16,
            "f16" or "fp16" or "float16" => DType.F16,
            var other => throw new UsageException($"--dtype must be f32, bf16 or f16, got '{other}'"),
        };
        bool force = a.Flag("force"), quiet = a.Flag("quiet");
        a.RejectUnknown();

        string[] targets = targetsText.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (targets.Length == 0) throw new UsageException($"--targets must list module names separated by commas, got '{targetsText}'");

        var options = new SyntheticAdapterOptions { Rank = rank, Alpha = alpha, TargetModules = targets, Seed = seed, DType = dtype, Overwrite = force };
        if (!quiet) Console.Error.WriteLine($"[synth-adapter] {modelDir} -> {outDir} (r {rank}, alpha {alpha.ToString(CultureInfo.InvariantCulture)}, {dtype.ToHeaderName()}, targets {string.Join(",", targets)}, seed {seed})");
        var result = SyntheticAdapter.Write(modelDir, outDir, options);
        Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"wrote {result.TensorCount} tensors for {result.Modules.Count} modules, {result.TensorBytes / 1e6:F2} MB to {result.Directory} in {result.Elapsed.TotalSeconds:F1} s"));
        return 0;
    }
}
