using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using PaliGemma.Bench.Onnx;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Bench.Quant;

/// <summary>
/// <c>quant [gemm] [gemv] [--rows M[,M...]] [--runs R] [--threads T] [--shape NAME] [--format q8|nf4]</c>: the quantized
/// kernels side by side, one random fp32 matrix per shape quantized every way, Stopwatch medians over R rounds (default 5)
/// of alternating blocks of calls, T threads each (default 2; with 1 the calls are timed by the thread's CPU time); --shape
/// keeps the shapes whose name contains NAME, --format the GEMM rows of one weight format (default both).
/// <list type="bullet">
/// <item><c>gemm</c>: M x rows (default 256) through bf16 <see cref="MatMul"/> and q8 and nf4 on each prefill kernel
/// (dequantized panels, int16 activations, int8 activations where the CPU has VNNI), all timed in one alternation, with
/// each one's error against the fp32 product.</item>
/// <item><c>gemv</c>: one row through bf16 <see cref="MatMul"/>, ONNX Runtime's MatMulNBits (4-bit, block 32) and our nf4 and q8 GEMV; each quantized output
/// must equal the product of its own dequantized weights (fp32 rounding only), and each format's error against the fp32
/// product is printed.</item>
/// </list>
/// </summary>
internal static unsafe class QuantCompare
{
    private static readonly (string Name, int K, int N)[] GemmShapes =
    [
        ("gemma.q", 2048, 2048), ("gemma.kv", 2048, 256), ("gemma.up", 2048, 16384), ("gemma.down", 16384, 2048),
        ("siglip.fc1", 1152, 4304), ("siglip.fc2", 4304, 1152), ("siglip.qkvo", 1152, 1152),
    ];

    private static readonly (string Name, int K, int N)[] GemvShapes =
    [
        ("gemma.q", 2048, 2048), ("gemma.kv", 2048, 256), ("gemma.up", 2048, 16384), ("gemma.down", 16384, 2048),
        ("lm_head", 2048, 65536),
    ];

    public static int Run(string[] args)
    {
        bool gemm = args.Contains("gemm") || !args.Contains("gemv");
        bool gemv = args.Contains("gemv") || !args.Contains("gemm");
        int[] rowCounts = [256];
        int runs = 5;
        int threads = OrtRunner.Threads;
        string? only = null;
        QuantFormat[] formats = [QuantFormat.Q8, QuantFormat.Nf4];
        for (int i = 0; i < args.Length - 1; i++)
        {
            if (args[i] == "--rows") rowCounts = args[i + 1].Split(',').Select(s => int.Parse(s, CultureInfo.InvariantCulture)).ToArray();
            if (args[i] == "--runs") runs = int.Parse(args[i + 1], CultureInfo.InvariantCulture);
            if (args[i] == "--threads") threads = int.Parse(args[i + 1], CultureInfo.InvariantCulture);
            if (args[i] == "--shape") only = args[i + 1];
            if (args[i] == "--format") formats = [QuantFormats.Parse(args[i + 1]) ?? throw new ArgumentException($"--format {args[i + 1]}: expected q8 or nf4")];
        }
        KernelThreading.MaxThreads = threads;
        Console.WriteLine($"# quantized kernels, {threads} threads each, {Environment.ProcessorCount} CPUs, load average {BenchStats.LoadAverage()}; " +
                          $"int8-activation path: {IntegerGemm.BestInt8}, int16-activation path: {IntegerGemm.BestInt16} (None: the kernel runs the panels)");
        int failures = 0;
        if (gemm)
            foreach (int rows in rowCounts)
                failures += Gemm(rows, runs, only, formats);
        if (gemv)
            failures += Gemv(runs);
        Console.WriteLine($"# load average after: {BenchStats.LoadAverage()}");
        return failures == 0 ? 0 : 1;
    }

    private static int Gemm(int rows, int runs, string? only, QuantFormat[] formats)
    {
        Console.WriteLine();
        Console.WriteLine($"## GEMM, M = {rows}: ms (median), speed-up over bf16 MatMul, GFLOP/s (2·M·K·N / time), rms error vs the fp32 product relative to its rms");
        Console.WriteLine("| shape | weights | bf16 | panels | int16 act | int8 act | int16 / bf16 | int8 / bf16 | int16 / panels | GFLOP/s bf16 / int16 | err bf16 | err panels | err int16 | err int8 |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        foreach (var (name, k, n) in GemmShapes)
        {
            if (only != null && !name.Contains(only, StringComparison.Ordinal))
                continue;
            using var x = new NativeBuffer((long)rows * k).FillUniform(1, 1f);
            using var w32 = new NativeBuffer((long)n * k).FillUniform(2, 1f / MathF.Sqrt(k));
            using var reference = new NativeBuffer((long)rows * n);
            using var y = new NativeBuffer((long)rows * n);
            MatMul.Multiply(x.Span, rows, new WeightMatrix(w32.Pointer, DType.F32, n, k), default, reference.Span);
            ushort[] bf16 = ToBFloat16(w32.Pointer, (long)n * k);
            var quantized = formats.Select(format => Quantizer.Quantize(new WeightMatrix(w32.Pointer, DType.F32, n, k), format)).ToArray();
            fixed (ushort* bf16Pointer = bf16)
            {
                var bf16Matrix = new WeightMatrix(bf16Pointer, DType.BF16, n, k);
                QuantPrefillKernel[] kernels = [QuantPrefillKernel.DequantizedPanels, QuantPrefillKernel.Int16Activations, QuantPrefillKernel.Int8Activations];
                // bf16, then each format's three kernels: one alternation, so every ratio compares calls of the same rounds.
                var actions = new List<Action> { () => MatMul.Multiply(x.Span, rows, bf16Matrix, default, y.Span) };
                foreach (var w in quantized)
                    foreach (var kernel in kernels)
                        actions.Add(() =>
                        {
                            QuantMatMul.PrefillKernel = kernel;
                            QuantMatMul.Multiply(x.Span, rows, w, default, y.Span);
                        });
                // Errors from one run each; the int8 kernel is the int16 one on CPUs without VNNI.
                var errors = actions.Select(action => { action(); return RmsRelativeError(y.Span, reference.Span); }).ToArray();
                // One thread: timed by the thread's CPU time, which time slices lost to other processes do not inflate.
                double[] ms = KernelThreading.MaxThreads == 1 ? ThreadCpuAlternating([.. actions], runs, 3) : TimeAlternating([.. actions], runs, 3);
                QuantMatMul.PrefillKernel = QuantPrefillKernel.Auto;
                for (int f = 0; f < quantized.Length; f++)
                {
                    int p = 1 + 3 * f, i16 = p + 1, i8 = p + 2;
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"| {name} {k}x{n} | {formats[f].Name()} | {ms[0]:F2} | {ms[p]:F2} | {ms[i16]:F2} | {ms[i8]:F2} | {ms[0] / ms[i16]:F2}x | {ms[0] / ms[i8]:F2}x | {ms[p] / ms[i16]:F2}x | {2.0 * rows * k * n / ms[0] / 1e6:F0} / {2.0 * rows * k * n / ms[i16] / 1e6:F0} | {errors[0]:0.0e+0} | {errors[p]:0.0e+0} | {errors[i16]:0.0e+0} | {errors[i8]:0.0e+0} |"));
                }
            }
        }
        return 0;
    }

    private static int Gemv(int runs)
    {
        Console.WriteLine();
        Console.WriteLine("## GEMV, M = 1: ms (median); speed = ORT ms / ours; GB/s of weight bytes; rms error vs the fp32 product relative to its rms");
        Console.WriteLine("| shape | bf16 MatMul | ORT MatMulNBits 4b/32 | ours nf4 | ours q8 | nf4 speed vs ORT | q8 speed vs ORT | GB/s bf16 / ORT / nf4 / q8 | err ORT | err nf4 | err q8 |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|---|");
        int failures = 0;
        foreach (var (name, k, n) in GemvShapes)
        {
            using var x = new NativeBuffer(k).FillUniform(3, 1f);
            using var w32 = new NativeBuffer((long)n * k).FillUniform(4, 1f / MathF.Sqrt(k));
            using var reference = new NativeBuffer(n);
            using var yOrt = new NativeBuffer(n);
            using var yNf4 = new NativeBuffer(n);
            using var yQ8 = new NativeBuffer(n);
            MatMul.Multiply(x.Span, 1, new WeightMatrix(w32.Pointer, DType.F32, n, k), default, reference.Span);
            using var ort = new MatMulNBitsRunner(w32.Pointer, n, k, 1, x, yOrt);
            var nf4 = Quantizer.Quantize(new WeightMatrix(w32.Pointer, DType.F32, n, k), QuantFormat.Nf4);
            var q8 = Quantizer.Quantize(new WeightMatrix(w32.Pointer, DType.F32, n, k), QuantFormat.Q8);
            ushort[] bf16 = ToBFloat16(w32.Pointer, (long)n * k);
            using var yBf16 = new NativeBuffer(n);
            var bf16Handle = GCHandle.Alloc(bf16, GCHandleType.Pinned);
            var bf16Matrix = new WeightMatrix((void*)bf16Handle.AddrOfPinnedObject(), DType.BF16, n, k);
            Action[] actions =
            [
                ort.Run,
                () => QuantMatMul.Multiply(x.Span, 1, nf4, default, yNf4.Span),
                () => QuantMatMul.Multiply(x.Span, 1, q8, default, yQ8.Span),
                () => MatMul.Multiply(x.Span, 1, bf16Matrix, default, yBf16.Span),
            ];
            foreach (var action in actions) action();
            // Each kernel against the exact product of the weights it was given (only fp32 rounding may differ).
            string? mismatch = CheckOwnWeights("ORT", yOrt, x, n, k, ort.Dequantize)
                ?? CheckOwnWeights("nf4", yNf4, x, n, k, nf4.DequantizeRow)
                ?? CheckOwnWeights("q8", yQ8, x, n, k, q8.DequantizeRow);
            if (mismatch != null)
            {
                failures++;
                Console.WriteLine($"| {name} {k}x{n} | FAILED: {mismatch}");
                continue;
            }
            double[] ms = TimeAlternating(actions, runs, 50);
            bf16Handle.Free();
            double ortBytes = ort.Codes.Length + ort.Scales.Length * 4.0 + k * 4.0;
            double nf4Bytes = nf4.StreamedBytes + k * 4.0, q8Bytes = q8.StreamedBytes + k * 4.0, bf16Bytes = (double)n * k * 2 + k * 4.0;
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"| {name} {k}x{n} | {ms[3]:F4} | {ms[0]:F4} | {ms[1]:F4} | {ms[2]:F4} | {ms[0] / ms[1]:F2}x | {ms[0] / ms[2]:F2}x | {bf16Bytes / ms[3] / 1e6:F1} / {ortBytes / ms[0] / 1e6:F1} / {nf4Bytes / ms[1] / 1e6:F1} / {q8Bytes / ms[2] / 1e6:F1} | " +
                $"{RmsRelativeError(yOrt.Span, reference.Span):0.0e+0} | {RmsRelativeError(yNf4.Span, reference.Span):0.0e+0} | {RmsRelativeError(yQ8.Span, reference.Span):0.0e+0} |"));
        }
        Console.WriteLine("# weight bytes per weight: ORT 4-bit/32 with fp32 scales 0.625, nf4/64 with fp16 absmax 0.53125, q8/32 with fp16 scales 1.0625");
        return failures;
    }

    private delegate void RowReader(int row, Span<float> destination);

    private static string? CheckOwnWeights(string label, NativeBuffer y, NativeBuffer x, int n, int k, RowReader dequantize)
    {
        var row = new float[k];
        for (int r = 0; r < n; r++)
        {
            dequantize(r, row);
            double sum = 0, magnitude = 0;
            for (int i = 0; i < k; i++)
            {
                sum += (double)x.Pointer[i] * row[i];
                magnitude += Math.Abs((double)x.Pointer[i] * row[i]);
            }
            if (!(Math.Abs(y.Pointer[r] - sum) <= 1e-5 * magnitude + 1e-6))
                return string.Create(CultureInfo.InvariantCulture, $"{label} y[{r}] = {y.Pointer[r]}, its dequantized weights give {sum}");
        }
        return null;
    }

    private static ushort[] ToBFloat16(float* source, long count)
    {
        var result = new ushort[count];
        for (long i = 0; i < count; i++)
            result[i] = (ushort)(BitConverter.SingleToUInt32Bits(source[i]) >> 16);
        return result;
    }

    private static double RmsRelativeError(ReadOnlySpan<float> actual, ReadOnlySpan<float> expected)
    {
        double error = 0, norm = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            double d = actual[i] - (double)expected[i];
            error += d * d;
            norm += (double)expected[i] * expected[i];
        }
        return Math.Sqrt(error / norm);
    }

    /// <summary>
    /// Medians in ms over <paramref name="rounds"/> rounds, each running every action <paramref name="block"/> times in a
    /// row (a pause before each block: ORT's pool spins for a while after its runs and would otherwise slow the next
    /// kernel). Alternating by blocks keeps the load and clock drift the same for all.
    /// </summary>
    private static double[] TimeAlternating(Action[] actions, int rounds, int block)
    {
        // Warm-up: enough calls (and a pause) for the tiered JIT to install optimized code for every kernel.
        for (int round = 0; round < 2; round++)
        {
            foreach (var action in actions)
            {
                var warm = Stopwatch.StartNew();
                for (int call = 0; call < 40 || warm.Elapsed.TotalSeconds < 0.2; call++) action();
            }
            Thread.Sleep(300);
        }
        var times = actions.Select(_ => new List<double>()).ToArray();
        for (int round = 0; round < rounds; round++)
        {
            for (int i = 0; i < actions.Length; i++)
            {
                Thread.Sleep(20);
                for (int call = 0; call < block; call++)
                {
                    long start = Stopwatch.GetTimestamp();
                    actions[i]();
                    times[i].Add(Stopwatch.GetElapsedTime(start).TotalMilliseconds);
                }
            }
        }
        return times.Select(BenchStats.Median).ToArray();
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct TimeSpec { public long Seconds; public long Nanoseconds; }

    [DllImport("libc", EntryPoint = "clock_gettime")]
    private static extern int ClockGetTime(int clock, out TimeSpec time);

    /// <summary>CPU time of the calling thread in ms (Linux CLOCK_THREAD_CPUTIME_ID): time lost to other processes is not counted.</summary>
    private static double ThreadCpuMs()
    {
        ClockGetTime(3, out TimeSpec t);
        return t.Seconds * 1e3 + t.Nanoseconds / 1e6;
    }

    /// <summary>As <see cref="TimeAlternating"/> on one thread, timing each call by the thread's CPU time.</summary>
    private static double[] ThreadCpuAlternating(Action[] actions, int rounds, int block)
    {
        foreach (var action in actions)
            for (int call = 0; call < 30; call++) action();
        var times = actions.Select(_ => new List<double>()).ToArray();
        for (int round = 0; round < rounds; round++)
        {
            for (int i = 0; i < actions.Length; i++)
            {
                for (int call = 0; call < block; call++)
                {
                    double start = ThreadCpuMs();
                    actions[i]();
                    times[i].Add(ThreadCpuMs() - start);
                }
            }
        }
        return times.Select(BenchStats.Median).ToArray();
    }


}
