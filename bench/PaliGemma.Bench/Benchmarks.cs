using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using PaliGemma.Bench.Onnx;
using PaliGemma.Bench.Pairs;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.Bench;

/// <summary>Keeps the catalogue names whole in the summary table.</summary>
public sealed class PairConfig : ManualConfig
{
    public PairConfig() => SummaryStyle = SummaryStyle.Default.WithMaxParameterColumnWidth(48);
}

/// <summary>Ours (baseline) against ONNX Runtime for one catalogue entry; setup fails if the outputs disagree.</summary>
[Config(typeof(PairConfig))]
public abstract class PairBenchmark
{
    private KernelPair? _pair;

    public abstract string Case { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        KernelThreading.MaxThreads = OrtRunner.Threads;
        _pair = Catalog.Create(Case);
        Console.WriteLine($"// {Case}: max|ours - ORT| / max|ORT| = {_pair.MaxRelativeDiff:0.00e+0} {_pair.Note}");
    }

    [GlobalCleanup]
    public void Cleanup() => _pair?.Dispose();

    [Benchmark(Baseline = true)]
    public void Ours() => _pair!.RunOurs();

    [Benchmark]
    public void OnnxRuntime() => _pair!.RunOrt();
}

public class MatMulBench : PairBenchmark
{
    public static IEnumerable<string> Cases => Catalog.MatMul;

    [ParamsSource(nameof(Cases))]
    public override string Case { get; set; } = "";
}

public class AttentionBench : PairBenchmark
{
    public static IEnumerable<string> Cases => Catalog.Attention;

    [ParamsSource(nameof(Cases))]
    public override string Case { get; set; } = "";
}

public class NormBench : PairBenchmark
{
    public static IEnumerable<string> Cases => Catalog.Norm;

    [ParamsSource(nameof(Cases))]
    public override string Case { get; set; } = "";
}
