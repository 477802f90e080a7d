using BenchmarkDotNet.Running;

namespace PaliGemma.Bench;

public static class Program
{
    /// <summary>
    /// <c>compare [substring...]</c>: quick Stopwatch table of ours vs ONNX Runtime per kernel;
    /// <c>components [checkpoint] [--vision-layers N] [--text-layers N] [--prompt T] [--runs R]</c>: whole SigLIP and Gemma layers;
    /// <c>stream [gemv case...] [--rounds R] [--mb M] [--pause MS]</c>: GEMV streaming of ours, ORT's and plain reads, side by side;
    /// <c>quant [gemm] [gemv] [--rows M,...] [--runs R] [--threads T] [--shape NAME] [--format q8|nf4]</c>: q8/nf4 prefill kernels vs bf16, GEMV vs ORT's MatMulNBits;
    /// anything else goes to BenchmarkDotNet
    /// (e.g. <c>--filter '*MatMul*' --job short</c>).
    /// </summary>
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "compare")
            return Compare.Run(args[1..]);
        if (args.Length > 0 && args[0] == "stream")
            return StreamCompare.Run(args[1..]);
        if (args.Length > 0 && args[0] == "quant")
            return Quant.QuantCompare.Run(args[1..]);
        if (args.Length > 0 && args[0] == "components")
            return Components.ComponentCompare.Run(args[1..]);
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        return 0;
    }
}
